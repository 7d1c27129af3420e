"""Per-example rules registered with `keras_dp.register_per_example_rule`.

A layer keras_dp knows nothing about gets a rule from the test; a private
model using it must take the fast path through that rule, and one DP step
must equal a brute-force reference: per-example gradients by a Python loop
over the examples (`tf.GradientTape` / `jax.grad` / `torch.autograd.grad`,
no keras_dp), clipped and summed in numpy.
"""

import warnings

import keras
import numpy as np
import pytest
from keras import ops

import keras_dp
from keras_dp import backend as backend_lib
from keras_dp import per_example
from keras_dp.per_example import instantiated_terms
from keras_dp.per_example import registry

NUM_CLASSES = 3
B = 8
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
FALLBACK = "fast per-example path does not support"


class Scale(keras.layers.Layer):
    """`x * w + b`, elementwise over the last axis."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=input_shape[-1:], initializer="ones", name="w")
        self.b = self.add_weight(shape=input_shape[-1:], initializer="zeros", name="b")

    def call(self, x):
        return x * self.w + self.b


class Spy:
    """A rule that records the layers it was called for."""

    def __init__(self, rule):
        self.rule = rule
        self.layers = []
        self.__name__ = rule.__name__

    def __call__(self, layer, call, grads, context):
        self.layers.append(layer.name)
        return self.rule(layer, call, grads, context)


def scale_rule(layer, call, grads, context):
    """Per-example gradients of `x * w + b`: `dy * x` and `dy`, summed over
    any axes between the examples and the features."""
    x = ops.cast(call.inputs, "float32")
    dy = ops.cast(grads, "float32")
    middle = tuple(range(1, len(dy.shape) - 1))

    def per_example_sum(t):
        return ops.sum(t, axis=middle) if middle else t

    return [
        instantiated_terms(layer.w, per_example_sum(dy * x)),
        instantiated_terms(layer.b, per_example_sum(dy)),
    ]


def my_dense_rule(layer, call, grads, context):
    """Dense by instantiated per-example gradients `x_i^T dy_i` (2-D
    inputs), from the output before the activation."""
    x = ops.cast(call.inputs, "float32")
    dy = ops.cast(grads, "float32")
    terms = [instantiated_terms(layer.kernel, ops.einsum("nd,np->ndp", x, dy))]
    if layer.bias is not None:
        terms.append(instantiated_terms(layer.bias, dy))
    return terms


@pytest.fixture
def registered():
    """Registers a spied rule for a class for one test."""
    added = []

    def register(layer_class, rule, **kwargs):
        spy = Spy(rule)
        keras_dp.register_per_example_rule(layer_class, spy, **kwargs)
        added.append((layer_class, spy))
        return spy

    yield register
    for layer_class, spy in added:
        per_example.remove_per_example_rule(layer_class, spy)


def _model():
    keras.utils.set_random_seed(1)
    inputs = keras.Input((4,))
    h = keras.layers.Dense(5, activation="tanh", name="hidden")(inputs)
    h = Scale(name="scale")(h)
    outputs = keras.layers.Dense(NUM_CLASSES, name="head")(h)
    model = keras.Model(inputs, outputs)
    scale = model.get_layer("scale")
    rng = np.random.default_rng(3)
    for variable in scale.trainable_variables:
        variable.assign(rng.normal(size=variable.shape).astype("float32"))
    return model


def _data(rows=B, seed=0):
    rng = np.random.default_rng(seed)
    # Rows at different scales, so that clipping treats them differently.
    x = (rng.normal(size=(rows, 4)) * (0.3 + 2 * rng.random((rows, 1)))).astype(
        "float32"
    )
    y = rng.integers(0, NUM_CLASSES, size=(rows,))
    return x, y


def brute_force_gradients(model, x, y):
    """Each example's gradient, one autodiff call per example (no
    keras_dp): a list over examples of float64 arrays per variable."""
    out = []
    for i in range(len(x)):
        xi, yi = x[i : i + 1], y[i : i + 1]
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            with tf.GradientTape() as tape:
                loss = LOSS(yi, model(xi, training=True))
            grads = tape.gradient(loss, model.trainable_variables)
            grads = [
                ops.zeros(v.shape) if g is None else g
                for v, g in zip(model.trainable_variables, grads)
            ]
        elif keras.backend.backend() == "torch":
            import torch

            variables = model.trainable_variables
            with torch.enable_grad():
                loss = LOSS(yi, model(xi, training=True))
                grads = torch.autograd.grad(
                    loss, [v.value for v in variables], allow_unused=True
                )
            grads = [
                np.zeros(tuple(v.shape)) if g is None else ops.convert_to_numpy(g)
                for v, g in zip(variables, grads)
            ]
        else:
            import jax

            non_trainable = [v.value for v in model.non_trainable_variables]

            def loss_of(values):
                y_pred, _ = model.stateless_call(
                    values, non_trainable, xi, training=True
                )
                return LOSS(yi, y_pred)

            grads = jax.grad(loss_of)([v.value for v in model.trainable_variables])
        out.append(
            [np.asarray(ops.convert_to_numpy(g), dtype="float64") for g in grads]
        )
    return out


def reference_update(per_example_grads, C):
    """Weight change of one DPSGD(learning_rate=1, sigma=0) step with flat
    clipping at `C`: `-(1/B) sum_i c_i g_i`."""
    norms = np.array(
        [np.sqrt(sum(np.sum(g**2) for g in grads)) for grads in per_example_grads]
    )
    factors = np.minimum(1.0, C / (norms + 1e-6))
    assert np.any(factors < 1) and np.any(factors == 1)  # clipping matters
    n = len(per_example_grads)
    return [
        -sum(c * grads[k] for c, grads in zip(factors, per_example_grads)) / n
        for k in range(len(per_example_grads[0]))
    ]


def median_norm(per_example_grads):
    norms = sorted(
        float(np.sqrt(sum(np.sum(g**2) for g in grads))) for grads in per_example_grads
    )
    return (norms[len(norms) // 2 - 1] + norms[len(norms) // 2]) / 2


def _numpy(variable):
    return np.asarray(ops.convert_to_numpy(variable.value), dtype="float64")


def dp_step_update(model, x, y, C):
    model = keras_dp.make_private(model)
    model.compile(
        optimizer=keras_dp.DPSGD(
            learning_rate=1.0, noise_multiplier=0.0, l2_norm_clip=C
        ),
        loss=LOSS,
    )
    before = [_numpy(v) for v in model.trainable_variables]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.train_on_batch(x, y)
    fallbacks = [str(w.message) for w in caught if FALLBACK in str(w.message)]
    update = [_numpy(v) - b for v, b in zip(model.trainable_variables, before)]
    return model, update, fallbacks


def assert_updates_close(actual, expected):
    scale = max(float(np.max(np.abs(e))) for e in expected)
    assert scale > 0
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=0, atol=1e-5 * scale)


def test_registered_rule_takes_the_fast_path_in_fit(registered):
    spy = registered(Scale, scale_rule)
    model = _model()
    assert {e.layer.name: e.kind for e in per_example.build_plan(model)} == {
        "hidden": "dense",
        "scale": "scale_rule",
        "head": "dense",
    }
    model = keras_dp.make_private(model)
    model.compile(optimizer=keras_dp.DPSGD(learning_rate=0.1), loss=LOSS)
    x, y = _data(32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert not [w for w in caught if FALLBACK in str(w.message)]
    assert "scale" in spy.layers
    assert model._keras_dp.per_example_path == ("fast", None)
    assert np.isfinite(history.history["loss"][-1])


def assert_fast_step_matches_brute_force(model, spy, layers):
    """One DP step of `model` takes the fast path, calls `spy`'s rule for
    the layers named `layers` and equals the brute-force step."""
    x, y = _data()
    grads = brute_force_gradients(model, x, y)
    C = median_norm(grads)
    expected = reference_update(grads, C)

    model, update, fallbacks = dp_step_update(model, x, y, C)

    assert fallbacks == []
    assert set(spy.layers) == layers  # (TensorFlow may trace twice)
    assert model._keras_dp.per_example_path == ("fast", None)
    assert_updates_close(update, expected)


def test_registered_rule_step_matches_brute_force(registered):
    spy = registered(Scale, scale_rule)
    assert_fast_step_matches_brute_force(_model(), spy, {"scale"})


class Doubled(keras.layers.Layer):
    """`2 x`, with a trainable weight it does not use."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=input_shape[-1:], initializer="ones", name="w")

    def call(self, x):
        return 2.0 * x


def unused_weight_rule(layer, call, grads, context):
    return [instantiated_terms(layer.w, ops.zeros_like(ops.cast(grads, "float32")))]


def test_rule_of_a_layer_whose_output_depends_on_no_weight(registered):
    """A layer on the model's input whose output depends on no trainable
    value has no autograd history on PyTorch, where the other taps' output
    gradients come from their outputs' histories; its rule still gets its
    output gradients, and the step equals the brute-force one."""
    spy = registered(Doubled, unused_weight_rule)
    keras.utils.set_random_seed(1)
    inputs = keras.Input((4,))
    h = Doubled(name="doubled")(inputs)
    h = keras.layers.Dense(5, activation="tanh", name="hidden")(h)
    model = keras.Model(inputs, keras.layers.Dense(NUM_CLASSES, name="head")(h))
    assert_fast_step_matches_brute_force(model, spy, {"doubled"})


def test_user_rule_overrides_keras_dp_rule_for_the_same_class(registered):
    spy = registered(keras.layers.Dense, my_dense_rule, taps="pre_activation")
    registered(Scale, scale_rule)
    model = _model()
    assert {e.layer.name: e.kind for e in per_example.build_plan(model)} == {
        "hidden": "my_dense_rule",
        "scale": "scale_rule",
        "head": "my_dense_rule",
    }
    x, y = _data(seed=1)
    grads = brute_force_gradients(model, x, y)
    C = median_norm(grads)
    expected = reference_update(grads, C)

    model, update, fallbacks = dp_step_update(model, x, y, C)

    assert fallbacks == []
    assert set(spy.layers) == {"head", "hidden"}
    assert_updates_close(update, expected)


def test_removing_the_user_rule_restores_keras_dp_rule():
    keras_dp.register_per_example_rule(keras.layers.Dense, my_dense_rule)
    model = _model()
    try:
        assert per_example.build_plan(model)[0].kind == "my_dense_rule"
    finally:
        per_example.remove_per_example_rule(keras.layers.Dense, my_dense_rule)
    assert per_example.build_plan(model)[0].kind == "dense"
    with pytest.raises(ValueError, match="not registered"):
        per_example.remove_per_example_rule(keras.layers.Dense, my_dense_rule)


class _DoubledDense(keras.layers.Dense):
    """Overrides `call`: the Dense rule does not model it."""

    def call(self, inputs, training=None):
        return super().call(inputs) * 2.0


class _RenamedDense(keras.layers.Dense):
    """Keeps Dense's `call`: the Dense rule applies."""


def test_subclasses_get_a_rule_only_when_they_keep_its_call(registered):
    inputs = keras.Input((4,))
    h = _DoubledDense(3, name="doubled")(inputs)
    outputs = _RenamedDense(2, name="renamed")(h)
    model = keras.Model(inputs, outputs)
    kinds = {e.layer.name: e.kind for e in per_example.build_plan(model)}
    assert kinds == {"doubled": "generic", "renamed": "dense"}
    # A rule for the subclass itself is taken; `match="exact"` keeps it
    # from the subclass's own subclasses.
    registered(_DoubledDense, scale_rule, name="doubled_rule", match="exact")
    kinds = {e.layer.name: e.kind for e in per_example.build_plan(model)}
    assert kinds == {"doubled": "doubled_rule", "renamed": "dense"}


def test_rule_that_does_not_apply_falls_through_to_generic(registered):
    registered(Scale, scale_rule, applies=lambda layer: False)
    model = _model()
    kinds = {e.layer.name: e.kind for e in per_example.build_plan(model)}
    assert kinds["scale"] == "generic"


def test_rule_refusing_a_call_form_sends_the_model_to_the_vmap_path(registered):
    def refuse(layer, args, kwargs):
        raise per_example.Unsupported(f"{layer.name!r} refuses this call")

    registered(Scale, scale_rule, check_call=refuse)
    model = keras_dp.make_private(_model())
    model.compile(optimizer=keras_dp.DPSGD(learning_rate=0.1), loss=LOSS)
    x, y = _data(16)
    with pytest.warns(UserWarning, match=FALLBACK):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert model._keras_dp.per_example_path == ("vmap", "'scale' refuses this call")


def test_rule_missing_a_variable_is_reported(registered):
    def only_w(layer, call, grads, context):
        return scale_rule(layer, call, grads, context)[:1]

    registered(Scale, only_w)
    model = keras_dp.make_private(_model())
    model.compile(optimizer=keras_dp.DPSGD(learning_rate=0.1), loss=LOSS)
    x, y = _data(16)
    with pytest.warns(UserWarning, match=FALLBACK):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    path, reason = model._keras_dp.per_example_path
    assert path == "vmap"
    assert "returned no terms for" in reason and "scale/b" in reason


def test_registry_docstring_example_runs():
    """The example in `keras_dp.per_example.registry`'s docstring."""
    source = registry.__doc__.split("```python\n")[1].split("```")[0]
    namespace = {}
    exec(compile(source, "registry_docstring_example", "exec"), namespace)
    try:
        layer_class, rule = namespace["Scale"], namespace["scale_rule"]
        inputs = keras.Input((4,))
        outputs = keras.layers.Dense(2)(layer_class()(inputs))
        model = keras.Model(inputs, outputs)
        kinds = [e.kind for e in per_example.build_plan(model)]
        assert kinds == ["scale_rule", "dense"]
        x, y = _data(5)
        squared, clipped_fn, _, _, _ = per_example.per_example_norms_and_sums(
            _compiled(model),
            backend_lib.get_backend_module(),
            [v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables],
            ops.convert_to_tensor(x),
            ops.convert_to_tensor(y % 2),
        )
        assert len(squared) == 4
    finally:
        per_example.remove_per_example_rule(layer_class, rule)


def _compiled(model):
    model.compile(loss=LOSS)
    return model


@pytest.mark.parametrize(
    "layer_class, rule, kwargs, error, message",
    [
        (Scale(), scale_rule, {}, TypeError, "pass `MyLayer`, not an instance"),
        ("Scale", scale_rule, {}, TypeError, "must be a Keras layer class"),
        (int, scale_rule, {}, TypeError, "subclass of `keras.layers.Layer`"),
        (Scale, None, {}, TypeError, "`rule` must be a function"),
        (Scale, "scale_rule", {}, TypeError, "`rule` must be a function"),
        (Scale, lambda layer, call: [], {}, TypeError, "four arguments"),
        (Scale, scale_rule, {"taps": "input"}, ValueError, "`taps` must be one of"),
        (Scale, scale_rule, {"match": "any"}, ValueError, "`match` must be one of"),
        (
            Scale,
            scale_rule,
            {"applies": True},
            TypeError,
            "`applies` must be a function",
        ),
        (
            Scale,
            scale_rule,
            {"whole": True, "taps": "pre_activation"},
            ValueError,
            "pass taps='output'",
        ),
    ],
)
def test_registration_errors_say_what_to_do(layer_class, rule, kwargs, error, message):
    before = {cls: list(rules) for cls, rules in registry._RULES.items()}
    with pytest.raises(error, match=message):
        keras_dp.register_per_example_rule(layer_class, rule, **kwargs)
    assert {cls: list(rules) for cls, rules in registry._RULES.items()} == before
