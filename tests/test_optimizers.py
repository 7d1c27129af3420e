"""Tests of keras_dp's DP optimizers through the real private train step.

Statistical tests use fixed seeds. With N independent noise coordinates of
standard deviation s, the empirical standard deviation has a relative
standard error of about 1/sqrt(2N), the empirical mean a standard error of
s/sqrt(N), and the correlation of two independent samples a standard error
of 1/sqrt(N). Bounds are 5 standard errors, so a correct implementation
fails with probability < 1e-6, while a wrong scale (e.g. a missing or extra
factor of B, k or sigma) is off by far more.
"""

import math
import os

import keras
import numpy as np
import pytest
from keras import ops

import keras_dp

# Noise-test model: a 64 x 256 kernel gives N = 16384 noise coordinates.
D_IN, UNITS = 64, 256
N_COORDS = D_IN * UNITS
STD_RTOL = 5 / math.sqrt(2 * N_COORDS)  # ~0.028
CORR_BOUND = 5 / math.sqrt(N_COORDS)  # ~0.039


def zero_loss(y_true, y_pred):
    """A loss whose gradient is exactly zero for every example."""
    return 0.0 * ops.sum(y_pred, axis=-1)


def _noise_model(optimizer):
    model = keras.Sequential(
        [
            keras.Input((D_IN,)),
            keras.layers.Dense(UNITS, use_bias=False, kernel_initializer="zeros"),
        ]
    )
    model = keras_dp.make_private(model)
    model.compile(optimizer=optimizer, loss=zero_loss)
    return model


def _noise_batch(batch):
    rng = np.random.default_rng(123)
    x = rng.standard_normal((batch, D_IN)).astype("float32")
    y = np.zeros((batch, UNITS), "float32")
    return x, y


def _kernel(model):
    return np.asarray(ops.convert_to_numpy(model.layers[0].kernel), np.float64)


def _assert_gaussian_noise(change, expected_std, msg=""):
    change = np.asarray(change, np.float64).ravel()
    assert change.size == N_COORDS
    std = change.std()
    assert abs(std / expected_std - 1) < STD_RTOL, (
        f"{msg}: empirical std {std:.5g}, expected {expected_std:.5g} "
        f"(rtol {STD_RTOL:.3g})"
    )
    # Mean: standard error expected_std / sqrt(N), 5 sigma bound.
    assert abs(change.mean()) < 5 * expected_std / math.sqrt(N_COORDS), msg


def _corr(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def _dense_model(units=3, d=4):
    return keras.Sequential([keras.Input((d,)), keras.layers.Dense(units)])


def _regression_data(n=16, d=4, units=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype("float32")
    y = rng.standard_normal((n, units)).astype("float32")
    return x, y


def _weights(model):
    return [np.asarray(w) for w in model.get_weights()]


def _seed_state(optimizer):
    """The noise generator's state variable(s) among the optimizer's."""
    states = [
        np.asarray(ops.convert_to_numpy(v))
        for v in optimizer.variables
        if "seed" in v.path
    ]
    assert states, [v.path for v in optimizer.variables]
    return states


# ---------------------------------------------------------------------------
# Classes.


def test_dp_classes_subclass_keras_optimizers():
    pairs = [
        (keras_dp.DPSGD, keras.optimizers.SGD),
        (keras_dp.DPAdam, keras.optimizers.Adam),
        (keras_dp.DPAdamW, keras.optimizers.AdamW),
        (keras_dp.DPLAMB, keras.optimizers.Lamb),
    ]
    for dp_cls, keras_cls in pairs:
        assert issubclass(dp_cls, keras_cls), dp_cls
        assert issubclass(dp_cls, keras_dp.DPOptimizerMixin), dp_cls
        # The built-in classes are the cached make_dp_optimizer results.
        assert keras_dp.make_dp_optimizer(keras_cls) is dp_cls
        # A DP class is returned as is.
        assert keras_dp.make_dp_optimizer(dp_cls) is dp_cls
        opt = dp_cls(learning_rate=0.01)
        assert isinstance(opt, keras_cls)
        assert isinstance(opt, keras.optimizers.Optimizer)


def test_dp_classes_update_as_the_class_keras_instantiates():
    # On PyTorch Keras instantiates `keras.optimizers.SGD` (Adam, AdamW)
    # as a class that updates all variables with `torch._foreach_*` ops;
    # a DP class must subclass that one, not the per-variable base.
    for dp_cls, keras_cls in [
        (keras_dp.DPSGD, keras.optimizers.SGD),
        (keras_dp.DPAdam, keras.optimizers.Adam),
        (keras_dp.DPAdamW, keras.optimizers.AdamW),
        (
            keras_dp.make_dp_optimizer(keras.optimizers.RMSprop),
            keras.optimizers.RMSprop,
        ),
    ]:
        assert isinstance(dp_cls(learning_rate=0.01), type(keras_cls())), dp_cls


@pytest.mark.parametrize(
    "dp_cls, keras_cls, kwargs",
    [
        (keras_dp.DPSGD, keras.optimizers.SGD, {}),
        (keras_dp.DPSGD, keras.optimizers.SGD, {"momentum": 0.9, "nesterov": True}),
        (keras_dp.DPAdam, keras.optimizers.Adam, {}),
        (keras_dp.DPAdamW, keras.optimizers.AdamW, {"weight_decay": 0.1}),
    ],
    ids=["sgd", "sgd-nesterov", "adam", "adamw"],
)
def test_noise_free_dp_steps_equal_the_keras_optimizers_steps(
    dp_cls, keras_cls, kwargs
):
    _assert_noise_free_steps_equal(
        dp_cls(learning_rate=0.1, noise_multiplier=0.0, l2_norm_clip=1e6, **kwargs),
        keras_cls(learning_rate=0.1, **kwargs),
        steps=3,
    )


def _assert_noise_free_steps_equal(dp_optimizer, keras_optimizer, steps):
    """No noise and a clip above every gradient norm: `steps` private steps
    equal as many of the Keras optimizer on the mean loss (the sum of the
    gradients over B). Returns the private model and its initial weights."""
    x, y = _regression_data(n=8)
    reference = _dense_model()
    initial = _weights(reference)
    model = keras_dp.make_private(_dense_model())
    model.set_weights(initial)
    model.compile(optimizer=dp_optimizer, loss="mse")
    reference.compile(optimizer=keras_optimizer, loss="mse")
    for _ in range(steps):
        model.train_on_batch(x, y)
        reference.train_on_batch(x, y)
    for got, want, before in zip(_weights(model), _weights(reference), initial):
        assert not np.allclose(want, before)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    return model, initial


def test_make_dp_optimizer_adagrad_end_to_end():
    dp_adagrad = keras_dp.make_dp_optimizer(keras.optimizers.Adagrad)
    assert keras_dp.make_dp_optimizer(keras.optimizers.Adagrad) is dp_adagrad
    assert issubclass(dp_adagrad, keras.optimizers.Adagrad)
    assert issubclass(dp_adagrad, keras_dp.DPOptimizerMixin)
    assert dp_adagrad.__name__ == "DPAdagrad"

    model, initial = _assert_noise_free_steps_equal(
        dp_adagrad(learning_rate=0.5, noise_multiplier=0.0, l2_norm_clip=1e6),
        keras.optimizers.Adagrad(learning_rate=0.5),
        steps=1,
    )
    assert isinstance(model.optimizer, keras.optimizers.Adagrad)
    assert int(ops.convert_to_numpy(model.optimizer.iterations)) == 1

    # And with noise it still trains (finite, different from noise-free).
    x, y = _regression_data(n=8)
    noisy = keras_dp.make_private(_dense_model())
    noisy.set_weights(initial)
    noisy.compile(
        optimizer=dp_adagrad(learning_rate=0.5, noise_multiplier=1.0, seed=1),
        loss="mse",
    )
    noisy.train_on_batch(x, y)
    assert all(np.isfinite(w).all() for w in _weights(noisy))
    assert not np.allclose(_weights(noisy)[0], _weights(model)[0])


def test_make_dp_optimizer_rejects_non_optimizers():
    for bad in (
        3,
        "Adam",
        keras.optimizers.Adam(),
        keras.layers.Dense,
        object,
    ):
        with pytest.raises(TypeError, match="keras.optimizers.Optimizer subclass"):
            keras_dp.make_dp_optimizer(bad)


# ---------------------------------------------------------------------------
# Config round trip and saving.


def _check_round_trip(opt, expected_attrs):
    config = opt.get_config()
    for key, value in expected_attrs.items():
        assert config[key] == pytest.approx(value), key
    restored = type(opt).from_config(config)
    assert type(restored) is type(opt)
    assert restored.get_config() == config
    for key, value in expected_attrs.items():
        attr = getattr(restored, key)
        if isinstance(attr, keras.Variable):
            attr = float(ops.convert_to_numpy(attr))
        assert attr == pytest.approx(value), key
    # Through Keras serialization, without custom_objects.
    revived = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert type(revived) is type(opt)
    assert revived.get_config() == config
    return restored


def test_config_round_trip_preserves_dp_and_keras_settings():
    ledger = [
        {
            "start_step": 0,
            "noise_multiplier": 1.3,
            "sample_rate": 0.01,
            "poisson": True,
            "n": 1000,
        }
    ]
    opt = keras_dp.DPAdamW(
        learning_rate=3e-3,
        weight_decay=0.05,
        beta_1=0.8,
        beta_2=0.95,
        epsilon=1e-5,
        gradient_accumulation_steps=3,
        l2_norm_clip=0.7,
        noise_multiplier=1.3,
        clipping="global",
        global_clip_threshold=4.0,
        seed=11,
        privacy_ledger=ledger,
    )
    restored = _check_round_trip(
        opt,
        {
            "learning_rate": 3e-3,
            "weight_decay": 0.05,
            "beta_1": 0.8,
            "beta_2": 0.95,
            "epsilon": 1e-5,
            "gradient_accumulation_steps": 3,
            "l2_norm_clip": 0.7,
            "noise_multiplier": 1.3,
            "clipping": "global",
            "global_clip_threshold": 4.0,
            "seed": 11,
        },
    )
    # Entries saved before the privacy unit existed read as example-level.
    expected = [{"unit": "example", **entry} for entry in ledger]
    assert restored.get_config()["privacy_ledger"]["entries"] == expected
    assert restored.privacy_ledger.entries == expected

    opt = keras_dp.DPSGD(
        learning_rate=0.2,
        momentum=0.9,
        nesterov=True,
        auto_clip=True,
        l2_norm_clip=3.0,
        noise_multiplier=0.0,
        seed=5,
        use_ema=True,
        ema_momentum=0.9,
    )
    _check_round_trip(
        opt,
        {
            "learning_rate": 0.2,
            "momentum": 0.9,
            "nesterov": True,
            "clipping": "auto",
            "l2_norm_clip": 3.0,
            "noise_multiplier": 0.0,
            "seed": 5,
            "use_ema": True,
            "ema_momentum": 0.9,
        },
    )

    # A noise calibrated later: the target is kept, sigma stays unset.
    opt = keras_dp.DPLAMB(
        learning_rate=1e-3, target_epsilon=2.0, target_delta=1e-5, epochs=3
    )
    restored = _check_round_trip(
        opt, {"target_epsilon": 2.0, "target_delta": 1e-5, "epochs": 3}
    )
    assert restored.noise_multiplier is None


def test_save_and_load_restores_dp_optimizer_and_noise_state(tmp_path):
    x, y = _regression_data(n=8)

    def build():
        model = keras_dp.make_private(_dense_model())
        model.compile(
            optimizer=keras_dp.DPAdam(
                learning_rate=0.05,
                weight_decay=0.01,
                l2_norm_clip=0.7,
                noise_multiplier=1.5,
                clipping="global",
                global_clip_threshold=2.0,
                seed=5,
            ),
            loss="mse",
        )
        return model

    model = build()
    initial_state = None
    model.train_on_batch(x, y)
    model.train_on_batch(x, y)
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)

    loaded = keras.saving.load_model(path)
    assert keras_dp.is_private(loaded)
    opt = loaded.optimizer
    assert type(opt) is keras_dp.DPAdam
    assert opt.get_config() == model.optimizer.get_config()
    assert (opt.l2_norm_clip, opt.noise_multiplier) == (0.7, 1.5)
    assert (opt.clipping, opt.global_clip_threshold, opt.seed) == ("global", 2.0, 5)
    assert opt.weight_decay == pytest.approx(0.01)
    assert int(ops.convert_to_numpy(opt.iterations)) == 2
    for a, b in zip(_seed_state(opt), _seed_state(model.optimizer)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(_weights(loaded), _weights(model)):
        np.testing.assert_array_equal(a, b)

    # One more step each: the loaded model draws the same noise as the
    # original would have (the noise state survived, sigma > 0).
    model.train_on_batch(x, y)
    loaded.train_on_batch(x, y)
    for a, b in zip(_weights(loaded), _weights(model)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)

    # Sensitivity check of the comparison above: a copy whose noise state
    # is reset to a fresh generator takes a different step.
    reset = keras.saving.load_model(path)
    reset.optimizer.build(reset.trainable_variables)
    fresh = keras.random.SeedGenerator(5)
    for v in reset.optimizer.variables:
        if "seed" in v.path:
            initial_state = np.asarray(ops.convert_to_numpy(fresh.state))
            v.assign(initial_state)
    assert initial_state is not None
    reset.train_on_batch(x, y)
    assert not np.allclose(_weights(reset)[0], _weights(model)[0], atol=1e-4)

    # The loaded model trains further with fit (private step, ledger).
    before = _weights(loaded)
    loaded.fit(x, y, batch_size=4, epochs=2, verbose=0)
    after = _weights(loaded)
    assert all(np.isfinite(w).all() for w in after)
    assert not np.allclose(after[0], before[0])
    assert int(ops.convert_to_numpy(loaded.optimizer.iterations)) == 3 + 4
    assert loaded.optimizer.privacy_ledger.entries


# ---------------------------------------------------------------------------
# Noise through the private train step.


@pytest.mark.parametrize(
    "kwargs,sigma,sensitivity",
    [
        ({"l2_norm_clip": 3.0}, 2.0, 3.0),
        ({"auto_clip": True}, 1.5, 1.0),
        (
            {"clipping": "global", "l2_norm_clip": 2.0, "global_clip_threshold": 5.0},
            1.0,
            2.0,
        ),
    ],
    ids=["flat", "auto", "global"],
)
def test_noise_std_is_sigma_times_clip_over_batch(kwargs, sigma, sensitivity):
    batch = 8
    model = _noise_model(
        keras_dp.DPSGD(learning_rate=1.0, noise_multiplier=sigma, seed=17, **kwargs)
    )
    x, y = _noise_batch(batch)
    model.train_on_batch(x, y)
    # Clipped gradients are zero, so the SGD step (lr 1) is minus the noise.
    _assert_gaussian_noise(_kernel(model), sigma * sensitivity / batch, msg=str(kwargs))
    assert int(ops.convert_to_numpy(model.optimizer.iterations)) == 1


def test_noise_is_fresh_each_step_and_reproducible_by_seed():
    batch, sigma, clip = 4, 1.0, 1.0
    expected_std = sigma * clip / batch
    x, y = _noise_batch(batch)

    def two_steps(seed):
        model = _noise_model(
            keras_dp.DPSGD(
                learning_rate=1.0,
                noise_multiplier=sigma,
                l2_norm_clip=clip,
                seed=seed,
            )
        )
        model.train_on_batch(x, y)
        first = _kernel(model)
        model.train_on_batch(x, y)
        return first, _kernel(model) - first

    first, second = two_steps(3)
    _assert_gaussian_noise(first, expected_std, "step 1")
    _assert_gaussian_noise(second, expected_std, "step 2")
    assert abs(_corr(first, second)) < CORR_BOUND
    assert not np.array_equal(first, second)

    # Same seed, fresh model: bit-identical noise, step for step.
    again_first, again_second = two_steps(3)
    np.testing.assert_array_equal(again_first, first)
    np.testing.assert_array_equal(again_second, second)

    # Different seed: independent noise.
    other_first, _ = two_steps(4)
    assert abs(_corr(other_first, first)) < CORR_BOUND


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "framework"])
def test_backend_noise_sampler_is_standard_normal(kernel, monkeypatch):
    """The backend's sampler against N(0, 1): keras_dp's compiled kernel
    (Box-Muller of threefry words) and, with KERAS_DP_NATIVE=0, the
    framework's ops (TensorFlow: Box-Muller of Philox uniforms; JAX:
    inverse CDF of both words of each threefry block). One draw of 399,999
    numbers (odd, so one pair is cut), with 5-standard-error bounds as
    above: mean, variance, fourth moment (variance of z^4 is 96), the
    Kolmogorov-Smirnov test (p > 1e-6), and independence of the two
    halves, whose numbers come pairwise from one threefry block or one
    pair of uniforms (for Box-Muller their squares share the radius)."""
    if not kernel:
        monkeypatch.setenv("KERAS_DP_NATIVE", "0")
    from scipy import stats

    from keras_dp import backend as backend_lib

    sampler = backend_lib.get_backend_module().standard_normal
    seed = keras.random.SeedGenerator(5)
    shape = (3, 133333)
    z = ops.convert_to_numpy(sampler(shape, seed))
    assert z.shape == shape and z.dtype == np.float32
    z = z.astype(np.float64).ravel()
    n = z.size
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs(np.mean(z**4) - 3) < 5 * math.sqrt(96 / n)
    assert stats.kstest(z, "norm").pvalue > 1e-6
    # The pairs: numbers i and i + ceil(n / 2) (= 2 * ceil(n / 4) here).
    half = (n + 1) // 2
    first, second = z[: n - half], z[half:]
    bound = 5 / math.sqrt(n - half)
    assert abs(_corr(first, second)) < bound
    assert abs(_corr(first**2, second**2)) < bound
    # Tails: P(|z| > 4) = 6.3e-5 (25 expected); the Box-Muller samplers
    # stop at 5.65 (23-bit uniforms) and 5.77 (the kernel's 24 bits).
    assert np.sum(np.abs(z) > 4) > 5
    assert np.abs(z).max() < 6
    # The generator advances: the next draw is a fresh one.
    again = ops.convert_to_numpy(sampler(shape, seed)).astype(np.float64).ravel()
    assert abs(_corr(z, again)) < 5 / math.sqrt(n)


@pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="the JAX sampler's transform"
)
def test_jax_normal_from_bits_is_jax_random_normal():
    """The JAX sampler's transform of threefry bits is `jax.random.normal`'s
    own: the same numbers from the same bits, and finite at the extreme
    bit patterns (a uniform of exactly -1 or 1 would give an infinite
    noise coordinate)."""
    import jax

    from keras_dp.backend import jax as jax_backend

    key = jax.random.key(7)
    bits = jax.random.bits(key, (10001,))
    np.testing.assert_allclose(
        np.asarray(jax_backend.normal_from_bits(bits)),
        np.asarray(jax.random.normal(key, (10001,))),
        rtol=1e-6,
        atol=1e-6,
    )
    extremes = np.asarray(
        jax_backend.normal_from_bits(
            np.array([0, 511, 2**31, 2**32 - 512, 2**32 - 1], np.uint32)
        )
    )
    assert np.all(np.isfinite(extremes)), extremes
    assert np.all(np.abs(extremes) < 6), extremes
    assert extremes[0] < -5 and extremes[-1] > 5, extremes
    assert extremes[0] == extremes[1] and extremes[3] == extremes[4]
    assert abs(extremes[2]) < 1e-6


def test_zero_noise_multiplier_adds_no_noise():
    x, y = _noise_batch(8)
    model = _noise_model(
        keras_dp.DPSGD(learning_rate=1.0, noise_multiplier=0.0, seed=1)
    )
    model.train_on_batch(x, y)
    model.train_on_batch(x, y)
    np.testing.assert_array_equal(_kernel(model), 0.0)
    assert int(ops.convert_to_numpy(model.optimizer.iterations)) == 2


def test_gradient_accumulation_adds_noise_once_per_logical_batch():
    micro_batch, steps, sigma, clip = 8, 3, 2.0, 1.5
    expected_std = sigma * clip / (micro_batch * steps)
    x, y = _noise_batch(micro_batch)
    model = _noise_model(
        keras_dp.DPSGD(
            learning_rate=1.0,
            noise_multiplier=sigma,
            l2_norm_clip=clip,
            gradient_accumulation_steps=steps,
            seed=9,
        )
    )
    kernels = []
    for _ in range(2 * steps):
        model.train_on_batch(x, y)
        kernels.append(_kernel(model))
    # Micro-steps that do not complete a logical batch leave weights alone.
    for k in (0, 1):
        np.testing.assert_array_equal(kernels[k], 0.0)
    np.testing.assert_array_equal(kernels[steps + 0], kernels[steps - 1])
    np.testing.assert_array_equal(kernels[steps + 1], kernels[steps - 1])
    first = kernels[steps - 1]
    second = kernels[2 * steps - 1] - first
    _assert_gaussian_noise(first, expected_std, "logical batch 1")
    _assert_gaussian_noise(second, expected_std, "logical batch 2")
    assert abs(_corr(first, second)) < CORR_BOUND
    assert int(ops.convert_to_numpy(model.optimizer.iterations)) == 2


# ---------------------------------------------------------------------------
# Automatic clipping: R is only a scale (AUTO-S).


def _train_steps(optimizer, initial, x, y, steps, batch=8):
    model = keras_dp.make_private(_dense_model())
    model.set_weights(initial)
    model.compile(optimizer=optimizer, loss="mse")
    for k in range(steps):
        model.train_on_batch(
            x[k * batch : (k + 1) * batch], y[k * batch : (k + 1) * batch]
        )
    return _weights(model)


def test_auto_clip_adam_is_invariant_to_radius():
    x, y = _regression_data(n=32, seed=1)
    initial = _weights(_dense_model())

    def run(radius):
        # Adam's epsilon is the only scale-dependent term: make it tiny
        # against gradients of order 0.1 / 8.
        return _train_steps(
            keras_dp.DPAdam(
                learning_rate=0.05,
                auto_clip=True,
                l2_norm_clip=radius,
                noise_multiplier=0.8,
                epsilon=1e-12,
                seed=7,
            ),
            initial,
            x,
            y,
            steps=4,
        )

    small, large = run(1.0), run(100.0)
    for a, b, w0 in zip(small, large, initial):
        assert not np.allclose(a, w0)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_auto_clip_sgd_learning_rate_absorbs_radius():
    x, y = _regression_data(n=24, seed=2)
    initial = _weights(_dense_model())
    radius, lr = 5.0, 0.03

    def run(learning_rate, r):
        return _train_steps(
            keras_dp.DPSGD(
                learning_rate=learning_rate,
                clipping="auto",
                l2_norm_clip=r,
                noise_multiplier=0.7,
                seed=21,
            ),
            initial,
            x,
            y,
            steps=3,
        )

    scaled_radius = run(lr, radius)
    scaled_lr = run(lr * radius, 1.0)
    for a, b, w0 in zip(scaled_radius, scaled_lr, initial):
        assert not np.allclose(a, w0)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# Misuse errors.


def test_dp_optimizer_on_non_private_model_raises_and_model_survives():
    x, y = _regression_data(n=16)
    model = _dense_model()
    model.compile(
        optimizer=keras_dp.DPSGD(learning_rate=0.1, noise_multiplier=0.5, seed=0),
        loss="mse",
    )
    initial = _weights(model)
    with pytest.raises(RuntimeError, match="make_private"):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    with pytest.raises(RuntimeError, match="make_private"):
        model.train_on_batch(x, y)
    for a, b in zip(_weights(model), initial):
        np.testing.assert_array_equal(a, b)

    keras_dp.make_private(model)
    assert keras_dp.is_private(model)
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    after = _weights(model)
    assert all(np.isfinite(w).all() for w in after)
    assert not np.allclose(after[0], initial[0])
    assert len(history.history["loss"]) == 2
    assert np.isfinite(history.history["loss"]).all()
    assert int(ops.convert_to_numpy(model.optimizer.iterations)) > 0


def test_private_model_with_plain_optimizer_raises():
    x, y = _regression_data(n=16)
    model = keras_dp.make_private(_dense_model())
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1), loss="mse")
    initial = _weights(model)
    with pytest.raises(TypeError, match="DP optimizer"):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    with pytest.raises(TypeError, match="DP optimizer"):
        model.train_on_batch(x, y)
    for a, b in zip(_weights(model), initial):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["clipnorm", "global_clipnorm", "clipvalue"])
def test_keras_gradient_clipping_is_refused_for_l2_norm_clip(name):
    with pytest.raises(ValueError, match=f"`{name}`.*l2_norm_clip"):
        keras_dp.DPAdam(**{name: 1.0})
