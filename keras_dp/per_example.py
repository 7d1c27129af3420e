"""Vectorized per-example gradients and their clipped sum.

The backend modules supply one function, `value_and_grad(fn)`, and the glue
to their trainer's state; everything here is written with `keras.ops`:

- each example runs through `model.stateless_call` as a batch of one, under
  `ops.vectorized_map` (`jax.vmap` on JAX, `tf.vectorized_map` on TensorFlow);
- the compiled loss (or an overridden `compute_loss`) and activity
  regularizers are evaluated per example; weight regularizers are not part of
  the per-example loss (they are data-independent and added outside the
  clipped part by the train step);
- every `SeedGenerator` in the model gets a different state per example, so
  dropout and other random layers draw an independent mask per example;
- with `microbatch_size`, the batch is processed in chunks under a scan
  and only one chunk's per-example gradients exist at a time; the last
  chunk is padded with rows of zeros that have sample weight 0.

Non-finite examples (both this path and `keras_dp.fast_norms`): an
example whose gradient norm or loss is infinite or NaN (an overflowing
loss, an infinite input, a norm beyond float32's range) gets clip factor
exactly 0 and its gradient is left out of the clipped sum by a select,
never multiplied by 0 (`0 * inf` is NaN), so the update is the one of the
batch without it: finite, and no sign that the example was sampled. Rows
with sample weight 0 (padding) contribute exactly nothing even when their
values are not finite. `private_gradients` counts the dropped real examples
(`nonfinite_examples`, logged by the train step) and leaves their losses
(infinite or NaN ones among them) out of the logged loss. Like the logged
loss, that count is computed from the data without noise: it is for the
person training, not differentially private. A step without a non-finite
example pays only for a test on the squared norms and losses: the exact way
of leaving rows out runs under `ops.cond` in the other steps.
"""

import contextlib
import warnings

import keras
from keras import ops
from keras import tree

from keras_dp import clipping as clipping_lib

# The train step's log of the real examples left out of the update because
# their gradient norm or loss was not finite (a count per step; like the
# logged loss, not differentially private).
NONFINITE_LOG = "nonfinite_examples"

# Odd constant that spreads example indices over the first word of a
# SeedGenerator state; the second word is the per-call counter, which must
# stay aligned across examples.
_SEED_STRIDE = 1_000_003


def _seed_state_ids(model):
    ids = set()
    for layer in model._flatten_layers(include_self=True):
        for generator in getattr(layer, "_seed_generators", []):
            ids.add(id(generator.state))
    return ids


def _expand(structure):
    return tree.map_structure(lambda t: ops.expand_dims(t, 0), structure)


def _squeeze(structure):
    return tree.map_structure(lambda t: ops.squeeze(t, 0), structure)


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
        losses = model._get_regularization_losses()
    if not losses:
        return ops.zeros((), dtype="float32")
    return ops.sum(
        ops.stack([model._aggregate_additional_loss(l) for l in losses])
    )


def example_loss_fn(model):
    """Returns `loss_fn(trainable, non_trainable, example) -> (loss, aux)`.

    `example` is a dict with `x`, `y`, `sample_weight` (any may be absent)
    and `index`, each without a batch axis. `aux` is `(y_pred, new
    non-trainable values)`. An example whose sample weight is 0 everywhere
    has loss exactly 0 (activity regularizers included), which is what makes
    zero-weight padding rows contribute nothing.

    Non-trainable variables that the call leaves untouched (frozen weights,
    e.g. a LoRA backbone) come back as a 0-d placeholder instead of a copy,
    so vectorizing does not stack one copy per example; their positions are
    missing from `loss_fn.updated_positions`, filled in when traced.
    """
    seed_ids = _seed_state_ids(model)
    seed_positions = [
        k
        for k, v in enumerate(model.non_trainable_variables)
        if id(v) in seed_ids
    ]
    num_regularized = num_regularized_weights(model)
    call_kwargs = {"training": True} if model._call_has_training_arg else {}

    def loss_fn(trainable, non_trainable, example):
        x = _expand(example["x"])
        y = _expand(example["y"]) if "y" in example else None
        sample_weight = (
            _expand(example["sample_weight"])
            if "sample_weight" in example
            else None
        )
        non_trainable = list(non_trainable)
        offsets = {}
        for k in seed_positions:
            state = non_trainable[k]
            offset = ops.cast(
                ops.stack(
                    [(ops.cast(example["index"], "int32") + 1) * _SEED_STRIDE, 0]
                ),
                state.dtype,
            )
            offsets[k] = offset
            non_trainable[k] = state + offset
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
        # A non-empty override keeps compute_loss from adding the weight
        # regularization terms, which the train step adds once, unclipped.
        model._losses_override = activity_losses or [ops.zeros(())]
        try:
            with keras.StatelessScope(
                state_mapping=mapping
            ), loss_trackers_paused(model):
                loss = model._compute_loss(
                    x=x,
                    y=y,
                    y_pred=y_pred,
                    sample_weight=sample_weight,
                    training=True,
                )
        finally:
            model._losses_override = []
        loss = ops.cast(loss, "float32")
        if sample_weight is not None:
            weights = [
                ops.any(ops.not_equal(w, 0))
                for w in tree.flatten(sample_weight)
            ]
            present = ops.any(ops.stack(weights))
            loss = ops.where(present, loss, ops.zeros_like(loss))
        new_non_trainable = list(new_non_trainable)
        for k, before in enumerate(non_trainable):
            # Identity holds while tracing for state the call did not assign.
            if new_non_trainable[k] is before:
                new_non_trainable[k] = ops.zeros((), dtype=before.dtype)
            else:
                loss_fn.updated_positions.add(k)
        for k, offset in offsets.items():
            if k in loss_fn.updated_positions:
                new_non_trainable[k] = new_non_trainable[k] - offset
        return loss, (_squeeze(y_pred), new_non_trainable)

    loss_fn.updated_positions = set()
    return loss_fn


def _pad_rows(structure, pad):
    def pad_one(t):
        widths = [(0, pad)] + [(0, 0)] * (len(t.shape) - 1)
        return ops.pad(t, widths)

    return tree.map_structure(pad_one, structure)


def _reduce_non_trainable(model, stacked, mask, updated_positions, before):
    """One value per non-trainable variable from its per-example values.

    State no example updated keeps its value `before`. Seed states and other
    integer state take the first example's value (all examples advance them
    alike). Float state (statistics kept by custom layers) takes the mean
    over the examples with `mask` 1 (real, finite ones), which is what a
    batched forward pass gives for mean-type statistics; the others are
    left out by a select, so a NaN there does not spread.
    """
    seed_ids = _seed_state_ids(model)
    reduced = []
    for k, (variable, values) in enumerate(
        zip(model.non_trainable_variables, stacked)
    ):
        if k not in updated_positions:
            reduced.append(before[k])
        elif id(variable) in seed_ids or not keras.backend.is_float_dtype(
            values.dtype
        ):
            reduced.append(values[0])
        else:
            keep = ops.reshape(
                ops.not_equal(mask, 0), (-1,) + (1,) * (len(values.shape) - 1)
            )
            total = ops.maximum(ops.sum(mask), 1.0)
            kept = ops.where(keep, values, ops.zeros((), values.dtype))
            reduced.append(
                ops.sum(kept, axis=0) / ops.cast(total, values.dtype)
            )
    return reduced


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
    path can be several times slower, which should not go unnoticed."""
    previous = getattr(settings, "per_example_path", None)
    if previous != ("vmap", reason):
        warnings.warn(_FALLBACK_WARNING.format(reason=reason), stacklevel=2)


def clipped_gradient_sum(
    model,
    optimizer,
    backend_ops,
    trainable,
    non_trainable,
    x,
    y=None,
    sample_weight=None,
    microbatch_size=None,
    scale=None,
):
    """Clipped per-example gradient sum of one batch.

    Args:
        model: the private model.
        optimizer: a DP optimizer; its `variable_clip_factors` turns
            per-variable squared norms into per-example factors.
        backend_ops: the backend module (`value_and_grad`, `scan`).
        trainable, non_trainable: current variable values (lists).
        x, y, sample_weight: the batch.
        microbatch_size: examples whose per-example gradients exist at once.
        scale: if given, a scalar that multiplies every clipped gradient
            (the private step's `1 / B`), applied to the per-example clip
            factors rather than to the summed gradients.

    Returns:
        Dict with `clipped_sum` (list, one tensor per trainable variable),
        `losses` (per-example losses, shape `(rows,)`), `nonfinite`
        (`(rows,)` bool: the examples whose gradient norm or loss is not
        finite, given factor 0 and left out of the sum), `y_pred`
        (batched) and `non_trainable` (updated values).

    With the model's `per_example` setting "auto" (the default) the fast
    path of `keras_dp.fast_norms` (ghost norms, book-keeping) is used when
    it supports the model, else the vmap path below; "vmap" forces the
    latter, "fast" the former (error if unsupported).
    """
    settings = getattr(model, "_keras_dp", None)
    mode = getattr(settings, "per_example", "auto")
    # Why the fast path is not taken; None: it is.
    reason = None
    if mode == "vmap":
        reason = "per_example='vmap'"
    elif getattr(optimizer, "needs_vmap_path", False):
        reason = (
            "clip_groups='per_device' clips the shards of sharded variables "
            "apart, and only the vmap path computes per-shard norms"
        )
    elif hasattr(model, "private_gradient_space"):
        reason = (
            "the model projects per-example gradients into its own space "
            "(LowRankSparse), which only the vmap path does"
        )
    else:
        from keras_dp import fast_norms

        try:
            result = fast_norms.clipped_gradient_sum(
                model,
                optimizer,
                backend_ops,
                trainable,
                non_trainable,
                x,
                y,
                sample_weight,
                microbatch_size=microbatch_size,
                scale=scale,
            )
        except fast_norms.Unsupported as error:
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
    with getattr(backend_ops, "vectorizable_layers", _unchanged)(model):
        return _vmap_clipped_gradient_sum(
            model, optimizer, backend_ops, trainable, non_trainable, x, y,
            sample_weight, microbatch_size, scale,
        )


@contextlib.contextmanager
def _unchanged(model):
    yield


def _vmap_clipped_gradient_sum(
    model, optimizer, backend_ops, trainable, non_trainable, x, y,
    sample_weight, microbatch_size, scale,
):
    """The vmap path of `clipped_gradient_sum`: per-example gradients of
    the whole model under `ops.vectorized_map`."""
    rows = ops.shape(tree.flatten(x)[0])[0]
    examples = {"x": x}
    if y is not None:
        examples["y"] = y
    if sample_weight is not None:
        examples["sample_weight"] = sample_weight
    loss_fn = example_loss_fn(model)
    grad_fn = backend_ops.value_and_grad(loss_fn)
    space = gradient_space(model, non_trainable)
    part_shapes = space.part_shapes()
    # Group-wise clipping (keras_dp.groups): per-shard norms of variables
    # split across devices, and the optimizer's adaptive-clipping counts.
    partitions = _clip_partitions(model, optimizer, part_shapes)
    count_groups = getattr(optimizer, "num_count_groups", 0)

    def chunk_fn(chunk):
        def one_example(example):
            (loss, aux), grads = grad_fn(trainable, non_trainable, example)
            return grads, loss, aux

        grads, losses, (y_pred, new_nt) = ops.vectorized_map(
            one_example, chunk
        )
        parts = space.project([ops.cast(g, "float32") for g in grads])
        squared_norms = [
            sum(
                clipping_lib.per_example_squared_norms(
                    variable_parts, [p] * len(variable_parts)
                )
            )
            for variable_parts, p in zip(parts, partitions)
        ]
        factors = scaled_factors(
            optimizer.variable_clip_factors(squared_norms), scale
        )

        def sums(factors, zero_rows):
            return [
                part
                for variable_parts, f, p in zip(parts, factors, partitions)
                for part in clipping_lib.weighted_sum(
                    variable_parts, f, [p] * len(variable_parts), zero_rows
                )
            ]

        def finite_step():
            return sums(factors, False), ops.zeros(ops.shape(losses), "bool")

        def step_with_nonfinite():
            # Factor 0 for the non-finite examples, left out exactly (a
            # pass over the per-example gradients).
            nonfinite = clipping_lib.nonfinite_examples(squared_norms, losses)
            zeroed = clipping_lib.zero_factors(factors, nonfinite)
            return sums(zeroed, True), nonfinite

        clipped, nonfinite = ops.cond(
            clipping_lib.all_finite(squared_norms, losses),
            finite_step,
            step_with_nonfinite,
        )
        clipped = list(clipped)
        if count_groups:
            mask = (
                _row_mask(chunk["sample_weight"])
                if "sample_weight" in chunk
                else None
            )
            clipped.append(optimizer.clip_counts(squared_norms, mask))
        return clipped, losses, y_pred, new_nt, nonfinite

    if microbatch_size is None:
        examples["index"] = ops.arange(rows, dtype="int32")
        clipped, losses, y_pred, new_nt, nonfinite = chunk_fn(examples)
        mask = ops.ones((rows,), dtype="float32")
        if sample_weight is not None:
            mask = _row_mask(sample_weight)
    else:
        pad = (-rows) % microbatch_size
        if sample_weight is None:
            examples["sample_weight"] = ops.ones((rows,), dtype="float32")
        examples = _pad_rows(examples, pad)
        padded_rows = rows + pad
        examples["index"] = ops.arange(padded_rows, dtype="int32")
        chunks = tree.map_structure(
            lambda t: ops.reshape(
                t, (-1, microbatch_size) + tuple(t.shape[1:])
            ),
            examples,
        )

        def scan_fn(total, chunk):
            clipped, losses, y_pred, new_nt, nonfinite = chunk_fn(chunk)
            total = [a + b for a, b in zip(total, clipped)]
            return total, (losses, y_pred, new_nt, nonfinite)

        init = [
            ops.zeros(shape, dtype="float32")
            for shapes in part_shapes
            for shape in shapes
        ]
        if count_groups:
            init.append(ops.zeros((count_groups,), dtype="float32"))
        clipped, stacked = backend_ops.scan(scan_fn, init, chunks)
        losses, y_pred, new_nt, nonfinite = tree.map_structure(
            lambda t: ops.reshape(t, (-1,) + tuple(t.shape[2:]))[:rows],
            stacked,
        )
        mask = _row_mask(examples["sample_weight"])[:rows]
    # Non-finite examples' state updates are left out too.
    state_mask = ops.where(nonfinite, ops.zeros_like(mask), mask)
    clip_counts = None
    if count_groups:
        clipped, clip_counts = list(clipped[:-1]), clipped[-1]
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


def scaled_factors(factors, scale):
    """Per-variable clip factors times `scale` (None: unchanged).

    Scaling the `(n,)` factors instead of the summed gradients saves a
    pass over every gradient (on TensorFlow's MLP benchmark, 0.3 ms of
    thread time per step); variables that share a factor tensor (one
    clipping group) share the product.
    """
    if scale is None:
        return factors
    products = {}
    for f in factors:
        if id(f) not in products:
            products[id(f)] = f * ops.cast(scale, f.dtype)
    return [products[id(f)] for f in factors]


@contextlib.contextmanager
def loss_trackers_paused(model):
    """Keeps the per-output loss trackers out of per-example losses.

    With several outputs, Keras's compiled loss updates one `Mean` tracker
    per output (`label_loss`, ...) each time it runs. Per-example losses
    run it once per example inside a stateless (on JAX: vectorized) scope
    where those updates would be lost or read detached variables; the
    trackers are updated once per batch by `step_metrics` instead.
    """
    compile_loss = getattr(model, "_compile_loss", None)
    if compile_loss is None or not compile_loss.built or not compile_loss.metrics:
        yield
        return
    trackers = compile_loss._metrics
    # `CompileLoss.call` zips the trackers with the losses and skips Nones.
    compile_loss._metrics = [None] * len(trackers)
    try:
        yield
    finally:
        compile_loss._metrics = trackers


def _update_loss_trackers(model, y, y_pred, sample_weight, expected_batch_size):
    """Per-output losses of the batch, on the scale of the logged `loss`.

    The logged loss is the per-example sum over the expected batch size
    `B`; Keras's default reduction divides by the row count, so the values
    are rescaled by `rows / B` (1 for fixed-size batches).
    """
    compile_loss = getattr(model, "_compile_loss", None)
    if compile_loss is None or not compile_loss.built or not compile_loss.metrics:
        return
    rows = ops.cast(ops.shape(tree.flatten(y_pred)[0])[0], "float32")
    scale = rows / ops.cast(expected_batch_size, "float32")
    trackers = compile_loss._metrics
    compile_loss._metrics = [_ScaledTracker(t, scale) for t in trackers]
    try:
        # Keras's own call resolves the output structure; its total is unused.
        compile_loss(y, y_pred, sample_weight)
    finally:
        compile_loss._metrics = trackers


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
            model, y_true, y_pred, sample_weight, step["expected_batch_size"]
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
    metrics = getattr(model, "_compile_metrics", None)
    if metrics is None or row_mask is None:
        yield
        return
    update_state = metrics.update_state

    def masked_update_state(y_true, y_pred, sample_weight=None):
        if not metrics.built:
            metrics.build(y_true, y_pred)
        flat = metrics._flat_metrics
        metrics._flat_metrics = [
            None if m is None else _RowMaskedMetric(m, row_mask) for m in flat
        ]
        try:
            update_state(y_true, y_pred, sample_weight)
        finally:
            metrics._flat_metrics = flat

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


class GradientSpace:
    """The coordinates in which per-example gradients are clipped and noised.

    This default is the identity: every coordinate of every trainable
    variable. A model may define `private_gradient_space(non_trainable)`
    returning another space (`keras_dp.LowRankSparse` does: low-rank
    carriers). A space maps each variable's per-example gradient to a list
    of parts (`project`), maps summed parts back (`reconstruct`, linear), and
    tells the optimizer how to draw noise in the parts (`noise_spaces`).
    """

    def __init__(self, trainable_variables):
        self.shapes = [tuple(v.shape) for v in trainable_variables]

    def part_shapes(self):
        return [[shape] for shape in self.shapes]

    def project(self, per_example_grads):
        return [[g] for g in per_example_grads]

    def reconstruct(self, summed_parts):
        return [parts[0] for parts in summed_parts]

    def noise_spaces(self):
        return None


def gradient_space(model, non_trainable):
    make_space = getattr(model, "private_gradient_space", None)
    if make_space is None:
        return GradientSpace(model.trainable_variables)
    return make_space(non_trainable)


def _unflatten_parts(flat, part_shapes):
    parts, k = [], 0
    for shapes in part_shapes:
        parts.append(list(flat[k : k + len(shapes)]))
        k += len(shapes)
    return parts


def _clip_partitions(model, optimizer, part_shapes):
    """Per variable: None, or `(axis, shards)` for per-shard norms."""
    partitions = getattr(optimizer, "variable_partitions", lambda: None)()
    if not partitions or not any(partitions):
        return [None] * len(part_shapes)
    if hasattr(model, "private_gradient_space"):
        raise ValueError(
            "clip_groups='per_device' with sharded variables is not "
            "supported for models with their own gradient space."
        )
    return list(partitions)


def _row_mask(sample_weight):
    """1.0 for rows with any non-zero sample weight, else 0.0."""
    flags = []
    for w in tree.flatten(sample_weight):
        w = ops.reshape(w, (ops.shape(w)[0], -1))
        flags.append(ops.any(ops.not_equal(w, 0), axis=1))
    present = flags[0]
    for f in flags[1:]:
        present = ops.logical_or(present, f)
    return ops.cast(present, "float32")


def private_gradients(
    model,
    backend_ops,
    trainable,
    non_trainable,
    x,
    y=None,
    sample_weight=None,
):
    """Everything a DP train step needs except the noise.

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
    """
    settings = model._keras_dp
    if settings.expected_batch_size is not None:
        static_expected = settings.expected_batch_size
        expected = ops.cast(settings.expected_batch_size, "float32")
    else:
        static_expected = tree.flatten(x)[0].shape[0]
        expected = ops.cast(ops.shape(tree.flatten(x)[0])[0], "float32")
    result = clipped_gradient_sum(
        model,
        model.optimizer,
        backend_ops,
        trainable,
        non_trainable,
        x,
        y,
        sample_weight,
        microbatch_size=settings.microbatch_size,
        scale=1.0 / expected,
    )
    grads = [
        ops.cast(s, v.dtype)
        for s, v in zip(result["clipped_sum"], model.trainable_variables)
    ]
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
    )
    # Rows of weight 0 (padding) are not counted.
    row_mask = None if sample_weight is None else _row_mask(sample_weight)
    dropped = ops.cast(nonfinite, "float32")
    if row_mask is not None:
        dropped = dropped * row_mask
    padded = settings.expected_batch_size is not None and sample_weight is not None
    return {
        "row_mask": row_mask if padded else None,
        "grads": grads,
        "noise_spaces": result.get("noise_spaces"),
        "expected_batch_size": expected,
        # Python number when known at trace time (adaptive clipping's
        # count noise), and the noisy-count inputs (None without it).
        "static_expected_batch_size": static_expected,
        "clip_counts": result.get("clip_counts"),
        "loss": loss,
        "nonfinite_examples": ops.sum(dropped),
        "y_pred": result["y_pred"],
        "non_trainable": result["non_trainable"],
    }
