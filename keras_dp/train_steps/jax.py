"""The private train step for the JAX backend: a stateless step from
`(trainable, non_trainable, optimizer, metrics)` values to new ones."""

from keras.src.trainers import data_adapters

from keras_dp import backend as backend_lib
from keras_dp import per_example


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
            model, backend_lib.get_backend_module(), trainable, non_trainable, x, y,
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
    # Real examples of this step left out of the update for a non-finite
    # gradient norm or loss (see `per_example`).
    logs[per_example.NONFINITE_LOG] = step["nonfinite_examples"]
    state = (
        trainable,
        non_trainable,
        optimizer_variables,
        metrics_variables,
    )
    return logs, state
