"""Tests for `EpsilonLogger` and `PrivacyBudget`.

Every expected epsilon is recomputed here from the steps the optimizer
actually took (read from `optimizer.iterations` by a separate callback), with
dp-accounting called directly.
"""

import csv
import math
import warnings

import keras
import numpy as np
import pytest

import accounting_fixtures as fixtures
from accounting_fixtures import FEATURES
from accounting_fixtures import N
from accounting_fixtures import make_regression
from accounting_fixtures import steps_taken

import keras_dp

BATCH = 20
Q = BATCH / N
STEPS_PER_EPOCH = math.ceil(N / BATCH)
SIGMA = 1.5
DELTA = 1e-5


def rdp_reference(sigma, q, steps, delta=DELTA):
    return fixtures.rdp_reference([(sigma, q, steps)], delta)


def pld_reference(sigma, q, steps, delta=DELTA):
    return fixtures.pld_reference([(sigma, q, steps)], delta)


def build_model():
    return keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(1)])


def private_model(sigma=SIGMA, **optimizer_kwargs):
    model = keras_dp.make_private(build_model())
    model.compile(
        optimizer=keras_dp.DPSGD(
            learning_rate=0.05, noise_multiplier=sigma, seed=3, **optimizer_kwargs
        ),
        loss="mse",
    )
    return model


class Recorder(keras.callbacks.Callback):
    """Placed after EpsilonLogger: copies the logs it wrote and the steps."""

    def __init__(self):
        super().__init__()
        self.batch_logs = []
        self.epoch_logs = []
        self.epoch_steps = []

    def on_train_batch_end(self, batch, logs=None):
        self.batch_logs.append(dict(logs or {}))

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_logs.append(dict(logs or {}))
        # Outside the batch loop the variables are in sync on every backend.
        self.epoch_steps.append(steps_taken(self.model))


# ---------------------------------------------------------------------------
# EpsilonLogger.
# ---------------------------------------------------------------------------


def test_epsilon_logger_values_match_steps_taken():
    x, y = make_regression()
    model = private_model()
    recorder = Recorder()
    history = model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=3,
        verbose=0,
        callbacks=[keras_dp.EpsilonLogger(delta=DELTA), recorder],
    )
    # Poisson sampling: ceil(n / B) optimizer steps per epoch.
    assert recorder.epoch_steps == [STEPS_PER_EPOCH * (epoch + 1) for epoch in range(3)]
    epsilons = history.history["epsilon"]
    assert len(epsilons) == 3
    for epsilon, steps in zip(epsilons, recorder.epoch_steps):
        assert epsilon == pytest.approx(rdp_reference(SIGMA, Q, steps), rel=1e-9)
    assert epsilons[0] < epsilons[1] < epsilons[2]
    assert history.history["delta"] == [DELTA] * 3
    assert [logs["epsilon"] for logs in recorder.epoch_logs] == epsilons
    assert "epsilon_assumes_poisson" not in history.history


def test_default_delta_is_one_over_n_to_the_1_1():
    x, y = make_regression()
    model = private_model()
    logger = keras_dp.EpsilonLogger()
    history = model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[logger])
    delta = 1.0 / N**1.1
    assert history.history["delta"] == [pytest.approx(delta, rel=1e-12)]
    assert history.history["epsilon"][0] == pytest.approx(
        rdp_reference(SIGMA, Q, STEPS_PER_EPOCH, delta), rel=1e-9
    )


def test_default_delta_uses_the_training_rows_only():
    x, y = make_regression()
    model = private_model()
    history = model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=1,
        verbose=0,
        validation_split=0.25,
        callbacks=[keras_dp.EpsilonLogger()],
    )
    n_train = 150
    assert history.history["delta"] == [pytest.approx(1.0 / n_train**1.1)]


def test_warning_when_delta_is_at_least_one_over_n():
    x, y = make_regression()
    model = private_model()
    with pytest.warns(UserWarning, match=r"delta=0\.01 is >= 1/n"):
        model.fit(
            x,
            y,
            batch_size=BATCH,
            epochs=1,
            verbose=0,
            callbacks=[keras_dp.EpsilonLogger(delta=0.01)],
        )
    # No warning for a delta below 1/n.
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model.fit(
            x,
            y,
            batch_size=BATCH,
            epochs=1,
            verbose=0,
            callbacks=[keras_dp.EpsilonLogger(delta=1e-3)],
        )
    assert not [w for w in record if "1/n" in str(w.message)]


def test_epsilon_logger_on_non_private_model_raises():
    x, y = make_regression()
    model = build_model()
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match="make_private"):
        model.fit(
            x,
            y,
            batch_size=BATCH,
            epochs=1,
            verbose=0,
            callbacks=[keras_dp.EpsilonLogger(delta=DELTA)],
        )


def test_epsilon_logger_argument_errors():
    with pytest.raises(ValueError, match="delta"):
        keras_dp.EpsilonLogger(delta=0.0)
    with pytest.raises(ValueError, match="delta"):
        keras_dp.EpsilonLogger(delta=1.0)
    with pytest.raises(ValueError, match="Unknown accountant"):
        keras_dp.EpsilonLogger(delta=DELTA, accountant="moments")
    for value in (0, -1, 1.5):
        with pytest.raises(ValueError, match="every_n_batches"):
            keras_dp.EpsilonLogger(delta=DELTA, every_n_batches=value)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_every_n_batches_writes_batch_logs(accumulation):
    x, y = make_regression()
    every = 3
    micro_batch = BATCH // accumulation
    optimizer_kwargs = (
        {"gradient_accumulation_steps": accumulation} if accumulation > 1 else {}
    )
    model = private_model(**optimizer_kwargs)
    recorder = Recorder()
    model.fit(
        x,
        y,
        batch_size=micro_batch,
        epochs=1,
        verbose=0,
        callbacks=[
            keras_dp.EpsilonLogger(delta=DELTA, every_n_batches=every),
            recorder,
        ],
    )
    # q = accumulation * micro_batch / n = B / n in both cases.
    batches_per_epoch = STEPS_PER_EPOCH * accumulation
    assert len(recorder.batch_logs) == batches_per_epoch
    logged = 0
    for position, logs in enumerate(recorder.batch_logs):
        batch = position % batches_per_epoch
        if (batch + 1) % every:
            assert "epsilon" not in logs
            continue
        logged += 1
        # Micro-steps done so far; one optimizer update per `accumulation`.
        updates = (position + 1) // accumulation
        assert logs["delta"] == DELTA
        assert logs["epsilon"] == pytest.approx(
            rdp_reference(SIGMA, Q, updates), rel=1e-9
        ), (position, updates)
    assert logged == batches_per_epoch // every


@pytest.mark.parametrize("logger_first", [True, False])
def test_csv_logger_gets_an_epsilon_column(tmp_path, logger_first):
    x, y = make_regression()
    model = private_model()
    path = tmp_path / "log.csv"
    callbacks = [
        keras_dp.EpsilonLogger(delta=DELTA),
        keras.callbacks.CSVLogger(str(path)),
    ]
    history = model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=2,
        verbose=0,
        callbacks=callbacks if logger_first else callbacks[::-1],
    )
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    assert "epsilon" in rows[0] and "delta" in rows[0]
    for row, epsilon in zip(rows, history.history["epsilon"]):
        assert float(row["epsilon"]) == pytest.approx(epsilon, rel=1e-6)
    assert float(rows[1]["epsilon"]) == pytest.approx(
        rdp_reference(SIGMA, Q, 2 * STEPS_PER_EPOCH), rel=1e-6
    )


def test_pld_accountant():
    x, y = make_regression()
    model = private_model()
    history = model.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=1,
        verbose=0,
        callbacks=[keras_dp.EpsilonLogger(delta=DELTA, accountant="pld")],
    )
    epsilon = history.history["epsilon"][0]
    assert epsilon == pytest.approx(pld_reference(SIGMA, Q, STEPS_PER_EPOCH), rel=1e-9)
    # PLD is tighter than RDP here.
    assert epsilon < rdp_reference(SIGMA, Q, STEPS_PER_EPOCH)


# ---------------------------------------------------------------------------
# PrivacyBudget.
# ---------------------------------------------------------------------------


# PrivacyBudget evaluates epsilon after every batch: larger batches (q = 0.2,
# 5 steps per epoch) keep the number of evaluations small.
BUDGET_BATCH = 40
BUDGET_Q = BUDGET_BATCH / N
BUDGET_STEPS_PER_EPOCH = math.ceil(N / BUDGET_BATCH)
BUDGET_TARGET = 2.6


def _last_step_within(target, sigma=SIGMA, q=BUDGET_Q, delta=DELTA):
    """Largest k with epsilon(k) <= target, by direct dp-accounting calls."""
    k = 0
    while rdp_reference(sigma, q, k + 1, delta) <= target:
        k += 1
    return k


def test_privacy_budget_stops_at_the_last_step_within_budget(capsys):
    target = BUDGET_TARGET
    k = _last_step_within(target)
    # Mid-epoch, so stopping at an epoch boundary would be caught.
    assert k > BUDGET_STEPS_PER_EPOCH and k % BUDGET_STEPS_PER_EPOCH != 0
    x, y = make_regression()
    model = private_model()
    budget = keras_dp.PrivacyBudget(target_epsilon=target, delta=DELTA)
    logger = keras_dp.EpsilonLogger(delta=DELTA)
    history = model.fit(
        x,
        y,
        batch_size=BUDGET_BATCH,
        epochs=50,
        verbose=0,
        callbacks=[budget, logger],
    )
    assert steps_taken(model) == k
    assert budget.stopped_at_step == k
    assert len(history.history["loss"]) == math.ceil(k / BUDGET_STEPS_PER_EPOCH)
    assert history.history["epsilon"][-1] <= target
    assert history.history["epsilon"][-1] == pytest.approx(
        rdp_reference(SIGMA, BUDGET_Q, k), rel=1e-9
    )
    out = capsys.readouterr().out
    assert f"stopping after {k} steps" in out
    assert f"epsilon={target}" in out

    # The budget is spent: another fit takes no step at all.
    weights = [np.asarray(w) for w in model.get_weights()]
    again = model.fit(
        x, y, batch_size=BUDGET_BATCH, epochs=5, verbose=0, callbacks=[budget]
    )
    assert steps_taken(model) == k
    assert again.history == {}
    for before, after in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(before, np.asarray(after))
    assert f"stopping after {k} steps" in capsys.readouterr().out


def test_privacy_budget_computes_epsilon_a_logarithmic_number_of_times(monkeypatch):
    # The bound is found once per fit, by bisection: a few dozen
    # evaluations for 250 possible steps, not one per step.
    k = _last_step_within(BUDGET_TARGET)
    calls = []
    original = keras_dp.PrivacyLedger.epsilon

    def counting(self, *args, **kwargs):
        calls.append(args)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(keras_dp.PrivacyLedger, "epsilon", counting)
    x, y = make_regression()
    model = private_model()
    budget = keras_dp.PrivacyBudget(target_epsilon=BUDGET_TARGET, delta=DELTA)
    model.fit(x, y, batch_size=BUDGET_BATCH, epochs=50, verbose=0, callbacks=[budget])
    assert steps_taken(model) == k
    assert len(calls) <= 2 + math.ceil(math.log2(50 * BUDGET_STEPS_PER_EPOCH + 1)) + 1


def test_privacy_budget_counts_updates_under_accumulation():
    k = _last_step_within(BUDGET_TARGET)
    x, y = make_regression()
    model = private_model(gradient_accumulation_steps=2)
    budget = keras_dp.PrivacyBudget(target_epsilon=BUDGET_TARGET, delta=DELTA)
    model.fit(
        x,
        y,
        batch_size=BUDGET_BATCH // 2,
        epochs=50,
        verbose=0,
        callbacks=[budget],
    )
    assert steps_taken(model) == k
    (entry,) = model.optimizer.privacy_ledger.entries
    assert entry["sample_rate"] == pytest.approx(BUDGET_Q)


def test_privacy_budget_argument_errors():
    for target in (0, -1.0):
        with pytest.raises(
            ValueError, match="`target_epsilon` must be a positive finite number"
        ):
            keras_dp.PrivacyBudget(target_epsilon=target, delta=DELTA)
    for delta in (0.0, 1.0, 2.0):
        with pytest.raises(ValueError, match=r"open interval \(0, 1\)"):
            keras_dp.PrivacyBudget(target_epsilon=1.0, delta=delta)


def test_privacy_budget_unknown_accountant_raises_on_construction():
    with pytest.raises(ValueError, match="Unknown accountant 'moments'"):
        keras_dp.PrivacyBudget(1.0, DELTA, accountant="moments")


def test_privacy_budget_on_non_private_model_raises():
    x, y = make_regression()
    model = build_model()
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match="make_private"):
        model.fit(
            x,
            y,
            batch_size=BATCH,
            epochs=1,
            verbose=0,
            callbacks=[keras_dp.PrivacyBudget(1.0, DELTA)],
        )
    assert steps_taken(model) == 0
