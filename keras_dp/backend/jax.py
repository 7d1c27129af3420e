"""Private train step for the JAX backend (`jax.vmap` over `stateless_call`)."""

import sys

import jax
import jax.numpy as jnp
from keras.src.trainers import data_adapters

from keras_dp import per_example


def value_and_grad(fn):
    return jax.value_and_grad(fn, has_aux=True)


def after(dependencies, tensors):
    """`tensors` (a structure), read only once `dependencies` are computed.

    XLA would otherwise be free to compute, say, a layer's patches from its
    input during the forward pass and hold them until the backward pass
    reaches the layer. On the CPU `optimization_barrier` does not order
    anything (it is expanded away before scheduling), so the float tensors
    get a data dependency instead: `+ 0 * d` for one element `d` of each
    dependency (XLA keeps `0 * d` for floats; it is NaN only where `d` is,
    and a step with a NaN gradient is lost anyway).
    """
    leaves = [d for d in jax.tree_util.tree_leaves(dependencies) if d.size]
    if not leaves:
        return tensors
    zero = sum(jnp.ravel(d)[0].astype("float32") for d in leaves) * 0.0

    def gate(t):
        if jnp.issubdtype(t.dtype, jnp.floating):
            return t + zero.astype(t.dtype)
        return t

    return jax.tree_util.tree_map(gate, tensors)


def scan(f, init, xs):
    return jax.lax.scan(f, init, xs)


def train_step(model, state, data):
    trainable, non_trainable, optimizer_variables, metrics_variables = state
    x, y, sample_weight = data_adapters.data_adapter_utils.unpack_x_y_sample_weight(
        data
    )
    optimizer = model.optimizer
    # Optimizer state read while clipping (adaptive thresholds) comes from
    # this step's values, not from the detached variables.
    with optimizer.step_state(optimizer_variables):
        step = per_example.private_gradients(
            model, sys.modules[__name__], trainable, non_trainable, x, y,
            sample_weight,
        )
    with optimizer.private_update(
        step["expected_batch_size"],
        step["noise_spaces"],
        clip_counts=step["clip_counts"],
        static_expected_batch_size=step["static_expected_batch_size"],
    ):
        trainable, optimizer_variables = optimizer.stateless_apply(
            optimizer_variables, step["grads"], trainable
        )
    non_trainable = step["non_trainable"]
    after_update = getattr(model, "after_private_update", None)
    if after_update is not None:
        non_trainable = after_update(
            trainable, non_trainable, optimizer.took_update(optimizer_variables)
        )
    with per_example.step_metrics(model, step):
        logs, metrics_variables = model._update_metrics_variables(
            metrics_variables, step["loss"], x, y, step["y_pred"], sample_weight
        )
    logs.update(optimizer.clip_threshold_logs(optimizer_variables))
    state = (
        trainable,
        non_trainable,
        optimizer_variables,
        metrics_variables,
    )
    return logs, state
