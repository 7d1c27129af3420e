"""The private train step for the JAX backend: a stateless step from
`(trainable, non_trainable, optimizer, metrics)` values to new ones."""

import keras

from keras_dp import backend as backend_lib
from keras_dp import keras_compat
from keras_dp import per_example
from keras_dp.clipped_batch import ClippedBatch


def train_step(model, state, data):
    trainable, non_trainable, optimizer_variables, metrics_variables = state
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    optimizer = model.optimizer
    # Clip factors read the adaptive thresholds from this step's optimizer
    # values, not from the detached variables.
    step = per_example.private_gradients(
        model,
        backend_lib.get_backend_module(),
        trainable,
        non_trainable,
        x,
        y,
        sample_weight,
        clipping=optimizer.step_clipping(optimizer_variables),
        step_number=_iterations_in_step(optimizer, optimizer_variables),
    )
    noisy, optimizer_variables = optimizer.stateless_privatize(
        optimizer_variables, ClippedBatch.from_step(step)
    )
    trainable, optimizer_variables = optimizer.stateless_apply(
        optimizer_variables, noisy, trainable
    )
    non_trainable = step["non_trainable"]
    after_update = getattr(model, "after_private_update", None)
    if after_update is not None:
        non_trainable = after_update(
            trainable, non_trainable, optimizer.took_update(optimizer_variables)
        )
    # With augmentation multiplicity the metrics see every copy.
    x, y, sample_weight = step["metric_data"]
    with per_example.step_metrics(model, step):
        logs, metrics_variables = keras_compat.update_metrics_variables(
            model, metrics_variables, step["loss"], x, y, step["y_pred"], sample_weight
        )
    logs.update(optimizer.clip_threshold_logs(optimizer_variables))
    # Real examples of this step left out of the update for a non-finite
    # gradient norm or loss (see `keras_dp.per_example`).
    logs[per_example.NONFINITE_LOG] = step["nonfinite_examples"]
    state = (trainable, non_trainable, optimizer_variables, metrics_variables)
    return logs, state


def _iterations_in_step(optimizer, optimizer_variables):
    """The optimizer's iteration count in this step (it seeds the
    augmentation copies: the variable itself reads as a constant here)."""
    iterations = keras_compat.optimizer_iterations(optimizer)
    for variable, value in zip(optimizer.variables, optimizer_variables):
        if variable is iterations:
            return value
    return iterations.value
