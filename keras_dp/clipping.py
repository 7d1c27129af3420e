"""Per-example clip factors: flat (Abadi), automatic (AUTO-S) and global.

Every privatised gradient has the form

    g_hat = (sum_i c_i * g_i + sigma * Delta * N) / B

where `c_i` is the clip factor of example `i` and `Delta` the L2 sensitivity
of the clipped sum. This module computes `c_i` from the per-example gradient
norms and states `Delta` for each mode; the optimizers own the settings.

Non-finite examples: an example whose gradient norm or loss is not a finite
float32 number (an infinite or NaN gradient entry, or a norm that overflows)
gets `c_i = 0` in every mode (`nonfinite_examples`, `zero_factors`), and its
gradient is left out of the sum by selection, never multiplied by 0 (`0 *
inf` is NaN): `weighted_sum(..., zero_rows=True)`. Its contribution is then
exactly zero, like that of an example that was not sampled, so a NaN update
cannot reveal that it was in the batch. `||c_i g_i|| <= C` still holds for
every example, so the sensitivity is unchanged.
"""

import math

from keras import ops

from keras_dp import arguments
from keras_dp import backend as backend_lib

CLIPPING_MODES = ("flat", "auto", "global")

# Stabiliser of flat clipping's division (docs/algorithms.md, "Clip factors").
FLAT_EPSILON = 1e-6
# AUTO-S stability constant gamma (Bu et al., "Automatic clipping").
AUTO_CLIP_GAMMA = 0.01


def validate_clipping(clipping, l2_norm_clip, global_clip_threshold):
    """Raises for settings that would not bound the sensitivity.

    Returns:
        `(clipping, l2_norm_clip, global_clip_threshold)`, the numbers as
        Python floats.
    """
    clipping = arguments.one_of(
        "clipping", clipping, CLIPPING_MODES, what="clipping mode"
    )
    l2_norm_clip = arguments.positive_number(
        "l2_norm_clip",
        l2_norm_clip,
        hint="the L2 bound C (or scale R) on each example's clipped gradient",
    )
    global_clip_threshold = arguments.positive_number(
        "global_clip_threshold",
        global_clip_threshold,
        allow_none=True,
        hint="Z of clipping='global', which defaults to l2_norm_clip",
    )
    if global_clip_threshold is not None and clipping != "global":
        raise ValueError(
            "`global_clip_threshold` only applies to clipping='global'. "
            f"Received it with clipping={clipping!r}."
        )
    return clipping, l2_norm_clip, global_clip_threshold


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
        return ops.minimum(ops.ones_like(norms), l2_norm_clip / (norms + FLAT_EPSILON))
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


def per_example_squared_norms(per_example_grads, partitions=None):
    """`||g_i^(v)||^2` of each example, one `(batch,)` tensor per variable.

    Args:
        per_example_grads: list of tensors, each with a leading batch axis.
        partitions: optional list with, per variable, None or `(axis,
            shards)`: then that variable's entry is `(batch, shards)`, the
            squared norm of each of `shards` equal pieces along `axis` (of
            the variable, not counting the batch axis). Per-device groups
            use it: each piece is reduced where it lives.
    """
    partitions = partitions or [None] * len(per_example_grads)
    result = []
    for g, part in zip(per_example_grads, partitions):
        if part is None:
            result.append(
                ops.sum(ops.reshape(ops.square(g), (ops.shape(g)[0], -1)), axis=1)
            )
            continue
        split = _split_shape(g, part)
        squares = ops.square(ops.reshape(g, split))
        axis, _ = part
        reduce_axes = tuple(a for a in range(1, len(split)) if a != axis + 1)
        result.append(ops.sum(squares, axis=reduce_axes))
    return result


def _split_shape(g, part):
    """Shape of `g` with variable axis `axis` split into `(shards, rest)`."""
    axis, shards = part
    shape = list(g.shape)
    size = shape[axis + 1]
    return tuple(shape[: axis + 1] + [shards, size // shards] + shape[axis + 2 :])


def per_example_norms(per_example_grads):
    """L2 norm of each example's full gradient (all variables concatenated).

    Args:
        per_example_grads: list of tensors, each with a leading batch axis.
    """
    return total_norms(per_example_squared_norms(per_example_grads))


def total_norms(squared_norms):
    """Norm of the concatenation from per-variable squared norms."""
    return ops.sqrt(sum(squared_norms[1:], squared_norms[0]))


def weighted_sum(per_example_grads, factors, partitions=None, zero_rows=False):
    """`sum_i factors_i * g_i` for each variable's per-example gradients.

    `factors` is one `(batch,)` tensor shared by all variables, or a list
    with one per variable. With `partitions` (see
    `per_example_squared_norms`), a partitioned variable's factors are
    `(batch, shards)`: piece `j` of example `i` is scaled by `f[i, j]`.

    With `zero_rows`, an example (or piece) whose factor is 0 contributes
    exactly 0 even where its gradient is infinite or NaN (one more pass
    over the gradients); without it, `0 * inf` makes the sum NaN.
    """
    if not isinstance(factors, (list, tuple)):
        factors = [factors] * len(per_example_grads)
    partitions = partitions or [None] * len(per_example_grads)
    result = []
    for f, g, part in zip(factors, per_example_grads, partitions):
        if part is None or len(f.shape) == 1:
            if zero_rows:
                g = multiply_no_nan(g, rows_of(ops.not_equal(f, 0), g))
            result.append(ops.tensordot(f, g, axes=1))
            continue
        axis, shards = part
        split = _split_shape(g, part)
        pieces = ops.reshape(g, split)
        scale = ops.cast(
            ops.reshape(
                f,
                (split[0],) + (1,) * axis + (shards,) + (1,) * (len(split) - axis - 2),
            ),
            pieces.dtype,
        )
        if zero_rows:
            weighted = multiply_no_nan(pieces, scale)
        else:
            weighted = pieces * scale
        summed = ops.sum(weighted, axis=0)
        result.append(ops.reshape(summed, tuple(g.shape[1:])))
    return result


def rows_of(values, x):
    """`values` (batch,) as `x.dtype`, shaped to broadcast along the rows
    of `x` (batch, ...)."""
    values = ops.cast(values, x.dtype)
    # Axes added one by one: `expand_dims` dispatches faster than
    # `reshape` on eager PyTorch, and compilers fold either.
    for _ in range(len(x.shape) - 1):
        values = ops.expand_dims(values, -1)
    return values


def multiply_no_nan(x, y):
    """`x * y` (broadcast), exactly 0 wherever `y` is 0, even where `x` is
    infinite or NaN: the backend's one fused op (see
    `keras_dp.backend.protocol`)."""
    return backend_lib.get_backend_module().multiply_no_nan(x, y)


def nonfinite_examples(squared_norms, losses=None):
    """Examples whose gradient norm or loss is not finite: `(batch,)` bool.

    `squared_norms`: one `(batch,)` (or `(batch, shards)`) tensor per
    variable, `losses`: `(batch,)` per-example losses or None. An example is
    non-finite when the sum of its squared norms is infinite or NaN (an
    infinite or NaN gradient entry, or a norm beyond float32's range) or its
    loss is. A few ops on `(batch,)` tensors, however many variables.
    """
    total = ops.sum(_example_columns(squared_norms, losses), axis=1)
    return ops.logical_not(ops.isfinite(total))


def all_finite(squared_norms, losses=None):
    """Whether no example is non-finite (`nonfinite_examples`): a boolean
    scalar from one sum over the batch (infinities and NaNs propagate; a
    batch whose total overflows counts as not finite, a false alarm that
    only costs the exact way of `weighted_sum(zero_rows=True)`)."""
    return ops.isfinite(ops.sum(_example_columns(squared_norms, losses)))


def _example_columns(squared_norms, losses):
    """`(batch, k)`: each example's squared norm per variable, and 0 where
    its loss is finite (NaN where it is not)."""
    columns = [
        ops.sum(sq, axis=tuple(range(1, len(sq.shape)))) if len(sq.shape) > 1 else sq
        for sq in squared_norms
    ]
    if losses is not None:
        columns.append(ops.cast(losses - losses, columns[0].dtype))
    return ops.stack(columns, axis=1)


def zero_factors(factors, nonfinite):
    """Per-variable clip factors with the rows of non-finite examples set to
    exactly 0 (a select: their factors may be NaN). Variables sharing one
    factor tensor share the result."""
    selected = {}
    for f in factors:
        if id(f) not in selected:
            drop = nonfinite
            if len(f.shape) > 1:
                drop = ops.reshape(drop, (-1,) + (1,) * (len(f.shape) - 1))
            selected[id(f)] = ops.where(drop, ops.zeros((), f.dtype), f)
    return [selected[id(f)] for f in factors]


def group_clip_factors(group_norms, clipping, thresholds, scale_ratio=1.0):
    """Clip factors of each group: `clip_factors` with group thresholds.

    Args:
        group_norms: list of `(batch,)` norms, one per group.
        clipping: `"flat"`, `"auto"` or `"global"`.
        thresholds: `C_k` (or `R_k`) per group: floats or scalar tensors.
        scale_ratio: for global clipping, `Z / R`: group `k` keeps examples
            with norm at most `Z_k = R_k * Z / R`.
    """
    factors = []
    for norms, threshold in zip(group_norms, thresholds):
        zk = None
        if clipping == "global":
            zk = threshold * scale_ratio
        factors.append(clip_factors(norms, clipping, threshold, zk))
    return factors


def group_sensitivity(thresholds):
    """`sqrt(sum_k C_k^2)`: the L2 sensitivity with group thresholds."""
    return math.sqrt(sum(float(c) ** 2 for c in thresholds))


def adaptive_noise_multipliers(noise_multiplier, count_stddev, num_groups):
    """Gradient noise multiplier that keeps the total at `noise_multiplier`.

    The gradient (multiplier `sigma_g`) and the `K` centred counts (noise
    `sigma_b`, sensitivity 1/2 each) compose into one Gaussian mechanism
    with `sigma^-2 = sigma_g^-2 + K (2 sigma_b)^-2` (Andrew et al. 2021), so
    `sigma_g = (sigma^-2 - K (2 sigma_b)^-2)^(-1/2)`, which needs
    `sigma < 2 sigma_b / sqrt(K)`. Python floats only.

    Returns:
        `sigma_g`.
    """
    sigma = float(noise_multiplier)
    if sigma == 0:
        return 0.0
    limit = 2.0 * float(count_stddev) / math.sqrt(num_groups)
    if not sigma < limit:
        raise ValueError(
            f"noise_multiplier={sigma:.4g} is too large for adaptive "
            f"clipping of {num_groups} group(s) with count noise "
            f"sigma_b={float(count_stddev):.4g}: the counts alone would "
            f"spend more than the budget (it needs sigma < 2 sigma_b / "
            f"sqrt(K) = {limit:.4g}). Use a larger batch (sigma_b = "
            "count_stddev_fraction * B), a larger count_stddev, fewer "
            "groups, or fixed thresholds."
        )
    return (sigma**-2 - num_groups * (2.0 * float(count_stddev)) ** -2) ** -0.5


class AdaptiveClipping:
    """Adaptive clipping thresholds (Andrew et al. 2021), one per group.

    After each step, group `k`'s threshold moves toward the
    `target_quantile` of its examples' gradient norms:

        b_i = 1{||g_i^(k)|| <= C_k}
        b_tilde = (sum_i (b_i - 1/2) + N(0, sigma_b^2)) / B + 1/2
        C_k <- C_k * exp(-learning_rate * (b_tilde - target_quantile))

    The count is centred, so one example changes it by at most 1/2. The
    total privacy cost stays the optimizer's `noise_multiplier` `sigma`:
    the gradient gets the smaller multiplier
    `sigma_g = (sigma^-2 - K (2 sigma_b)^-2)^(-1/2)`, and the ledger records
    `sigma`. Thresholds start at the group thresholds and are optimizer
    variables (saved, resumed); the train step logs them as
    `clip_threshold/<group>`.

    Args:
        target_quantile: `q`, the fraction of examples to leave unclipped.
        learning_rate: `eta_C` of the geometric update.
        count_stddev_fraction: `sigma_b = count_stddev_fraction * B`, with
            `B` the expected batch size (default 1/20).
        count_stddev: a fixed `sigma_b` instead (0 only with
            `noise_multiplier=0`, for tests).
    """

    def __init__(
        self,
        target_quantile=0.5,
        learning_rate=0.2,
        count_stddev_fraction=0.05,
        count_stddev=None,
    ):
        self.target_quantile = arguments.probability(
            "target_quantile",
            target_quantile,
            low_open=True,
            high_open=True,
            hint="the fraction of examples to leave unclipped",
        )
        self.learning_rate = arguments.positive_number("learning_rate", learning_rate)
        self.count_stddev_fraction = arguments.positive_number(
            "count_stddev_fraction", count_stddev_fraction
        )
        self.count_stddev = arguments.non_negative_number(
            "count_stddev", count_stddev, allow_none=True
        )

    def count_noise_stddev(self, expected_batch_size):
        """`sigma_b` for expected batch size `B` (a float)."""
        if self.count_stddev is not None:
            return self.count_stddev
        return self.count_stddev_fraction * float(expected_batch_size)

    def noise_multipliers(
        self, noise_multiplier, num_groups, expected_batch_size, static_batch_size=None
    ):
        """`(sigma_g, sigma_b)`: the gradient's noise multiplier and the
        counts' noise, which together cost `noise_multiplier`.

        `static_batch_size`: `B` as a Python number when known while
        tracing; then both are Python floats (and a multiplier too large
        for `sigma_b` raises). Otherwise `sigma_b` follows the tensor
        `expected_batch_size` and `sigma_g` is a tensor, NaN where the
        multiplier is too large (the update is then NaN, never less
        noisy).
        """
        if static_batch_size is not None or self.count_stddev is not None:
            sigma_b = self.count_noise_stddev(static_batch_size)
            return (
                adaptive_noise_multipliers(noise_multiplier, sigma_b, num_groups),
                sigma_b,
            )
        sigma_b = self.count_stddev_fraction * expected_batch_size
        sigma = float(noise_multiplier)
        if sigma == 0:
            return 0.0, sigma_b
        inverse = sigma**-2 - num_groups * (2.0 * sigma_b) ** -2
        sigma_g = ops.where(
            inverse > 0, ops.rsqrt(ops.maximum(inverse, 1e-30)), float("nan")
        )
        return sigma_g, sigma_b

    def updated_thresholds(self, thresholds, noisy_counts, expected_batch_size):
        """`C_k * exp(-learning_rate * (b_tilde_k - target_quantile))` with
        `b_tilde = noisy_counts / B + 1/2` (the counts are centred)."""
        fraction = noisy_counts / expected_batch_size + 0.5
        return thresholds * ops.exp(
            -self.learning_rate * (fraction - self.target_quantile)
        )

    def get_config(self):
        return {
            "target_quantile": self.target_quantile,
            "learning_rate": self.learning_rate,
            "count_stddev_fraction": self.count_stddev_fraction,
            "count_stddev": self.count_stddev,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"AdaptiveClipping({args})"


def centred_counts(group_norms, thresholds, mask=None):
    """`sum_i mask_i (1{||g_i^(k)|| <= C_k} - 1/2)` per group: shape `(K,)`.

    Rows with `mask_i = 0` (padding) contribute nothing; every real example
    contributes exactly +-1/2 to each group's count.
    """
    counts = []
    for norms, threshold in zip(group_norms, thresholds):
        below = ops.cast(ops.less_equal(norms, threshold), "float32") - 0.5
        if mask is not None:
            below = below * ops.cast(mask, "float32")
        counts.append(ops.sum(below))
    return ops.stack(counts)
