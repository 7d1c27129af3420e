"""`make_private`: give any Keras model a differentially private train step."""

import types

import keras

from keras_dp import backend as backend_lib
from keras_dp import checks


class PrivacySettings:
    """Per-model settings of the private train step.

    Attributes:
        microbatch_size: examples whose per-example gradients are
            materialised at once (None: the whole batch).
        expected_batch_size: the `B` that clipped sums are divided by.
            None means each batch's own size (fixed-size batches); Poisson
            sampling sets it to the expected size `q * n`.
    """

    def __init__(self, microbatch_size=None, expected_batch_size=None):
        self.microbatch_size = microbatch_size
        self.expected_batch_size = expected_batch_size


def make_private(model, microbatch_size=None):
    """Installs a differentially private train step on `model`.

    The returned model is the same object. Its `train_step` computes
    per-example gradients (vectorized: `jax.vmap` over `stateless_call` on
    JAX, `tf.vectorized_map` on TensorFlow), lets the DP optimizer clip them,
    sums them, and has the optimizer add noise once per logical batch.
    Evaluation and prediction are unchanged.

    Example:

    ```python
    model = keras_dp.make_private(model)
    model.compile(optimizer=keras_dp.DPAdam(auto_clip=True),
                  loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(x, y, batch_size=256, epochs=3)
    ```

    Args:
        model: a `keras.Model` (Sequential, Functional or subclassed) that
            does not override `train_step` and has no BatchNormalization.
        microbatch_size: optional positive int. The batch is processed in
            chunks of this many examples, so memory holds only one chunk's
            per-example gradients; the result does not change. Batches that
            are not a multiple are padded with zero-weight rows, which
            contribute nothing.

    Returns:
        `model`, now private. Compile it with a keras_dp DP optimizer.
    """
    backend_module = backend_lib.get_backend_module()
    if not isinstance(model, keras.Model):
        raise TypeError(
            "make_private expects a keras.Model. Received: "
            f"{type(model).__name__}."
        )
    if microbatch_size is not None and (
        not isinstance(microbatch_size, int) or microbatch_size <= 0
    ):
        raise ValueError(
            "`microbatch_size` must be a positive integer or None. Received: "
            f"{microbatch_size!r}."
        )
    if type(model).train_step is not keras.Model.train_step:
        raise ValueError(
            f"{type(model).__name__} overrides `train_step`, which "
            "make_private would replace. Put custom loss logic in "
            "`compute_loss` instead (it is evaluated once per example) or "
            "train with the model's own step and no DP optimizer."
        )
    checks.check_no_example_mixing_layers(model)

    settings = getattr(model, "_keras_dp", None)
    if settings is None:
        model._keras_dp = PrivacySettings(microbatch_size=microbatch_size)
        model.make_train_function = types.MethodType(
            _checked_make_train_function(type(model).make_train_function),
            model,
        )
    else:
        settings.microbatch_size = microbatch_size
    model.train_step = types.MethodType(backend_module.train_step, model)
    # A train function compiled before make_private would bypass the new step.
    model.train_function = None
    return model


def _checked_make_train_function(make_train_function):
    # Keras builds the train function before the first step (and, on JAX,
    # before detaching the variables), so errors raised here leave the model
    # intact.
    def checked(model, force=False):
        checks.check_dp_optimizer(model)
        checks.check_no_example_mixing_layers(model)
        return make_train_function(model, force=force)

    return checked


def is_private(model):
    """Whether `make_private` was applied to `model`."""
    return getattr(model, "_keras_dp", None) is not None
