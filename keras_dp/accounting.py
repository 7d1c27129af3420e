"""Privacy accounting for differentially private training.

This module turns the hyperparameters of DP-SGD style training (noise
multiplier, sampling rate and number of steps) into an `(epsilon, delta)`
differential privacy guarantee, and back.

All computations are delegated to Google's
[dp-accounting](https://github.com/google/differential-privacy/tree/main/python)
library. Each training step is modelled as a Poisson-subsampled Gaussian
mechanism: every example is included in a batch independently with
probability `q = batch_size / n`, where `n` is the number of training
examples, and the clipped gradient sum receives Gaussian noise with standard
deviation `noise_multiplier * l2_norm_clip`. The guarantee is for the
add-or-remove-one-example neighbouring relation. Note that if batches are
formed by shuffling and slicing rather than by Poisson sampling, the reported
epsilon is an approximation commonly used in practice, not a proof.

Two accountants are available:

- `"rdp"`: Renyi DP accounting (`dp_accounting.rdp.RdpAccountant`), evaluated
  on the order grid `DEFAULT_RDP_ORDERS` unless `rdp_orders` is given.
- `"pld"`: privacy loss distribution accounting
  (`dp_accounting.pld.PLDAccountant`). It gives tighter (smaller) epsilons than
  RDP, at a higher computational cost that grows as
  `pld_discretization_interval` shrinks.

Example:

```python
from keras_dp import accounting

n, batch_size, epochs = 60000, 256, 60
delta = accounting.default_delta(n)
eps = accounting.compute_epsilon(
    noise_multiplier=1.1,
    sample_rate=batch_size / n,
    steps=accounting.steps_for_epochs(epochs, batch_size / n),
    delta=delta,
)
sigma = accounting.calibrate_noise_multiplier(
    target_epsilon=3.0, delta=delta, sample_rate=batch_size / n, epochs=epochs
)
```
"""

import logging
import math
import warnings

import dp_accounting
import numpy as np
from dp_accounting import pld as dp_pld
from dp_accounting import rdp as dp_rdp

from keras_dp import arguments

ACCOUNTANTS = ("rdp", "pld")


class _UnconvergedOrderFilter(logging.Filter):
    """Hides dp-accounting's notice that a fractional Renyi order was left
    out of the bound.

    Its series for the RDP of the subsampled Gaussian at a fractional order
    does not converge near order 1 when the noise is small against the
    sampling rate (about sigma <= 1 at q >= 0.1); it then excludes the
    order and logs one warning per order and call (six per epsilon at
    q = 0.125, sigma = 1). Leaving an order out can only loosen the bound,
    never make it invalid, and the best order in that regime is larger (2
    to 7): the epsilon is the same as on the converging orders, below the
    one of integer orders only and above PLD's (`tests/test_accounting.py`
    checks this).
    """

    def filter(self, record):
        return "failed to converge" not in record.getMessage()


logging.getLogger("absl").addFilter(_UnconvergedOrderFilter())

# dp-accounting's default grid (1.1 to 10.9 in steps of 0.1, then every
# integer up to 63), extended with more large orders, which give tighter
# bounds in the large-noise / small-epsilon regime.
DEFAULT_RDP_ORDERS = tuple(
    [1 + x / 10.0 for x in range(1, 100)]
    + list(range(11, 64))
    + [64, 72, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512]
    + [640, 768, 896, 1024, 1536, 2048, 4096]
)

# dp-accounting's default discretization for PLD accounting.
DEFAULT_PLD_DISCRETIZATION_INTERVAL = 1e-4

# Search range of `calibrate_noise_multiplier`.
MIN_NOISE_MULTIPLIER = 0.1
MAX_NOISE_MULTIPLIER = 1e4

# Noise multipliers below this are accounted as no noise (epsilon = inf):
# their epsilon is astronomically large anyway, and dp-accounting's RDP
# series overflows into NaN near 1e-150, which it would report as 0.
MIN_ACCOUNTED_NOISE_MULTIPLIER = 1e-6
# Larger ones are accounted as this one (sigma**2 overflows near 1e154).
MAX_ACCOUNTED_NOISE_MULTIPLIER = 1e6
# Renyi orders above this are refused: dp-accounting sums one term per
# unit of an integer order.
MAX_RDP_ORDER = 1e4
# PLD accounting of one step discretises the privacy loss on about
# (1 / (2 sigma**2) + 10 / sigma) / interval points; beyond this many it
# would take minutes and gigabytes (or fail to allocate them).
MAX_PLD_POINTS = 1e7

# The largest dataset size `default_delta` and `check_delta` take (its
# `n**1.1` must stay within the float range).
MAX_EXAMPLES = 2**63 - 1

_DEFAULT_ORDERS = np.asarray(DEFAULT_RDP_ORDERS, dtype=np.float64)


def compute_epsilon(
    noise_multiplier,
    sample_rate,
    steps,
    delta,
    accountant="rdp",
    *,
    rdp_orders=None,
    pld_discretization_interval=DEFAULT_PLD_DISCRETIZATION_INTERVAL,
):
    """Computes epsilon for DP-SGD style training with a fixed setting.

    The training run is modelled as `steps` compositions of the Gaussian
    mechanism with noise multiplier `noise_multiplier`, each applied to a
    Poisson subsample drawn at rate `sample_rate = batch_size / n`. With
    `sample_rate=1` every step sees the full dataset (no subsampling). The
    computation is done by dp-accounting.

    Example:

    ```python
    eps = compute_epsilon(
        noise_multiplier=1.1, sample_rate=256 / 60000, steps=14063, delta=1e-5
    )  # About 2.6 with the RDP accountant.
    ```

    Args:
        noise_multiplier: Ratio of the standard deviation of the Gaussian
            noise to the L2 clipping norm: a finite number `>= 0`. Below
            `MIN_ACCOUNTED_NOISE_MULTIPLIER` (`1e-6`; `0` means no noise)
            the result is `inf` unless `steps == 0`; above
            `MAX_ACCOUNTED_NOISE_MULTIPLIER` (`1e6`) it is the epsilon of
            that multiplier, an upper bound.
        sample_rate: Probability `q` that each example is included in a batch,
            i.e. `batch_size / n`. Must be in `(0, 1]`.
        steps: Number of noisy gradient steps (non-negative integer).
        delta: Target delta, in `(0, 1)`. See `check_delta()`.
        accountant: `"rdp"` or `"pld"`.
        rdp_orders: Renyi orders used by the `"rdp"` accountant. Defaults to
            `DEFAULT_RDP_ORDERS`.
        pld_discretization_interval: Discretization interval of the privacy
            loss used by the `"pld"` accountant. Larger values are faster and
            give slightly larger (still valid) epsilons.

    Returns:
        Epsilon, as a Python float.
    """
    segment = _validate_segment(
        (noise_multiplier, sample_rate, steps),
        ("noise_multiplier", "sample_rate", "steps"),
    )
    return compute_epsilon_for_segments(
        [segment],
        delta,
        accountant=accountant,
        rdp_orders=rdp_orders,
        pld_discretization_interval=pld_discretization_interval,
    )


def compute_epsilon_for_segments(
    segments,
    delta,
    accountant="rdp",
    *,
    rdp_orders=None,
    pld_discretization_interval=DEFAULT_PLD_DISCRETIZATION_INTERVAL,
):
    """Computes epsilon for training whose noise or sampling rate changes.

    Each segment is a `(noise_multiplier, sample_rate, steps)` tuple
    describing a run of `steps` Poisson-subsampled Gaussian steps (see
    `compute_epsilon()`); all segments are composed with dp-accounting. This
    covers, for example, a change of batch size or noise level during
    training, or resuming training with a different configuration.

    Example:

    ```python
    # 10 epochs at batch size 256, then 5 epochs at batch size 1024.
    n = 60000
    eps = compute_epsilon_for_segments(
        [(1.1, 256 / n, 2344), (1.1, 1024 / n, 293)], delta=1e-5
    )
    ```

    Args:
        segments: List of `(noise_multiplier, sample_rate, steps)` tuples, in
            any order (composition is commutative).
        delta: Target delta, in `(0, 1)`.
        accountant: `"rdp"` or `"pld"`.
        rdp_orders: Renyi orders used by the `"rdp"` accountant. Defaults to
            `DEFAULT_RDP_ORDERS`.
        pld_discretization_interval: Discretization interval used by the
            `"pld"` accountant.

    Returns:
        Epsilon, as a Python float: `0.0` if there are no steps at all, and
        `inf` if some step uses `noise_multiplier == 0` (or below
        `MIN_ACCOUNTED_NOISE_MULTIPLIER`).
    """
    segments = _validate_segments(segments, "segments")
    check_delta(delta)
    new_accountant = _accountant_factory(
        accountant, rdp_orders, pld_discretization_interval
    )
    segments = [segment for segment in segments if segment[2] > 0]
    if any(sigma < MIN_ACCOUNTED_NOISE_MULTIPLIER for sigma, _, _ in segments):
        return math.inf
    if not segments:
        return 0.0
    # Epsilon only decreases as the noise grows, so a larger multiplier is
    # accounted as the largest one dp-accounting handles: an upper bound.
    segments = [
        (min(sigma, MAX_ACCOUNTED_NOISE_MULTIPLIER), q, steps)
        for sigma, q, steps in segments
    ]
    if check_accountant(accountant) == "pld":
        for sigma, _, _ in segments:
            _check_pld_size(sigma, float(pld_discretization_interval))
    event = dp_accounting.ComposedDpEvent(
        [_segment_event(*segment) for segment in segments]
    )
    return float(new_accountant().compose(event).get_epsilon(delta))


def calibrate_noise_multiplier(
    target_epsilon,
    delta,
    sample_rate,
    steps=None,
    epochs=None,
    accountant="rdp",
    tolerance=1e-3,
    *,
    rdp_orders=None,
    pld_discretization_interval=DEFAULT_PLD_DISCRETIZATION_INTERVAL,
    prior_segments=(),
):
    """Finds the smallest noise multiplier that meets a privacy budget.

    Searches, by bisection, for the smallest noise multiplier `sigma` such
    that `compute_epsilon(sigma, sample_rate, steps, delta, accountant)` is at
    most `target_epsilon`. The returned value always satisfies the target; it
    exceeds the smallest such `sigma` by at most a fraction `tolerance` of
    itself. The search range is `[MIN_NOISE_MULTIPLIER,
    MAX_NOISE_MULTIPLIER]`: if the target is already met at
    `MIN_NOISE_MULTIPLIER`, that value is returned.

    Example:

    ```python
    sigma = calibrate_noise_multiplier(
        target_epsilon=3.0, delta=1e-5, sample_rate=256 / 60000, epochs=60
    )  # About 1.0 with the RDP accountant.
    ```

    Args:
        target_epsilon: Privacy budget epsilon, `> 0`.
        delta: Target delta, in `(0, 1)`.
        sample_rate: Poisson sampling rate `batch_size / n`, in `(0, 1]`.
        steps: Number of training steps. Give exactly one of `steps` and
            `epochs`.
        epochs: Number of epochs; converted to
            `steps = ceil(epochs / sample_rate)` (see `steps_for_epochs()`).
        accountant: `"rdp"` or `"pld"`.
        tolerance: Relative tolerance on the returned noise multiplier.
        rdp_orders: Renyi orders used by the `"rdp"` accountant.
        pld_discretization_interval: Discretization interval used by the
            `"pld"` accountant.
        prior_segments: `(noise_multiplier, sample_rate, steps)` tuples
            of training already done (see `compute_epsilon_for_segments`);
            the target covers them and the new steps together.

    Returns:
        The noise multiplier, as a Python float (`0.0` if there are no
        steps).

    Raises:
        ValueError: If an argument is invalid, or if the target cannot be
            met with a noise multiplier of at most `MAX_NOISE_MULTIPLIER`.
    """
    target_epsilon = arguments.positive_number(
        "target_epsilon",
        target_epsilon,
        hint="epsilon = 0 cannot be reached with Gaussian noise",
    )
    tolerance = arguments.probability(
        "tolerance", tolerance, low_open=True, high_open=True
    )
    if (steps is None) == (epochs is None):
        raise ValueError(
            "Pass exactly one of `steps` and `epochs`. Received: "
            f"steps={steps!r}, epochs={epochs!r}"
        )
    check_delta(delta)
    sample_rate = _validate_sample_rate(sample_rate)
    _accountant_factory(accountant, rdp_orders, pld_discretization_interval)
    prior_segments = _validate_segments(prior_segments, "prior_segments")
    if epochs is not None:
        steps = steps_for_epochs(epochs, sample_rate)
    steps = _validate_steps(steps)
    if steps == 0:
        return 0.0

    def epsilon(sigma):
        return compute_epsilon_for_segments(
            prior_segments + [(sigma, sample_rate, steps)],
            delta,
            accountant,
            rdp_orders=rdp_orders,
            pld_discretization_interval=pld_discretization_interval,
        )

    # Bracket the solution: epsilon(low) > target >= epsilon(high).
    high = 1.0
    if epsilon(high) > target_epsilon:
        while True:
            low, high = high, min(2 * high, MAX_NOISE_MULTIPLIER)
            high_epsilon = epsilon(high)
            if high_epsilon <= target_epsilon:
                break
            if high == MAX_NOISE_MULTIPLIER:
                raise ValueError(
                    f"Cannot reach target_epsilon={target_epsilon} at "
                    f"delta={delta} with sample_rate={sample_rate} and "
                    f"steps={steps}: it would need a noise multiplier above "
                    f"{MAX_NOISE_MULTIPLIER:g} (which gives epsilon="
                    f"{high_epsilon:.4g}). Increase `target_epsilon`, or "
                    "train for fewer steps or with a smaller sample rate."
                )
    else:
        while True:
            if high == MIN_NOISE_MULTIPLIER:
                return high
            low = max(high / 2, MIN_NOISE_MULTIPLIER)
            if epsilon(low) > target_epsilon:
                break
            high = low

    while high - low > tolerance * high:
        mid = (low + high) / 2
        if epsilon(mid) > target_epsilon:
            low = mid
        else:
            high = mid
    return float(high)


def steps_for_epochs(epochs, sample_rate):
    """Returns the number of steps in `epochs` epochs at `sample_rate`.

    With Poisson sampling at rate `q = batch_size / n`, one epoch corresponds
    on average to `1 / q` steps, so this returns `ceil(epochs / q)`.

    Example:

    ```python
    steps_for_epochs(60, 256 / 60000)  # 14063
    ```

    Args:
        epochs: Number of epochs, `>= 0` (may be fractional).
        sample_rate: Poisson sampling rate `batch_size / n`, in `(0, 1]`.

    Returns:
        The number of steps, as a Python int.
    """
    sample_rate = _validate_sample_rate(sample_rate)
    epochs = arguments.non_negative_number("epochs", epochs)
    steps = epochs / sample_rate
    if not math.isfinite(steps):
        raise ValueError(
            f"`epochs` / `sample_rate` = {epochs!r} / {sample_rate!r} is "
            "beyond the float range: no training runs that many steps. "
            "Check the two arguments."
        )
    # Round away floating point noise such as 3 / 0.3 = 10.000000000000002
    # before taking the ceiling.
    return int(math.ceil(round(steps, 9)))


def default_delta(n):
    """Returns the conventional delta `1 / n**1.1` for a dataset of size `n`.

    Delta should be well below `1 / n` (see `check_delta()`); `n**-1.1` is a
    common choice that satisfies this for any dataset size.

    Example:

    ```python
    default_delta(60000)  # About 5.5e-6.
    ```

    Args:
        n: Number of training examples, an integer `>= 2`.

    Returns:
        Delta, as a Python float.
    """
    return 1.0 / _validate_n(n, low=2) ** 1.1


def check_delta(delta, n=None, *, name="delta"):
    """Validates `delta`, optionally against the dataset size `n`.

    Raises a `ValueError` unless `0 < delta < 1`. If `n` is given and
    `delta >= 1 / n`, issues a `UserWarning`: a mechanism that publishes one
    training example chosen at random already satisfies `(0, 1/n)`-DP, so such
    a delta allows a complete privacy breach for some examples.

    Example:

    ```python
    check_delta(1e-5, n=60000)  # OK.
    check_delta(1e-3, n=60000)  # Warns: delta >= 1 / n.
    ```

    Args:
        delta: The delta of the `(epsilon, delta)` guarantee.
        n: Optional number of training examples.
        name: the argument's name in error messages (`"target_delta"`).

    Returns:
        `delta`, as a Python float.
    """
    delta = arguments.probability(
        name,
        delta,
        low_open=True,
        high_open=True,
        hint="use e.g. `default_delta(n)` = 1 / n**1.1",
    )
    if n is None:
        return delta
    n = _validate_n(n, low=1)
    if delta >= 1 / n:
        warnings.warn(
            f"delta={delta} is >= 1/n = {1 / n:.3g} for a dataset of n={n} "
            "examples. This is a weak guarantee: a mechanism that publishes "
            "one training example chosen at random satisfies (0, 1/n)-DP. "
            "Use a delta well below 1/n, e.g. `default_delta(n)` = 1 / "
            "n**1.1.",
            UserWarning,
            stacklevel=2,
        )
    return delta


def _segment_event(noise_multiplier, sample_rate, steps):
    event = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sample_rate < 1:
        event = dp_accounting.PoissonSampledDpEvent(sample_rate, event)
    return dp_accounting.SelfComposedDpEvent(event, steps)


def check_accountant(accountant):
    """Returns the accountant's name, one of `ACCOUNTANTS` (any case), or
    raises `ValueError`."""
    if isinstance(accountant, str) and accountant.lower() in ACCOUNTANTS:
        return accountant.lower()
    return arguments.one_of("accountant", accountant, ACCOUNTANTS, what="accountant")


def _accountant_factory(accountant, rdp_orders, pld_discretization_interval):
    name = check_accountant(accountant)
    if name == "rdp":
        orders = _DEFAULT_ORDERS if rdp_orders is None else _orders(rdp_orders)
        return lambda: dp_rdp.RdpAccountant(orders)
    interval = arguments.positive_number(
        "pld_discretization_interval", pld_discretization_interval
    )
    return lambda: dp_pld.PLDAccountant(value_discretization_interval=interval)


def _orders(rdp_orders):
    """`rdp_orders` as a float64 array, or an error naming the argument."""
    allowed = f"a non-empty list of Renyi orders, numbers in (1, {MAX_RDP_ORDER:g}]"
    if isinstance(rdp_orders, np.ndarray):
        items = list(rdp_orders.ravel()) if rdp_orders.ndim == 1 else None
    elif isinstance(rdp_orders, (list, tuple)):
        items = list(rdp_orders)
    else:
        items = None
    if not items or not all(arguments.is_number(order) for order in items):
        raise arguments.ArgumentTypeError(
            f"`rdp_orders` must be {allowed}. Received: rdp_orders={rdp_orders!r}"
        )
    orders = np.asarray([float(order) for order in items], dtype=np.float64)
    if not np.all((orders > 1) & (orders <= MAX_RDP_ORDER)):
        raise ValueError(
            f"`rdp_orders` must be {allowed}. Received: rdp_orders={rdp_orders!r}"
        )
    return orders


def _check_pld_size(noise_multiplier, interval):
    points = (0.5 / noise_multiplier**2 + 10 / noise_multiplier) / interval
    if points > MAX_PLD_POINTS:
        raise ValueError(
            f"PLD accounting of noise_multiplier={noise_multiplier:g} at "
            f"pld_discretization_interval={interval:g} would discretise the "
            f"privacy loss on about {points:.2g} points (more than "
            f"{MAX_PLD_POINTS:g}: minutes and gigabytes). Use "
            "accountant='rdp', or a larger `pld_discretization_interval`."
        )


def _validate_segments(segments, name):
    """`segments` as a list of validated `(sigma, q, steps)` tuples."""
    if isinstance(segments, (str, bytes, dict)):
        items = None
    else:
        try:
            items = list(segments)
        except TypeError:
            items = None
    if items is None:
        raise arguments.ArgumentTypeError(
            f"`{name}` must be a list of (noise_multiplier, sample_rate, "
            f"steps) tuples. Received: {name}={segments!r}"
        )
    return [
        _validate_segment(
            segment, tuple(f"{name}[{index}][{k}]" for k in range(3)), index, name
        )
        for index, segment in enumerate(items)
    ]


def _validate_segment(segment, names, index=None, name=None):
    """`(sigma, q, steps)` as `(float, float, int)`; `names`: those of
    the three values in messages."""
    try:
        noise_multiplier, sample_rate, steps = segment
    except (TypeError, ValueError):
        raise arguments.ArgumentTypeError(
            f"`{name}[{index}]` must be a (noise_multiplier, sample_rate, "
            f"steps) tuple. Received: {name}[{index}]={segment!r}"
        ) from None
    sigma_name, rate_name, steps_name = names
    noise_multiplier = arguments.non_negative_number(
        sigma_name,
        noise_multiplier,
        hint="the noise multiplier, the ratio of the noise standard deviation "
        "to the clipping norm",
    )
    return (
        noise_multiplier,
        _validate_sample_rate(sample_rate, rate_name),
        _validate_steps(steps, steps_name),
    )


def _validate_sample_rate(sample_rate, name="sample_rate"):
    return arguments.probability(
        name,
        sample_rate,
        low_open=True,
        hint="the sample rate batch_size / n, the expected batch size divided "
        "by the dataset size; check that batch_size is not larger than the "
        "number of training examples and that the two are not swapped",
    )


def _validate_steps(steps, name="steps"):
    return arguments.integer(
        name,
        steps,
        low=0,
        integral_float=True,
        hint="the number of training steps",
    )


def _validate_n(n, low):
    return arguments.integer(
        "n", n, low=low, high=MAX_EXAMPLES, hint="the number of training examples"
    )
