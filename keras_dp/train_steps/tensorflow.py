"""The private train step for the TensorFlow backend: variables are
assigned in place inside the traced step."""

import keras
import tensorflow as tf

from keras_dp import backend as backend_lib
from keras_dp import keras_compat
from keras_dp import per_example
from keras_dp.clipped_batch import ClippedBatch


def train_step(model, data):
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    trainable_variables = model.trainable_variables
    trainable = [tf.convert_to_tensor(v.value) for v in trainable_variables]
    non_trainable = [
        tf.convert_to_tensor(v.value) for v in model.non_trainable_variables
    ]
    optimizer = model.optimizer
    # Clip factors need the optimizer's clipping groups (resolved at build).
    optimizer.build_for_model(model)
    step = per_example.private_gradients(
        model,
        backend_lib.get_backend_module(),
        trainable,
        non_trainable,
        x,
        y,
        sample_weight,
        clipping=optimizer.step_clipping(),
    )
    noisy = optimizer.privatize(ClippedBatch.from_step(step))
    optimizer.apply(noisy, trainable_variables)
    non_trainable = step["non_trainable"]
    after_update = getattr(model, "after_private_update", None)
    if after_update is not None:
        non_trainable = after_update(
            [v.value for v in trainable_variables],
            non_trainable,
            optimizer.took_update(),
        )
    for variable, value in zip(model.non_trainable_variables, non_trainable):
        variable.assign(value)
    keras_compat.loss_tracker(model).update_state(
        step["loss"], sample_weight=tf.shape(tf.nest.flatten(x)[0])[0]
    )
    # With augmentation multiplicity the metrics see every copy.
    x, y, sample_weight = step["metric_data"]
    with per_example.step_metrics(model, step):
        logs = model.compute_metrics(x, y, step["y_pred"], sample_weight=sample_weight)
    logs.update(optimizer.clip_threshold_logs())
    # Real examples of this step left out of the update for a non-finite
    # gradient norm or loss (see `keras_dp.per_example`).
    logs[per_example.NONFINITE_LOG] = step["nonfinite_examples"]
    return logs
