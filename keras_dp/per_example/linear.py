"""Per-example norms and clipped sums of a linear layer's weight gradient.

For a layer whose kernel gradient is `G_i = A_i^T B_i` per example, with
inputs `A_i` (T x d) and output gradients `B_i` (T x p) (Dense, EinsumDense,
Conv as a product of patches, LoRA adapters with transformed activations):

- Norms, either "ghost" (Goodfellow 2015; Li et al. 2022, "Large language
  models can be strong differentially private learners"):
  `||G_i||^2 = <A_i A_i^T, B_i B_i^T>` (`||a|| ||b||` when T = 1), without
  `G_i`; or by instantiating `G_i`. Choosing per layer between the two is
  the mixed ghost norm of Bu et al. 2022 ("Scalable and efficient training
  of large convolutional neural networks with differential privacy"); see
  `choose_method`.
- Clipped sums by book-keeping (Bu et al. 2023, "Differentially private
  optimization on large model at small cost"): `sum_i c_i G_i =
  einsum(A, c * B)` for ghost layers, `tensordot(c, G)` where `G` was
  instantiated. A second backward pass weighted by `c` would redo these
  same contractions plus the whole activation backward pass, so
  book-keeping is the only method.
"""

from keras import ops

from keras_dp.per_example.rows import InstantiatedTerms
from keras_dp.per_example.rows import factor_rows
from keras_dp.per_example.rows import kept_rows
from keras_dp.per_example.rows import rows_dot
from keras_dp.per_example.rows import scaled_rows
from keras_dp.per_example.rows import sharded_terms
from keras_dp.per_example.rows import squared_norms

# Tests may force "ghost" or "instantiate" for every linear layer.
_FORCE_METHOD = None


def choose_method(T, d, p):
    """How to get a linear layer's per-example kernel norms.

    `T`: rows of the layer's input per example (sequence length or output
    positions, None if unknown), `d` input features, `p` output features.

    Ghost norms cost `O(T^2 (d + p))` per example and `O(T^2)` memory;
    instantiating `G_i` costs `O(T d p)` and `O(d p)` memory, but then also
    gives the clipped sum as `tensordot(c, G)` instead of a second
    `O(T d p)` contraction. So instantiate iff `2 T^2 >= p d` (Bu et al.
    2022's mixed ghost norm), or when `G_i` is no larger than the
    activations `A_i`, `B_i` that are held anyway (`d p <= T (d + p)`):
    then it costs less compute at no extra memory order. T = 1 is always
    ghost (`||a|| ||b||`).
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


def linear_terms(A, B, method):
    """A: (n, T, d), B: (n, T, p). `(squared norms, clipped_sum)` of the
    per-example products `A_i^T B_i`, the sums coming out (d, p)."""
    T = A.shape[1]
    if T == 1:
        b = B[:, 0, :]
        return row_linear_terms(A[:, 0, :], b, squared_norms(b))
    if method == "ghost":
        aa = ops.einsum("ntd,nsd->nts", A, A)
        bb = ops.einsum("ntp,nsp->nts", B, B)
        # (maximum propagates NaN.)
        sq = ops.maximum(ops.sum(aa * bb, axis=(1, 2)), 0.0)

        def clipped(c, safe):
            return weighted_product_sum(kept_rows(A, c, safe), kept_rows(B, c, safe), c)

        return sq, clipped
    G = ops.matmul(ops.transpose(A, (0, 2, 1)), B)
    sq = squared_norms(G)

    def clipped(c, safe):
        return rows_dot(c, G, safe)

    return sq, clipped


def row_linear_terms(a, b, b_squared_norms):
    """`linear_terms` of one row per example, a: (n, d), b: (n, p), with
    b's squared row norms given (a Dense bias's per-example norms)."""
    sq = squared_norms(a) * b_squared_norms

    def clipped(c, safe):
        return ops.matmul(ops.transpose(kept_rows(a, c, safe)), scaled_rows(b, c, safe))

    return sq, clipped


def weighted_product_sum(A, B, c):
    """`sum_i c_i A_i^T B_i` for A: (n, T, d), B: (n, T, p), as one
    (d, p) matrix product over all rows. (For the safe sums, the callers
    pass `A` and `B` with the rows of factor 0 set to 0: `kept_rows`.)"""
    return ops.matmul(
        ops.transpose(ops.reshape(A, (-1, ops.shape(A)[-1]))),
        ops.reshape(B * c[:, None, None], (-1, ops.shape(B)[-1])),
    )


def bias_grads(B, bias_shape):
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


def bias_terms(bias, B):
    """The `(variable, squared norms, clipped_sum)` triple of a bias added
    to the output whose per-example gradients are `B`."""
    return InstantiatedTerms(bias, bias_grads(B, tuple(bias.shape)))


def sharded_linear_terms(A, B, method, side, group_dims, axis, shards):
    """`linear_terms` with one norm and one factor per device shard.

    Per-device clipping groups (`clip_groups="per_device"`) clip each
    shard of a sharded kernel apart. The kernel's `(d, p)` matrix view
    flattens its input axes into its rows and its output axes into its
    columns; the kernel is split into `shards` equal pieces along one axis,
    `group_dims[axis]` of the side `side` ("inputs" or "outputs", whose
    axes' sizes are `group_dims`). Returns `(squared norms (n, shards),
    clipped_sum(c, safe))` with `c` of shape `(n, shards)`: shard `j` of
    example `i` is scaled by `c[i, j]`, which on the side of the split is a
    scale of the activations' feature columns, so book-keeping still needs
    one product.
    """
    if side == "outputs":
        sq, clipped = sharded_linear_terms(
            B, A, method, "inputs", group_dims, axis, shards
        )
        return sq, lambda c, safe: ops.transpose(clipped(c, safe))
    T, d = A.shape[1], A.shape[-1]
    before = 1
    for size in group_dims[:axis]:
        before *= int(size)
    # The split axis of the kernel, as (before, shards, after) features.
    split = (before, shards, d // (before * shards))
    A5 = ops.reshape(A, (-1, ops.shape(A)[1]) + split)
    if method == "ghost" or T == 1:
        if T == 1:
            aa = ops.sum(ops.square(A5[:, 0]), axis=(1, 3))
            sq = aa * squared_norms(B)[:, None]
        else:
            aa = ops.einsum("ntamb,nsamb->nmts", A5, A5)
            bb = ops.einsum("ntp,nsp->nts", B, B)
            sq = ops.maximum(ops.sum(aa * bb[:, None], axis=(2, 3)), 0.0)

        def clipped(c, safe):
            kept = factor_rows(c)
            scaled = kept_rows(A5, kept, safe) * c[:, None, None, :, None]
            return ops.matmul(
                ops.transpose(ops.reshape(scaled, (-1, d))),
                ops.reshape(kept_rows(B, kept, safe), (-1, ops.shape(B)[-1])),
            )

        return sq, clipped
    p = B.shape[-1]
    G = ops.matmul(ops.transpose(A, (0, 2, 1)), B)
    # Rows of G as (before, shards * after): split along that axis.
    sq, shard_sum = sharded_terms(
        ops.reshape(G, (-1, before, d // before, p)), (1, shards)
    )
    return sq, lambda c, safe: ops.reshape(shard_sum(c, safe), (d, p))
