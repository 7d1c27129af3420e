"""Augmentation multiplicity (`make_private(augment=..., augmentations=K)`)
against brute force.

The reference (`tests/reference.py`, no keras_dp) makes each copy of the
batch by calling `augment` itself, eagerly, with a seed generator set to the
documented seed of that copy and step; takes each copy's per-example
gradients one example at a time; averages them over the K copies; then
clips and sums. With `DPSGD(learning_rate=1, noise_multiplier=0)` one
`train_on_batch` changes the weights by exactly `-(1/B) sum_i c_i g_i`.
"""

import os

import keras
import numpy as np
import pytest
from keras import ops

import keras_dp
import reference as ref
from keras_dp.per_example import linear
from reference import assert_updates_close
from reference import step_update

B = 6
K = 3
NUM_CLASSES = 3
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
JIT = keras.backend.backend() == "jax"
# GroupNormalization's float32 rounding differs between the compiled step
# and the eager reference by about 1e-5 of the update's scale; a copy
# left out or counted twice changes the update by far more.
RTOL = 5e-5


def loss_fn(y, y_pred, sample_weight):
    return LOSS(y, y_pred, sample_weight=sample_weight)


# ------------------------------------------------------------ augmentations


class CopyShift:
    """Deterministic: copy k of a step is `x + shifts[k]`. The train step
    calls `augment` once per copy, in copy order, each time it is traced
    or run, so the copy is the call count modulo K."""

    def __init__(self, copies):
        self.shifts = [0.5 * (k + 1) for k in range(copies)]
        self.calls = 0

    def __call__(self, x, seed):
        shift = self.shifts[self.calls % len(self.shifts)]
        self.calls += 1
        return x + shift


def noise_and_flip(x, seed):
    """Random: Gaussian noise, and a flip of each image's width at random."""
    n = ops.shape(x)[0]
    flip = keras.random.uniform((n, 1, 1, 1), seed=seed) < 0.5
    x = ops.where(flip, ops.flip(x, axis=2), x)
    return x + 0.3 * keras.random.normal(ops.shape(x), seed=seed)


def noise(x, seed):
    return x + 0.3 * keras.random.normal(ops.shape(x), seed=seed)


def replace_tokens(x, seed):
    """Random: each token replaced by a random one with probability 0.3."""
    shape = ops.shape(x)
    replace = keras.random.uniform(shape, seed=seed) < 0.3
    tokens = keras.random.randint(shape, 0, 7, seed=seed, dtype=x.dtype)
    return ops.where(replace, tokens, x)


def flip_and_crop(x, seed):
    """The docstring's flip and crop (for 6x6 images, padded by 2)."""
    n, size = ops.shape(x)[0], x.shape[1]
    flip = keras.random.uniform((n, 1, 1, 1), seed=seed) < 0.5
    x = ops.where(flip, ops.flip(x, axis=2), x)
    padded = ops.pad(x, [(0, 0), (2, 2), (2, 2), (0, 0)])
    shift = keras.random.randint((n, 2), 0, 5, seed=seed)
    rows = shift[:, :1] + ops.arange(size)[None, :]
    cols = shift[:, 1:] + ops.arange(size)[None, :]
    padded = ops.take_along_axis(padded, rows[:, :, None, None], axis=1)
    return ops.take_along_axis(padded, cols[:, None, :, None], axis=2)


# ------------------------------------------------------------------ models


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
    h = keras.layers.Conv2D(2, 2, strides=2)(h)
    h = keras.layers.Flatten()(h)
    return keras.Model(inputs, keras.layers.Dense(NUM_CLASSES)(h))


def _sequence():
    return keras.Sequential(
        [
            keras.Input((5,), dtype="int32"),
            keras.layers.Embedding(7, 4),
            keras.layers.EinsumDense(
                "btd,de->bte", (None, 4), bias_axes="e", activation="tanh"
            ),
            keras.layers.LayerNormalization(),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(NUM_CLASSES),
        ]
    )


MODELS = {
    "mlp": (_mlp, (5,), lambda: CopyShift(K)),
    "conv": (_conv, (6, 6, 2), lambda: noise_and_flip),
    "sequence": (_sequence, None, lambda: replace_tokens),
}


def make_data(name, rows=B, seed=0):
    rng = np.random.default_rng(seed)
    shape = MODELS[name][1]
    if shape is None:
        x = rng.integers(0, 7, size=(rows, 5)).astype("int32")
    else:
        scale = 0.3 + 2.0 * rng.random((rows,) + (1,) * len(shape))
        x = (scale * rng.normal(size=(rows,) + shape)).astype("float32")
    y = rng.integers(0, NUM_CLASSES, size=(rows,))
    return x, y


def build(name, augment, augmentations=K, seed=1, **private_kwargs):
    keras.utils.set_random_seed(seed)
    model = MODELS[name][0]()
    return keras_dp.make_private(
        model, augment=augment, augmentations=augmentations, **private_kwargs
    )


def compile_dp(model, **dp_kwargs):
    dp_kwargs.setdefault("noise_multiplier", 0.0)
    model.compile(
        optimizer=keras_dp.DPSGD(learning_rate=1.0, **dp_kwargs),
        loss=LOSS,
        jit_compile=JIT,
    )
    return model


# ---------------------------------------------------------------- reference


def copy_seed(model, step, copy, copies=K):
    """The documented seed of a copy: the model's augmentation seed state
    with `step * K + copy` added to its second word."""
    state = np.array(ops.convert_to_numpy(model._keras_dp.augment_seed.state.value))
    state[1] += step * copies + copy
    return state


def reference_copies(model, augment, x, step, copies=K):
    """The K augmented copies of the batch, made eagerly, outside keras_dp."""
    out = []
    for copy in range(copies):
        generator = keras.random.SeedGenerator(0)
        generator.state.assign(copy_seed(model, step, copy, copies))
        out.append(ops.convert_to_numpy(augment(ops.convert_to_tensor(x), generator)))
    return out


def unit_gradients(model, copies, y, sample_weight=None):
    """Each example's gradient: the mean over its copies' gradients."""
    per_copy = [
        ref.per_example_gradients(model, c, y, loss_fn, sample_weight) for c in copies
    ]
    return [
        [sum(grads[i][k] for grads in per_copy) / len(copies) for k in range(len(g))]
        for i, g in enumerate(per_copy[0])
    ]


def expected_update(model, copies, y, clipping, C, sample_weight=None):
    per_example = unit_gradients(model, copies, y, sample_weight)
    return ref.expected_sgd_update(
        model, copies[0], y, loss_fn, clipping, C, per_example=per_example
    )


def random_or_deterministic_copies(model, augment, x, step=0, copies=K):
    if isinstance(augment, CopyShift):
        return [x + shift for shift in augment.shifts]
    return reference_copies(model, augment, x, step, copies)


# -------------------------------------------------------------------- tests


@pytest.mark.parametrize("path", ["auto", "vmap"])
@pytest.mark.parametrize(
    "name, clipping", [("mlp", "flat"), ("conv", "auto"), ("sequence", "flat")]
)
def test_clipped_sum_matches_brute_force(name, clipping, path):
    augment = MODELS[name][2]()
    x, y = make_data(name)
    model = compile_dp(
        build(name, augment, per_example=path), clipping=clipping, l2_norm_clip=0.05
    )
    copies = random_or_deterministic_copies(model, augment, x)
    expected = expected_update(model, copies, y, clipping, 0.05)
    actual = step_update(model, x, y)
    assert_updates_close(actual, expected, rtol=RTOL)
    taken = "vmap" if path == "vmap" else "fast"
    assert model._keras_dp.per_example_path[0] == taken


@pytest.mark.parametrize(
    "name, method", [("conv", "ghost"), ("conv", "instantiate"), ("sequence", "ghost")]
)
def test_fast_path_folds_units_by_either_method(name, method, monkeypatch):
    monkeypatch.setattr(linear, "_FORCE_METHOD", method)
    augment = MODELS[name][2]()
    x, y = make_data(name)
    model = compile_dp(build(name, augment, per_example="fast"), l2_norm_clip=0.05)
    copies = random_or_deterministic_copies(model, augment, x)
    expected = expected_update(model, copies, y, "flat", 0.05)
    assert_updates_close(step_update(model, x, y), expected, rtol=RTOL)


def test_the_docstring_flip_and_crop():
    x, y = make_data("conv")
    model = compile_dp(build("conv", flip_and_crop), l2_norm_clip=0.05)
    copies = reference_copies(model, flip_and_crop, x, step=0)
    # Crops and flips move pixels; they do not change them.
    for c in copies:
        assert not np.allclose(c, x)
        assert set(np.round(c.ravel(), 5)) <= set(np.round(x.ravel(), 5)) | {0.0}
    expected = expected_update(model, copies, y, "flat", 0.05)
    assert_updates_close(step_update(model, x, y), expected, rtol=RTOL)


@pytest.mark.parametrize("path", ["auto", "vmap"])
def test_sample_weights_and_padding_rows(path):
    x, y = make_data("conv")
    sample_weight = np.array([1.0, 0.0, 2.0, 0.5, 0.0, 1.0], "float32")
    model = compile_dp(build("conv", noise, per_example=path), l2_norm_clip=0.05)
    copies = reference_copies(model, noise, x, step=0)
    expected = expected_update(model, copies, y, "flat", 0.05, sample_weight)
    actual = step_update(model, x, y, sample_weight=sample_weight)
    assert_updates_close(actual, expected, rtol=RTOL)


@pytest.mark.parametrize("microbatch_size", [3, 2])
@pytest.mark.parametrize("path", ["auto", "vmap"])
def test_microbatches_keep_each_example_s_copies_together(path, microbatch_size):
    # `microbatch_size` counts examples: chunks of 3 * K or 2 * K rows.
    x, y = make_data("conv", rows=7)
    model = compile_dp(
        build("conv", noise, per_example=path, microbatch_size=microbatch_size),
        l2_norm_clip=0.05,
    )
    copies = reference_copies(model, noise, x, step=0)
    expected = expected_update(model, copies, y, "flat", 0.05)
    assert_updates_close(step_update(model, x, y), expected, rtol=RTOL)


def test_seeds_differ_across_copies_and_steps():
    x, y = make_data("conv")
    model = compile_dp(build("conv", noise), l2_norm_clip=0.05)
    step_update(model, x, y)
    copies = reference_copies(model, noise, x, step=1)
    expected = expected_update(model, copies, y, "flat", 0.05)
    # The second step's copies are those of step 1, not step 0's again.
    assert_updates_close(step_update(model, x, y), expected, rtol=RTOL)
    first = reference_copies(model, noise, x, step=0)
    made = [c.ravel() for c in first + copies]
    for a in range(len(made)):
        for b in range(a):
            assert not np.allclose(made[a], made[b])


def test_logged_loss_and_metrics_are_over_the_copies():
    augment = CopyShift(K)
    x, y = make_data("mlp")
    model = build("mlp", augment)
    model.compile(
        optimizer=keras_dp.DPSGD(learning_rate=0.0, noise_multiplier=0.0),
        loss=LOSS,
        metrics=["accuracy"],
        jit_compile=JIT,
    )
    logs = model.train_on_batch(x, y, return_dict=True)
    copies = np.concatenate([x + s for s in augment.shifts])
    labels = np.concatenate([y] * K)
    logits = ops.convert_to_numpy(model(copies))
    expected_loss = float(ops.convert_to_numpy(LOSS(labels, logits)))
    accuracy = float(np.mean(np.argmax(logits, axis=1) == labels))
    np.testing.assert_allclose(logs["loss"], expected_loss, rtol=1e-5)
    np.testing.assert_allclose(logs["accuracy"], accuracy, rtol=1e-6)


def test_fit_with_poisson_sampling_spends_what_one_copy_does():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6, 6, 2)).astype("float32")
    y = rng.integers(0, NUM_CLASSES, size=(64,))
    ledgers = []
    for augmentations in (1, K):
        model = build("conv", noise, augmentations=augmentations)
        model.compile(
            optimizer=keras_dp.DPSGD(learning_rate=0.1, noise_multiplier=1.0),
            loss=LOSS,
            metrics=["accuracy"],
            jit_compile=JIT,
        )
        history = model.fit(x, y, batch_size=16, epochs=2, verbose=0)
        assert np.all(np.isfinite(history.history["loss"]))
        ledgers.append(model.optimizer.privacy_ledger)
    assert ledgers[0].entries == ledgers[1].entries
    steps = 2 * 4
    assert ledgers[0].epsilon(steps, 1e-5) == ledgers[1].epsilon(steps, 1e-5)


def test_augment_with_one_copy_is_plain_augmentation():
    x, y = make_data("conv")
    model = compile_dp(build("conv", noise, augmentations=1), l2_norm_clip=0.05)
    copies = reference_copies(model, noise, x, step=0, copies=1)
    expected = expected_update(model, copies, y, "flat", 0.05)
    assert_updates_close(step_update(model, x, y), expected, rtol=RTOL)


@pytest.mark.parametrize(
    "mode, path", [("per_layer", "auto"), ("per_layer", "vmap"), ("adaptive", "auto")]
)
def test_group_wise_and_adaptive_clipping(mode, path):
    x, y = make_data("conv")
    if mode == "adaptive":
        # The first step clips at the initial threshold, flat.
        settings = {"adaptive_clipping": True}
    else:
        settings = {"clip_groups": "per_layer"}
    model = compile_dp(
        build("conv", noise, per_example=path), l2_norm_clip=0.05, **settings
    )
    copies = reference_copies(model, noise, x, step=0)
    per_example = unit_gradients(model, copies, y)
    if mode == "adaptive":
        expected = ref.expected_sgd_update(
            model, x, y, loss_fn, "flat", 0.05, per_example=per_example
        )
    else:
        # Each layer's variables clipped to 0.05 / sqrt(layers).
        layers = [layer for layer in model.layers if layer.trainable_variables]
        threshold = 0.05 / np.sqrt(len(layers))
        expected = []
        k = 0
        for layer in layers:
            count = len(layer.trainable_variables)
            norms = np.sqrt(
                [
                    sum(np.sum(g[j] ** 2) for j in range(k, k + count))
                    for g in per_example
                ]
            )
            factors = ref.flat_factors(norms, threshold)
            for j in range(k, k + count):
                expected.append(
                    -sum(c * g[j] for c, g in zip(factors, per_example)) / len(x)
                )
            k += count
    assert_updates_close(step_update(model, x, y), expected, rtol=RTOL)


class Scale(keras.layers.Layer):
    def build(self, input_shape):
        self.w = self.add_weight(shape=input_shape[-1:], initializer="ones")

    def call(self, x):
        return x * self.w


def scale_rule(layer, call, grads, context):
    x = ops.cast(call.inputs, "float32")
    return [keras_dp.per_example.instantiated_terms(layer.w, grads * x)]


def test_a_rule_without_units_sends_the_model_to_the_vmap_path():
    keras_dp.register_per_example_rule(Scale, scale_rule)
    try:
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input((5,)), Scale(), keras.layers.Dense(3)])
        model = compile_dp(
            keras_dp.make_private(model, augment=noise_vector, augmentations=K),
            l2_norm_clip=0.05,
        )
        x, y = make_data("mlp")
        copies = reference_copies(model, noise_vector, x, step=0)
        expected = expected_update(model, copies, y, "flat", 0.05)
        with pytest.warns(UserWarning, match="privacy units of 3 rows"):
            actual = step_update(model, x, y)
        assert model._keras_dp.per_example_path[0] == "vmap"
        assert_updates_close(actual, expected, rtol=RTOL)
    finally:
        keras_dp.per_example.remove_per_example_rule(Scale, scale_rule)


def noise_vector(x, seed):
    return x + 0.3 * keras.random.normal(ops.shape(x), seed=seed)


# ------------------------------------------------------------------ errors


def test_bad_arguments_are_refused():
    model = _mlp()
    with pytest.raises(ValueError, match="`augmentations` must be a positive"):
        keras_dp.make_private(model, augment=noise, augmentations=0)
    with pytest.raises(TypeError, match="`augmentations` must be a positive"):
        keras_dp.make_private(model, augment=noise, augmentations=2.0)
    with pytest.raises(TypeError, match=r"`augment` must be a function"):
        keras_dp.make_private(model, augment="flip", augmentations=2)
    with pytest.raises(TypeError, match=r"whose signature is \(x\)"):
        keras_dp.make_private(model, augment=lambda x: x, augmentations=2)
    with pytest.raises(ValueError, match="needs `augment`"):
        keras_dp.make_private(model, augmentations=4)
    assert not keras_dp.is_private(model)
    with pytest.raises(ValueError, match="`units` must be one of"):
        keras_dp.register_per_example_rule(Scale, scale_rule, units="rows")


def test_an_augment_that_changes_the_shape_is_refused():
    model = compile_dp(build("mlp", lambda x, seed: x[:, :3]))
    x, y = make_data("mlp")
    with pytest.raises(ValueError, match="must pad or resize back"):
        model.train_on_batch(x, y)


def test_save_and_load_needs_augment_again(tmp_path):
    x, y = make_data("conv")
    model = compile_dp(build("conv", noise), l2_norm_clip=0.05)
    model.train_on_batch(x, y)
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert keras_dp.is_private(loaded)
    with pytest.raises(ValueError, match=r"augment=\.\.\., augmentations=3\) after"):
        loaded.train_on_batch(x, y)
    # Saved again before that, it still records the augmentation.
    loaded.save(path)
    loaded = keras.saving.load_model(path)
    keras_dp.make_private(loaded, augment=noise, augmentations=K)
    copies = reference_copies(loaded, noise, x, step=1)
    expected = expected_update(loaded, copies, y, "flat", 0.05)
    assert_updates_close(step_update(loaded, x, y), expected, rtol=RTOL)
    # Without augmentation, by choice.
    again = keras.saving.load_model(path)
    keras_dp.make_private(again)
    again.train_on_batch(x, y)
