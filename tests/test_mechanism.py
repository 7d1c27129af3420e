"""The DP mechanism's named pieces: `ClippingPolicy`, `GaussianNoise` and
the explicit `ClippedBatch` a train step hands to its optimizer."""

import math

import keras
import numpy as np
import pytest
from keras import ops

import keras_dp


def _private_model():
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(2)]
    )
    return keras_dp.make_private(model)


def test_optimizer_is_composed_of_a_clipping_policy_and_a_noise():
    opt = keras_dp.DPAdam(
        l2_norm_clip=0.5,
        noise_multiplier=1.3,
        clipping="global",
        global_clip_threshold=2.0,
        seed=3,
    )
    assert isinstance(opt.clipping_policy, keras_dp.ClippingPolicy)
    assert isinstance(opt.noise, keras_dp.GaussianNoise)
    assert opt.clipping_policy.get_config() == {
        "l2_norm_clip": 0.5,
        "clipping": "global",
        "global_clip_threshold": 2.0,
    }
    assert opt.noise.get_config() == {
        "noise_multiplier": 1.3,
        "seed": 3,
        "secure_mode": False,
    }
    # The optimizer's config is the two pieces' configs plus Keras's.
    config = opt.get_config()
    for key, value in {
        **opt.clipping_policy.get_config(),
        **opt.noise.get_config(),
    }.items():
        assert config[key] == value


def test_clipping_policy_round_trips_its_config():
    policy = keras_dp.ClippingPolicy(
        l2_norm_clip=2.0,
        clip_groups="per_layer",
        clip_thresholds={"a": 1.0},
        adaptive_clipping=True,
    )
    again = keras_dp.ClippingPolicy.from_config(policy.get_config())
    assert again.get_config() == policy.get_config()
    assert isinstance(again.adaptive_clipping, keras_dp.AdaptiveClipping)


def test_clipping_policy_refuses_settings_that_do_not_bound_sensitivity():
    with pytest.raises(ValueError, match="positive finite number"):
        keras_dp.ClippingPolicy(l2_norm_clip=0.0)
    with pytest.raises(ValueError, match="Unknown clipping mode"):
        keras_dp.ClippingPolicy(clipping="soft")
    with pytest.raises(ValueError, match="Unknown clip_groups"):
        keras_dp.ClippingPolicy(clip_groups="per_head")
    with pytest.raises(ValueError, match="clipping='flat'"):
        keras_dp.ClippingPolicy(clipping="auto", adaptive_clipping=True)


@pytest.mark.parametrize("sigma", [float("nan"), float("inf"), -1.0, "1.0"])
def test_gaussian_noise_refuses_a_multiplier_that_is_not_finite(sigma):
    with pytest.raises(ValueError, match="non-negative finite"):
        keras_dp.GaussianNoise(sigma)
    with pytest.raises(ValueError, match="non-negative finite"):
        keras_dp.DPSGD(noise_multiplier=sigma)


def test_step_clipping_factors_match_flat_clipping_by_hand():
    policy = keras_dp.ClippingPolicy(l2_norm_clip=1.0)
    step = policy.for_thresholds()
    squared = [
        ops.convert_to_tensor(np.array([0.25, 9.0], "float32")),
        ops.convert_to_tensor(np.array([0.0, 16.0], "float32")),
    ]
    factors = [ops.convert_to_numpy(f) for f in step.variable_clip_factors(squared)]
    # Norms 0.5 and 5: the first is kept, the second scaled to norm 1.
    np.testing.assert_allclose(factors[0], [1.0, 1.0 / 5.0], rtol=1e-5)
    np.testing.assert_allclose(factors[1], factors[0])
    assert step.num_count_groups == 0 and step.variable_partitions() is None


def test_privatize_adds_noise_of_the_stated_scale():
    """One privatize call on zero gradients: the result is the noise alone,
    with standard deviation sigma * C / B (here 2 * 1.5 / 4 = 0.75)."""
    model = _private_model()
    opt = keras_dp.DPSGD(noise_multiplier=2.0, l2_norm_clip=1.5, seed=4)
    model.compile(optimizer=opt, loss="mse")
    opt.build_for_model(model)
    zeros = [ops.zeros((500, 40)), ops.zeros((3,))]
    batch = keras_dp.ClippedBatch(zeros, expected_batch_size=4.0)
    noisy = opt.privatize(batch)
    z = np.concatenate([np.ravel(ops.convert_to_numpy(g)) for g in noisy])
    # 20,003 draws: the sample std is within 2% of 0.75 with overwhelming
    # probability (its relative standard error is 1/sqrt(2n) = 0.5%).
    assert abs(np.std(z) / 0.75 - 1) < 0.02
    assert abs(np.mean(z)) < 0.03
    # The same seed and step give the same noise; the next step other noise.
    again = keras_dp.DPSGD(noise_multiplier=2.0, l2_norm_clip=1.5, seed=4)
    other_model = _private_model()
    other_model.compile(optimizer=again, loss="mse")
    again.build_for_model(other_model)
    first = ops.convert_to_numpy(again.privatize(batch)[0])
    np.testing.assert_array_equal(first, ops.convert_to_numpy(noisy[0]))
    second = ops.convert_to_numpy(again.privatize(batch)[0])
    assert not np.allclose(first, second)


def test_stateless_privatize_matches_privatize_and_returns_the_new_state():
    model = _private_model()
    opt = keras_dp.DPSGD(noise_multiplier=1.0, seed=8)
    model.compile(optimizer=opt, loss="mse")
    opt.build_for_model(model)
    batch = keras_dp.ClippedBatch([ops.zeros((4, 3)), ops.zeros((3,))], 2.0)
    values = [ops.convert_to_tensor(v.value) for v in opt.variables]
    noisy, new_values = opt.stateless_privatize(values, batch)
    # The variables themselves are untouched; the returned state advanced.
    for v, before in zip(opt.variables, values):
        np.testing.assert_array_equal(
            ops.convert_to_numpy(v.value), ops.convert_to_numpy(before)
        )
    changed = [
        not np.array_equal(ops.convert_to_numpy(a), ops.convert_to_numpy(b))
        for a, b in zip(values, new_values)
    ]
    assert sum(changed) == 1  # the noise seed state
    stateful = opt.privatize(batch)
    for a, b in zip(noisy, stateful):
        np.testing.assert_array_equal(ops.convert_to_numpy(a), ops.convert_to_numpy(b))


def test_apply_and_privatize_refuse_what_is_not_private():
    model = _private_model()
    opt = keras_dp.DPSGD(seed=1)
    model.compile(optimizer=opt, loss="mse")
    opt.build_for_model(model)
    grads = [ops.zeros((4, 3)), ops.zeros((3,)), ops.zeros((3, 2)), ops.zeros((2,))]
    with pytest.raises(RuntimeError, match="did not come from `optimizer.privatize`"):
        opt.apply(grads)
    with pytest.raises(TypeError, match="ClippedBatch"):
        opt.privatize(grads)


def test_an_optimizer_not_attached_to_a_private_model_refuses_to_build():
    opt = keras_dp.DPSGD()
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    with pytest.raises(RuntimeError, match="not attached to a private model"):
        opt.build(model.trainable_variables)
    # Attached explicitly (a custom loop), it builds.
    opt.bind_clip_groups(model)
    opt.build(model.trainable_variables)
    assert opt.built
    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    with pytest.raises(RuntimeError, match="before the optimizer is built"):
        opt.bind_clip_groups(other)


def test_sensitivity_of_groups_is_the_root_sum_of_squares():
    model = _private_model()
    opt = keras_dp.DPSGD(l2_norm_clip=2.0, clip_groups="per_layer")
    model.compile(optimizer=opt, loss="mse")
    opt.build_for_model(model)
    # Two groups split C = 2 evenly: C_k = 2 / sqrt(2) each.
    assert opt.group_thresholds == pytest.approx(
        {name: 2.0 / math.sqrt(2) for name in opt.clip_group_names}
    )
    assert opt.sensitivity == pytest.approx(2.0)


def test_a_custom_loop_with_privatize_and_apply_matches_train_on_batch():
    """The README's custom loop: the explicit value in, noisy gradients out,
    Keras's update; the same seed gives the same weights as the private
    train step."""
    x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
    y = np.random.default_rng(1).normal(size=(8, 2)).astype("float32")

    def compiled():
        keras.utils.set_random_seed(5)
        model = _private_model()
        model.compile(
            optimizer=keras_dp.DPSGD(learning_rate=0.1, noise_multiplier=0.7, seed=2),
            loss="mse",
        )
        return model

    reference = compiled()
    reference.train_on_batch(x, y)

    model = compiled()
    opt = model.optimizer
    opt.build_for_model(model)
    trainable = [ops.convert_to_tensor(v.value) for v in model.trainable_variables]
    non_trainable = [
        ops.convert_to_tensor(v.value) for v in model.non_trainable_variables
    ]
    step = keras_dp.per_example.private_gradients(
        model,
        keras_dp.backend.get_backend_module(),
        trainable,
        non_trainable,
        x,
        y,
        clipping=opt.step_clipping(),
    )
    noisy = opt.privatize(keras_dp.ClippedBatch.from_step(step))
    opt.apply(noisy, model.trainable_variables)
    for a, b in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not np.allclose(model.get_weights()[0], compiled().get_weights()[0])
