"""The private train step that `make_private` installs, one module per
backend: each runs `per_example.private_gradients`, hands the result to the
DP optimizer and updates state and metrics the way its Keras trainer
expects (TensorFlow: variables assigned in place; JAX: a stateless step
that returns the new state)."""

import keras

from keras_dp import backend as backend_lib


def train_step_for_backend():
    """The private `train_step(model, ...)` of the current Keras backend."""
    backend_lib.get_backend_module()  # the supported-backend check
    name = keras.backend.backend()
    if name == "tensorflow":
        from keras_dp.train_steps import tensorflow as module
    elif name == "torch":
        from keras_dp.train_steps import torch as module
    else:
        from keras_dp.train_steps import jax as module
    return module.train_step
