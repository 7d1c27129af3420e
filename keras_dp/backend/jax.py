"""Private train step for the JAX backend (`jax.vmap` over `stateless_call`)."""

import sys

import jax
from keras.src.trainers import data_adapters

from keras_dp import per_example


def value_and_grad(fn):
    return jax.value_and_grad(fn, has_aux=True)


def scan(f, init, xs):
    return jax.lax.scan(f, init, xs)


def train_step(model, state, data):
    trainable, non_trainable, optimizer_variables, metrics_variables = state
    x, y, sample_weight = data_adapters.data_adapter_utils.unpack_x_y_sample_weight(
        data
    )
    step = per_example.private_gradients(
        model, sys.modules[__name__], trainable, non_trainable, x, y, sample_weight
    )
    optimizer = model.optimizer
    with optimizer.private_update(
        step["expected_batch_size"], step["noise_spaces"]
    ):
        trainable, optimizer_variables = optimizer.stateless_apply(
            optimizer_variables, step["grads"], trainable
        )
    non_trainable = step["non_trainable"]
    after_update = getattr(model, "after_private_update", None)
    if after_update is not None:
        non_trainable = after_update(trainable, non_trainable)
    logs, metrics_variables = model._update_metrics_variables(
        metrics_variables, step["loss"], x, y, step["y_pred"], sample_weight
    )
    state = (
        trainable,
        non_trainable,
        optimizer_variables,
        metrics_variables,
    )
    return logs, state
