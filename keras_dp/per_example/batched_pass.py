"""The batched pass: every per-example quantity clipping needs, in one pass.

Instead of one forward/backward per example (the vmap path):

1. The layers of the plan are recorded (`keras_dp.per_example.recording`):
   their inputs, and a tap at the tensor whose gradient each one's rule
   needs.
2. The per-example losses `L_i` are evaluated per row from the batched
   predictions (`keras_dp.per_example.losses`). Rows are independent
   (batch-mixing layers are banned), so the gradient of `sum_i L_i` with
   respect to a tap holds each example's own output gradient `B_i` in its
   row. This backward pass computes no weight gradients at all.
3. Each layer's rule turns its inputs and output gradients into per-example
   squared norms and clipped-sum functions per variable (the rule modules
   of this package, or a user's: `register_per_example_rule`).

Rules run in the order the layers' output gradients become available, each
after the previous one (`backend.after`, on tensors with positions: see
`_after_if_positional`), so that the intermediates of one layer at a time
are in memory; otherwise TensorFlow runs whatever is ready
and XLA may compute a layer's patches during the forward pass and hold them
until the backward pass. On TensorFlow the rules run inside the backward
pass (see `batched_pass`), so that output gradients do not pile up
waiting.
"""

import keras
from keras import ops

from keras_dp import keras_compat
from keras_dp.per_example.carriers import KernelCarriers
from keras_dp.per_example.gradient_space import gradient_space
from keras_dp.per_example.losses import num_regularized_weights
from keras_dp.per_example.losses import per_example_losses
from keras_dp.per_example.plan import build_plan
from keras_dp.per_example.recording import Recorder
from keras_dp.per_example.recording import rule_grads
from keras_dp.per_example.registry import RecordedCall
from keras_dp.per_example.registry import RuleContext
from keras_dp.per_example.registry import Unsupported
from keras_dp.per_example.rows import InstantiatedTerms
from keras_dp.per_example.rows import f32
from keras_dp.per_example.rows import replace_tensor_leaves
from keras_dp.per_example.rows import shaped_like
from keras_dp.per_example.rows import tensor_leaves
from keras_dp.per_example.units import unit_losses
from keras_dp.per_example.units import unit_rows


def _make_run(model, trainable, non_trainable, x, y, sw, rows_per_unit=1):
    num_regularized = num_regularized_weights(model)
    call_kwargs = (
        {"training": True} if keras_compat.call_has_training_arg(model) else {}
    )

    def run(track_trainable=False):
        values = trainable
        if track_trainable:
            # PyTorch: with trainable values that autograd tracks, every
            # tapped output has a gradient of its own (see `batched_pass`).
            values = [t.detach().requires_grad_() for t in trainable]
        y_pred, new_nt, losses = model.stateless_call(
            values, non_trainable, x, return_losses=True, **call_kwargs
        )
        if len(losses) > num_regularized:
            raise Unsupported("the model adds losses in call (activity regularization)")
        new_nt = list(new_nt)
        losses = per_example_losses(model, values, new_nt, x, y, y_pred, sw)
        # The taps' gradients are those of the units' losses.
        losses = unit_losses(losses, sw, rows_per_unit)
        return losses, y_pred, new_nt

    return run


def _ordered_terms(entry, terms, context):
    """The rule's `(variable, squared norms, clipped_sum)` triples as
    `(squared norms, clipped_sum)` pairs in the order of `entry.variables`.
    Triples for variables the model does not train (frozen ones) are
    dropped. A variable clipped per device shard gets `(n, shards)` norms
    (from the rule, or split here from instantiated gradients)."""
    by_id = {}
    for item in terms:
        try:
            variable, sq, fn = item
        except (TypeError, ValueError):
            raise TypeError(
                f"The per-example rule {entry.kind!r} of layer "
                f"{entry.layer.name!r} must return (variable, squared_norms, "
                f"clipped_sum) triples. Received an item {item!r}."
            ) from None
        partition = context.partition_of(variable)
        if partition is not None and len(sq.shape) == 1:
            if not isinstance(item, InstantiatedTerms):
                raise Unsupported(
                    f"clip_groups='per_device': the per-example rule "
                    f"{entry.kind!r} of layer {entry.layer.name!r} gives one "
                    f"norm for the sharded variable {variable.path!r}, not "
                    "one per shard"
                )
            sq, fn = item.per_shard(partition)
        by_id[id(variable)] = (sq, fn)
    missing = [v.path for v in entry.variables if id(v) not in by_id]
    if missing:
        raise Unsupported(
            f"the per-example rule {entry.kind!r} of layer "
            f"{entry.layer.name!r} returned no terms for {missing}; a rule "
            "returns a (variable, squared_norms, clipped_sum) triple for "
            "each variable of `context.variables`"
        )
    return [by_id[id(v)] for v in entry.variables]


def _run_rule(entry, record, own_grads, make_context, backend_ops, previous=()):
    """The entry's rule on its recorded call and tap gradients, once
    `previous` are computed; its `(squared norms, clipped_sum)` pairs.

    The layer's inputs are read only once its output gradients exist (not
    in the forward pass, which would hold e.g. its patches until then).
    """
    own_grads = _after_if_positional(backend_ops, list(previous), own_grads)
    record.args = _after_if_positional(
        backend_ops, list(own_grads.values()), record.args
    )
    context = make_context(entry, record)
    call_and_grads = (record.args, rule_grads(entry, record, own_grads))
    if context.rows_per_unit > 1:
        call_and_grads = _units_for_rule(entry, call_and_grads, context.rows_per_unit)
    (args, kwargs), grads = call_and_grads
    terms = entry.rule.fn(entry.layer, RecordedCall(args, kwargs), grads, context)
    return _ordered_terms(entry, terms, context)


def _after_if_positional(backend_ops, dependencies, structure):
    """`structure` with `backend_ops.after(dependencies, ...)` applied to its
    tensors of more than two axes (a batch of sequences or maps).

    Ordering bounds the memory of what rules build from such tensors
    (patches, Gram matrices over positions, per-example gradients). From a
    `(batch, features)` tensor the built-in rules build nothing larger
    than it, and on XLA:CPU the ordering's `+ 0 * d` keeps the squared-norm
    reductions from fusing with their input, which then is written out once
    more (`benchmarks/RESULTS.md`, "JAX MLP, fixed batches").
    """
    if backend_ops.RUNS_IN_PROGRAM_ORDER:
        return structure
    leaves = keras.tree.flatten(structure)
    positional = [
        i for i, t in enumerate(leaves) if ops.is_tensor(t) and len(t.shape) > 2
    ]
    if not positional:
        return structure
    gated = backend_ops.after(dependencies, [leaves[i] for i in positional])
    for i, t in zip(positional, gated):
        leaves[i] = t
    return keras.tree.pack_sequence_as(structure, leaves)


def _units_for_rule(entry, call_and_grads, rows_per_unit):
    """The rule's call and gradients for units of `rows_per_unit` rows
    (see `register_per_example_rule(units=...)`)."""
    units = entry.rule.units
    if units == "context":
        return call_and_grads
    if units == "positions":
        return keras.tree.map_structure(
            lambda t: unit_rows(t, rows_per_unit) if ops.is_tensor(t) else t,
            call_and_grads,
        )
    raise Unsupported(
        f"the per-example rule {entry.kind!r} of layer {entry.layer.name!r} "
        f"does not handle privacy units of {rows_per_unit} rows "
        "(augmentation multiplicity); register it with `units=` (see "
        "keras_dp.register_per_example_rule)"
    )


def _squared_norms_of(terms):
    return [sq for sq, _ in terms]


def batched_pass(entries, run, make_context, backend_ops):
    """Runs the model once and each called entry's rule.

    `make_context(entry, record)` gives the rule's `RuleContext`.

    Returns `(losses, y_pred, new_nt, records, terms)`, `terms` mapping
    each called entry's index to its `(squared norms, clipped_sum)` pairs.
    """
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        def shape_pass():
            taps = {}

            def tap(index, key, z):
                taps[key] = z
                return z

            with Recorder(entries, tap):
                run()
            return taps

        shapes = jax.eval_shape(shape_pass)
        probes = {k: jax.numpy.zeros(s.shape, s.dtype) for k, s in shapes.items()}
        recorders = []

        def f(probes):
            recorder = Recorder(entries, lambda index, key, z: z + probes[key])
            with recorder:
                losses, y_pred, new_nt = run()
            recorders.append(recorder)
            args = [tensor_leaves(r.args) for r in recorder.records]
            saved = [r.saved for r in recorder.records]
            return ops.sum(losses), (losses, y_pred, new_nt, args, saved)

        (_, aux), grads = jax.value_and_grad(f, has_aux=True)(probes)
        losses, y_pred, new_nt, args, saved = aux
        records = recorders[-1].records
        for record, leaves, tensors in zip(records, args, saved):
            record.saved = tensors
            if record.args is not None:
                record.args = replace_tensor_leaves(record.args, leaves)
        terms = _rules_in_backward_order(
            entries, records, grads, make_context, backend_ops, {}
        )
        return losses, y_pred, new_nt, records, terms
    if backend == "tensorflow":
        import tensorflow as tf

        # TensorFlow runs every op whose inputs are ready, and the backward
        # pass is ready long before the per-layer work: run after it, that
        # work would find every layer's output gradient alive at once. So
        # each layer's rule is built inside the backward pass, from the
        # gradient function of an identity at its tap, and the gradient
        # flows on only once the previous layer's rule is done (gating on
        # its own rule instead trades step time for memory).
        terms = {}
        arrived = {}
        lagging = []

        def on_gradient(index, key, dy):
            record = recorder.records[index]
            own = arrived.setdefault(index, {})
            own[key] = dy
            if len(own) < len(record.tap_keys):
                return dy
            terms[index] = _run_rule(
                entries[index], record, own, make_context, backend_ops
            )
            # Each rule overlaps with one layer's backward step, and at
            # most two layers' output gradients wait for their rules.
            gate = lagging[-1] if lagging else []
            lagging.append(_squared_norms_of(terms[index]))
            return backend_ops.after(gate, dy)

        taps = {}
        with tf.GradientTape() as tape:

            def tap(index, key, z):
                tape.watch(z)
                taps[key] = z

                @tf.custom_gradient
                def identity(t):
                    return tf.identity(t), lambda dy: on_gradient(index, key, dy)

                return identity(z)

            recorder = Recorder(entries, tap)
            with recorder:
                losses, y_pred, new_nt = run()
            total = tf.reduce_sum(losses)
        keys = list(taps)
        values = tape.gradient(
            total,
            [taps[k] for k in keys],
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )
        # Layers whose taps got no gradient (outputs the loss does not
        # use) are handled here, with zero output gradients.
        grads = dict(zip(keys, values))
        terms.update(
            _rules_in_backward_order(
                entries,
                recorder.records,
                grads,
                make_context,
                backend_ops,
                terms,
            )
        )
        return losses, y_pred, new_nt, recorder.records, terms
    if backend == "torch":
        import torch

        # Eager: the trainable values are tracked, so each tapped output
        # is in the autograd graph, and the gradient of the summed loss
        # with respect to it is the tap's output gradient. Only the
        # gradients on the way to the taps are computed, no weight
        # gradient. An output that depends on no tracked value gets a zero
        # probe added instead, whose gradient is the same; probes at every
        # tap would cost two activation-sized writes each. The rules then
        # run without a graph.
        taps = {}

        def tap(index, key, z):
            if z.requires_grad:
                taps[key] = z
                return z
            taps[key] = torch.zeros_like(z, requires_grad=True)
            return z + taps[key]

        # Random layers draw from their seed states (advancing them), as on
        # the vmap path, not from PyTorch's global generator.
        with torch.enable_grad(), backend_ops.seeded_random_ops():
            recorder = Recorder(entries, tap)
            with recorder:
                losses, y_pred, new_nt = run(track_trainable=True)
            keys = list(taps)
            total = torch.sum(losses)
            values = [None] * len(keys)
            if keys and total.requires_grad:
                values = torch.autograd.grad(
                    total, [taps[k] for k in keys], allow_unused=True
                )
        grads = {
            k: torch.zeros_like(taps[k]) if g is None else g
            for k, g in zip(keys, values)
        }
        losses, y_pred, new_nt = tree_detach((losses, y_pred, new_nt))
        for record in recorder.records:
            record.args = tree_detach(record.args)
            record.saved = tree_detach(record.saved)
        with torch.no_grad():
            terms = _rules_in_backward_order(
                entries, recorder.records, grads, make_context, backend_ops, {}
            )
        return losses, y_pred, new_nt, recorder.records, terms
    raise Unsupported(f"backend {backend!r}")


def tree_detach(structure):
    """`structure` with its torch tensors cut from the autograd graph."""

    def detach(t):
        return t.detach() if hasattr(t, "detach") else t

    return keras.tree.map_structure(detach, structure)


def _rules_in_backward_order(entries, records, grads, make_context, backend_ops, done):
    """Runs the rules of the called entries not in `done`.

    Layers go in the order their output gradients become available (the
    reverse of the calls), each one's work after the previous one's, so
    that one layer's intermediates (patches) are in memory at a time.
    """
    called = sorted(
        (e for e in entries if records[e.index].count and e.index not in done),
        key=lambda e: -records[e.index].order,
    )
    terms = {}
    previous = []
    for entry in called:
        record = records[entry.index]
        own_grads = {key: grads[key] for _, key in record.tap_keys}
        terms[entry.index] = _run_rule(
            entry, record, own_grads, make_context, backend_ops, previous
        )
        previous = _squared_norms_of(terms[entry.index])
    return terms


def per_example_norms_and_sums(
    model,
    backend_ops,
    trainable,
    non_trainable,
    x,
    y=None,
    sample_weight=None,
    entries=None,
    rows_hint=None,
    rows_per_unit=1,
    partitions=None,
):
    """Per-variable per-example squared norms from one batched pass.

    `rows_hint`: the batch size expected when `x`'s is not static (only
    used to bound memory). `rows_per_unit`: with R > 1, the rows come in
    privacy units of R rows (`keras_dp.per_example.units`) and everything
    per example below is per unit (`U` units), `y_pred` per row.
    `partitions`: per trainable variable, None or `(axis, shards)` for a
    variable clipped per device shard (`clip_groups="per_device"`).

    Returns `(squared_norms, clipped_fn, losses, y_pred, new_non_trainable)`
    where `squared_norms` has one `(n,)` tensor per trainable variable
    (`(n, shards)` for a partitioned one) and `clipped_fn(factors,
    safe=False)` the clipped sums for per-variable factors (of the same
    shapes).
    """
    if entries is None:
        entries = build_plan(model)
    run = _make_run(model, trainable, non_trainable, x, y, sample_weight, rows_per_unit)
    if rows_hint is not None:
        rows_hint = rows_hint * rows_per_unit
    values = {id(v): t for v, t in zip(model.trainable_variables, trainable)}
    values.update(
        (id(v), t) for v, t in zip(model.non_trainable_variables, non_trainable)
    )

    carriers = KernelCarriers(gradient_space(model, non_trainable).kernel_carriers())
    partitions = partitions or [None] * len(trainable)
    partition_by_id = {
        id(v): p for v, p in zip(model.trainable_variables, partitions) if p
    }

    def make_context(entry, record):
        return RuleContext(
            entry.layer,
            entry.variables,
            backend_ops,
            rows_hint,
            record.saved,
            values,
            rows_per_unit,
            carriers,
            partition_by_id,
        )

    losses, y_pred, new_nt, records, terms = batched_pass(
        entries, run, make_context, backend_ops
    )
    carriers.check_projected(entries, records)
    n = ops.shape(losses)[0]
    num_vars = len(trainable)
    squared = [None] * num_vars
    fns = [None] * num_vars
    for index, entry_terms in terms.items():
        for k, (sq, fn) in zip(entries[index].positions, entry_terms):
            squared[k] = sq
            fns[k] = fn
    for entry in entries:
        if records[entry.index].count == 0:
            for k in entry.positions:
                shards = (partitions[k][1],) if partitions[k] else ()
                squared[k] = ops.zeros((n,) + shards, "float32")
                fns[k] = (
                    lambda k: (
                        lambda c, safe: ops.zeros(ops.shape(trainable[k]), "float32")
                    )
                )(k)

    def clipped_fn(factors, safe=False):
        """The clipped sums for per-variable factors. With `safe`, rows
        whose factor is 0 are left out exactly even where their tensors
        are not finite (see `keras_dp.per_example.registry`)."""
        return [
            shaped_like(f32(fn(ops.cast(c, "float32"), safe)), t)
            for fn, c, t in zip(fns, factors, trainable)
        ]

    return squared, clipped_fn, losses, y_pred, new_nt
