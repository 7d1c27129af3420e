"""Tests for keras_dp.accounting.

Reference values are computed here directly with the dp-accounting API, so
these tests check that `keras_dp.accounting` builds the right `DpEvent`s and
accountants, not just that it returns what it returned before.
"""

import logging
import math
import pathlib
import subprocess
import sys
import warnings

import dp_accounting
import keras
import pytest
from dp_accounting import pld
from dp_accounting import rdp

from keras_dp import accounting

# Pure dp-accounting arithmetic, the same on every Keras backend: run once.
pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="backend-independent; runs on the TensorFlow pass of the suite",
)

DELTA = 1e-5
# Coarse enough to keep PLD accounting fast in tests.
PLD_INTERVAL = 1e-3

GRID = [
    # (noise_multiplier, sample_rate, steps)
    (0.8, 0.01, 100),
    (1.1, 256 / 60000, 1000),
    (2.0, 0.1, 50),
    (5.0, 0.001, 3000),
    (1.5, 0.6, 20),
    (1.0, 1.0, 10),
]


def _event(sigma, q, steps):
    gaussian = dp_accounting.GaussianDpEvent(sigma)
    if q == 1.0:
        return dp_accounting.SelfComposedDpEvent(gaussian, steps)
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, gaussian), steps
    )


def _rdp_reference(event, orders=accounting.DEFAULT_RDP_ORDERS):
    return rdp.RdpAccountant(list(orders)).compose(event).get_epsilon(DELTA)


def _pld_reference(event):
    accountant = pld.PLDAccountant(value_discretization_interval=PLD_INTERVAL)
    return accountant.compose(event).get_epsilon(DELTA)


def _eps(sigma, q, steps, acc, delta=DELTA):
    return accounting.compute_epsilon(
        sigma, q, steps, delta, acc, pld_discretization_interval=PLD_INTERVAL
    )


@pytest.mark.parametrize("sigma,q,steps", GRID)
def test_rdp_matches_dp_accounting(sigma, q, steps):
    eps = accounting.compute_epsilon(sigma, q, steps, DELTA, "rdp")
    assert isinstance(eps, float)
    assert eps == pytest.approx(_rdp_reference(_event(sigma, q, steps)), 1e-6)


def test_rdp_custom_orders_match_dp_accounting():
    orders = [1.5, 2, 4, 8, 16, 32]
    sigma, q, steps = 1.1, 0.02, 500
    eps = accounting.compute_epsilon(sigma, q, steps, DELTA, "rdp", rdp_orders=orders)
    ref = _rdp_reference(_event(sigma, q, steps), orders)
    assert eps == pytest.approx(ref, rel=1e-6)
    # The default grid is denser, so it can only give a tighter bound.
    assert accounting.compute_epsilon(sigma, q, steps, DELTA) < eps


@pytest.mark.parametrize("sigma,q,steps", GRID)
def test_pld_matches_dp_accounting(sigma, q, steps):
    eps = _eps(sigma, q, steps, "pld")
    assert isinstance(eps, float)
    assert eps == pytest.approx(_pld_reference(_event(sigma, q, steps)), 1e-6)


@pytest.mark.parametrize("acc", ["rdp", "pld"])
def test_full_batch_is_unsampled_gaussian(acc):
    # With sample_rate=1 the steps must be accounted as plain Gaussian
    # mechanisms: composing k of them equals one with sigma / sqrt(k).
    steps = 16
    composed = _eps(4.0, 1.0, steps, acc)
    single = _eps(4.0 / math.sqrt(steps), 1.0, 1, acc)
    assert composed == pytest.approx(single, rel=1e-3)


def test_classic_mnist_setting():
    # DP-SGD on MNIST (Abadi et al., 2016, setting as in the TF Privacy
    # tutorial): q = 256 / 60000, sigma = 1.1, 60 epochs, delta = 1e-5. The
    # tutorial reports epsilon ~= 3.01 with the classic RDP -> (eps, delta)
    # conversion; dp-accounting uses a tighter conversion and gives ~= 2.60.
    q = 256 / 60000
    steps = math.ceil(60 * 60000 / 256)
    assert accounting.steps_for_epochs(60, q) == steps
    eps = accounting.compute_epsilon(1.1, q, steps, DELTA, "rdp")
    assert 2.5 < eps < 3.5
    # PLD accounting is tighter than RDP.
    assert _eps(1.1, q, steps, "pld") < eps


@pytest.mark.parametrize("acc", ["rdp", "pld"])
def test_epsilon_is_monotone(acc):
    base = _eps(1.0, 0.01, 200, acc)
    assert _eps(1.5, 0.01, 200, acc) < base  # More noise.
    assert _eps(1.0, 0.005, 200, acc) < base  # Smaller batches.
    assert _eps(1.0, 0.01, 100, acc) < base  # Fewer steps.


@pytest.mark.parametrize("acc", ["rdp", "pld"])
def test_zero_steps_and_zero_noise(acc):
    assert _eps(1.0, 0.01, 0, acc) == 0.0
    assert _eps(0.0, 0.01, 0, acc) == 0.0
    assert _eps(0.0, 0.01, 1, acc) == math.inf
    assert accounting.compute_epsilon_for_segments([], DELTA, acc) == 0.0


@pytest.mark.parametrize("acc", ["rdp", "pld"])
def test_segments_match_composed_event(acc):
    segments = [(1.0, 0.01, 300), (2.0, 0.05, 200)]
    eps = accounting.compute_epsilon_for_segments(
        segments, DELTA, acc, pld_discretization_interval=PLD_INTERVAL
    )
    event = dp_accounting.ComposedDpEvent([_event(*s) for s in segments])
    ref = _rdp_reference(event) if acc == "rdp" else _pld_reference(event)
    assert eps == pytest.approx(ref, rel=1e-6)
    # Strictly more than either segment alone.
    assert eps > max(_eps(*s, acc) for s in segments)


@pytest.mark.parametrize("acc", ["rdp", "pld"])
@pytest.mark.parametrize("sigma,q", [(1.0, 0.01), (20.0, 1.0)])
def test_split_segment_equals_single_segment(acc, sigma, q):
    split = accounting.compute_epsilon_for_segments(
        [(sigma, q, 300), (sigma, q, 0), (sigma, q, 700)],
        DELTA,
        acc,
        pld_discretization_interval=PLD_INTERVAL,
    )
    assert split == pytest.approx(_eps(sigma, q, 1000, acc), rel=1e-6)


@pytest.mark.parametrize("acc", ["rdp", "pld"])
@pytest.mark.parametrize("target", [0.5, 2.0, 8.0])
def test_calibrate_round_trip_steps(acc, target):
    q, steps, tol = 0.01, 500, 1e-3
    sigma = accounting.calibrate_noise_multiplier(
        target,
        DELTA,
        q,
        steps=steps,
        accountant=acc,
        tolerance=tol,
        pld_discretization_interval=PLD_INTERVAL,
    )
    eps = _eps(sigma, q, steps, acc)
    assert eps <= target
    assert eps == pytest.approx(target, rel=0.01)
    # Smallest such sigma, up to the tolerance.
    assert _eps(sigma * (1 - 2 * tol), q, steps, acc) > target


@pytest.mark.parametrize("acc", ["rdp", "pld"])
def test_calibrate_round_trip_epochs(acc):
    q, epochs, target = 0.02, 3, 1.0
    sigma = accounting.calibrate_noise_multiplier(
        target,
        DELTA,
        q,
        epochs=epochs,
        accountant=acc,
        pld_discretization_interval=PLD_INTERVAL,
    )
    steps = math.ceil(epochs / q)
    eps = _eps(sigma, q, steps, acc)
    assert eps <= target
    assert eps == pytest.approx(target, rel=0.01)
    assert sigma == accounting.calibrate_noise_multiplier(
        target,
        DELTA,
        q,
        steps=steps,
        accountant=acc,
        pld_discretization_interval=PLD_INTERVAL,
    )


def test_calibrate_classic_setting():
    q = 256 / 60000
    sigma = accounting.calibrate_noise_multiplier(3.0, DELTA, q, epochs=60)
    eps = accounting.compute_epsilon(sigma, q, math.ceil(60 / q), DELTA)
    assert 0.99 * 3.0 < eps <= 3.0
    # Epsilon 2.6 at sigma 1.1, so epsilon 3 needs less noise.
    assert 0.8 < sigma < 1.1


def test_calibrate_errors():
    with pytest.raises(ValueError, match="target_epsilon.*> 0"):
        accounting.calibrate_noise_multiplier(0.0, DELTA, 0.01, steps=10)
    with pytest.raises(ValueError, match="target_epsilon.*> 0"):
        accounting.calibrate_noise_multiplier(-1.0, DELTA, 0.01, steps=10)
    with pytest.raises(ValueError, match="Cannot reach.*noise multiplier"):
        accounting.calibrate_noise_multiplier(1e-2, DELTA, 1.0, steps=10**6)
    with pytest.raises(ValueError, match="exactly one of `steps` and"):
        accounting.calibrate_noise_multiplier(1.0, DELTA, 0.01)
    with pytest.raises(ValueError, match="exactly one of `steps` and"):
        accounting.calibrate_noise_multiplier(1.0, DELTA, 0.01, steps=10, epochs=1)
    with pytest.raises(ValueError, match="sample_rate.*batch_size"):
        accounting.calibrate_noise_multiplier(1.0, DELTA, 2.0, epochs=1)
    with pytest.raises(ValueError, match="Unknown accountant"):
        accounting.calibrate_noise_multiplier(
            1.0, DELTA, 0.01, steps=10, accountant="gdp"
        )


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, 1.5, float("nan")])
def test_invalid_delta(delta):
    with pytest.raises(ValueError, match=r"delta.*\(0, 1\)"):
        accounting.compute_epsilon(1.0, 0.01, 10, delta)
    with pytest.raises(ValueError, match=r"delta.*\(0, 1\)"):
        accounting.check_delta(delta)


def test_sample_rate_above_one():
    with pytest.raises(ValueError, match="batch_size / n.*dataset size"):
        accounting.compute_epsilon(1.0, 256 / 100, 10, DELTA)


@pytest.mark.parametrize("q", [0.0, -0.1])
def test_non_positive_sample_rate(q):
    with pytest.raises(ValueError, match=r"sample_rate.*\(0, 1\]"):
        accounting.compute_epsilon(1.0, q, 10, DELTA)


def test_negative_noise_multiplier():
    with pytest.raises(ValueError, match="noise_multiplier.*>= 0"):
        accounting.compute_epsilon(-1.0, 0.01, 10, DELTA)


@pytest.mark.parametrize("steps", [-1, 2.5])
def test_invalid_steps(steps):
    with pytest.raises(ValueError, match="steps.*non-negative integer"):
        accounting.compute_epsilon(1.0, 0.01, steps, DELTA)


def test_unknown_accountant():
    with pytest.raises(ValueError, match="Unknown accountant.*'rdp', 'pld'"):
        accounting.compute_epsilon(1.0, 0.01, 10, DELTA, accountant="prv")


def test_malformed_segment():
    with pytest.raises(ValueError, match=r"segments\[1\]"):
        accounting.compute_epsilon_for_segments([(1.0, 0.01, 10), (1.0, 0.01)], DELTA)


def test_delta_above_one_over_n_warns():
    with pytest.warns(UserWarning, match=r"(?s)1/n.*one training example"):
        accounting.check_delta(1e-3, n=1000)
    with pytest.warns(UserWarning, match="1/n"):
        accounting.check_delta(1e-2, n=1000)


def test_small_delta_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        accounting.check_delta(1e-5, n=1000)
        accounting.check_delta(1e-3)
        accounting.check_delta(accounting.default_delta(50000), n=50000)


@pytest.mark.parametrize("n", [2, 1000, 60000, 10**9])
def test_default_delta(n):
    delta = accounting.default_delta(n)
    assert delta == pytest.approx(n**-1.1, rel=1e-12)
    assert 0 < delta < 1 / n


@pytest.mark.parametrize("n", [0, 1, 2.5])
def test_default_delta_invalid(n):
    with pytest.raises(ValueError, match="integer >= 2"):
        accounting.default_delta(n)


def test_steps_for_epochs():
    assert accounting.steps_for_epochs(60, 256 / 60000) == 14063
    assert accounting.steps_for_epochs(3, 0.3) == 10
    assert accounting.steps_for_epochs(0, 0.1) == 0
    assert accounting.steps_for_epochs(0.5, 0.1) == 5


def test_module_does_not_import_ml_frameworks():
    # Load the module and the keras_dp modules it imports (argument
    # validators) from their files, under an empty package, so the
    # package __init__ (which imports Keras) does not interfere.
    package = pathlib.Path(accounting.__file__).parent
    code = (
        "import importlib, sys, types\n"
        "package = types.ModuleType('keras_dp')\n"
        f"package.__path__ = [{str(package)!r}]\n"
        "sys.modules['keras_dp'] = package\n"
        "importlib.import_module('keras_dp.accounting')\n"
        "bad = {'keras', 'tensorflow', 'jax', 'torch'} & set(sys.modules)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_small_noise_epsilon_is_right_and_logs_nothing(caplog):
    # At q = 0.125, sigma = 1 dp-accounting leaves the fractional orders
    # near 1 out (its series does not converge there) and says so once per
    # order and call. The value must still lie between PLD's and the one of
    # integer orders only, and the log stay clean.
    sigma, q, steps, delta = 1.0, 0.125, 80, 1e-5
    with caplog.at_level(logging.WARNING):
        epsilon = accounting.compute_epsilon(sigma, q, steps, delta)
    assert not [r for r in caplog.records if "converge" in r.getMessage()]
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)),
        steps,
    )
    integer_orders = rdp.RdpAccountant(list(range(2, 1025)))
    integer = integer_orders.compose(event).get_epsilon(delta)
    tight = pld.PLDAccountant(value_discretization_interval=1e-4)
    assert tight.compose(event).get_epsilon(delta) <= epsilon <= integer
