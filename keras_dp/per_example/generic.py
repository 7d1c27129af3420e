"""The generic rule: a layer-local vector-Jacobian product per example.

For any layer without a closed form (custom layers, DepthwiseConv, ...),
each example's gradients are instantiated by re-running the layer's own
`call` on that example alone, under `vectorized_map`, and pulling its
output gradient back to the layer's variables. Registered for
`keras.layers.Layer`, so every layer with weights that no other rule
accepts gets it.

Recurrent layers (LSTM, GRU, SimpleRNN, ConvLSTM, each direction of a
Bidirectional) and TimeDistributed get the same rule for the layer as a
whole, sublayers included: their cell runs once per time step, or their
inner layer on all time steps as one batch, so the rows a sublayer sees are
not examples, while the whole layer's call has one row per example.

The layer is called again outside the batched pass, so it must not draw
random numbers in training (dropout): that call would draw other masks.
"""

import keras
from keras import ops
from keras import tree

from keras_dp import keras_compat
from keras_dp.per_example.registry import Unsupported
from keras_dp.per_example.registry import builtin_registrations
from keras_dp.per_example.registry import register_per_example_rule
from keras_dp.per_example.rows import f32
from keras_dp.per_example.rows import instantiated_terms
from keras_dp.per_example.units import unit_sums


def _uses_randomness(layer):
    """Whether `layer` (or a sublayer) draws random numbers in training:
    dropout rates above 0 of recurrent cells, or any other layer that owns
    a seed generator."""
    for sub in keras_compat.flatten_layers(layer, include_self=True):
        rates = [getattr(sub, name, None) for name in ("dropout", "recurrent_dropout")]
        if any(isinstance(r, (int, float)) and r > 0 for r in rates):
            return True
        if keras_compat.seed_generators(sub) and not any(
            isinstance(r, (int, float)) for r in rates
        ):
            return True
    return False


def check_no_random_state(layer):
    if _uses_randomness(layer):
        raise Unsupported(
            f"layer {layer.name!r} ({type(layer).__name__}) has weights and "
            "draws random numbers in training (dropout): the fast path "
            "recomputes its per-example gradients in a separate call, which "
            "would draw other masks than the batched pass"
        )


def generic_rule(layer, call, grads, context):
    """Per-example gradients of the layer's variables by a vector-Jacobian
    product of its own call, one example at a time under
    `vectorized_map`."""
    original_call = layer.call
    structure = (call.args, call.kwargs)
    flat = tree.flatten(structure)
    tensor_pos = [k for k, t in enumerate(flat) if ops.is_tensor(t)]
    tensors = [flat[k] for k in tensor_pos]
    tapped = [(j, g) for j, g in enumerate(tree.flatten(grads)) if g is not None]
    out_index = [j for j, _ in tapped]
    cotangents = [f32(g) for _, g in tapped]
    variables = context.variables
    params = [context.value_of(v) for v in variables]
    nt_mapping = []
    for v in layer.non_trainable_variables:
        value = context.value_of(v, None)
        if value is not None:
            nt_mapping.append((v, value))

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
                total = total + ops.sum(f32(out_leaves[j])[0] * cot)
            return total, ()

        _, g = context.backend_ops.value_and_grad(f)(params)
        return [f32(t) for t in g]

    # PyTorch: Keras's convolutions copy to channels-last memory, which
    # torch.vmap cannot do (the layer draws no random numbers: checked).
    with keras_compat.without_channels_last_copies():
        per_example = ops.vectorized_map(one_example, (tensors, cotangents))
    # A unit's gradient is the sum of its rows' (keras_dp.per_example.units).
    R = context.rows_per_unit
    return [
        instantiated_terms(v, unit_sums(g, R)) for v, g in zip(variables, per_example)
    ]


with builtin_registrations():
    register_per_example_rule(
        keras.layers.Layer,
        generic_rule,
        name="generic",
        match="subclasses",
        check_layer=check_no_random_state,
        units="context",
    )
    for _whole_class in (keras.layers.RNN, keras.layers.TimeDistributed):
        register_per_example_rule(
            _whole_class,
            generic_rule,
            name="generic",
            match="subclasses",
            whole=True,
            check_layer=check_no_random_state,
            units="context",
        )
