"""Examples with a non-finite gradient are left out of the update exactly.

An example whose per-example gradient overflows (MSE target 3e38) or whose
input is infinite gets clip factor 0 and contributes exactly nothing, on
both per-example paths, with and without microbatches: with
`noise_multiplier=0` and `DPSGD(learning_rate=1.0)` one step changes the
weights by `-(1/B) sum_{i good} c_i g_i` (B = rows of the batch, the bad
row included), which the brute-force reference (`tests/reference.py`, one
autodiff call per example) gives from the other rows. The same holds when
the bad example has sample weight 0, and Poisson padding rows are zeros,
so a bad example 0 cannot reach a step it was not sampled in.
"""

import warnings

import keras
import numpy as np
import pytest
from keras import ops

import keras_dp
import reference as ref
from keras_dp import clipping
from keras_dp import data as data_lib

B = 8
BAD = 5  # the row of the bad example
# One output: the squared error's gradient 2 (y_pred - 3e38) itself
# overflows, not only the norm (with two outputs the mean's 1/2 keeps it
# finite, and a norm of inf alone already gives factor 0).
OUTPUTS = 1
HUGE_TARGET = 3e38
MSE = keras.losses.MeanSquaredError()
JIT = keras.backend.backend() == "jax"


def loss_fn(y, y_pred, sample_weight):
    return MSE(y, y_pred, sample_weight=sample_weight)


def _mlp():
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(6),
            keras.layers.LayerNormalization(),
            keras.layers.Activation("tanh"),
            keras.layers.Dense(OUTPUTS),
        ]
    )


def _conv():
    # With the compiled per-example conv kernels (keras_dp.native), the
    # first conv keeps its per-example kernel gradients for the clipped sum
    # (more output positions than filters), the second takes it as a kernel
    # gradient of the scaled output gradients; the Dense over the four
    # positions takes ghost norms.
    inputs = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(2, 3, strides=2, padding="same", activation="tanh")(inputs)
    h = keras.layers.Conv2D(8, 2)(h)
    h = keras.layers.Reshape((4, 8))(h)
    h = keras.layers.Dense(16, activation="tanh")(h)
    h = keras.layers.Flatten()(h)
    return keras.Model(inputs, keras.layers.Dense(OUTPUTS)(h))


def _embedding():
    return keras.Sequential(
        [
            keras.Input((5,), dtype="int32"),
            keras.layers.Embedding(7, 4),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(OUTPUTS),
        ]
    )


MODELS = {
    "mlp": (_mlp, (4,)),
    "conv": (_conv, (6, 6, 2)),
    "embedding": (_embedding, None),
}


def make_data(name, rows=B, seed=0):
    rng = np.random.default_rng(seed)
    shape = MODELS[name][1]
    if shape is None:
        x = rng.integers(0, 7, size=(rows, 5)).astype("int32")
    else:
        x = rng.normal(size=(rows,) + shape).astype("float32")
    y = rng.normal(size=(rows, OUTPUTS)).astype("float32")
    return x, y


def spoil(x, y, row, how):
    """A copy of the batch in which example `row` is bad."""
    x, y = np.array(x), np.array(y)
    if how == "target":
        y[row] = HUGE_TARGET  # the squared error overflows to inf
    else:
        x[row] = np.inf
    return x, y


def build(name, path, microbatch_size=None, seed=1):
    keras.utils.set_random_seed(seed)
    model = MODELS[name][0]()
    return keras_dp.make_private(
        model,
        per_example=path,
        microbatch_size=microbatch_size,
        poisson_sampling=False,
    )


def compile_dp(model, l2_norm_clip):
    model.compile(
        optimizer=keras_dp.DPSGD(
            learning_rate=1.0,
            l2_norm_clip=l2_norm_clip,
            noise_multiplier=0.0,
            seed=1,
        ),
        loss=MSE,
        jit_compile=JIT,
    )
    return model


def reference_update(model, x, y, good_rows, batch_rows):
    """`-(1/B) sum_{i in good_rows} c_i g_i` with flat clipping at a
    threshold between the good examples' norms, B = `batch_rows`."""
    grads = ref.per_example_gradients(model, x[good_rows], y[good_rows], loss_fn)
    C = ref.split_threshold(ref.norms_of(grads))
    reference = ref.clipped_reference(
        model, x[good_rows], y[good_rows], loss_fn, "flat", C, per_example=grads
    )
    scale = len(good_rows) / batch_rows
    return [u * scale for u in reference["update"]], C


def assert_finite(update):
    for u in update:
        assert np.all(np.isfinite(u)), "the update is not finite"


# ------------------------------------------------------------------- tests


# (model, bad example, path, microbatch_size): every handler of the fast
# path used by the three models, both paths, with and without microbatches.
CASES = [
    ("mlp", "target", "fast", None),
    ("mlp", "target", "vmap", None),
    ("mlp", "target", "fast", 3),
    ("mlp", "target", "vmap", 3),
    ("mlp", "input", "fast", None),
    ("mlp", "input", "vmap", None),
    ("conv", "input", "fast", None),
    ("conv", "input", "vmap", 3),
    ("conv", "target", "fast", 3),
    ("conv", "target", "vmap", None),
    ("embedding", "target", "fast", None),
    ("embedding", "target", "vmap", 3),
]


# The first row too, on the fast path: JAX's fast path once ordered its
# layers by adding `0 * (row 0's norm)`, which made every example NaN.
ROW_CASES = [case + (BAD,) for case in CASES] + [
    case + (0,) for case in CASES if case[2] == "fast"
]


@pytest.mark.parametrize("name, how, path, microbatch_size, bad_row", ROW_CASES)
def test_bad_example_is_left_out_exactly(name, how, path, microbatch_size, bad_row):
    x, y = make_data(name)
    bad_x, bad_y = spoil(x, y, bad_row, how)
    model = build(name, path, microbatch_size)
    good = [i for i in range(B) if i != bad_row]
    expected, C = reference_update(model, x, y, good, B)
    compile_dp(model, C)

    update = ref.step_update(model, bad_x, bad_y)

    assert_finite(update)
    ref.assert_updates_close(update, expected)
    assert model._keras_dp.per_example_path[0] == path


@pytest.mark.parametrize("path", ["fast", "vmap"])
def test_bad_example_with_sample_weight_zero(path):
    """A zero-weight row contributes nothing even when its values are not
    finite (and is not counted: it is not a real example)."""
    x, y = make_data("mlp", seed=1)
    bad_x, bad_y = spoil(x, y, BAD, "target")
    bad_x[BAD - 1] = np.nan  # a second zero-weight row, with a NaN input
    weights = np.ones((B,), "float32")
    weights[[BAD - 1, BAD]] = 0.0
    model = build("mlp", path)
    good = [i for i in range(B) if i not in (BAD - 1, BAD)]
    expected, C = reference_update(model, x, y, good, B)
    compile_dp(model, C)

    before = [np.array(v.numpy(), "float64") for v in model.trainable_variables]
    logs = model.train_on_batch(bad_x, bad_y, sample_weight=weights, return_dict=True)
    update = [
        np.array(v.numpy(), "float64") - b
        for v, b in zip(model.trainable_variables, before)
    ]

    assert_finite(update)
    ref.assert_updates_close(update, expected)
    assert logs["nonfinite_examples"] == 0
    assert np.isfinite(logs["loss"])


@pytest.mark.parametrize("path", ["fast", "vmap"])
def test_count_is_logged_and_loss_stays_finite(path):
    """`nonfinite_examples` counts the real examples left out in the step;
    the logged loss leaves their non-finite losses out."""
    x, y = make_data("mlp", seed=2)
    bad_x, bad_y = spoil(x, y, BAD, "target")
    bad_x, bad_y = spoil(bad_x, bad_y, 1, "input")
    model = compile_dp(build("mlp", path), 1.0)
    losses = [
        float(ops.convert_to_numpy(loss_fn(y[i : i + 1], model(x[i : i + 1]), None)))
        for i in range(B)
    ]
    expected_loss = sum(loss for i, loss in enumerate(losses) if i not in (1, BAD)) / B

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fixed-size batches
        history = model.fit(
            bad_x, bad_y, batch_size=B, epochs=1, shuffle=False, verbose=0
        )

    assert history.history["nonfinite_examples"] == [2]
    assert history.history["loss"][0] == pytest.approx(expected_loss, rel=1e-5)
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())


def test_poisson_padding_rows_are_zeros_and_a_bad_example_0_stays_out():
    n, batch_size = 40, 4
    x, y = make_data("mlp", rows=n, seed=3)
    bad_x, bad_y = spoil(x, y, 0, "input")
    bad_y[0] = HUGE_TARGET
    sampler = data_lib.PoissonSampler(bad_x, bad_y, batch_size=batch_size, seed=0)
    # A step that example 0 is not sampled in, with padding rows.
    step = next(
        k
        for k in range(len(sampler))
        if 0 not in sampler.sample_indices(k)
        and 0 < len(sampler.sample_indices(k)) < sampler.padded_size
    )
    chosen = sampler.sample_indices(step)
    px, py, pw = sampler[step]
    count = len(chosen)
    np.testing.assert_array_equal(px[count:], 0.0)
    np.testing.assert_array_equal(py[count:], 0.0)
    np.testing.assert_array_equal(pw[count:], 0.0)
    np.testing.assert_array_equal(px[:count], bad_x[chosen])

    for path in ("fast", "vmap"):
        model = build("mlp", path)
        model._keras_dp.expected_batch_size = batch_size
        expected, C = reference_update(model, x, y, chosen, batch_size)
        compile_dp(model, C)
        update = ref.step_update(model, px, py, sample_weight=pw)
        assert_finite(update)
        ref.assert_updates_close(update, expected)


def test_weighted_sum_leaves_zero_factor_rows_out():
    g = np.array([[1.0, 2.0], [np.inf, 1.0], [np.nan, 0.0], [3.0, -1.0]], "float32")
    f = np.array([0.5, 0.0, 0.0, 2.0], "float32")
    total = clipping.weighted_sum(
        [ops.convert_to_tensor(g)], ops.convert_to_tensor(f), zero_rows=True
    )[0]
    np.testing.assert_array_equal(ops.convert_to_numpy(total), [6.5, -1.0])
    nonfinite = clipping.nonfinite_examples(
        [ops.convert_to_tensor(np.sum(g**2, axis=1))],
        ops.convert_to_tensor(np.array([1.0, 1.0, 1.0, np.inf], "float32")),
    )
    np.testing.assert_array_equal(
        ops.convert_to_numpy(nonfinite), [False, True, True, True]
    )
