"""Models and random data of the benchmark suite (same as the peers')."""

import numpy as np


def build(name):
    import keras
    from keras import layers as L

    if name == "cnn":  # the peers' CNN: Conv32-Pool-Conv64-Pool-Dense10
        return keras.Sequential(
            [
                keras.Input(shape=(28, 28, 1)),
                L.Conv2D(32, 3, activation="relu"),
                L.MaxPooling2D(2),
                L.Conv2D(64, 3, activation="relu"),
                L.MaxPooling2D(2),
                L.Flatten(),
                L.Dense(10, activation="softmax"),
            ]
        )
    if name in ("mlp", "mlp1"):
        # mlp: the peers' 784-512-512-10; mlp1: a one-unit sigmoid
        # head instead, which gives an odd number of parameters.
        head = (
            L.Dense(10, activation="softmax")
            if name == "mlp"
            else L.Dense(1, activation="sigmoid")
        )
        return keras.Sequential(
            [
                keras.Input(shape=(784,)),
                L.Dense(512, activation="relu"),
                L.Dense(512, activation="relu"),
                head,
            ]
        )
    if name == "resnet":  # small ResNet, GroupNormalization, 32x32x3

        def block(x, filters, stride):
            shortcut = x
            h = L.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False)(x)
            h = L.GroupNormalization(4)(h)
            h = L.Activation("relu")(h)
            h = L.Conv2D(filters, 3, padding="same", use_bias=False)(h)
            h = L.GroupNormalization(4)(h)
            if stride != 1 or x.shape[-1] != filters:
                shortcut = L.Conv2D(filters, 1, strides=stride, use_bias=False)(x)
                shortcut = L.GroupNormalization(4)(shortcut)
            return L.Activation("relu")(L.Add()([h, shortcut]))

        inputs = keras.Input((32, 32, 3))
        h = L.Conv2D(16, 3, padding="same", use_bias=False)(inputs)
        h = L.Activation("relu")(L.GroupNormalization(4)(h))
        h = block(h, 16, 1)
        h = block(h, 32, 2)
        h = block(h, 64, 2)
        h = L.GlobalAveragePooling2D()(h)
        return keras.Model(inputs, L.Dense(10, activation="softmax")(h))
    if name in BERT_CONFIGS:
        return _bert_classifier(**BERT_CONFIGS[name])
    raise SystemExit(f"unknown model {name}")


SEQ_LEN = 128
# keras-hub BertBackbone configurations, built from config with random
# weights (nothing is downloaded). `transformer` is a small BERT for the
# CPU suite; `bert_base` is BERT-base size (run it on a GPU, batch 32).
BERT_CONFIGS = {
    "transformer": dict(
        vocabulary_size=5000,
        num_layers=2,
        num_heads=2,
        hidden_dim=128,
        intermediate_dim=512,
    ),
    "bert_base": dict(
        vocabulary_size=30522,
        num_layers=12,
        num_heads=12,
        hidden_dim=768,
        intermediate_dim=3072,
    ),
}


def _bert_classifier(**config):
    """keras-hub BertBackbone (token, position and segment embeddings,
    post-LN encoder blocks, dropout 0.1) with a 2-way softmax head on the
    pooled output."""
    import keras
    import keras_hub

    backbone = keras_hub.models.BertBackbone(
        max_sequence_length=SEQ_LEN, dropout=0.1, **config
    )
    outputs = keras.layers.Dense(2, activation="softmax")(
        backbone.output["pooled_output"]
    )
    return keras.Model(backbone.input, outputs)


def data(name, n):
    import keras

    rng = np.random.default_rng(0)
    if name in BERT_CONFIGS:
        vocab = BERT_CONFIGS[name]["vocabulary_size"]
        x = {
            "token_ids": rng.integers(1, vocab, (n, SEQ_LEN)).astype("int32"),
            "segment_ids": np.zeros((n, SEQ_LEN), "int32"),
            "padding_mask": np.ones((n, SEQ_LEN), bool),
        }
        y = keras.utils.to_categorical(rng.integers(0, 2, n), 2)
        return x, y
    shape = {"cnn": (28, 28, 1), "mlp": (784,), "mlp1": (784,), "resnet": (32, 32, 3)}[
        name
    ]
    x = rng.random((n,) + shape, dtype=np.float32)
    if name == "mlp1":
        return x, rng.integers(0, 2, (n, 1)).astype(np.float32)
    y = keras.utils.to_categorical(rng.integers(0, 10, n), 10)
    return x, y


def loss(name):
    return "binary_crossentropy" if name == "mlp1" else "categorical_crossentropy"
