"""Per-example clip factors: flat (Abadi), automatic (AUTO-S) and global.

Every privatised gradient has the form

    g_hat = (sum_i c_i * g_i + sigma * Delta * N) / B

where `c_i` is the clip factor of example `i` and `Delta` the L2 sensitivity
of the clipped sum. This module computes `c_i` from the per-example gradient
norms and states `Delta` for each mode; the optimizers own the settings.
"""

from keras import ops

CLIPPING_MODES = ("flat", "auto", "global")

# Stabiliser of flat clipping's division (spec section 1).
FLAT_EPSILON = 1e-6
# AUTO-S stability constant gamma (Bu et al., "Automatic clipping").
AUTO_CLIP_GAMMA = 0.01


def validate_clipping(clipping, l2_norm_clip, global_clip_threshold):
    """Raises `ValueError` for settings that would not bound sensitivity."""
    if clipping not in CLIPPING_MODES:
        raise ValueError(
            f"Unknown clipping mode {clipping!r}. Use one of "
            f"{', '.join(repr(m) for m in CLIPPING_MODES)}."
        )
    if l2_norm_clip is None or not l2_norm_clip > 0:
        raise ValueError(
            "`l2_norm_clip` must be a positive number (the L2 bound C on each "
            f"example's clipped gradient). Received: {l2_norm_clip!r}."
        )
    if global_clip_threshold is not None:
        if clipping != "global":
            raise ValueError(
                "`global_clip_threshold` only applies to clipping='global'. "
                f"Received it with clipping={clipping!r}."
            )
        if not global_clip_threshold > 0:
            raise ValueError(
                "`global_clip_threshold` (Z) must be positive. Received: "
                f"{global_clip_threshold!r}."
            )


def clip_factors(norms, clipping, l2_norm_clip, global_clip_threshold=None):
    """Clip factor `c_i` of each example from its gradient norm.

    Args:
        norms: float tensor of shape `(batch,)`, the L2 norms `||g_i||`.
        clipping: `"flat"`, `"auto"` or `"global"`.
        l2_norm_clip: `C` (flat) or `R` (auto, global): every clipped
            gradient `c_i * g_i` has norm at most this value.
        global_clip_threshold: `Z` for global clipping; defaults to `R`.

    Returns:
        Tensor of shape `(batch,)`.

    - flat: `c_i = min(1, C / (||g_i|| + 1e-6))`.
    - auto (AUTO-S): `c_i = R / (||g_i|| + 0.01)`; `||c_i g_i|| < R` always.
    - global: `c_i = (R / Z) * 1{||g_i|| <= Z}`. The boundary is inclusive:
      a norm of exactly `Z` is kept, anything larger is dropped.
    """
    norms = ops.convert_to_tensor(norms)
    dtype = norms.dtype
    if clipping == "flat":
        return ops.minimum(
            ops.ones_like(norms), l2_norm_clip / (norms + FLAT_EPSILON)
        )
    if clipping == "auto":
        return l2_norm_clip / (norms + AUTO_CLIP_GAMMA)
    if clipping == "global":
        threshold = global_clip_threshold or l2_norm_clip
        kept = ops.cast(ops.less_equal(norms, threshold), dtype)
        return kept * (l2_norm_clip / threshold)
    raise ValueError(f"Unknown clipping mode {clipping!r}.")


def sensitivity(l2_norm_clip):
    """L2 sensitivity `Delta` of the clipped sum: the largest `||c_i g_i||`.

    It is `C` (or `R`) in every mode, so the accounting is flat DP-SGD's.
    """
    return float(l2_norm_clip)


def per_example_squared_norms(per_example_grads):
    """`||g_i^(v)||^2` of each example, one `(batch,)` tensor per variable.

    Args:
        per_example_grads: list of tensors, each with a leading batch axis.
    """
    return [
        ops.sum(ops.reshape(ops.square(g), (ops.shape(g)[0], -1)), axis=1)
        for g in per_example_grads
    ]


def per_example_norms(per_example_grads):
    """L2 norm of each example's full gradient (all variables concatenated).

    Args:
        per_example_grads: list of tensors, each with a leading batch axis.
    """
    return total_norms(per_example_squared_norms(per_example_grads))


def total_norms(squared_norms):
    """Norm of the concatenation from per-variable squared norms."""
    return ops.sqrt(sum(squared_norms[1:], squared_norms[0]))


def weighted_sum(per_example_grads, factors):
    """`sum_i factors_i * g_i` for each variable's per-example gradients.

    `factors` is one `(batch,)` tensor shared by all variables, or a list
    with one per variable.
    """
    if not isinstance(factors, (list, tuple)):
        factors = [factors] * len(per_example_grads)
    return [
        ops.tensordot(f, g, axes=1) for f, g in zip(factors, per_example_grads)
    ]
