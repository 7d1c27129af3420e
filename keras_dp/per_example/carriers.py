"""Linear kernels seen through low-rank carriers, on the fast path.

`keras_dp.LowRankSparse` clips and noises, for each covered kernel with
matrix view `W` (p x d), only the carrier gradients of an example,

    dL_i = G_i R^T   (p x r),        dR_i = L^T G_i   (r x d),

each optionally restricted to a sparse support. Where a layer's kernel
gradient is a product `G_i = A_i^T B_i` (inputs or patches `A_i`, T x p;
output gradients `B_i`, T x d), so are both carrier gradients:

    dL_i = A_i^T (B_i R^T),          dR_i = (A_i L)^T B_i,

linear-layer gradients of projected activations with the rank `r` in place
of `d` or `p`. Their norms and clipped sums therefore come from the same
ghost-norm and book-keeping identities as the layer's own
(`keras_dp.per_example.linear`), and the per-example `p x d` gradient is
never formed. On a sparse support the carrier gradients are instantiated
(`n x (p + d) x r`, small next to the layer's activations) and masked.

A rule asks for this through `kernel_terms`, which falls back to the
layer's own `linear_terms` for a kernel without carriers. The batched pass
checks that every kernel with carriers was projected by its rule
(`KernelCarriers.check_projected`); where one was not (a layer whose rule
does not use `kernel_terms`), the step takes the vmap path.
"""

from keras import ops

from keras_dp.per_example.linear import choose_method
from keras_dp.per_example.linear import linear_terms
from keras_dp.per_example.linear import row_linear_terms
from keras_dp.per_example.linear import sharded_linear_terms
from keras_dp.per_example.registry import Unsupported
from keras_dp.per_example.rows import rows_dot
from keras_dp.per_example.rows import squared_norms


class KernelCarriers:
    """The carriers of one step's kernels (from the model's gradient
    space), and which of them the rules projected.

    Args:
        by_variable: `{id(kernel variable): carrier}`; a carrier has `left`
            (p, r), `right` (r, d), `mask_left`, `mask_right` (None on a
            dense support), `p`, `d`, `rank`, and `reconstruct(d_left,
            d_right)` giving the `(p, d)` update
            (`keras_dp.low_rank.KernelCarrier`).
    """

    def __init__(self, by_variable):
        self._by_variable = dict(by_variable)
        self.projected = set()

    def of(self, variable):
        """The carrier of `variable`, or None."""
        return self._by_variable.get(id(variable))

    def check_projected(self, entries, records):
        """Raises `Unsupported` where a kernel with carriers, in a layer the
        pass called, was not projected by its rule."""
        for entry in entries:
            if records[entry.index].count == 0:
                continue
            for variable in entry.variables:
                if id(variable) in self._by_variable and (
                    id(variable) not in self.projected
                ):
                    raise Unsupported(
                        f"LowRankSparse: the per-example rule "
                        f"{entry.rule.name!r} of layer {entry.layer.name!r} "
                        "does not compute carrier gradients (only the Dense, "
                        "EinsumDense and ungrouped Conv rules do)"
                    )


def kernel_terms(context, kernel, A, B, method, view_axes=None):
    """`(squared norms, clipped_sum)` of a kernel whose per-example
    gradients are `A_i^T B_i` (A: (n, T, p), B: (n, T, d)).

    Where `kernel` has carriers in this step (`context.carrier_of`): the
    norms of its carrier gradients, and a clipped sum already mapped back
    to the `(p, d)` kernel matrix. Where it is clipped per device shard
    (`context.partition_of`): `(n, shards)` norms and factors
    (`sharded_linear_terms`); `view_axes = (input axes, output axes)` says
    which of the kernel's axes the matrix view flattens into its rows and
    into its columns, in order (default: all but the last, then the last). Else
    `linear_terms(A, B, method)`.
    """
    carrier = context.carrier_of(kernel)
    partition = context.partition_of(kernel)
    if partition is not None:
        if carrier is not None:
            raise Unsupported(
                "LowRankSparse with clip_groups='per_device' on sharded "
                f"kernel {kernel.path!r}"
            )
        return _sharded_kernel_terms(kernel, A, B, method, view_axes, partition)
    if carrier is None:
        return linear_terms(A, B, method)
    if (A.shape[-1], B.shape[-1]) != (carrier.p, carrier.d):
        raise Unsupported(
            f"LowRankSparse: the carriers of {kernel.path!r} are for a "
            f"({carrier.p}, {carrier.d}) matrix view, the layer's gradient "
            f"is ({A.shape[-1]}, {B.shape[-1]})"
        )
    context.carriers.projected.add(id(kernel))
    return carrier_terms(carrier, A, B)


def _sharded_kernel_terms(kernel, A, B, method, view_axes, partition):
    axis, shards = partition
    rank = len(kernel.shape)
    inputs, outputs = view_axes or (tuple(range(rank - 1)), (rank - 1,))
    side, axes = ("inputs", inputs) if axis in inputs else ("outputs", outputs)
    dims = [kernel.shape[a] for a in axes]
    return sharded_linear_terms(A, B, method, side, dims, axes.index(axis), shards)


def carrier_terms(carrier, A, B):
    """`(squared norms, clipped_sum)` of the carrier gradients of the
    per-example products `A_i^T B_i`; `clipped_sum(c, safe)` returns the
    `(p, d)` matrix `reconstruct(sum_i c_i dL_i, sum_i c_i dR_i)`."""
    T = A.shape[1]
    rank = carrier.rank
    projected_B = ops.matmul(B, ops.transpose(carrier.right))
    projected_A = ops.matmul(A, carrier.left)
    if carrier.mask_left is None:
        sq_left, sum_left = linear_terms(
            A, projected_B, choose_method(T, carrier.p, rank)
        )
        sq_right, sum_right = linear_terms(
            projected_A, B, choose_method(T, rank, carrier.d)
        )
    elif T == 1:
        # One row: `dL_i = (a_i u_i^T) * M`, whose squared norm is
        # `(a_i^2)^T M (u_i^2)` for a 0/1 mask `M`; the mask commutes with
        # the clipped sum.
        sq_left, sum_left = _masked_row_terms(
            A[:, 0, :], projected_B[:, 0, :], carrier.mask_left
        )
        sq_right, sum_right = _masked_row_terms(
            projected_A[:, 0, :], B[:, 0, :], carrier.mask_right
        )
    else:
        # A sparse support is not a product of activations: instantiate.
        g_left = (
            ops.matmul(ops.transpose(A, (0, 2, 1)), projected_B) * carrier.mask_left
        )
        g_right = (
            ops.matmul(ops.transpose(projected_A, (0, 2, 1)), B) * carrier.mask_right
        )
        sq_left, sq_right = squared_norms(g_left), squared_norms(g_right)

        def sum_left(c, safe):
            return rows_dot(c, g_left, safe)

        def sum_right(c, safe):
            return rows_dot(c, g_right, safe)

    def clipped(c, safe):
        return carrier.reconstruct(sum_left(c, safe), sum_right(c, safe))

    return sq_left + sq_right, clipped


def _masked_row_terms(a, b, mask):
    """`(squared norms, clipped_sum)` of the masked outer products
    `(a_i b_i^T) * mask` (a: (n, p), b: (n, d), mask: 0/1 (p, d))."""
    sq = ops.sum(ops.matmul(ops.square(a), mask) * ops.square(b), axis=-1)
    _, outer_sum = row_linear_terms(a, b, squared_norms(b))

    def clipped(c, safe):
        return outer_sum(c, safe) * mask

    return sq, clipped
