"""Models whose examples are not independent are refused: layers that mix
examples in training mode, and layers that write data-dependent
non-trainable state in `call`; ordinary models pass.

Each refusal is tested on `check_examples_independent` directly and through
`fit` of a private model (where, before the check existed, these models
trained silently). The last test shows the property the check protects:
with no noise, one example moves the update by at most `lr * C / B`.
"""

import warnings

import keras
import numpy as np
import pytest
from keras import ops

import keras_dp

FEATURES = 5
NUM_CLASSES = 3
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def check_examples_independent(model, x, y=None):
    # Imported here so that the `fit` tests also run (and fail) on a
    # keras_dp without the module.
    from keras_dp.example_independence import check_examples_independent

    check_examples_independent(model, x, y)


def make_data(rows=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, FEATURES)).astype("float32")
    y = rng.integers(0, NUM_CLASSES, size=(rows,))
    return x, y


def sequential(*layers, batch_size=None):
    return keras.Sequential(
        [keras.Input((FEATURES,), batch_size=batch_size), *layers]
        + [keras.layers.Dense(NUM_CLASSES)]
    )


def centre(t):
    return t - ops.mean(t, axis=0, keepdims=True)


# ------------------------------------------------------------ mixing layers


class BatchMaxScale(keras.layers.Layer):
    """Scales by the largest activation of the whole batch."""

    def call(self, inputs):
        return inputs / (ops.max(ops.abs(inputs)) + 1e-3)


class BatchAttention(keras.layers.Layer):
    """Each example attends to every example of the batch."""

    def call(self, inputs):
        scores = ops.matmul(inputs, ops.transpose(inputs))
        return ops.matmul(ops.softmax(scores, axis=-1), inputs)


class CentreThenDense(keras.layers.Layer):
    """A container whose own code mixes before its (innocent) sublayer."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(4, name="innocent_dense")

    def call(self, inputs):
        return self.dense(centre(inputs))


class CentredModel(keras.Model):
    """A subclassed model whose own `call` subtracts the batch mean."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(NUM_CLASSES)

    def call(self, inputs):
        return self.dense(centre(inputs))


def nested_model():
    inner = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(6, activation="tanh"),
            keras.layers.Lambda(centre, name="inner_centre"),
        ],
        name="inner",
    )
    inputs = keras.Input((FEATURES,))
    hidden = inner(keras.layers.Dense(6)(inputs))
    outputs = keras.layers.Dense(NUM_CLASSES)(hidden)
    return keras.Model(inputs, outputs)


def functional_op_model():
    inputs = keras.Input((FEATURES,))
    centred = inputs - ops.mean(inputs, axis=0, keepdims=True)
    return keras.Model(inputs, keras.layers.Dense(NUM_CLASSES)(centred))


# The axes of the "layer_norm_axis0" cases: the batch axis. Keras's PyTorch
# LayerNormalization calls `torch.nn.functional.layer_norm`, which
# normalizes trailing axes only, so axis=0 raises inside Keras there;
# axes (0, 1) of these 2-D inputs are trailing and include the batch axis.
OVER_THE_BATCH_AXES = [0, 1] if keras.backend.backend() == "torch" else 0

MIXING = {
    "layer_norm_axis0": (
        lambda: sequential(
            keras.layers.Dense(6),
            keras.layers.LayerNormalization(
                axis=OVER_THE_BATCH_AXES, center=False, scale=False, name="norm_axis0"
            ),
        ),
        r"Layer 'norm_axis0' \(LayerNormalization\) mixes.*feature axis",
    ),
    "layer_norm_axis0_fixed_batch": (
        lambda: sequential(
            keras.layers.LayerNormalization(
                axis=OVER_THE_BATCH_AXES, name="norm_axis0"
            ),
            batch_size=8,
        ),
        r"'norm_axis0'.*feature axis",
    ),
    "lambda_centre": (
        lambda: sequential(
            keras.layers.Dense(6), keras.layers.Lambda(centre, name="centre")
        ),
        r"Layer 'centre' \(Lambda\) mixes.*axis 0",
    ),
    "batch_max": (
        lambda: sequential(BatchMaxScale(name="max_scale")),
        r"Layer 'max_scale' \(BatchMaxScale\) mixes",
    ),
    "batch_attention": (
        lambda: sequential(
            keras.layers.Dense(6), BatchAttention(name="batch_attention")
        ),
        r"Layer 'batch_attention' \(BatchAttention\) mixes",
    ),
    "container_layer": (
        lambda: sequential(CentreThenDense(name="centre_then_dense")),
        r"Layer 'centre_then_dense' \(CentreThenDense\) mixes",
    ),
    "subclassed_model": (
        lambda: CentredModel(name="centred_model"),
        r"model 'centred_model' \(CentredModel\) mixes",
    ),
    "nested_in_sequential_in_functional": (
        nested_model,
        r"Layer 'inner_centre' \(Lambda\) mixes",
    ),
    "functional_op": (functional_op_model, r"Operation '\w+' \(Mean\) mixes"),
}


@pytest.mark.parametrize("case", list(MIXING))
def test_mixing_model_is_refused_naming_the_layer(case):
    build, message = MIXING[case]
    x, y = make_data(seed=1)
    model = build()
    with pytest.raises(ValueError, match=message):
        check_examples_independent(model, x[:4], y[:4])


@pytest.mark.parametrize(
    "case", ["layer_norm_axis0", "lambda_centre", "batch_attention"]
)
def test_mixing_is_found_from_a_single_example(case):
    build, message = MIXING[case]
    x, _ = make_data(rows=1, seed=2)
    with pytest.raises(ValueError, match=message):
        check_examples_independent(build(), x)


def compile_dp(model, **dp_kwargs):
    dp_kwargs.setdefault("noise_multiplier", 0.0)
    dp_kwargs.setdefault("l2_norm_clip", 1.0)
    model.compile(
        optimizer=keras_dp.DPSGD(learning_rate=0.1, seed=1, **dp_kwargs),
        loss=LOSS,
    )
    return model


def fit_private(model, x, y, batch_size=8, **kwargs):
    model = compile_dp(keras_dp.make_private(model, **kwargs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(x, y, batch_size=batch_size, epochs=1, verbose=0)
    return model


@pytest.mark.parametrize("case", list(MIXING))
def test_fit_refuses_a_mixing_model(case):
    build, message = MIXING[case]
    x, y = make_data(rows=16, seed=3)
    with pytest.raises(ValueError, match=message):
        fit_private(build(), x, y)


def test_train_on_batch_refuses_a_mixing_model():
    build, message = MIXING["lambda_centre"]
    x, y = make_data(seed=4)
    model = compile_dp(keras_dp.make_private(build()))
    with pytest.raises(ValueError, match=message):
        model.train_on_batch(x, y)


# ------------------------------------------------ non-trainable state in call


class RunningMean(keras.layers.Layer):
    """Keeps a running mean of its inputs (released without noise)."""

    def build(self, input_shape):
        self.moving = self.add_weight(
            shape=input_shape[1:],
            initializer="zeros",
            trainable=False,
            name="moving",
        )

    def call(self, inputs, training=None):
        if training:
            self.moving.assign(0.9 * self.moving + 0.1 * ops.mean(inputs, 0))
        return inputs


class LastExample(keras.layers.Layer):
    """Stores the first example of each batch."""

    def build(self, input_shape):
        self.last = self.add_weight(
            shape=input_shape[1:],
            initializer="zeros",
            trainable=False,
            name="last",
        )

    def call(self, inputs, training=None):
        if training:
            self.last.assign(inputs[0])
        return inputs


class CallCounter(keras.layers.Layer):
    """Counts training calls: state written in call, but no data in it."""

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


def stateful_rnn():
    return keras.Sequential(
        [
            keras.Input(batch_shape=(8, 3, FEATURES)),
            keras.layers.LSTM(4, stateful=True, name="stateful_lstm"),
            keras.layers.Dense(NUM_CLASSES),
        ]
    )


STATEFUL = {
    "running_mean": (
        lambda: sequential(RunningMean(name="running_mean")),
        r"Layer 'running_mean' \(RunningMean\) writes the non-trainable "
        r"variable '[\w/]*running_mean/moving'.*non-persistent",
    ),
    "state_from_example_0_only": (
        lambda: sequential(keras.layers.Dense(4), LastExample(name="keeper")),
        r"Layer 'keeper' \(LastExample\) writes .*'[\w/]*keeper/last'",
    ),
    "stateful_rnn": (
        stateful_rnn,
        r"Layer 'stateful_lstm' \(LSTM\) is stateful.*stateful=False",
    ),
}


def data_for(model, rows, seed):
    x, y = make_data(rows, seed)
    if len(model.inputs[0].shape) == 3:  # the RNN: sequences of 3 steps
        x = np.stack([x, 2 * x, -x], axis=1)
    return x, y


@pytest.mark.parametrize("case", list(STATEFUL))
def test_data_dependent_state_is_refused_naming_layer_and_variable(case):
    build, message = STATEFUL[case]
    model = build()
    x, y = data_for(model, 8, seed=5)
    with pytest.raises(ValueError, match=message):
        check_examples_independent(model, x, y)


@pytest.mark.parametrize("case", list(STATEFUL))
def test_fit_refuses_data_dependent_state(case):
    build, message = STATEFUL[case]
    model = build()
    x, y = data_for(model, 16, seed=6)
    with pytest.raises(ValueError, match=message):
        fit_private(model, x, y)


# ---------------------------------------------------------- ordinary models


def _values(model):
    values = [v.value for v in model.variables]
    return [np.array(keras.ops.convert_to_numpy(t)) for t in values]


def mlp_with_dropout():
    return sequential(
        keras.layers.Dense(8, activation="relu"),
        keras.layers.Dropout(0.5),
        CallCounter(),
        keras.layers.LayerNormalization(),
        keras.layers.Dense(8),
        keras.layers.GaussianNoise(0.1),
    )


def conv_model():
    return keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(4, 3, padding="same"),
            keras.layers.GroupNormalization(groups=2),
            keras.layers.SpatialDropout2D(0.3),
            keras.layers.Conv2D(4, 3, strides=2),
            keras.layers.LayerNormalization(axis=(1, 2, 3)),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(NUM_CLASSES),
        ]
    )


def sequence_model():
    """Masked embeddings (mask_zero), recurrent layers with dropout, and
    causal multi-head self-attention with dropout."""
    tokens = keras.Input((7,), dtype="int32")
    h = keras.layers.Embedding(20, 6, mask_zero=True)(tokens)
    h = keras.layers.LSTM(6, return_sequences=True, dropout=0.2)(h)
    gru = keras.layers.GRU(4, return_sequences=True)
    h = keras.layers.Bidirectional(gru)(h)
    attended = keras.layers.MultiHeadAttention(2, 4, dropout=0.1)(
        h, h, use_causal_mask=True
    )
    h = keras.layers.LayerNormalization()(h + attended)
    pooled = keras.layers.GlobalAveragePooling1D()(h)
    return keras.Model(tokens, keras.layers.Dense(NUM_CLASSES)(pooled))


def tokens(rows, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(1, 20, size=(rows, 7))
    x[1:, 5:] = 0  # padding (masked by mask_zero)
    return x


class PlainSubclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(6, activation="tanh")
        self.dropout = keras.layers.Dropout(0.3)
        self.logits = keras.layers.Dense(NUM_CLASSES)

    def call(self, inputs, training=False):
        hidden = self.dropout(self.hidden(inputs), training=training)
        return self.logits(hidden)


ORDINARY = {
    "mlp_dropout_noise_counter": (mlp_with_dropout, lambda: make_data(4)[0]),
    "single_example": (mlp_with_dropout, lambda: make_data(1)[0]),
    "conv_group_norm": (
        conv_model,
        lambda: np.random.default_rng(7).normal(size=(3, 6, 6, 2)),
    ),
    "embedding_rnn_attention": (sequence_model, lambda: tokens(4, 8)),
    "subclassed": (PlainSubclassed, lambda: make_data(2)[0]),
    "fixed_batch_size": (
        lambda: sequential(keras.layers.Dense(4), batch_size=3),
        lambda: make_data(3)[0],
    ),
}


@pytest.mark.parametrize("case", list(ORDINARY))
def test_ordinary_model_is_accepted_and_left_unchanged(case):
    build, data = ORDINARY[case]
    model = build()
    x = data()
    if not model.built:
        model(x)  # inference mode: no state written
    before = _values(model)
    check_examples_independent(model, x)
    for a, b in zip(before, _values(model)):
        np.testing.assert_array_equal(a, b)  # seed states and counter too


class NumpyNoise(keras.layers.Layer):
    """Random noise that no keras SeedGenerator drives."""

    def call(self, inputs):
        noise = np.random.default_rng().normal(size=())
        return inputs + noise.astype("float32")


def test_irreproducible_output_warns_instead_of_refusing():
    # JAX traces the noise once, as a constant; TensorFlow and PyTorch run
    # it eagerly.
    x, _ = make_data(4, seed=13)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_examples_independent(sequential(NumpyNoise()), x)
    messages = [str(w.message) for w in caught if "keras_dp" in str(w.message)]
    if keras.backend.backend() != "jax":
        assert messages and "not reproducible" in messages[0]


def test_an_unbuilt_model_is_built_and_accepted():
    model = PlainSubclassed()
    check_examples_independent(model, make_data(2)[0])
    assert model.built


def test_keras_hub_bert_classifier_is_accepted():
    keras_hub = pytest.importorskip("keras_hub")
    rng = np.random.default_rng(10)
    mask = np.array([[1] * 6, [1] * 4 + [0] * 2, [1] * 3 + [0] * 3], "int32")
    x = {
        "token_ids": rng.integers(1, 30, size=(3, 6)) * mask,
        "segment_ids": np.zeros((3, 6), "int32"),
        "padding_mask": mask,
    }
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=30,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=6,
    )
    check_examples_independent(
        keras_hub.models.BertTextClassifier(backbone, 2, preprocessor=None), x
    )


def test_fit_accepts_an_ordinary_model_with_dropout():
    x, y = make_data(rows=16, seed=11)
    fit_private(mlp_with_dropout(), x, y)


# ------------------------------------------- one example's noise-free effect


@pytest.mark.parametrize("per_example", ["fast", "vmap"])
def test_one_example_moves_the_update_by_at_most_lr_c_over_b(per_example):
    """Neighbouring datasets (example 0 present, or given weight 0, i.e.
    removed), one fixed-size batch, no noise: the updates differ by
    `lr/B * c_0 g_0`, of norm at most (here: exactly) `lr * C / B`."""
    B, lr, C = 8, 0.5, 0.01  # C below every gradient norm
    x, y = make_data(rows=B, seed=12)
    x[0] *= 4.0  # an outlier
    keras.utils.set_random_seed(2)
    hidden = keras.layers.Dense(6, activation="tanh")
    initial = _values(sequential(hidden))
    updates = []
    for first_weight in (1.0, 0.0):
        model = keras_dp.make_private(
            sequential(keras.layers.Dense(6, activation="tanh")),
            per_example=per_example,
            poisson_sampling=False,
        )
        model.set_weights(initial)
        model.compile(
            optimizer=keras_dp.DPSGD(
                learning_rate=lr, l2_norm_clip=C, noise_multiplier=0.0, seed=1
            ),
            loss=LOSS,
        )
        weights = np.ones((B,), "float32")
        weights[0] = first_weight
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(
                x,
                y,
                sample_weight=weights,
                batch_size=B,
                epochs=1,
                shuffle=False,
                verbose=0,
            )
        updates.append([w - w0 for w, w0 in zip(_values(model), initial)])
    difference = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(*updates)))
    assert difference <= lr * C / B * (1 + 1e-4)
    assert difference >= lr * C / B * (1 - 1e-3)  # clipped: at the bound
