"""Rules for Dense, Dense with Keras LoRA, and EinsumDense.

With inputs `A_i` (T x d) and pre-activation output gradients `B_i`
(T x p), each example's kernel gradient is `G_i = A_i^T B_i` (see
`keras_dp.per_example.linear` for ghost norms and book-keeping) and its
bias gradient comes from `B_i`. The rules tap the output before the
layer's activation, so `B_i` is the gradient the kernel sees.

Dense with LoRA (`enable_lora`): the adapters' gradients are linear-layer
gradients of transformed activations (ghost or instantiated, with the rank
in place of `d` or `p`). EinsumDense: equations that are a product `A^T B`
after moving letters (batch, then the "row" letters T, then the contracted
D or the output P), any other equation gets the generic rule.

Kernels with LowRankSparse carriers get their carrier gradients' terms
(`keras_dp.per_example.carriers.kernel_terms`) in place of the kernel's.
"""

import string

import keras
from keras import ops

from keras_dp import keras_compat
from keras_dp.einsum_equations import equation_parts
from keras_dp.einsum_equations import kernel_sides
from keras_dp.per_example.carriers import kernel_terms
from keras_dp.per_example.linear import bias_terms
from keras_dp.per_example.linear import choose_method
from keras_dp.per_example.linear import linear_terms
from keras_dp.per_example.linear import row_linear_terms
from keras_dp.per_example.registry import Unsupported
from keras_dp.per_example.registry import builtin_registrations
from keras_dp.per_example.registry import not_quantized
from keras_dp.per_example.registry import register_per_example_rule
from keras_dp.per_example.registry import uses_plain_weights
from keras_dp.per_example.rows import f32
from keras_dp.per_example.rows import rows_dot
from keras_dp.per_example.rows import squared_norms
from keras_dp.per_example.rows import static_prod
from keras_dp.per_example.units import unit_positions
from keras_dp.per_example.units import unit_rows


def _with_lora(layer):
    return not_quantized(layer) and getattr(layer, "lora_enabled", False)


def _activations(call, grads):
    """Inputs `A` (n, T, d) and pre-activation gradients `B` (n, T, p).

    Also returns `B` in the layer's output shape (for the bias) and `T`.
    """
    A = f32(call.inputs)
    B = f32(grads)
    T = static_prod(A.shape[1:-1])
    return _with_positions(A, T), _with_positions(B, T), B, T


def _with_positions(t, T):
    """`t` (n, ..., features) as (n, T, features)."""
    if len(t.shape) == 3:
        return t
    if len(t.shape) == 2:
        return ops.expand_dims(t, 1)
    return ops.reshape(t, (-1, T if T is not None else -1, t.shape[-1]))


def dense_rule(layer, call, grads, context):
    A3, B3, B, T = _activations(call, grads)
    d, p = A3.shape[-1], B3.shape[-1]
    if (
        T == 1
        and layer.bias is not None
        and context.carrier_of(layer.kernel) is None
        and context.partition_of(layer.kernel) is None
        and context.partition_of(layer.bias) is None
    ):
        # The bias's per-example gradients are the rows of b, whose norms
        # the kernel's need too: computed once (TensorFlow does not merge
        # the two).
        b = B3[:, 0, :]
        b_sq = squared_norms(b)
        sq, fn = row_linear_terms(A3[:, 0, :], b, b_sq)
        return [
            (layer.kernel, sq, fn),
            (layer.bias, b_sq, lambda c, safe: rows_dot(c, b, safe)),
        ]
    sq, fn = kernel_terms(context, layer.kernel, A3, B3, choose_method(T, d, p))
    terms = [(layer.kernel, sq, fn)]
    if layer.bias is not None:
        terms.append(bias_terms(layer.bias, B))
    return terms


def dense_lora_rule(layer, call, grads, context):
    """Dense with Keras LoRA: `W = W0 + s a b`, `s = alpha / rank`.

    With `G_i = A_i^T B_i` the per-example gradient of `W`, the adapters'
    are `s G_i b^T = A_i^T (s B_i b^T)` and `s a^T G_i = (s A_i a)^T B_i`:
    linear-layer gradients with transformed activations, so ghost norms
    and book-keeping apply with `p` or `d` replaced by the rank.
    """
    A3, B3, B, T = _activations(call, grads)
    d, p = A3.shape[-1], B3.shape[-1]
    scale = layer.lora_alpha / layer.lora_rank
    rank = layer.lora_rank
    lora_a = f32(context.value_of(layer.lora_kernel_a))
    lora_b = f32(context.value_of(layer.lora_kernel_b))
    terms = []
    sq, fn = linear_terms(
        A3,
        ops.matmul(B3, ops.transpose(lora_b)) * scale,
        choose_method(T, d, rank),
    )
    terms.append((layer.lora_kernel_a, sq, fn))
    sq, fn = linear_terms(ops.matmul(A3, lora_a) * scale, B3, choose_method(T, rank, p))
    terms.append((layer.lora_kernel_b, sq, fn))
    base_kernel = keras_compat.lora_base_kernel(layer)
    if base_kernel.trainable:
        sq, fn = linear_terms(A3, B3, choose_method(T, d, p))
        terms.append((base_kernel, sq, fn))
    if layer.bias is not None:
        terms.append(bias_terms(layer.bias, B))
    return terms


_LETTERS = string.ascii_letters


def einsum_structure(layer, input_rank):
    """Letters of an EinsumDense equation, or None if not Dense-like.

    Returns dict with `inp`, `ker`, `out` (ellipsis expanded when
    `input_rank` is given), `batch`, `T`, `D`, `P` letter strings.
    """
    parts = equation_parts(layer.equation)
    if parts is None:
        return None
    inp, ker, out = parts
    if "..." in ker:
        return None
    if "..." in inp or "..." in out:
        if "..." not in inp or "..." not in out:
            return None
        if input_rank is None:
            # Cannot expand yet; structure is checked at trace time.
            return {"deferred": True}
        used = set(inp + ker + out)
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
    D, P = kernel_sides(inp, ker, out)
    if len(D) + len(P) != len(ker):  # letters shared by all three, or
        return None  # kernel-only letters: not a product A^T B
    if any(c not in inp and c not in ker for c in out):
        return None
    return {"inp": inp, "ker": ker, "out": out, "batch": batch, "T": T, "D": D, "P": P}


def _einsum_applies(layer):
    return uses_plain_weights(layer) and einsum_structure(layer, None) is not None


def einsum_rule(layer, call, grads, context):
    A = f32(call.inputs)
    B = f32(grads)
    s = einsum_structure(layer, len(A.shape))
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
    T = static_prod(sizes[c] for c in s["T"])
    d = static_prod(sizes[c] for c in s["D"])
    p = static_prod(sizes[c] for c in s["P"])
    if d is None or p is None:
        raise Unsupported(f"EinsumDense {layer.name!r}: unknown kernel size")
    A2 = ops.einsum(f"{s['inp']}->{b}{s['T']}{s['D']}", A)
    B2 = ops.einsum(f"{s['out']}->{b}{s['T']}{s['P']}", B)
    Tr = T if T is not None else -1
    # A unit's rows are more positions (keras_dp.per_example.units).
    R = context.rows_per_unit
    A2 = unit_positions(ops.reshape(A2, (-1, Tr, d)), R)
    B2 = unit_positions(ops.reshape(B2, (-1, Tr, p)), R)
    T = None if T is None else R * T
    if context.carrier_of(layer.kernel) is not None and s["ker"] != s["D"] + s["P"]:
        # LowRankSparse views such kernels as their most square matrix,
        # not as the product this rule computes.
        raise Unsupported(
            f"LowRankSparse: EinsumDense {layer.name!r} has kernel letters "
            f"{s['ker']!r}, not its contracted letters then its output ones"
        )
    ker = s["ker"]
    sq, fn = kernel_terms(
        context,
        layer.kernel,
        A2,
        B2,
        choose_method(T, d, p),
        view_axes=(
            tuple(ker.index(c) for c in s["D"]),
            tuple(ker.index(c) for c in s["P"]),
        ),
    )
    dp_shape = tuple(sizes[c] for c in s["D"] + s["P"])
    eq = f"{s['D']}{s['P']}->{s['ker']}"

    def kernel_clipped(c, safe):
        return ops.einsum(eq, ops.reshape(fn(c, safe), dp_shape))

    terms = [(layer.kernel, sq, kernel_clipped)]
    if layer.bias is not None:
        terms.append(bias_terms(layer.bias, unit_rows(B, R) if R > 1 else B))
    return terms


with builtin_registrations():
    register_per_example_rule(
        keras.layers.Dense,
        dense_lora_rule,
        name="dense_lora",
        taps="pre_activation",
        applies=_with_lora,
        units="positions",
    )
    register_per_example_rule(
        keras.layers.Dense,
        dense_rule,
        name="dense",
        taps="pre_activation",
        applies=uses_plain_weights,
        units="positions",
    )
    register_per_example_rule(
        keras.layers.EinsumDense,
        einsum_rule,
        name="einsum",
        taps="pre_activation",
        applies=_einsum_applies,
        units="context",
    )
