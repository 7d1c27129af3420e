"""Every public argument is validated: a table of bad values per argument,
each refused with an error whose message names the argument and shows the
value received; and the validators of `keras_dp.arguments` themselves."""

import math
import re

import keras
import numpy as np
import pytest

import keras_dp
from keras_dp import accounting
from keras_dp import arguments
from keras_dp.data import PoissonSampler

NAN = float("nan")
INF = float("inf")

# Bad values by kind of argument (None is added where it is not allowed).
POSITIVE = [0, 0.0, -1.0, NAN, INF, -INF, True, "1.0", [1.0], np.float32("nan")]
NON_NEGATIVE = [-1e-3, NAN, INF, -INF, True, "1", np.float64(-1.0)]
OPEN_UNIT = [0.0, 1.0, 1.5, -0.1, NAN, INF, True, "0.5"]  # (0, 1)
RATE = [0.0, 1.5, -0.1, NAN, INF, True, "0.5"]  # (0, 1]
POSITIVE_INT = [0, -1, 1.5, 2.0, True, "3", NAN, np.float64(2.0)]
STEPS = [-1, 2.5, True, "3", NAN, INF]  # integral floats are steps too
SEED = [-1, 2**31, 1.5, True, "0", np.float32(1.0)]
BOOL = [1, 0, "True", None, np.int64(1)]


def _tiny_model():
    return keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])


def _dpsgd(**kwargs):
    return keras_dp.DPSGD(learning_rate=0.1, **kwargs)


def _dpsgd_global(**kwargs):
    return keras_dp.DPSGD(clipping="global", **kwargs)


def _dpsgd_target(**kwargs):
    settings = {"target_epsilon": 1.0, "target_delta": 1e-5, "epochs": 1}
    return keras_dp.DPSGD(**{**settings, **kwargs})


def _policy_global(**kwargs):
    return keras_dp.ClippingPolicy(clipping="global", **kwargs)


def _make_private(**kwargs):
    return keras_dp.make_private(**{"model": _tiny_model(), **kwargs})


def _sampler(**kwargs):
    x = np.zeros((20, 2), "float32")
    settings = {"x": x, "y": x[:, :1], "batch_size": 4}
    return PoissonSampler(**{**settings, **kwargs})


def _privacy_budget(**kwargs):
    settings = {"target_epsilon": 1.0, "delta": 1e-5}
    return keras_dp.PrivacyBudget(**{**settings, **kwargs})


def _low_rank(**kwargs):
    return keras_dp.LowRankSparse(**{"model": _tiny_model(), **kwargs})


def _set_clip_group(**kwargs):
    settings = {"layer": keras.layers.Dense(2), "group": "g"}
    return keras_dp.set_clip_group(**{**settings, **kwargs})


def _compute_epsilon(**kwargs):
    settings = {"noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 10}
    return keras_dp.compute_epsilon(**{**settings, "delta": 1e-5, **kwargs})


def _compute_epsilon_pld(**kwargs):
    return _compute_epsilon(accountant="pld", **kwargs)


def _segments(**kwargs):
    settings = {"segments": [(1.0, 0.01, 10)], "delta": 1e-5}
    return accounting.compute_epsilon_for_segments(**{**settings, **kwargs})


def _calibrate(**kwargs):
    settings = {"target_epsilon": 3.0, "delta": 1e-5, "sample_rate": 0.01}
    if "epochs" not in kwargs:
        settings["steps"] = 10
    return keras_dp.calibrate_noise_multiplier(**{**settings, **kwargs})


def _steps_for_epochs(**kwargs):
    settings = {"epochs": 1, "sample_rate": 0.01}
    return accounting.steps_for_epochs(**{**settings, **kwargs})


def _check_delta(**kwargs):
    return accounting.check_delta(**{"delta": 1e-5, **kwargs})


def _privacy_summary(**kwargs):
    return keras_dp.privacy_summary(**{"model": _tiny_model(), **kwargs})


NOT_A_MODEL = [None, 3, "model"]

# (what is called, argument, bad values).
TABLE = [
    (_dpsgd, "l2_norm_clip", POSITIVE + [None]),
    (_dpsgd, "noise_multiplier", NON_NEGATIVE),
    (_dpsgd, "clipping", ["nope", "Flat", 3, None]),
    (_dpsgd, "auto_clip", BOOL),
    (_dpsgd_global, "global_clip_threshold", POSITIVE),
    (_dpsgd, "seed", SEED),
    (_dpsgd, "secure_mode", BOOL),
    (_dpsgd_target, "target_epsilon", POSITIVE),
    (_dpsgd_target, "target_delta", OPEN_UNIT),
    (_dpsgd_target, "epochs", POSITIVE),
    (_dpsgd, "clip_groups", ["per_head", 3, True]),
    (_dpsgd, "clip_thresholds", ["a", [("a", 1.0)], 3]),
    (_dpsgd, "adaptive_clipping", ["yes", 1, 0.5, {"nope": 1.0}]),
    (keras_dp.GaussianNoise, "noise_multiplier", NON_NEGATIVE),
    (keras_dp.GaussianNoise, "seed", SEED),
    (keras_dp.GaussianNoise, "secure_mode", BOOL),
    (keras_dp.AdaptiveClipping, "target_quantile", OPEN_UNIT + [None]),
    (keras_dp.AdaptiveClipping, "learning_rate", POSITIVE + [None]),
    (keras_dp.AdaptiveClipping, "count_stddev_fraction", POSITIVE + [None]),
    (keras_dp.AdaptiveClipping, "count_stddev", NON_NEGATIVE),
    (keras_dp.ClippingPolicy, "l2_norm_clip", POSITIVE + [None]),
    (keras_dp.ClippingPolicy, "clipping", ["nope", "Flat", 3, None]),
    (_policy_global, "global_clip_threshold", POSITIVE),
    (keras_dp.ClippingPolicy, "clip_groups", ["per_head", 3, True]),
    (keras_dp.ClippingPolicy, "clip_thresholds", ["a", [("a", 1.0)], 3]),
    (keras_dp.ClippingPolicy, "adaptive_clipping", ["yes", 1, 0.5, {"nope": 1}]),
    (_make_private, "model", NOT_A_MODEL),
    (_make_private, "microbatch_size", POSITIVE_INT),
    (_make_private, "poisson_sampling", BOOL),
    (_make_private, "sample_rate", RATE),
    (_make_private, "per_example", ["x", "AUTO", 3, None]),
    (_sampler, "batch_size", POSITIVE_INT + [None]),
    (_sampler, "steps_per_epoch", POSITIVE_INT),
    (_sampler, "accumulation_steps", POSITIVE_INT),
    (_sampler, "seed", SEED),
    (_sampler, "secure_mode", BOOL),
    (keras_dp.EpsilonLogger, "delta", OPEN_UNIT),
    (keras_dp.EpsilonLogger, "accountant", ["moments", 3, None]),
    (keras_dp.EpsilonLogger, "every_n_batches", POSITIVE_INT),
    (_privacy_budget, "target_epsilon", POSITIVE + [None]),
    (_privacy_budget, "delta", OPEN_UNIT + [None]),
    (_privacy_budget, "accountant", ["moments", 3, None]),
    (_low_rank, "model", NOT_A_MODEL),
    (_low_rank, "rank", POSITIVE_INT + [None]),
    (_low_rank, "sparsity", [1.0, -0.1, 1.5, NAN, True, "0", None]),
    (_low_rank, "refresh_every", POSITIVE_INT + [None]),
    (_low_rank, "exclude", ["dense", 3, None]),
    (_low_rank, "seed", SEED + [None]),
    (_set_clip_group, "layer", NOT_A_MODEL),
    (_set_clip_group, "group", ["", 3, None, True, ["g"]]),
    (_set_clip_group, "threshold", POSITIVE),
    (_compute_epsilon, "noise_multiplier", NON_NEGATIVE + [None]),
    (_compute_epsilon, "sample_rate", RATE + [None]),
    (_compute_epsilon, "steps", STEPS + [None]),
    (_compute_epsilon, "delta", OPEN_UNIT + [None]),
    (_compute_epsilon, "accountant", ["moments", 3, None]),
    (
        _compute_epsilon,
        "rdp_orders",
        [[], [1.0], [0.5, 2.0], [NAN], [INF], [1e5], [[2.0]], "abc", 3, [True]],
    ),
    (_compute_epsilon_pld, "pld_discretization_interval", POSITIVE + [None]),
    (_segments, "segments", ["abc", 3, None, {"a": 1}]),
    (_segments, "delta", OPEN_UNIT + [None]),
    (_calibrate, "target_epsilon", POSITIVE + [None]),
    (_calibrate, "delta", OPEN_UNIT + [None]),
    (_calibrate, "sample_rate", RATE + [None]),
    (_calibrate, "steps", STEPS),
    (_calibrate, "epochs", NON_NEGATIVE),
    (_calibrate, "tolerance", OPEN_UNIT + [None]),
    (_calibrate, "accountant", ["moments", 3, None]),
    (_calibrate, "prior_segments", ["abc", 3, None]),
    (_steps_for_epochs, "epochs", NON_NEGATIVE + [None]),
    (_steps_for_epochs, "sample_rate", RATE + [None]),
    (accounting.default_delta, "n", [0, 1, -5, 2.5, True, "10", NAN, 2**63, None]),
    (_check_delta, "delta", OPEN_UNIT + [None]),
    (_check_delta, "n", [0, -1, 1.5, True, "10", 2**63]),
    (_privacy_summary, "model", NOT_A_MODEL),
    (_privacy_summary, "delta", OPEN_UNIT),
    (_privacy_summary, "accountant", ["moments", 3, None]),
]

# Bad values whose message names an entry inside the argument: (what,
# argument, value, the name in the message, the value it shows).
NESTED = [
    (_dpsgd, "clip_thresholds", {"a": -1.0}, "clip_thresholds['a']", "=-1.0"),
    (_dpsgd, "clip_thresholds", {"a": NAN}, "clip_thresholds['a']", "=nan"),
    (_dpsgd, "clip_thresholds", {"a": True}, "clip_thresholds['a']", "=True"),
    (_dpsgd, "clip_thresholds", {"a": "1"}, "clip_thresholds['a']", "='1'"),
    (_dpsgd, "clip_thresholds", {3: 1.0}, "clip_thresholds", "key 3"),
    (_dpsgd, "clip_thresholds", {"": 1.0}, "clip_thresholds", "key ''"),
    (_dpsgd, "adaptive_clipping", {"target_quantile": 1.5}, "target_quantile", "1.5"),
    (_low_rank, "exclude", ["dense", ""], "exclude[1]", "=''"),
    (_low_rank, "exclude", [3], "exclude[0]", "=3"),
    (_segments, "segments", [(1.0, 0.01)], "segments[0]", "(1.0, 0.01)"),
    (_segments, "segments", [(-1.0, 0.01, 10)], "segments[0][0]", "=-1.0"),
    (_segments, "segments", [(NAN, 0.01, 10)], "segments[0][0]", "=nan"),
    (_segments, "segments", [(1.0, 0.01, 1), (1.0, 2.0, 10)], "segments[1][1]", "=2.0"),
    (_segments, "segments", [(1.0, 0.01, -1)], "segments[0][2]", "=-1"),
    (_segments, "segments", [(1.0, 0.01, True)], "segments[0][2]", "=True"),
    (_calibrate, "prior_segments", [(1.0, 0.01)], "prior_segments[0]", "(1.0, 0.01)"),
    (_calibrate, "prior_segments", [(1.0, 0.1, 2.5)], "prior_segments[0][2]", "=2.5"),
    (_calibrate, "prior_segments", [(INF, 0.01, 2)], "prior_segments[0][0]", "=inf"),
]


def _rows():
    for call, name, values in TABLE:
        for value in values:
            yield call, name, value, name, repr(value)
    yield from NESTED


# One test over the whole table, reporting every failing row: the suite's
# per-test setup clears the Keras session, which costs more than a row.
def test_every_bad_value_is_refused_naming_the_argument():
    rows = list(_rows())
    assert len(rows) > 400
    failures = []
    for call, argument, value, name, shown in rows:
        # The name in backticks and the value received, in any order.
        pattern = rf"(?s)^(?=.*`{re.escape(name)}`)(?=.*{re.escape(shown)})"
        try:
            with pytest.raises((ValueError, TypeError), match=pattern):
                call(**{argument: value})
        except (AssertionError, pytest.fail.Exception) as error:
            failures.append(f"{call.__name__}({argument}={value!r}): {error}")
    assert not failures, "\n".join(failures)


SAMPLE_WEIGHT_ERRORS = [
    ([1.0] * 19 + [-1.0], r"sample_weight\[19\]=-1\.0 \(1 such"),
    ([NAN] * 20, r"sample_weight\[0\]=nan \(20 such"),
    ([1.0, INF] + [1.0] * 18, r"sample_weight\[1\]=inf"),
    ([1e39] + [1.0] * 19, r"sample_weight\[0\]=inf"),  # beyond float32
    ([1.0] * 19, r"one row per example \(20 rows\).*shape \(19,\)"),
    ("heavy", r"one row per example.*type str"),
    (3.0, r"one row per example.*type float"),
]


def test_poisson_sampler_sample_weights():
    for weights, shown in SAMPLE_WEIGHT_ERRORS:
        with pytest.raises(ValueError, match=rf"(?s)`sample_weight`.*{shown}"):
            _sampler(sample_weight=weights)
    weights = np.arange(20, dtype="float64") / 10
    sampler = _sampler(sample_weight=weights, batch_size=np.int64(4), seed=np.int32(1))
    np.testing.assert_array_equal(sampler.sample_weight, weights.astype("float32"))
    assert sampler.batch_size == 4 and type(sampler.batch_size) is int
    assert sampler.seed == 1


def test_numpy_scalars_are_numbers_and_come_back_as_python_ones():
    optimizer = _dpsgd(
        l2_norm_clip=np.float32(2.0), noise_multiplier=np.float64(0.5), seed=np.int64(3)
    )
    assert (optimizer.l2_norm_clip, optimizer.noise_multiplier) == (2.0, 0.5)
    assert type(optimizer.l2_norm_clip) is float and type(optimizer.seed) is int
    optimizer = _dpsgd_target(target_epsilon=np.float32(2.0), epochs=np.int64(3))
    assert (optimizer.target_epsilon, optimizer.epochs) == (2.0, 3.0)
    assert type(optimizer.target_epsilon) is float
    epsilon = keras_dp.compute_epsilon(
        np.float32(1.0), np.float64(0.01), np.int64(10), np.float64(1e-5)
    )
    assert epsilon == keras_dp.compute_epsilon(1.0, 0.01, 10, 1e-5)
    assert accounting.default_delta(np.int64(1000)) == accounting.default_delta(1000)


def test_accounting_edges():
    with pytest.raises(ValueError, match="exactly one of `steps` and `epochs`"):
        keras_dp.calibrate_noise_multiplier(3.0, 1e-5, 0.01, steps=10, epochs=1)
    with pytest.raises(ValueError, match="`epochs` / `sample_rate`"):
        accounting.steps_for_epochs(1e300, 1e-300)
    with pytest.raises(ValueError, match=r"(?s)noise_multiplier=0\.001.*'rdp'"):
        _compute_epsilon_pld(noise_multiplier=1e-3)
    # dp-accounting's RDP series overflows into NaN for tiny multipliers,
    # which it reports as epsilon 0; sigma**2 overflows for huge ones.
    for sigma in (1e-300, 1e-160, 1e-7):
        assert _compute_epsilon(noise_multiplier=sigma, sample_rate=0.5) == math.inf
    ceiling = accounting.MAX_ACCOUNTED_NOISE_MULTIPLIER
    at_ceiling = _compute_epsilon(noise_multiplier=ceiling, sample_rate=1.0)
    for sigma in (ceiling * 10, 1e155, 1e300):
        assert _compute_epsilon(noise_multiplier=sigma, sample_rate=1.0) == at_ceiling
    floor = accounting.MIN_ACCOUNTED_NOISE_MULTIPLIER
    assert 1e12 < _compute_epsilon(noise_multiplier=floor) < math.inf


# ------------------------------------------------- the validators themselves


def test_kinds_of_error():
    # A value of the wrong kind: an error that is a TypeError and a
    # ValueError (keras_dp raised ValueError for these before).
    for value in (True, False, np.bool_(True), "1", None, [1.0]):
        with pytest.raises(arguments.ArgumentTypeError) as info:
            arguments.finite_number("x", value)
        assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)
    # A number that is not finite: a ValueError only.
    for value in (NAN, INF, -INF, np.float32("inf"), 10**400):
        with pytest.raises(ValueError, match="must be a finite number") as info:
            arguments.finite_number("x", value)
        assert not isinstance(info.value, TypeError)


def test_numbers_and_bounds():
    for value in (np.float16(0.5), np.float32(0.5), np.float64(0.5), np.int8(3), 7):
        result = arguments.finite_number("x", value)
        assert type(result) is float and result == float(value)
    assert arguments.finite_number("x", 0, low=0) == 0.0
    assert arguments.finite_number("x", 1, high=1) == 1.0
    for call, message in [
        (
            lambda: arguments.finite_number("x", 0, low=0, low_open=True),
            r"`x` must be a positive finite number \(> 0\)",
        ),
        (
            lambda: arguments.probability("x", 1.0, high_open=True),
            r"`x` must be in \[0, 1\)",
        ),
        (
            lambda: arguments.probability("x", 0, low_open=True, high_open=True),
            r"`x` must be in the open interval \(0, 1\)",
        ),
        (lambda: arguments.finite_number("x", 1.5, low=2), r"a finite number >= 2\."),
        (
            lambda: arguments.finite_number("x", 3, high=3, high_open=True),
            r"a finite number < 3\.",
        ),
    ]:
        with pytest.raises(ValueError, match=message):
            call()


def test_messages():
    with pytest.raises(ValueError) as info:
        arguments.positive_number("l2_norm_clip", -1.0, hint="the clipping norm")
    assert str(info.value) == (
        "`l2_norm_clip` must be a positive finite number (> 0): the clipping "
        "norm. Received: l2_norm_clip=-1.0."
    )
    with pytest.raises(ValueError) as info:
        arguments.one_of("mode", "x", ("a", "b"), allow_none=True, what="mode")
    assert (
        str(info.value) == "Unknown mode 'x': `mode` must be one of 'a', 'b', or None."
    )
    # Long values are cut short.
    with pytest.raises(ValueError) as info:
        arguments.finite_number("x", list(range(1000)))
    assert len(str(info.value)) < 300 and "..." in str(info.value)


def test_integers_and_seeds():
    assert arguments.integer("n", np.int64(5), low=2) == 5
    assert type(arguments.integer("n", np.int64(5))) is int
    assert arguments.integer("n", 4.0, integral_float=True) == 4
    for value in (4.0, True, np.bool_(False), "4", NAN):
        with pytest.raises(arguments.ArgumentTypeError, match="`n` must be an integer"):
            arguments.integer("n", value)
    with pytest.raises(ValueError, match=r"`n` must be an integer >= 2 and <= 9"):
        arguments.integer("n", 10, low=2, high=9)
    assert arguments.positive_int("k", None, allow_none=True) is None
    assert arguments.seed("seed", arguments.MAX_SEED) == 2**31 - 1
    assert arguments.seed("seed", None) is None
    with pytest.raises(ValueError, match=r"`seed` must be an integer >= 0 and <= "):
        arguments.seed("seed", arguments.MAX_SEED + 1)


def test_booleans_strings_choices_and_instances():
    assert arguments.boolean("flag", np.bool_(True)) is True
    with pytest.raises(arguments.ArgumentTypeError, match="`flag` must be True or"):
        arguments.boolean("flag", 1)
    assert arguments.non_empty_string("group", "g") == "g"
    with pytest.raises(ValueError, match="`group` must be a non-empty string"):
        arguments.non_empty_string("group", "")
    assert arguments.one_of("mode", np.str_("b"), ("a", "b")) == "b"
    with pytest.raises(arguments.ArgumentTypeError, match="one of 'a', 'b'"):
        arguments.one_of("mode", 1, ("a", "b"))
    assert arguments.one_of("mode", None, ("a",), allow_none=True) is None
    with pytest.raises(arguments.ArgumentTypeError, match=r"model=3 \(an int\)"):
        arguments.instance_of("model", 3, keras.Model, "a keras.Model")
