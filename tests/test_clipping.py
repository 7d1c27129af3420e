"""Unit tests of keras_dp.clipping against independent numpy references.

The three clipping modes of docs/algorithms.md, "Clip factors": flat,
automatic (AUTO-S) and global.
"""

import numpy as np
import pytest
from keras import ops

import keras_dp
from keras_dp import clipping


def _np(x):
    return np.asarray(ops.convert_to_numpy(x))


def _random_grads(rng, batch, shapes):
    """Per-example gradients: one `(batch,) + shape` array per variable."""
    return [
        rng.standard_normal((batch,) + tuple(shape)).astype("float32")
        for shape in shapes
    ]


def _np_norms(grads):
    """Norm of each example's concatenated, flattened gradient (float64)."""
    batch = grads[0].shape[0]
    flat = np.concatenate(
        [np.asarray(g, np.float64).reshape(batch, -1) for g in grads], axis=1
    )
    return np.linalg.norm(flat, axis=1)


def _grads_with_norms(rng, norms, shapes):
    """Random directions scaled so example i has total norm `norms[i]`."""
    grads = _random_grads(rng, len(norms), shapes)
    current = _np_norms(grads)
    scale = np.asarray(norms, np.float64) / current
    return [
        (g * scale.reshape((-1,) + (1,) * (g.ndim - 1))).astype("float32")
        for g in grads
    ]


# Shapes of different ranks: a scalar variable (rank 0), a vector, a matrix
# and a rank-3 kernel; with the batch axis they are ranks 1 to 4.
SHAPES = [(), (5,), (3, 4), (2, 3, 2)]

# float32 relative rounding is ~6e-8 per op; a few ops plus the float64
# references give errors well under 1e-5.
RTOL = 1e-5


# ---------------------------------------------------------------------------
# Flat clipping.


def test_flat_factors_match_numpy():
    norms = np.array(
        [0.0, 1e-8, 1e-3, 0.05, 0.1, 0.5, 1.0, 3.4999, 3.5, 3.6, 10.0, 1e6, 1e20, 1e30],
        dtype="float32",
    )
    for clip in (0.1, 1.0, 3.5):
        expected = np.minimum(1.0, clip / (norms.astype(np.float64) + 1e-6))
        factors = _np(clipping.clip_factors(norms, "flat", clip))
        assert factors.shape == norms.shape
        np.testing.assert_allclose(
            factors, expected, rtol=RTOL, atol=0, err_msg=f"C={clip}"
        )
        # Zero norm: nothing to clip, factor exactly 1.
        assert factors[0] == 1.0
        # Clipped norms never exceed C (up to float32 rounding).
        assert np.all(factors * norms.astype(np.float64) <= clip * (1 + 1e-6))


def test_flat_clipped_gradients_have_norm_at_most_clip():
    rng = np.random.default_rng(0)
    norms = np.array([0.0, 0.3, 0.999, 1.0, 1.5, 40.0, 1e6], np.float64)
    grads = _grads_with_norms(rng, np.where(norms == 0, 1.0, norms), SHAPES)
    grads = [g * (norms != 0).reshape((-1,) + (1,) * (g.ndim - 1)) for g in grads]
    grads = [g.astype("float32") for g in grads]
    factors = _np(clipping.clip_factors(clipping.per_example_norms(grads), "flat", 1.0))
    clipped = [g * factors.reshape((-1,) + (1,) * (g.ndim - 1)) for g in grads]
    clipped_norms = _np_norms(clipped)
    # Small gradients are untouched (factor min(1, ...) = 1 up to 1e-6 shift).
    np.testing.assert_allclose(clipped_norms[:3], norms[:3], rtol=RTOL)
    # Large ones land on C.
    np.testing.assert_allclose(clipped_norms[4:], 1.0, rtol=RTOL)
    assert np.all(clipped_norms <= 1.0 + 1e-5)


# ---------------------------------------------------------------------------
# Automatic clipping, AUTO-S.


def test_auto_factors_match_numpy():
    norms = np.array([0.0, 1e-8, 1e-3, 0.01, 1.0, 7.0, 1e4, 1e8], dtype="float32")
    for radius in (1.0, 0.25, 100.0):
        expected = radius / (norms.astype(np.float64) + 0.01)
        factors = _np(clipping.clip_factors(norms, "auto", radius))
        np.testing.assert_allclose(
            factors, expected, rtol=RTOL, atol=0, err_msg=f"R={radius}"
        )


def _auto_clipped_norms(grads, radius):
    """Factors and ||c_i g_i|| of each example, formed by the library."""
    batch = grads[0].shape[0]
    norms = clipping.per_example_norms(grads)
    factors = clipping.clip_factors(norms, "auto", radius)
    per_example = []
    for i in range(batch):
        # weighted_sum with the factors masked to example i gives c_i g_i.
        mask = np.zeros(batch, "float32")
        mask[i] = 1.0
        clipped = clipping.weighted_sum(grads, factors * ops.convert_to_tensor(mask))
        per_example.append(_np_norms([_np(c)[None] for c in clipped])[0])
    return _np(factors).astype(np.float64), np.array(per_example)


def test_auto_clipped_norm_below_radius():
    rng = np.random.default_rng(1)
    base = _random_grads(rng, 6, SHAPES)
    for radius in (1.0, 100.0):
        for scale in (1e8, 1e-8, 0.0, 1.0):
            msg = f"R={radius}, scale={scale}"
            grads = [g * np.float32(scale) for g in base]
            factors, per_example = _auto_clipped_norms(grads, radius)
            n = _np_norms(grads)
            exact = radius * n / (n + 0.01)
            if scale == 1e8:
                # ||g|| ~ 5e8: n / (n + 0.01) rounds to 1 in float32, so the
                # clipped norm is R up to float32 rounding (relative ~1e-7);
                # the bound holds exactly in real arithmetic.
                assert np.all(per_example <= radius * (1 + 1e-6)), msg
                np.testing.assert_allclose(per_example, radius, rtol=1e-6, err_msg=msg)
            else:
                assert np.all(per_example < radius), msg
                np.testing.assert_allclose(
                    per_example, exact, rtol=RTOL, atol=1e-30, err_msg=msg
                )
            if scale == 0.0:
                assert np.all(per_example == 0.0), msg
                # The factor of a zero gradient is R / gamma, finite.
                np.testing.assert_allclose(
                    factors, radius / 0.01, rtol=RTOL, err_msg=msg
                )
            if scale == 1e-8:
                # Tiny gradients are scaled up by ~R / gamma, still < R.
                np.testing.assert_allclose(
                    factors, radius / (n + 0.01), rtol=RTOL, err_msg=msg
                )


# ---------------------------------------------------------------------------
# Global clipping.


def test_global_factors_are_zero_or_r_over_z():
    for radius, threshold in [(1.0, 2.5), (3.0, 0.5), (1.0, 0.1)]:
        msg = f"R={radius}, Z={threshold}"
        z = np.float32(threshold)
        norms = np.array(
            [0.0, 1e-6, 0.5 * z, z, z * np.float32(1 + 1e-6), 2 * z, 1e30],
            dtype="float32",
        )
        # The norm Z*(1+1e-6) must really be above Z in float32.
        assert norms[4] > norms[3]
        factors = _np(clipping.clip_factors(norms, "global", radius, threshold))
        keep = np.float32(radius / threshold)
        assert set(np.unique(factors).tolist()) <= {0.0, float(keep)}, msg
        # Norms up to and including Z are kept with R/Z.
        np.testing.assert_allclose(factors[:4], keep, rtol=1e-7, err_msg=msg)
        # Anything above Z, even by a relative 1e-6, gives exactly 0.
        assert np.all(factors[4:] == 0.0), msg


def test_global_threshold_defaults_to_radius():
    radius = 2.0
    norms = np.array([0.0, 1.0, 2.0, 2.0 * (1 + 1e-6), 3.0], "float32")
    default = _np(clipping.clip_factors(norms, "global", radius))
    explicit = _np(clipping.clip_factors(norms, "global", radius, radius))
    np.testing.assert_array_equal(default, explicit)
    np.testing.assert_array_equal(default, [1.0, 1.0, 1.0, 0.0, 0.0])
    # The optimizer forwards the default too.
    opt = keras_dp.DPSGD(clipping="global", l2_norm_clip=radius)
    np.testing.assert_array_equal(_np(opt.clip_factors(norms)), default)


def test_global_clipped_sum_matches_numpy():
    rng = np.random.default_rng(2)
    for radius, threshold in [(1.0, 2.0), (0.5, 3.0), (2.0, None)]:
        msg = f"R={radius}, Z={threshold}"
        z = radius if threshold is None else threshold
        # Norms clearly on either side of Z (5% margin: far from rounding),
        # and one zero gradient.
        norms = np.concatenate(
            [rng.uniform(0.05, 0.95, 7) * z, rng.uniform(1.05, 3.0, 5) * z, [0.0]]
        )
        rng.shuffle(norms)
        grads = _grads_with_norms(rng, np.where(norms == 0, 1.0, norms), SHAPES)
        grads = [
            (g * (norms != 0).reshape((-1,) + (1,) * (g.ndim - 1))).astype("float32")
            for g in grads
        ]
        lib_norms = clipping.per_example_norms(grads)
        np.testing.assert_allclose(
            _np(lib_norms), norms, rtol=RTOL, atol=1e-6, err_msg=msg
        )
        factors = clipping.clip_factors(lib_norms, "global", radius, threshold)
        clipped_sum = clipping.weighted_sum(grads, factors)

        kept = norms <= z
        assert 0 < kept.sum() < len(norms)
        for g, s in zip(grads, clipped_sum):
            expected = (radius / z) * np.asarray(g, np.float64)[kept].sum(axis=0)
            assert _np(s).shape == g.shape[1:]
            np.testing.assert_allclose(
                _np(s), expected, rtol=1e-4, atol=1e-5, err_msg=msg
            )


# ---------------------------------------------------------------------------
# Norms and sums.


def test_per_example_norms_over_mixed_ranks_match_numpy():
    rng = np.random.default_rng(3)
    grads = _random_grads(rng, 9, SHAPES)
    assert sorted(g.ndim for g in grads) == [1, 2, 3, 4]
    norms = _np(clipping.per_example_norms(grads))
    assert norms.shape == (9,)
    np.testing.assert_allclose(norms, _np_norms(grads), rtol=RTOL)
    squared = clipping.per_example_squared_norms(grads)
    for g, s in zip(grads, squared):
        expected = (np.asarray(g, np.float64).reshape(9, -1) ** 2).sum(axis=1)
        np.testing.assert_allclose(_np(s), expected, rtol=RTOL)


def test_per_example_norms_single_variable_and_zeros():
    grads = [np.zeros((4, 3), "float32")]
    np.testing.assert_array_equal(_np(clipping.per_example_norms(grads)), 0.0)
    grads = [np.array([[3.0, 4.0], [0.0, 0.0], [-6.0, 8.0]], "float32")]
    np.testing.assert_allclose(
        _np(clipping.per_example_norms(grads)), [5.0, 0.0, 10.0], rtol=RTOL
    )


def test_weighted_sum_matches_numpy():
    rng = np.random.default_rng(4)
    grads = _random_grads(rng, 7, SHAPES)
    factors = rng.uniform(-1, 2, 7).astype("float32")
    result = clipping.weighted_sum(grads, factors)
    assert len(result) == len(grads)
    for g, r in zip(grads, result):
        expected = np.tensordot(
            factors.astype(np.float64), g.astype(np.float64), axes=1
        )
        assert _np(r).shape == g.shape[1:]
        np.testing.assert_allclose(_np(r), expected, rtol=1e-5, atol=1e-5)


def test_weighted_sum_with_one_factor_vector_per_variable():
    rng = np.random.default_rng(5)
    grads = _random_grads(rng, 5, SHAPES)
    factors = [rng.uniform(0, 1, 5).astype("float32") for _ in grads]
    result = clipping.weighted_sum(grads, factors)
    for g, f, r in zip(grads, factors, result):
        expected = sum(f[i] * g[i].astype(np.float64) for i in range(5))
        np.testing.assert_allclose(_np(r), expected, rtol=1e-5, atol=1e-5)


def test_sensitivity_is_clip_in_every_mode():
    assert clipping.sensitivity(2.5) == 2.5
    for mode, kwargs in [
        ("flat", {}),
        ("auto", {}),
        ("global", {"global_clip_threshold": 7.0}),
    ]:
        opt = keras_dp.DPSGD(
            clipping=mode, l2_norm_clip=2.5, noise_multiplier=1.2, **kwargs
        )
        assert opt.sensitivity == 2.5
        assert opt.noise_stddev == pytest.approx(1.2 * 2.5)


# ---------------------------------------------------------------------------
# Validation errors.


def test_validate_clipping_accepts_valid_settings():
    clipping.validate_clipping("flat", 1.0, None)
    clipping.validate_clipping("auto", 0.5, None)
    clipping.validate_clipping("global", 1.0, 3.0)
    clipping.validate_clipping("global", 1.0, None)


VALIDATE_ERRORS = [
    (("nope", 1.0, None), "Unknown clipping mode 'nope'"),
    (("Flat", 1.0, None), "Unknown clipping mode"),
    (("flat", 0.0, None), "l2_norm_clip.*positive"),
    (("flat", -1.0, None), "l2_norm_clip.*positive"),
    (("auto", None, None), "l2_norm_clip.*positive"),
    (("global", float("nan"), None), "l2_norm_clip.*positive"),
    (("flat", 1.0, 2.0), "global_clip_threshold.*only applies"),
    (("auto", 1.0, 2.0), "global_clip_threshold.*only applies"),
    (("global", 1.0, 0.0), r"`global_clip_threshold` must be a positive finite"),
    (("global", 1.0, -2.0), r"global_clip_threshold.*\(> 0\).*Z of"),
]


def test_validate_clipping_errors():
    for args, match in VALIDATE_ERRORS:
        with pytest.raises(ValueError, match=match):
            clipping.validate_clipping(*args)


def test_clip_factors_unknown_mode():
    with pytest.raises(ValueError, match="Unknown clipping mode 'median'"):
        clipping.clip_factors(np.ones(3, "float32"), "median", 1.0)


CONSTRUCTOR_ERRORS = [
    ({"clipping": "adaptive"}, "Unknown clipping mode 'adaptive'"),
    ({"l2_norm_clip": 0.0}, "l2_norm_clip.*positive"),
    ({"l2_norm_clip": -3.0}, "l2_norm_clip.*positive"),
    (
        {"clipping": "flat", "global_clip_threshold": 2.0},
        "global_clip_threshold.*only applies",
    ),
    (
        {"auto_clip": True, "global_clip_threshold": 2.0},
        "global_clip_threshold.*only applies",
    ),
    ({"noise_multiplier": -0.1}, "noise_multiplier.*non-negative"),
    ({"noise_multiplier": "1.0"}, "noise_multiplier.*non-negative"),
    (
        {"auto_clip": True, "clipping": "global"},
        "auto_clip=True.*conflicts with clipping='global'",
    ),
    ({"loss_scale_factor": 128.0}, "loss_scale_factor.*not supported"),
    ({"seed": 1.5}, "seed.*must be an integer"),
]


def test_optimizer_constructor_errors():
    for cls in (keras_dp.DPSGD, keras_dp.DPAdam):
        for kwargs, match in CONSTRUCTOR_ERRORS:
            with pytest.raises(ValueError, match=match):
                cls(learning_rate=0.1, **kwargs)


def test_auto_clip_sets_auto_mode():
    assert keras_dp.DPSGD(auto_clip=True).clipping == "auto"
    assert keras_dp.DPSGD(auto_clip=True, clipping="auto").clipping == "auto"
    assert keras_dp.DPSGD().clipping == "flat"
    assert keras_dp.DPSGD().l2_norm_clip == 1.0
