"""Recurrent layers and TimeDistributed on the fast per-example path.

They are handled whole (a per-example gradient of the layer's own call),
so the clipped sums must equal one backward pass per example, masks from
`Embedding(mask_zero=True)` included; with dropout they fall back to the
vmap path with a reason a user can read.
"""

import keras
import numpy as np
import pytest

import keras_dp
from keras_dp import per_example
from test_fast_norms import assert_matches_brute_force

STEPS, VOCAB = 6, 20


def _tokens(n=5, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, VOCAB, size=(n, STEPS))
    tokens[1, 4:] = 0  # padding, masked with mask_zero=True
    tokens[3, 2:] = 0
    return tokens


def _model(kind):
    L = keras.layers
    mask = kind.endswith("_masked")
    body = {
        "lstm": [L.LSTM(5)],
        "lstm_masked": [L.LSTM(5)],
        "gru_sequences": [L.GRU(4, return_sequences=True), L.Flatten()],
        "simple_rnn": [L.SimpleRNN(3)],
        "bidirectional_masked": [
            L.Bidirectional(L.GRU(4, return_sequences=True)),
            L.GlobalAveragePooling1D(),
        ],
        "time_distributed": [L.TimeDistributed(L.Dense(3)), L.Flatten()],
    }[kind]
    return keras.Sequential(
        [keras.Input((STEPS,), dtype="int32"), L.Embedding(VOCAB, 8, mask_zero=mask)]
        + body
        + [L.Dense(3)]
    )


@pytest.mark.parametrize(
    "kind",
    [
        "lstm",
        "lstm_masked",
        "gru_sequences",
        "simple_rnn",
        "bidirectional_masked",
        "time_distributed",
    ],
)
def test_recurrent_and_time_distributed_match_brute_force(kind):
    model = _model(kind)
    entries = per_example.build_plan(model)
    whole = [e for e in entries if e.kind == "generic"]
    assert whole and all(
        e.rule.whole
        and isinstance(e.layer, (keras.layers.RNN, keras.layers.TimeDistributed))
        for e in whole
    )
    assert_matches_brute_force(model, _tokens(), np.array([0, 1, 2, 1, 0]))


def test_recurrent_model_takes_the_fast_path_in_fit():
    model = keras_dp.make_private(_model("bidirectional_masked"))
    model.compile(
        optimizer=keras_dp.DPSGD(learning_rate=0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    tokens = _tokens(32, seed=1)
    labels = np.random.default_rng(2).integers(0, 3, size=(32,))
    model.fit(tokens, labels, batch_size=8, epochs=1, verbose=0)
    assert model._keras_dp.per_example_path == ("fast", None)


def test_recurrent_dropout_falls_back_with_a_readable_reason():
    model = keras.Sequential(
        [
            keras.Input((STEPS,), dtype="int32"),
            keras.layers.Embedding(VOCAB, 8),
            keras.layers.LSTM(5, dropout=0.2, name="lstm"),
            keras.layers.Dense(3),
        ]
    )
    with pytest.raises(per_example.Unsupported, match="'lstm'.*dropout") as info:
        per_example.build_plan(model)
    assert "\x1b" not in str(info.value)


def test_fallback_reason_raised_inside_a_layer_call_is_readable():
    # A layer called twice (shared weights) is found while the model runs,
    # inside Keras's call, which decorates the exception it re-raises.
    inputs = keras.Input((4,))
    shared = keras.layers.Dense(4, name="shared")
    outputs = keras.layers.Dense(2)(shared(shared(inputs)))
    model = keras_dp.make_private(keras.Model(inputs, outputs))
    model.compile(optimizer=keras_dp.DPSGD(learning_rate=0.1), loss="mse")
    x = np.ones((16, 4), "float32")
    with pytest.warns(UserWarning, match="vmap path") as record:
        model.fit(x, np.ones((16, 2), "float32"), batch_size=8, verbose=0)
    path, reason = model._keras_dp.per_example_path
    assert path == "vmap"
    assert reason.startswith("layer 'shared' is called more than once")
    assert "\x1b" not in reason and "Arguments received" not in reason
    assert any("\x1b" not in str(w.message) for w in record)


@pytest.mark.parametrize("mask", [False, True])
def test_recurrent_dropout_trains_on_the_vmap_path(mask):
    model = keras.Sequential(
        [
            keras.Input((STEPS,), dtype="int32"),
            keras.layers.Embedding(VOCAB, 8, mask_zero=mask),
            keras.layers.LSTM(5, dropout=0.2),
            keras.layers.Dense(3),
        ]
    )
    model = keras_dp.make_private(model, per_example="vmap")
    model.compile(
        optimizer=keras_dp.DPSGD(learning_rate=0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    tokens = _tokens(32, seed=3)
    labels = np.random.default_rng(4).integers(0, 3, size=(32,))
    history = model.fit(tokens, labels, batch_size=8, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][-1])
    assert not model.layers[1].unroll  # restored after tracing


def test_recurrent_dropout_trains_on_a_batch_of_one_row():
    """A batch of one row in a step traced for batches of any size (the
    last of 9 examples in batches of 8; on TensorFlow a graph): TF's pfor
    used to give the recurrent dropout loop's results wrong shapes there.
    The update moves the weights and stays finite."""
    model = keras.Sequential(
        [
            keras.Input((STEPS,), dtype="int32"),
            keras.layers.Embedding(VOCAB, 8),
            keras.layers.LSTM(5, dropout=0.2),
            keras.layers.Dense(3),
        ]
    )
    model = keras_dp.make_private(model, per_example="vmap", poisson_sampling=False)
    model.compile(
        optimizer=keras_dp.DPSGD(learning_rate=0.1, noise_multiplier=0.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    before = [w.copy() for w in model.get_weights()] if model.built else None
    history = model.fit(
        _tokens(9, seed=5), np.zeros((9,), "int64"), batch_size=8, verbose=0
    )
    assert np.isfinite(history.history["loss"][-1])
    if before is not None:
        assert any(
            not np.array_equal(a, b) for a, b in zip(before, model.get_weights())
        )


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TF graphs")
def test_rows_of_unknown_number_are_mapped_once_each():
    """`_map_rows` in a graph of any batch size: the results of 0, 1 and 3
    rows, each row's own (the copy that one row gets is dropped)."""
    import tensorflow as tf

    from keras_dp.per_example import vmap_path

    @tf.function(input_signature=[tf.TensorSpec((None, 2), tf.float32)])
    def doubled(rows):
        return vmap_path._map_rows(lambda row: (row * 2, tf.reduce_sum(row)), rows)

    for n in (0, 1, 3):
        rows = np.arange(2 * n, dtype="float32").reshape(n, 2)
        twice, sums = doubled(rows)
        np.testing.assert_array_equal(twice.numpy(), rows * 2)
        np.testing.assert_array_equal(sums.numpy(), rows.sum(1))
