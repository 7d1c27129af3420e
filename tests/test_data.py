"""Tests for Poisson sampling (`keras_dp.data`) and how `fit` uses it.

Statistical checks use fixed seeds (so they are deterministic) and
tolerances derived from the sampling distribution, stated next to each check.
Training checks use `noise_multiplier=0.0` so updates are deterministic and
can be compared exactly (up to float rounding) between two models.
"""

import math
import warnings

import keras
import numpy as np
import pytest

from accounting_fixtures import FEATURES
from accounting_fixtures import N
from accounting_fixtures import make_regression
from accounting_fixtures import steps_taken

import keras_dp
from keras_dp import data as data_lib


def make_arrays(n=N, seed=0):
    """`x` whose column 0 is the row id, and `y = 10 * id + 1`."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, FEATURES)).astype("float32")
    x[:, 0] = np.arange(n)
    y = (10.0 * np.arange(n) + 1.0).astype("float32").reshape(n, 1)
    return x, y


def make_binary(n=N, seed=2):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, FEATURES)).astype("float32")
    # Unbalanced classes so that class weights matter.
    y = (x[:, :1] + 0.5 * rng.normal(size=(n, 1)) > 0.6).astype("float32")
    return x, y


def build_model(kind="plain", seed=0, activation=None):
    inputs = keras.Input((FEATURES,))
    hidden = inputs
    if kind == "activity":
        hidden = keras.layers.Dense(
            4,
            activation="tanh",
            activity_regularizer=keras.regularizers.L2(0.5),
        )(hidden)
    elif kind == "dropout":
        hidden = keras.layers.Dense(16, activation="relu")(hidden)
        hidden = keras.layers.Dropout(0.5, seed=7)(hidden)
    outputs = keras.layers.Dense(1, activation=activation)(hidden)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(seed)
    model.set_weights(
        [
            rng.normal(scale=0.5, size=w.shape).astype("float32")
            for w in model.get_weights()
        ]
    )
    return model


def private_model(kind="plain", optimizer=None, loss="mse", activation=None, **kw):
    model = keras_dp.make_private(build_model(kind, activation=activation), **kw)
    model.compile(
        optimizer=optimizer or keras_dp.DPSGD(learning_rate=1.0, noise_multiplier=0.0),
        loss=loss,
    )
    return model


def weights_of(model):
    return [np.asarray(w) for w in model.get_weights()]


def assert_weights_close(a, b, rtol=1e-5, atol=1e-6):
    for wa, wb in zip(weights_of(a), weights_of(b)):
        np.testing.assert_allclose(wa, wb, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------
# PoissonSampler on its own.
# ---------------------------------------------------------------------------


def test_batch_size_distribution_matches_binomial():
    n, batch_size = 400, 40
    q = batch_size / n
    x, y = make_arrays(n)
    sampler = data_lib.PoissonSampler(x, y, batch_size=batch_size, seed=123)
    assert sampler.sample_rate == pytest.approx(q)
    counts = []
    for _ in range(50):  # 50 epochs x 10 batches = 500 draws per sampler ...
        for index in range(len(sampler)):
            _, _, w = sampler[index]
            counts.append(int(np.count_nonzero(w)))
        sampler.on_epoch_end()
    # ... and more draws from other seeds, 5000 in all.
    for seed in range(9):
        other = data_lib.PoissonSampler(x, y, batch_size=batch_size, seed=seed)
        for update in range(500):
            counts.append(len(other.sample_indices(update)))
    counts = np.asarray(counts, dtype=np.float64)
    k = len(counts)
    assert k == 5000
    mean, var = n * q, n * q * (1 - q)  # 40 and 36: Binomial(400, 0.1).
    # Standard error of the sample mean: sqrt(var / k) = 0.085; allow 5 SE.
    assert abs(counts.mean() - mean) < 5 * math.sqrt(var / k)
    # Standard error of the sample variance of a near-normal variable:
    # var * sqrt(2 / (k - 1)) = 0.72; allow 5 SE (a fixed-size batch would
    # give variance 0, a wrong rate e.g. 0.05 would give 19).
    sample_var = counts.var(ddof=1)
    assert abs(sample_var - var) < 5 * var * math.sqrt(2 / (k - 1))


def test_each_example_included_at_rate_q():
    n, batch_size, draws = 200, 20, 2000
    q = batch_size / n
    x, y = make_arrays(n)
    sampler = data_lib.PoissonSampler(x, y, batch_size=batch_size, seed=5)
    hits = np.zeros(n)
    for update in range(draws):
        hits[sampler.sample_indices(update)] += 1
    # Each example's count is Binomial(2000, 0.1): mean 200, sd 13.4. Over
    # 200 examples the largest |z| stays below 4.5 except with probability
    # < 200 * 7e-6; the average over examples has sd 13.4 / sqrt(200) ~ 0.95.
    sd = math.sqrt(draws * q * (1 - q))
    assert np.max(np.abs(hits - draws * q)) < 4.5 * sd
    assert abs(hits.mean() - draws * q) < 5 * sd / math.sqrt(n)
    # Under independent inclusion the per-example counts are themselves
    # Binomial: their spread matches sd within 15% (SE of an sd estimate
    # from 200 values is ~5%).
    assert hits.std(ddof=1) == pytest.approx(sd, rel=0.15)


def test_padded_batches_have_tiered_rows_zero_weight_padding_and_real_rows():
    n, batch_size = 400, 40
    q = batch_size / n
    x, y = make_arrays(n)
    sample_weight = np.linspace(0.5, 2.0, n).astype("float32")
    sampler = data_lib.PoissonSampler(
        x, y, sample_weight, batch_size=batch_size, seed=11
    )
    # Expected, + 1 and + 3 standard deviations of Binomial(n, q), rounded
    # up to a multiple of 8: 40, ceil(40 + 6) = 46 -> 48, ceil(40 + 18) =
    # 58 -> 64.
    tiers = tuple(
        8 * math.ceil(math.ceil(batch_size + k * math.sqrt(batch_size * (1 - q))) / 8)
        for k in (0, 1, 3)
    )
    assert tiers == (40, 48, 64)
    assert data_lib.padded_batch_sizes(batch_size, q) == tiers
    assert data_lib.padded_batch_size(batch_size, q) == 64
    assert sampler.padded_sizes == tiers and sampler.padded_size == 64
    assert len(sampler) == math.ceil(n / batch_size)
    seen = set()
    for epoch in range(3):
        for index in range(len(sampler)):
            bx, by, bw = sampler[index]
            count = len(sampler.sample_indices(index))
            # 64 rows is 4 sd above the mean: no draw here exceeds it.
            assert count <= 64
            rows = next(size for size in tiers if count <= size)
            seen.add(rows)
            assert bx.shape == (rows, FEATURES)
            assert by.shape == (rows, 1)
            assert bw.shape == (rows,)
            ids = bx[:count, 0].astype(int)
            assert len(set(ids.tolist())) == count  # distinct
            assert set(ids.tolist()) == set(sampler.sample_indices(index).tolist())
            # Real rows carry their own x, y and weight.
            np.testing.assert_array_equal(bx[:count], x[ids])
            np.testing.assert_array_equal(by[:count], y[ids])
            np.testing.assert_array_equal(bw[:count], sample_weight[ids])
            # Padding rows have weight exactly 0 (and finite data).
            assert np.all(bw[count:] == 0)
            assert np.all(np.isfinite(bx[count:]))
        sampler.on_epoch_end()
    assert seen == set(tiers)  # every size occurs with this seed


def test_padding_sizes_hold_their_shares_of_draws():
    """At an expected 256 of n = 10,000 the sizes are 256, 272 and 304
    (+0, +1 and +3 sd). Over 3,000 updates the shares padded to 256 and to
    at most 272 are P(Binomial(n, q) <= 256) = 0.519 and P(... <= 272) =
    0.847; tolerance 4 standard errors of a share of 3,000 (at most
    4 * 0.0091). Every draw gets the first size that holds it."""
    n, batch_size, updates = 10_000, 256, 3000
    q = batch_size / n
    x, y = make_arrays(n)
    sampler = data_lib.PoissonSampler(
        x, y, batch_size=batch_size, steps_per_epoch=updates, seed=3
    )
    sizes = (256, 272, 304)
    assert sampler.padded_sizes == sizes
    rows = []
    for index in range(updates):
        count = len(sampler.part_units(index))
        padded = sampler.padded_units(index)
        expected = next((s for s in sizes if count <= s), None)
        assert padded == (expected or 8 * math.ceil(count / 8)), (count, padded)
        rows.append(padded)
    rows = np.array(rows)

    def binomial_cdf(m):
        return sum(
            math.exp(
                math.lgamma(n + 1)
                - math.lgamma(k + 1)
                - math.lgamma(n - k + 1)
                + k * math.log(q)
                + (n - k) * math.log1p(-q)
            )
            for k in range(m + 1)
        )

    for size, share in ((256, 0.519), (272, 0.847)):
        p = binomial_cdf(size)
        assert p == pytest.approx(share, abs=0.005)
        tolerance = 4 * math.sqrt(p * (1 - p) / updates)
        assert np.mean(rows <= size) == pytest.approx(p, abs=tolerance)


def test_pad_for_step_gives_each_batch_its_own_size():
    """For a step that is not compiled per batch shape, a batch has just
    its sampled rows (one zero-weight row for an empty draw), and going
    back to compiled shapes restores the sizes."""
    x, y = make_arrays(1000)
    sampler = data_lib.PoissonSampler(x, y, batch_size=2, seed=6)
    sampler.pad_for_step(compiled_per_shape=False)
    assert sampler.padded_sizes == () and sampler.padded_size == 8
    sizes = []
    for index in range(len(sampler)):
        bx, by, bw = sampler[index]
        count = len(sampler.sample_indices(index))
        sizes.append(count)
        assert len(bx) == len(by) == len(bw) == max(count, 1)
        assert np.count_nonzero(bw) == count
        np.testing.assert_array_equal(bx[:count, 0], sampler.sample_indices(index))
    # Binomial(1000, 0.002): empty, small and larger draws all occur.
    assert 0 in sizes and max(sizes) > 3
    sampler.pad_for_step(compiled_per_shape=True)
    assert sampler.padded_sizes == data_lib.padded_batch_sizes(2, 0.002)
    assert {len(sampler[i][2]) for i in range(len(sampler))} == {8}


@pytest.mark.parametrize("jit_compile", ["auto", True])
def test_fit_pads_batches_for_the_models_step(jit_compile):
    """`fit` pads to the few compiled sizes where the step compiles per
    batch shape (XLA: JAX, or `jit_compile=True`) and to each batch's own
    size on the other steps (PyTorch eager, TensorFlow graphs)."""
    backend = keras.backend.backend()
    if jit_compile is True and backend != "jax":
        pytest.skip("XLA of keras_dp's step is tested on JAX")
    x, y = make_regression(600)
    served = []

    class Recording(data_lib.PoissonSampler):
        def __getitem__(self, index):
            batch = super().__getitem__(index)
            served.append((len(self.part_units(index)), len(batch[2])))
            return batch

    sampler = Recording(x, y, batch_size=40, seed=1)
    model = keras_dp.make_private(build_model("plain"))
    model.compile(
        optimizer=keras_dp.DPSGD(
            learning_rate=0.01, l2_norm_clip=1.0, noise_multiplier=0.0
        ),
        loss="mse",
        jit_compile=jit_compile,
    )
    hints = []
    hint_recorder = keras.callbacks.LambdaCallback(
        on_train_batch_begin=lambda batch, logs: hints.append(
            model._keras_dp.batch_size_hint
        )
    )
    model.fit(sampler, epochs=2, verbose=0, callbacks=[hint_recorder])
    compiled = backend == "jax"
    assert sampler.padded_sizes == ((40, 48, 64) if compiled else ())
    # The rows the engine plans for where the batch size is unknown (a
    # TensorFlow graph's conv chunks) cover all but rare batches, padded or
    # not.
    assert set(hints) == {64} and sampler.padded_size == 64
    counts = np.array([c for c, _ in served])
    rows = np.array([r for _, r in served])
    if compiled:
        np.testing.assert_array_equal(
            rows, np.select([counts <= 40, counts <= 48], [40, 48], 64)
        )
    else:
        np.testing.assert_array_equal(rows, np.maximum(counts, 1))
    assert len(set(rows.tolist())) > 1


def test_padding_rows_are_zeros_in_every_array():
    """Padding rows carry no real example's values (issue 30): zeros in
    every input, target and weight, whatever their structure and dtype."""
    x, y = make_arrays(100)
    inputs = {"a": x, "ids": np.arange(1, 101, dtype="int32").reshape(100, 1)}
    sampler = data_lib.PoissonSampler(inputs, y, batch_size=10, seed=4)
    for index in range(len(sampler)):
        bx, by, bw = sampler[index]
        count = len(sampler.sample_indices(index))
        assert count < len(bw)  # the batch has padding rows
        assert bx["ids"].dtype == np.int32
        for array in (bx["a"], bx["ids"], by, bw):
            np.testing.assert_array_equal(array[count:], 0)
        # Real rows are never zero here (ids start at 1).
        assert np.all(bx["ids"][:count] > 0)


def test_oversized_draw_is_padded_further_not_truncated():
    x, y = make_arrays(400)

    class Oversized(data_lib.PoissonSampler):
        def sample_indices(self, update):
            return np.arange(70) + update

    sampler = Oversized(x, y, batch_size=40, seed=0)
    bx, _, bw = sampler[0]
    # 70 real rows do not fit the usual 64: the batch grows to 72 rows.
    assert bx.shape[0] == 72
    assert np.count_nonzero(bw) == 70
    np.testing.assert_array_equal(bx[:70, 0], np.arange(70))


def test_structured_inputs_are_sampled_together():
    x, y = make_arrays(100)
    inputs = {"a": x, "b": x[:, :2] * 2}
    sampler = data_lib.PoissonSampler(inputs, y, batch_size=10, seed=4)
    bx, by, bw = sampler[0]
    count = int(np.count_nonzero(bw))
    ids = bx["a"][:count, 0].astype(int)
    np.testing.assert_array_equal(bx["b"][:count], x[ids, :2] * 2)
    np.testing.assert_array_equal(by[:count], y[ids])


def test_epochs_differ_and_seed_reproduces():
    x, y = make_arrays(200)

    def draws(sampler, epochs=2):
        out = []
        for _ in range(epochs):
            out.append([sampler[i][0][:, 0].copy() for i in range(len(sampler))])
            sampler.on_epoch_end()
        return out

    first = draws(data_lib.PoissonSampler(x, y, batch_size=20, seed=3))
    again = draws(data_lib.PoissonSampler(x, y, batch_size=20, seed=3))
    other = draws(data_lib.PoissonSampler(x, y, batch_size=20, seed=4))
    for epoch in range(2):
        for a, b in zip(first[epoch], again[epoch]):
            np.testing.assert_array_equal(a, b)
    # Two epochs of the same sampler draw different batches.
    assert any(not np.array_equal(a, b) for a, b in zip(first[0], first[1]))
    # Batches within an epoch differ too.
    assert not np.array_equal(first[0][0], first[0][1])
    assert any(not np.array_equal(a, b) for a, b in zip(first[0], other[0]))
    # seed=None draws a fresh seed each time.
    s1 = data_lib.PoissonSampler(x, y, batch_size=20)
    s2 = data_lib.PoissonSampler(x, y, batch_size=20)
    assert s1.seed != s2.seed


def test_accumulation_splits_one_logical_batch_into_disjoint_parts():
    n, batch_size, k = 400, 20, 2
    x, y = make_arrays(n)
    sampler = data_lib.PoissonSampler(
        x, y, batch_size=batch_size, accumulation_steps=k, seed=9
    )
    assert sampler.sample_rate == pytest.approx(k * batch_size / n)
    updates = math.ceil(n / (k * batch_size))
    assert len(sampler) == updates * k
    logical_sizes = []
    part_sizes = []
    for update in range(updates):
        logical = sampler.sample_indices(update)
        parts = []
        for part in range(k):
            bx, by, bw = sampler[update * k + part]
            count = int(np.count_nonzero(bw))
            part_sizes.append(count)
            parts.append(bx[:count, 0].astype(int))
        union = np.concatenate(parts)
        assert len(set(union.tolist())) == len(union)  # disjoint
        assert sorted(union.tolist()) == sorted(logical.tolist())
        logical_sizes.append(len(logical))
    for _ in range(200):
        sampler.on_epoch_end()
        logical_sizes += [len(sampler.sample_indices(u)) for u in range(updates)]
    # 2010 logical batches ~ Binomial(400, 0.1): mean 40, SE of the mean
    # 6 / sqrt(2010) = 0.13; allow 5 SE. (A rate of B / n would give 20.)
    sizes = np.asarray(logical_sizes, dtype=float)
    assert abs(sizes.mean() - 40) < 5 * 6 / math.sqrt(len(sizes))
    # Each part is about half a logical batch (array_split: sizes differ by
    # at most one).
    assert abs(np.mean(part_sizes) - batch_size) < 3


def test_fit_accumulates_the_parts_of_one_logical_batch_per_update():
    x, y = make_regression(200)
    served = []
    original = data_lib.PoissonSampler.__getitem__

    def recording(self, index):
        served.append((self.epoch, index))
        return original(self, index)

    model = private_model(
        optimizer=keras_dp.DPSGD(
            learning_rate=0.1, noise_multiplier=1.0, gradient_accumulation_steps=2
        )
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data_lib.PoissonSampler, "__getitem__", recording)
        model.fit(x, y, batch_size=10, epochs=2, verbose=0)
    micro_batches = 2 * math.ceil(200 / 20)
    assert steps_taken(model) == 2 * micro_batches // 2
    # Keras may read batches ahead (input signature) in the first epoch;
    # the last epoch's reads are the micro-batches trained on, in order.
    last_epoch = max(epoch for epoch, _ in served)
    order = [index for epoch, index in served if epoch == last_epoch]
    order = order[:micro_batches]
    assert sorted(order) == list(range(micro_batches))
    # Micro-steps 2j and 2j + 1 form one optimizer update: they must be the
    # two parts of the same logical batch (sampler items 2u and 2u + 1).
    updates = [(order[2 * j] // 2, order[2 * j + 1] // 2) for j in range(10)]
    assert all(a == b for a, b in updates), order


def test_pairs_of_examples_are_included_independently():
    # Under Poisson sampling two examples share a batch with probability
    # q^2; a fixed-size batch would give q * (B - 1) / (n - 1), and sampling
    # with a dependence between examples something else again.
    n, batch_size, draws = 40, 8, 20000
    q = batch_size / n
    x, y = make_arrays(n)
    sampler = data_lib.PoissonSampler(x, y, batch_size=batch_size, seed=11)
    together = np.zeros((n, n))
    for update in range(draws):
        member = np.zeros(n)
        member[sampler.sample_indices(update)] = 1.0
        together += np.outer(member, member)
    pairs = together[np.triu_indices(n, k=1)] / draws
    # 780 pairs, each frequency ~ Binomial(20000, 0.04) / 20000 with sd
    # 0.0014: their mean has SE below 0.0014 / sqrt(780) (pairs sharing an
    # example are slightly correlated, so allow 8 such SE, 0.0004; the
    # fixed-size rate 0.0359 is 10 SE away).
    assert abs(pairs.mean() - q * q) < 8 * math.sqrt(q * q / draws / len(pairs))


def test_a_draw_costs_the_batch_not_the_dataset():
    # A 10^7-example dataset (broadcast: no memory) and a 256-example
    # batch. Drawing n uniforms would allocate 80 MB per step; the O(B)
    # draw allocates a few KB.
    import tracemalloc

    n = 10**7
    x = np.broadcast_to(np.zeros((1, 2), "float32"), (n, 2))
    y = np.broadcast_to(np.zeros((1, 1), "float32"), (n, 1))
    sampler = data_lib.PoissonSampler(x, y, batch_size=256, seed=0)
    sampler.sample_indices(0)
    tracemalloc.start()
    try:
        sizes = [len(sampler.sample_indices(update)) for update in range(1, 20)]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, peak
    # Binomial(10^7, 2.56e-5): mean 256, sd 16.
    assert 256 - 5 * 16 < np.mean(sizes) < 256 + 5 * 16


class ListSource:
    """An example source over arrays that counts its reads."""

    def __init__(self, x, y, weights=None):
        self.x, self.y, self.weights = x, y, weights
        self.reads = []

    def __len__(self):
        return len(self.x)

    def __getitem__(self, index):
        self.reads.append(index)
        if self.weights is None:
            return self.x[index], self.y[index]
        return self.x[index], self.y[index], self.weights[index]


def test_source_sampler_gives_the_batches_of_the_array_sampler():
    x, y = make_arrays(300)
    weights = np.random.default_rng(0).random(300).astype("float32")
    source = ListSource(x, y, weights)
    from_source = data_lib.PoissonSampler(
        source=source, batch_size=30, seed=4, accumulation_steps=2
    )
    from_arrays = data_lib.PoissonSampler(
        x, y, weights, batch_size=30, seed=4, accumulation_steps=2
    )
    assert from_source.n == 300
    assert from_source.sample_rate == from_arrays.sample_rate
    source.reads.clear()
    for _ in range(2):
        for index in range(len(from_arrays)):
            for a, b in zip(from_source[index], from_arrays[index]):
                np.testing.assert_array_equal(a, b)
            # Only the sampled examples are read.
            real = int(np.count_nonzero(from_arrays[index][2]))
            assert len(source.reads) == real
            source.reads.clear()
        from_source.on_epoch_end()
        from_arrays.on_epoch_end()


def test_source_and_memmap_samplers_train_like_arrays(tmp_path):
    x, y = make_regression(200)
    path = str(tmp_path / "x.npy")
    np.save(path, x)
    memmap = np.load(path, mmap_mode="r")
    trained = []
    for data in (
        dict(x=x, y=y),
        dict(x=memmap, y=y),
        dict(source=ListSource(x, y)),
    ):
        model = private_model()
        sampler = data_lib.PoissonSampler(**data, batch_size=20, seed=3)
        model.fit(sampler, epochs=2, verbose=0)
        trained.append(model)
        (entry,) = model.optimizer.privacy_ledger.entries
        assert entry["poisson"] is True and entry["n"] == 200
        assert entry["sample_rate"] == pytest.approx(0.1)
    assert_weights_close(trained[0], trained[1])
    assert_weights_close(trained[0], trained[2])


def test_secure_source_sampler_with_threads_keeps_parts_of_one_draw():
    x, y = make_arrays(400)
    sampler = data_lib.PoissonSampler(
        source=ListSource(x, y),
        batch_size=20,
        accumulation_steps=2,
        secure_mode=True,
        workers=4,
    )
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        for update in range(10):
            parts = list(pool.map(sampler.__getitem__, [2 * update, 2 * update + 1]))
            ids = [p[0][: int(np.count_nonzero(p[2])), 0].astype(int) for p in parts]
            union = np.concatenate(ids)
            assert len(set(union.tolist())) == len(union)
            assert sorted(union.tolist()) == sorted(sampler._secure_batch[1].tolist())


def test_source_errors_say_what_to_do():
    x, y = make_arrays(50)
    with pytest.raises(ValueError, match="either arrays .* or an example `source`"):
        data_lib.PoissonSampler(x, source=ListSource(x, y), batch_size=10)
    with pytest.raises(TypeError, match=r"len\(source\)"):
        data_lib.PoissonSampler(source=object(), batch_size=10)
    with pytest.raises(ValueError, match="len\\(source\\) is 0"):
        data_lib.PoissonSampler(source=[], batch_size=10)
    with pytest.raises(ValueError, match=r"tuple `\(x, y\)`"):
        data_lib.PoissonSampler(source=[x[0]] * 50, batch_size=10)
    ragged = [(np.zeros(3 + (i == 7)), 0.0) for i in range(50)]
    sampler = data_lib.PoissonSampler(source=ragged, batch_size=49, seed=0)
    with pytest.raises(ValueError, match="same shapes.*source\\[7\\]"):
        for index in range(len(sampler)):
            sampler[index]
    with pytest.raises(ValueError, match="finite number >= 0"):
        data_lib.PoissonSampler(source=[(x[0], y[0], -1.0)] * 50, batch_size=10)
    with pytest.raises(ValueError, match="worker processes cannot share"):
        data_lib.PoissonSampler(
            x, y, batch_size=10, secure_mode=True, use_multiprocessing=True
        )


def test_tf_data_pipeline_on_a_sampler_trains_as_the_sampler():
    pytest.importorskip("tensorflow")
    import tensorflow as tf

    x, y = make_regression(200)
    # Text in, features out: the pipeline's map turns each row's string
    # back into its numbers (what a tokenizer or preprocessor would do).
    texts = np.array([" ".join(f"{v:.9g}" for v in row) for row in x], dtype=object)

    def parse(text, target, weight):
        # Padding rows are empty strings: parsed as zeros, weight 0.
        parts = tf.strings.split(text).to_tensor("0", shape=(None, FEATURES))
        numbers = tf.strings.to_number(parts, tf.float32)
        return numbers, target, weight

    numbers = data_lib.PoissonSampler(x, y, batch_size=20, seed=5)
    # The dataset's batches are the sampler's items, a fresh draw each pass.
    passes = [list(numbers.as_tf_dataset().as_numpy_iterator()) for _ in range(2)]
    for epoch, batches in enumerate(passes):
        numbers.epoch = epoch
        assert len(batches) == len(numbers)
        for index, batch in enumerate(batches):
            for a, b in zip(batch, numbers[index]):
                np.testing.assert_array_equal(a, b)
    assert not np.array_equal(passes[0][0][0], passes[1][0][0])
    direct = private_model()
    direct.fit(
        data_lib.PoissonSampler(x, y, batch_size=20, seed=5).as_tf_dataset(),
        epochs=2,
        verbose=0,
    )
    piped = private_model()
    sampler = data_lib.PoissonSampler(texts, y, batch_size=20, seed=5)
    batches = sampler.as_tf_dataset().map(parse, num_parallel_calls=2).prefetch(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        piped.fit(batches, epochs=2, verbose=0)
    (entry,) = piped.optimizer.privacy_ledger.entries
    assert entry["poisson"] is True and entry["n"] == 200
    assert entry["sample_rate"] == pytest.approx(0.1)
    assert steps_taken(piped) == steps_taken(direct) == 2 * 10
    assert_weights_close(direct, piped, rtol=1e-4, atol=1e-5)
    # Padding rows of text are empty strings.
    _, _, weights = sampler[0]
    assert (sampler[0][0][weights == 0] == "").all()


@pytest.mark.parametrize(
    "step", ["filter", "shuffle", "unbatch", "cache", "deterministic"]
)
def test_tf_data_steps_that_change_batches_are_refused(step):
    pytest.importorskip("tensorflow")
    import tensorflow as tf

    x, y = make_regression(100)
    dataset = data_lib.PoissonSampler(x, y, batch_size=10, seed=0).as_tf_dataset()
    if step == "deterministic":
        dataset = dataset.map(
            tf.autograph.experimental.do_not_convert(lambda *batch: batch),
            num_parallel_calls=2,
            deterministic=False,
        )
        model = private_model()
        with pytest.raises(ValueError, match="may reorder the batches"):
            model.fit(dataset, epochs=1, verbose=0)
        assert steps_taken(model) == 0
        return
    if step == "filter":
        dataset = dataset.filter(lambda *batch: True)
    elif step == "shuffle":
        dataset = dataset.shuffle(4)
    elif step == "unbatch":
        dataset = dataset.unbatch().batch(10)
    else:
        dataset = dataset.cache()
    model = private_model()
    with pytest.raises(ValueError, match=f"(?i){step}.*only map, prefetch"):
        model.fit(dataset.prefetch(1), epochs=1, verbose=0)
    assert steps_taken(model) == 0


def test_invalid_sampler_arguments():
    x, y = make_arrays(50)
    with pytest.raises(ValueError, match="sample rate"):
        data_lib.PoissonSampler(x, y, batch_size=51)
    with pytest.raises(ValueError, match="sample rate"):
        data_lib.PoissonSampler(x, y, batch_size=30, accumulation_steps=2)
    with pytest.raises(ValueError, match="targets"):
        data_lib.PoissonSampler(x, None, batch_size=10)
    with pytest.raises(ValueError, match="batch_size"):
        data_lib.PoissonSampler(x, y, batch_size=0)


def test_arrays_with_different_row_counts_are_refused():
    x, y = make_arrays(50)
    with pytest.raises(ValueError, match=r"rows differ \(x: 50, y: 40"):
        data_lib.PoissonSampler(x, y[:40], batch_size=10)
    with pytest.raises(ValueError, match=r"x\[1\]: 49"):
        data_lib.PoissonSampler([x, x[:49]], y, batch_size=10)
    with pytest.raises(ValueError, match=r"UserSampler needs one row per example"):
        keras_dp.data.UserSampler(
            x,
            y[:40],
            user_ids=np.arange(50) // 2,
            users_per_batch=5,
            max_examples_per_user=2,
        )
    # Through fit on a private model, before any step (Keras's own
    # cardinality check is not on this path).
    model = private_model()
    xr, yr = make_regression(40)
    with pytest.raises(ValueError, match="rows differ"):
        model.fit(xr, yr[:30], batch_size=10, epochs=1, verbose=0)
    assert steps_taken(model) == 0


def test_fit_with_batch_larger_than_dataset_raises():
    x, y = make_regression(10)
    model = private_model()
    with pytest.raises(ValueError, match="sample rate"):
        model.fit(x, y, batch_size=20, epochs=1, verbose=0)
    assert steps_taken(model) == 0


# ---------------------------------------------------------------------------
# Padding rows contribute nothing to the update.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["plain", "activity", "dropout"])
def test_padding_rows_change_nothing(kind):
    x, y = make_regression(200)
    batch_size = 20
    sampler = data_lib.PoissonSampler(x, y, batch_size=batch_size, seed=1)
    px, py, pw = sampler[0]
    real = pw != 0
    count = int(real.sum())
    assert 0 < count < len(pw)  # the batch really has padding rows
    # Real rows come first (what makes per-example dropout seeds line up).
    assert np.all(real[:count])

    padded = private_model(kind)
    padded._keras_dp.expected_batch_size = batch_size
    unpadded = private_model(kind)
    unpadded._keras_dp.expected_batch_size = batch_size
    before = weights_of(padded)
    assert_weights_close(padded, unpadded, rtol=0, atol=0)

    padded.train_on_batch(px, py, sample_weight=pw)
    unpadded.train_on_batch(px[:count], py[:count], sample_weight=pw[:count])

    changed = [not np.allclose(a, b) for a, b in zip(before, weights_of(padded))]
    assert all(changed)
    assert_weights_close(padded, unpadded)


def test_padding_rows_change_nothing_through_fit_on_a_sampler():
    x, y = make_regression(200)
    batch_size = 20
    served = []

    class Recording(data_lib.PoissonSampler):
        def __getitem__(self, index):
            batch = super().__getitem__(index)
            served.append(batch)
            return batch

        def pad_for_step(self, compiled_per_shape):
            # Padded on every backend, so that the step has padding rows.
            super().pad_for_step(compiled_per_shape=True)

    sampler = Recording(x, y, batch_size=batch_size, steps_per_epoch=1, seed=2)
    fitted = private_model()
    fitted.fit(sampler, epochs=1, verbose=0)
    assert steps_taken(fitted) == 1
    # Keras may read a batch ahead of training to learn the input signature;
    # the batch trained on is the last one served.
    px, py, pw = served[-1]
    count = int(np.count_nonzero(pw))
    assert 0 < count < len(pw)
    # The step was traced with B = q * n as its divisor.
    assert fitted._keras_dp.traced_with[0] == batch_size

    reference = private_model()
    reference._keras_dp.expected_batch_size = batch_size
    reference.train_on_batch(px[:count], py[:count])
    assert_weights_close(fitted, reference)

    # Dividing by the row count instead (no expected batch size) would
    # differ: this is what makes the comparison above meaningful.
    by_rows = private_model()
    by_rows.train_on_batch(px[:count], py[:count])
    assert not all(
        np.allclose(a, b) for a, b in zip(weights_of(by_rows), weights_of(fitted))
    )


# ---------------------------------------------------------------------------
# fit on a private model.
# ---------------------------------------------------------------------------


def test_fit_on_arrays_uses_poisson_sampling():
    x, y = make_regression(200)
    batch_size = 30
    model = private_model(
        optimizer=keras_dp.DPSGD(learning_rate=0.1, noise_multiplier=1.0)
    )
    model.fit(x, y, batch_size=batch_size, epochs=2, verbose=0)
    (entry,) = model.optimizer.privacy_ledger.entries
    assert entry["poisson"] is True
    assert entry["sample_rate"] == pytest.approx(batch_size / 200)
    assert entry["n"] == 200
    assert entry["start_step"] == 0
    assert entry["noise_multiplier"] == 1.0
    assert steps_taken(model) == 2 * math.ceil(200 / batch_size)
    # The step was traced with B = q * n as its divisor.
    assert model._keras_dp.traced_with[0] == batch_size


def test_fit_runs_ceil_n_over_b_batches_per_epoch():
    x, y = make_regression(200)
    seen = []

    class Count(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(batch)

    model = private_model()
    model._keras_dp.sampling_seed = 0
    model.fit(x, y, batch_size=30, epochs=1, verbose=0, callbacks=[Count()])
    assert len(seen) == math.ceil(200 / 30)


def test_validation_split_with_poisson_sampling():
    x, y = make_regression(200)
    batch_size = 20
    model = private_model(
        optimizer=keras_dp.DPSGD(learning_rate=0.1, noise_multiplier=1.0)
    )
    history = model.fit(
        x, y, batch_size=batch_size, epochs=1, validation_split=0.2, verbose=0
    )
    assert "val_loss" in history.history
    (entry,) = model.optimizer.privacy_ledger.entries
    assert entry["poisson"] is True
    assert entry["n"] == 160
    assert entry["sample_rate"] == pytest.approx(batch_size / 160)
    assert steps_taken(model) == math.ceil(160 / batch_size)
    # The validation rows are the last 20%, as in Keras: the validation loss
    # is the loss on x[160:].
    val_loss = model.evaluate(x[160:], y[160:], verbose=0)
    assert history.history["val_loss"][0] == pytest.approx(val_loss, rel=1e-5)


def test_class_weight_equals_explicit_sample_weight():
    x, y = make_binary(200)
    assert 0.1 < y.mean() < 0.5
    class_weight = {0: 0.5, 1: 3.0}

    def fitted(**kwargs):
        model = private_model(activation="sigmoid", loss="binary_crossentropy")
        model._keras_dp.sampling_seed = 0
        # Keras shuffles the order of the sampler's batches with Python's
        # `random`: reseed so both fits see the same order.
        keras.utils.set_random_seed(0)
        model.fit(x, y, batch_size=20, epochs=1, verbose=0, **kwargs)
        return model

    with_class_weight = fitted(class_weight=class_weight)
    sample_weight = np.where(y[:, 0] == 1, 3.0, 0.5).astype("float32")
    with_sample_weight = fitted(sample_weight=sample_weight)
    unweighted = fitted()
    assert_weights_close(with_class_weight, with_sample_weight)
    assert not all(
        np.allclose(a, b)
        for a, b in zip(weights_of(with_class_weight), weights_of(unweighted))
    )


# ---------------------------------------------------------------------------
# Already-batched data.
# ---------------------------------------------------------------------------


class FixedBatches(keras.utils.PyDataset):
    def __init__(self, x, y, batch_size):
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size

    def __len__(self):
        return math.ceil(len(self.x) / self.batch_size)

    def __getitem__(self, index):
        rows = slice(index * self.batch_size, (index + 1) * self.batch_size)
        return self.x[rows], self.y[rows]


def _tf_dataset(x, y, batch_size):
    tf = pytest.importorskip("tensorflow")
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)


def _poisson_warnings(record):
    return [
        w
        for w in record
        if issubclass(w.category, UserWarning) and "Poisson" in str(w.message)
    ]


@pytest.mark.parametrize("source", ["tf.data", "PyDataset"])
def test_already_batched_data_warns_once_and_is_marked(source):
    x, y = make_regression(200)
    batch_size = 20
    batches = math.ceil(200 / batch_size)
    if source == "tf.data":
        dataset = _tf_dataset(x, y, batch_size)
    else:
        dataset = FixedBatches(x, y, batch_size)
    model = private_model(
        optimizer=keras_dp.DPSGD(learning_rate=0.1, noise_multiplier=1.0)
    )
    logger = keras_dp.EpsilonLogger(delta=1e-5)
    with pytest.warns(UserWarning, match="Poisson"):
        history = model.fit(dataset, epochs=1, verbose=0, callbacks=[logger])
    assert steps_taken(model) == batches
    (entry,) = model.optimizer.privacy_ledger.entries
    assert entry["poisson"] is False
    # One update per batch: each example is in 1 of `batches` updates.
    assert entry["sample_rate"] == pytest.approx(1 / batches)
    assert history.history["epsilon_assumes_poisson"] == [1.0]
    assert history.history["epsilon"][0] == pytest.approx(
        keras_dp.compute_epsilon(1.0, 1 / batches, batches, 1e-5), rel=1e-9
    )
    # The warning comes once per model, not once per fit.
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model.fit(dataset, epochs=1, verbose=0, callbacks=[logger])
    assert _poisson_warnings(record) == []
    assert steps_taken(model) == 2 * batches


def test_poisson_fit_does_not_warn_or_mark():
    x, y = make_regression(200)
    model = private_model(
        optimizer=keras_dp.DPSGD(learning_rate=0.1, noise_multiplier=1.0)
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        history = model.fit(
            x,
            y,
            batch_size=20,
            epochs=1,
            verbose=0,
            callbacks=[keras_dp.EpsilonLogger(delta=1e-5)],
        )
    assert _poisson_warnings(record) == []
    assert "epsilon_assumes_poisson" not in history.history


def test_poisson_sampling_false_uses_fixed_batches_and_warns():
    x, y = make_regression(200)
    model = private_model(
        optimizer=keras_dp.DPSGD(learning_rate=0.1, noise_multiplier=1.0),
        poisson_sampling=False,
    )
    with pytest.warns(UserWarning, match="Poisson"):
        model.fit(x, y, batch_size=25, epochs=1, verbose=0)
    (entry,) = model.optimizer.privacy_ledger.entries
    assert entry["poisson"] is False
    assert entry["sample_rate"] == pytest.approx(25 / 200)
    assert entry["n"] == 200
    assert steps_taken(model) == 200 // 25


def _generator(x, y, batch_size):
    while True:
        for start in range(0, len(x), batch_size):
            yield x[start : start + batch_size], y[start : start + batch_size]


def test_generator_without_sample_rate_raises():
    x, y = make_regression(200)
    model = private_model()
    with pytest.raises(ValueError, match="sample_rate"):
        model.fit(_generator(x, y, 20), steps_per_epoch=5, epochs=1, verbose=0)
    assert steps_taken(model) == 0


def test_generator_with_sample_rate_trains_and_records_it():
    x, y = make_regression(200)
    model = private_model(
        optimizer=keras_dp.DPSGD(learning_rate=0.1, noise_multiplier=1.0),
        sample_rate=0.1,
    )
    with pytest.warns(UserWarning, match="Poisson"):
        model.fit(_generator(x, y, 20), steps_per_epoch=5, epochs=1, verbose=0)
    assert steps_taken(model) == 5
    (entry,) = model.optimizer.privacy_ledger.entries
    assert entry["sample_rate"] == pytest.approx(0.1)
    assert entry["poisson"] is False


@pytest.mark.parametrize("with_positions", [False, True])
def test_take_padded_matches_a_zero_filled_batch(tmp_path, with_positions):
    """The sampler's gather (one gather, padding rows blanked after) gives
    what copying the rows into a batch of padding gives, for numbers,
    integers, text, objects and memmaps, and for empty draws."""
    from keras_dp.poisson_batches import padding
    from keras_dp.poisson_batches import take_padded

    rng = np.random.default_rng(0)
    memmap = np.lib.format.open_memmap(
        tmp_path / "x.npy", mode="w+", dtype="float32", shape=(50, 3, 2)
    )
    memmap[:] = rng.normal(size=(50, 3, 2))
    arrays = {
        "floats": rng.normal(size=(50, 4)).astype("float32") + 1.0,
        "ints": np.arange(1, 51, dtype="int64"),
        "text": np.array([f"t{i}" for i in range(50)]),
        "objects": np.array([f"o{i}" for i in range(50)], dtype=object),
        "memmap": memmap,
    }
    for count, rows in ((7, 16), (0, 8), (12, 12), (5, None)):
        indices = rng.choice(50, size=count, replace=False)
        total = count if rows is None else rows
        positions = (
            np.sort(rng.choice(total, size=count, replace=False))
            if with_positions
            else None
        )
        got = take_padded(arrays, indices, rows, positions)
        for key, array in arrays.items():
            want = padding((total,) + array.shape[1:], array.dtype)
            want[slice(0, count) if positions is None else positions] = array[indices]
            assert type(got[key]) is np.ndarray and got[key].dtype == want.dtype
            np.testing.assert_array_equal(got[key], want)


def test_take_padded_indexes_as_numpy_does():
    """Indices beyond an array raise IndexError (an array with fewer rows
    than the others is never read out of bounds), and negative ones count
    from its end, with and without positions."""
    from keras_dp.poisson_batches import take_padded

    long, short = np.arange(10.0), np.arange(5.0)
    for positions in (None, np.array([0, 2])):
        with pytest.raises(IndexError):
            take_padded({"long": long, "short": short}, [1, 7], 4, positions)
        got = take_padded(short, [-1, 2], 4, positions)
        want = np.zeros(4)
        want[slice(0, 2) if positions is None else positions] = [4.0, 2.0]
        np.testing.assert_array_equal(got, want)


def test_accumulation_parts_split_as_array_split():
    """A logical batch's accumulation parts (and their sizes, which every
    process computes for every process) are `np.array_split`'s."""
    from keras_dp.poisson_batches import accumulation_part
    from keras_dp.poisson_batches import accumulation_part_size

    units = np.arange(100, 123)
    for count in range(0, 24):
        for parts in range(1, 6):
            want = np.array_split(units[:count], parts)
            for part in range(parts):
                got = accumulation_part(units[:count], parts, part)
                np.testing.assert_array_equal(got, want[part])
                assert accumulation_part_size(count, parts, part) == len(want[part])
