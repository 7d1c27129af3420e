"""Common Keras models and workflows on a private model, as a Keras user
expects them: batch normalization (frozen or replaced), cloning, summaries.
"""

import keras
import numpy as np
import pytest

import keras_dp


def _images(n=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 3, size=(n,))
    return x, y


def _bn_model(trainable_bn=True):
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(8, 3, padding="same", name="conv")(inputs)
    bn = keras.layers.BatchNormalization(name="bn")
    bn.trainable = trainable_bn
    h = keras.layers.ReLU()(bn(h))
    h = keras.layers.GlobalAveragePooling2D()(h)
    outputs = keras.layers.Dense(3, name="head")(h)
    return keras.Model(inputs, outputs)


def _compile(model, **optimizer_kwargs):
    model.compile(
        optimizer=keras_dp.DPSGD(
            learning_rate=0.1, noise_multiplier=0.5, **optimizer_kwargs
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


# --------------------------------------------------------------------------
# Batch normalization.


def test_trainable_batch_normalization_is_refused_with_the_way_forward():
    with pytest.raises(ValueError, match="'bn'.*replace_batch_normalization"):
        keras_dp.make_private(_bn_model())


@pytest.mark.parametrize("per_example", ["auto", "vmap"])
def test_frozen_batch_normalization_trains_and_keeps_its_statistics(per_example):
    model = _bn_model(trainable_bn=False)
    bn = model.get_layer("bn")
    bn.moving_mean.assign(np.full((8,), 0.3, "float32"))
    statistics = [keras.ops.convert_to_numpy(v) for v in bn.non_trainable_weights]
    model = _compile(keras_dp.make_private(model, per_example=per_example))
    x, y = _images()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    for before, after in zip(statistics, bn.non_trainable_weights):
        np.testing.assert_array_equal(before, keras.ops.convert_to_numpy(after))


def test_replace_batch_normalization_keeps_weights_and_trains():
    model = _bn_model()
    model.get_layer("bn").gamma.assign(np.linspace(1, 2, 8).astype("float32"))
    fixed = keras_dp.replace_batch_normalization(model)
    names = [type(layer).__name__ for layer in fixed.layers]
    assert "BatchNormalization" not in names
    norm = fixed.get_layer("bn_group_norm")
    assert isinstance(norm, keras.layers.GroupNormalization)
    assert norm.groups == 8 and norm.axis == -1
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(norm.gamma), np.linspace(1, 2, 8)
    )
    for name in ("conv", "head"):
        for a, b in zip(
            model.get_layer(name).get_weights(), fixed.get_layer(name).get_weights()
        ):
            np.testing.assert_array_equal(a, b)
    # The original is untouched.
    assert isinstance(model.get_layer("bn"), keras.layers.BatchNormalization)
    fixed = _compile(keras_dp.make_private(fixed))
    x, y = _images()
    history = fixed.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][-1])


def test_replace_batch_normalization_group_counts():
    assert keras_dp.normalization.group_count(64) == 32
    assert keras_dp.normalization.group_count(48) == 24
    assert keras_dp.normalization.group_count(7) == 7
    assert keras_dp.normalization.group_count(37) == 1


def test_replace_batch_normalization_refuses_subclassed_models():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.bn = keras.layers.BatchNormalization()

        def call(self, x):
            return self.bn(x)

    with pytest.raises(ValueError, match="GroupNormalization"):
        keras_dp.replace_batch_normalization(Net())


# --------------------------------------------------------------------------
# Cloning and summaries.


def _mlp():
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(1),
        ]
    )


def test_a_clone_of_a_private_model_refuses_to_train_until_made_private():
    model = keras_dp.make_private(_mlp())
    clone = keras.models.clone_model(model)
    assert not keras_dp.is_private(clone)
    clone.compile(optimizer=keras_dp.DPSGD(learning_rate=0.1), loss="mse")
    x = np.ones((8, 4), "float32")
    with pytest.raises(RuntimeError, match="make_private"):
        clone.fit(x, np.ones((8, 1), "float32"), batch_size=4, verbose=0)
    clone = keras_dp.make_private(clone)
    clone.compile(optimizer=keras_dp.DPSGD(learning_rate=0.1), loss="mse")
    clone.fit(x, np.ones((8, 1), "float32"), batch_size=4, verbose=0)


def test_privacy_summary_and_model_summary(capsys):
    model = keras_dp.make_private(_mlp())
    model.compile(
        optimizer=keras_dp.DPSGD(
            learning_rate=0.1, noise_multiplier=1.5, l2_norm_clip=0.5
        ),
        loss="mse",
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = rng.normal(size=(64, 1)).astype("float32")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    text = keras_dp.privacy_summary(model, delta=1e-5)
    steps = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    assert f"noisy updates taken: {steps}" in text
    assert "noise_multiplier=1.5" in text and "sample_rate=0.25" in text
    assert "l2_norm_clip=0.5" in text
    expected = keras_dp.compute_epsilon(1.5, 0.25, steps, 1e-5)
    assert f"epsilon: {expected:.4g} at delta=1e-05" in text
    assert "Poisson" in text
    model.summary()
    assert "Privacy of model" in capsys.readouterr().out
    assert "not private" in keras_dp.privacy_summary(_mlp())
    assert "DPSGD" in repr(model.optimizer)


# --------------------------------------------------------------------------
# Models that are not built yet.


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(8, activation="relu")
        self.out = keras.layers.Dense(2)

    def call(self, x):
        return self.out(self.hidden(x))


@pytest.mark.parametrize("per_example", ["auto", "vmap"])
@pytest.mark.parametrize("kind", ["sequential", "subclassed"])
@pytest.mark.parametrize("entry", ["fit", "train_on_batch"])
def test_unbuilt_models_are_built_on_the_first_batch(kind, per_example, entry):
    if kind == "sequential":
        model = keras.Sequential([keras.layers.Dense(8), keras.layers.Dense(2)])
    else:
        model = _Subclassed()
    assert not model.built
    model = keras_dp.make_private(model, per_example=per_example)
    model.compile(
        optimizer=keras_dp.DPSGD(learning_rate=0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 4)).astype("float32")
    y = rng.integers(0, 2, size=(32,))
    if entry == "fit":
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    else:
        model.train_on_batch(x[:8], y[:8])
    assert model.built
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) >= 1


# --------------------------------------------------------------------------
# keras-hub tasks: preprocessed outside the private step.


def _tiny_bert_classifier(lora=False):
    keras_hub = pytest.importorskip("keras_hub")
    words = ["the", "movie", "was", "good", "bad", "great", "awful", "plot"]
    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=vocabulary)
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(
        tokenizer, sequence_length=8
    )
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=len(vocabulary),
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=8,
    )
    if lora:
        backbone.enable_lora(2)
    return keras_hub.models.BertTextClassifier(backbone, 2, preprocessor=preprocessor)


@pytest.mark.parametrize("lora", [False, True])
def test_keras_hub_task_fit_trains_privately_with_its_preprocessor(lora):
    task = keras_dp.make_private(_tiny_bert_classifier(lora))
    task.compile(
        optimizer=keras_dp.DPAdam(learning_rate=1e-2, noise_multiplier=0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    rng = np.random.default_rng(0)
    words = np.array(["good", "great", "bad", "awful"])
    texts = np.array([f"the movie was {w}" for w in rng.choice(words, size=64)])
    labels = np.isin([t.split()[-1] for t in texts], ["good", "great"])
    history = task.fit(
        texts,
        labels.astype("int32"),
        batch_size=16,
        epochs=2,
        verbose=0,
        validation_split=0.25,
        callbacks=[keras_dp.EpsilonLogger(delta=1e-5)],
    )
    assert np.isfinite(history.history["loss"][-1])
    assert "val_loss" in history.history
    (entry,) = task.optimizer.privacy_ledger.entries
    assert entry["poisson"] and entry["n"] == 48
    assert entry["sample_rate"] == pytest.approx(16 / 48)
    predictions = task.predict(texts[:4], verbose=0)
    assert predictions.shape == (4, 2)


# --------------------------------------------------------------------------
# Mixed precision.


def _conv_mlp():
    return keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(4, 3, name="conv"),
            keras.layers.Flatten(),
            keras.layers.Dense(16, activation="relu", name="hidden"),
            keras.layers.LayerNormalization(name="norm"),
            keras.layers.Dense(3, name="head"),
        ]
    )


def _one_step_update(policy, weights, per_example):
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = keras_dp.make_private(_conv_mlp(), per_example=per_example)
        model.set_weights(weights)
        model.compile(
            optimizer=keras_dp.DPSGD(
                learning_rate=1.0, noise_multiplier=0.0, l2_norm_clip=0.5
            ),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        x, y = _images(16, seed=3)
        model.train_on_batch(x, y)
        assert isinstance(model.optimizer, keras_dp.DPOptimizerMixin)
        return [np.array(w) - w0 for w, w0 in zip(model.get_weights(), weights)]
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("per_example", ["auto", "vmap"])
@pytest.mark.parametrize(
    "policy, tolerance", [("mixed_float16", 0.02), ("mixed_bfloat16", 0.1)]
)
def test_mixed_precision_update_matches_float32(policy, tolerance, per_example):
    weights = [np.array(w) for w in _conv_mlp().get_weights()]
    reference = _one_step_update("float32", weights, per_example)
    update = _one_step_update(policy, weights, per_example)
    for r, u in zip(reference, update):
        assert np.all(np.isfinite(u))
        assert np.linalg.norm(u - r) <= tolerance * np.linalg.norm(r) + 1e-6


# --------------------------------------------------------------------------
# Inputs and outputs given as lists.


def test_list_inputs_and_outputs_train_with_poisson_sampling():
    a, b = keras.Input((3,)), keras.Input((2,))
    h = keras.layers.Concatenate()([a, b])
    outputs = [keras.layers.Dense(1)(h), keras.layers.Dense(2)(h)]
    model = keras_dp.make_private(keras.Model([a, b], outputs))
    model.compile(optimizer=keras_dp.DPSGD(learning_rate=0.1), loss=["mse", "mse"])
    rng = np.random.default_rng(0)
    x = [
        rng.normal(size=(40, 3)).astype("float32"),
        rng.normal(size=(40, 2)).astype("float32"),
    ]
    y = [
        rng.normal(size=(40, 1)).astype("float32"),
        rng.normal(size=(40, 2)).astype("float32"),
    ]
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][-1])
    assert model.optimizer.privacy_ledger.entries[0]["poisson"]
