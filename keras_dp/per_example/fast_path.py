"""The fast path's clipped gradient sum: ghost norms and book-keeping.

From one batched pass (`keras_dp.per_example.batched_pass`), the clipping
policy (`clipping.variable_clip_factors`) turns the per-variable squared
norms into per-variable factors `c_i` (every clipping mode, clipping
groups), and each rule's clipped-sum function gives `sum_i c_i g_i` by
book-keeping (Bu et al. 2023): no second backward pass. Examples whose norm
or loss is not finite are left out (`keras_dp.per_example.clip_factors`).
"""

from keras import ops
from keras import tree

from keras_dp.per_example.batched_pass import per_example_norms_and_sums
from keras_dp.per_example.clip_factors import scaled_factors
from keras_dp.per_example.clip_factors import sums_leaving_out_nonfinite
from keras_dp.per_example.gradient_space import gradient_space
from keras_dp.per_example.microbatches import microbatch_examples
from keras_dp.per_example.microbatches import scan_microbatches
from keras_dp.per_example.microbatches import unchunked
from keras_dp.per_example.plan import build_plan
from keras_dp.per_example.rows import offset_seed_states
from keras_dp.per_example.rows import restore_seed_states
from keras_dp.per_example.rows import seed_state_positions
from keras_dp.per_example.units import unit_mask


def fast_clipped_gradient_sum(
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
    """The fast path of `clipped_gradient_sum` (same arguments and result).
    With `rows_per_unit = R > 1` the rules fold each unit's rows into their
    position axes (`keras_dp.per_example.units`). In a model's own gradient
    space (`keras_dp.LowRankSparse`), kernels with carriers are clipped in
    carrier coordinates (`keras_dp.per_example.carriers`) and their sums
    come back mapped to the kernels.

    Raises `Unsupported` (at trace time) when the model needs the general
    vmap path. Examples whose gradient norm or loss is not finite get
    factor 0 and are left out of the sums exactly (`nonfinite` in the
    result marks them).
    """
    entries = build_plan(model)
    rows = ops.shape(tree.flatten(x)[0])[0]
    settings = getattr(model, "_keras_dp", None)
    rows_hint = microbatch_size or getattr(settings, "batch_size_hint", None)
    count_groups = clipping.num_count_groups

    def chunk_fn(nt, cx, cy, csw):
        squared, clipped_fn, losses, y_pred, new_nt = per_example_norms_and_sums(
            model,
            backend_ops,
            trainable,
            nt,
            cx,
            cy,
            csw,
            entries=entries,
            rows_hint=rows_hint,
            rows_per_unit=rows_per_unit,
            partitions=clipping.variable_partitions(),
        )
        factors = scaled_factors(clipping.variable_clip_factors(squared), scale)
        clipped, nonfinite = sums_leaving_out_nonfinite(
            squared,
            losses,
            factors,
            clipped_fn,
            conditional=backend_ops.NONFINITE_SUMS_IN_CONDITIONAL,
        )
        if count_groups:
            # Adaptive clipping's centred counts; padding rows count 0.
            mask = None if csw is None else unit_mask(csw, rows_per_unit)
            clipped.append(clipping.clip_counts(squared, mask))
        return clipped, losses, y_pred, new_nt, nonfinite

    def result(clipped, losses, y_pred, new_nt, nonfinite):
        out = {
            "clipped_sum": clipped[: len(trainable)],
            "losses": losses,
            "nonfinite": nonfinite,
            "y_pred": y_pred,
            "non_trainable": new_nt,
            "noise_spaces": gradient_space(model, non_trainable).noise_spaces(),
        }
        if count_groups:
            out["clip_counts"] = clipped[len(trainable)]
        return out

    if microbatch_size is None:
        return result(*chunk_fn(non_trainable, x, y, sample_weight))

    # Chunks of whole units.
    examples = microbatch_examples(
        x, y, sample_weight, rows, microbatch_size * rows_per_unit
    )
    seed_positions = seed_state_positions(model)

    def step(number, chunk):
        # Each chunk draws its own random masks: offset the seed states by
        # the chunk number (undone after, so the state advances as once).
        nt, offsets = offset_seed_states(non_trainable, seed_positions, number)
        clipped, losses, y_pred, new_nt, nonfinite = chunk_fn(
            nt, chunk["x"], chunk.get("y"), chunk["sample_weight"]
        )
        restore_seed_states(new_nt, offsets)
        return clipped, (losses, y_pred, new_nt, nonfinite)

    init = [ops.zeros(ops.shape(t), dtype="float32") for t in trainable]
    if count_groups:
        init.append(ops.zeros((count_groups,), dtype="float32"))
    clipped, (losses, y_pred, new_nt, nonfinite) = scan_microbatches(
        step, init, examples, microbatch_size * rows_per_unit, backend_ops
    )
    losses, nonfinite = unchunked((losses, nonfinite), rows // rows_per_unit)
    y_pred = unchunked(y_pred, rows)
    # With the seed offsets undone, every chunk leaves the state alike.
    new_nt = [t[0] for t in new_nt]
    return result(clipped, losses, y_pred, new_nt, nonfinite)
