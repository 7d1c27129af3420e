"""Tests for the privacy ledger and the step count it is combined with.

Reference epsilons are computed here directly with dp-accounting (events and
accountants built by hand), or with `keras_dp.compute_epsilon` for a single
segment, which `tests/test_accounting.py` checks against dp-accounting.
"""

import json
import math

import keras
import pytest

import accounting_fixtures as fixtures
from accounting_fixtures import FEATURES
from accounting_fixtures import N
from accounting_fixtures import make_regression
from accounting_fixtures import steps_taken

import keras_dp
from keras_dp import accounting
from keras_dp import ledger as ledger_lib

DELTA = 1e-5


def rdp_reference(segments, delta=DELTA):
    return fixtures.rdp_reference(segments, delta)


def pld_reference(segments, delta=DELTA):
    return fixtures.pld_reference(segments, delta)


def private_model(sigma=1.0, optimizer=None):
    model = keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(1)])
    model = keras_dp.make_private(model)
    model.compile(
        optimizer=optimizer
        or keras_dp.DPSGD(learning_rate=0.05, noise_multiplier=sigma, seed=1),
        loss="mse",
    )
    return model


class StepsAtEpochEnd(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.steps = []

    def on_epoch_end(self, epoch, logs=None):
        self.steps.append(ledger_lib.optimizer_steps(self.model))


# ---------------------------------------------------------------------------
# PrivacyLedger on its own.
# ---------------------------------------------------------------------------


def _example_ledger():
    ledger = keras_dp.PrivacyLedger()
    ledger.record(0, 1.0, 0.1, True, 100)
    ledger.record(10, 1.0, 0.1, True, 100)  # same setting: no entry
    ledger.record(10, 1.5, 0.1, True, 100)  # noise change at step 10
    ledger.record(10, 2.0, 0.1, True, 100)  # replaces the entry above
    ledger.record(25, 2.0, 0.2, True, 100)  # rate change at step 25
    ledger.record(30, 2.0, 0.2, True, 100)  # same setting: no entry
    return ledger


def test_record_keeps_change_points_only():
    ledger = _example_ledger()
    assert [
        (e["start_step"], e["noise_multiplier"], e["sample_rate"])
        for e in ledger.entries
    ] == [(0, 1.0, 0.1), (10, 2.0, 0.1), (25, 2.0, 0.2)]
    assert all(e["poisson"] is True and e["n"] == 100 for e in ledger.entries)


def test_change_of_poisson_flag_or_n_is_a_change():
    ledger = keras_dp.PrivacyLedger()
    ledger.record(0, 1.0, 0.1, True, 100)
    ledger.record(5, 1.0, 0.1, False, 100)
    ledger.record(8, 1.0, 0.1, False, 120)
    assert [e["start_step"] for e in ledger.entries] == [0, 5, 8]
    assert not ledger.assumes_poisson(5)
    assert ledger.assumes_poisson(6)


def test_segments_cut_at_the_step_count():
    ledger = _example_ledger()
    assert ledger.segments(40) == [(1.0, 0.1, 10), (2.0, 0.1, 15), (2.0, 0.2, 15)]
    assert ledger.segments(12) == [(1.0, 0.1, 10), (2.0, 0.1, 2)]
    assert ledger.segments(5) == [(1.0, 0.1, 5)]
    assert ledger.segments(0) == []


@pytest.mark.parametrize("steps", [12, 40])
def test_epsilon_matches_direct_dp_accounting(steps):
    ledger = _example_ledger()
    segments = ledger.segments(steps)
    epsilon = ledger.epsilon(steps, DELTA)
    assert epsilon == accounting.compute_epsilon_for_segments(segments, DELTA)
    assert epsilon == pytest.approx(rdp_reference(segments), rel=1e-12)
    # More steps never cost less privacy.
    assert ledger.epsilon(steps + 1, DELTA) >= epsilon


def test_epsilon_pld_matches_direct_dp_accounting():
    ledger = _example_ledger()
    segments = ledger.segments(12)
    assert len(segments) == 2
    epsilon = ledger.epsilon(12, DELTA, accountant="pld")
    assert epsilon == pytest.approx(pld_reference(segments), rel=1e-9)
    assert epsilon < ledger.epsilon(12, DELTA)


def test_epsilon_edge_cases():
    assert keras_dp.PrivacyLedger().epsilon(0, DELTA) == 0.0
    with pytest.raises(ValueError, match="no sampling rate"):
        keras_dp.PrivacyLedger().epsilon(3, DELTA)
    ledger = keras_dp.PrivacyLedger()
    ledger.record(0, 0.0, 0.1, True)
    assert ledger.epsilon(1, DELTA) == math.inf
    with pytest.raises(ValueError, match="sample rate"):
        ledger.record(2, 1.0, 1.5, True)
    with pytest.raises(ValueError, match="sample rate"):
        ledger.record(2, 1.0, 0.0, True)
    with pytest.raises(ValueError, match="delta"):
        ledger.epsilon(1, 0.0)


def test_get_config_round_trip():
    ledger = _example_ledger()
    config = ledger.get_config()
    restored = keras_dp.PrivacyLedger(json.loads(json.dumps(config)))
    assert restored.entries == ledger.entries
    assert restored.epsilon(40, DELTA) == ledger.epsilon(40, DELTA)
    # The config is a copy: editing it leaves the ledger alone.
    config["entries"][0]["noise_multiplier"] = 99.0
    assert ledger.entries[0]["noise_multiplier"] == 1.0


def test_ledger_is_part_of_the_optimizer_config():
    optimizer = keras_dp.DPSGD(noise_multiplier=1.3)
    optimizer.privacy_ledger.record(0, 1.3, 0.1, True, 200)
    optimizer.privacy_ledger.record(7, 1.3, 0.2, True, 200)
    config = json.loads(json.dumps(optimizer.get_config()))
    restored = keras_dp.DPSGD.from_config(config)
    assert restored.privacy_ledger.entries == optimizer.privacy_ledger.entries


# ---------------------------------------------------------------------------
# Steps across fits, save/load and setting changes.
# ---------------------------------------------------------------------------


def test_second_fit_continues_the_count():
    x, y = make_regression()
    batch_size, sigma = 20, 1.0
    q = batch_size / N
    per_epoch = math.ceil(N / batch_size)
    model = private_model(sigma)
    model.fit(x, y, batch_size=batch_size, epochs=1, verbose=0)
    assert steps_taken(model) == per_epoch
    logger = keras_dp.EpsilonLogger(delta=DELTA)
    history = model.fit(
        x, y, batch_size=batch_size, epochs=1, verbose=0, callbacks=[logger]
    )
    assert steps_taken(model) == 2 * per_epoch
    (entry,) = model.optimizer.privacy_ledger.entries
    assert entry["start_step"] == 0
    assert history.history["epsilon"][0] == pytest.approx(
        rdp_reference([(sigma, q, 2 * per_epoch)]), rel=1e-9
    )


def test_save_load_resume_gives_the_uninterrupted_epsilon(tmp_path):
    x, y = make_regression()
    batch_size, sigma = 20, 1.2
    q = batch_size / N
    per_epoch = math.ceil(N / batch_size)

    uninterrupted = private_model(sigma)
    straight = uninterrupted.fit(
        x,
        y,
        batch_size=batch_size,
        epochs=3,
        verbose=0,
        callbacks=[keras_dp.EpsilonLogger(delta=DELTA)],
    )

    first = private_model(sigma)
    first.fit(x, y, batch_size=batch_size, epochs=1, verbose=0)
    path = tmp_path / "model.keras"
    first.save(path)

    loaded = keras.saving.load_model(path)
    # Loading a model saved with a DP optimizer makes it private again.
    assert keras_dp.is_private(loaded)
    assert isinstance(loaded.optimizer, keras_dp.DPSGD)
    assert steps_taken(loaded) == per_epoch
    assert loaded.optimizer.privacy_ledger.entries == (
        first.optimizer.privacy_ledger.entries
    )
    steps = StepsAtEpochEnd()
    resumed = loaded.fit(
        x,
        y,
        batch_size=batch_size,
        epochs=2,
        verbose=0,
        callbacks=[keras_dp.EpsilonLogger(delta=DELTA), steps],
    )
    assert steps.steps == [2 * per_epoch, 3 * per_epoch]
    assert steps_taken(loaded) == 3 * per_epoch
    expected = keras_dp.compute_epsilon(sigma, q, 3 * per_epoch, DELTA)
    assert resumed.history["epsilon"][-1] == pytest.approx(expected, rel=1e-9)
    assert straight.history["epsilon"][-1] == pytest.approx(expected, rel=1e-9)
    assert resumed.history["epsilon"] == pytest.approx(
        straight.history["epsilon"][1:], rel=1e-9
    )
    assert expected == pytest.approx(
        rdp_reference([(sigma, q, 3 * per_epoch)]), rel=1e-9
    )


def test_make_private_again_after_load_keeps_the_count(tmp_path):
    x, y = make_regression()
    model = private_model(1.0)
    model.fit(x, y, batch_size=25, epochs=1, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras_dp.make_private(keras.saving.load_model(path))
    loaded.fit(x, y, batch_size=25, epochs=1, verbose=0)
    assert steps_taken(loaded) == 2 * math.ceil(N / 25)
    assert len(loaded.optimizer.privacy_ledger.entries) == 1


def test_change_of_batch_size_starts_a_new_segment():
    x, y = make_regression()
    sigma = 1.1
    model = private_model(sigma)
    model.fit(x, y, batch_size=20, epochs=1, verbose=0)
    logger = keras_dp.EpsilonLogger(delta=DELTA)
    history = model.fit(x, y, batch_size=40, epochs=1, verbose=0, callbacks=[logger])
    first_steps, second_steps = math.ceil(N / 20), math.ceil(N / 40)
    assert steps_taken(model) == first_steps + second_steps
    entries = model.optimizer.privacy_ledger.entries
    assert [(e["start_step"], e["sample_rate"]) for e in entries] == [
        (0, pytest.approx(20 / N)),
        (first_steps, pytest.approx(40 / N)),
    ]
    segments = [(sigma, 20 / N, first_steps), (sigma, 40 / N, second_steps)]
    expected = rdp_reference(segments)
    assert history.history["epsilon"][0] == pytest.approx(expected, rel=1e-9)
    # Neither single-rate account is right.
    for q in (20 / N, 40 / N):
        wrong = keras_dp.compute_epsilon(sigma, q, first_steps + second_steps, DELTA)
        assert wrong != pytest.approx(expected, rel=1e-3)


def test_gradient_accumulation_counts_updates_not_micro_steps():
    x, y = make_regression()
    batch_size, accumulation, sigma = 10, 2, 1.0
    q = accumulation * batch_size / N
    updates_per_epoch = math.ceil(N / (accumulation * batch_size))
    model = private_model(
        optimizer=keras_dp.DPSGD(
            learning_rate=0.05,
            noise_multiplier=sigma,
            gradient_accumulation_steps=accumulation,
        )
    )
    micro_batches = []

    class CountBatches(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            micro_batches.append(batch)

    steps = StepsAtEpochEnd()
    history = model.fit(
        x,
        y,
        batch_size=batch_size,
        epochs=2,
        verbose=0,
        callbacks=[keras_dp.EpsilonLogger(delta=DELTA), steps, CountBatches()],
    )
    assert len(micro_batches) == 2 * accumulation * updates_per_epoch
    assert steps.steps == [updates_per_epoch, 2 * updates_per_epoch]
    (entry,) = model.optimizer.privacy_ledger.entries
    assert entry["sample_rate"] == pytest.approx(q)
    assert entry["poisson"] is True
    for epoch, epsilon in enumerate(history.history["epsilon"]):
        assert epsilon == pytest.approx(
            rdp_reference([(sigma, q, (epoch + 1) * updates_per_epoch)]),
            rel=1e-9,
        )


# ---------------------------------------------------------------------------
# Calibration from target_epsilon.
# ---------------------------------------------------------------------------


def test_target_epsilon_calibrates_sigma_when_fit_starts(capsys):
    x, y = make_regression()
    batch_size, target, delta, epochs = 20, 2.0, 1e-5, 3
    q = batch_size / N
    optimizer = keras_dp.DPAdam(
        learning_rate=0.01, target_epsilon=target, target_delta=delta, epochs=epochs
    )
    assert optimizer.noise_multiplier is None
    model = private_model(optimizer=optimizer)
    model.fit(x, y, batch_size=batch_size, epochs=1, verbose=0)
    sigma = optimizer.noise_multiplier
    assert sigma is not None and sigma > 0
    planned_steps = accounting.steps_for_epochs(epochs, q)
    assert planned_steps == math.ceil(epochs * N / batch_size)
    epsilon = rdp_reference([(sigma, q, planned_steps)], delta)
    assert epsilon <= target
    assert epsilon >= 0.99 * target
    # A clearly smaller sigma would overshoot: the calibration is not loose.
    assert rdp_reference([(0.98 * sigma, q, planned_steps)], delta) > target
    assert f"noise_multiplier={sigma:.4f}" in capsys.readouterr().out
    (entry,) = optimizer.privacy_ledger.entries
    assert entry["noise_multiplier"] == sigma
    # Calibrated once: a second fit keeps sigma and prints nothing.
    model.fit(x, y, batch_size=batch_size, epochs=1, verbose=0)
    assert optimizer.noise_multiplier == sigma
    assert "noise_multiplier=" not in capsys.readouterr().out
    assert optimizer.get_config()["noise_multiplier"] == sigma


def test_target_epsilon_argument_errors():
    with pytest.raises(
        ValueError, match="either `noise_multiplier` or `target_epsilon`"
    ):
        keras_dp.DPAdam(
            noise_multiplier=1.0, target_epsilon=2.0, target_delta=1e-5, epochs=3
        )
    with pytest.raises(ValueError, match="needs `target_delta` and `epochs`"):
        keras_dp.DPAdam(target_epsilon=2.0, target_delta=1e-5)
    with pytest.raises(ValueError, match="needs `target_delta` and `epochs`"):
        keras_dp.DPAdam(target_epsilon=2.0, epochs=3)
    for delta in (0.0, 1.0, 1.5, -1e-5):
        with pytest.raises(
            ValueError, match=r"`target_delta` must be in the open interval \(0, 1\)"
        ):
            keras_dp.DPAdam(target_epsilon=2.0, target_delta=delta, epochs=3)
    with pytest.raises(
        ValueError, match="`target_epsilon` must be a positive finite number"
    ):
        keras_dp.DPAdam(target_epsilon=0.0, target_delta=1e-5, epochs=3)
    with pytest.raises(ValueError, match="`epochs` must be a positive finite number"):
        keras_dp.DPAdam(target_epsilon=2.0, target_delta=1e-5, epochs=0)
    with pytest.raises(ValueError, match="calibrate the noise together"):
        keras_dp.DPAdam(target_delta=1e-5, epochs=3)
