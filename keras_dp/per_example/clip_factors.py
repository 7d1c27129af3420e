"""Clip factors of a step: scaled by `1 / B`, 0 for non-finite examples.

Non-finite examples (both paths): an example whose gradient norm or loss is
infinite or NaN (an overflowing loss, an infinite input, a norm beyond
float32's range) gets clip factor exactly 0 and its gradient is left out of
the clipped sum by a select, never multiplied by 0 (`0 * inf` is NaN), so
the update is the one of the batch without it: finite, and no sign that the
example was sampled. Rows with sample weight 0 (padding) contribute exactly
nothing even when their values are not finite. `private_gradients` counts
the dropped real examples (`nonfinite_examples`, logged by the train step)
and leaves their losses (infinite or NaN ones among them) out of the logged
loss. Like the logged loss, that count is computed from the data without
noise: it is for the person training, not differentially private.

The exact way of leaving rows out (`safe=True` in the clipped sums) costs
passes over the per-example tensors. On TensorFlow and PyTorch it runs
under `ops.cond` only in a step with a non-finite example; other steps pay
for a test on the squared norms and losses. On JAX every step takes it
(the backend's `NONFINITE_SUMS_IN_CONDITIONAL`): XLA fuses the selects
into the sums, while an XLA conditional costs more than it saves (its
branches' convolutions miss the CPU backend's fast kernels, and on an
accelerator the predicate goes to the host at every step). The test is
exact on the fast path: an infinite or NaN entry
in an example's layer input `A_i`, output gradient `B_i` or instantiated
`G_i` makes that layer's squared norm of the example infinite or NaN
(products and sums propagate them), so such an example is always caught,
and where every example's norm is finite every contracted tensor is finite,
so the plain contractions are exact as they are.
"""

from keras import ops

from keras_dp import clipping as clipping_lib


def scaled_factors(factors, scale):
    """Per-variable clip factors times `scale` (None: unchanged).

    Scaling the `(n,)` factors instead of the summed gradients saves a
    pass over every gradient; variables that share a factor tensor (one
    clipping group) share the product.
    """
    if scale is None:
        return factors
    products = {}
    for f in factors:
        if id(f) not in products:
            products[id(f)] = f * ops.cast(scale, f.dtype)
    return [products[id(f)] for f in factors]


def sums_leaving_out_nonfinite(
    squared_norms, losses, factors, weighted_sums, conditional=True
):
    """`(clipped sums, nonfinite)`, the sums `weighted_sums(factors, safe)`
    with the examples whose squared norm or loss is not finite given factor
    0 and left out exactly (`safe=True`), and `nonfinite` the `(n,)` bool
    mask of those examples.

    `squared_norms`: one `(n,)` tensor per variable; `factors`: one per
    variable, as `weighted_sums` takes them. `conditional`: the safe sums
    only in a step with a non-finite example (`ops.cond`), or in every
    step (False; the backend's `NONFINITE_SUMS_IN_CONDITIONAL`).
    """

    def finite_step():
        return weighted_sums(factors, False), ops.zeros(ops.shape(losses), "bool")

    def step_with_nonfinite():
        nonfinite = clipping_lib.nonfinite_examples(squared_norms, losses)
        zeroed = clipping_lib.zero_factors(factors, nonfinite)
        return weighted_sums(zeroed, True), nonfinite

    if not conditional:
        clipped, nonfinite = step_with_nonfinite()
        return list(clipped), nonfinite
    clipped, nonfinite = ops.cond(
        clipping_lib.all_finite(squared_norms, losses),
        finite_step,
        step_with_nonfinite,
    )
    return list(clipped), nonfinite
