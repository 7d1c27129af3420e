"""Fast per-example gradient norms and clipped sums (spec section 9).

One batched forward pass computes every per-example quantity that clipping
needs, instead of one forward/backward per example (`per_example.py`):

1. Every leaf layer that owns trainable variables is intercepted for the
   duration of the pass: its `call` is wrapped on the instance to record its
   inputs, and a "tap" marks the tensor whose gradient the layer needs (the
   pre-activation output of Dense, EinsumDense and Conv layers, the output
   of any other layer).
2. The per-example losses `L_i` are evaluated per row from the batched
   predictions (`model._compute_loss` on batch-of-one slices under
   `vectorized_map`). Rows are independent (batch-mixing layers are
   banned), so the gradient of `sum_i L_i` with respect to a tap holds
   each example's own output gradient `B_i` in its row. This backward pass
   computes no weight gradients at all.
3. Per layer and per variable, each example's squared gradient norm:
   - Dense / EinsumDense / Conv1D/2D/3D: with inputs `A_i` (T x d) and
     output gradients `B_i` (T x p), `G_i = A_i^T B_i`; either "ghost"
     `||G_i||^2 = <A_i A_i^T, B_i B_i^T>` (`||a|| ||b||` when T = 1) or
     instantiate `G_i` (see `choose_method`); bias from `B_i`. For Conv,
     `A_i` are the input patches, gathered with static indices (any
     stride, dilation, padding, groups; with one input channel per group,
     strided slices stacked tap-major); instantiated kernel gradients
     are computed in chunks of examples so that only about
     `_PATCH_CHUNK_BYTES` of patches exist at once. Stride-1 1-D/2-D
     convs instantiate them without patches where the backend has a faster
     way (`per_example_conv_kernel_grads`: one grouped convolution per
     chunk, the examples as its groups).
   - Dense with Keras LoRA (`enable_lora`): the adapters' gradients are
     linear-layer gradients of transformed activations (ghost or
     instantiate, with the rank in place of `d` or `p`).
   - Embedding, and ReversibleEmbedding used as a lookup:
     `||G_i||^2 = sum_{t,s} 1{x_t = x_s} b_t . b_s`.
   - LayerNormalization, RMSNormalization: the pass computes their output
     as `scale * xhat + center` and keeps `xhat`; GroupNormalization runs
     its own call and keeps its per-group statistics, from which and the
     input the sums below follow. The per-example gradients are
     `sum(dy * xhat)` and `sum(dy)`.
   - keras-hub `PositionEmbedding`: the output gradient itself.
   - any other leaf layer (custom layers, DepthwiseConv, ...): per-example
     gradients instantiated by a layer-local vector-Jacobian product under
     `vectorized_map`. Recurrent layers and TimeDistributed are handled
     the same way as a whole (their cell or inner layer runs once per time
     step, or on all steps as one batch, so its own rows are not examples).
   Layers are handled in the order their output gradients become
   available, each after the previous one (`backend.after`), so that the
   intermediates of one layer at a time are in memory; otherwise
   TensorFlow runs whatever is ready and XLA may compute a layer's patches
   during the forward pass and hold them until the backward pass. On
   TensorFlow the handlers run inside the backward pass (see
   `_batched_pass`), so that output gradients do not pile up waiting.
4. `optimizer.variable_clip_factors` turns the per-variable squared norms
   into per-variable factors `c_i` (every clipping mode, clipping groups).
5. Clipped sums by book-keeping (no second backward pass):
   `sum_i c_i G_i = einsum(A, c * B)` for ghost layers, or
   `tensordot(c, G)` where `G` was instantiated (conv layers with no more
   output positions than filters: `einsum(P, c * B)` from their patches
   gathered again, so that `G` is not held; see `_norms_then_patches`).
   A second weighted backward pass would redo these same contractions
   plus the whole activation backward pass, so book-keeping is never
   slower; it is the only method.
6. Non-finite examples (`clipping.nonfinite_examples`): an example whose
   squared norm (summed over the variables) or loss is infinite or NaN
   gets factor exactly 0 in step 4. An infinite or NaN entry in an
   example's layer input `A_i`, output gradient `B_i` or instantiated
   `G_i` makes that layer's squared norm of the example infinite or NaN
   (products and sums propagate them), so such an example is always
   caught; and where every example's norm is finite every contracted
   tensor is finite, so the contractions of step 5 are exact as they
   are. A step with a non-finite example runs them with its rows selected
   out instead (`A_i` and `c_i B_i` set to exactly 0: `0 * inf` would
   be NaN); both variants are traced and `ops.cond` picks one, so a step
   without one pays for a test on `(n,)` tensors and the conditional, not
   for passes over activations. (Benchmark MLP, batch 256, one process:
   DP step 7.67 -> 7.82 ms on TensorFlow, whose executor is slower for
   graphs with control flow, and 5.03 -> 5.12 ms on JAX; the TensorFlow
   CNN 30.7 -> 31.0 ms. Always taking the safe variant cost more: 0.4 ms
   on TensorFlow.) Rows with sample weight 0 (padding) have loss 0;
   should their values still make their norms non-finite, they are left
   out the same way.

The model must satisfy (checked; otherwise `Unsupported` is raised and the
caller falls back to the general vmap path):
- every trainable variable belongs to exactly one leaf layer (a layer with
  no weighted sublayers), and the model itself owns none;
- each such layer is called at most once per step (no shared layers);
- no activity regularizers or `add_loss` inside `call` (per-example losses
  that a batched pass cannot separate);
- layers handled by a per-example vector-Jacobian product have no random
  state of their own;
- a ReversibleEmbedding is not called with `reverse=True` (tied output
  logits) and a keras-hub PositionEmbedding not with an offset or
  explicit positions.
Assumed, not checkable: a layer's weights are only used inside its own
`call` (a layer reading another layer's kernel would get a wrong norm).
"""

import functools
import itertools
import re
import string
import sys

import keras
import numpy as np
from keras import ops
from keras import tree
from keras.src.backend.common import masking

from keras_dp import backend as backend_lib
from keras_dp import clipping as clipping_lib
from keras_dp import per_example as per_example_lib


class Unsupported(Exception):
    """The fast path does not handle this model; use the vmap path."""

    @property
    def reason(self):
        """The message alone: raised inside a layer's call, Keras adds the
        layer's arguments and terminal bold codes around it."""
        text = str(self)
        match = re.search(r"\x1b\[1m(.*?)\x1b\[0m", text, re.DOTALL)
        return (match.group(1) if match else text).strip()


# Tests may force "ghost" or "instantiate" for every linear layer.
_FORCE_METHOD = None


def choose_method(T, d, p):
    """How to get a linear layer's per-example kernel norms.

    `T`: rows of the layer's input per example (sequence length or output
    positions, None if unknown), `d` input features, `p` output features.

    Ghost norms cost `O(T^2 (d + p))` per example and `O(T^2)` memory;
    instantiating `G_i` costs `O(T d p)` and `O(d p)` memory, but then also
    gives the clipped sum as `tensordot(c, G)` instead of a second
    `O(T d p)` contraction. So instantiate iff `2 T^2 >= p d` (spec), or
    when `G_i` is no larger than the activations `A_i`, `B_i` that are
    held anyway (`d p <= T (d + p)`): then it is faster at no extra memory
    order. T = 1 is always ghost (`||a|| ||b||`).
    """
    if _FORCE_METHOD is not None and T != 1:
        return _FORCE_METHOD
    if T is None:
        return "ghost"
    if T == 1:
        return "ghost"
    if 2 * T * T >= p * d or d * p <= T * (d + p):
        return "instantiate"
    return "ghost"


# --------------------------------------------------------------------------
# Plan: which layers, which handler.


def _own_trainable(layer):
    own = {id(v) for v in layer._trainable_variables}
    own |= {id(v) for v in layer._non_trainable_variables}
    return [v for v in layer.trainable_variables if id(v) in own]


def _layer_kind(layer):
    L = keras.layers
    try:
        if layer.quantization_mode is not None:
            return "generic"
    except AttributeError:
        pass
    t = type(layer)
    if getattr(layer, "lora_enabled", False):
        if isinstance(layer, L.Dense) and t.call is L.Dense.call:
            return "dense_lora"
        return "generic"
    if isinstance(layer, L.Dense) and t.call is L.Dense.call:
        return "dense"
    if isinstance(layer, L.EinsumDense) and t.call is L.EinsumDense.call:
        return "einsum"
    if isinstance(layer, (L.Conv1D, L.Conv2D, L.Conv3D)):
        base = L.Conv1D.call if isinstance(layer, L.Conv1D) else None
        from keras.src.layers.convolutional.base_conv import BaseConv

        if t.call is (base or BaseConv.call):
            return "conv"
    if isinstance(layer, L.Embedding) and t.call is L.Embedding.call:
        return "embedding"
    reversible = getattr(L, "ReversibleEmbedding", None)
    if reversible is not None and isinstance(layer, reversible) and (
        t.call is reversible.call
    ):
        # As an embedding lookup; a `reverse=True` call (tied output
        # logits) is refused when recorded.
        return "embedding"
    if _is_keras_hub_position_embedding(layer):
        return "position_embedding"
    if _normalization_weights(layer) is not None:
        return "normalization"
    return "generic"


def _handled_whole(layer):
    """Layers whose per-example gradients come from their whole call:
    recurrent layers (LSTM, GRU, SimpleRNN, ConvLSTM, and each direction of
    a Bidirectional) and TimeDistributed."""
    return isinstance(layer, (keras.layers.RNN, keras.layers.TimeDistributed))


def _uses_randomness(layer):
    """Whether `layer` (or a sublayer) draws random numbers in training:
    dropout rates above 0 of recurrent cells, or any other layer that owns
    a seed generator."""
    for sub in layer._flatten_layers(include_self=True):
        rates = [
            getattr(sub, name, None) for name in ("dropout", "recurrent_dropout")
        ]
        if any(isinstance(r, (int, float)) and r > 0 for r in rates):
            return True
        if getattr(sub, "_seed_generators", None) and not any(
            isinstance(r, (int, float)) for r in rates
        ):
            return True
    return False


def _check_no_random_state(layer):
    if _uses_randomness(layer):
        raise Unsupported(
            f"layer {layer.name!r} ({type(layer).__name__}) has weights and "
            "draws random numbers in training (dropout): the fast path "
            "recomputes its per-example gradients in a separate call, which "
            "would draw other masks than the batched pass"
        )


def _is_keras_hub_position_embedding(layer):
    """keras-hub's learned `PositionEmbedding` (its own `call`)."""
    hub = sys.modules.get("keras_hub")
    cls = getattr(getattr(hub, "layers", None), "PositionEmbedding", None)
    return cls is not None and isinstance(layer, cls) and type(layer).call is cls.call


def _normalization_weights(layer):
    """`(scale, center, axes)` of a stock normalization layer, else None.

    LayerNormalization, GroupNormalization and RMSNormalization compute
    `scale * xhat + center`, where `xhat` depends on the input only and the
    weights broadcast along `axes`; `scale` or `center` may be None.
    """
    L = keras.layers
    t = type(layer)
    if isinstance(layer, L.LayerNormalization) and (
        t.call is L.LayerNormalization.call
    ):
        return layer.gamma, layer.beta, list(layer.axis)
    if isinstance(layer, L.GroupNormalization) and (
        t.call is L.GroupNormalization.call
    ):
        return layer.gamma, layer.beta, [layer.axis]
    rms = getattr(L, "RMSNormalization", None)
    if rms is not None and isinstance(layer, rms) and t.call is rms.call:
        return layer.scale, None, list(layer.axis)
    return None


class _Entry:
    def __init__(self, index, layer, kind, positions):
        self.index = index
        self.layer = layer
        self.kind = kind
        # Positions of the layer's trainable variables in the model's
        # `trainable_variables`, in `layer.trainable_variables` order.
        self.positions = positions
        self.tap_pre_activation = kind in ("dense", "dense_lora", "einsum", "conv")


def build_plan(model):
    """Leaf layers that own the model's trainable variables, with handlers.

    Raises `Unsupported` when the model breaks an assumption of the fast
    path (see the module docstring).
    """
    variables = model.trainable_variables
    positions = {id(v): k for k, v in enumerate(variables)}
    if _own_trainable(model):
        raise Unsupported("the model itself owns trainable variables")
    covered = set()
    entries = []
    inside_whole = set()
    for layer in model._flatten_layers(include_self=False):
        if id(layer) in inside_whole:
            continue
        if getattr(layer, "activity_regularizer", None) is not None:
            raise Unsupported(f"layer {layer.name!r} has an activity regularizer")
        if _handled_whole(layer):
            # Recurrent layers call their cell once per time step and
            # TimeDistributed its layer on all time steps as one batch: a
            # per-example gradient of the whole layer, through its own
            # call, has neither problem.
            for sub in layer._flatten_layers(include_self=False):
                inside_whole.add(id(sub))
            own = [v for v in layer.trainable_variables if id(v) in positions]
            kind = "generic"
        else:
            own = [v for v in _own_trainable(layer) if id(v) in positions]
            kind = None
        if not own:
            continue
        if kind is None:
            for sub in layer._flatten_layers(include_self=False):
                if sub.trainable_variables:
                    raise Unsupported(
                        f"layer {layer.name!r} owns weights and has "
                        "sublayers with weights"
                    )
            kind = _layer_kind(layer)
            if kind == "einsum" and _einsum_structure(layer, None) is None:
                kind = "generic"
        if kind == "generic":
            _check_no_random_state(layer)
        for v in own:
            if id(v) in covered:
                raise Unsupported(f"variable {v.path!r} is shared by layers")
            covered.add(id(v))
        entries.append(
            _Entry(len(entries), layer, kind, [positions[id(v)] for v in own])
        )
    if covered != set(positions):
        missing = [v.path for v in variables if id(v) not in covered]
        raise Unsupported(
            f"trainable variables not owned by a leaf layer: {missing}"
        )
    return entries


# --------------------------------------------------------------------------
# Interception of layer calls.


def _is_float_tensor(t):
    return ops.is_tensor(t) and keras.backend.is_float_dtype(
        keras.backend.standardize_dtype(t.dtype)
    )


class _Record:
    def __init__(self):
        self.count = 0
        self.order = None  # position among the layers' calls in the pass
        self.args = None  # (args, kwargs) as given to `call`
        self.tapped = False
        self.tap_keys = []
        # Intermediates a handler needs from the pass (normalized inputs).
        self.saved = {}


class _Recorder:
    """Wraps `call` (and `activation`) of each entry's layer on the instance.

    `tap(index, key, z)` returns the tensor to use in place of `z`, the
    output of the entry with that index (JAX adds a zero probe,
    TensorFlow watches `z`).
    """

    def __init__(self, entries, tap):
        self.entries = entries
        self.tap = tap
        self.records = [_Record() for _ in entries]
        self.calls = 0
        self._saved = []

    def __enter__(self):
        try:
            for entry in self.entries:
                self._install(entry)
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc):
        self._restore()
        return False

    def _install(self, entry):
        layer = entry.layer
        record = self.records[entry.index]
        original_call = layer.call
        tap = self.tap
        recorder = self

        def wrapped_call(*args, **kwargs):
            record.count += 1
            if record.count > 1:
                raise Unsupported(
                    f"layer {layer.name!r} is called more than once per step "
                    "(shared weights)"
                )
            _check_call_form(entry, args, kwargs)
            record.args = (args, kwargs)
            record.order = recorder.calls
            recorder.calls += 1
            if entry.kind == "normalization":
                outputs = _normalization_call(layer, original_call, record, args, kwargs)
            else:
                outputs = original_call(*args, **kwargs)
            if entry.tap_pre_activation:
                if not record.tapped:
                    raise Unsupported(
                        f"layer {layer.name!r} did not apply its activation"
                    )
                return outputs
            leaves = tree.flatten(outputs)
            new_leaves = []
            for j, leaf in enumerate(leaves):
                if _is_float_tensor(leaf):
                    key = f"{entry.index}_{j}"
                    record.tap_keys.append((j, key))
                    mask = masking.get_keras_mask(leaf)
                    leaf = tap(entry.index, key, leaf)
                    if mask is not None:
                        masking.set_keras_mask(leaf, mask)
                new_leaves.append(leaf)
            return tree.pack_sequence_as(outputs, new_leaves)

        self._saved.append((layer, "call", layer.__dict__.get("call", _MISSING)))
        object.__setattr__(layer, "call", wrapped_call)
        if entry.tap_pre_activation:
            original_activation = layer.activation

            def activation(z):
                if record.tapped:
                    raise Unsupported(
                        f"layer {layer.name!r} applied its activation twice"
                    )
                record.tapped = True
                key = f"{entry.index}_z"
                record.tap_keys.append((0, key))
                z = tap(entry.index, key, z)
                if original_activation is None:
                    return z
                return original_activation(z)

            self._saved.append(
                (layer, "activation", layer.__dict__.get("activation", _MISSING))
            )
            object.__setattr__(layer, "activation", activation)

    def _restore(self):
        while self._saved:
            layer, name, value = self._saved.pop()
            if value is _MISSING:
                layer.__dict__.pop(name, None)
            else:
                object.__setattr__(layer, name, value)


_MISSING = object()


def _check_call_form(entry, args, kwargs):
    """Refuses calls that the layer's handler does not model."""
    name = entry.layer.name
    if entry.kind == "embedding" and (kwargs.get("reverse") or args[1:2] == (True,)):
        raise Unsupported(f"embedding {name!r} is called with reverse=True")
    if entry.kind == "position_embedding":
        start = kwargs.get("start_index", args[1] if len(args) > 1 else 0)
        positions = kwargs.get("positions", args[2] if len(args) > 2 else None)
        if not (isinstance(start, int) and start == 0) or positions is not None:
            raise Unsupported(
                f"position embedding {name!r} is called with an offset or "
                "explicit positions"
            )


def _grouped_shape(layer, shape):
    """The shape GroupNormalization normalizes in: its channel axis split
    into `(groups, channels per group)`."""
    axis = layer.axis % len(shape)
    channels = shape[axis]
    return (
        (-1,)
        + tuple(shape[1:axis])
        + (layer.groups, channels // layer.groups)
        + tuple(shape[axis + 1 :])
    )


def _group_normalization_stats(layer, x):
    """GroupNormalization's per-example `(mean, inv)` for input `x`, as its
    `call` computes them, with shape `(n, groups)`: `xhat = (x - mean) *
    inv` within each group."""
    dtype = keras.backend.result_type(x.dtype, "float32")
    xg = ops.cast(ops.reshape(x, _grouped_shape(layer, x.shape)), dtype)
    axis = layer.axis % len(x.shape)
    reduce_axes = [a for a in range(1, len(xg.shape)) if a != axis]
    mean, variance = ops.moments(ops.stop_gradient(xg), axes=reduce_axes)
    return mean, ops.rsqrt(variance + layer.epsilon)


def _group_normalization_sums(layer, record, dy):
    """Per-example `sum(dy * xhat)` and `sum(dy)`, shape `(n, channels)`,
    from GroupNormalization's input and statistics.

    `mean` and `inv` are constant over the summed axes within a group, so
    `sum(dy * xhat) = inv * (sum(dy * x) - mean * sum(dy))`: no `xhat`.
    """
    x = _f32(_layer_input(*record.args))
    rank = len(x.shape)
    axis = layer.axis % rank
    summed = tuple(a for a in range(1, rank) if a != axis)
    sum_dy = ops.sum(dy, axis=summed)
    sum_dy_x = ops.sum(dy * x, axis=summed)
    channels = x.shape[axis]
    per_group = (-1, layer.groups, channels // layer.groups)
    mean = ops.expand_dims(_f32(record.saved["mean"]), -1)
    inv = ops.expand_dims(_f32(record.saved["inv"]), -1)
    sum_dy_xhat = inv * (
        ops.reshape(sum_dy_x, per_group) - mean * ops.reshape(sum_dy, per_group)
    )
    return ops.reshape(sum_dy_xhat, (-1, channels)), sum_dy


def _normalization_call(layer, original_call, record, args, kwargs):
    """A normalization layer's output, and what its handler needs saved.

    GroupNormalization runs its own call unchanged and keeps only its
    per-group statistics: the handler's sums need no more, with the
    layer's input, which the backward pass keeps anyway. (Rebuilt as
    `scale * xhat + center` from a call with scale 1 and center 0, it took
    two more elementwise passes forward and one backward per layer: 3% of
    the TensorFlow ResNet benchmark's DP step.) Kept whole, `xhat` would
    hold one activation-sized tensor per layer from the forward pass to the
    layer's backward step: the largest extra memory of a convolutional
    network's DP step (TensorFlow ResNet benchmark: a peak of 1.57x the
    non-private step's with it, 1.37x without).

    LayerNormalization and RMSNormalization compute their output as
    `scale * xhat + center`, with `xhat` the layer's own call with scale 1
    and center 0 (so every option of the layer is honoured), and keep
    `xhat` for the handler.
    """
    # Entries of kind "normalization" have the stock `call` (see
    # `_normalization_weights`), so GroupNormalization's statistics are
    # the ones `_group_normalization_stats` computes.
    if isinstance(layer, keras.layers.GroupNormalization):
        mean, inv = _group_normalization_stats(layer, _layer_input(args, kwargs))
        record.saved.update(mean=mean, inv=inv)
        return original_call(*args, **kwargs)
    scale, center, axes = _normalization_weights(layer)
    weights = [w for w in (scale, center) if w is not None]
    # Read inside the pass's stateless scope: the traced values.
    values = [w.value for w in weights]
    identity = [
        (w, ops.ones(w.shape, w.dtype) if w is scale else ops.zeros(w.shape, w.dtype))
        for w in weights
    ]
    with keras.StatelessScope(state_mapping=identity):
        xhat = original_call(*args, **kwargs)
    record.saved["xhat"] = xhat
    rank = len(xhat.shape)
    shape = [1] * rank
    for a in axes:
        shape[a % rank] = xhat.shape[a % rank]
    outputs = xhat
    for w, value in zip(weights, values):
        value = ops.cast(ops.reshape(value, shape), xhat.dtype)
        outputs = outputs * value if w is scale else outputs + value
    return outputs


def _layer_input(args, kwargs):
    return args[0] if args else kwargs["inputs"]


# --------------------------------------------------------------------------
# The batched pass: per-example losses and per-example output gradients.


# Keras's built-in loss functions that reduce only the last axis: on a
# batch they give each example's loss unmixed with the others (unlike
# e.g. `dice`, which reduces over the batch too).
_LAST_AXIS_LOSSES = frozenset(
    f"keras.src.losses.losses.{name}"
    for name in (
        "binary_crossentropy", "binary_focal_crossentropy",
        "categorical_crossentropy", "categorical_focal_crossentropy",
        "categorical_hinge", "cosine_similarity", "hinge", "huber",
        "kl_divergence", "log_cosh", "mean_absolute_error",
        "mean_absolute_percentage_error", "mean_squared_error",
        "mean_squared_logarithmic_error", "poisson",
        "sparse_categorical_crossentropy", "squared_hinge",
    )
)


def _batched_example_losses(model, y, y_pred, sw):
    """Per-example losses from one call of the compiled loss on the batch,
    where that equals calling it on each example alone: one output, one
    built-in loss of the last axis, "sum_over_batch_size" reduction, no
    mask and no `compute_loss` override. None otherwise (the caller maps
    the compiled loss over the examples).

    Each example's loss is then its weighted loss values averaged over
    its own elements, as the reduction of a one-example batch does. On
    TensorFlow the mapped loss is dozens of small ops (forward and
    backward); on its MLP benchmark this takes DP/plain about 0.04 lower.
    """
    from keras.src.losses import loss as loss_lib
    from keras.src.losses.losses import LossFunctionWrapper
    from keras.src.trainers.trainer import Trainer

    compile_loss = getattr(model, "_compile_loss", None)
    if (
        type(model).compute_loss is not Trainer.compute_loss
        or compile_loss is None
        or y is None
        or any(tree.is_nested(t) for t in (y, y_pred, sw))
        or masking.get_keras_mask(y_pred) is not None
        or backend_lib.get_backend_module().replicas_in_sync() != 1
    ):
        return None
    if not compile_loss.built:
        compile_loss.build(y, y_pred)
    if len(compile_loss._flat_losses) != 1:
        return None
    path, loss_fn, loss_weight, _ = compile_loss._flat_losses[0]
    fn = getattr(loss_fn, "fn", None)
    if (
        path
        or not isinstance(loss_fn, LossFunctionWrapper)
        or f"{getattr(fn, '__module__', '')}.{getattr(fn, '__name__', '')}"
        not in _LAST_AXIS_LOSSES
        or loss_fn._fn_kwargs.get("axis", -1) != -1
        or loss_fn.reduction != "sum_over_batch_size"
    ):
        return None
    dtype = loss_fn.dtype
    values = loss_fn.call(
        ops.convert_to_tensor(y, dtype=dtype),
        ops.convert_to_tensor(y_pred, dtype=dtype),
    )
    if masking.get_keras_mask(values) is not None or not values.shape:
        return None
    values = loss_lib.reduce_weighted_values(
        values, sample_weight=sw, reduction="none", dtype=dtype
    )
    if len(values.shape) > 1:
        values = ops.mean(values, axis=tuple(range(1, len(values.shape))))
    values = ops.cast(ops.cast(values, compile_loss.dtype), "float32")
    if loss_weight is not None:
        values = values * loss_weight
    if sw is not None:
        # A row whose weights are all 0 has loss exactly 0 (padding).
        present = per_example_lib._row_mask(sw) > 0
        values = ops.where(present, values, ops.zeros_like(values))
    return values


def _per_example_losses(model, trainable, new_non_trainable, x, y, y_pred, sw):
    losses = _batched_example_losses(model, y, y_pred, sw)
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
        expand = per_example_lib._expand
        with keras.StatelessScope(
            state_mapping=mapping
        ), per_example_lib.loss_trackers_paused(model):
            loss = model._compute_loss(
                x=expand(row["x"]),
                y=expand(row["y"]) if "y" in row else None,
                y_pred=expand(row["y_pred"]),
                sample_weight=(
                    expand(row["sample_weight"])
                    if "sample_weight" in row
                    else None
                ),
                training=True,
            )
        loss = ops.cast(loss, "float32")
        if "sample_weight" in row:
            present = ops.any(
                ops.stack(
                    [
                        ops.any(ops.not_equal(w, 0))
                        for w in tree.flatten(row["sample_weight"])
                    ]
                )
            )
            loss = ops.where(present, loss, ops.zeros_like(loss))
        return loss

    # A non-empty override keeps compute_loss from adding the weight
    # regularization terms (the train step adds them once, unclipped).
    model._losses_override = [ops.zeros(())]
    try:
        return ops.vectorized_map(one, rows)
    finally:
        model._losses_override = []


def _make_run(model, trainable, non_trainable, x, y, sw):
    num_regularized = per_example_lib.num_regularized_weights(model)
    call_kwargs = {"training": True} if model._call_has_training_arg else {}

    def run():
        y_pred, new_nt, losses = model.stateless_call(
            trainable, non_trainable, x, return_losses=True, **call_kwargs
        )
        if len(losses) > num_regularized:
            raise Unsupported(
                "the model adds losses in call (activity regularization)"
            )
        new_nt = list(new_nt)
        losses = _per_example_losses(model, trainable, new_nt, x, y, y_pred, sw)
        return losses, y_pred, new_nt

    return run


def _tensor_leaves(structure):
    return [t for t in tree.flatten(structure) if ops.is_tensor(t)]


def _replace_tensor_leaves(structure, new):
    new = iter(new)
    return tree.pack_sequence_as(
        structure,
        [next(new) if ops.is_tensor(t) else t for t in tree.flatten(structure)],
    )


def _run_handler(entry, record, own_grads, handle, backend_ops, previous=()):
    """`handle(entry, record, own_grads)`, once `previous` are computed.

    The layer's inputs are read only once its output gradients exist (not
    in the forward pass, which would hold e.g. its patches until then).
    """
    own_grads = backend_ops.after(list(previous), own_grads)
    tensors = backend_ops.after(
        list(own_grads.values()), _tensor_leaves(record.args)
    )
    record.args = _replace_tensor_leaves(record.args, tensors)
    return handle(entry, record, own_grads)


def _squared_norms_of(terms):
    return [sq for sq, _ in terms]


def _batched_pass(entries, run, handle, backend_ops):
    """Runs the model once and each called entry's handler.

    `handle(entry, record, own_grads)` gets the gradients of `sum_i L_i` at
    the entry's taps (keyed like `record.tap_keys`) and returns its terms.

    Returns `(losses, y_pred, new_nt, records, terms)`, `terms` mapping
    each called entry's index to what its handler returned.
    """
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        def shape_pass():
            taps = {}

            def tap(index, key, z):
                taps[key] = z
                return z

            with _Recorder(entries, tap):
                run()
            return taps

        shapes = jax.eval_shape(shape_pass)
        probes = {
            k: jax.numpy.zeros(s.shape, s.dtype) for k, s in shapes.items()
        }
        recorders = []

        def f(probes):
            recorder = _Recorder(entries, lambda index, key, z: z + probes[key])
            with recorder:
                losses, y_pred, new_nt = run()
            recorders.append(recorder)
            args = [_tensor_leaves(r.args) for r in recorder.records]
            saved = [r.saved for r in recorder.records]
            return ops.sum(losses), (losses, y_pred, new_nt, args, saved)

        (_, aux), grads = jax.value_and_grad(f, has_aux=True)(probes)
        losses, y_pred, new_nt, args, saved = aux
        records = recorders[-1].records
        for record, leaves, tensors in zip(records, args, saved):
            record.saved = tensors
            if record.args is not None:
                record.args = _replace_tensor_leaves(record.args, leaves)
        terms = _handle_in_backward_order(
            entries, records, grads, handle, backend_ops, {}
        )
        return losses, y_pred, new_nt, records, terms
    if backend == "tensorflow":
        import tensorflow as tf

        # TensorFlow runs every op whose inputs are ready, and the backward
        # pass is ready long before the per-layer work: run after it, that
        # work would find every layer's output gradient alive at once. So
        # each layer's handler is built inside the backward pass, from the
        # gradient function of an identity at its tap, and the gradient
        # flows on only once the previous layer's handler is done. (Gated
        # on its own handler instead, the ResNet benchmark's step takes 9%
        # longer and its peak memory is 6% lower.)
        terms = {}
        arrived = {}
        lagging = []

        def on_gradient(index, key, dy):
            record = recorder.records[index]
            own = arrived.setdefault(index, {})
            own[key] = dy
            if len(own) < len(record.tap_keys):
                return dy
            terms[index] = _run_handler(
                entries[index], record, own, handle, backend_ops
            )
            # Each handler overlaps with one layer's backward step, and at
            # most two layers' output gradients wait for their handlers.
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

            recorder = _Recorder(entries, tap)
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
            _handle_in_backward_order(
                entries, recorder.records, grads, handle, backend_ops, terms
            )
        )
        return losses, y_pred, new_nt, recorder.records, terms
    raise Unsupported(f"backend {backend!r}")


def _handle_in_backward_order(entries, records, grads, handle, backend_ops, done):
    """Runs the handlers of the called entries not in `done`.

    Layers go in the order their output gradients become available (the
    reverse of the calls), each one's work after the previous one's, so
    that one layer's intermediates (patches) are in memory at a time.
    """
    called = sorted(
        (
            e
            for e in entries
            if records[e.index].count and e.index not in done
        ),
        key=lambda e: -records[e.index].order,
    )
    terms = {}
    previous = []
    for entry in called:
        record = records[entry.index]
        own_grads = {key: grads[key] for _, key in record.tap_keys}
        terms[entry.index] = _run_handler(
            entry, record, own_grads, handle, backend_ops, previous
        )
        previous = _squared_norms_of(terms[entry.index])
    return terms


# --------------------------------------------------------------------------
# Per-layer handlers. Each returns one (squared norms, clipped_fn) pair per
# variable of the entry: an `(n,)` tensor, and `clipped_fn(c, safe)` giving
# that variable's clipped sum from its `(n,)` factors `c`.
#
# `safe` (a Python bool): the sum must leave out, exactly, the rows whose
# factor is 0 even where their tensors are infinite or NaN (`_scaled_rows`,
# `_kept_rows`, `_rows_dot` select instead of multiplying by 0). Each
# variable's squared norms come from the same tensors that its clipped sum
# contracts, and any infinite or NaN entry of an example's tensors makes its
# squared norm infinite or NaN (products and sums propagate them). So where
# every example's norm is finite the plain contractions are exact, and the
# safe ones (a pass more over some tensors) are only needed in a step with
# a non-finite example, whose factors are 0: `clipped_gradient_sum` traces
# both and runs one (`ops.cond`).


def _f32(t):
    return ops.cast(t, "float32")


def _scaled_rows(x, c, safe):
    """`x` (n, ...) with row `i` times `c_i`; with `safe`, rows whose
    factor is 0 are exactly 0, even where they are not finite."""
    c = clipping_lib.rows_of(c, x)
    if safe:
        return clipping_lib.multiply_no_nan(x, c)
    return x * c


def _kept_rows(x, c, safe):
    """`x` (n, ...); with `safe`, its rows whose factor in `c` is 0 set to
    exactly 0."""
    if not safe:
        return x
    return clipping_lib.multiply_no_nan(
        x, clipping_lib.rows_of(ops.not_equal(c, 0), x)
    )


def _rows_dot(c, g, safe):
    """`sum_i c_i g_i` over the rows of the per-example gradients `g`."""
    return ops.tensordot(c, _kept_rows(g, c, safe), axes=1)


def _squared_norms(x):
    """Each example's sum of squares, (n,) from (n, ...).

    The backend's one-pass kernel where it has one: TensorFlow runs
    Square and Sum as two passes, and its Sum is slow on the fast path's
    many small per-example reductions (on its MLP benchmark, DP/plain
    about 0.03 lower with the kernel).
    """
    if len(x.shape) == 1:
        return ops.square(x)
    fused = getattr(
        backend_lib.get_backend_module(), "per_example_squared_norms", None
    )
    if fused is not None:
        sq = fused(x)
        if sq is not None:
            return sq
    return ops.sum(ops.square(x), axis=tuple(range(1, len(x.shape))))


def _static_prod(dims):
    total = 1
    for d in dims:
        if d is None:
            return None
        total *= int(d)
    return total


def _linear(A, B, method):
    """A: (n, T, d), B: (n, T, p). Per-example `||A_i^T B_i||^2` and sums."""
    T = A.shape[1]
    if T == 1:
        b = B[:, 0, :]
        return _row_linear(A[:, 0, :], b, _squared_norms(b))
    if method == "ghost":
        aa = ops.einsum("ntd,nsd->nts", A, A)
        bb = ops.einsum("ntp,nsp->nts", B, B)
        # (maximum propagates NaN.)
        sq = ops.maximum(ops.sum(aa * bb, axis=(1, 2)), 0.0)

        def clipped(c, safe):
            return _weighted_product_sum(
                _kept_rows(A, c, safe), _kept_rows(B, c, safe), c
            )

        return sq, clipped
    G = ops.matmul(ops.transpose(A, (0, 2, 1)), B)
    sq = _squared_norms(G)

    def clipped(c, safe):
        return _rows_dot(c, G, safe)

    return sq, clipped


def _row_linear(a, b, b_squared_norms):
    """`_linear` of one row per example, a: (n, d), b: (n, p), with b's
    squared row norms given (a Dense bias's per-example norms)."""
    sq = _squared_norms(a) * b_squared_norms

    def clipped(c, safe):
        return ops.matmul(
            ops.transpose(_kept_rows(a, c, safe)), _scaled_rows(b, c, safe)
        )

    return sq, clipped


def _weighted_product_sum(A, B, c):
    """`sum_i c_i A_i^T B_i` for A: (n, T, d), B: (n, T, p), as one
    (d, p) matrix product over all rows. (For the safe sums, the callers
    pass `A` and `B` with the rows of factor 0 set to 0: `_kept_rows`.)"""
    return ops.matmul(
        ops.transpose(ops.reshape(A, (-1, ops.shape(A)[-1]))),
        ops.reshape(B * c[:, None, None], (-1, ops.shape(B)[-1])),
    )


def _bias_grads(B, bias_shape):
    """Per-example gradient of a bias broadcast (right-aligned) to `B[1:]`."""
    out_rank = len(B.shape) - 1
    r = len(bias_shape)
    lead = list(range(1, 1 + out_rank - r))
    if lead:
        B = ops.sum(B, axis=lead)
    for j, size in enumerate(bias_shape):
        if size == 1 and B.shape[1 + j] != 1:
            B = ops.sum(B, axis=1 + j, keepdims=True)
    return ops.reshape(B, (-1,) + tuple(bias_shape))


def _bias_terms(layer, bias_var, B):
    g = _bias_grads(B, tuple(bias_var.shape))
    sq = _squared_norms(g)
    return sq, (lambda c, safe: _rows_dot(c, g, safe))


def _finish(entry, named):
    """Orders (variable, sq, clipped_fn) triples as the entry's positions."""
    by_id = {id(v): (sq, fn) for v, sq, fn in named}
    own = [v for v in entry.layer.trainable_variables]
    out = []
    for v in own:
        if id(v) in by_id:
            out.append(by_id[id(v)])
    if len(out) != len(entry.positions):
        raise Unsupported(f"layer {entry.layer.name!r}: unexpected variables")
    return out


def _dense_activations(entry, record, grads):
    """Inputs `A` (n, T, d) and pre-activation gradients `B` (n, T, p).

    Also returns `B` in the layer's output shape (for the bias) and `T`.
    """
    (inputs,), _ = _call_args(record, 1)
    A = _f32(inputs)
    B = _f32(grads[f"{entry.index}_z"])
    T = _static_prod(A.shape[1:-1])
    rows = T if T is not None else -1
    A3 = ops.reshape(A, (-1, rows, A.shape[-1]))
    B3 = ops.reshape(B, (-1, rows, B.shape[-1]))
    return A3, B3, B, T


def _handle_dense(entry, record, grads):
    layer = entry.layer
    A3, B3, B, T = _dense_activations(entry, record, grads)
    d, p = A3.shape[-1], B3.shape[-1]
    if T == 1 and layer.bias is not None:
        # The bias's per-example gradients are the rows of b, whose norms
        # the kernel's need too: computed once (TensorFlow does not merge
        # the two; on its MLP benchmark DP/plain about 0.015 lower).
        b = B3[:, 0, :]
        b_sq = _squared_norms(b)
        sq, fn = _row_linear(A3[:, 0, :], b, b_sq)
        named = [
            (layer.kernel, sq, fn),
            (layer.bias, b_sq, lambda c, safe: _rows_dot(c, b, safe)),
        ]
        return _finish(entry, named)
    sq, fn = _linear(A3, B3, choose_method(T, d, p))
    named = [(layer.kernel, sq, fn)]
    if layer.bias is not None:
        bsq, bfn = _bias_terms(layer, layer.bias, B)
        named.append((layer.bias, bsq, bfn))
    return _finish(entry, named)


def _handle_dense_lora(entry, record, grads, value_of):
    """Dense with Keras LoRA: `W = W0 + s a b`, `s = alpha / rank`.

    With `G_i = A_i^T B_i` the per-example gradient of `W`, the adapters'
    are `s G_i b^T = A_i^T (s B_i b^T)` and `s a^T G_i = (s A_i a)^T B_i`:
    linear-layer gradients with transformed activations, so ghost norms
    and book-keeping apply with `p` or `d` replaced by the rank.
    """
    layer = entry.layer
    A3, B3, B, T = _dense_activations(entry, record, grads)
    d, p = A3.shape[-1], B3.shape[-1]
    scale = layer.lora_alpha / layer.lora_rank
    rank = layer.lora_rank
    lora_a = _f32(value_of(layer.lora_kernel_a))
    lora_b = _f32(value_of(layer.lora_kernel_b))
    named = []
    sq, fn = _linear(
        A3, ops.matmul(B3, ops.transpose(lora_b)) * scale,
        choose_method(T, d, rank),
    )
    named.append((layer.lora_kernel_a, sq, fn))
    sq, fn = _linear(
        ops.matmul(A3, lora_a) * scale, B3, choose_method(T, rank, p)
    )
    named.append((layer.lora_kernel_b, sq, fn))
    if layer._kernel.trainable:
        sq, fn = _linear(A3, B3, choose_method(T, d, p))
        named.append((layer._kernel, sq, fn))
    if layer.bias is not None:
        bsq, bfn = _bias_terms(layer, layer.bias, B)
        named.append((layer.bias, bsq, bfn))
    return _finish(entry, named)


def _call_args(record, n):
    args, kwargs = record.args
    return tuple(args[:n]), kwargs


_LETTERS = string.ascii_letters


def _einsum_structure(layer, input_rank):
    """Letters of an EinsumDense equation, or None if not Dense-like.

    Returns dict with `inp`, `ker`, `out` (ellipsis expanded when
    `input_rank` is given), `batch`, `T`, `D`, `P` letter strings.
    """
    equation = layer.equation.replace(" ", "")
    try:
        lhs, out = equation.split("->")
        inp, ker = lhs.split(",")
    except ValueError:
        return None
    if "..." in ker:
        return None
    if "..." in inp or "..." in out:
        if "..." not in inp or "..." not in out:
            return None
        if input_rank is None:
            # Cannot expand yet; structure is checked at trace time.
            return {"deferred": True}
        used = set(equation)
        free = [c for c in _LETTERS if c not in used]
        n_ell = input_rank - (len(inp) - 3)
        if n_ell < 0:
            return None
        fill = "".join(free[:n_ell])
        inp = inp.replace("...", fill)
        out = out.replace("...", fill)
    for s in (inp, ker, out):
        if len(set(s)) != len(s):
            return None
    if not inp or not out or inp[0] != out[0] or inp[0] in ker:
        return None
    batch = inp[0]
    T = "".join(c for c in out[1:] if c in inp and c not in ker)
    D = "".join(c for c in ker if c in inp and c not in out)
    P = "".join(c for c in ker if c in out and c not in inp)
    if len(D) + len(P) != len(ker):  # letters shared by all three, or
        return None  # kernel-only letters: not a product A^T B
    if any(c not in inp and c not in ker for c in out):
        return None
    return {"inp": inp, "ker": ker, "out": out, "batch": batch,
            "T": T, "D": D, "P": P}


def _handle_einsum(entry, record, grads):
    layer = entry.layer
    (inputs,), _ = _call_args(record, 1)
    A = _f32(inputs)
    B = _f32(grads[f"{entry.index}_z"])
    s = _einsum_structure(layer, len(A.shape))
    if s is None or s.get("deferred"):
        raise Unsupported(f"EinsumDense {layer.name!r}: equation")
    sizes = {}
    for c, n in zip(s["inp"], A.shape):
        sizes[c] = n
    for c, n in zip(s["ker"], layer.kernel.shape):
        sizes[c] = n
    for c, n in zip(s["out"], B.shape):
        sizes[c] = n
    b = s["batch"]
    T = _static_prod(sizes[c] for c in s["T"])
    d = _static_prod(sizes[c] for c in s["D"])
    p = _static_prod(sizes[c] for c in s["P"])
    if d is None or p is None:
        raise Unsupported(f"EinsumDense {layer.name!r}: unknown kernel size")
    A2 = ops.einsum(f"{s['inp']}->{b}{s['T']}{s['D']}", A)
    B2 = ops.einsum(f"{s['out']}->{b}{s['T']}{s['P']}", B)
    Tr = T if T is not None else -1
    A2 = ops.reshape(A2, (-1, Tr, d))
    B2 = ops.reshape(B2, (-1, Tr, p))
    sq, fn = _linear(A2, B2, choose_method(T, d, p))
    dp_shape = tuple(sizes[c] for c in s["D"] + s["P"])
    eq = f"{s['D']}{s['P']}->{s['ker']}"

    def kernel_clipped(c, safe):
        return ops.einsum(eq, ops.reshape(fn(c, safe), dp_shape))

    named = [(layer.kernel, sq, kernel_clipped)]
    if layer.bias is not None:
        bsq, bfn = _bias_terms(layer, layer.bias, B)
        named.append((layer.bias, bsq, bfn))
    return _finish(entry, named)


def _conv_pads(in_spatial, kernel_size, strides, dilation, padding, out_spatial):
    """(before, after) zeros per spatial axis that a conv reads."""
    pads = []
    for i in range(len(kernel_size)):
        k, s, dl = kernel_size[i], strides[i], dilation[i]
        total = max((out_spatial[i] - 1) * s + (k - 1) * dl + 1 - in_spatial[i], 0)
        if padding == "causal":
            pads.append((total, 0))
        elif padding == "same":
            pads.append((total // 2, total - total // 2))
        else:
            pads.append((0, 0))
    return pads


def _pad_for_conv(x, kernel_size, strides, dilation, padding, out_spatial):
    """Channels-last `x` with the zeros a "same"/"causal" conv reads."""
    pads = _conv_pads(
        x.shape[1:-1], kernel_size, strides, dilation, padding, out_spatial
    )
    if all(p == (0, 0) for p in pads):
        return x
    return ops.pad(x, [(0, 0)] + pads + [(0, 0)])


def _conv_patches(
    x, kernel_size, strides, dilation, padding, out_spatial, backend_ops
):
    """(n, T, K, C) patches of channels-last `x`: T output positions, K taps.

    One gather with static indices into the (padded, spatially flattened)
    input: on TensorFlow it is about 4x faster than stacking K strided
    slices or `tf.image.extract_patches`, for any stride and dilation. A
    backend's `gather_patches` reads the zeros from the index instead of a
    padded copy of the input.
    """
    in_spatial = tuple(x.shape[1:-1])
    pads = _conv_pads(in_spatial, kernel_size, strides, dilation, padding, out_spatial)
    padded = tuple(s + before + after for s, (before, after) in zip(in_spatial, pads))
    index = _patch_indices(padded, kernel_size, strides, dilation, out_spatial)
    gather_patches = getattr(backend_ops, "gather_patches", None)
    if gather_patches is not None:
        patches = gather_patches(
            ops.reshape(x, (-1, _static_prod(in_spatial), x.shape[-1])),
            _unpadded_positions(index, in_spatial, pads),
        )
        if patches is not None:
            return patches
    x = _pad_for_conv(x, kernel_size, strides, dilation, padding, out_spatial)
    flat = ops.reshape(x, (-1, _static_prod(padded), x.shape[-1]))
    return ops.take(flat, index, axis=1)


def _unpadded_positions(index, in_spatial, pads):
    """`index`'s flat positions in the padded input as flat positions in
    the unpadded one, -1 where they read the padding."""
    padded = [size + before + after for size, (before, after) in zip(in_spatial, pads)]
    coords = np.unravel_index(index, padded)
    flat = np.zeros(index.shape, "int64")
    inside = np.ones(index.shape, bool)
    for c, size, (before, _) in zip(coords, in_spatial, pads):
        c = c - before
        inside &= (c >= 0) & (c < size)
        flat = flat * size + c
    return np.where(inside, flat, -1).astype("int32")


def _single_channel_patches(x, kernel_size, strides, dilation, padding, out_spatial):
    """(n, K, T) patches of channels-last `x` with one channel, tap-major.

    With one channel a gather moves single floats, and patches in (T, K)
    order interleave the taps float by float; K strided slices stacked
    tap-major copy whole rows instead. For the 28x28x1 input of the
    benchmark CNN at batch 256, the per-example kernel gradients take
    2.7 ms against 5.9 ms on TensorFlow, 1.6 ms against 8.3 ms on JAX.
    """
    x = _pad_for_conv(x, kernel_size, strides, dilation, padding, out_spatial)
    x = x[..., 0]
    taps = []
    for tap in itertools.product(*(range(k) for k in kernel_size)):
        window = tuple(
            slice(t * dl, t * dl + (o - 1) * s + 1, s)
            for t, dl, o, s in zip(tap, dilation, out_spatial, strides)
        )
        taps.append(x[(slice(None),) + window])
    T = _static_prod(out_spatial)
    return ops.reshape(ops.stack(taps, axis=1), (-1, len(taps), T))


def _patch_indices(in_spatial, kernel_size, strides, dilation, out_spatial):
    """`(T, K)` flat input positions read by each output position's taps."""
    rank = len(kernel_size)
    index = np.zeros(tuple(out_spatial) + tuple(kernel_size), dtype="int64")
    row_stride = 1
    for i in reversed(range(rank)):
        start = np.arange(out_spatial[i]) * strides[i]
        tap = np.arange(kernel_size[i]) * dilation[i]
        shape = [1] * (2 * rank)
        shape[i] = out_spatial[i]
        index += row_stride * start.reshape(shape)
        shape = [1] * (2 * rank)
        shape[rank + i] = kernel_size[i]
        index += row_stride * tap.reshape(shape)
        row_stride *= in_spatial[i]
    return index.reshape(_static_prod(out_spatial), _static_prod(kernel_size)).astype(
        "int32"
    )


# Patches held at once while instantiating per-example conv kernel
# gradients (the gradients themselves are small): larger batches are
# processed in chunks of examples, one chunk after the other. Chunks that
# stay in a CPU's last-level cache are also faster: on the benchmark
# ResNet (2-core EPYC, 32 MiB L3), 4 MiB chunks made the DP step 11%
# (TensorFlow) and 1% (JAX) faster than 16 MiB ones; 2 MiB ones were
# 8% slower than 4 MiB on TensorFlow and 6% faster on JAX.
_PATCH_CHUNK_BYTES = 4 * 2**20


def _conv_kernel_grads(x, B, grads_of, chunk, rows_hint, backend_ops):
    """Per-example kernel gradients: a list of `(rows, G)`, `rows` a slice
    of the batch and `G` its (rows, F, D) gradients.

    `x`: (n, ...) layer inputs, `B`: (n, T, F) output gradients,
    `grads_of(x, B)`: the (n, F, D) gradients of those rows. The rows come
    in chunks of `chunk` rows (kept apart: concatenating would copy them).
    When the batch size is not static (TensorFlow traces with an unknown
    one) chunks are sized for `rows_hint` rows; the last chunk takes any
    rows beyond, and the chunks' row counts are not static.
    """
    n = x.shape[0] if x.shape[0] is not None else rows_hint
    if n is None or n <= chunk:
        return [(slice(None), grads_of(x, B))]
    num_chunks = -(-n // chunk)
    parts = []
    for j in range(num_chunks):
        rows = slice(j * chunk, None if j == num_chunks - 1 else (j + 1) * chunk)
        xj, Bj = backend_ops.after([g for _, g in parts[-1:]], (x[rows], B[rows]))
        parts.append((rows, grads_of(xj, Bj)))
    return parts


def _chunked_squared_norms(parts):
    """Per-example squared norms of gradients given as `(rows, G)` chunks."""
    return ops.concatenate(
        [_squared_norms(g) for _, g in parts], 0
    )


def _chunked_instantiated(parts):
    """(squared norms, clipped_fn) of per-example gradients given as
    `(rows, G)` chunks, `G` of shape (rows, F, D); clipped sums come out
    as (D, F)."""
    sq = _chunked_squared_norms(parts)

    def clipped(c, safe):
        total = None
        for rows, g in parts:
            part = _rows_dot(c[rows], g, safe)
            total = part if total is None else total + part
        return ops.transpose(total)

    return sq, clipped


def _norms_then_patches(parts, x, B, patches_of, backend_ops):
    """(squared norms, clipped_fn) of a conv layer whose instantiated
    per-example kernel gradients (`(rows, G)` chunks) give the norms only.

    The clipped sum is `P^T (c * B)`, with the patches `P` gathered again
    once the clip factors exist. Used where the patches are no larger than
    the kernel gradients (T <= filters), on backends that set
    `CONV_CLIPPED_SUM_FROM_PATCHES`: then the gather and one matrix
    product cost about what `tensordot(c, G)` does, and the gradients need
    not stay in memory until every layer's norms are known. On the
    TensorFlow ResNet benchmark (its two conv layers with 8x8 outputs and
    64 filters: 57 MB of kernel gradients at batch 256) the DP step's peak
    went from 608-610 to 551 MB (allocator 360-363 to 316; plain: 400 and
    264) at the same step time (one process, 10 rounds: DP/plain 1.22-1.26
    against 1.20-1.26). Also recomputing layers with more positions than
    filters (16x16 outputs, 32 filters: patches 8x the gradients) cost
    0.1 in that ratio. On JAX the same layers made the ResNet's step
    slower (1.13-1.16 against 1.06-1.09, 5 rounds), and its memory is
    within the goal without it.
    """

    def clipped(c, safe):
        # In the gradients' chunks of examples, one after the other, so that
        # one chunk's patches exist at a time, as while instantiating. (On
        # the ResNet benchmark the step's peak lies elsewhere: one gather of
        # the whole batch's patches gave the same peak at batch 256 and
        # 1024, and the same step time.)
        total = None
        for rows, _ in parts:
            xg, Bg, cg = backend_ops.after(
                [c if total is None else total], (x, B, c)
            )
            c_rows = cg[rows]
            part = _weighted_product_sum(
                patches_of(_kept_rows(xg[rows], c_rows, safe)),
                _kept_rows(Bg[rows], c_rows, safe),
                c_rows,
            )
            total = part if total is None else total + part
        return total

    return _chunked_squared_norms(parts), clipped


def _as_2d_conv(x, dy, conv_args):
    """`(x, dy, conv_args)` of a 1-D conv as a 2-D one of height 1 (what
    the backends' compiled kernels take); others unchanged. `conv_args`:
    (kernel_size, strides, dilation, pads)."""
    kernel_size, strides, dilation, pads = conv_args
    if len(kernel_size) != 1:
        return x, dy, conv_args
    return ops.expand_dims(x, 1), ops.expand_dims(dy, 1), (
        (1,) + kernel_size, (1,) + strides, (1,) + dilation, [(0, 0)] + list(pads)
    )


def _compiled_conv_parts(squared_norms, grads, x, dy, kernel_grad):
    """(squared norms, clipped_fn) of a conv layer from the backend's
    `per_example_conv_kernel_norms`: the clipped sum `sum_i c_i G_i` from
    the kept (n, F, K*C) gradients `grads`, or, where they were not kept,
    as one kernel gradient `kernel_grad(x, c * dy)` of the output
    gradients scaled by the clip factors. Clipped sums come out (K*C, F).
    """
    if grads is not None:
        return squared_norms, (
            lambda c, safe: ops.transpose(_rows_dot(c, grads, safe))
        )

    def clipped(c, safe):
        return kernel_grad(_kept_rows(x, c, safe), _scaled_rows(dy, c, safe))

    return squared_norms, clipped


def _handle_conv(entry, record, grads, backend_ops, rows_hint):
    """Conv1D/2D/3D as a linear layer of patches (any stride, dilation,
    padding, groups). Per-example kernel gradients are instantiated, or
    ghost norms are taken from patches (see `choose_method`); both are
    faster on either backend than a vectorized per-example convolution
    gradient. Instantiated: by the backend's compiled op where it has one
    (`per_example_conv_kernel_norms`, 1-D as 2-D, no patches), else from
    patches or grouped convolutions in chunks of examples."""
    layer = entry.layer
    (inputs,), _ = _call_args(record, 1)
    x = _f32(inputs)
    B = _f32(grads[f"{entry.index}_z"])
    rank = layer.rank
    if layer.data_format == "channels_first":
        perm = (0,) + tuple(range(2, rank + 2)) + (1,)
        x = ops.transpose(x, perm)
        B = ops.transpose(B, perm)
    out_spatial = tuple(B.shape[1:-1])
    if any(s is None for s in out_spatial) or any(
        s is None for s in x.shape[1:]
    ):
        raise Unsupported(f"conv {layer.name!r}: unknown spatial shape")
    kernel_size = tuple(layer.kernel_size)
    K = _static_prod(kernel_size)
    C = x.shape[-1]
    F = B.shape[-1]
    groups = layer.groups
    Cg, Fg = C // groups, F // groups
    T = _static_prod(out_spatial)
    B = ops.reshape(B, (-1, T, F))
    kshape = tuple(layer.kernel.shape)

    conv = (
        kernel_size, tuple(layer.strides), tuple(layer.dilation_rate),
        layer.padding, out_spatial,
    )

    def group_input(x, g):
        return x[..., g * Cg:(g + 1) * Cg] if groups > 1 else x

    def patches(x, g):
        return ops.reshape(
            _conv_patches(group_input(x, g), *conv, backend_ops), (-1, T, K * Cg)
        )

    # The backend instantiates the kernel gradients of stride-1 convs
    # without patches where that is faster (its `GROUPED_CONV_*`); with one
    # input channel per group, the strided slices are as fast.
    grouped_conv = backend_ops.per_example_conv_kernel_grads
    if (
        rank > 2
        or Cg == 1
        or any(s != 1 for s in layer.strides)
        or T < backend_ops.GROUPED_CONV_MIN_POSITIONS
    ):
        grouped_conv = None
    # Rows per chunk: about the backend's chunk size of grouped-convolution
    # inputs and output gradients, or `_PATCH_CHUNK_BYTES` of patches.
    pads = _conv_pads(x.shape[1:-1], *conv)
    if grouped_conv is not None:
        padded_positions = _static_prod(
            size + before + after
            for size, (before, after) in zip(x.shape[1:-1], pads)
        )
        chunk = backend_ops.GROUPED_CONV_CHUNK_BYTES // (
            4 * (padded_positions * Cg + T * Fg)
        )
    else:
        chunk = _PATCH_CHUNK_BYTES // (4 * T * K * Cg)
    chunk = max(1, chunk)

    def kernel_grads_of(g):
        # Stored as (n, Fg, K*Cg): B^T P is the fastest layout.
        def grads(x, B):
            if grouped_conv is not None:
                return grouped_conv(
                    group_input(x, g),
                    ops.reshape(B, (-1,) + out_spatial + (Fg,)),
                    kernel_size,
                    tuple(layer.dilation_rate),
                    pads,
                )
            if Cg == 1:
                P = _single_channel_patches(group_input(x, g), *conv)
                return ops.transpose(ops.matmul(P, B), (0, 2, 1))
            return ops.matmul(ops.transpose(B, (0, 2, 1)), patches(x, g))

        return grads

    compiled_norms = getattr(backend_ops, "per_example_conv_kernel_norms", None)
    conv_args = (
        kernel_size, tuple(layer.strides), tuple(layer.dilation_rate), pads
    )
    parts = []
    for g in range(groups):
        Bg = B[:, :, g * Fg:(g + 1) * Fg] if groups > 1 else B
        if choose_method(T, K * Cg, Fg) == "instantiate":
            xg, spatial_Bg = group_input(x, g), ops.reshape(
                Bg, (-1,) + out_spatial + (Fg,)
            )
            # The gradients are kept for the clipped sum where the layer
            # has more output positions than filters. Otherwise (where
            # CONV_CLIPPED_SUM_FROM_PATCHES also applies) only their norms
            # are: the clipped sum is one filter gradient of the scaled
            # output gradients. On the ResNet benchmark's 8x8 layers, 6.7
            # against 5.6 ms for the 64 -> 64 one, but 38 MB less memory.
            compiled = None
            if compiled_norms is not None:
                x2, dy2, conv2 = _as_2d_conv(xg, spatial_Bg, conv_args)
                compiled = compiled_norms(x2, dy2, *conv2, keep_grads=T > Fg)
            if compiled is not None:
                parts.append(
                    _compiled_conv_parts(
                        *compiled, x2, dy2,
                        lambda x, dy: backend_ops.conv_kernel_grad(x, dy, *conv2),
                    )
                )
                continue
            G = _conv_kernel_grads(
                x, Bg, kernel_grads_of(g), chunk, rows_hint, backend_ops
            )
            if backend_ops.CONV_CLIPPED_SUM_FROM_PATCHES and T <= Fg:
                parts.append(
                    _norms_then_patches(
                        G, x, Bg, functools.partial(patches, g=g), backend_ops
                    )
                )
            else:
                parts.append(_chunked_instantiated(G))
        else:
            parts.append(_linear(patches(x, g), Bg, "ghost"))
    sq = parts[0][0]
    for part in parts[1:]:
        sq = sq + part[0]

    def kernel_clipped(c, safe):
        pieces = [
            ops.reshape(fn(c, safe), kshape[:-1] + (Fg,)) for _, fn in parts
        ]
        return pieces[0] if len(pieces) == 1 else ops.concatenate(pieces, -1)

    named = [(layer.kernel, sq, kernel_clipped)]
    if layer.use_bias:
        bsq, bfn = _bias_terms(layer, layer.bias, B)
        named.append((layer.bias, bsq, bfn))
    return _finish(entry, named)


def _handle_embedding(entry, record, grads):
    layer = entry.layer
    (ids,), _ = _call_args(record, 1)
    ids = ops.cast(ids, "int32")
    B = _f32(grads[f"{entry.index}_0"])
    D = B.shape[-1]
    T = _static_prod(ids.shape[1:])
    ids = ops.reshape(ids, (-1, T if T is not None else -1))
    B = ops.reshape(B, (-1, T if T is not None else -1, D))
    if T == 1:
        sq = _squared_norms(B)
    else:
        same = ops.equal(ids[:, :, None], ids[:, None, :])
        bb = ops.einsum("ntd,nsd->nts", B, B)
        sq = ops.sum(ops.where(same, bb, ops.zeros_like(bb)), axis=(1, 2))
        sq = ops.maximum(sq, 0.0)
    vocab = layer.embeddings.shape[0]

    def clipped(c, safe):
        weighted = ops.reshape(_scaled_rows(B, c, safe), (-1, D))
        return ops.segment_sum(
            weighted, ops.reshape(ids, (-1,)), num_segments=vocab
        )

    named = [(layer.embeddings, sq, clipped)]
    reverse = getattr(layer, "reverse_embeddings", None)
    if reverse is not None and reverse is not layer.embeddings:
        # Untied output kernel of a ReversibleEmbedding, only used by
        # `reverse=True` calls (refused): no gradient.
        named.append(
            (reverse, ops.zeros_like(sq), lambda c, safe: ops.zeros(reverse.shape))
        )
    return _finish(entry, named)


def _handle_position_embedding(entry, record, grads):
    """keras-hub `PositionEmbedding`: the first T rows of the table,
    broadcast to the input. Each example's gradient is its output
    gradient `dy_i` (summed over any leading broadcast axes) in rows
    `[0, T)` of the table."""
    layer = entry.layer
    table = layer.position_embeddings
    dy = _f32(grads[f"{entry.index}_0"])
    T, D = dy.shape[-2], dy.shape[-1]
    if T is None:
        raise Unsupported(f"position embedding {layer.name!r}: unknown length")
    g = ops.reshape(dy, (ops.shape(dy)[0], -1, T, D))
    g = ops.sum(g, axis=1)
    sq = _squared_norms(g)
    rows = table.shape[0]

    def clipped(c, safe):
        total = _rows_dot(c, g, safe)
        return ops.pad(total, [(0, rows - T), (0, 0)])

    return _finish(entry, [(table, sq, clipped)])


def _handle_normalization(entry, record, grads):
    """Closed-form per-example gradients of a normalization layer.

    With output `y = scale * xhat + center`, each example's gradients are
    `sum(dy * xhat)` and `sum(dy)` over the axes the weights do not cover:
    no per-example vector-Jacobian product. `xhat` comes from the pass;
    GroupNormalization's sums come from its input and statistics (see
    `_normalization_call`).
    """
    layer = entry.layer
    scale, center, axes = _normalization_weights(layer)
    dy = _f32(grads[f"{entry.index}_0"])
    rank = len(dy.shape)
    axes = [a % rank for a in axes]
    reduce_axes = tuple(a for a in range(1, rank) if a not in axes)

    def per_example(t, variable):
        # The layers reshape (not transpose) their weights to the input's
        # rank, so the reduced axes map back by a reshape too.
        g = ops.sum(t, axis=reduce_axes) if reduce_axes else t
        return ops.reshape(g, (-1,) + tuple(variable.shape))

    scale = scale if scale is not None and scale.trainable else None
    center = center if center is not None and center.trainable else None
    if "xhat" in record.saved:
        xhat = _f32(record.saved["xhat"])
        per_scale = per_example(dy * xhat, scale) if scale is not None else None
        per_center = per_example(dy, center) if center is not None else None
    else:
        per_scale, per_center = _group_normalization_sums(layer, record, dy)
    named = [
        (w, g)
        for w, g in ((scale, per_scale), (center, per_center))
        if w is not None
    ]
    out = []
    for variable, g in named:
        sq = _squared_norms(g)
        out.append((variable, sq, (lambda g: lambda c, safe: _rows_dot(c, g, safe))(g)))
    return _finish(entry, out)


def _handle_generic(entry, record, grads, backend_ops, trainable, non_trainable, model):
    layer = entry.layer
    args, kwargs = record.args
    original_call = layer.call
    structure = (args, kwargs)
    flat = tree.flatten(structure)
    tensor_pos = [k for k, t in enumerate(flat) if ops.is_tensor(t)]
    tensors = [flat[k] for k in tensor_pos]
    tap_keys = record.tap_keys
    cotangents = [_f32(grads[key]) for _, key in tap_keys]
    out_index = [j for j, _ in tap_keys]
    variables = [model.trainable_variables[k] for k in entry.positions]
    params = [trainable[k] for k in entry.positions]
    nt_pos = {id(v): k for k, v in enumerate(model.non_trainable_variables)}
    nt_mapping = [
        (v, non_trainable[nt_pos[id(v)]])
        for v in layer.non_trainable_variables
        if id(v) in nt_pos
    ]

    def one_example(elems):
        leaves, cots = elems
        flat_i = list(flat)
        for k, t in zip(tensor_pos, leaves):
            flat_i[k] = ops.expand_dims(t, 0)
        args_i, kwargs_i = tree.pack_sequence_as(structure, flat_i)

        def f(values):
            mapping = list(zip(variables, values)) + nt_mapping
            with keras.StatelessScope(state_mapping=mapping):
                out = original_call(*args_i, **kwargs_i)
            out_leaves = tree.flatten(out)
            total = ops.zeros((), "float32")
            for j, cot in zip(out_index, cots):
                total = total + ops.sum(_f32(out_leaves[j])[0] * cot)
            return total, ()

        _, g = backend_ops.value_and_grad(f)(params)
        return [_f32(t) for t in g]

    per_example = ops.vectorized_map(one_example, (tensors, cotangents))
    out = []
    for g in per_example:
        sq = _squared_norms(g)
        out.append((sq, (lambda g: lambda c, safe: _rows_dot(c, g, safe))(g)))
    return out


_HANDLERS = {
    "dense": _handle_dense,
    "einsum": _handle_einsum,
    "embedding": _handle_embedding,
    "normalization": _handle_normalization,
    "position_embedding": _handle_position_embedding,
}


# --------------------------------------------------------------------------
# Public entry points.


def per_example_norms_and_sums(
    model, backend_ops, trainable, non_trainable, x, y=None, sample_weight=None,
    entries=None, rows_hint=None,
):
    """Per-variable per-example squared norms from one batched pass.

    `rows_hint`: the batch size expected when `x`'s is not static (only
    used to bound memory).

    Returns `(squared_norms, clipped_fn, losses, y_pred, new_non_trainable)`
    where `squared_norms` has one `(n,)` tensor per trainable variable and
    `clipped_fn(factors)` the clipped sums for per-variable factors.
    """
    if entries is None:
        entries = build_plan(model)
    run = _make_run(model, trainable, non_trainable, x, y, sample_weight)
    position_of = {id(v): k for k, v in enumerate(model.trainable_variables)}

    def value_of(variable):
        return trainable[position_of[id(variable)]]

    def handle(entry, record, own_grads):
        if entry.kind == "generic":
            return _handle_generic(
                entry, record, own_grads, backend_ops, trainable,
                non_trainable, model,
            )
        if entry.kind == "conv":
            return _handle_conv(entry, record, own_grads, backend_ops, rows_hint)
        if entry.kind == "dense_lora":
            return _handle_dense_lora(entry, record, own_grads, value_of)
        return _HANDLERS[entry.kind](entry, record, own_grads)

    losses, y_pred, new_nt, records, terms = _batched_pass(
        entries, run, handle, backend_ops
    )
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
                squared[k] = ops.zeros((n,), "float32")
                fns[k] = (
                    lambda k: lambda c, safe: ops.zeros(
                        ops.shape(trainable[k]), "float32"
                    )
                )(k)

    def clipped_fn(factors, safe=False):
        """The clipped sums for per-variable factors. With `safe`, rows
        whose factor is 0 are left out exactly even where their tensors
        are not finite (see the handlers' comment)."""
        return [
            ops.reshape(_f32(fn(ops.cast(c, "float32"), safe)), ops.shape(t))
            for fn, c, t in zip(fns, factors, trainable)
        ]

    return squared, clipped_fn, losses, y_pred, new_nt


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
    """Fast-path equivalent of `per_example.clipped_gradient_sum`.

    Raises `Unsupported` (at trace time) when the model needs the general
    vmap path. Examples whose gradient norm or loss is not finite get
    factor 0 and are left out of the sums exactly (`nonfinite` in the
    result marks them).
    """
    entries = build_plan(model)
    rows = ops.shape(tree.flatten(x)[0])[0]
    settings = getattr(model, "_keras_dp", None)
    rows_hint = microbatch_size or getattr(settings, "batch_size_hint", None)

    count_groups = optimizer.num_count_groups

    def chunk_fn(nt, cx, cy, csw):
        squared, clipped_fn, losses, y_pred, new_nt = per_example_norms_and_sums(
            model, backend_ops, trainable, nt, cx, cy, csw, entries=entries,
            rows_hint=rows_hint,
        )
        factors = per_example_lib.scaled_factors(
            optimizer.variable_clip_factors(squared), scale
        )

        def finite_step():
            return clipped_fn(factors), ops.zeros(ops.shape(losses), "bool")

        def step_with_nonfinite():
            # Factor 0 for the non-finite examples, left out exactly.
            nonfinite = clipping_lib.nonfinite_examples(squared, losses)
            zeroed = clipping_lib.zero_factors(factors, nonfinite)
            return clipped_fn(zeroed, safe=True), nonfinite

        # A step without a non-finite example (the usual one) costs only
        # the test; the other variant runs in a step with one.
        clipped, nonfinite = ops.cond(
            clipping_lib.all_finite(squared, losses),
            finite_step,
            step_with_nonfinite,
        )
        clipped = list(clipped)
        if count_groups:
            # Adaptive clipping's centred counts; padding rows count 0.
            mask = None if csw is None else per_example_lib._row_mask(csw)
            clipped.append(optimizer.clip_counts(squared, mask))
        return clipped, losses, y_pred, new_nt, nonfinite

    def result(clipped, losses, y_pred, new_nt, nonfinite):
        out = {
            "clipped_sum": clipped[: len(trainable)],
            "losses": losses,
            "nonfinite": nonfinite,
            "y_pred": y_pred,
            "non_trainable": new_nt,
        }
        if count_groups:
            out["clip_counts"] = clipped[len(trainable)]
        return out

    if microbatch_size is None:
        return result(*chunk_fn(non_trainable, x, y, sample_weight))

    examples = {"x": x}
    if y is not None:
        examples["y"] = y
    examples["sample_weight"] = (
        sample_weight
        if sample_weight is not None
        else ops.ones((rows,), dtype="float32")
    )
    pad = (-rows) % microbatch_size
    examples = per_example_lib._pad_rows(examples, pad)
    chunks = tree.map_structure(
        lambda t: ops.reshape(t, (-1, microbatch_size) + tuple(t.shape[1:])),
        examples,
    )
    num_chunks = ops.shape(tree.flatten(chunks)[0])[0]
    chunks["chunk"] = ops.arange(num_chunks, dtype="int32")
    seed_ids = per_example_lib._seed_state_ids(model)
    seed_positions = [
        k
        for k, v in enumerate(model.non_trainable_variables)
        if id(v) in seed_ids
    ]

    def scan_fn(total, chunk):
        # Each chunk draws its own random masks: offset the seed states by
        # the chunk number (undone after, so the state advances as once).
        nt = list(non_trainable)
        offsets = {}
        for k in seed_positions:
            offset = ops.cast(
                ops.stack([(chunk["chunk"] + 1) * per_example_lib._SEED_STRIDE, 0]),
                nt[k].dtype,
            )
            offsets[k] = offset
            nt[k] = nt[k] + offset
        clipped, losses, y_pred, new_nt, nonfinite = chunk_fn(
            nt, chunk["x"], chunk.get("y"), chunk["sample_weight"]
        )
        for k, offset in offsets.items():
            new_nt[k] = new_nt[k] - offset
        total = [a + b for a, b in zip(total, clipped)]
        return total, (losses, y_pred, new_nt, nonfinite)

    init = [ops.zeros(ops.shape(t), dtype="float32") for t in trainable]
    if count_groups:
        init.append(ops.zeros((count_groups,), dtype="float32"))
    clipped, (losses, y_pred, new_nt, nonfinite) = backend_ops.scan(
        scan_fn, init, chunks
    )
    losses, y_pred, nonfinite = tree.map_structure(
        lambda t: ops.reshape(t, (-1,) + tuple(t.shape[2:]))[:rows],
        (losses, y_pred, nonfinite),
    )
    new_nt = [t[0] for t in new_nt]
    return result(clipped, losses, y_pred, new_nt, nonfinite)
