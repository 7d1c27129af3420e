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
import operator
import warnings

import dp_accounting
import numpy as np
from dp_accounting import pld as dp_pld
from dp_accounting import rdp as dp_rdp

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
            noise to the L2 clipping norm. Must be `>= 0`; `0` means no noise,
            and the result is then `inf` unless `steps == 0`.
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
    return compute_epsilon_for_segments(
        [(noise_multiplier, sample_rate, steps)],
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
        `inf` if some step uses `noise_multiplier == 0`.
    """
    check_delta(delta)
    new_accountant = _accountant_factory(
        accountant, rdp_orders, pld_discretization_interval
    )
    events = []
    non_private = False
    for index, segment in enumerate(segments):
        noise_multiplier, sample_rate, steps = _validate_segment(segment, index)
        if steps == 0:
            continue
        if noise_multiplier == 0:
            non_private = True
        events.append(_segment_event(noise_multiplier, sample_rate, steps))
    if not events:
        return 0.0
    if non_private:
        return math.inf
    event = dp_accounting.ComposedDpEvent(events)
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
    if not target_epsilon > 0:
        raise ValueError(
            "`target_epsilon` must be > 0: epsilon = 0 cannot be reached "
            "with Gaussian noise. Received: "
            f"target_epsilon={target_epsilon}"
        )
    if not 0 < tolerance < 1:
        raise ValueError(
            f"`tolerance` must be in (0, 1). Received: tolerance={tolerance}"
        )
    if (steps is None) == (epochs is None):
        raise ValueError(
            "Pass exactly one of `steps` and `epochs`. Received: "
            f"steps={steps}, epochs={epochs}"
        )
    check_delta(delta)
    _validate_sample_rate(sample_rate)
    _accountant_factory(accountant, rdp_orders, pld_discretization_interval)
    if epochs is not None:
        steps = steps_for_epochs(epochs, sample_rate)
    steps = _validate_steps(steps)
    if steps == 0:
        return 0.0

    prior_segments = list(prior_segments)

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
    _validate_sample_rate(sample_rate)
    if not 0 <= epochs < math.inf:
        raise ValueError(
            f"`epochs` must be a finite number >= 0. Received: epochs={epochs}"
        )
    # Round away floating point noise such as 3 / 0.3 = 10.000000000000002
    # before taking the ceiling.
    return int(math.ceil(round(epochs / sample_rate, 9)))


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
    try:
        n_int = operator.index(n)
    except TypeError:
        n_int = None
    if n_int is None or n_int < 2:
        raise ValueError(
            "`n` must be the number of training examples, an integer >= 2. "
            f"Received: n={n}"
        )
    return 1.0 / n_int**1.1


def check_delta(delta, n=None):
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
    """
    if not 0 < delta < 1:
        raise ValueError(
            "`delta` must be in the open interval (0, 1); use e.g. "
            f"`default_delta(n)` = 1 / n**1.1. Received: delta={delta}"
        )
    if n is None:
        return
    if not n >= 1:
        raise ValueError(
            f"`n` must be the number of training examples. Received: n={n}"
        )
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


def _segment_event(noise_multiplier, sample_rate, steps):
    event = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sample_rate < 1:
        event = dp_accounting.PoissonSampledDpEvent(sample_rate, event)
    return dp_accounting.SelfComposedDpEvent(event, steps)


def _accountant_factory(accountant, rdp_orders, pld_discretization_interval):
    name = accountant.lower() if isinstance(accountant, str) else accountant
    if name == "rdp":
        orders = DEFAULT_RDP_ORDERS if rdp_orders is None else rdp_orders
        orders = np.asarray(orders, dtype=np.float64)
        if orders.ndim != 1 or orders.size == 0 or not np.all(orders > 1):
            raise ValueError(
                "`rdp_orders` must be a non-empty list of Renyi orders > 1. "
                f"Received: rdp_orders={rdp_orders}"
            )
        return lambda: dp_rdp.RdpAccountant(orders)
    if name == "pld":
        if not 0 < pld_discretization_interval < math.inf:
            raise ValueError(
                "`pld_discretization_interval` must be > 0. Received: "
                f"pld_discretization_interval={pld_discretization_interval}"
            )
        return lambda: dp_pld.PLDAccountant(
            value_discretization_interval=pld_discretization_interval
        )
    raise ValueError(
        f"Unknown accountant {accountant!r}. Valid names are: "
        f"{', '.join(repr(a) for a in ACCOUNTANTS)}."
    )


def _validate_segment(segment, index):
    try:
        noise_multiplier, sample_rate, steps = segment
    except (TypeError, ValueError):
        raise ValueError(
            "Each segment must be a (noise_multiplier, sample_rate, steps) "
            f"tuple. Received: segments[{index}]={segment!r}"
        ) from None
    if not 0 <= noise_multiplier < math.inf:
        raise ValueError(
            "`noise_multiplier` must be a finite number >= 0 (the ratio of "
            "the noise standard deviation to the clipping norm). Received: "
            f"noise_multiplier={noise_multiplier}"
        )
    _validate_sample_rate(sample_rate)
    return float(noise_multiplier), float(sample_rate), _validate_steps(steps)


def _validate_sample_rate(sample_rate):
    if sample_rate > 1:
        raise ValueError(
            f"`sample_rate` must be <= 1, but received {sample_rate}. The "
            "sample rate is batch_size / n, the expected batch size divided "
            "by the dataset size; check that batch_size is not larger than "
            "the number of training examples and that they are not swapped."
        )
    if not sample_rate > 0:
        raise ValueError(
            "`sample_rate` must be in (0, 1]: it is batch_size / n, the "
            "expected batch size divided by the dataset size. Received: "
            f"sample_rate={sample_rate}"
        )


def _validate_steps(steps):
    try:
        value = operator.index(steps)
    except TypeError:
        is_integral_float = isinstance(steps, float) and steps.is_integer()
        value = int(steps) if is_integral_float else None
    if value is None or value < 0:
        raise ValueError(
            "`steps` must be a non-negative integer (the number of training "
            f"steps). Received: steps={steps}"
        )
    return value
