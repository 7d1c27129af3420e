"""Rule for Conv1D/2D/3D: a linear layer of patches.

With `A_i` the input patches (T output positions x K taps * C channels, see
`keras_dp.per_example.patches`) and `B_i` the pre-activation output
gradients (T x F), a conv layer's kernel gradient is `A_i^T B_i` (per
group, with `groups`). Its norms are ghost norms from the patches or the
norms of instantiated per-example kernel gradients (`choose_method`).
Instantiated kernel gradients come from:

- the backend's compiled op where it has one
  (`per_example_conv_kernel_norms`, 1-D convs as 2-D, no patches);
- else, for stride-1 1-D/2-D convs where the backend sets it up
  (`per_example_conv_kernel_grads`: one grouped convolution per chunk of
  examples, the examples as its groups);
- else patches, or with one input channel per group strided slices
  stacked tap-major,

in chunks of examples so that only about `_PATCH_CHUNK_BYTES` of patches
(or the backend's `GROUPED_CONV_CHUNK_BYTES` of grouped-convolution inputs)
exist at once. Conv layers with no more output positions than filters, on
backends that set `CONV_CLIPPED_SUM_FROM_PATCHES`, keep only the norms and
take the clipped sum from their patches gathered again
(`_norms_then_patches`), so the per-example gradients are not held until
every layer's norms are known.

A kernel with LowRankSparse carriers is taken as the patch product
`(K * C, F)` and projected (`keras_dp.per_example.carriers`).
"""

import functools

import keras
from keras import ops

from keras_dp.per_example import linear
from keras_dp.per_example.carriers import kernel_terms
from keras_dp.per_example.linear import bias_terms
from keras_dp.per_example.linear import choose_method
from keras_dp.per_example.patches import as_2d_conv
from keras_dp.per_example.patches import conv_pads
from keras_dp.per_example.patches import conv_patches
from keras_dp.per_example.patches import single_channel_patches
from keras_dp.per_example.registry import Unsupported
from keras_dp.per_example.registry import builtin_registrations
from keras_dp.per_example.registry import register_per_example_rule
from keras_dp.per_example.registry import uses_plain_weights
from keras_dp.per_example.rows import f32
from keras_dp.per_example.rows import kept_rows
from keras_dp.per_example.rows import rows_dot
from keras_dp.per_example.rows import scaled_rows
from keras_dp.per_example.rows import squared_norms
from keras_dp.per_example.rows import static_prod
from keras_dp.per_example.units import unit_positions
from keras_dp.per_example.units import unit_rows
from keras_dp.per_example.units import unit_sums

# Patches held at once while instantiating per-example conv kernel
# gradients (the gradients themselves are small): larger batches are
# processed in chunks of examples, one chunk after the other. Chunks that
# stay in a CPU's last-level cache are also faster, which is why the
# chunks are not larger.
_PATCH_CHUNK_BYTES = 4 * 2**20


def _kernel_grads_in_chunks(x, B, grads_of, chunk, rows_hint, backend_ops):
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
    return ops.concatenate([squared_norms(g) for _, g in parts], 0)


def _chunked_instantiated(parts):
    """(squared norms, clipped_fn) of per-example gradients given as
    `(rows, G)` chunks, `G` of shape (rows, F, D); clipped sums come out
    as (D, F)."""
    sq = _chunked_squared_norms(parts)

    def clipped(c, safe):
        total = None
        for rows, g in parts:
            part = rows_dot(c[rows], g, safe)
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
    not stay in memory until every layer's norms are known.
    """

    def clipped(c, safe):
        # In the gradients' chunks of examples, one after the other, so that
        # one chunk's patches exist at a time, as while instantiating.
        total = None
        for rows, _ in parts:
            xg, Bg, cg = backend_ops.after([c if total is None else total], (x, B, c))
            c_rows = cg[rows]
            part = linear.weighted_product_sum(
                patches_of(kept_rows(xg[rows], c_rows, safe)),
                kept_rows(Bg[rows], c_rows, safe),
                c_rows,
            )
            total = part if total is None else total + part
        return total

    return _chunked_squared_norms(parts), clipped


def _compiled_conv_parts(squared_norms, grads, x, dy, kernel_grad):
    """(squared norms, clipped_fn) of a conv layer from the backend's
    `per_example_conv_kernel_norms`: the clipped sum `sum_i c_i G_i` from
    the kept (n, F, K*C) gradients `grads`, or, where they were not kept,
    as one kernel gradient `kernel_grad(x, c * dy)` of the output
    gradients scaled by the clip factors. Clipped sums come out (K*C, F).
    """
    if grads is not None:
        return squared_norms, (lambda c, safe: ops.transpose(rows_dot(c, grads, safe)))

    def clipped(c, safe):
        return kernel_grad(kept_rows(x, c, safe), scaled_rows(dy, c, safe))

    return squared_norms, clipped


def _unit_parts(grads, rows_per_unit):
    """(squared norms, clipped_fn) of units of rows from the rows'
    instantiated kernel gradients `(U * R, F, D)`: a unit's gradient is
    the sum of its rows'. Clipped sums come out as (D, F)."""
    G = unit_sums(grads, rows_per_unit)
    return squared_norms(G), (lambda c, safe: ops.transpose(rows_dot(c, G, safe)))


def conv_rule(layer, call, grads, context):
    """Conv1D/2D/3D as a linear layer of patches (any stride, dilation,
    padding, groups). Per-example kernel gradients are instantiated, or
    ghost norms are taken from patches (see `choose_method`): either is
    preferred over a vectorized per-example convolution gradient, which is
    slower on both backends.

    Units of R rows (`keras_dp.per_example.units`): ghost norms take a
    unit's patches and output gradients as `R * T` positions; instantiated
    gradients are summed over the unit's rows."""
    backend_ops = context.backend_ops
    R = context.rows_per_unit
    x = f32(call.inputs)
    B = f32(grads)
    rank = layer.rank
    if layer.data_format == "channels_first":
        perm = (0,) + tuple(range(2, rank + 2)) + (1,)
        x = ops.transpose(x, perm)
        B = ops.transpose(B, perm)
    out_spatial = tuple(B.shape[1:-1])
    if any(s is None for s in out_spatial) or any(s is None for s in x.shape[1:]):
        raise Unsupported(f"conv {layer.name!r}: unknown spatial shape")
    kernel_size = tuple(layer.kernel_size)
    K = static_prod(kernel_size)
    C = x.shape[-1]
    F = B.shape[-1]
    groups = layer.groups
    Cg, Fg = C // groups, F // groups
    T = static_prod(out_spatial)
    B = ops.reshape(B, (-1, T, F))
    kshape = tuple(layer.kernel.shape)

    conv = (
        kernel_size,
        tuple(layer.strides),
        tuple(layer.dilation_rate),
        layer.padding,
        out_spatial,
    )

    def group_input(x, g):
        return x[..., g * Cg : (g + 1) * Cg] if groups > 1 else x

    def patches(x, g):
        return ops.reshape(
            conv_patches(group_input(x, g), *conv, backend_ops), (-1, T, K * Cg)
        )

    # The backend instantiates the kernel gradients of stride-1 convs
    # without patches where that pays off (its `GROUPED_CONV_*`); with one
    # input channel per group, the strided slices do as well.
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
    pads = conv_pads(x.shape[1:-1], *conv)
    if grouped_conv is not None:
        padded_positions = static_prod(
            size + before + after for size, (before, after) in zip(x.shape[1:-1], pads)
        )
        chunk = backend_ops.GROUPED_CONV_CHUNK_BYTES // (
            4 * (padded_positions * Cg + T * Fg)
        )
    else:
        chunk = _PATCH_CHUNK_BYTES // (4 * T * K * Cg)
    chunk = max(1, chunk)

    def kernel_grads_of(g):
        # Stored as (n, Fg, K*Cg): B^T P is the layout matmul handles best.
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
                P = single_channel_patches(group_input(x, g), *conv)
                return ops.transpose(ops.matmul(P, B), (0, 2, 1))
            return ops.matmul(ops.transpose(B, (0, 2, 1)), patches(x, g))

        return grads

    conv_args = (kernel_size, tuple(layer.strides), tuple(layer.dilation_rate), pads)
    if context.carrier_of(layer.kernel) is not None:
        return _carrier_terms(layer, context, patches, x, B, T, K * C)
    parts = []
    for g in range(groups):
        Bg = B[:, :, g * Fg : (g + 1) * Fg] if groups > 1 else B
        if choose_method(T * R, K * Cg, Fg) == "instantiate":
            xg, spatial_Bg = (
                group_input(x, g),
                ops.reshape(Bg, (-1,) + out_spatial + (Fg,)),
            )
            # The gradients are kept for the clipped sum where the layer
            # has more output positions than filters. Otherwise (where
            # CONV_CLIPPED_SUM_FROM_PATCHES also applies) only their norms
            # are, and the clipped sum is one filter gradient of the scaled
            # output gradients: a little more compute for much less memory.
            x2, dy2, conv2 = as_2d_conv(xg, spatial_Bg, conv_args)
            compiled = backend_ops.per_example_conv_kernel_norms(
                x2, dy2, *conv2, keep_grads=T > Fg or R > 1
            )
            if compiled is not None and R > 1:
                parts.append(_unit_parts(compiled[1], R))
                continue
            if compiled is not None:
                parts.append(
                    _compiled_conv_parts(
                        *compiled,
                        x2,
                        dy2,
                        lambda x, dy: backend_ops.conv_kernel_grad(x, dy, *conv2),
                    )
                )
                continue
            G = _kernel_grads_in_chunks(
                x, Bg, kernel_grads_of(g), chunk, context.rows_hint, backend_ops
            )
            if R > 1:
                parts.append(_unit_parts(ops.concatenate([t for _, t in G], 0), R))
            elif backend_ops.CONV_CLIPPED_SUM_FROM_PATCHES and T <= Fg:
                parts.append(
                    _norms_then_patches(
                        G, x, Bg, functools.partial(patches, g=g), backend_ops
                    )
                )
            else:
                parts.append(_chunked_instantiated(G))
        else:
            parts.append(
                linear.linear_terms(
                    unit_positions(patches(x, g), R), unit_positions(Bg, R), "ghost"
                )
            )
    sq = parts[0][0]
    for part in parts[1:]:
        sq = sq + part[0]

    def kernel_clipped(c, safe):
        pieces = [ops.reshape(fn(c, safe), kshape[:-1] + (Fg,)) for _, fn in parts]
        return pieces[0] if len(pieces) == 1 else ops.concatenate(pieces, -1)

    terms = [(layer.kernel, sq, kernel_clipped)]
    if layer.use_bias:
        terms.append(bias_terms(layer.bias, unit_rows(B, R) if R > 1 else B))
    return terms


def _carrier_terms(layer, context, patches, x, B, T, patch_size):
    """A kernel with LowRankSparse carriers: the carrier gradients of the
    patch products (the kernel's matrix view is `(K * C, F)`, as the
    patches'), ghost or instantiated by the rank (`kernel_terms`)."""
    if layer.groups > 1:
        raise Unsupported(
            f"LowRankSparse: conv {layer.name!r} has groups={layer.groups}; "
            "carrier gradients are computed for ungrouped convolutions only"
        )
    R = context.rows_per_unit
    A = unit_positions(patches(x, 0), R)
    sq, fn = kernel_terms(
        context,
        layer.kernel,
        A,
        unit_positions(B, R),
        choose_method(T * R, patch_size, B.shape[-1]),
    )
    kshape = tuple(layer.kernel.shape)
    terms = [(layer.kernel, sq, lambda c, safe: ops.reshape(fn(c, safe), kshape))]
    if layer.use_bias:
        terms.append(bias_terms(layer.bias, unit_rows(B, R) if R > 1 else B))
    return terms


with builtin_registrations():
    for _conv_class in (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D):
        register_per_example_rule(
            _conv_class,
            conv_rule,
            name="conv",
            taps="pre_activation",
            applies=uses_plain_weights,
            units="context",
        )
