"""Every function of `keras_dp.keras_compat` on real Keras objects.

Part of `make compat-test`, which runs it against the lowest Keras that
pyproject.toml allows and the pinned one: a Keras release that moves an
internal keras_dp reads fails here first.
"""

import inspect
import os
import pathlib
import re

import keras
import numpy as np
import pytest
from keras import ops
from packaging.version import Version

from keras_dp import keras_compat


def _model(dropout=0.0, regularized=False):
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(
        3,
        name="hidden",
        kernel_regularizer=keras.regularizers.L2(0.1) if regularized else None,
    )(inputs)
    if dropout:
        hidden = keras.layers.Dropout(dropout, name="drop")(hidden)
    outputs = keras.layers.Dense(2, name="head")(hidden)
    return keras.Model(inputs, outputs, name="net")


def _data(n=8):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 4)).astype("float32"), rng.normal(size=(n, 2)).astype(
        "float32"
    )


def test_runs_against_the_expected_keras():
    """`make compat-test` says which Keras each run must import
    (`KERAS_DP_EXPECT_KERAS`: a version, or "pinned" for
    requirements-dev.txt's)."""
    expected = os.environ.get("KERAS_DP_EXPECT_KERAS")
    if not expected:
        pytest.skip("not run by make compat-test")
    if expected == "pinned":
        requirements = pathlib.Path(__file__).parents[1] / "requirements-dev.txt"
        expected = re.search(
            r"^keras==(\S+)", requirements.read_text(), re.MULTILINE
        ).group(1)
    assert Version(keras.__version__) == Version(expected), keras.__file__


def test_every_public_function_is_tested_here():
    source = open(__file__).read()
    names = [
        name
        for name, value in vars(keras_compat).items()
        if inspect.isfunction(value)
        and not name.startswith("_")
        and value.__module__ == keras_compat.__name__
    ]
    untested = [name for name in names if f"keras_compat.{name}(" not in source]
    assert not untested, f"add a test for {untested}"


def test_every_function_names_the_keras_versions_it_was_checked_against():
    for name, value in vars(keras_compat).items():
        if inspect.isfunction(value) and not name.startswith("_"):
            doc = " ".join((value.__doc__ or "").split())
            assert "Checked: Keras 3." in doc, name


# Layers and models.


def test_flatten_layers_and_own_variables():
    model = _model()
    layers = keras_compat.flatten_layers(model, include_self=False)
    assert [layer.name for layer in layers if layer.weights] == ["hidden", "head"]
    assert keras_compat.flatten_layers(model)[0] is model
    outer = keras.Sequential([model])
    assert model in keras_compat.flatten_layers(outer, recursive=False)
    hidden = model.get_layer("hidden")
    assert hidden not in keras_compat.flatten_layers(outer, recursive=False)
    assert hidden in keras_compat.flatten_layers(outer)
    own = keras_compat.own_variables(hidden)
    assert [v.path for v in own] == [v.path for v in hidden.weights]
    assert keras_compat.own_variables(model) == []


def test_seed_generators_and_their_states():
    model = _model(dropout=0.5)
    drop = model.get_layer("drop")
    generators = keras_compat.seed_generators(drop)
    assert len(generators) == 1
    assert isinstance(generators[0], keras.random.SeedGenerator)
    assert keras_compat.seed_generators(model.get_layer("head")) == []
    states = keras_compat.seed_generator_states(model)
    assert [id(s) for s in states] == [id(generators[0].state)]
    assert any(s is states[0] for s in model.non_trainable_variables)


def test_call_has_training_arg():
    class Plain(keras.layers.Layer):
        def call(self, inputs):
            return inputs

    assert keras_compat.call_has_training_arg(keras.layers.Dropout(0.1))
    assert not keras_compat.call_has_training_arg(Plain())


def test_build_input_shapes():
    rnn = keras.layers.SimpleRNN(2)
    assert keras_compat.build_input_shapes(rnn) == {}
    rnn(np.zeros((1, 5, 3), "float32"))
    shapes = list(keras_compat.build_input_shapes(rnn).values())
    assert tuple(shapes[0])[1:] == (5, 3)


def test_lora_base_kernel():
    layer = keras.layers.Dense(3)
    layer.build((None, 4))
    base = layer.kernel
    layer.enable_lora(2)
    assert keras_compat.lora_base_kernel(layer) is base
    assert not keras_compat.lora_base_kernel(layer).trainable


def test_base_conv_call():
    call = keras_compat.base_conv_call()
    assert keras.layers.Conv2D.call is call

    class Custom(keras.layers.Conv2D):
        def call(self, inputs):
            return super().call(inputs)

    assert Custom.call is not call


def test_is_functional():
    assert keras_compat.is_functional(_model())
    assert not keras_compat.is_functional(
        keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    )


def test_add_clone_hook_sees_every_cloned_layer():
    seen = []

    def hook(layer, clone):
        seen.append((layer.name, clone.name))

    keras_compat.add_clone_hook(hook)
    keras_compat.add_clone_hook(hook)  # once per hook
    model = _model()
    keras.models.clone_model(model)
    names = [name for name, _ in seen]
    assert names.count("hidden") == 1 and names.count("head") == 1


def test_override_and_restore_attribute():
    layer = keras.layers.Dense(2)
    layer.build((None, 3))
    x = np.ones((1, 3), "float32")
    calls = []
    original = layer.call

    def recording(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    saved = keras_compat.override_attribute(layer, "call", recording)
    layer(x)
    keras_compat.restore_attribute(layer, "call", saved)
    layer(x)
    assert calls == [1]
    assert "call" not in vars(layer)
    saved = keras_compat.override_attribute(layer, "call", recording)
    keras_compat.override_attribute(layer, "call", original)  # nested
    keras_compat.restore_attribute(layer, "call", saved)
    assert "call" not in vars(layer)


def test_backend_random_module_is_what_keras_random_calls():
    module = keras_compat.backend_random_module()
    calls = []
    original = module.dropout

    def recording(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    module.dropout = recording
    try:
        keras.layers.Dropout(0.5, seed=1)(np.ones((2, 3), "float32"), training=True)
    finally:
        module.dropout = original
    assert calls == [1]


def test_backend_nn_module_is_what_keras_ops_call():
    module = keras_compat.backend_nn_module()
    original = module.one_hot
    calls = []

    def recording(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    module.one_hot = recording
    try:
        keras.ops.one_hot(np.array([0, 1]), 2)
    finally:
        module.one_hot = original
    assert calls == [1]


def test_without_channels_last_copies_lets_vectorized_map_run_convolutions():
    layer = keras.layers.Conv2D(2, 3)
    layer.build((None, 5, 5, 3))
    x = np.random.default_rng(0).standard_normal((4, 5, 5, 3)).astype("float32")

    def one(example):
        return layer(keras.ops.expand_dims(example, 0))[0]

    with keras_compat.without_channels_last_copies():
        mapped = keras.ops.vectorized_map(one, keras.ops.convert_to_tensor(x))
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(mapped),
        keras.ops.convert_to_numpy(layer(x)),
        rtol=1e-5,
        atol=1e-5,
    )


# Losses.


def test_compute_loss_losses_override_and_regularization():
    model = _model(regularized=True)
    model.compile(loss="mse")
    x, y = _data()
    y_pred = model(x)
    plain = ops.convert_to_numpy(keras_compat.compute_loss(model, x, y, y_pred, None))
    mse = np.mean((ops.convert_to_numpy(y_pred) - y) ** 2)
    regularization = keras_compat.regularization_losses(model)
    assert len(regularization) == 1
    added = ops.convert_to_numpy(
        keras_compat.aggregate_additional_loss(model, regularization[0])
    )
    np.testing.assert_allclose(plain, mse + added, rtol=1e-5)
    with keras_compat.losses_override(model, [ops.convert_to_tensor(1.0)]):
        overridden = keras_compat.compute_loss(model, x, y, y_pred, None)
    np.testing.assert_allclose(ops.convert_to_numpy(overridden), mse + 1, rtol=1e-5)
    again = keras_compat.compute_loss(model, x, y, y_pred, None)
    np.testing.assert_allclose(ops.convert_to_numpy(again), plain, rtol=1e-6)


def test_compute_loss_of_an_override_without_training_argument():
    class Old(keras.Model):
        def compute_loss(self, x, y, y_pred, sample_weight):
            return ops.sum(y_pred) * 0.0 + 7.0

    inputs = keras.Input((4,))
    model = Old(inputs, keras.layers.Dense(1)(inputs))
    model.compile(loss="mse")
    assert not keras_compat.has_default_compute_loss(model)
    assert keras_compat.has_default_compute_loss(_model())
    x, _ = _data()
    loss = keras_compat.compute_loss(model, x, None, model(x), None)
    assert float(ops.convert_to_numpy(loss)) == 7.0


def _built_compile_loss(model, loss):
    model.compile(loss=loss, metrics=["mae"])
    x, y = _data()
    model.fit(x, y, epochs=1, verbose=0)  # builds the compiled loss
    return keras_compat.compile_loss(model), x, y


def test_compiled_loss_parts():
    assert keras_compat.compile_loss(_model()) is None
    compiled, _, _ = _built_compile_loss(_model(), "mse")
    ((path, loss, weight, _),) = keras_compat.flat_losses(compiled)
    assert keras_compat.is_loss_function_wrapper(loss)
    assert keras_compat.builtin_loss_name(loss.fn) == "mean_squared_error"
    assert keras_compat.builtin_loss_name(lambda a, b: a) is None
    assert keras_compat.loss_function_kwargs(loss) == {}

    class Custom(keras.losses.Loss):
        def call(self, y_true, y_pred):
            return y_pred

    assert not keras_compat.is_loss_function_wrapper(Custom())
    huber = keras.losses.Huber(delta=2.0)
    assert keras_compat.loss_function_kwargs(huber) == {"delta": 2.0}


def test_loss_trackers_get_and_set():
    inputs = keras.Input((4,))
    outputs = [
        keras.layers.Dense(2, name="a")(inputs),
        keras.layers.Dense(2, name="b")(inputs),
    ]
    model = keras.Model(inputs, outputs)
    model.compile(loss=["mse", "mse"])
    x, y = _data()
    model.fit(x, [y, y], epochs=1, verbose=0)
    compiled = keras_compat.compile_loss(model)
    assert keras_compat.loss_with_output_trackers(model) is compiled
    # One output: no per-output trackers; before compile: no loss at all.
    single = _model()
    assert _built_compile_loss(single, "mse")[0] is not None
    assert keras_compat.loss_with_output_trackers(single) is None
    assert keras_compat.loss_with_output_trackers(_model()) is None
    trackers = keras_compat.loss_trackers(compiled)
    assert len(trackers) == 2
    counts = [float(ops.convert_to_numpy(t.count)) for t in trackers]
    keras_compat.set_loss_trackers(compiled, [None, None])
    compiled([y, y], model(x))
    keras_compat.set_loss_trackers(compiled, trackers)
    assert [float(ops.convert_to_numpy(t.count)) for t in trackers] == counts
    compiled([y, y], model(x))
    assert [float(ops.convert_to_numpy(t.count)) for t in trackers] != counts


def test_reduce_weighted_values():
    values = ops.convert_to_tensor(np.array([1.0, 3.0], "float32"))
    weights = ops.convert_to_tensor(np.array([1.0, 0.5], "float32"))
    reduced = keras_compat.reduce_weighted_values(
        values, sample_weight=weights, reduction="none", dtype="float32"
    )
    np.testing.assert_allclose(ops.convert_to_numpy(reduced), [1.0, 1.5])
    total = keras_compat.reduce_weighted_values(
        values, sample_weight=weights, reduction="sum", dtype="float32"
    )
    np.testing.assert_allclose(ops.convert_to_numpy(total), 2.5)


def test_keras_mask_get_and_set():
    embedded = keras.layers.Embedding(5, 2, mask_zero=True)(
        ops.convert_to_tensor(np.array([[1, 0]]))
    )
    mask = keras_compat.keras_mask(embedded)
    np.testing.assert_array_equal(ops.convert_to_numpy(mask), [[True, False]])
    other = ops.ones((1, 2))
    assert keras_compat.keras_mask(other) is None
    keras_compat.set_keras_mask(other, mask)
    assert keras_compat.keras_mask(other) is mask
    keras_compat.set_keras_mask(other, None)
    assert keras_compat.keras_mask(other) is None


# Metrics and trainers.


def test_loss_tracker_and_compiled_metrics():
    model = _model()
    assert keras_compat.compile_metrics(model) is None
    _built_compile_loss(model, "mse")
    tracker = keras_compat.loss_tracker(model)
    assert isinstance(tracker, keras.metrics.Mean)
    metrics = keras_compat.compile_metrics(model)
    flat = keras_compat.flat_metrics(metrics)
    assert [[m.name for m in per_output.metrics] for per_output in flat] == [["mae"]]
    keras_compat.set_flat_metrics(metrics, [None])
    assert keras_compat.flat_metrics(metrics) == [None]
    keras_compat.set_flat_metrics(metrics, flat)


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="JAX trainer")
def test_update_metrics_variables():
    model = _model()
    _built_compile_loss(model, "mse")
    x, y = _data()
    values = [v.value for v in model.metrics_variables]
    logs, new = keras_compat.update_metrics_variables(
        model, values, ops.convert_to_tensor(2.0), x, y, model(x), None
    )
    assert "loss" in logs and len(new) == len(values)


def test_live_optimizer_variables_during_fit():
    model = _model()
    model.compile(optimizer="sgd", loss="mse")
    seen = []

    class Probe(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            # `self.model` would sync the JAX state first.
            seen.append(keras_compat.live_optimizer_variables(model))

    x, y = _data()
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[Probe()])
    assert keras_compat.live_optimizer_variables(model) is None
    if keras.backend.backend() == "jax":
        assert seen and all(len(v) == len(model.optimizer.variables) for v in seen)
    else:
        assert seen == [None, None]


# Optimizers.


def test_optimizer_iterations_counts_micro_steps():
    model = _model()
    model.compile(
        optimizer=keras.optimizers.SGD(gradient_accumulation_steps=2),
        loss="mse",
    )
    x, y = _data()
    model.fit(x, y, batch_size=2, epochs=1, verbose=0)
    variable = keras_compat.optimizer_iterations(model.optimizer)
    assert int(ops.convert_to_numpy(variable)) == 4
    assert int(ops.convert_to_numpy(model.optimizer.iterations)) == 2


def test_backend_optimizer_class_is_the_class_keras_instantiates():
    for cls in (keras.optimizers.SGD, keras.optimizers.Adam, keras.optimizers.Lamb):
        found = keras_compat.backend_optimizer_class(cls)
        assert found is type(cls())
        assert issubclass(found, cls)


def test_track_variable():
    optimizer = keras.optimizers.SGD()
    optimizer.build([keras.Variable(np.zeros(2, "float32"))])
    extra = keras.Variable(np.zeros(3, "float32"), name="extra")
    keras_compat.track_variable(optimizer, extra)
    assert any(v is extra for v in optimizer.variables)


# Data, printing, seeds.


def test_data_helpers():
    x, y = _data()
    assert keras_compat.can_convert_arrays((x, y))
    assert not keras_compat.can_convert_arrays((iter([x]),))
    assert not keras_compat.is_tf_dataset(x)
    train, validation = keras_compat.train_validation_split((x, y), 0.25)
    assert len(train[0]) == 6 and len(validation[0]) == 2
    np.testing.assert_array_equal(validation[0], x[6:])


def test_is_tf_dataset_on_a_dataset():
    tf = pytest.importorskip("tensorflow")
    assert keras_compat.is_tf_dataset(tf.data.Dataset.range(3))


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TF trainer")
def test_in_strategy_scope():
    import tensorflow as tf

    assert not keras_compat.in_strategy_scope()
    with tf.distribute.OneDeviceStrategy("/cpu:0").scope():
        assert keras_compat.in_strategy_scope()


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TF trainer")
def test_distributed_fit_mends_the_trainer_and_restores_it():
    """Inside, the model is built from this worker's own first batch and
    scalar logs are averaged without an axis (`tests/test_multiworker.py`
    trains under the real strategy); outside, Keras's own code is back."""
    import tensorflow as tf
    from keras.src.backend.tensorflow import trainer as tf_trainer

    model = keras.Sequential([keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse")
    strategy = tf.distribute.get_strategy()
    reduce_logs = tf_trainer.reduce_per_replica
    x, y = _data()
    with keras_compat.distributed_fit(model, strategy):
        assert tf_trainer.reduce_per_replica is not reduce_logs
        logs = tf_trainer.reduce_per_replica(
            {"loss": tf.constant(2.0), "rows": tf.ones((3,))}, strategy, "auto"
        )
        assert float(logs["loss"]) == 2.0 and logs["rows"].shape == (3,)
        batches = iter([(tf.constant(x), tf.constant(y))])
        model._maybe_symbolic_build(iterator=[(0, 0, batches)])
        assert model.built and len(model.weights) == 2
    assert tf_trainer.reduce_per_replica is reduce_logs
    assert "_maybe_symbolic_build" not in vars(model)


def test_print_msg(capsys):
    keras_compat.print_msg("keras_dp says hello")
    assert "keras_dp says hello" in capsys.readouterr().out


def test_random_seed_dtype_is_accepted_by_keras_random():
    dtype = keras_compat.random_seed_dtype()
    seed = ops.cast(ops.convert_to_tensor([3, 4]), dtype)

    class Fixed(keras.random.SeedGenerator):
        def __init__(self, value):
            self.value = value

        def next(self, ordered=True):
            return self.value

    draw = keras.random.normal((2,), seed=Fixed(seed))
    assert tuple(draw.shape) == (2,)
