"""Property-based fuzzing of the public constructors and accounting
functions (hypothesis).

Each argument is drawn from plausible values and from anything: floats
(NaN, +-inf, negative, huge, subnormal), huge and negative ints, bools,
None, strings, NumPy scalars. Whether a drawn argument is valid is decided
here by a reference written apart from `keras_dp.arguments`. Every call
then either succeeds, when all its arguments are valid, with a result that
satisfies the stated invariants, or raises ValueError/TypeError whose
message names one of the invalid arguments: never another exception,
never a silent NaN.
"""

import math
import re
import warnings

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from scipy.special import log_ndtr
from scipy.special import ndtr

import keras_dp
from keras_dp import accounting
from keras_dp.data import PoissonSampler


def _fuzz(max_examples):
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.function_scoped_fixture,
        ],
    )


# ------------------------------------------------------------ the values

ANY_FLOAT = st.floats(allow_nan=True, allow_infinity=True)
NUMPY_SCALAR = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32).map(np.float32),
    ANY_FLOAT.map(np.float64),
    st.integers(-(2**63), 2**63 - 1).map(np.int64),
    st.integers(-128, 127).map(np.int8),
)
ANYTHING = st.one_of(
    ANY_FLOAT,
    st.integers(-(2**70), 2**70),
    NUMPY_SCALAR,
    st.booleans(),
    st.none(),
    st.text(max_size=4),
    st.sampled_from([[1.0], (), {}, b"1"]),
)


def _or_anything(valid, valid_share=2):
    """`valid_share` draws in `valid_share + 1` from `valid`, the others
    from anything. (`st.one_of` would weigh each of its nested branches
    alike, and anything has many.)"""
    choices = [valid] * valid_share + [ANYTHING]
    return st.sampled_from(choices).flatmap(lambda strategy: strategy)


def _weighted(*choices):
    """`(weight, strategy)` pairs: each strategy drawn `weight` times in
    the sum of the weights."""
    strategies = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.sampled_from(strategies).flatmap(lambda strategy: strategy)


POSITIVE = _or_anything(st.floats(1e-6, 1e6) | st.integers(1, 100))
SMALL_INT = _or_anything(st.integers(-2, 40))


# --------------------------------------- the reference (apart from the library)


def _real(value):
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


def _number(value, low=None, high=None, low_open=False, high_open=False):
    if not _real(value):
        return False
    try:
        x = float(value)
    except OverflowError:
        return False
    return (
        math.isfinite(x)
        and (low is None or (x > low if low_open else x >= low))
        and (high is None or (x < high if high_open else x <= high))
    )


def _int(value, low=None, high=None):
    return (
        isinstance(value, (int, np.integer))
        and not isinstance(value, (bool, np.bool_))
        and (low is None or value >= low)
        and (high is None or value <= high)
    )


def _optional(check):
    return lambda value: value is None or check(value)


def _positive(value):
    return _number(value, low=0, low_open=True)


def _non_negative(value):
    return _number(value, low=0)


def _open_unit(value):
    return _number(value, low=0, high=1, low_open=True, high_open=True)


def _rate(value):
    return _number(value, low=0, high=1, low_open=True)


def _seed(value):
    return _int(value, 0, 2**31 - 1)


def _bool(value):
    return isinstance(value, (bool, np.bool_))


def _choice(choices):
    return lambda value: isinstance(value, str) and value in choices


def _call(function, kwargs, invalid):
    """`function(**kwargs)`: succeeds (returns the result) when `invalid`
    (names of invalid arguments) is empty; else must raise ValueError or
    TypeError naming one of them. Returns None then."""
    try:
        result = function(**kwargs)
    except (ValueError, TypeError) as error:
        message = str(error)
        named = [
            name
            for name in invalid
            if re.search(rf"`{re.escape(name)}[`\[]|\b{re.escape(name)}=", message)
        ]
        assert named, (
            f"{function.__name__}{kwargs}: {message!r} names none of {invalid}"
        )
        return None
    assert not invalid, f"{function.__name__}{kwargs} accepted invalid {invalid}"
    return result


def _invalid(kwargs, rules):
    return [name for name, rule in rules.items() if not rule(kwargs[name])]


def _draw(data, plausible, junk=None):
    """Keyword arguments drawn from `plausible` ({name: strategy}); in
    half of the examples each may also come from its `junk` (default
    anything). Several arguments all drawn from anything would almost
    never give a call that must succeed."""
    corrupt = data.draw(st.booleans(), label="corrupt")
    kwargs = {}
    for name, strategy in plausible.items():
        if corrupt:
            bad = (junk or {}).get(name, ANYTHING)
            strategy = st.sampled_from([strategy, bad]).flatmap(lambda s: s)
        kwargs[name] = data.draw(strategy, label=name)
    return kwargs


# ------------------------------------------------------- the constructors

OPTIMIZER_RULES = {
    "l2_norm_clip": _positive,
    "noise_multiplier": _optional(_non_negative),
    "clipping": _choice(("flat", "auto", "global")),
    "auto_clip": _bool,
    "global_clip_threshold": _optional(_positive),
    "seed": _optional(_seed),
    "secure_mode": _bool,
    "clip_groups": _optional(_choice(("flat", "layers", "per_layer", "per_variable"))),
    "adaptive_clipping": lambda value: value is None or _bool(value),
}


OPTIMIZER_ARGUMENTS = {
    "l2_norm_clip": st.floats(1e-6, 1e6) | st.integers(1, 100),
    "noise_multiplier": st.none() | st.floats(0, 1e3) | st.just(np.float32(0.5)),
    "clipping": st.sampled_from(["flat", "auto", "global"]),
    "auto_clip": st.sampled_from([False, False, True]),
    "global_clip_threshold": _weighted((3, st.none()), (1, st.floats(1e-3, 1e3))),
    "seed": st.none() | st.integers(0, 2**31 - 1) | st.just(np.int64(7)),
    "secure_mode": st.sampled_from([False, False, False, True]),
    "clip_groups": st.sampled_from([None, "flat", "layers", "per_layer"]),
    "clip_thresholds": st.none()
    | st.dictionaries(st.sampled_from(["a", "b"]), st.floats(1e-3, 10), max_size=2),
    "adaptive_clipping": st.sampled_from([None, None, False, True]),
}
OPTIMIZER_JUNK = {
    "clipping": st.sampled_from(["Flat", "adaptive", 3, None]) | ANYTHING,
    "clip_groups": st.sampled_from(["per_head", 2, True]) | ANYTHING,
    "clip_thresholds": st.dictionaries(
        st.sampled_from(["a", "", 3]), ANYTHING, min_size=1, max_size=2
    )
    | ANYTHING,
    "adaptive_clipping": st.sampled_from([1, "yes", 0.5]) | ANYTHING,
}


@_fuzz(100)
@given(data=st.data())
def test_fuzz_dp_optimizer(data):
    kwargs = _draw(data, OPTIMIZER_ARGUMENTS, OPTIMIZER_JUNK)
    invalid = _invalid(kwargs, OPTIMIZER_RULES)
    clipping = "auto" if kwargs["auto_clip"] is True else kwargs["clipping"]
    if kwargs["auto_clip"] is True and kwargs["clipping"] not in ("flat", "auto"):
        invalid.append("auto_clip")
    if kwargs["global_clip_threshold"] is not None and clipping != "global":
        invalid.append("global_clip_threshold")
    if kwargs["secure_mode"] is True and kwargs["seed"] is not None:
        invalid += ["secure_mode", "seed"]
    if kwargs["adaptive_clipping"] is True and clipping != "flat":
        invalid += ["adaptive_clipping", "clipping"]
    thresholds = kwargs["clip_thresholds"]
    if thresholds is not None and not isinstance(thresholds, dict):
        invalid.append("clip_thresholds")
    elif thresholds:
        if any(not (isinstance(k, str) and k) for k in thresholds):
            invalid.append("clip_thresholds")
        invalid += [
            f"clip_thresholds['{k}']"
            for k, v in thresholds.items()
            if isinstance(k, str) and not _positive(v)
        ]
    optimizer = _call(keras_dp.DPSGD, kwargs, invalid)
    if optimizer is None:
        return
    assert optimizer.l2_norm_clip == float(kwargs["l2_norm_clip"])
    assert type(optimizer.l2_norm_clip) is float
    sigma = kwargs["noise_multiplier"]
    assert optimizer.noise_multiplier == (1.0 if sigma is None else float(sigma))
    assert optimizer.clipping == clipping
    config = optimizer.get_config()
    assert keras_dp.DPSGD.from_config(config).get_config() == config


@_fuzz(40)
@given(
    target_epsilon=POSITIVE,
    target_delta=_or_anything(st.floats(1e-12, 0.5)),
    epochs=POSITIVE,
)
def test_fuzz_dp_optimizer_calibration_target(**kwargs):
    invalid = _invalid(
        kwargs,
        {"target_epsilon": _positive, "target_delta": _open_unit, "epochs": _positive},
    )
    if kwargs["target_delta"] is None or kwargs["epochs"] is None:
        invalid += ["target_epsilon"]  # "`target_epsilon` needs `target_delta`..."
    optimizer = _call(keras_dp.DPAdam, kwargs, invalid)
    if optimizer is not None:
        assert optimizer.noise_multiplier is None
        assert optimizer.target_epsilon == float(kwargs["target_epsilon"])
        config = optimizer.get_config()
        assert keras_dp.DPAdam.from_config(config).get_config() == config


@_fuzz(100)
@given(
    noise_multiplier=_or_anything(st.floats(0, 1e3)),
    seed=_or_anything(st.integers(0, 2**31 - 1)),
    target_quantile=_or_anything(st.floats(0, 1)),
    learning_rate=POSITIVE,
    count_stddev_fraction=POSITIVE,
    count_stddev=st.one_of(st.none(), POSITIVE),
)
def test_fuzz_noise_and_adaptive_clipping(
    noise_multiplier, seed, target_quantile, learning_rate, **counts
):
    noise_args = {"noise_multiplier": noise_multiplier, "seed": seed}
    noise = _call(
        keras_dp.GaussianNoise,
        noise_args,
        _invalid(
            noise_args,
            {"noise_multiplier": _optional(_non_negative), "seed": _optional(_seed)},
        ),
    )
    if noise is not None:
        assert keras_dp.GaussianNoise.from_config(noise.get_config()).get_config() == (
            noise.get_config()
        )
    adaptive_args = {
        "target_quantile": target_quantile,
        "learning_rate": learning_rate,
        **counts,
    }
    rules = {
        "target_quantile": _open_unit,
        "learning_rate": _positive,
        "count_stddev_fraction": _positive,
        "count_stddev": _optional(_non_negative),
    }
    adaptive = _call(
        keras_dp.AdaptiveClipping, adaptive_args, _invalid(adaptive_args, rules)
    )
    if adaptive is not None:
        config = adaptive.get_config()
        assert all(v is None or math.isfinite(v) for v in config.values())
        assert keras_dp.AdaptiveClipping.from_config(config).get_config() == config


N_EXAMPLES = 16


SAMPLER_ARGUMENTS = {
    "batch_size": st.integers(1, 8) | st.just(np.int64(4)),
    "steps_per_epoch": st.none() | st.integers(1, 5),
    "accumulation_steps": st.sampled_from([None, 1, 1, 2]),
    "seed": st.none() | st.integers(0, 2**31 - 1),
    "sample_weight": st.none()
    | st.lists(st.floats(0, 10), min_size=N_EXAMPLES, max_size=N_EXAMPLES),
}
SAMPLER_JUNK = {
    "batch_size": SMALL_INT,
    "steps_per_epoch": SMALL_INT,
    "accumulation_steps": SMALL_INT,
    "sample_weight": st.lists(
        st.floats(0, 10) | ANY_FLOAT, min_size=N_EXAMPLES, max_size=N_EXAMPLES
    )
    | st.lists(st.floats(0, 10), max_size=3),
}


@_fuzz(60)
@given(data=st.data())
def test_fuzz_poisson_sampler(data):
    kwargs = _draw(data, SAMPLER_ARGUMENTS, SAMPLER_JUNK)
    rules = {
        "batch_size": lambda v: _int(v, 1),
        "steps_per_epoch": _optional(lambda v: _int(v, 1)),
        "accumulation_steps": _optional(lambda v: _int(v, 1)),
        "seed": _optional(_seed),
    }
    invalid = _invalid(kwargs, rules)
    accumulation = (
        1 if kwargs["accumulation_steps"] is None else kwargs["accumulation_steps"]
    )
    weights = kwargs["sample_weight"]
    if weights is not None:
        with np.errstate(over="ignore"):  # beyond float32: inf, refused
            as_float32 = np.asarray(weights, dtype="float64").astype("float32")
        if len(weights) != N_EXAMPLES or not np.all(
            np.isfinite(as_float32) & (as_float32 >= 0)
        ):
            invalid.append("sample_weight")
    if (
        _int(kwargs["batch_size"], 1)
        and _int(accumulation, 1)
        and int(kwargs["batch_size"]) * int(accumulation) > N_EXAMPLES
    ):
        invalid += ["batch_size", "accumulation_steps"]
    x = np.arange(2 * N_EXAMPLES, dtype="float32").reshape(N_EXAMPLES, 2)
    with np.errstate(over="ignore"):
        sampler = _call(lambda **kw: PoissonSampler(x, x[:, :1], **kw), kwargs, invalid)
    if sampler is None:
        return
    logical = int(kwargs["batch_size"]) * int(accumulation)
    assert sampler.sample_rate == logical / N_EXAMPLES
    updates = kwargs["steps_per_epoch"] or math.ceil(N_EXAMPLES / logical)
    assert len(sampler) == updates * accumulation
    inputs, _, batch_weights = sampler[len(sampler) - 1]
    assert np.all(np.isfinite(batch_weights)) and np.all(batch_weights >= 0)
    # Each real row carries its own example's weight; padding rows weigh 0.
    for row, weight in zip(inputs, batch_weights):
        if weight > 0:
            assert weight == sampler.sample_weight[int(row[0]) // 2]


ACCOUNTANT = st.sampled_from(["rdp", "RDP", "pld", "moments", 3, None])


@_fuzz(100)
@given(
    delta=st.one_of(st.none(), _or_anything(st.floats(1e-12, 0.5))),
    target_epsilon=POSITIVE,
    accountant=ACCOUNTANT,
    every_n_batches=st.one_of(st.none(), SMALL_INT),
    group=_or_anything(st.text(max_size=3)),
    threshold=st.one_of(st.none(), POSITIVE),
)
def test_fuzz_callbacks_and_clip_groups(
    delta, target_epsilon, accountant, every_n_batches, group, threshold
):
    accountant_ok = isinstance(accountant, str) and accountant.lower() in ("rdp", "pld")
    kwargs = {
        "delta": delta,
        "accountant": accountant,
        "every_n_batches": every_n_batches,
    }
    invalid = _invalid(
        kwargs,
        {
            "delta": _optional(_open_unit),
            "accountant": lambda _: accountant_ok,
            "every_n_batches": _optional(lambda v: _int(v, 1)),
        },
    )
    logger = _call(keras_dp.EpsilonLogger, kwargs, invalid)
    if logger is not None:
        assert logger.delta == (None if delta is None else float(delta))
        assert logger.accountant == accountant.lower()
    kwargs = {
        "target_epsilon": target_epsilon,
        "delta": delta,
        "accountant": accountant,
    }
    invalid = _invalid(
        kwargs,
        {
            "target_epsilon": _positive,
            "delta": _open_unit,
            "accountant": lambda _: accountant_ok,
        },
    )
    budget = _call(keras_dp.PrivacyBudget, kwargs, invalid)
    if budget is not None:
        assert budget.target_epsilon == float(target_epsilon)
    layer = keras.layers.Dense(2)
    kwargs = {"layer": layer, "group": group, "threshold": threshold}
    invalid = _invalid(
        kwargs,
        {
            "layer": lambda _: True,
            "group": lambda v: isinstance(v, str) and v != "",
            "threshold": _optional(_positive),
        },
    )
    if _call(keras_dp.set_clip_group, kwargs, invalid) is not None:
        expected = None if threshold is None else float(threshold)
        assert keras_dp.get_clip_group(layer) == (group, expected)


# ------------------------------------------------------------- accounting

# Pure dp-accounting arithmetic, the same on every Keras backend.
accounting_only_once = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="backend-independent; runs on the TensorFlow pass of the suite",
)


def _mostly(valid):
    """Mostly valid (plausible or extreme) values: the valid calls are the
    slow ones and need the most examples."""
    return _or_anything(valid, valid_share=5)


SIGMA = _mostly(
    st.floats(0.3, 30)
    | st.floats(0, 1e-100)
    | st.floats(0, 1e-3)
    | st.floats(1e3, 1e300)
    | st.just(0.0)
)
RATE = _mostly(st.floats(0, 1, exclude_min=True) | st.just(1.0))
STEPS = _mostly(st.integers(0, 10**4) | st.just(0) | st.just(3.0))
DELTA = _mostly(st.floats(0, 1, exclude_min=True, exclude_max=True))


def _steps(value):
    return _int(value, 0) or (_number(value, low=0) and float(value).is_integer())


def _one_step_lower_bound(sigma, q, delta):
    """A lower bound on the epsilon of any run with a step at `(sigma, q)`.

    Project the noisy sum on the added example's (unit) gradient: without
    the example it is N(0, sigma^2), with it N(1, sigma^2) with
    probability q. The event {projection > 1/2} has probabilities P0 and
    P1, and (epsilon, delta)-DP needs P1 <= e^epsilon P0 + delta.
    """
    t = 0.5 / sigma
    log_p0 = float(log_ndtr(-t))
    p1 = q * float(ndtr(t)) + (1 - q) * math.exp(log_p0)
    return math.log(p1 - delta) - log_p0 if p1 > delta else 0.0


SEGMENT_RULES = {
    "noise_multiplier": _non_negative,
    "sample_rate": _rate,
    "steps": _steps,
    "delta": _open_unit,
}


@accounting_only_once
@_fuzz(80)
@given(noise_multiplier=SIGMA, sample_rate=RATE, steps=STEPS, delta=DELTA)
def test_fuzz_compute_epsilon(**kwargs):
    invalid = _invalid(kwargs, SEGMENT_RULES)
    epsilon = _call(keras_dp.compute_epsilon, kwargs, invalid)
    if epsilon is None:
        return
    assert type(epsilon) is float and epsilon >= 0  # NaN fails both
    sigma, steps = float(kwargs["noise_multiplier"]), int(kwargs["steps"])
    if steps == 0:
        assert epsilon == 0
        return
    if sigma < accounting.MIN_ACCOUNTED_NOISE_MULTIPLIER:
        assert epsilon == math.inf
        return
    assert math.isfinite(epsilon)
    bound = _one_step_lower_bound(
        sigma, float(kwargs["sample_rate"]), float(kwargs["delta"])
    )
    assert epsilon >= bound * (1 - 1e-6) - 1e-9
    # More noise never costs more privacy.
    more = keras_dp.compute_epsilon(**{**kwargs, "noise_multiplier": 2 * sigma})
    assert more <= epsilon * (1 + 1e-9) + 1e-12


@accounting_only_once
@_fuzz(25)
@given(
    segments=st.one_of(
        st.lists(
            st.tuples(SIGMA, RATE, STEPS) | st.tuples(SIGMA, RATE) | ANYTHING,
            max_size=3,
        ),
        ANYTHING,
    ),
    delta=DELTA,
)
def test_fuzz_compute_epsilon_for_segments(segments, delta):
    invalid = _invalid({"delta": delta}, {"delta": _open_unit})
    if not isinstance(segments, (list, tuple)):
        invalid.append("segments")
    else:
        for index, segment in enumerate(segments):
            if not (isinstance(segment, (list, tuple)) and len(segment) == 3):
                invalid.append(f"segments[{index}]")
                continue
            for k, (value, rule) in enumerate(
                zip(segment, (_non_negative, _rate, _steps))
            ):
                if not rule(value):
                    invalid.append(f"segments[{index}][{k}]")
    epsilon = _call(
        accounting.compute_epsilon_for_segments,
        {"segments": segments, "delta": delta},
        invalid,
    )
    if epsilon is None:
        return
    assert type(epsilon) is float and epsilon >= 0
    # Composition costs at least as much as any of its segments alone.
    for segment in segments:
        alone = keras_dp.compute_epsilon(*segment, delta)
        assert epsilon >= alone * (1 - 1e-9)


# A short grid of Renyi orders keeps each calibration to milliseconds.
ORDERS = [1.5, 2, 3, 4, 6, 8, 16, 32, 64]


def _orders(value):
    return (
        isinstance(value, (list, tuple))
        and len(value) > 0
        and all(_number(v, low=1, high=1e4, low_open=True) for v in value)
    )


@accounting_only_once
@_fuzz(60)
@given(
    target_epsilon=_mostly(st.floats(0.05, 50)),
    delta=DELTA,
    sample_rate=RATE,
    steps=_mostly(st.integers(0, 300)),
    tolerance=_mostly(st.floats(0.01, 0.5)),
    rdp_orders=_mostly(st.just(ORDERS) | st.just(tuple(ORDERS[3:]))),
)
def test_fuzz_calibrate_noise_multiplier(**kwargs):
    invalid = _invalid(
        kwargs,
        {
            "target_epsilon": _positive,
            "delta": _open_unit,
            "sample_rate": _rate,
            "steps": _steps,
            "tolerance": _open_unit,
            "rdp_orders": _orders,
        },
    )
    if invalid:
        _call(keras_dp.calibrate_noise_multiplier, kwargs, invalid)
        return
    try:
        sigma = keras_dp.calibrate_noise_multiplier(**kwargs)
    except ValueError as error:  # more than the largest multiplier searched
        assert re.match(r"Cannot reach target_epsilon=.*above 10000", str(error))
        return
    assert type(sigma) is float
    if int(kwargs["steps"]) == 0:
        assert sigma == 0.0
        return
    assert accounting.MIN_NOISE_MULTIPLIER <= sigma <= accounting.MAX_NOISE_MULTIPLIER
    segment = {k: kwargs[k] for k in ("sample_rate", "steps", "delta", "rdp_orders")}
    epsilon = keras_dp.compute_epsilon(noise_multiplier=sigma, **segment)
    assert epsilon <= float(kwargs["target_epsilon"])
    # The smallest such multiplier, up to the tolerance.
    if sigma > accounting.MIN_NOISE_MULTIPLIER:
        less = sigma * (1 - float(kwargs["tolerance"])) * 0.999
        assert keras_dp.compute_epsilon(noise_multiplier=less, **segment) > float(
            kwargs["target_epsilon"]
        )


@accounting_only_once
@_fuzz(200)
@given(
    epochs=_or_anything(st.floats(0, 1e4)),
    sample_rate=RATE,
    n=_or_anything(st.integers(-5, 10**12)),
    delta=DELTA,
)
def test_fuzz_steps_default_delta_and_check_delta(epochs, sample_rate, n, delta):
    kwargs = {"epochs": epochs, "sample_rate": sample_rate}
    invalid = _invalid(kwargs, {"epochs": _non_negative, "sample_rate": _rate})
    if not invalid and not math.isfinite(float(epochs) / float(sample_rate)):
        invalid = ["epochs", "sample_rate"]
    steps = _call(accounting.steps_for_epochs, kwargs, invalid)
    if steps is not None:
        exact = float(epochs) / float(sample_rate)
        slack = 1e-6 * max(1.0, exact)
        assert type(steps) is int and exact - slack <= steps < exact + 1 + slack
    n_ok = _int(n, 2, 2**63 - 1)
    default = _call(accounting.default_delta, {"n": n}, [] if n_ok else ["n"])
    if default is not None:
        assert 0 < default < 1 / n
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # delta >= 1 / n
        kwargs = {"delta": delta, "n": n}
        invalid = _invalid(
            kwargs,
            {"delta": _open_unit, "n": _optional(lambda v: _int(v, 1, 2**63 - 1))},
        )
        checked = _call(accounting.check_delta, kwargs, invalid)
    if checked is not None:
        assert checked == float(delta) and type(checked) is float
