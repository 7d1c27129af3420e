"""Shared pieces of the accounting, callback, ledger and sampling tests.

Reference epsilons come straight from dp-accounting (not from keras_dp), so
the tests check that keras_dp builds the right events from its ledger.
"""

import functools

import dp_accounting
import keras
import numpy as np
from dp_accounting import pld as dp_pld
from dp_accounting import rdp as dp_rdp

from keras_dp import accounting

N = 200
FEATURES = 8


def dp_event(sigma, q, steps):
    """`steps` Poisson-sampled Gaussian mechanisms (no sampling at q = 1)."""
    event = dp_accounting.GaussianDpEvent(sigma)
    if q < 1:
        event = dp_accounting.PoissonSampledDpEvent(q, event)
    return dp_accounting.SelfComposedDpEvent(event, steps)


def rdp_reference(segments, delta):
    """Epsilon of `[(sigma, q, steps), ...]` composed, RDP accountant."""
    return _epsilon("rdp", tuple(tuple(s) for s in segments), delta)


def pld_reference(segments, delta):
    """Epsilon of `[(sigma, q, steps), ...]` composed, PLD accountant."""
    return _epsilon("pld", tuple(tuple(s) for s in segments), delta)


# dp-accounting takes a good fraction of a second per call on a loaded
# 2-core machine, and tests ask for the same references repeatedly.
@functools.lru_cache(maxsize=None)
def _epsilon(kind, segments, delta):
    event = dp_accounting.ComposedDpEvent([dp_event(*s) for s in segments])
    if kind == "rdp":
        accountant = dp_rdp.RdpAccountant(list(accounting.DEFAULT_RDP_ORDERS))
    else:
        accountant = dp_pld.PLDAccountant(
            value_discretization_interval=(
                accounting.DEFAULT_PLD_DISCRETIZATION_INTERVAL
            )
        )
    return accountant.compose(event).get_epsilon(delta)


def make_regression(n=N, seed=1):
    """A linear regression problem with `FEATURES` inputs and a little noise."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, FEATURES)).astype("float32")
    w = rng.normal(size=(FEATURES, 1)).astype("float32")
    y = (x @ w + 0.1 * rng.normal(size=(n, 1))).astype("float32")
    return x, y


def steps_taken(model):
    """The optimizer's `iterations` (updates under gradient accumulation)."""
    return int(keras.ops.convert_to_numpy(model.optimizer.iterations))
