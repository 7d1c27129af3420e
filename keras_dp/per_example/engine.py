"""The clipped gradient sum of a step, and everything else a DP step needs.

`clipped_gradient_sum` picks the path: the fast path (one batched pass,
ghost norms and book-keeping, `keras_dp.per_example.fast_path`) when it
supports the model, else the general vmap path
(`keras_dp.per_example.vmap_path`). `private_gradients` adds the scaling by
the expected batch size, the weight-regularization gradient and the logged
loss.

The clipping policy (`clipping`) is the object that turns squared norms
into clip factors: `variable_clip_factors(squared_norms)` (one `(n,)`
tensor per variable in, one factor tensor per variable out),
`clip_counts(squared_norms, mask)` and `num_count_groups` (adaptive
clipping's counts), and `variable_partitions()` (per-device groups'
per-shard norms).
"""

import warnings

from keras import ops
from keras import tree

from keras_dp import keras_compat
from keras_dp.per_example.augmentation import augmented_rows
from keras_dp.per_example.fast_path import fast_clipped_gradient_sum
from keras_dp.per_example.losses import num_regularized_weights
from keras_dp.per_example.losses import regularization_loss
from keras_dp.per_example.registry import Unsupported
from keras_dp.per_example.rows import row_mask as _row_mask
from keras_dp.per_example.units import unit_mask
from keras_dp.per_example.vmap_path import vmap_clipped_gradient_sum

# The train step's log of the real examples left out of the update because
# their gradient norm or loss was not finite (a count per step; like the
# logged loss, not differentially private).
NONFINITE_LOG = "nonfinite_examples"

_FALLBACK_WARNING = (
    "keras_dp: the fast per-example path does not support this model "
    "({reason}), so each step takes the general vmap path, which forms the "
    "whole model's per-example gradients: slower, and memory grows with "
    "the batch (`make_private(microbatch_size=...)` bounds it). The "
    "clipped sums are the same. Pass `per_example='vmap'` to `make_private` "
    "to choose this path explicitly and silence this warning."
)


def _warn_fallback(settings, reason):
    """Warns once per model and reason: a step that falls back to the vmap
    path is much slower, which should not go unnoticed."""
    previous = getattr(settings, "per_example_path", None)
    if previous != ("vmap", reason):
        warnings.warn(_FALLBACK_WARNING.format(reason=reason), stacklevel=2)


def clipped_gradient_sum(
    model,
    clipping,
    backend_ops,
    trainable,
    non_trainable,
    x,
    y=None,
    sample_weight=None,
    microbatch_size=None,
    scale=None,
    rows_per_unit=1,
):
    """Clipped per-example gradient sum of one batch.

    Args:
        model: the private model.
        clipping: the clipping policy; its `variable_clip_factors` turns
            per-variable squared norms into per-example factors (see the
            module docstring for its other members).
        backend_ops: the backend module (`value_and_grad`, `scan`).
        trainable, non_trainable: current variable values (lists).
        x, y, sample_weight: the batch.
        microbatch_size: examples whose per-example gradients exist at once.
        scale: if given, a scalar that multiplies every clipped gradient
            (the private step's `1 / B`), applied to the per-example clip
            factors rather than to the summed gradients.
        rows_per_unit: the rows of one privacy unit (see
            `keras_dp.per_example.units`): with R > 1 the batch's rows come
            in units of R consecutive rows, each unit's gradient (the mean
            over its real rows) is what is clipped, `microbatch_size`
            counts units, and `losses` and `nonfinite` are per unit
            (`y_pred` stays per row).

    Returns:
        Dict with `clipped_sum` (list, one tensor per trainable variable),
        `losses` (per-example losses, shape `(rows,)`), `nonfinite`
        (`(rows,)` bool: the examples whose gradient norm or loss is not
        finite, given factor 0 and left out of the sum), `y_pred`
        (batched), `non_trainable` (updated values), and, where given,
        `clip_counts` and `noise_spaces`.

    With the model's `per_example` setting "auto" (the default) the fast
    path is used when it supports the model, else the vmap path; "vmap"
    forces the latter, "fast" the former (error if unsupported).
    """
    settings = getattr(model, "_keras_dp", None)
    mode = getattr(settings, "per_example", "auto")
    # Why the fast path is not taken; None: it is.
    reason = None
    if mode == "vmap":
        reason = "per_example='vmap'"
    else:
        try:
            result = fast_clipped_gradient_sum(
                model,
                clipping,
                backend_ops,
                trainable,
                non_trainable,
                x,
                y,
                sample_weight,
                microbatch_size=microbatch_size,
                scale=scale,
                rows_per_unit=rows_per_unit,
            )
        except Unsupported as error:
            reason = error.reason
            if mode == "auto":
                _warn_fallback(settings, reason)
        else:
            if settings is not None:
                settings.per_example_path = ("fast", None)
            return result
    if mode == "fast":
        raise ValueError(
            "make_private(..., per_example='fast'): the fast per-example path "
            f"does not support this model: {reason}. Use per_example='auto' "
            "or 'vmap' for the general path."
        )
    if settings is not None:
        settings.per_example_path = ("vmap", reason)
    return vmap_clipped_gradient_sum(
        model,
        clipping,
        backend_ops,
        trainable,
        non_trainable,
        x,
        y,
        sample_weight,
        microbatch_size,
        scale,
        rows_per_unit,
    )


def private_gradients(
    model,
    backend_ops,
    trainable,
    non_trainable,
    x,
    y=None,
    sample_weight=None,
    *,
    clipping,
    step_number=None,
):
    """Everything a DP train step needs except the noise.

    `clipping`: the step's clipping (a `keras_dp.StepClipping`, from
    `optimizer.step_clipping(...)`), which turns squared norms into clip
    factors.

    With augmentation multiplicity (`make_private(augment=...,
    augmentations=K)`) each example's K augmented copies are made here and
    clipped as one unit (`keras_dp.per_example.augmentation`);
    `step_number`, an integer scalar that differs from step to step, seeds
    them: by default the optimizer's iteration count read from its
    variable, which a JAX step must pass instead (its value in the step).

    Returns a dict with:
        `grads`: clipped sum divided by the expected batch size `B` (through
            the clip factors), plus the weight-regularization gradient
            (data-independent, unclipped) where a weight has a regularizer;
            the optimizer adds `N(0, (sigma * Delta / B)^2)` to these.
        `expected_batch_size`: `B`, the batch's own row count unless the
            model's privacy settings fix it (Poisson sampling).
        `loss`: the sum of the per-example losses over `B` plus
            regularization, for logs; the losses of the examples left out
            of the update (non-finite ones) are left out.
        `nonfinite_examples`: how many real examples (rows with a non-zero
            sample weight) had a non-finite gradient norm or loss and were
            left out of the update (float32 scalar).
        `y_pred`, `non_trainable`: as in a normal step.
        `metric_data`: `(x, y, sample_weight)` that go with `y_pred` for
            the metrics (with augmentation: the copies, `y` and
            `sample_weight` repeated).
        `rows_per_unit`: rows of `y_pred` per example.
    """
    settings = model._keras_dp
    if settings.expected_batch_size is not None:
        static_expected = settings.expected_batch_size
        expected = ops.cast(settings.expected_batch_size, "float32")
    else:
        static_expected = tree.flatten(x)[0].shape[0]
        expected = ops.cast(ops.shape(tree.flatten(x)[0])[0], "float32")
    rows = (x, y, sample_weight)
    # User-level training (`fit` on a keras_dp.data.UserSampler): each
    # user's M consecutive rows are one unit; `fit` refuses augmentation
    # with it.
    rows_per_unit = getattr(settings, "rows_per_user", None) or 1
    if settings.augment is not None and rows_per_unit > 1:
        raise ValueError(
            "User-level training (keras_dp.data.UserSampler) cannot be "
            "combined with augmentation multiplicity (make_private(augment="
            "...)) yet. Call keras_dp.make_private(model) without `augment`."
        )
    if settings.augment is not None:
        if step_number is None:
            step_number = keras_compat.optimizer_iterations(model.optimizer).value
        rows = augmented_rows(settings, x, y, sample_weight, step_number)
        rows_per_unit = settings.augmentations
    result = clipped_gradient_sum(
        model,
        clipping,
        backend_ops,
        trainable,
        non_trainable,
        *rows,
        microbatch_size=settings.microbatch_size,
        scale=1.0 / expected,
        rows_per_unit=rows_per_unit,
    )
    grads = [
        ops.cast(s, v.dtype)
        for s, v in zip(result["clipped_sum"], model.trainable_variables)
    ]
    # Under a tf.distribute strategy each replica holds a part of the
    # batch, and Keras sums the replicas' gradients (it scales the
    # regularization loss, as every loss, by one over their number) and
    # averages their logs.
    replicas = backend_ops.replicas_in_sync()
    reg_loss = 0.0
    if num_regularized_weights(model):
        (reg_loss, _), reg_grads = backend_ops.value_and_grad(
            lambda params: (regularization_loss(model, params), ())
        )(trainable)
        grads = [g + ops.cast(r, g.dtype) for g, r in zip(grads, reg_grads)]
    # The examples left out of the update are left out of the logged loss.
    losses = result["losses"]
    nonfinite = result["nonfinite"]
    loss = (
        ops.sum(ops.where(nonfinite, ops.zeros_like(losses), losses)) / expected
        + reg_loss
    ) * replicas
    # Units of weight-0 rows (padding) are not counted.
    row_mask = None if sample_weight is None else _row_mask(sample_weight)
    dropped = ops.cast(nonfinite, "float32")
    if sample_weight is not None:
        # Without units (or augmentation) the units are the rows.
        units = row_mask if rows_per_unit == 1 else unit_mask(rows[2], rows_per_unit)
        dropped = dropped * units
    padded = settings.expected_batch_size is not None and sample_weight is not None
    if padded and rows_per_unit > 1:
        # The metrics' rows are the copies.
        row_mask = _row_mask(rows[2])
    return {
        "row_mask": row_mask if padded else None,
        "metric_data": rows,
        "rows_per_unit": rows_per_unit,
        "grads": grads,
        "noise_spaces": result.get("noise_spaces"),
        "expected_batch_size": expected,
        # Python number when known at trace time (adaptive clipping's
        # count noise), and the noisy-count inputs (None without it).
        "static_expected_batch_size": static_expected,
        "clip_counts": result.get("clip_counts"),
        "loss": loss,
        "nonfinite_examples": ops.sum(dropped) * replicas,
        "y_pred": result["y_pred"],
        "non_trainable": result["non_trainable"],
    }
