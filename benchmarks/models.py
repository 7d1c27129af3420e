"""Models and random data of the benchmark suite (same as the peers')."""

import numpy as np


def build(name):
    import keras
    from keras import layers as L

    if name == "cnn":  # /work/shared/peers: Conv32-Pool-Conv64-Pool-Dense10
        return keras.Sequential([
            keras.Input(shape=(28, 28, 1)),
            L.Conv2D(32, 3, activation="relu"), L.MaxPooling2D(2),
            L.Conv2D(64, 3, activation="relu"), L.MaxPooling2D(2),
            L.Flatten(), L.Dense(10, activation="softmax")])
    if name == "mlp":  # /work/shared/peers: 784-512-512-10
        return keras.Sequential([
            keras.Input(shape=(784,)), L.Dense(512, activation="relu"),
            L.Dense(512, activation="relu"), L.Dense(10, activation="softmax")])
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
    if name == "transformer":
        return _encoder()
    raise SystemExit(f"unknown model {name}")


SEQ_LEN = 128
VOCAB = 5000


def _encoder(hidden=128, heads=2, layers=2, intermediate=512):
    """BERT-style text classifier (keras-hub's BertBackbone would pull in a
    second TensorFlow wheel and tensorflow-text, so it is rebuilt here from
    Keras layers: token + learned position embeddings, post-LN encoder
    blocks with MultiHeadAttention and a GELU feed-forward, dropout 0.1)."""
    import keras
    from keras import layers as L

    class PositionEmbedding(L.Layer):
        def build(self, input_shape):
            self.positions = self.add_weight(
                shape=(input_shape[1], input_shape[2]),
                initializer=keras.initializers.TruncatedNormal(stddev=0.02),
                name="positions")

        def call(self, x):
            return x + self.positions

    ids = keras.Input((SEQ_LEN,), dtype="int32")
    h = L.Embedding(VOCAB, hidden)(ids)
    h = PositionEmbedding()(h)
    h = L.LayerNormalization(epsilon=1e-12)(h)
    h = L.Dropout(0.1)(h)
    for _ in range(layers):
        a = L.MultiHeadAttention(heads, hidden // heads, dropout=0.1)(h, h)
        h = L.LayerNormalization(epsilon=1e-12)(L.Add()([h, L.Dropout(0.1)(a)]))
        f = L.Dense(intermediate, activation="gelu")(h)
        f = L.Dense(hidden)(f)
        h = L.LayerNormalization(epsilon=1e-12)(L.Add()([h, L.Dropout(0.1)(f)]))
    h = L.GlobalAveragePooling1D()(h)
    h = L.Dense(hidden, activation="tanh")(h)
    return keras.Model(ids, L.Dense(2, activation="softmax")(h))


def data(name, n):
    import keras

    rng = np.random.default_rng(0)
    if name == "transformer":
        x = rng.integers(1, VOCAB, (n, SEQ_LEN)).astype("int32")
        y = keras.utils.to_categorical(rng.integers(0, 2, n), 2)
        return x, y
    shape = {"cnn": (28, 28, 1), "mlp": (784,), "resnet": (32, 32, 3)}[name]
    x = rng.random((n,) + shape, dtype=np.float32)
    y = keras.utils.to_categorical(rng.integers(0, 10, n), 10)
    return x, y
