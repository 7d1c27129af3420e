"""Individual privacy accounting: each example's epsilon from its own
sensitivities (Feldman and Zrnic 2021; Yu et al. 2023).

DP-SGD's epsilon bounds the privacy loss of the example whose clipped
gradient has the full norm `Delta` at every step. An example whose clipped
gradient has norm `r * Delta` (`0 <= r <= 1`) at a step meets, at that
step, the guarantee of the Poisson-subsampled Gaussian mechanism with
noise multiplier `sigma / r` (with `r = 0` it spends nothing). Composing
these mechanisms over its steps gives the example's own epsilon, which is
never larger than the global one.

The steps are grouped into spans that share each example's `r` (the norm
ratios of one pass over the data): a span is `(start_step, end_step,
ratios)`, `ratios` an `(n,)` array or None for "every example at full
sensitivity" (steps for which no ratios were measured). The noise
multiplier and sampling rate of the steps come from the privacy ledger,
through `segments_between(start, end)`.

RDP (the default) is vectorized over the examples and the orders: the RDP
of one `(sigma, q, r)` step is computed once by dp-accounting and shared
by every example and span with that setting. To bound the number of these
computations the ratios are rounded *up* to a multiple of `resolution`
(never down, so an individual epsilon is never underestimated by the
rounding). PLD composes one dp-accounting PLD per distinct sequence of
rounded ratios, so it is feasible only when few sequences are distinct
(coarse `resolution`, few spans).

Example:

```python
eps = individual_epsilons(
    spans=[(0, 100, ratios)],
    segments_between=lambda start, end: [(1.0, 0.01, end - start)],
    steps=100,
    delta=1e-5,
)  # (n,) array, eps[i] <= compute_epsilon(1.0, 0.01, 100, 1e-5)
```
"""

import dp_accounting
import numpy as np
from dp_accounting import rdp as dp_rdp

from keras_dp import accounting
from keras_dp import arguments

# Ratios are rounded up to a multiple of this by default: at most 101
# distinct sensitivities per (sigma, q) setting.
DEFAULT_RESOLUTION = 0.01

# PLD composes one accountant per distinct sequence of rounded ratios.
DEFAULT_MAX_PLD_SEQUENCES = 64

# A ratio computed in float32 may sit just below the real one: rounding up
# from slightly above it keeps the rounding conservative.
_FLOAT32_SLACK = 1e-6

# Examples whose RDP curves are composed at once (bounds the memory to
# this many rows of RDP orders).
_CHUNK_ROWS = 8192

# RDP curves already computed: `(sigma, q, r, orders) -> curve`, oldest
# first.
_CURVES = {}
_MAX_CURVES = 4096


def check_resolution(resolution):
    """`resolution` as a float in (0, 1], or None (exact ratios)."""
    return arguments.probability(
        "resolution",
        resolution,
        low_open=True,
        allow_none=True,
        hint="the step to which norm ratios are rounded up, e.g. 0.01; None "
        "for the exact ratios",
    )


def rounded_ratios(ratios, resolution=DEFAULT_RESOLUTION):
    """The ratios rounded up to a multiple of `resolution`, in `[0, 1]`.

    A ratio of exactly 0 stays 0 (that example spends nothing); a NaN ratio
    counts as 1 (nothing is known about that example). With
    `resolution=None` the ratios are only clipped to `[0, 1]`.
    """
    ratios = np.asarray(ratios, dtype=np.float64)
    ratios = np.where(np.isnan(ratios), 1.0, np.clip(ratios, 0.0, 1.0))
    if resolution is None:
        return ratios
    levels = np.ceil(ratios * (1.0 + _FLOAT32_SLACK) / resolution)
    return np.minimum(levels * resolution, 1.0)


def ratios_with_clip_counts(
    ratios, present, noise_multiplier, gradient_noise_multiplier
):
    """Norm ratios of adaptive clipping's joint release: the clipped sum
    (noise multiplier `sigma_g`) and the `K` centred clip counts (noise
    `sigma_b`, sensitivity 1/2 each), which together cost `sigma`
    (`sigma^-2 = sigma_g^-2 + K (2 sigma_b)^-2`, Andrew et al. 2021).

    An example with gradient ratio `r` moves the two by `r Delta` and
    `sqrt(K) / 2`: one Gaussian mechanism with noise multiplier
    `sigma / r_eff`, where `r_eff^2 = (r sigma / sigma_g)^2 + K (sigma / (2
    sigma_b))^2 = 1 - (1 - r^2) (sigma / sigma_g)^2`. An example that is
    not `present` (sample weight 0) is in neither, `r_eff = 0`.

    Args:
        ratios: `(n,)` gradient norm ratios `r`.
        present: `(n,)` bool, the examples of non-zero sample weight.
        noise_multiplier: `sigma`, the total (the ledger's).
        gradient_noise_multiplier: `sigma_g`.

    Returns:
        `(n,)` float32 ratios `r_eff`.
    """
    ratios = np.clip(np.asarray(ratios, dtype=np.float64), 0.0, 1.0)
    if noise_multiplier == 0:
        return np.where(present, 1.0, 0.0).astype(np.float32)
    share = (noise_multiplier / gradient_noise_multiplier) ** 2
    effective = np.sqrt(1.0 - (1.0 - ratios**2) * share)
    return np.where(present, effective, 0.0).astype(np.float32)


def individual_epsilons(
    spans,
    segments_between,
    steps,
    delta,
    accountant="rdp",
    *,
    resolution=DEFAULT_RESOLUTION,
    rdp_orders=None,
    max_pld_sequences=DEFAULT_MAX_PLD_SEQUENCES,
    n=None,
):
    """Each example's epsilon after `steps` steps.

    Args:
        spans: `(start_step, end_step, ratios)` tuples, not overlapping:
            during steps `start_step <= t < end_step` example `i` has
            sensitivity `ratios[i] * Delta`. Steps that no span covers count
            at full sensitivity for every example.
        segments_between: `segments_between(start, end)` gives the
            `(noise_multiplier, sample_rate, count)` tuples of the steps
            `start <= t < end` (e.g. from the privacy ledger).
        steps: the number of steps taken.
        delta: the delta of the guarantee.
        accountant: `"rdp"` or `"pld"`.
        resolution: ratios are rounded up to a multiple of this (None: the
            exact ratios, one RDP computation per distinct value).
        rdp_orders: Renyi orders (default `accounting.DEFAULT_RDP_ORDERS`).
        max_pld_sequences: the most distinct ratio sequences PLD accounts
            for before it refuses (each takes about a second).
        n: the number of examples, needed when no span has ratios.

    Returns:
        `(n,)` float64 array of epsilons. Each is at most the global
        epsilon of the same steps (it is clipped to it: the global bound
        holds for every example).
    """
    accountant = accounting.check_accountant(accountant)
    accounting.check_delta(delta)
    resolution = check_resolution(resolution)
    pieces, n = _pieces(spans, segments_between, steps, resolution, n)
    segments = [seg for _, piece_segments in pieces for seg in piece_segments]
    global_epsilon = accounting.compute_epsilon_for_segments(
        segments, delta, accountant=accountant, rdp_orders=rdp_orders
    )
    if accountant == "rdp":
        epsilons = _rdp_epsilons(pieces, n, delta, rdp_orders)
    else:
        epsilons = _pld_epsilons(pieces, n, delta, max_pld_sequences)
    return np.minimum(epsilons, global_epsilon)


def _pieces(spans, segments_between, steps, resolution, n):
    """`[(rounded ratios or None, segments)]` covering steps `[0, steps)`,
    and `n`."""
    pieces = []
    covered = 0
    for start, end, ratios in sorted(spans, key=lambda span: span[0]):
        end = min(end, steps)
        if start < covered:
            raise ValueError(
                f"Spans of steps overlap at step {start}: each step must "
                "belong to one span at most."
            )
        if start > covered:
            pieces.append((None, segments_between(covered, start)))
        if end > start:
            rounded = None if ratios is None else rounded_ratios(ratios, resolution)
            if rounded is not None:
                if n is not None and len(rounded) != n:
                    raise ValueError(
                        f"A span has {len(rounded)} ratios for {n} examples."
                    )
                n = len(rounded)
            pieces.append((rounded, segments_between(start, end)))
        covered = max(covered, end)
    if covered < steps:
        pieces.append((None, segments_between(covered, steps)))
    if n is None:
        raise ValueError(
            "individual_epsilons needs `n` when no span has per-example ratios."
        )
    return pieces, n


def _rdp_epsilons(pieces, n, delta, rdp_orders):
    orders = (
        np.asarray(accounting.DEFAULT_RDP_ORDERS, dtype=np.float64)
        if rdp_orders is None
        else accounting._orders(rdp_orders)
    )
    table = _RdpTable(orders)
    # Per piece and ledger segment: the RDP curve of each distinct ratio,
    # and each example's index into them, so that the RDP of a setting is
    # computed once.
    terms = []
    for ratios, segments in pieces:
        if ratios is None:
            values, index = np.ones(1), np.zeros(n, dtype=np.intp)
        else:
            values, index = np.unique(ratios, return_inverse=True)
            index = np.ravel(index)
        for sigma, q, count in segments:
            if count:
                curves = np.stack([table.rdp(sigma, q, r) for r in values])
                terms.append((count * curves, index))
    epsilons = np.empty(n)
    for begin in range(0, n, _CHUNK_ROWS):
        rows = slice(begin, min(n, begin + _CHUNK_ROWS))
        total = np.zeros((rows.stop - rows.start, len(orders)))
        for curves, index in terms:
            total += curves[index[rows]]
        epsilons[rows] = epsilons_from_rdp(orders, total, delta)
    return epsilons


class _RdpTable:
    """RDP curves of one Poisson-subsampled Gaussian step at sensitivity
    ratio `r`, computed by dp-accounting once per `(sigma, q, r, orders)`
    in this process (`_CURVES` keeps up to `_MAX_CURVES` of them)."""

    def __init__(self, orders):
        self.orders = orders
        self.orders_key = tuple(float(order) for order in orders)

    def rdp(self, sigma, q, r):
        key = (float(sigma), float(q), float(r), self.orders_key)
        curve = _CURVES.get(key)
        if curve is None:
            curve = self._compute(sigma, q, r)
            if len(_CURVES) >= _MAX_CURVES:
                _CURVES.pop(next(iter(_CURVES)))
            _CURVES[key] = curve
        return curve

    def _compute(self, sigma, q, r):
        if r == 0:
            return np.zeros(len(self.orders))
        effective = sigma / r
        if effective < accounting.MIN_ACCOUNTED_NOISE_MULTIPLIER:
            return np.full(len(self.orders), np.inf)
        # As in `accounting`: a larger multiplier is accounted as the
        # largest one dp-accounting handles, an upper bound.
        effective = min(effective, accounting.MAX_ACCOUNTED_NOISE_MULTIPLIER)
        event = dp_accounting.GaussianDpEvent(effective)
        if q < 1:
            event = dp_accounting.PoissonSampledDpEvent(q, event)
        rdp_accountant = dp_rdp.RdpAccountant(self.orders)
        rdp_accountant.compose(event)
        return np.asarray(rdp_accountant.rdp, dtype=np.float64)


def epsilons_from_rdp(orders, rdp, delta):
    """Epsilon of each row of RDP curves: dp-accounting's conversion
    (`rdp_privacy_accountant.compute_epsilon`, the bound of Canonne, Kamath
    and Steinke 2020, Proposition 12 of arXiv:2004.00010), over rows.

    Args:
        orders: `(k,)` Renyi orders.
        rdp: `(m, k)` RDP values.
        delta: the target delta, in (0, 1).

    Returns:
        `(m,)` epsilons.
    """
    orders = np.asarray(orders, dtype=np.float64)
    rdp = np.atleast_2d(np.asarray(rdp, dtype=np.float64))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        bound = rdp + np.log1p(-1.0 / orders) - np.log(delta * orders) / (orders - 1.0)
        bound = np.where(orders > 1.01, bound, np.inf)
        # Delta is met through the KL divergence alone, or the curve is
        # negative from numerical error: dp-accounting returns 0 for both.
        bound = np.where(delta**2 + np.expm1(-rdp) > 0, 0.0, bound)
        bound = np.where(rdp < 0, 0.0, bound)
    return np.maximum(0.0, np.min(bound, axis=1))


def _pld_epsilons(pieces, n, delta, max_sequences):
    columns = np.stack(
        [np.ones(n) if ratios is None else ratios for ratios, _ in pieces], axis=1
    )
    sequences, index = np.unique(columns, axis=0, return_inverse=True)
    if len(sequences) > max_sequences:
        raise ValueError(
            f"PLD accounting composes one privacy loss distribution per "
            f"distinct sequence of norm ratios, and these {n} examples have "
            f"{len(sequences)} (more than max_pld_sequences="
            f"{max_sequences}, about a second each). Use accountant='rdp', "
            "a coarser `resolution` (e.g. 0.1), fewer norm passes (a larger "
            "`every_epochs`), or a larger `max_pld_sequences`."
        )
    values = np.empty(len(sequences))
    for k, sequence in enumerate(sequences):
        merged = {}
        for r, (_, segments) in zip(sequence, pieces):
            for sigma, q, count in segments:
                if r > 0 and count:
                    merged[(sigma, q, r)] = merged.get((sigma, q, r), 0) + count
        values[k] = accounting.compute_epsilon_for_segments(
            [(sigma / r, q, count) for (sigma, q, r), count in merged.items()],
            delta,
            accountant="pld",
        )
    return values[np.ravel(index)]
