"""Rule for LayerNormalization, GroupNormalization and RMSNormalization.

They compute `y = scale * xhat + center`, where `xhat` depends on the input
only and the weights broadcast along some axes; each example's gradients
are `sum(dy * xhat)` and `sum(dy)` over the other axes, in closed form (no
per-example vector-Jacobian product).

In the batched pass LayerNormalization and RMSNormalization compute their
output as `scale * xhat + center`, with `xhat` the layer's own call with
scale 1 and center 0 (so every option of the layer is honoured), and keep
`xhat` for the rule. GroupNormalization runs its own call unchanged and
keeps only its per-group statistics, from which and its input the rule's
sums follow: kept whole, `xhat` would hold one activation-sized tensor per
layer from the forward pass to the layer's backward step, the largest extra
memory of a convolutional network's step.
"""

import keras
from keras import ops

from keras_dp.per_example.registry import builtin_registrations
from keras_dp.per_example.registry import register_per_example_rule
from keras_dp.per_example.registry import uses_plain_weights
from keras_dp.per_example.rows import f32
from keras_dp.per_example.rows import instantiated_terms
from keras_dp.per_example.units import unit_sums


def normalization_weights(layer):
    """`(scale, center, axes)` of a stock normalization layer: the weights
    (either may be None) and the axes they broadcast along."""
    if isinstance(layer, keras.layers.GroupNormalization):
        return layer.gamma, layer.beta, [layer.axis]
    if isinstance(layer, keras.layers.LayerNormalization):
        return layer.gamma, layer.beta, list(layer.axis)
    return layer.scale, None, list(layer.axis)  # RMSNormalization


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


def _group_normalization_call(layer, inputs, saved):
    """GroupNormalization's output for `inputs`, computed as Keras 3's stock
    `call` computes it, with its per-example statistics kept in `saved`:
    `mean` and `inv` of shape `(n, groups)`, `xhat = (x - mean) * inv`
    within each group. The layer's own call would compute the statistics
    without handing them out, and computing them again beside it costs
    two more passes over the input."""
    dtype = keras.backend.result_type(inputs.dtype, "float32")
    grouped = _grouped_shape(layer, inputs.shape)
    xg = ops.cast(ops.reshape(inputs, grouped), dtype)
    axis = layer.axis % len(inputs.shape)
    reduce_axes = [a for a in range(1, len(xg.shape)) if a != axis]
    mean, variance = ops.moments(xg, axes=reduce_axes, keepdims=True)
    inv = ops.rsqrt(variance + layer.epsilon)
    saved.update(
        mean=ops.stop_gradient(ops.reshape(mean, (-1, layer.groups))),
        inv=ops.stop_gradient(ops.reshape(inv, (-1, layer.groups))),
    )
    broadcast = [1] * len(xg.shape)
    broadcast[axis : axis + 2] = grouped[axis : axis + 2]
    if layer.scale:
        inv = inv * ops.cast(ops.reshape(layer.gamma, broadcast), dtype)
    shift = -mean * inv
    if layer.center:
        shift = shift + ops.cast(ops.reshape(layer.beta, broadcast), dtype)
    outputs = ops.cast(xg * inv + shift, inputs.dtype)
    return ops.cast(ops.reshape(outputs, ops.shape(inputs)), layer.compute_dtype)


def _group_normalization_sums(layer, x, saved, dy):
    """Per-example `sum(dy * xhat)` and `sum(dy)`, shape `(n, channels)`,
    from GroupNormalization's input `x` and statistics.

    `mean` and `inv` are constant over the summed axes within a group, so
    `sum(dy * xhat) = inv * (sum(dy * x) - mean * sum(dy))`: no `xhat`.
    """
    x = f32(x)
    rank = len(x.shape)
    axis = layer.axis % rank
    summed = tuple(a for a in range(1, rank) if a != axis)
    sum_dy = ops.sum(dy, axis=summed)
    sum_dy_x = ops.sum(dy * x, axis=summed)
    channels = x.shape[axis]
    per_group = (-1, layer.groups, channels // layer.groups)
    mean = ops.expand_dims(f32(saved["mean"]), -1)
    inv = ops.expand_dims(f32(saved["inv"]), -1)
    sum_dy_xhat = inv * (
        ops.reshape(sum_dy_x, per_group) - mean * ops.reshape(sum_dy, per_group)
    )
    return ops.reshape(sum_dy_xhat, (-1, channels)), sum_dy


def normalization_forward(layer, call, args, kwargs, saved):
    """A normalization layer's output in the batched pass, keeping in
    `saved` what the rule needs (see the module docstring)."""
    # The rule is registered for the stock `call` only, which
    # `_group_normalization_call` computes.
    if isinstance(layer, keras.layers.GroupNormalization):
        inputs = args[0] if args else kwargs["inputs"]
        return _group_normalization_call(layer, inputs, saved)
    scale, center, axes = normalization_weights(layer)
    weights = [w for w in (scale, center) if w is not None]
    # Read inside the pass's stateless scope: the traced values.
    values = [w.value for w in weights]
    identity = [
        (w, ops.ones(w.shape, w.dtype) if w is scale else ops.zeros(w.shape, w.dtype))
        for w in weights
    ]
    with keras.StatelessScope(state_mapping=identity):
        xhat = call(*args, **kwargs)
    saved["xhat"] = xhat
    rank = len(xhat.shape)
    shape = [1] * rank
    for a in axes:
        shape[a % rank] = xhat.shape[a % rank]
    outputs = xhat
    for w, value in zip(weights, values):
        value = ops.cast(ops.reshape(value, shape), xhat.dtype)
        outputs = outputs * value if w is scale else outputs + value
    return outputs


def normalization_rule(layer, call, grads, context):
    """Closed-form per-example gradients of a normalization layer:
    `sum(dy * xhat)` and `sum(dy)` over the axes the weights do not
    cover."""
    scale, center, axes = normalization_weights(layer)
    dy = f32(grads)
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
    if "xhat" in context.saved:
        xhat = f32(context.saved["xhat"])
        per_scale = per_example(dy * xhat, scale) if scale is not None else None
        per_center = per_example(dy, center) if center is not None else None
    else:
        per_scale, per_center = _group_normalization_sums(
            layer, call.inputs, context.saved, dy
        )
    # A unit's gradient is the sum of its rows' (keras_dp.per_example.units).
    return [
        instantiated_terms(w, unit_sums(g, context.rows_per_unit))
        for w, g in ((scale, per_scale), (center, per_center))
        if w is not None
    ]


with builtin_registrations():
    for _normalization_class in (
        keras.layers.LayerNormalization,
        keras.layers.GroupNormalization,
        getattr(keras.layers, "RMSNormalization", None),
    ):
        if _normalization_class is not None:
            register_per_example_rule(
                _normalization_class,
                normalization_rule,
                name="normalization",
                applies=uses_plain_weights,
                forward=normalization_forward,
                units="context",
            )
