"""Metrics of a private train step: loss trackers and padding rows.

Per-example losses keep the per-output loss trackers paused
(`losses.loss_trackers_paused`); `step_metrics` updates them once per
batch, on the scale of the logged loss, and keeps Poisson padding rows out
of compiled metrics.
"""

import contextlib

from keras import ops
from keras import tree

from keras_dp import keras_compat


def _update_loss_trackers(
    model, y, y_pred, sample_weight, expected_batch_size, rows_per_unit
):
    """Per-output losses of the batch, on the scale of the logged `loss`.

    The logged loss is the per-example sum over the expected batch size
    `B`; Keras's default reduction divides by the row count, so the values
    are rescaled by `rows / (B * rows_per_unit)` (1 for fixed-size batches;
    an example's copies count as one example).
    """
    compiled_loss = keras_compat.loss_with_output_trackers(model)
    if compiled_loss is None:
        return
    rows = ops.cast(ops.shape(tree.flatten(y_pred)[0])[0], "float32")
    scale = rows / (ops.cast(expected_batch_size, "float32") * rows_per_unit)
    trackers = keras_compat.loss_trackers(compiled_loss)
    keras_compat.set_loss_trackers(
        compiled_loss, [_ScaledTracker(t, scale) for t in trackers]
    )
    try:
        # Keras's own call resolves the output structure; its total is unused.
        compiled_loss(y, y_pred, sample_weight)
    finally:
        keras_compat.set_loss_trackers(compiled_loss, trackers)


class _ScaledTracker:
    def __init__(self, tracker, scale):
        self.tracker = tracker
        self.scale = scale

    def update_state(self, value, sample_weight=None):
        self.tracker.update_state(
            ops.cast(value, "float32") * self.scale, sample_weight=sample_weight
        )


@contextlib.contextmanager
def step_metrics(model, step):
    """The context in which a private train step updates its metrics.

    Inside it, `model.compute_metrics` also updates the per-output loss
    trackers once for the batch (see `loss_trackers_paused`), and compiled
    unweighted metrics skip Poisson padding rows: Keras passes no sample
    weight to `compile(metrics=...)` metrics, so padding rows (weight 0)
    would count as examples; they get the row mask as their sample weight.
    """
    compute_metrics = model.compute_metrics

    def compute_metrics_with_loss_trackers(x, y_true, y_pred, sample_weight=None):
        _update_loss_trackers(
            model,
            y_true,
            y_pred,
            sample_weight,
            step["expected_batch_size"],
            step.get("rows_per_unit", 1),
        )
        return compute_metrics(x, y_true, y_pred, sample_weight=sample_weight)

    model.compute_metrics = compute_metrics_with_loss_trackers
    try:
        with _real_rows_only(model, step["row_mask"]):
            yield
    finally:
        del model.compute_metrics


@contextlib.contextmanager
def _real_rows_only(model, row_mask):
    metrics = keras_compat.compile_metrics(model)
    if metrics is None or row_mask is None:
        yield
        return
    update_state = metrics.update_state

    def masked_update_state(y_true, y_pred, sample_weight=None):
        if not metrics.built:
            metrics.build(y_true, y_pred)
        flat = keras_compat.flat_metrics(metrics)
        keras_compat.set_flat_metrics(
            metrics,
            [None if m is None else _RowMaskedMetric(m, row_mask) for m in flat],
        )
        try:
            update_state(y_true, y_pred, sample_weight)
        finally:
            keras_compat.set_flat_metrics(metrics, flat)

    metrics.update_state = masked_update_state
    try:
        yield
    finally:
        del metrics.update_state


class _RowMaskedMetric:
    def __init__(self, metric, row_mask):
        self.metric = metric
        self.row_mask = row_mask

    def update_state(self, y_true, y_pred):
        self.metric.update_state(y_true, y_pred, sample_weight=self.row_mask)
