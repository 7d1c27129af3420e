"""Individual privacy accounting (`keras_dp.individual_privacy`): the norm
pass against brute-force per-example gradients, the epsilons against a
brute-force dp-accounting composition step by step, and the rules (never
above the global epsilon, equal to it when every example is clipped)."""

import sys

import dp_accounting
import keras
import numpy as np
import pytest
from dp_accounting import pld as dp_pld
from dp_accounting import rdp as dp_rdp

import keras_dp
from keras_dp import individual_accounting
from keras_dp.individual_privacy import IndividualPrivacy
from keras_dp.individual_privacy import NormRatioPass
from keras_dp.individual_privacy import TrainingData
import reference

N = 24
BATCH = 6  # q = 1/4: 4 steps per epoch
SIGMA = 1.0
DELTA = 1e-5
# Few Renyi orders: the brute-force reference composes one dp-accounting
# event per example and step.
ORDERS = [1.5, 2.0, 3.0, 4.0, 8.0, 16.0, 32.0]
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _data(scale=1.0):
    rng = np.random.default_rng(0)
    x = (scale * rng.normal(size=(N, 4))).astype("float32")
    y = rng.integers(0, 3, size=N)
    return x, y


def _model(per_example="auto", poisson_sampling=True):
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(5, activation="tanh"),
            keras.layers.Dense(3),
        ]
    )
    return keras_dp.make_private(
        model, per_example=per_example, poisson_sampling=poisson_sampling
    )


def _compile(model, **optimizer_kwargs):
    optimizer_kwargs.setdefault("noise_multiplier", SIGMA)
    model.compile(
        optimizer=keras_dp.DPSGD(learning_rate=0.05, **optimizer_kwargs), loss=LOSS
    )
    return model


def _reference_norms(model, x, y):
    grads = reference.per_example_gradients(model, x, y, LOSS)
    return grads, reference.norms_of(grads)


def _fit(model, x, y, callback, epochs=2, **kwargs):
    logger = keras_dp.EpsilonLogger(delta=DELTA)
    history = model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=epochs,
        callbacks=[logger, callback],
        verbose=0,
        **kwargs,
    )
    return history.history["epsilon"][-1]


# ----------------------------------------------------------- the norm pass


@pytest.mark.parametrize(
    "clipping, path",
    [
        ("flat", "fast"),
        ("flat", "vmap"),
        ("auto", "fast"),
        ("global", "fast"),
        ("groups", "fast"),
        ("groups", "vmap"),
    ],
)
def test_norm_ratios_match_brute_force_gradients(clipping, path):
    x, y = _data()
    model = _model(per_example=path)
    grads, norms = _reference_norms(model, x, y)
    threshold = float(np.median(norms))
    if clipping == "flat":
        _compile(model, l2_norm_clip=threshold)
        expected = reference.flat_factors(norms, threshold) * norms / threshold
    elif clipping == "auto":
        _compile(model, l2_norm_clip=threshold, clipping="auto")
        expected = norms / (norms + reference.AUTO_GAMMA)
    elif clipping == "global":
        _compile(
            model, l2_norm_clip=2.0, clipping="global", global_clip_threshold=threshold
        )
        expected = np.where(norms <= threshold, norms / threshold, 0.0)
    else:
        # Two groups (one per layer), thresholds C / sqrt(2) each.
        _compile(model, l2_norm_clip=threshold, clip_groups="per_layer")
        layer_of = [0, 0, 1, 1]  # kernel, bias of each Dense layer
        group_norms = np.array(
            [
                [
                    np.sqrt(
                        sum(np.sum(g[v] ** 2) for v in range(4) if layer_of[v] == k)
                    )
                    for k in range(2)
                ]
                for g in grads
            ]
        )
        c = threshold / np.sqrt(2.0)
        clipped = reference.flat_factors(group_norms, c) * group_norms
        expected = np.sqrt(np.sum(clipped**2, axis=1)) / threshold
    if clipping == "global":  # some left out, some kept
        assert 0 < np.sum(expected == 0) < N
    elif clipping != "auto":  # some clipped, some not (AUTO-S scales all)
        assert 0 < np.sum(expected < 0.999) < N
    ratios = NormRatioPass(model, rows=8)(TrainingData(x, y))
    assert ratios.shape == (N,)
    np.testing.assert_allclose(ratios, expected, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("path", ["fast", "vmap"])
def test_norm_ratios_of_low_rank_sparse_are_those_of_the_carrier_gradients(path):
    """The pass clips what the step clips: under LowRankSparse, the
    projection of each kernel gradient onto its carriers."""
    x, y = _data()
    keras.utils.set_random_seed(0)
    inner = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(5, activation="tanh"),
            keras.layers.Dense(3),
        ]
    )
    model = keras_dp.LowRankSparse(inner, rank=2, sparsity=0.3, seed=1)
    grads = reference.per_example_gradients(model, x, y, LOSS)
    carriers = {
        id(c.kernel): (c, [np.asarray(v.numpy(), "float64") for v in c.variables])
        for c in model._carriers
    }
    norms = []
    for g in grads:
        total = 0.0
        for var, gv in zip(model.trainable_variables, g):
            if id(var) in carriers:
                c, (L, R, mL, mR) = carriers[id(var)]
                G = gv.reshape(c.p, c.d)
                total += np.sum(((G @ R.T) * mL) ** 2) + np.sum(((L.T @ G) * mR) ** 2)
            else:
                total += np.sum(gv**2)
        norms.append(np.sqrt(total))
    norms = np.array(norms)
    full = reference.norms_of(grads)
    assert np.abs(norms - full).max() > 1e-3  # not the full gradients' norms
    threshold = float(np.median(norms))
    model = _compile(
        keras_dp.make_private(model, per_example=path), l2_norm_clip=threshold
    )
    ratios = NormRatioPass(model, rows=8)(TrainingData(x, y))
    expected = reference.flat_factors(norms, threshold) * norms / threshold
    np.testing.assert_allclose(ratios, expected, rtol=2e-4, atol=1e-6)
    assert NormRatioPass(model, rows=8).path == path


def test_norm_pass_weights_examples():
    x, y = _data()
    model = _compile(_model(), l2_norm_clip=100.0)
    weights = np.linspace(0.0, 2.0, N).astype("float32")
    _, norms = _reference_norms(model, x, y)
    ratios = NormRatioPass(model, rows=8)(TrainingData(x, y, weights))
    # The loss is weighted per example, so is the gradient; weight 0
    # spends nothing.
    np.testing.assert_allclose(ratios, weights * norms / 100.0, rtol=2e-4, atol=1e-7)
    assert ratios[0] == 0.0


# ---------------------------------------------------------------- epsilons


def _brute_force_epsilons(passes, steps, q, sigma, delta, orders):
    """Each example's epsilon from one dp-accounting event per step."""
    n = len(passes[0][2])
    epsilons = []
    for i in range(n):
        accountant = dp_rdp.RdpAccountant(orders)
        for t in range(steps):
            (r,) = [r[i] for start, end, r in passes if start <= t < end]
            r = min(float(r), 1.0)
            if r > 0:
                accountant.compose(
                    dp_accounting.PoissonSampledDpEvent(
                        q, dp_accounting.GaussianDpEvent(sigma / r)
                    )
                )
        epsilons.append(accountant.get_epsilon(delta))
    return np.array(epsilons)


def test_epsilons_match_brute_force_composition():
    x, y = _data()
    model = _model()
    _, norms = _reference_norms(model, x, y)
    _compile(model, l2_norm_clip=float(np.median(norms)))
    # An epoch without the callback: its steps count at full sensitivity.
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    callback = IndividualPrivacy(
        x, y, delta=DELTA, every_epochs=2, resolution=None, rdp_orders=ORDERS
    )
    _fit(model, x, y, callback, epochs=3)
    steps = callback.steps
    assert steps == 16
    # Passes at the start of the callback's epochs 1 and 3 (every 2).
    assert [(start, end) for start, end, _ in callback.passes] == [(4, 12), (12, 16)]
    full = [(0, 4, np.ones(N))] + [(s, e, r) for s, e, r in callback.passes]
    expected = _brute_force_epsilons(full, steps, BATCH / N, SIGMA, DELTA, ORDERS)
    assert np.ptp(expected) > 0.1  # the ratios differ between examples
    np.testing.assert_allclose(callback.epsilons, expected, rtol=1e-6)

    # Rounding the ratios up never lowers an epsilon.
    rounded = individual_accounting.individual_epsilons(
        [(start, end, r) for start, end, r in callback.passes],
        lambda start, end: [(SIGMA, BATCH / N, end - start)],
        steps,
        DELTA,
        resolution=0.1,
        rdp_orders=ORDERS,
    )
    assert np.all(rounded >= callback.epsilons)
    assert np.all(rounded <= callback.global_epsilon)


def test_pld_epsilons_match_dp_accounting():
    sigma, q = 2.0, 0.1
    spans = [(0, 5, np.array([0.5, 1.0, 0.0])), (5, 10, np.array([0.5, 0.25, 0.0]))]
    epsilons = individual_accounting.individual_epsilons(
        spans,
        lambda start, end: [(sigma, q, end - start)],
        10,
        DELTA,
        accountant="pld",
        resolution=None,
    )
    expected = []
    for i in range(3):
        accountant = dp_pld.PLDAccountant(value_discretization_interval=1e-4)
        for start, end, ratios in spans:
            if ratios[i] > 0:
                event = dp_accounting.PoissonSampledDpEvent(
                    q, dp_accounting.GaussianDpEvent(sigma / ratios[i])
                )
                accountant.compose(event, end - start)
        expected.append(accountant.get_epsilon(DELTA))
    assert expected[2] == 0.0
    np.testing.assert_allclose(epsilons, expected, rtol=1e-3)


def test_adaptive_clipping_ratios_and_epsilons():
    x, y = _data()
    model = _model()
    _, norms = _reference_norms(model, x, y)
    threshold = float(np.median(norms))
    sigma = 0.5  # below adaptive clipping's limit 2 sigma_b = 0.6 at B = 6
    _compile(
        model, l2_norm_clip=threshold, adaptive_clipping=True, noise_multiplier=sigma
    )
    weights = np.ones(N, dtype="float32")
    weights[0] = 0.0
    callback = IndividualPrivacy(x, y, weights, delta=DELTA)
    logged = _fit(model, x, y, callback, sample_weight=weights)
    epsilons = callback.epsilons
    assert epsilons[0] == 0.0
    assert np.all(epsilons <= logged)
    assert np.min(epsilons[1:]) < logged

    # The gradient (multiplier sigma_g) and the clip count (noise sigma_b =
    # 0.05 B, sensitivity 1/2) cost sigma together.
    sigma_b = 0.05 * BATCH
    sigma_g = (sigma**-2 - (2 * sigma_b) ** -2) ** -0.5

    def expected_ratios(norms, threshold):
        r = reference.flat_factors(norms, threshold) * norms / threshold
        share = (sigma / sigma_g) ** 2
        expected = np.sqrt(r**2 * share + (sigma / (2 * sigma_b)) ** 2)
        expected[0] = 0.0  # weight 0: in neither the sum nor the count
        return expected

    # The first pass saw the initial weights and threshold.
    np.testing.assert_allclose(
        callback.passes[0][2], expected_ratios(norms, threshold), rtol=2e-4
    )
    assert 0 < np.sum(expected_ratios(norms, threshold) < 0.99) < N
    # A pass now uses the weights and the threshold training reached.
    (reached,) = model.optimizer.group_thresholds.values()
    assert reached != pytest.approx(threshold)
    _, norms = _reference_norms(model, x, y)
    callback.measure()
    np.testing.assert_allclose(
        callback.passes[-1][2], expected_ratios(norms, reached), rtol=2e-4
    )


def test_epsilons_at_most_the_logged_global_epsilon():
    x, y = _data()
    model = _model()
    _, norms = _reference_norms(model, x, y)
    _compile(model, l2_norm_clip=float(np.median(norms)))
    callback = IndividualPrivacy(x, y, delta=DELTA, every_epochs=1, resolution=0.1)
    logged = _fit(model, x, y, callback)
    epsilons = callback.epsilons
    assert epsilons.shape == (N,)
    assert callback.global_epsilon == pytest.approx(logged, rel=1e-12)
    assert np.all(epsilons <= logged)
    assert np.min(epsilons) < 0.9 * logged


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_every_example_clipped_spends_the_global_epsilon(accountant):
    x, y = _data()
    model = _compile(_model(), l2_norm_clip=1e-6)
    sampler = keras_dp.data.PoissonSampler(x, y, batch_size=BATCH, seed=0)
    callback = IndividualPrivacy(sampler, delta=DELTA, accountant=accountant)
    model.fit(sampler, epochs=2, callbacks=[callback], verbose=0)
    expected = model.optimizer.privacy_ledger.epsilon(callback.steps, DELTA, accountant)
    np.testing.assert_allclose(callback.epsilons, expected, rtol=1e-9)


def test_auto_clipping_spends_the_global_epsilon():
    # AUTO-S gives every example the norm R ||g|| / (||g|| + 0.01): with
    # norms far above 0.01 every ratio rounds up to 1.
    x, y = _data(scale=100.0)
    model = _compile(_model(), clipping="auto")
    callback = IndividualPrivacy(x, y, delta=DELTA, resolution=0.1)
    logged = _fit(model, x, y, callback)
    assert np.min(callback.passes[0][2]) > 0.9
    np.testing.assert_allclose(callback.epsilons, logged, rtol=1e-9)


def test_global_clipping_leaves_large_gradients_unspent():
    x, y = _data()
    model = _model()
    _, norms = _reference_norms(model, x, y)
    threshold = float(np.median(norms))
    _compile(model, clipping="global", global_clip_threshold=threshold)
    callback = IndividualPrivacy(x, y, delta=DELTA, resolution=0.1)
    logged = _fit(model, x, y, callback, epochs=1)
    # One pass, at the initial weights: the examples above Z are left out
    # of every update of the epoch.
    above = norms > threshold * 1.001
    assert 0 < np.sum(above) < N
    assert np.all(callback.epsilons[above] == 0.0)
    assert np.all(callback.epsilons[~above] <= logged)
    assert np.all(callback.epsilons[~above] > 0.0)


# ---------------------------------------------------------------- refusals


def test_augmentation_multiplicity_is_refused():
    x, y = _data()
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model = keras_dp.make_private(
        model, augment=lambda x, seed: x + keras.random.normal((4,), seed=seed)
    )
    _compile(model)
    callback = IndividualPrivacy(x, y, delta=DELTA)
    with pytest.raises(ValueError, match="does not support augmentation"):
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[callback])


def test_data_of_another_size_is_refused():
    x, y = _data()
    model = _compile(_model())
    callback = IndividualPrivacy(x[:-1], y[:-1], delta=DELTA)
    with pytest.raises(
        ValueError, match=f"given {N - 1} examples, but fit trains on {N}"
    ):
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[callback])


def test_a_sampler_of_an_example_source_is_refused():
    x, y = _data()
    source = [(x[i], y[i]) for i in range(len(x))]
    sampler = keras_dp.data.PoissonSampler(source=source, batch_size=BATCH)
    with pytest.raises(ValueError, match="samples an example `source`"):
        IndividualPrivacy(sampler, delta=DELTA)


def test_fixed_batches_are_refused():
    x, y = _data()
    model = _compile(_model(poisson_sampling=False))
    callback = IndividualPrivacy(x, y, delta=DELTA)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="Poisson"):
        model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[callback])


def test_a_model_that_is_not_private_is_refused():
    x, y = _data()
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(optimizer="sgd", loss=LOSS)
    callback = IndividualPrivacy(x, y, delta=DELTA)
    with pytest.raises(ValueError, match="make_private"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[callback])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"every_epochs": 0}, "every_epochs"),
        ({"resolution": 2.0}, "resolution"),
        ({"accountant": "moments"}, "accountant"),
        ({"sample_weight": np.ones(N - 1)}, "sample_weight"),
        ({"y": np.zeros(N - 1)}, "one row per example"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    x, y = _data()
    kwargs = {"y": y, **kwargs}
    with pytest.raises(ValueError, match=message):
        IndividualPrivacy(x, delta=DELTA, **kwargs)


def test_epsilons_before_fit_are_refused():
    x, y = _data()
    with pytest.raises(RuntimeError, match="model.fit"):
        IndividualPrivacy(x, y, delta=DELTA).epsilons


# ------------------------------------------------------- summaries, plots


def test_summary_by_group():
    rng = np.random.default_rng(1)
    epsilons = rng.random(30)
    labels = rng.integers(0, 3, 30)
    summary = keras_dp.individual_privacy.summary_by_group(epsilons, labels)
    assert sorted(summary) == sorted(set(labels.tolist()))
    for label, stats in summary.items():
        values = epsilons[labels == label]
        assert stats == {
            "count": len(values),
            "min": values.min(),
            "median": np.median(values),
            "mean": values.mean(),
            "max": values.max(),
        }
    one_hot = np.eye(3)[labels]
    assert keras_dp.individual_privacy.summary_by_group(epsilons, one_hot) == summary


def test_histogram_plot():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    rng = np.random.default_rng(1)
    epsilons = rng.random(30)
    ax = keras_dp.individual_privacy.plot_histogram(
        epsilons, 1.5, bins=5, groups=rng.integers(0, 2, 30)
    )
    assert ax.get_xlabel() == "individual epsilon"
    assert len(ax.patches) == 10  # 5 bins for each of 2 groups
    matplotlib.pyplot.close("all")


def test_histogram_without_matplotlib_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"pip install keras-dp\[plots\]"):
        keras_dp.individual_privacy.plot_histogram(np.ones(3))
