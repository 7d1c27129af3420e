"""Group-wise clipping (docs/algorithms.md): groups as layer metadata.

References are brute force: one `jax.grad` / `tf.GradientTape` /
`torch.autograd.grad` per example, then each group of each example's
gradient clipped on its own in numpy. Statistical checks use fixed seeds;
their tolerances are stated next to them.
"""

import math

import keras
import numpy as np
import pytest

import keras_dp
from keras_dp import backend as backend_lib
from keras_dp import clipping as clipping_lib
from keras_dp import groups as groups_lib
from keras_dp import per_example

FEATURES = 5


# ------------------------------------------------------------------ helpers


def build_model(seed=0, nested=False):
    """`encoder` (one Dense, or a nested model of two) + `head`."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((FEATURES,))
    if nested:
        sub_in = keras.Input((FEATURES,))
        sub_h = keras.layers.Dense(6, activation="tanh", name="inner_a")(sub_in)
        sub_out = keras.layers.Dense(4, activation="tanh", name="inner_b")(sub_h)
        encoder = keras.Model(sub_in, sub_out, name="encoder")
        hidden = encoder(inputs)
    else:
        hidden = keras.layers.Dense(6, activation="tanh", name="encoder")(inputs)
    hidden = keras.layers.Dense(4, activation="relu", name="middle")(hidden)
    outputs = keras.layers.Dense(2, name="head")(hidden)
    return keras.Model(inputs, outputs)


def make_data(n=12, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(n, FEATURES)) * rng.uniform(0.2, 3, (n, 1))).astype("float32")
    y = rng.normal(size=(n, 2)).astype("float32")
    return x, y


def brute_force_grads(model, x, y):
    """Per-example gradients (mse), one autodiff call per example."""
    out = []
    if keras.backend.backend() == "jax":
        import jax

        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]

        def loss_of(params, xi, yi):
            pred, _ = model.stateless_call(params, non_trainable, xi)
            return keras.ops.mean(keras.ops.square(pred - yi))

        grad = jax.jit(jax.grad(loss_of))
        for i in range(len(x)):
            gs = grad(trainable, x[i : i + 1], y[i : i + 1])
            out.append([np.asarray(g, dtype="float64") for g in gs])
    elif keras.backend.backend() == "torch":
        import torch

        variables = model.trainable_variables
        for i in range(len(x)):
            with torch.enable_grad():
                pred = model(x[i : i + 1])
                target = keras.ops.convert_to_tensor(y[i : i + 1])
                loss = keras.ops.mean(keras.ops.square(pred - target))
                gs = torch.autograd.grad(
                    loss, [v.value for v in variables], allow_unused=True
                )
            out.append(
                [
                    np.zeros(tuple(v.shape))
                    if g is None
                    else g.detach().cpu().to(torch.float64).numpy()
                    for v, g in zip(variables, gs)
                ]
            )
    else:
        import tensorflow as tf

        for i in range(len(x)):
            with tf.GradientTape() as tape:
                pred = model(x[i : i + 1])
                loss = tf.reduce_mean(tf.square(pred - y[i : i + 1]))
            gs = tape.gradient(loss, model.trainable_variables)
            out.append([np.asarray(g, dtype="float64") for g in gs])
    return out


def reference_factors(norms, clipping, C, Z=None):
    norms = np.asarray(norms, dtype="float64")
    if clipping == "flat":
        return np.minimum(1.0, C / (norms + 1e-6))
    if clipping == "auto":
        return C / (norms + 0.01)
    Z = C if Z is None else Z
    return np.where(norms <= Z, C / Z, 0.0)


def brute_force_group_clip(grads, group_of, thresholds, clipping, z_ratio=1.0):
    """Clipped per-example gradients: each group clipped on its own."""
    clipped = []
    for example in grads:
        sq = {}
        for g, k in zip(example, group_of):
            sq[k] = sq.get(k, 0.0) + float(np.sum(g**2))
        factors = {
            k: float(
                reference_factors(
                    math.sqrt(s), clipping, thresholds[k], thresholds[k] * z_ratio
                )
            )
            for k, s in sq.items()
        }
        clipped.append([g * factors[k] for g, k in zip(example, group_of)])
    return clipped


def private(model, optimizer, path="vmap"):
    model = keras_dp.make_private(model)
    # "vmap": the general path; "auto": the fast path when it applies.
    model._keras_dp.per_example = path
    model.compile(optimizer=optimizer, loss="mse")
    optimizer.build_for_model(model)
    return model


def library_clipped_sum(model, optimizer, x, y, microbatch_size=None):
    """`clipped_sum` and `clip_counts` of `per_example.clipped_gradient_sum`."""
    module = backend_lib.get_backend_module()

    def fn(trainable, non_trainable, x, y):
        result = per_example.clipped_gradient_sum(
            model,
            optimizer.step_clipping(),
            module,
            trainable,
            non_trainable,
            x,
            y,
            microbatch_size=microbatch_size,
        )
        return {k: result.get(k) for k in ("clipped_sum", "clip_counts")}

    if keras.backend.backend() == "jax":
        import jax

        fn = jax.jit(fn)  # eager op-by-op dispatch is slow on JAX
    return fn(
        [keras.ops.convert_to_tensor(v.value) for v in model.trainable_variables],
        [keras.ops.convert_to_tensor(v.value) for v in model.non_trainable_variables],
        x,
        y,
    )


# ------------------------------------------------------ group assignment


def test_modes_assign_variables_to_groups():
    model = build_model(nested=True)
    keras_dp.set_clip_group(model.get_layer("encoder"), "body", threshold=1.0)
    keras_dp.set_clip_group(
        model.get_layer("encoder").get_layer("inner_b"), "inner", threshold=0.3
    )
    keras_dp.set_clip_group(model.get_layer("head"), "head")
    variables = model.trainable_variables
    layers_mode = groups_lib.resolve_groups("layers", variables, model)
    names = [layers_mode.names[k] for k in layers_mode.variable_groups]
    # inner_a (kernel, bias) inherit "body"; inner_b overrides; middle is
    # unnamed.
    assert names == [
        "body",
        "body",
        "inner",
        "inner",
        "default",
        "default",
        "head",
        "head",
    ]
    assert layers_mode.thresholds == {"body": 1.0, "inner": 0.3}
    # Default mode follows the metadata.
    assert groups_lib.resolve_groups(None, variables, model).names == (
        layers_mode.names
    )
    per_layer = groups_lib.resolve_groups("per_layer", variables, model)
    assert per_layer.names == ["encoder/inner_a", "encoder/inner_b", "middle", "head"]
    per_variable = groups_lib.resolve_groups("per_variable", variables, model)
    assert per_variable.num_groups == len(variables)
    flat = groups_lib.resolve_groups("flat", variables, model)
    assert flat.num_groups == 1
    # Without a distribution every device holds a whole replica.
    assert groups_lib.resolve_groups("per_device", variables).num_groups == 1


def test_thresholds_equal_split_and_sensitivity():
    model = build_model()
    opt = keras_dp.DPSGD(l2_norm_clip=2.0, clip_groups="per_layer")
    private(model, opt)
    assert opt.clip_group_names == ["encoder", "middle", "head"]
    for c in opt.group_thresholds.values():
        assert c == pytest.approx(2.0 / math.sqrt(3))
    assert opt.sensitivity == pytest.approx(2.0)
    assert opt.noise_stddev == pytest.approx(opt.noise_multiplier * 2.0)

    model = build_model()
    keras_dp.set_clip_group(model.get_layer("encoder"), "body", threshold=1.0)
    keras_dp.set_clip_group(model.get_layer("head"), "head", threshold=0.5)
    opt = keras_dp.DPSGD(l2_norm_clip=3.0, clip_thresholds={"default": 2.0})
    private(model, opt)
    assert opt.group_thresholds == {"body": 1.0, "default": 2.0, "head": 0.5}
    assert opt.sensitivity == pytest.approx(math.sqrt(1 + 4 + 0.25))


def test_invalid_settings_fail_clearly():
    with pytest.raises(ValueError, match="clip_groups"):
        keras_dp.DPSGD(clip_groups="per_head")
    with pytest.raises(ValueError, match="flat"):
        keras_dp.DPSGD(auto_clip=True, adaptive_clipping=True)
    with pytest.raises(ValueError, match="positive"):
        keras_dp.set_clip_group(keras.layers.Dense(2), "a", threshold=-1)
    model = build_model()
    keras_dp.set_clip_group(model.get_layer("encoder"), "g", threshold=1.0)
    keras_dp.set_clip_group(model.get_layer("head"), "g", threshold=2.0)
    with pytest.raises(ValueError, match="two thresholds"):
        private(model, keras_dp.DPSGD())
    model = build_model()
    with pytest.raises(ValueError, match="nope"):
        private(
            model,
            keras_dp.DPSGD(clip_groups="per_layer", clip_thresholds={"nope": 1.0}),
        )
    # Not bound to a model: a clear message, not a silent flat clip.
    opt = keras_dp.DPSGD(clip_groups="per_layer")
    with pytest.raises(RuntimeError, match="bind_clip_groups"):
        opt.variable_clip_factors([keras.ops.ones((3,))])


# ------------------------------------------------- against brute force


CASES = [
    # (mode, clipping, l2_norm_clip, layer thresholds, global Z)
    ("per_layer", "flat", 1.0, None, None),
    ("per_variable", "flat", 0.7, None, None),
    ("layers", "flat", 1.0, {"encoder": ("body", 0.6), "head": ("head", 0.2)}, None),
    ("per_layer", "auto", 1.0, None, None),
    ("layers", "global", 1.0, {"encoder": ("body", 1.5)}, 2.0),
    ("flat", "flat", 0.5, None, None),
]


# "vmap": the general path; "auto": the fast (ghost norm) path where it
# applies, on a subset of cases to keep the suite short.
CASES_AND_PATHS = [(case, "vmap") for case in CASES] + [
    (CASES[0], "auto"),
    (CASES[2], "auto"),
    (CASES[4], "auto"),
]


@pytest.mark.parametrize(
    "case,path",
    CASES_AND_PATHS,
    ids=lambda c: c if isinstance(c, str) else f"{c[0]}-{c[1]}",
)
def test_clipped_sum_matches_brute_force(case, path):
    mode, clipping, C, layer_groups, Z = case
    model = build_model(seed=3)
    for name, (group, threshold) in (layer_groups or {}).items():
        keras_dp.set_clip_group(model.get_layer(name), group, threshold)
    opt = keras_dp.DPSGD(
        l2_norm_clip=C,
        clipping=clipping,
        global_clip_threshold=Z,
        clip_groups=mode,
    )
    private(model, opt, path)
    x, y = make_data(n=12, seed=5)
    assignment = opt.clipping_policy.assignment
    thresholds = opt.group_thresholds
    group_of = [assignment.names[k] for k in assignment.variable_groups]
    grads = brute_force_grads(model, x, y)
    z_ratio = (Z or C) / C
    expected = brute_force_group_clip(grads, group_of, thresholds, clipping, z_ratio)
    bound = math.sqrt(sum(c**2 for c in thresholds.values()))
    assert opt.sensitivity == pytest.approx(bound)
    # The optimizer's own factors, on the brute-force gradients.
    sq = [
        keras.ops.convert_to_tensor(
            np.array([np.sum(g[v] ** 2) for g in grads], dtype="float32")
        )
        for v in range(len(group_of))
    ]
    factors = [keras.ops.convert_to_numpy(f) for f in opt.variable_clip_factors(sq)]
    for i, example in enumerate(grads):
        clipped_norm = math.sqrt(
            sum(float(np.sum((g * factors[v][i]) ** 2)) for v, g in enumerate(example))
        )
        # Concatenated clipped gradient never exceeds sqrt(sum C_k^2).
        assert clipped_norm <= bound * (1 + 1e-5)
        ref_norm = math.sqrt(sum(float(np.sum(g**2)) for g in expected[i]))
        assert clipped_norm == pytest.approx(ref_norm, rel=1e-4, abs=1e-6)
    # The library's clipped sum (vmap or fast path, microbatched too).
    total = [sum(e[v] for e in expected) for v in range(len(group_of))]
    for microbatch in (None, 5):
        result = library_clipped_sum(model, opt, x, y, microbatch)
        for got, want in zip(result["clipped_sum"], total):
            np.testing.assert_allclose(
                keras.ops.convert_to_numpy(got), want, rtol=2e-4, atol=2e-5
            )


def test_one_group_keeps_flat_behaviour():
    """clip_groups="flat" (and the default) is the old flat clip."""
    model = build_model(seed=1)
    opt = keras_dp.DPSGD(l2_norm_clip=0.3)
    private(model, opt)
    assert not opt.step_clipping()._is_grouped()
    sq = [keras.ops.convert_to_tensor(np.array([1.0, 4.0, 0.01], "float32"))] * 2
    factors = opt.variable_clip_factors(sq)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(factors[0]),
        keras.ops.convert_to_numpy(opt.clip_factors(clipping_lib.total_norms(sq))),
    )
    assert opt.sensitivity == 0.3


# ----------------------------------------------------------------- noise


def _one_step_update(model, opt, x, y, weights):
    model.set_weights(weights)
    model.train_on_batch(x, y)
    return np.concatenate(
        [np.ravel(w) - np.ravel(w0) for w, w0 in zip(model.get_weights(), weights)]
    )


def test_noise_std_is_sigma_times_group_sensitivity():
    """std of the noise on the averaged gradient = sigma sqrt(sum C_k^2) / B.

    Over d ~ 3000 coordinates the sample std has relative standard error
    1/sqrt(2d) ~ 1.3%; the tolerance is 6% (over 4 standard errors).
    """
    keras.utils.set_random_seed(0)
    inputs = keras.Input((40,))
    hidden = keras.layers.Dense(50, activation="tanh", name="encoder")(inputs)
    outputs = keras.layers.Dense(20, name="head")(hidden)
    base = keras.Model(inputs, outputs)
    keras_dp.set_clip_group(base.get_layer("encoder"), "body", threshold=1.0)
    keras_dp.set_clip_group(base.get_layer("head"), "head", threshold=0.5)
    x = np.random.default_rng(0).normal(size=(16, 40)).astype("float32")
    y = np.zeros((16, 20), "float32")
    weights = base.get_weights()
    updates = {}
    for sigma in (0.0, 2.0):
        model = keras.models.clone_model(base)
        opt = keras_dp.DPSGD(learning_rate=1.0, noise_multiplier=sigma, seed=3)
        private(model, opt)
        updates[sigma] = _one_step_update(model, opt, x, y, weights)
    assert opt.clip_group_names == ["body", "head"]
    noise = updates[2.0] - updates[0.0]
    expected = 2.0 * math.sqrt(1.0**2 + 0.5**2) / 16
    assert np.std(noise) == pytest.approx(expected, rel=0.06)
    assert abs(np.mean(noise)) < 4 * expected / math.sqrt(noise.size)


# ------------------------------------------------------ adaptive clipping


def test_adaptive_noise_multiplier_formula_and_error():
    sigma_g = clipping_lib.adaptive_noise_multipliers(1.0, 5.0, 4)
    assert sigma_g == pytest.approx((1.0 - 4 * (10.0) ** -2) ** -0.5)
    # Gradient and counts together spend exactly sigma.
    assert sigma_g**-2 + 4 * (2 * 5.0) ** -2 == pytest.approx(1.0)
    assert clipping_lib.adaptive_noise_multipliers(0.0, 5.0, 4) == 0.0
    with pytest.raises(ValueError, match="too large"):
        clipping_lib.adaptive_noise_multipliers(5.0, 5.0, 4)  # limit 5.0
    opt = keras_dp.DPSGD(noise_multiplier=3.0, adaptive_clipping=True)
    # B = 32: sigma_b = 1.6, limit 3.2 for one group.
    assert opt.gradient_noise_multiplier(32) > 3.0
    with pytest.raises(ValueError, match="too large"):
        opt.gradient_noise_multiplier(20)


def test_adaptive_training_with_too_large_sigma_fails_clearly():
    model = build_model()
    opt = keras_dp.DPSGD(noise_multiplier=10.0, adaptive_clipping=True)
    private(model, opt)
    x, y = make_data(n=16)
    with pytest.raises(ValueError, match="too large"):
        model.train_on_batch(x, y)


def test_centred_count_neighbouring_batches():
    """Adding one example moves each centred count by exactly 1/2."""
    model = build_model(seed=2)
    keras_dp.set_clip_group(model.get_layer("encoder"), "body", threshold=0.3)
    opt = keras_dp.DPSGD(adaptive_clipping=True)
    private(model, opt)
    x, y = make_data(n=9, seed=4)
    full = library_clipped_sum(model, opt, x, y)["clip_counts"]
    smaller = library_clipped_sum(model, opt, x[:-1], y[:-1])["clip_counts"]
    diff = np.abs(keras.ops.convert_to_numpy(full - smaller))
    np.testing.assert_allclose(diff, 0.5)
    # Microbatch padding rows (zero weight) count for nothing.
    padded = library_clipped_sum(model, opt, x, y, microbatch_size=4)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(padded["clip_counts"]),
        keras.ops.convert_to_numpy(full),
    )
    # Direct: mask 0 rows are ignored, each real row is +-1/2.
    sq = [keras.ops.convert_to_tensor(np.array([0.0, 1.0, 100.0], "float32"))]
    opt2 = keras_dp.DPSGD(adaptive_clipping=True, clip_groups="per_variable")
    opt2.clipping_policy.resolve([model.trainable_variables[0]], None)
    counts = opt2.step_clipping().clip_counts(
        sq, keras.ops.convert_to_tensor([1.0, 1.0, 0.0])
    )
    assert float(keras.ops.convert_to_numpy(counts)[0]) == pytest.approx(1.0)


def test_adaptive_thresholds_converge_to_group_medians():
    """sigma_b = 0, sigma = 0, no parameter updates: C_k -> median_k.

    Full-batch steps on fixed data (an odd number of examples), so each
    group's norms are fixed: once near the median, a step moves C_k by the
    factor exp(+-0.3 / 66) ~ 1 -+ 0.5%, across the median. Tolerance: 3%.
    """
    model = build_model(seed=4)
    keras_dp.set_clip_group(model.get_layer("encoder"), "body", threshold=5.0)
    keras_dp.set_clip_group(model.get_layer("head"), "head", threshold=0.01)
    opt = keras_dp.DPSGD(
        learning_rate=0.0,
        noise_multiplier=0.0,
        adaptive_clipping=keras_dp.AdaptiveClipping(
            target_quantile=0.5, learning_rate=0.3, count_stddev=0.0
        ),
    )
    private(model, opt)
    x, y = make_data(n=33, seed=6)
    grads = brute_force_grads(model, x, y)
    assignment = opt.clipping_policy.assignment
    medians = {}
    for k, name in enumerate(assignment.names):
        norms = [
            math.sqrt(
                sum(
                    np.sum(g[v] ** 2)
                    for v, gk in enumerate(assignment.variable_groups)
                    if gk == k
                )
            )
            for g in grads
        ]
        medians[name] = float(np.median(norms))
    logs = None
    for _ in range(120):
        logs = model.train_on_batch(x, y, return_dict=True)
    thresholds = opt.group_thresholds
    for name, median in medians.items():
        assert thresholds[name] == pytest.approx(median, rel=0.03), name
        # The train step logs the thresholds.
        assert float(logs[f"clip_threshold/{name}"]) == pytest.approx(
            thresholds[name], rel=1e-5
        )


@pytest.mark.parametrize("microbatch_size", [None, 4])
def test_adaptive_clipping_on_the_fast_path_equals_the_vmap_path(microbatch_size):
    """Counts from ghost norms move the thresholds as the vmap path's do.

    sigma = 0 and sigma_b = 0, so both paths are deterministic; two rows
    have sample weight 0 (padding) and must not count.
    """
    x, y = make_data(n=12, seed=8)
    weight = np.ones(12, "float32")
    weight[-2:] = 0.0
    results = {}
    for path in ("vmap", "auto"):
        model = build_model(seed=2)
        keras_dp.set_clip_group(model.get_layer("encoder"), "body", threshold=0.5)
        opt = keras_dp.DPSGD(
            learning_rate=0.1,
            noise_multiplier=0.0,
            adaptive_clipping=keras_dp.AdaptiveClipping(count_stddev=0.0),
        )
        private(model, opt, path=path)
        model._keras_dp.microbatch_size = microbatch_size
        for _ in range(3):
            model.train_on_batch(x, y, sample_weight=weight)
        results[path] = (model.get_weights(), dict(opt.group_thresholds))
        if path == "auto":
            assert model._keras_dp.per_example_path == ("fast", None)
    (w_vmap, t_vmap), (w_fast, t_fast) = results["vmap"], results["auto"]
    for name in t_vmap:
        assert t_fast[name] == pytest.approx(t_vmap[name], rel=1e-5), name
    assert t_vmap["body"] != pytest.approx(0.5)  # the thresholds moved
    for a, b in zip(w_fast, w_vmap):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_adaptive_noise_uses_reduced_multiplier():
    """Gradient noise std = sigma_g sqrt(sum C_k^2) / B (tolerance 6%)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((40,))
    hidden = keras.layers.Dense(60, activation="tanh", name="encoder")(inputs)
    base = keras.Model(inputs, keras.layers.Dense(20, name="head")(hidden))
    x = np.random.default_rng(1).normal(size=(40, 40)).astype("float32")
    y = np.zeros((40, 20), "float32")
    weights = base.get_weights()
    updates = {}
    for sigma in (0.0, 1.5):
        model = keras.models.clone_model(base)
        opt = keras_dp.DPSGD(
            learning_rate=1.0,
            noise_multiplier=sigma,
            clip_groups="per_layer",
            adaptive_clipping=True,
            seed=5,
        )
        private(model, opt)
        updates[sigma] = _one_step_update(model, opt, x, y, weights)
    # B = 40: sigma_b = 2, K = 2.
    sigma_g = (1.5**-2 - 2 * 4.0**-2) ** -0.5
    expected = sigma_g * 1.0 / 40  # equal split: sqrt(sum C_k^2) = 1
    assert np.std(updates[1.5] - updates[0.0]) == pytest.approx(expected, rel=0.06)
    # The ledger keeps the user's sigma.
    assert opt.noise_multiplier == 1.5


# ---------------------------------------------------- persistence


def _check_groups(model):
    assert keras_dp.get_clip_group(model.get_layer("encoder")) == ("body", 1.0)
    inner = model.get_layer("encoder").get_layer("inner_b")
    assert keras_dp.get_clip_group(inner) == ("inner", 0.25)
    assert keras_dp.get_clip_group(model.get_layer("head")) == ("head", None)
    assert keras_dp.get_clip_group(model.get_layer("middle")) is None


def test_groups_survive_clone_model():
    model = build_model(nested=True)
    keras_dp.set_clip_group(model.get_layer("encoder"), "body", threshold=1.0)
    keras_dp.set_clip_group(
        model.get_layer("encoder").get_layer("inner_b"), "inner", threshold=0.25
    )
    keras_dp.set_clip_group(model.get_layer("head"), "head")
    clone = keras.models.clone_model(model)
    assert clone.get_layer("head") is not model.get_layer("head")
    _check_groups(clone)
    _check_groups(keras.models.clone_model(model, recursive=True))
    seq = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(2, name="a"), keras.layers.Dense(1)]
    )
    keras_dp.set_clip_group(seq.get_layer("a"), "first", threshold=0.5)
    assert keras_dp.get_clip_group(keras.models.clone_model(seq).get_layer("a")) == (
        "first",
        0.5,
    )


def test_groups_and_thresholds_survive_save_and_load(tmp_path):
    model = build_model(nested=True)
    keras_dp.set_clip_group(model.get_layer("encoder"), "body", threshold=1.0)
    keras_dp.set_clip_group(
        model.get_layer("encoder").get_layer("inner_b"), "inner", threshold=0.25
    )
    keras_dp.set_clip_group(model.get_layer("head"), "head")
    opt = keras_dp.DPSGD(
        learning_rate=0.05, noise_multiplier=0.5, adaptive_clipping=True, seed=1
    )
    private(model, opt)
    x, y = make_data(n=40, seed=3)
    model.fit(x, y, batch_size=20, epochs=1, verbose=0)
    before = opt.group_thresholds
    assert before != {"body": 1.0, "inner": 0.25, "default": None}
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    _check_groups(loaded)
    assert loaded.optimizer.clip_group_names == opt.clip_group_names
    for name, value in loaded.optimizer.group_thresholds.items():
        assert value == pytest.approx(before[name], rel=1e-6)
    # Training resumes from the saved thresholds and keeps moving them.
    loaded.fit(x, y, batch_size=20, epochs=1, verbose=0)
    assert loaded.optimizer.group_thresholds != before
    # Saving a compiled model that never trained keeps its groups too.
    fresh = build_model(nested=True)
    keras_dp.set_clip_group(fresh.get_layer("encoder"), "body", threshold=1.0)
    keras_dp.set_clip_group(
        fresh.get_layer("encoder").get_layer("inner_b"), "inner", threshold=0.25
    )
    keras_dp.set_clip_group(fresh.get_layer("head"), "head")
    keras_dp.make_private(fresh).compile(optimizer=keras_dp.DPSGD(), loss="mse")
    fresh.save(path)
    _check_groups(keras.saving.load_model(path))


def test_optimizer_config_round_trip():
    opt = keras_dp.DPAdam(
        clip_groups="per_layer",
        clip_thresholds={"head": 0.5},
        adaptive_clipping=keras_dp.AdaptiveClipping(target_quantile=0.7),
    )
    config = opt.get_config()
    again = keras_dp.DPAdam.from_config(config)
    assert again.clip_groups == "per_layer"
    assert again.clip_thresholds == {"head": 0.5}
    assert again.adaptive_clipping.target_quantile == 0.7
    plain = keras_dp.DPAdam().get_config()
    assert "clip_groups" not in plain and "adaptive_clipping" not in plain
