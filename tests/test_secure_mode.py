"""Secure mode: the noise keyed by fresh OS entropy at every step and drawn
by `keras_dp.secure_noise`, and Poisson batches drawn from the same entropy.

The sampler's arithmetic is checked against a float64 NumPy reference on
words from a seeded generator (reproducible); the draws inside training are
not reproducible by design, so their statistical checks use bounds that a
correct sampler fails with probability below 1e-6.
"""

import math

import keras
import numpy as np
import pytest
from keras import ops
from scipy import stats

import keras_dp
from keras_dp import backend as backend_lib
from keras_dp import secure_noise
from test_native import threefry_2x32

BACKEND = keras.backend.backend()
D_IN, UNITS = 50, 100  # 5,000 noise coordinates per step


def _reference_normal(words):
    """`normal_from_words` in float64 NumPy, written out separately."""
    words = np.asarray(words, np.float64)

    def midpoint(w):
        return (w + 0.5) / 2.0**32

    total = 0.0
    for pair in range(2):
        angle, r1, r2, r3 = words[4 * pair : 4 * pair + 4]
        first = np.where(r1 != 0, r1, np.where(r2 != 0, r2, r3))
        zeros = (r1 == 0).astype(float) + ((r1 == 0) & (r2 == 0))
        x = zeros * 32 * math.log(2) - np.log(midpoint(first))
        radius = np.sqrt(2 * x)
        theta = 2 * math.pi * midpoint(angle)
        total = total + radius * (np.cos(theta) + np.sin(theta))
    return total / 2


def _words(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 2**32, (secure_noise.WORDS_PER_NUMBER, n), np.uint64)


def _numpy(x):
    return np.asarray(ops.convert_to_numpy(x), np.float64)


def test_normal_from_words_matches_the_float64_reference():
    words = _words(20_000)
    # Radius chains that reach their second and third words.
    words[1, :50] = 0
    words[1, 50:100] = 0
    words[2, 50:100] = 0
    got = _numpy(secure_noise.normal_from_words(words.astype(np.uint32)))
    want = _reference_normal(words)
    # float32 arithmetic on numbers of size up to ~10: 1e-5 relative.
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)


def test_normal_from_words_is_standard_normal():
    z = _numpy(secure_noise.normal_from_words(_words(400_000, seed=1).astype("uint32")))
    # Seeded words: the KS p-value is a fixed number; a sampler off by 1%
    # in scale would give p far below 1e-3 at this size.
    assert stats.kstest(z, "norm").pvalue > 1e-3
    # Moments: standard errors 1/sqrt(n) = 0.0016 (mean), 0.0011 (std),
    # sqrt(24/n) = 0.0077 (excess kurtosis); bounds at 5 of them.
    assert abs(z.mean()) < 0.008
    assert abs(z.std() - 1) < 0.0056
    assert abs(stats.kurtosis(z)) < 0.04
    # The tails: P(|z| > 3) = 0.0027 (binomial sd 8.2e-5 here).
    assert abs(np.mean(np.abs(z) > 3) - 0.0026998) < 5 * 8.2e-5


def test_radius_chain_extends_the_tails_and_its_bound():
    """A zero radius word hands the draw on to the next word: the
    exponential's memorylessness, exactly (`X - 32 log 2` given `X > 32 log
    2`); three zero words stop at `MAX_EXPONENTIAL`, where the output
    reaches `TAIL_BOUND` with the angle at 45 degrees."""
    w = np.array([1, 2**31, 12345], np.uint32)
    zero = np.zeros(3, np.uint32)
    one_word = _numpy(secure_noise.exponential_from_words([w, zero, zero]))
    two_words = _numpy(secure_noise.exponential_from_words([zero, w, zero]))
    three_words = _numpy(secure_noise.exponential_from_words([zero, zero, w]))
    np.testing.assert_allclose(two_words - one_word, 32 * math.log(2), rtol=1e-6)
    np.testing.assert_allclose(three_words - one_word, 64 * math.log(2), rtol=1e-6)
    top = _numpy(secure_noise.exponential_from_words([zero, zero, zero]))
    np.testing.assert_allclose(top, secure_noise.MAX_EXPONENTIAL, rtol=1e-6)
    # Beyond the ~5.4-5.8 standard deviations of float32 uniform samplers.
    assert math.sqrt(2 * one_word[0]) > 6.5
    eighth = 2**29  # theta = pi/4: cos + sin = sqrt(2)
    words = np.array([[eighth, 0, 0, 0] * 2], np.uint32).reshape(8, 1)
    z = _numpy(secure_noise.normal_from_words(words))[0]
    assert z == pytest.approx(secure_noise.TAIL_BOUND, rel=1e-5)
    assert secure_noise.TAIL_BOUND > 16
    assert secure_noise.truncation_delta(10**9, 10**6) < 1e-13


def test_os_random_bits_are_uniform_words_and_fresh_at_each_call():
    seed = keras_dp.GaussianNoise(secure_mode=True).seed_generator()
    backend = backend_lib.get_backend_module()
    with backend.os_entropy(seed):
        first = _numpy(backend.os_random_bits((4, 25_000), seed))
        second = _numpy(backend.os_random_bits((4, 25_000), seed))
    assert first.min() >= 0 and first.max() < 2**32
    # Each of the 32 bits is set with frequency 1/2: binomial sd 0.0016 at
    # 100,000 words; 6 sd bounds.
    bits = (first.astype(np.uint64)[..., None] >> np.arange(32, dtype=np.uint64)) & 1
    assert np.all(np.abs(bits.reshape(-1, 32).mean(axis=0) - 0.5) < 0.0095)
    # Two calls in one step draw independent words.
    assert np.mean(first == second) < 1e-3


def test_secure_gaussian_noise_draws_standard_normal_numbers():
    noise = keras_dp.GaussianNoise(noise_multiplier=1.0, secure_mode=True)
    seed = noise.seed_generator()
    with backend_lib.get_backend_module().os_entropy(seed):
        z = _numpy(noise.standard_normal((100_000,), seed))
    # Not reproducible: bounds a correct sampler fails with probability
    # below 1e-6 (KS; 5.5 standard errors for the moments).
    assert stats.kstest(z, "norm").pvalue > 1e-6
    assert abs(z.mean()) < 5.5 / math.sqrt(z.size)
    assert abs(z.std() - 1) < 5.5 / math.sqrt(2 * z.size)


def test_framework_ops_sampler_draws_standard_normal_numbers():
    """The sampler used where the compiled kernel cannot run (accelerators):
    `os_random_bits` words through `normal_from_words`."""
    seed = keras_dp.GaussianNoise(secure_mode=True).seed_generator()
    with backend_lib.get_backend_module().os_entropy(seed):
        z = _numpy(secure_noise.standard_normal((100_000,), seed))
    assert stats.kstest(z, "norm").pvalue > 1e-6
    assert abs(z.std() - 1) < 5.5 / math.sqrt(2 * z.size)


def _reference_kernel(key0, key1, n):
    """noise.h's secure recipe in float64: number i is half the sum of
    pairs 2i and 2i + 1, pair p from the Threefry words of counter (p, 1)
    (no radius word of these keys is zero: the chain is not reached)."""
    pairs = np.arange(2 * n, dtype=np.uint32)
    wa, wr = threefry_2x32(key0, key1, pairs, np.ones(2 * n, np.uint32))
    assert np.all(wr != 0)
    x = -np.log((wr.astype(np.float64) + 0.5) * 2.0**-32)
    quadrant = (wa >> 30).astype(np.float64)
    low = (wa & 0x3FFFFFFF).astype(np.float64)
    theta = quadrant * np.pi / 2 + (low * 2.0**-30 - 0.5) * np.pi / 2
    pair_sum = np.sqrt(2 * x) * (np.cos(theta) + np.sin(theta))
    return 0.5 * (pair_sum[0::2] + pair_sum[1::2])


class FixedWord:
    """Stands in for the `secrets` module of a backend: the "entropy" is
    `word` (the 64-bit key; on TensorFlow the first word, to which the
    draw counter, 0 at first, is added)."""

    def __init__(self, word):
        self.word = word

    def randbits(self, bits):
        return self.word

    def token_bytes(self, count):
        return np.array([self.word, 0], np.uint64).view(np.int64).tobytes()


def _plant_os_key(monkeypatch, key0, key1):
    """Makes the next secure draw's OS key `(key0, key1)`."""
    module = backend_lib.get_backend_module()
    word = (key0 << 32) | key1
    if BACKEND == "torch":
        monkeypatch.setattr(module, "secrets", FixedWord(word))
    elif BACKEND == "jax":
        key = np.array([key0, key1], np.uint32)
        monkeypatch.setattr(module, "_os_key_words", lambda: key)
    else:
        # The key is the entropy word plus the draw counter (0 at first).
        monkeypatch.setattr(module, "secrets", FixedWord(word))


@pytest.mark.parametrize("n", [1, 3, 2049])
def test_compiled_kernel_matches_its_secure_recipe(monkeypatch, n):
    key0, key1 = 0x9E3779B9, 0x7F4A7C15
    _plant_os_key(monkeypatch, key0, key1)
    backend = backend_lib.get_backend_module()
    seed = keras_dp.GaussianNoise(secure_mode=True).seed_generator()
    with backend.os_entropy(seed):
        z = backend.secure_standard_normal((n,), seed)
    assert z is not None, "keras_dp's compiled kernel is not available here"
    # Four float32 terms of Cephes' log, sin and cos: a few 1e-6.
    np.testing.assert_allclose(
        _numpy(z), _reference_kernel(key0, key1, n), rtol=0, atol=5e-6
    )


def zero_loss(y_true, y_pred):
    """A loss whose gradient is zero for every example: the update of an
    SGD step with learning rate 1 is minus the noise."""
    return 0.0 * ops.sum(y_pred, axis=-1)


def _noise_model(**kwargs):
    model = keras.Sequential(
        [
            keras.Input((D_IN,)),
            keras.layers.Dense(UNITS, use_bias=False, kernel_initializer="zeros"),
        ]
    )
    model = keras_dp.make_private(model, sample_rate=0.1)
    model.compile(
        optimizer=keras_dp.DPSGD(learning_rate=1.0, secure_mode=True, **kwargs),
        loss=zero_loss,
        **({"jit_compile": True} if BACKEND == "tensorflow" else {}),
    )
    return model


def _kernel(model):
    return _numpy(model.layers[0].kernel)


def test_secure_noise_through_the_train_step_has_the_stated_scale_and_is_fresh():
    batch, sigma, clip = 8, 2.0, 1.5
    x = np.random.default_rng(0).standard_normal((batch, D_IN)).astype("float32")
    y = np.zeros((batch, UNITS), "float32")

    def two_steps():
        model = _noise_model(noise_multiplier=sigma, l2_norm_clip=clip)
        model.train_on_batch(x, y)
        first = -_kernel(model)
        model.train_on_batch(x, y)
        return first, -_kernel(model) - first

    first, second = two_steps()
    other, _ = two_steps()
    expected = sigma * clip / batch
    n = first.size
    for z in (first, second, other):
        # std: standard error expected / sqrt(2n); mean: expected / sqrt(n).
        assert abs(z.std() / expected - 1) < 5.5 / math.sqrt(2 * n)
        assert abs(z.mean()) < 5.5 * expected / math.sqrt(n)
    # Fresh at every step and in every model built the same way (the
    # normal mode with one seed would repeat `first` in the second model).
    bound = 5.5 / math.sqrt(n)
    assert abs(np.corrcoef(first.ravel(), second.ravel())[0, 1]) < bound
    assert abs(np.corrcoef(first.ravel(), other.ravel())[0, 1]) < bound


def test_fit_in_secure_mode_trains_with_a_secure_sampler():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((200, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    model = keras_dp.make_private(
        keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    )
    optimizer = keras_dp.DPAdam(
        learning_rate=0.05, noise_multiplier=0.5, secure_mode=True
    )
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    history = model.fit(x, y, batch_size=20, epochs=3, verbose=0)
    assert all(np.isfinite(history.history["loss"]))
    assert history.history["accuracy"][-1] > 0.7
    assert int(ops.convert_to_numpy(optimizer.iterations)) == 30
    entry = optimizer.privacy_ledger.entries[-1]
    assert entry["poisson"] and entry["sample_rate"] == pytest.approx(0.1)
    config = optimizer.get_config()
    assert config["secure_mode"] is True and config["seed"] is None
    restored = keras_dp.DPAdam.from_config(config)
    assert restored.secure_mode and "secure_mode=True" in repr(restored)


def test_secure_sampler_draws_fresh_poisson_batches():
    n, batch = 400, 40
    x = np.arange(n, dtype="float32")[:, None]
    sampler = keras_dp.data.PoissonSampler(
        x, np.zeros(n), batch_size=batch, accumulation_steps=2, secure_mode=True
    )
    assert sampler.seed is None and sampler.sample_rate == pytest.approx(0.2)
    counts = np.zeros(n)
    sizes = []
    draws = 200
    for update in range(draws):
        parts = [sampler[2 * update + k] for k in range(2)]
        ids = np.concatenate([p[0][p[2] > 0, 0] for p in parts]).astype(int)
        # The two accumulation parts of one update come from one draw.
        assert len(np.unique(ids)) == len(ids)
        counts[ids] += 1
        sizes.append(len(ids))
    # Each example is in a logical batch with probability q = 0.2: over
    # 200 draws, count ~ Binomial(200, 0.2) (sd 5.66); the batch size
    # ~ Binomial(400, 0.2) (sd 8).
    assert abs(counts.mean() - 40) < 1.0
    assert counts.std() == pytest.approx(math.sqrt(200 * 0.2 * 0.8), rel=0.15)
    assert abs(np.mean(sizes) - 80) < 5.5 * 8 / math.sqrt(draws)
    # Two secure samplers with the same arguments draw different batches.
    other = keras_dp.data.PoissonSampler(
        x, np.zeros(n), batch_size=batch, secure_mode=True
    )
    again = keras_dp.data.PoissonSampler(
        x, np.zeros(n), batch_size=batch, secure_mode=True
    )
    assert not np.array_equal(other[0][0], again[0][0])


def test_secure_mode_refuses_what_would_weaken_it():
    with pytest.raises(ValueError, match="secure_mode=True.*seed=3"):
        keras_dp.DPSGD(secure_mode=True, seed=3)
    with pytest.raises(TypeError, match="`secure_mode` must be True or False"):
        keras_dp.DPSGD(secure_mode="yes")
    with pytest.raises(ValueError, match="secure_mode=True.*seed=0"):
        keras_dp.data.PoissonSampler(
            np.zeros((10, 2)), np.zeros(10), batch_size=2, seed=0, secure_mode=True
        )
    x = np.zeros((40, 3), "float32")
    y = np.zeros((40,), "int32")

    def secure_model(**kwargs):
        model = keras_dp.make_private(
            keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]), **kwargs
        )
        model.compile(
            optimizer=keras_dp.DPSGD(secure_mode=True),
            loss="sparse_categorical_crossentropy",
        )
        return model

    with pytest.raises(ValueError, match="reproducible NumPy stream.*secure_mode=True"):
        secure_model().fit(
            keras_dp.data.PoissonSampler(x, y, batch_size=4), epochs=1, verbose=0
        )
    with pytest.raises(ValueError, match="fixed-size.*secure_mode=True"):
        secure_model(poisson_sampling=False).fit(
            x, y, batch_size=4, epochs=1, verbose=0
        )
