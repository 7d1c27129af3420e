"""User-level DP (`keras_dp.data.UserSampler`) against brute force.

The reference (`tests/reference.py`, no keras_dp) takes the per-example
gradients of the batch the sampler hands to `fit`, one row at a time;
each user's gradient is the mean over that user's real rows (non-zero
sample weight); the users' gradients are clipped and summed, and the sum
is divided by the expected number of users. With `DPSGD(learning_rate=1,
noise_multiplier=0)` one update changes the weights by exactly
`-(1/U) sum_u c_u g_u`. The sampler's statistics are checked against the
Binomial laws of Poisson sampling, and the epsilon against dp-accounting.
"""

import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_dp
import reference as ref
from accounting_fixtures import rdp_reference
from keras_dp.data import UserSampler
from reference import assert_updates_close

M = 3  # max_examples_per_user
U = 4  # users_per_batch
NUM_CLASSES = 3
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
JIT = keras.backend.backend() == "jax"
BACKEND = keras.backend.backend()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# GroupNormalization's float32 rounding differs between the compiled step
# and the eager reference by about 1e-5 of the update's scale; a row left
# out or a user counted twice changes the update by far more.
RTOL = 5e-5


def loss_fn(y, y_pred, sample_weight):
    return LOSS(y, y_pred, sample_weight=sample_weight)


def _mlp():
    return keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(6),
            # Gets keras_dp's generic rule (a per-example VJP).
            keras.layers.PReLU(alpha_initializer=keras.initializers.Constant(0.2)),
            keras.layers.Dense(NUM_CLASSES),
        ]
    )


def _conv():
    inputs = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(4, 3, padding="same", use_bias=False)(inputs)
    h = keras.layers.GroupNormalization(groups=2)(h)
    h = keras.layers.Activation("tanh")(h)
    h = keras.layers.Flatten()(h)
    return keras.Model(inputs, keras.layers.Dense(NUM_CLASSES)(h))


MODELS = {"mlp": (_mlp, (5,)), "conv": (_conv, (6, 6, 2))}


def user_data(name="mlp", num_users=10, seed=0, weights=True):
    """Examples of `num_users` users with uneven counts (1 to 7: some
    below M, some above), string user ids in shuffled order."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 8, size=num_users)
    counts[:2] = (1, 7)
    ids = np.repeat([f"user{u}" for u in range(num_users)], counts)
    rng.shuffle(ids)
    n = len(ids)
    shape = MODELS[name][1]
    scale = 0.3 + 2.0 * rng.random((n,) + (1,) * len(shape))
    x = (scale * rng.normal(size=(n,) + shape)).astype("float32")
    y = rng.integers(0, NUM_CLASSES, size=(n,))
    w = rng.uniform(0.5, 2.0, size=n).astype("float32") if weights else None
    return x, y, ids, w


def build(name="mlp", seed=1, **private_kwargs):
    keras.utils.set_random_seed(seed)
    return keras_dp.make_private(MODELS[name][0](), **private_kwargs)


def compile_dp(model, **dp_kwargs):
    dp_kwargs.setdefault("noise_multiplier", 0.0)
    dp_kwargs.setdefault("learning_rate", 1.0)
    model.compile(optimizer=keras_dp.DPSGD(**dp_kwargs), loss=LOSS, jit_compile=JIT)
    return model


class OneBatch(UserSampler):
    """A sampler whose batch 0 is the same whenever it is read: Keras may
    read a batch of a `PyDataset` before the first epoch to see its
    shapes, and calls `on_epoch_end` in between."""

    def on_epoch_end(self):
        pass


def one_step_sampler(x, y, ids, w, seed=0):
    return OneBatch(
        x,
        y,
        ids,
        users_per_batch=U,
        max_examples_per_user=M,
        sample_weight=w,
        steps_per_epoch=1,
        seed=seed,
    )


def fit_update(model, sampler):
    """The weight change of a one-update `fit` on `sampler`."""
    before = [np.array(v.numpy(), dtype="float64") for v in model.trainable_variables]
    model.fit(sampler, epochs=1, verbose=0)
    return [
        np.array(v.numpy(), dtype="float64") - b
        for v, b in zip(model.trainable_variables, before)
    ]


def user_gradients(model, batch):
    """Each user's gradient in `batch`: the mean of the per-example
    gradients of their real rows (0 for padding users)."""
    bx, by, bw = batch
    rows = ref.per_example_gradients(model, bx, by, loss_fn, bw)
    users = []
    for j in range(len(bw) // M):
        real = [r for r in range(j * M, (j + 1) * M) if bw[r] != 0]
        shapes = [g.shape for g in rows[0]]
        if not real:
            users.append([np.zeros(s) for s in shapes])
            continue
        users.append(
            [sum(rows[r][k] for r in real) / len(real) for k in range(len(shapes))]
        )
    return users


def real_users(batch):
    return int(np.sum(batch[2].reshape(-1, M).any(axis=1)))


def flat_update(per_user, clipping, C):
    factors = ref.clip_factors(ref.norms_of(per_user), clipping, C)
    return [
        -sum(c * g[k] for c, g in zip(factors, per_user)) / U
        for k in range(len(per_user[0]))
    ]


def per_layer_update(model, per_user, C):
    """Each layer's variables clipped to `C / sqrt(layers)`."""
    layers = [layer for layer in model.layers if layer.trainable_variables]
    threshold = C / np.sqrt(len(layers))
    expected, k = [], 0
    for layer in layers:
        count = len(layer.trainable_variables)
        norms = np.sqrt(
            [sum(np.sum(g[j] ** 2) for j in range(k, k + count)) for g in per_user]
        )
        factors = ref.flat_factors(norms, threshold)
        for j in range(k, k + count):
            expected.append(-sum(c * g[j] for c, g in zip(factors, per_user)) / U)
        k += count
    return expected


# ------------------------------------------------------- clipped user sums


@pytest.mark.parametrize("path", ["auto", "vmap"])
@pytest.mark.parametrize(
    "name, clipping",
    [("mlp", "flat"), ("mlp", "auto"), ("mlp", "per_layer"), ("conv", "flat")],
)
def test_user_clipped_sum_matches_brute_force(name, clipping, path):
    x, y, ids, w = user_data(name)
    sampler = one_step_sampler(x, y, ids, w)
    batch = sampler[0]
    assert real_users(batch) >= 2
    # Sampled users with 1, 2 and M real rows.
    assert set(np.sum(batch[2].reshape(-1, M) != 0, axis=1)) >= {1, 2, M}
    settings = {"l2_norm_clip": 0.05}
    if clipping == "per_layer":
        settings["clip_groups"] = "per_layer"
    else:
        settings["clipping"] = clipping
    model = compile_dp(build(name, per_example=path), **settings)
    per_user = user_gradients(model, batch)
    if clipping == "per_layer":
        expected = per_layer_update(model, per_user, 0.05)
    else:
        expected = flat_update(per_user, clipping, 0.05)
    assert_updates_close(fit_update(model, sampler), expected, rtol=RTOL)
    assert model._keras_dp.per_example_path[0] == ("vmap" if path == "vmap" else "fast")
    # After fit, the model's rows are examples again.
    assert model._keras_dp.rows_per_user is None


def test_microbatches_keep_each_user_s_rows_together():
    x, y, ids, w = user_data()
    sampler = one_step_sampler(x, y, ids, w)
    model = compile_dp(build(microbatch_size=3), l2_norm_clip=0.05)
    expected = flat_update(user_gradients(model, sampler[0]), "flat", 0.05)
    assert_updates_close(fit_update(model, sampler), expected, rtol=RTOL)


def test_a_tf_data_pipeline_on_the_sampler_is_user_level_too():
    pytest.importorskip("tensorflow")
    x, y, ids, w = user_data()
    sampler = one_step_sampler(x, y, ids, w)
    model = compile_dp(build(), l2_norm_clip=0.05)
    expected = flat_update(user_gradients(model, sampler[0]), "flat", 0.05)
    batches = sampler.as_tf_dataset().map(lambda bx, by, bw: (bx * 1.0, by, bw))
    before = [np.array(v.numpy(), dtype="float64") for v in model.trainable_variables]
    model.fit(batches, epochs=1, verbose=0)
    actual = [
        np.array(v.numpy(), dtype="float64") - b
        for v, b in zip(model.trainable_variables, before)
    ]
    assert_updates_close(actual, expected, rtol=RTOL)
    assert model.optimizer.privacy_ledger.entries[0]["unit"] == "user"


@pytest.mark.parametrize("path", ["auto", "vmap"])
def test_a_user_with_a_non_finite_example_is_left_out_whole(path):
    x, y, ids, w = user_data()
    batch = one_step_sampler(x, y, ids, w)[0]
    # A sampled user of two or more real rows (rows of index >= 8: the
    # checks before training read the first examples).
    rows = batch[2].reshape(-1, M) != 0
    j = next(j for j in range(len(rows)) if rows[j].sum() >= 2)
    example = next(
        int(np.flatnonzero(np.all(x == row, axis=1))[0])
        for row in batch[0][j * M : j * M + M]
        if np.flatnonzero(np.all(x == row, axis=1))[0] >= 8
    )
    x = x.copy()
    x[example] = np.inf
    sampler = one_step_sampler(x, y, ids, w)
    batch = sampler[0]
    model = compile_dp(build(per_example=path), l2_norm_clip=0.05)
    per_user = user_gradients(model, batch)
    for k in range(len(per_user[j])):
        per_user[j][k] = np.zeros_like(per_user[j][k])
    expected = flat_update(per_user, "flat", 0.05)
    before = [np.array(v.numpy(), dtype="float64") for v in model.trainable_variables]
    history = model.fit(sampler, epochs=1, verbose=0)
    actual = [
        np.array(v.numpy(), dtype="float64") - b
        for v, b in zip(model.trainable_variables, before)
    ]
    assert_updates_close(actual, expected, rtol=RTOL)
    # One user left out, counted once (not once per row).
    assert history.history["nonfinite_examples"] == [1.0]


@pytest.mark.parametrize("path", ["auto", "vmap"])
def test_adaptive_clipping_counts_users(path):
    """One update with sigma = 0 and count noise 0: the threshold moves by
    the fraction of real *users* whose clipped gradient is below it."""
    x, y, ids, w = user_data()
    sampler = one_step_sampler(x, y, ids, w)
    batch = sampler[0]
    C, eta, quantile = 0.3, 0.2, 0.5
    model = compile_dp(
        build(per_example=path),
        learning_rate=0.0,
        l2_norm_clip=C,
        adaptive_clipping=keras_dp.AdaptiveClipping(
            target_quantile=quantile, learning_rate=eta, count_stddev=0.0
        ),
    )
    per_user = user_gradients(model, batch)
    norms = ref.norms_of(per_user)[: len(batch[2]) // M]
    real = batch[2].reshape(-1, M).any(axis=1)
    counts = np.sum((norms[real] <= C) - 0.5)
    # Counting rows instead would give another value: the batch has users
    # of more than one real row.
    assert np.sum(batch[2] != 0) > real.sum()
    expected = C * np.exp(-eta * (counts / U + 0.5 - quantile))
    model.fit(sampler, epochs=1, verbose=0)
    (threshold,) = model.optimizer.group_thresholds.values()
    assert threshold == pytest.approx(expected, rel=1e-5)
    assert threshold != pytest.approx(C, rel=1e-3)


# --------------------------------------------------------------- sampler


def test_users_are_sampled_at_rate_q():
    x, y, ids, _ = user_data(num_users=40, seed=1)
    sampler = UserSampler(x, y, ids, users_per_batch=8, max_examples_per_user=M, seed=5)
    assert sampler.num_users == 40 and sampler.sample_rate == pytest.approx(0.2)
    draws = 3000
    hits = np.zeros(40)
    sizes = []
    for update in range(draws):
        users = sampler.sample_indices(update)
        assert len(set(users.tolist())) == len(users)
        hits[users] += 1
        sizes.append(len(users))
    # Each user: Binomial(3000, 0.2), mean 600, sd 21.9; whatever their
    # number of examples (1 to 7).
    assert np.all(np.abs(hits - 600) < 5 * 21.9), hits
    assert abs(np.mean(sizes) - 8) < 5 * np.sqrt(40 * 0.2 * 0.8 / draws)


def _layout_data(num_users=12, seed=2):
    """x and y hold each example's index (+1: 0 is padding)."""
    _, _, ids, _ = user_data(num_users=num_users, seed=seed)
    n = len(ids)
    x = np.stack([np.arange(1, n + 1)] * 2, axis=1).astype("float32")
    y = np.arange(1, n + 1)
    return x, y, ids


def test_batch_layout_user_major_with_padding():
    x, y, ids = _layout_data()
    uniques, counts = np.unique(ids, return_counts=True)
    count_of = dict(zip(uniques, counts))
    sampler = UserSampler(x, y, ids, users_per_batch=5, max_examples_per_user=M, seed=7)
    assert sampler.padded_size == keras_dp.data.padded_batch_size(5, 5 / 12)
    seen_short = seen_long = False
    for index in range(40):
        bx, by, bw = sampler[index]
        padded_users = sampler.padded_units(index)
        assert padded_users in sampler.padded_sizes
        assert bx.shape == (padded_users * M, 2) and bw.shape == (len(bx),)
        users = uniques[sampler.part_units(index)]
        for j in range(padded_users):
            rows = slice(j * M, (j + 1) * M)
            real = bw[rows] != 0
            k = int(real.sum())
            # Real rows first, then padding rows: zeros with weight 0.
            assert np.all(real[:k]) and not np.any(real[k:])
            assert np.all(bx[rows][k:] == 0) and np.all(by[rows][k:] == 0)
            examples = by[rows][:k] - 1
            assert len(set(examples.tolist())) == k
            if j >= len(users):
                assert k == 0  # a padding user
                continue
            # All of the unit's rows are examples of user j of the draw.
            assert np.all(ids[examples] == users[j])
            assert np.all(bx[rows][:k, 0] == by[rows][:k])
            assert k == min(M, count_of[users[j]])
            seen_short |= count_of[users[j]] < M
            seen_long |= count_of[users[j]] > M
    assert seen_short and seen_long


def test_examples_of_a_user_are_drawn_at_random_each_time():
    """q = 1: the user of 10 examples is in every batch; each of their
    examples is taken with probability 3/10, and the subsets vary."""
    ids = np.array(["a"] * 10 + ["b"] * 2 + ["c"] * 4)
    x = np.arange(1, 17, dtype="float32")[:, None]
    y = np.arange(1, 17)
    sampler = UserSampler(
        x,
        y,
        ids,
        users_per_batch=3,
        max_examples_per_user=M,
        seed=0,
        steps_per_epoch=600,
    )
    taken = np.zeros(10)
    subsets = set()
    for index in range(600):
        _, by, bw = sampler[index]
        examples = by[bw != 0] - 1
        own = sorted(e for e in examples.tolist() if e < 10)
        assert len(own) == M
        taken[own] += 1
        subsets.add(tuple(own))
    # Binomial(600, 0.3): mean 180, sd 11.2.
    assert np.all(np.abs(taken - 180) < 5 * 11.2), taken
    assert len(subsets) > 100  # of the 120 possible
    # A new epoch draws other subsets for the same update.
    before = sampler[0]
    sampler.on_epoch_end()
    assert not np.array_equal(before[1], sampler[0][1])


def test_a_large_draw_is_padded_further_never_cut():
    x, y, ids = _layout_data(num_users=40, seed=3)

    class Everyone(UserSampler):
        def sample_indices(self, update):
            return np.arange(self.num_users)

    sampler = Everyone(x, y, ids, users_per_batch=2, max_examples_per_user=M, seed=0)
    assert sampler.padded_size < 40
    bx, by, bw = sampler[0]
    assert len(bx) == 40 * M
    assert real_users((bx, by, bw)) == 40


def test_accumulation_parts_split_one_draw_of_users():
    x, y, ids = _layout_data(num_users=30, seed=4)
    uniques = np.unique(ids)
    sampler = UserSampler(
        x,
        y,
        ids,
        users_per_batch=4,
        max_examples_per_user=M,
        accumulation_steps=2,
        seed=1,
    )
    assert sampler.sample_rate == pytest.approx(8 / 30)
    assert len(sampler) == 2 * sampler.updates_per_epoch
    for update in range(5):
        users = []
        for part in range(2):
            _, by, bw = sampler[2 * update + part]
            users.append(set(ids[by[bw != 0] - 1]))
        assert not users[0] & users[1]
        assert users[0] | users[1] == set(uniques[sampler.sample_indices(update)])


def test_same_seed_same_batches_and_secure_mode_takes_no_seed():
    x, y, ids = _layout_data()
    a = UserSampler(x, y, ids, users_per_batch=4, max_examples_per_user=M, seed=9)
    b = UserSampler(x, y, ids, users_per_batch=4, max_examples_per_user=M, seed=9)
    for index in range(3):
        for p, q in zip(a[index], b[index]):
            np.testing.assert_array_equal(p, q)
    with pytest.raises(ValueError, match="takes no seed"):
        UserSampler(
            x,
            y,
            ids,
            users_per_batch=4,
            max_examples_per_user=M,
            seed=1,
            secure_mode=True,
        )
    secure = UserSampler(
        x, y, ids, users_per_batch=4, max_examples_per_user=M, secure_mode=True
    )
    assert secure[0][0].shape[0] % M == 0


# ------------------------------------------------------------ accounting


def _fit_user_level(epochs=2, callbacks=()):
    x, y, ids, w = user_data(num_users=20, seed=5)
    sampler = UserSampler(
        x,
        y,
        ids,
        users_per_batch=U,
        max_examples_per_user=M,
        sample_weight=w,
        seed=2,
    )
    model = compile_dp(build(), learning_rate=0.05, noise_multiplier=1.1)
    history = model.fit(sampler, epochs=epochs, verbose=0, callbacks=list(callbacks))
    return model, sampler, history


def test_ledger_and_epsilon_are_those_of_the_users_rate(capsys):
    logger = keras_dp.EpsilonLogger(delta=1e-4)
    model, sampler, history = _fit_user_level(callbacks=[logger])
    ledger = model.optimizer.privacy_ledger
    (entry,) = ledger.entries
    q = U / 20
    assert entry["unit"] == "user" and entry["n"] == 20
    assert entry["sample_rate"] == pytest.approx(q)
    steps = 2 * sampler.updates_per_epoch
    assert keras_dp.ledger.optimizer_steps(model) == steps
    expected = rdp_reference([(1.1, q, steps)], 1e-4)
    assert ledger.epsilon(steps, 1e-4) == pytest.approx(expected, rel=1e-9)
    assert keras_dp.accounting.compute_epsilon(
        1.1, q, steps=steps, delta=1e-4
    ) == pytest.approx(expected, rel=1e-9)
    # The logger: the same epsilon, marked and announced as user-level.
    assert history.history["epsilon"][-1] == pytest.approx(expected, rel=1e-9)
    assert history.history["epsilon_user_level"] == [1.0, 1.0]
    assert logger.privacy_unit == "user"
    assert "epsilon is user-level" in capsys.readouterr().out
    summary = keras_dp.privacy_summary(model, delta=1e-4)
    assert "privacy unit: user" in summary
    assert re.search(r"epsilon \(user-level\): \d", summary), summary


def test_the_unit_is_saved_and_old_ledgers_read_as_examples():
    model, _, _ = _fit_user_level(epochs=1)
    config = model.optimizer.get_config()
    restored = keras_dp.DPSGD.from_config(config)
    assert restored.privacy_ledger.entries[0]["unit"] == "user"
    old = keras_dp.ledger.PrivacyLedger(
        {
            "entries": [
                {
                    "start_step": 0,
                    "noise_multiplier": 1.0,
                    "sample_rate": 0.1,
                    "poisson": True,
                    "n": 10,
                }
            ],
            "step_offset": 0,
        }
    )
    assert old.privacy_unit(5) == "example"
    # The same setting at the user level is a new segment, and the
    # epsilon of both together covers one example only.
    old.record(5, 1.0, 0.1, True, 10, unit="user")
    assert len(old.entries) == 2
    assert old.privacy_unit(5) == "example" and old.privacy_unit(6) == "mixed"
    with pytest.raises(ValueError, match="privacy unit"):
        old.record(7, 1.0, 0.1, True, 10, unit="person")


def test_a_saved_model_keeps_its_user_level_ledger(tmp_path):
    model, _, _ = _fit_user_level(epochs=1)
    entries = model.optimizer.privacy_ledger.entries
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.optimizer.privacy_ledger.entries == entries
    steps = keras_dp.ledger.optimizer_steps(loaded)
    assert loaded.optimizer.privacy_ledger.privacy_unit(steps) == "user"
    assert "epsilon (user-level)" in keras_dp.privacy_summary(loaded, delta=1e-4)


def test_example_level_fit_logs_no_user_level():
    x, y, _, _ = user_data()
    logger = keras_dp.EpsilonLogger(delta=1e-4)
    model = compile_dp(build(), learning_rate=0.05, noise_multiplier=1.1)
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[logger])
    assert logger.privacy_unit == "example"
    assert "epsilon_user_level" not in history.history
    assert model.optimizer.privacy_ledger.entries[0]["unit"] == "example"


# ---------------------------------------------------------------- errors


def test_bad_arguments_are_refused_with_what_to_do():
    x, y, ids, _ = user_data()
    num_users = len(np.unique(ids))
    with pytest.raises((ValueError, TypeError), match="users_per_batch"):
        UserSampler(x, y, ids, users_per_batch=0, max_examples_per_user=M)
    with pytest.raises(ValueError, match=r"users_per_batch \* accumulation_steps"):
        UserSampler(x, y, ids, users_per_batch=num_users + 1, max_examples_per_user=M)
    with pytest.raises(ValueError, match="one user id per example"):
        UserSampler(x, y, ids[:-1], users_per_batch=2, max_examples_per_user=M)
    with pytest.raises(ValueError, match="one user id per example"):
        UserSampler(x, y, ids[:, None], users_per_batch=2, max_examples_per_user=M)
    with pytest.raises((ValueError, TypeError), match="max_examples_per_user"):
        UserSampler(x, y, ids, users_per_batch=2, max_examples_per_user=0)
    with pytest.raises(ValueError, match="needs inputs `x` and targets `y`"):
        UserSampler(x, None, ids, users_per_batch=2, max_examples_per_user=M)
    with pytest.raises(ValueError, match="NaN id"):
        UserSampler(
            x, y, np.full(len(x), np.nan), users_per_batch=1, max_examples_per_user=M
        )


def test_secure_mode_needs_a_secure_user_sampler():
    x, y, ids, w = user_data()
    model = compile_dp(build(), noise_multiplier=1.0, secure_mode=True)
    with pytest.raises(ValueError, match="this UserSampler draws from a reproducible"):
        model.fit(one_step_sampler(x, y, ids, w), epochs=1, verbose=0)


def test_augmentation_with_a_user_sampler_is_refused():
    x, y, ids, w = user_data()
    model = compile_dp(
        build(augment=lambda x, seed: x + 1.0, augmentations=2), l2_norm_clip=1.0
    )
    with pytest.raises(ValueError, match="cannot be combined yet"):
        model.fit(one_step_sampler(x, y, ids, w), epochs=1, verbose=0)


def test_individual_privacy_refuses_user_level_training():
    x, y, ids, w = user_data()
    sampler = one_step_sampler(x, y, ids, w)
    with pytest.raises(ValueError, match="Per-user individual accounting"):
        keras_dp.IndividualPrivacy(sampler)
    callback = keras_dp.IndividualPrivacy(x, y, w, delta=1e-4)
    model = compile_dp(build(), noise_multiplier=1.0)
    with pytest.raises(ValueError, match="Per-user individual accounting"):
        model.fit(sampler, epochs=1, verbose=0, callbacks=[callback])


def test_activity_regularizers_are_refused_at_the_user_level():
    x, y, ids, w = user_data()
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(4, activity_regularizer="l2"),
            keras.layers.Dense(NUM_CLASSES),
        ]
    )
    model = compile_dp(keras_dp.make_private(model, per_example="vmap"))
    with pytest.raises(ValueError, match="does not support activity regularizers"):
        model.fit(one_step_sampler(x, y, ids, w), epochs=1, verbose=0)


# --------------------------------------------------------------- example


@pytest.mark.skipif(BACKEND != "jax", reason="one backend is enough")
def test_user_level_example_smoke():
    env = dict(os.environ, KERAS_BACKEND=BACKEND)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "user_level.py"), "--smoke"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert re.search(
        r"^reproduce: KERAS_BACKEND=jax python examples/user_level.py --smoke$",
        out,
        re.MULTILINE,
    ), out
    rows = dict(
        (level, (float(acc), float(eps)))
        for level, acc, eps in re.findall(
            r"^(example|user)-level DP: test accuracy (\d+\.\d+), epsilon "
            r"(\d+\.\d+)",
            out,
            re.MULTILINE,
        )
    )
    assert set(rows) == {"example", "user"}, out
    for accuracy, epsilon in rows.values():
        assert 0 <= accuracy <= 1 and 0 < epsilon < 1000
