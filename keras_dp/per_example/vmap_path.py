"""The vmap path: per-example gradients of the whole model, vectorized.

The general path, for every model (the fast path falls back to it):

- each example runs through `model.stateless_call` as a batch of one, under
  `ops.vectorized_map` (`jax.vmap` on JAX, `tf.vectorized_map` on
  TensorFlow), and its gradient is taken with the backend's
  `value_and_grad`;
- the compiled loss (or an overridden `compute_loss`) and activity
  regularizers are evaluated per example (`keras_dp.per_example.losses`);
- every `SeedGenerator` in the model gets a different state per example, so
  dropout and other random layers draw an independent mask per example;
- per-example gradients may be projected into the model's own gradient
  space (`keras_dp.LowRankSparse`), and variables sharded across devices
  clipped per shard (`clip_groups='per_device'`), for any layer;
- with `microbatch_size`, the batch is processed in chunks under a scan
  (`keras_dp.per_example.microbatches`);
- with `rows_per_unit > 1`, it maps over units of rows, each unit's rows
  run through the model as one batch (`keras_dp.per_example.units`).
"""

import keras
from keras import ops
from keras import tree

from keras_dp import clipping as clipping_lib
from keras_dp.per_example.clip_factors import scaled_factors
from keras_dp.per_example.clip_factors import sums_leaving_out_nonfinite
from keras_dp.per_example.gradient_space import gradient_space
from keras_dp.per_example.losses import example_loss_fn
from keras_dp.per_example.microbatches import microbatch_examples
from keras_dp.per_example.microbatches import scan_microbatches
from keras_dp.per_example.microbatches import unchunked
from keras_dp.per_example.rows import mappable
from keras_dp.per_example.rows import row_mask
from keras_dp.per_example.rows import seed_state_ids
from keras_dp.per_example.units import grouped
from keras_dp.per_example.units import rows_of_units


def vmap_clipped_gradient_sum(
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
    """The vmap path of `clipped_gradient_sum` (same arguments and
    result). With `rows_per_unit = R > 1` it maps over units of R rows
    (`keras_dp.per_example.units`), the model running on each unit's rows
    as a batch."""
    # The backend's changes that let its vectorized map run the model (on
    # TensorFlow, recurrent layers unrolled while tracing).
    with backend_ops.vectorizable_layers(model):
        return _vectorized_clipped_sum(
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


def _vectorized_clipped_sum(
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
):
    x, y, sample_weight = mappable((x, y, sample_weight))
    if rows_per_unit > 1:
        if sample_weight is None:
            # Microbatch padding units need weights for each of their rows.
            sample_weight = ops.ones(
                (ops.shape(tree.flatten(x)[0])[0],), dtype="float32"
            )
        # From here on a "row" is a unit: (U, R, ...).
        x, sample_weight = grouped((x, sample_weight), rows_per_unit)
        y = None if y is None else grouped(y, rows_per_unit)
    rows = ops.shape(tree.flatten(x)[0])[0]
    loss_fn = example_loss_fn(model, rows_per_unit)
    grad_fn = backend_ops.value_and_grad(loss_fn)
    space = gradient_space(model, non_trainable)
    part_shapes = space.part_shapes()
    # Group-wise clipping (keras_dp.groups): per-shard norms of variables
    # split across devices, and adaptive clipping's counts.
    partitions = _clip_partitions(model, clipping, part_shapes)
    count_groups = getattr(clipping, "num_count_groups", 0)

    def chunk_fn(chunk):
        def one_example(example):
            (loss, aux), grads = grad_fn(trainable, non_trainable, example)
            return grads, loss, aux

        grads, losses, (y_pred, new_nt) = _map_rows(one_example, chunk)
        parts = space.project([ops.cast(g, "float32") for g in grads])
        squared_norms = [
            sum(
                clipping_lib.per_example_squared_norms(
                    variable_parts, [p] * len(variable_parts)
                )
            )
            for variable_parts, p in zip(parts, partitions)
        ]
        factors = scaled_factors(clipping.variable_clip_factors(squared_norms), scale)

        def sums(factors, zero_rows):
            return [
                part
                for variable_parts, f, p in zip(parts, factors, partitions)
                for part in clipping_lib.weighted_sum(
                    variable_parts, f, [p] * len(variable_parts), zero_rows
                )
            ]

        clipped, nonfinite = sums_leaving_out_nonfinite(
            squared_norms,
            losses,
            factors,
            sums,
            conditional=backend_ops.NONFINITE_SUMS_IN_CONDITIONAL,
        )
        if count_groups:
            mask = (
                row_mask(chunk["sample_weight"]) if "sample_weight" in chunk else None
            )
            clipped.append(clipping.clip_counts(squared_norms, mask))
        return clipped, losses, y_pred, new_nt, nonfinite

    if microbatch_size is None:
        examples = {"x": x}
        if y is not None:
            examples["y"] = y
        if sample_weight is not None:
            examples["sample_weight"] = sample_weight
        examples["index"] = ops.arange(rows, dtype="int32")
        clipped, losses, y_pred, new_nt, nonfinite = chunk_fn(examples)
        mask = ops.ones((rows,), dtype="float32")
        if sample_weight is not None:
            mask = row_mask(sample_weight)
    else:
        examples = microbatch_examples(x, y, sample_weight, rows, microbatch_size)
        padded_rows = ops.shape(tree.flatten(examples["x"])[0])[0]
        examples["index"] = ops.arange(padded_rows, dtype="int32")

        def step(number, chunk):
            clipped, losses, y_pred, new_nt, nonfinite = chunk_fn(chunk)
            return clipped, (losses, y_pred, new_nt, nonfinite)

        init = [
            ops.zeros(shape, dtype="float32")
            for shapes in part_shapes
            for shape in shapes
        ]
        if count_groups:
            init.append(ops.zeros((count_groups,), dtype="float32"))
        clipped, stacked = scan_microbatches(
            step, init, examples, microbatch_size, backend_ops
        )
        losses, y_pred, new_nt, nonfinite = unchunked(stacked, rows)
        mask = row_mask(examples["sample_weight"])[:rows]
    # Non-finite examples' state updates are left out too.
    state_mask = ops.where(nonfinite, ops.zeros_like(mask), mask)
    clip_counts = None
    if count_groups:
        clipped, clip_counts = list(clipped[:-1]), clipped[-1]
    if rows_per_unit > 1:
        y_pred = tree.map_structure(rows_of_units, y_pred)
    return {
        "clip_counts": clip_counts,
        "clipped_sum": space.reconstruct(_unflatten_parts(clipped, part_shapes)),
        "noise_spaces": space.noise_spaces(),
        "losses": losses,
        "nonfinite": nonfinite,
        "y_pred": y_pred,
        "non_trainable": _reduce_non_trainable(
            model, new_nt, state_mask, loss_fn.updated_positions, non_trainable
        ),
    }


def _map_rows(fn, rows):
    """`ops.vectorized_map(fn, rows)`, with one row mapped twice where the
    number of rows is not static (a TensorFlow graph traced for batches of
    any size) and is 1 when the step runs: over one row, the loop that
    TensorFlow's pfor falls back to for per-example random ops (an LSTM's
    dropout) gives its results wrong shapes ("Incompatible shapes: [20,
    20,5] vs. [20,1,5,20]", TensorFlow 2.21). The copy's results are
    dropped."""
    first = tree.flatten(rows)[0]
    if first.shape[0] is not None:
        return ops.vectorized_map(fn, rows)
    count = ops.shape(first)[0]
    index = ops.arange(count + ops.cast(ops.equal(count, 1), "int32"))
    index = index % ops.maximum(count, 1)
    mapped = ops.vectorized_map(
        fn, tree.map_structure(lambda t: ops.take(t, index, axis=0), rows)
    )
    return tree.map_structure(lambda t: t[:count], mapped)


def _reduce_non_trainable(model, stacked, mask, updated_positions, before):
    """One value per non-trainable variable from its per-example values.

    State no example updated keeps its value `before`. Seed states and other
    integer state take the first example's value (all examples advance them
    alike). Float state (statistics kept by custom layers) takes the mean
    over the examples with `mask` 1 (real, finite ones), which is what a
    batched forward pass gives for mean-type statistics; the others are
    left out by a select, so a NaN there does not spread.
    """
    seed_ids = seed_state_ids(model)
    reduced = []
    for k, (variable, values) in enumerate(zip(model.non_trainable_variables, stacked)):
        if k not in updated_positions:
            reduced.append(before[k])
        elif id(variable) in seed_ids or not keras.backend.is_float_dtype(values.dtype):
            reduced.append(values[0])
        else:
            keep = ops.reshape(
                ops.not_equal(mask, 0), (-1,) + (1,) * (len(values.shape) - 1)
            )
            total = ops.maximum(ops.sum(mask), 1.0)
            kept = ops.where(keep, values, ops.zeros((), values.dtype))
            reduced.append(ops.sum(kept, axis=0) / ops.cast(total, values.dtype))
    return reduced


def _unflatten_parts(flat, part_shapes):
    parts, k = [], 0
    for shapes in part_shapes:
        parts.append(list(flat[k : k + len(shapes)]))
        k += len(shapes)
    return parts


def _clip_partitions(model, clipping, part_shapes):
    """Per variable: None, or `(axis, shards)` for per-shard norms."""
    partitions = getattr(clipping, "variable_partitions", lambda: None)()
    if not partitions or not any(partitions):
        return [None] * len(part_shapes)
    if hasattr(model, "private_gradient_space"):
        raise ValueError(
            "clip_groups='per_device' with sharded variables is not "
            "supported for models with their own gradient space."
        )
    return list(partitions)
