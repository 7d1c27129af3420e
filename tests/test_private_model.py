"""`make_private` on real Keras models: model kinds, the Keras training API
(metrics, validation, evaluate/predict, sample and class weights, multiple
outputs), regularizers, random and stateful layers, and argument errors.

Updates are compared with the brute-force reference of `tests/reference.py`
(one autodiff call per example, no keras_dp) with `noise_multiplier=0` and
`DPSGD(learning_rate=1.0)`, so one step changes the weights by exactly
`-(1/B) sum_i c_i g_i - grad(weight regularization)`.
"""

import keras
import numpy as np
import pytest
from keras import ops

import keras_dp
import reference as ref
from keras_dp import per_example
from keras_dp.backend import get_backend_module
from reference import assert_updates_close
from reference import split_threshold
from reference import step_update

NUM_CLASSES = 3
FEATURES = 5
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
JIT = keras.backend.backend() == "jax"  # the faster choice per backend


def loss_fn(y, y_pred, sample_weight):
    return LOSS(y, y_pred, sample_weight=sample_weight)


def make_data(rows=8, seed=0):
    rng = np.random.default_rng(seed)
    scale = 0.3 + 2.0 * rng.random((rows, 1))
    x = (scale * rng.normal(size=(rows, FEATURES))).astype("float32")
    y = rng.integers(0, NUM_CLASSES, size=(rows,))
    return x, y


class SubclassedMLP(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(6, activation="tanh")
        self.logits = keras.layers.Dense(NUM_CLASSES)

    def call(self, inputs, training=False):
        return self.logits(self.hidden(inputs))


def mlp(kind="sequential", seed=1, **dense_kwargs):
    keras.utils.set_random_seed(seed)
    if kind == "sequential":
        return keras.Sequential(
            [
                keras.Input((FEATURES,)),
                keras.layers.Dense(6, activation="tanh", **dense_kwargs),
                keras.layers.Dense(NUM_CLASSES),
            ]
        )
    if kind == "functional":
        inputs = keras.Input((FEATURES,))
        h = keras.layers.Dense(6, activation="tanh", **dense_kwargs)(inputs)
        return keras.Model(inputs, keras.layers.Dense(NUM_CLASSES)(h))
    model = SubclassedMLP()
    model(np.zeros((1, FEATURES), "float32"))
    return model


def compile_dp(model, jit_compile=JIT, metrics=None, **dp_kwargs):
    dp_kwargs.setdefault("noise_multiplier", 0.0)
    model.compile(
        optimizer=keras_dp.DPSGD(learning_rate=1.0, **dp_kwargs),
        loss=LOSS,
        metrics=metrics,
        jit_compile=jit_compile,
    )
    return model


def flat_threshold(model, x, y, sample_weight=None, loss=loss_fn):
    """A C that clips some examples and not others; and their gradients."""
    grads = ref.per_example_gradients(model, x, y, loss, sample_weight)
    norms = ref.norms_of(grads)
    C = split_threshold(norms[norms > 0])
    assert np.any(norms > C) and np.any((norms < C) & (norms > 0))
    return C, grads


# ------------------------------------------------------------ model kinds


@pytest.mark.parametrize("kind", ["sequential", "functional", "subclassed"])
def test_make_private_returns_the_model_and_matches_reference(kind):
    x, y = make_data(seed=1)
    model = mlp(kind)
    assert not keras_dp.is_private(model)

    private = keras_dp.make_private(model)

    assert private is model
    assert keras_dp.is_private(model)
    C, grads = flat_threshold(model, x, y)
    expected = ref.expected_sgd_update(
        model, x, y, loss_fn, "flat", C, per_example=grads
    )
    update = step_update(compile_dp(model, l2_norm_clip=C), x, y)
    assert_updates_close(update, expected)


# ------------------------------------------------------ Keras training API


def test_fit_with_metrics_and_validation_then_evaluate_and_predict():
    x, y = make_data(rows=24, seed=2)
    x_val, y_val = make_data(rows=10, seed=3)
    model = keras_dp.make_private(mlp("functional"))
    model.compile(
        optimizer=keras_dp.DPSGD(
            learning_rate=0.2, noise_multiplier=0.5, l2_norm_clip=1.0, seed=0
        ),
        loss=LOSS,
        metrics=["accuracy"],
        jit_compile=JIT,
    )
    before = [np.array(w) for w in model.get_weights()]

    history = model.fit(
        x,
        y,
        batch_size=8,
        epochs=2,
        validation_data=(x_val, y_val),
        verbose=0,
    )

    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        assert len(history.history[key]) == 2
        assert np.all(np.isfinite(history.history[key]))
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    # Evaluation and prediction are Keras's own, at the trained weights.
    logits = model.predict(x_val, verbose=0)
    np.testing.assert_allclose(
        logits,
        ops.convert_to_numpy(model(x_val, training=False)),
        rtol=1e-5,
        atol=1e-6,
    )
    expected_loss = float(LOSS(y_val, logits))
    expected_accuracy = float(np.mean(np.argmax(logits, axis=1) == y_val))
    loss, accuracy = model.evaluate(x_val, y_val, verbose=0)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    np.testing.assert_allclose(accuracy, expected_accuracy)
    # The last epoch's validation ran at the final weights.
    np.testing.assert_allclose(
        history.history["val_loss"][-1], expected_loss, rtol=1e-5
    )
    np.testing.assert_allclose(history.history["val_accuracy"][-1], expected_accuracy)


# ------------------------------------------------------- sample weights


@pytest.mark.parametrize("microbatch_size", [None, 3])
def test_sample_weight_update_matches_reference(microbatch_size):
    x, y = make_data(seed=4)
    w = np.array([0.5, 2.0, 0.0, 1.0, 1.5, 0.0, 3.0, 1.0], "float32")
    model = keras_dp.make_private(mlp(), microbatch_size=microbatch_size)
    C, grads = flat_threshold(model, x, y, sample_weight=w)
    expected = ref.expected_sgd_update(
        model, x, y, loss_fn, "flat", C, sample_weight=w, per_example=grads
    )

    update = step_update(compile_dp(model, l2_norm_clip=C), x, y, sample_weight=w)

    assert_updates_close(update, expected)


def test_zero_weight_example_contributes_exactly_nothing():
    """A zero-weight row changes nothing but B (still the row count).

    The model has an activity regularizer, whose per-example loss does not
    depend on the sample weight: the zero-weight row must drop it too.
    """
    x, y = make_data(rows=6, seed=5)
    x[2] *= 50.0  # would dominate if it leaked in
    w = np.array([1.0, 0.5, 0.0, 2.0, 1.0, 1.0], "float32")
    keep = w != 0
    updates = []
    for xs, ys, ws in ((x, y, w), (x[keep], y[keep], w[keep])):
        model = keras_dp.make_private(
            mlp(activity_regularizer=keras.regularizers.L2(0.3))
        )
        compile_dp(model, l2_norm_clip=0.8)
        updates.append(step_update(model, xs, ys, sample_weight=ws))

    with_zero, dropped = updates
    # Same clipped sum: (1/6) * S for the 6-row batch, (1/5) * S without.
    assert_updates_close([6.0 * u for u in with_zero], [5.0 * u for u in dropped])


def test_class_weight_equals_sample_weight():
    x, y = make_data(seed=6)
    class_weight = {0: 0.5, 1: 2.0, 2: 1.5}
    w = np.array([class_weight[int(c)] for c in y], "float32")
    model = keras_dp.make_private(mlp())
    C, grads = flat_threshold(model, x, y, sample_weight=w)
    expected = ref.expected_sgd_update(
        model, x, y, loss_fn, "flat", C, sample_weight=w, per_example=grads
    )
    unweighted = ref.expected_sgd_update(model, x, y, loss_fn, "flat", C)

    update = step_update(
        compile_dp(model, l2_norm_clip=C), x, y, class_weight=class_weight
    )

    assert_updates_close(update, expected)
    # The weights matter here: ignoring them would give a different update.
    assert max(np.max(np.abs(a - b)) for a, b in zip(expected, unweighted)) > 1e-3


def test_class_weight_in_fit_with_fixed_batches_equals_sample_weight():
    x, y = make_data(rows=8, seed=7)
    class_weight = {0: 0.5, 1: 2.0, 2: 1.5}
    w = np.array([class_weight[int(c)] for c in y], "float32")
    weights = []
    for fit_kwargs in ({"class_weight": class_weight}, {"sample_weight": w}):
        model = keras_dp.make_private(mlp(), poisson_sampling=False)
        compile_dp(model, l2_norm_clip=0.5)
        with pytest.warns(UserWarning, match="fixed-size"):
            model.fit(
                x,
                y,
                batch_size=4,
                epochs=1,
                shuffle=False,
                verbose=0,
                **fit_kwargs,
            )
        weights.append(model.get_weights())
    for a, b in zip(*weights):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------- multiple outputs


def _two_output_model():
    keras.utils.set_random_seed(1)
    inputs = keras.Input((FEATURES,))
    h = keras.layers.Dense(4, activation="tanh")(inputs)
    outputs = {
        "label": keras.layers.Dense(NUM_CLASSES, name="label")(h),
        "value": keras.layers.Dense(1, name="value")(h),
    }
    return keras.Model(inputs, outputs)


MSE = keras.losses.MeanSquaredError()
LOSS_WEIGHTS = {"label": 0.7, "value": 2.0}


def _two_output_loss(y, y_pred, w):
    return LOSS_WEIGHTS["label"] * LOSS(
        y["label"], y_pred["label"], sample_weight=w
    ) + LOSS_WEIGHTS["value"] * MSE(y["value"], y_pred["value"], sample_weight=w)


def _two_output_data(rows=8, seed=8):
    x, labels = make_data(rows, seed)
    values = np.random.default_rng(seed).normal(size=(rows, 1)).astype("float32")
    return x, {"label": labels, "value": values}


def _compile_two_output(model, C):
    model.compile(
        optimizer=keras_dp.DPSGD(
            learning_rate=1.0, noise_multiplier=0.0, l2_norm_clip=C
        ),
        loss={"label": LOSS, "value": "mse"},
        loss_weights=LOSS_WEIGHTS,
        jit_compile=JIT,
    )


def test_multi_output_dict_losses_match_reference():
    x, y = _two_output_data()
    model = keras_dp.make_private(_two_output_model())
    C, grads = flat_threshold(model, x, y, loss=_two_output_loss)
    expected = ref.expected_sgd_update(
        model, x, y, _two_output_loss, "flat", C, per_example=grads
    )
    _compile_two_output(model, C)
    y_pred = model.predict(x, verbose=0)
    expected_loss = float(_two_output_loss(y, y_pred, None))
    before = [np.array(v.numpy(), "float64") for v in model.trainable_variables]

    logs = model.train_on_batch(x, y, return_dict=True)

    update = [
        np.array(v.numpy(), "float64") - b
        for v, b in zip(model.trainable_variables, before)
    ]
    assert_updates_close(update, expected)
    # The logged loss is the mean of the per-example weighted sums.
    np.testing.assert_allclose(logs["loss"], expected_loss, rtol=1e-5)


def test_multi_output_fit_matches_reference():
    """One fit step (fixed batch of all rows) equals the reference."""
    x, y = _two_output_data()
    model = keras_dp.make_private(_two_output_model(), poisson_sampling=False)
    C, grads = flat_threshold(model, x, y, loss=_two_output_loss)
    expected = ref.expected_sgd_update(
        model, x, y, _two_output_loss, "flat", C, per_example=grads
    )
    _compile_two_output(model, C)
    before = [np.array(v.numpy(), "float64") for v in model.trainable_variables]

    with pytest.warns(UserWarning, match="fixed-size"):
        history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)

    update = [
        np.array(v.numpy(), "float64") - b
        for v, b in zip(model.trainable_variables, before)
    ]
    assert_updates_close(update, expected)
    assert np.isfinite(history.history["loss"][0])


def test_multi_output_logs_per_output_losses():
    x, y = _two_output_data()
    model = keras_dp.make_private(_two_output_model())
    _compile_two_output(model, 1.0)
    y_pred = model.predict(x, verbose=0)
    expected = {
        "label_loss": float(LOSS(y["label"], y_pred["label"])),
        "value_loss": float(MSE(y["value"], y_pred["value"])),
    }

    logs = model.train_on_batch(x, y, return_dict=True)

    for key, value in expected.items():
        np.testing.assert_allclose(logs[key], value, rtol=1e-5, err_msg=key)


# --------------------------------------------------------- regularization


@pytest.mark.parametrize("l2", [0.01, 50.0])
def test_weight_regularizer_is_added_outside_the_clipped_sum(l2):
    """update = -(1/B) sum_i c_i g_i^data - grad(regularizer).

    With l2=50 the regularizer's gradient is far larger than C: were it
    inside the clipped part, the update's norm would be at most C.
    """
    x, y = make_data(seed=9)
    model = keras_dp.make_private(mlp(kernel_regularizer=keras.regularizers.L2(l2)))
    C, grads = flat_threshold(model, x, y)
    reference = ref.clipped_reference(
        model, x, y, loss_fn, "flat", C, per_example=grads
    )
    kernel = model.layers[0].kernel
    k = [id(v) for v in model.trainable_variables].index(id(kernel))
    # The reference's regularizer gradient is the closed form 2 * l2 * W.
    np.testing.assert_allclose(
        reference["regularization"][k],
        2.0 * l2 * np.asarray(kernel.numpy(), "float64"),
        rtol=1e-5,
    )

    update = step_update(compile_dp(model, l2_norm_clip=C), x, y)

    assert_updates_close(update, reference["update"])
    if l2 > 1:
        norm = np.sqrt(sum(np.sum(u**2) for u in update))
        assert norm > 10 * C


def test_activity_regularizer_is_inside_the_clip():
    """An activity regularizer is per example: part of g_i, so clipped.

    With a large one every example's gradient is far above C; the whole
    update (no weight regularizer) then has norm at most C.
    """
    x, y = make_data(seed=10)
    model = keras_dp.make_private(mlp(activity_regularizer=keras.regularizers.L2(20.0)))
    grads = ref.per_example_gradients(model, x, y, loss_fn)
    norms = ref.norms_of(grads)
    C = 0.5
    assert np.all(norms > 10 * C)
    expected = ref.expected_sgd_update(
        model, x, y, loss_fn, "flat", C, per_example=grads
    )

    update = step_update(compile_dp(model, l2_norm_clip=C), x, y)

    assert_updates_close(update, expected)
    assert np.sqrt(sum(np.sum(u**2) for u in update)) <= C * (1 + 1e-5)


# -------------------------------------------------- random and stateful


def _dropout_model():
    keras.utils.set_random_seed(1)
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.Dropout(0.5, seed=3),
            keras.layers.Dense(NUM_CLASSES),
        ]
    )


def _seed_states(model):
    return [
        np.array(v.numpy())
        for v in model.non_trainable_variables
        if "seed_generator" in v.path
    ]


def _compiled(fn):
    """`fn` traced once where eager per-op dispatch is slow (TensorFlow,
    JAX); PyTorch runs it eagerly, as its train step does."""
    if keras.backend.backend() == "jax":
        import jax

        return jax.jit(fn)
    if keras.backend.backend() == "torch":
        return fn
    import tensorflow as tf

    return tf.function(fn)


def test_dropout_draws_an_independent_mask_per_example():
    B = 6
    rng = np.random.default_rng(11)
    x = np.repeat(rng.normal(size=(1, 4)).astype("float32"), B, axis=0)
    y = np.zeros((B,), "int64")
    model = keras_dp.make_private(_dropout_model())
    compile_dp(model, l2_norm_clip=1e6)

    backend_ops = get_backend_module()
    grad_fn = backend_ops.value_and_grad(per_example.example_loss_fn(model))
    trainable = [ops.convert_to_tensor(v.value) for v in model.trainable_variables]
    non_trainable = [
        ops.convert_to_tensor(v.value) for v in model.non_trainable_variables
    ]
    examples = {
        "x": ops.convert_to_tensor(x),
        "y": ops.convert_to_tensor(y),
        "index": ops.arange(B, dtype="int32"),
    }

    def one(example):
        (_, _), grads = grad_fn(trainable, non_trainable, example)
        return grads

    def per_example_grads(examples):
        return ops.vectorized_map(one, examples)

    # The backend's changes that let its vectorized map run the model, as
    # the vmap path makes them (on PyTorch, keras.random ops as functions
    # of their per-example seed tensors).
    with backend_ops.vectorizable_layers(model):
        grads = _compiled(per_example_grads)(examples)
    kernel = ops.convert_to_numpy(grads[0]).reshape(B, -1)  # first Dense kernel
    for i in range(B):
        for j in range(i + 1, B):
            assert np.max(np.abs(kernel[i] - kernel[j])) > 1e-6, (i, j)


@pytest.mark.parametrize("path", ["auto", "vmap"])
def test_dropout_masks_differ_in_the_train_step(path):
    """Identical examples, all clipped to C: with one shared mask the
    clipped gradients would be identical and the mean would have norm C;
    with independent masks it is strictly shorter."""
    B = 6
    rng = np.random.default_rng(12)
    x = np.repeat(rng.normal(size=(1, 4)).astype("float32"), B, axis=0)
    y = np.zeros((B,), "int64")
    model = keras_dp.make_private(_dropout_model(), per_example=path)
    C = 1e-3  # below every gradient norm
    compile_dp(model, l2_norm_clip=C)

    update = step_update(model, x, y)

    norm = np.sqrt(sum(np.sum(u**2) for u in update))
    assert 0 < norm < 0.99 * C


@pytest.mark.parametrize(
    "path, microbatch_size", [("auto", None), ("vmap", None), ("vmap", 4)]
)
def test_dropout_seed_state_advances_like_non_private_training(path, microbatch_size):
    x, y = make_data(rows=6, seed=13)
    x = x[:, :4]
    model = keras_dp.make_private(
        _dropout_model(), microbatch_size=microbatch_size, per_example=path
    )
    compile_dp(model, l2_norm_clip=1.0)
    plain = _dropout_model()
    plain.compile(optimizer="sgd", loss=LOSS, jit_compile=JIT)
    for a, b in zip(plain.non_trainable_variables, model.non_trainable_variables):
        a.assign(b.numpy())
    initial = _seed_states(model)
    assert initial

    for _ in range(2):
        model.train_on_batch(x, y)
        plain.train_on_batch(x, y)

    after = _seed_states(model)
    assert any(not np.array_equal(a, b) for a, b in zip(initial, after))
    for a, b in zip(after, _seed_states(plain)):
        np.testing.assert_array_equal(a, b)


class CallCounter(keras.layers.Layer):
    """Counts its training calls in a non-trainable integer variable."""

    def build(self, input_shape):
        self.count = self.add_weight(
            shape=(),
            dtype="int32",
            initializer="zeros",
            trainable=False,
            name="count",
        )

    def call(self, inputs, training=None):
        if training:
            self.count.assign(self.count + 1)
        return inputs


@pytest.mark.parametrize(
    "path, microbatch_size", [("auto", None), ("vmap", None), ("vmap", 4)]
)
def test_non_trainable_counter_is_kept(path, microbatch_size):
    x, y = make_data(rows=6, seed=14)
    keras.utils.set_random_seed(1)
    counter = CallCounter()
    model = keras.Sequential(
        [keras.Input((FEATURES,)), counter, keras.layers.Dense(NUM_CLASSES)]
    )
    model = keras_dp.make_private(
        model, microbatch_size=microbatch_size, per_example=path
    )
    compile_dp(model, l2_norm_clip=1.0)
    steps = 3

    for _ in range(steps):
        model.train_on_batch(x, y)

    assert int(np.asarray(counter.count.numpy())) == steps


# ------------------------------------------------------------- batch size


def test_train_on_batch_divides_by_the_batch_row_count():
    model = keras_dp.make_private(mlp())
    compile_dp(model, l2_norm_clip=0.7)
    for rows, seed in ((5, 15), (8, 16)):
        x, y = make_data(rows=rows, seed=seed)
        expected = ref.expected_sgd_update(model, x, y, loss_fn, "flat", 0.7)
        update = step_update(model, x, y)
        assert_updates_close(update, expected)


def test_train_on_batch_after_poisson_fit_divides_by_the_batch_row_count():
    x, y = make_data(rows=12, seed=17)
    model = keras_dp.make_private(mlp())
    compile_dp(model, l2_norm_clip=0.7)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)  # expected B = 4
    xb, yb = make_data(rows=6, seed=18)
    expected = ref.expected_sgd_update(model, xb, yb, loss_fn, "flat", 0.7)

    update = step_update(model, xb, yb)

    assert_updates_close(update, expected)


# ----------------------------------------------------------------- errors


def test_batch_normalization_is_rejected():
    inner = keras.Sequential(
        [keras.Input((FEATURES,)), keras.layers.BatchNormalization()]
    )
    inputs = keras.Input((FEATURES,))
    outputs = keras.layers.Dense(NUM_CLASSES)(inner(inputs))
    for model in (
        keras.Sequential(
            [
                keras.Input((FEATURES,)),
                keras.layers.BatchNormalization(),
                keras.layers.Dense(NUM_CLASSES),
            ]
        ),
        keras.Model(inputs, outputs),  # nested inside a sub-model
    ):
        with pytest.raises(ValueError, match="GroupNormalization"):
            keras_dp.make_private(model)
        assert not keras_dp.is_private(model)


def test_model_overriding_train_step_is_rejected():
    class OwnStep(keras.Model):
        def train_step(self, data):
            return {}

    inputs = keras.Input((FEATURES,))
    model = OwnStep(inputs, keras.layers.Dense(1)(inputs))
    with pytest.raises(ValueError, match="train_step"):
        keras_dp.make_private(model)


@pytest.mark.parametrize("microbatch_size", [0, -2, "3", 2.0])
def test_invalid_microbatch_size_is_rejected(microbatch_size):
    with pytest.raises(ValueError, match="microbatch_size"):
        keras_dp.make_private(mlp(), microbatch_size=microbatch_size)


@pytest.mark.parametrize("not_a_model", [keras.layers.Dense(2), "model", lambda x: x])
def test_make_private_needs_a_keras_model(not_a_model):
    with pytest.raises(TypeError, match="keras.Model"):
        keras_dp.make_private(not_a_model)


def test_private_model_needs_a_dp_optimizer():
    x, y = make_data(seed=19)
    model = keras_dp.make_private(mlp())
    model.compile(optimizer=keras.optimizers.SGD(), loss=LOSS)
    with pytest.raises(TypeError, match="DP optimizer"):
        model.train_on_batch(x, y)


def test_dp_optimizer_needs_a_private_model():
    x, y = make_data(seed=20)
    model = mlp()
    compile_dp(model)
    with pytest.raises(RuntimeError, match="make_private"):
        model.train_on_batch(x, y)


def test_unsupported_backend_is_refused_with_a_clear_error(monkeypatch):
    monkeypatch.setattr(keras.backend, "backend", lambda: "numpy")
    with pytest.raises(
        NotImplementedError, match="'numpy' Keras backend.*tensorflow, jax, torch"
    ):
        get_backend_module()
