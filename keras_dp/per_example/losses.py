"""Per-example losses, for both paths.

Each example's loss is the compiled loss (or an overridden `compute_loss`)
on that example as a batch of one, activity regularization included (vmap
path; the fast path refuses it). Weight regularizers are not part of the
per-example loss: they are data-independent, and the train step adds them
once, outside the clipped part (`regularization_loss`). An example whose
sample weight is 0 everywhere (a padding row) has loss exactly 0.

The fast path takes the losses of the whole batch from one call of the
compiled loss where that is exact (`batched_example_losses`), else maps the
compiled loss over the examples.
"""

import contextlib

import keras
from keras import ops
from keras import tree

from keras_dp import backend as backend_lib
from keras_dp import keras_compat
from keras_dp.per_example.rows import example_is_present
from keras_dp.per_example.rows import expand
from keras_dp.per_example.rows import mappable
from keras_dp.per_example.rows import offset_seed_states
from keras_dp.per_example.rows import restore_seed_states
from keras_dp.per_example.rows import row_mask
from keras_dp.per_example.rows import seed_state_positions
from keras_dp.per_example.rows import squeeze
from keras_dp.per_example.units import unit_losses


def num_regularized_weights(model):
    """How many trainable weights carry a weight regularizer.

    `stateless_call(..., return_losses=True)` lists activity losses first and
    then one term per such weight, so this count splits the two.
    """
    return sum(
        1
        for v in model.trainable_weights
        if getattr(v, "regularizer", None) is not None
    )


def regularization_loss(model, trainable_values):
    """Sum of weight-regularizer losses at `trainable_values` (no data)."""
    mapping = list(zip(model.trainable_variables, trainable_values))
    with keras.StatelessScope(state_mapping=mapping):
        losses = keras_compat.regularization_losses(model)
    if not losses:
        return ops.zeros((), dtype="float32")
    return ops.sum(
        ops.stack(
            [keras_compat.aggregate_additional_loss(model, loss) for loss in losses]
        )
    )


@contextlib.contextmanager
def loss_trackers_paused(model):
    """Keeps the per-output loss trackers out of per-example losses.

    With several outputs, Keras's compiled loss updates one `Mean` tracker
    per output (`label_loss`, ...) each time it runs. Per-example losses
    run it once per example inside a stateless (on JAX: vectorized) scope
    where those updates would be lost or read detached variables; the
    trackers are updated once per batch by `step_metrics` instead.
    """
    compiled_loss = keras_compat.loss_with_output_trackers(model)
    if compiled_loss is None:
        yield
        return
    trackers = keras_compat.loss_trackers(compiled_loss)
    # A None tracker skips its output's update.
    keras_compat.set_loss_trackers(compiled_loss, [None] * len(trackers))
    try:
        yield
    finally:
        keras_compat.set_loss_trackers(compiled_loss, trackers)


def example_loss(model, mapping, x, y, y_pred, sample_weight, activity_losses=()):
    """One example's float32 loss: the model's `compute_loss` on the
    example as a batch of one (`x`, `y`, `y_pred`, `sample_weight` each
    with a batch axis of one; `y`, `sample_weight` may be None), with the
    variables at the values of `mapping` and the example's
    `activity_losses` added. Exactly 0 where the sample weight is 0
    everywhere."""
    # A non-empty override keeps compute_loss from adding the weight
    # regularization terms, which the train step adds once, unclipped.
    with (
        keras_compat.losses_override(model, list(activity_losses) or [ops.zeros(())]),
        keras.StatelessScope(state_mapping=mapping),
        loss_trackers_paused(model),
    ):
        loss = keras_compat.compute_loss(
            model,
            x=x,
            y=y,
            y_pred=y_pred,
            sample_weight=sample_weight,
            training=True,
        )
    # Under a tf.distribute strategy Keras scales the loss by one over the
    # number of replicas (it sums their gradients); an example's is its own.
    replicas = backend_lib.get_backend_module().replicas_in_sync()
    loss = ops.cast(loss, "float32") * replicas
    if sample_weight is not None:
        loss = ops.where(example_is_present(sample_weight), loss, ops.zeros_like(loss))
    return loss


# Keras's built-in loss functions that reduce only the last axis: on a
# batch they give each example's loss unmixed with the others (unlike
# e.g. `dice`, which reduces over the batch too).
_LAST_AXIS_LOSSES = frozenset(
    (
        "binary_crossentropy",
        "binary_focal_crossentropy",
        "categorical_crossentropy",
        "categorical_focal_crossentropy",
        "categorical_hinge",
        "cosine_similarity",
        "hinge",
        "huber",
        "kl_divergence",
        "log_cosh",
        "mean_absolute_error",
        "mean_absolute_percentage_error",
        "mean_squared_error",
        "mean_squared_logarithmic_error",
        "poisson",
        "sparse_categorical_crossentropy",
        "squared_hinge",
    )
)


def batched_example_losses(model, y, y_pred, sw):
    """Per-example losses from one call of the compiled loss on the batch,
    where that equals calling it on each example alone: one output, one
    built-in loss of the last axis, "sum_over_batch_size" reduction, no
    mask and no `compute_loss` override. None otherwise (the caller maps
    the compiled loss over the examples).

    Each example's loss is then its weighted loss values averaged over
    its own elements, as the reduction of a one-example batch does. (On
    TensorFlow the mapped loss is dozens of small ops, forward and
    backward.)
    """
    compiled_loss = keras_compat.compile_loss(model)
    if (
        not keras_compat.has_default_compute_loss(model)
        or compiled_loss is None
        or y is None
        or any(tree.is_nested(t) for t in (y, y_pred, sw))
        or keras_compat.keras_mask(y_pred) is not None
    ):
        return None
    if not compiled_loss.built:
        compiled_loss.build(y, y_pred)
    flat_losses = keras_compat.flat_losses(compiled_loss)
    if len(flat_losses) != 1:
        return None
    path, loss_fn, loss_weight, _ = flat_losses[0]
    if (
        path
        or not keras_compat.is_loss_function_wrapper(loss_fn)
        or keras_compat.builtin_loss_name(getattr(loss_fn, "fn", None))
        not in _LAST_AXIS_LOSSES
        or keras_compat.loss_function_kwargs(loss_fn).get("axis", -1) != -1
        or loss_fn.reduction != "sum_over_batch_size"
    ):
        return None
    dtype = loss_fn.dtype
    values = loss_fn.call(
        ops.convert_to_tensor(y, dtype=dtype),
        ops.convert_to_tensor(y_pred, dtype=dtype),
    )
    if keras_compat.keras_mask(values) is not None or not values.shape:
        return None
    values = keras_compat.reduce_weighted_values(
        values, sample_weight=sw, reduction="none", dtype=dtype
    )
    if len(values.shape) > 1:
        values = ops.mean(values, axis=tuple(range(1, len(values.shape))))
    values = ops.cast(ops.cast(values, compiled_loss.dtype), "float32")
    if loss_weight is not None:
        values = values * loss_weight
    if sw is not None:
        # A row whose weights are all 0 has loss exactly 0 (padding).
        present = row_mask(sw) > 0
        values = ops.where(present, values, ops.zeros_like(values))
    return values


def per_example_losses(model, trainable, new_non_trainable, x, y, y_pred, sw):
    """The fast path's `(n,)` losses of the batched predictions `y_pred`:
    `batched_example_losses` where exact, else the compiled loss mapped
    over the examples."""
    losses = batched_example_losses(model, y, y_pred, sw)
    if losses is not None:
        return losses
    mapping = list(zip(model.trainable_variables, trainable)) + list(
        zip(model.non_trainable_variables, new_non_trainable)
    )
    rows = {"x": x, "y_pred": y_pred}
    if y is not None:
        rows["y"] = y
    if sw is not None:
        rows["sample_weight"] = sw

    def one(row):
        return example_loss(
            model,
            mapping,
            expand(row["x"]),
            expand(row["y"]) if "y" in row else None,
            expand(row["y_pred"]),
            expand(row["sample_weight"]) if "sample_weight" in row else None,
        )

    return ops.vectorized_map(one, mappable(rows))


def example_loss_fn(model, rows_per_unit=1):
    """Returns `loss_fn(trainable, non_trainable, example) -> (loss, aux)`.

    `example` is a dict with `x`, `y`, `sample_weight` (any may be absent)
    and `index`, each without a batch axis. `aux` is `(y_pred, new
    non-trainable values)`. An example whose sample weight is 0 everywhere
    has loss exactly 0 (activity regularizers included), which is what makes
    zero-weight padding rows contribute nothing. Every `SeedGenerator` in
    the model gets a different state per example (by `index`), so dropout
    and other random layers draw an independent mask per example.

    With `rows_per_unit = R > 1` (`keras_dp.per_example.units`) `example`
    is one unit: `x`, `y`, `sample_weight` have a leading axis of its R
    rows, the model runs on them as a batch, and the loss is the mean of
    the real rows' losses (`unit_losses`) plus the activity losses of
    that call (Keras averages those over the R rows); `y_pred` keeps the
    R rows.

    Non-trainable variables that the call leaves untouched (frozen weights,
    e.g. a LoRA backbone) come back as a 0-d placeholder instead of a copy,
    so vectorizing does not stack one copy per example; their positions are
    missing from `loss_fn.updated_positions`, filled in when traced.
    """
    seed_positions = seed_state_positions(model)
    num_regularized = num_regularized_weights(model)
    call_kwargs = (
        {"training": True} if keras_compat.call_has_training_arg(model) else {}
    )

    # A unit's rows are a batch already.
    batch = expand if rows_per_unit == 1 else (lambda t: t)

    def loss_fn(trainable, non_trainable, example):
        x = batch(example["x"])
        y = batch(example["y"]) if "y" in example else None
        sample_weight = (
            batch(example["sample_weight"]) if "sample_weight" in example else None
        )
        non_trainable, offsets = offset_seed_states(
            non_trainable, seed_positions, example["index"]
        )
        y_pred, new_non_trainable, losses = model.stateless_call(
            trainable,
            non_trainable,
            x,
            return_losses=True,
            **call_kwargs,
        )
        # `losses` lists activity losses first and weight-regularization
        # losses last (Layer.losses); only the former depend on the example.
        activity_losses = list(losses[: len(losses) - num_regularized])
        mapping = list(zip(model.trainable_variables, trainable)) + list(
            zip(model.non_trainable_variables, new_non_trainable)
        )
        if rows_per_unit == 1:
            loss = example_loss(
                model, mapping, x, y, y_pred, sample_weight, activity_losses
            )
        else:
            loss = _unit_loss(
                model,
                trainable,
                new_non_trainable,
                (x, y, y_pred, sample_weight),
                activity_losses,
                rows_per_unit,
            )
        new_non_trainable = list(new_non_trainable)
        for k, before in enumerate(non_trainable):
            # Identity holds while tracing for state the call did not assign.
            if new_non_trainable[k] is before:
                new_non_trainable[k] = ops.zeros((), dtype=before.dtype)
            else:
                loss_fn.updated_positions.add(k)
        restore_seed_states(new_non_trainable, offsets, loss_fn.updated_positions)
        if rows_per_unit > 1:
            return loss, (y_pred, new_non_trainable)
        return loss, (squeeze(y_pred), new_non_trainable)

    loss_fn.updated_positions = set()
    return loss_fn


def _unit_loss(model, trainable, new_non_trainable, batch, activity_losses, rows):
    """One unit's float32 loss from its rows' batch `(x, y, y_pred,
    sample_weight)`: the mean of its real rows' losses, plus the call's
    activity losses where the unit has a real row."""
    x, y, y_pred, sample_weight = batch
    row_losses = per_example_losses(
        model, trainable, list(new_non_trainable), x, y, y_pred, sample_weight
    )
    loss = unit_losses(row_losses, sample_weight, rows)[0]
    if activity_losses and getattr(model._keras_dp, "rows_per_user", None):
        # Keras averages a call's activity losses over all its rows, a
        # user's padding rows included, so the user's loss would depend on
        # how many examples they have.
        raise ValueError(
            "User-level training (keras_dp.data.UserSampler) does not "
            "support activity regularizers or `add_loss` in `call` yet: "
            "Keras averages those over all of a user's rows, padding rows "
            "included. Remove the activity regularizer (or move the "
            "penalty into the loss), or train at the example level."
        )
    if activity_losses:
        activity = ops.sum(
            ops.stack([ops.cast(ops.sum(a), "float32") for a in activity_losses])
        )
        if sample_weight is not None:
            real = ops.sum(row_mask(sample_weight)) > 0
            activity = ops.where(real, activity, ops.zeros_like(activity))
        loss = loss + activity
    return loss
