"""Private training that crashes and resumes: what the ledger counts, and
whether a re-run step draws new noise.

A training process (`tests/fault_tolerance_worker.py`: a tiny private MLP,
Poisson sampling through `fit`, `keras.callbacks.BackupAndRestore`) is
killed with SIGKILL in the middle of an epoch, a few updates after its last
backup, and the same command resumes it. The worker logs, after each batch,
the update count, a checksum of the weights and the weights of a probe
layer whose gradient is exactly 0 (so each update moves it by the DP noise
alone). From the checksums the tests count, without asking keras_dp, the
updates the final model received: those of the first process up to the
backup the second one restored, plus those of the second. The ledger and
the epsilon keras_dp reports must count exactly these (dp-accounting gives
the reference), and the step that re-runs after the resume must not draw
the noise the lost step drew (two updates with the same noise and
different batches reveal the difference of their clipped sums).

The two processes start together and take turns on a lock in the work
directory, so the second one's imports overlap the first one's run.
In-process runs cover `ModelCheckpoint` + `load_model`, the restore of a
model in the process that trained it (Keras's `BackupAndRestore` after an
exception), fixed seeds and secure mode.
"""

import copy
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest

import accounting_fixtures as fixtures
import fault_tolerance_worker as worker

import keras_dp
from keras_dp import ledger as ledger_lib

WORKER = Path(__file__).with_name("fault_tolerance_worker.py")
SAMPLE_RATE = worker.BATCH_SIZE / worker.N
UPDATES_PER_EPOCH = worker.N // worker.BATCH_SIZE
# The first process stops at update 14 (epoch 1, batch 3); its last backup
# is at update 12, so updates 13 and 14 are lost with the kill.
STALL_AT = 14
# Noise on one coordinate of an update: learning_rate * sigma * C / B.
NOISE_SCALE = (
    worker.LEARNING_RATE
    * worker.NOISE_MULTIPLIER
    * worker.L2_NORM_CLIP
    / worker.BATCH_SIZE
)
PROCESS_TIMEOUT = 300


class KilledRun:
    """The log of the killed and the resumed process and the result."""

    def __init__(self, rows, result):
        stalled = next(k for k, row in enumerate(rows) if row["event"] == "stalled")
        self.first = rows[:stalled]
        self.second = rows[stalled + 1 :]
        self.result = result
        assert [r["event"] for r in self.first + self.second].count("begin") == 2
        # The backup the second process restored: the first process's row
        # with the same weights (row k: after k updates of that process).
        start = self.second[0]["checksum"]
        matches = [k for k, row in enumerate(self.first) if row["checksum"] == start]
        assert len(matches) == 1, "the resumed weights are no state of the first run"
        self.restored = matches[0]
        self.lost = len(self.first) - 1 - self.restored
        # Counted from the logs alone: what the final model received.
        self.received = self.restored + len(self.second) - 1


def _wait_for_stall(log, processes, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists():
            # Complete lines only: the worker may be writing the last one.
            for line in log.read_text().split("\n")[:-1]:
                row = json.loads(line)
                if row["event"] == "stalled":
                    return row
        if any(p.poll() is not None for p in processes):
            return None
        time.sleep(0.1)
    return None


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    if sys.platform == "win32":
        pytest.skip("the worker takes turns with flock and is killed by SIGKILL")
    workdir = tmp_path_factory.mktemp("fault_tolerance")
    # The worker imports the keras_dp this process imported.
    root = str(Path(keras_dp.__file__).parents[1])
    path = os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    env = dict(os.environ, KERAS_BACKEND=keras.backend.backend(), PYTHONPATH=path)
    command = [sys.executable, str(WORKER), str(workdir), "--stall-at", str(STALL_AT)]
    outputs = [workdir / f"output-{k}.txt" for k in range(2)]
    processes = []
    try:
        for output in outputs:
            with open(output, "w") as out:
                processes.append(
                    subprocess.Popen(
                        command, env=env, stdout=out, stderr=subprocess.STDOUT
                    )
                )
        stalled = _wait_for_stall(workdir / "log.jsonl", processes, PROCESS_TIMEOUT)
        assert stalled is not None, _outputs(outputs)
        victim = next(p for p in processes if p.pid == stalled["pid"])
        (survivor,) = [p for p in processes if p is not victim]
        assert (workdir / "backup" / "latest.weights.h5").exists()
        victim.send_signal(signal.SIGKILL)
        assert victim.wait(timeout=60) == -signal.SIGKILL
        assert survivor.wait(timeout=PROCESS_TIMEOUT) == 0, _outputs(outputs)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    rows = [
        json.loads(line) for line in (workdir / "log.jsonl").read_text().splitlines()
    ]
    result = json.loads((workdir / "result.json").read_text())
    assert result["backend"] == keras.backend.backend()
    return KilledRun(rows, result)


def _outputs(paths):
    return "\n".join(path.read_text()[-3000:] for path in paths if path.exists())


def _probe_step(rows, k):
    """The probe's move in the update after row `k`: minus the learning
    rate times the noise (the probe's clipped sum is 0)."""
    return np.subtract(rows[k + 1]["probe"], rows[k]["probe"])


def _same_noise(a, b):
    # The same noise from the same weights gives the same float32 update;
    # independent noise on 9 coordinates comes within 1e-4 of the scale on
    # all of them with probability below 1e-30.
    return np.allclose(a, b, rtol=0, atol=1e-4 * NOISE_SCALE)


# ---------------------------------------------------------------------------
# Killed with SIGKILL, resumed by BackupAndRestore in a new process.
# ---------------------------------------------------------------------------


def test_kill_lost_the_updates_after_the_backup(killed_run):
    run = killed_run
    assert run.first[-1]["updates"] == STALL_AT
    assert run.lost == STALL_AT - (STALL_AT // worker.SAVE_FREQ) * worker.SAVE_FREQ
    assert run.lost > 0
    # Killed in the middle of an epoch, resumed from the backup's weights.
    assert run.first[-1]["batch"] not in (0, UPDATES_PER_EPOCH - 1)
    assert run.second[0]["probe"] == run.first[run.restored]["probe"]
    assert run.second[-1]["checksum"] == run.result["checksum"]


def test_ledger_counts_the_updates_in_the_final_model(killed_run):
    run, result = killed_run, killed_run.result
    received = run.received
    # The lost updates are not counted, the re-run ones are, once.
    assert received != len(run.first) - 1 + len(run.second) - 1
    assert result["updates"] == result["steps"] == received
    ledger = keras_dp.PrivacyLedger(result["ledger"])
    assert ledger.step_offset == 0
    assert ledger.segments(received) == [
        (worker.NOISE_MULTIPLIER, SAMPLE_RATE, received)
    ]
    expected = fixtures.rdp_reference(
        [(worker.NOISE_MULTIPLIER, SAMPLE_RATE, received)], worker.DELTA
    )
    assert result["logger_epsilon"] == pytest.approx(expected, rel=1e-9)
    assert result["logged_epsilon"][-1] == pytest.approx(expected, rel=1e-9)
    assert result["ledger_epsilon"] == pytest.approx(expected, rel=1e-9)
    assert keras_dp.compute_epsilon(
        worker.NOISE_MULTIPLIER, SAMPLE_RATE, received, worker.DELTA
    ) == pytest.approx(expected, rel=1e-9)
    assert f"noisy updates taken: {received}\n" in result["summary"]
    assert f"epsilon: {expected:.4g} at delta=" in result["summary"]


@pytest.fixture(scope="module")
def uninterrupted(killed_run):
    """An in-process run, never interrupted, of as many updates as the
    killed run's final model received: `(model, History)`."""
    x, y = worker.make_data()
    model = worker.build_model()
    history = model.fit(
        x,
        y,
        batch_size=worker.BATCH_SIZE,
        steps_per_epoch=killed_run.received,
        epochs=1,
        verbose=0,
        callbacks=[keras_dp.EpsilonLogger(delta=worker.DELTA)],
    )
    assert fixtures.steps_taken(model) == killed_run.received
    return model, history


def test_final_epsilon_equals_an_uninterrupted_run_of_as_many_updates(
    killed_run, uninterrupted
):
    model, history = uninterrupted
    result = killed_run.result
    assert model.optimizer.privacy_ledger.get_config() == result["ledger"]
    assert history.history["epsilon"][-1] == pytest.approx(
        result["logger_epsilon"], rel=1e-12
    )


def test_resumed_process_draws_new_noise_for_the_rerun_step(killed_run):
    run = killed_run
    lost = _probe_step(run.first, run.restored)
    rerun = _probe_step(run.second, 0)
    assert np.abs(lost).max() > 0.1 * NOISE_SCALE
    assert not _same_noise(lost, rerun)


# ---------------------------------------------------------------------------
# ModelCheckpoint + load_model + fit.
# ---------------------------------------------------------------------------


def test_model_checkpoint_resume_has_the_uninterrupted_ledger(
    tmp_path, killed_run, uninterrupted
):
    x, y = worker.make_data()
    total = killed_run.received
    path = str(tmp_path / "checkpoint.keras")
    # Checkpoints after updates 4 and 8; the run dies after update 9.
    model = worker.build_model()
    with pytest.raises(worker.Interrupted):
        model.fit(
            x,
            y,
            batch_size=worker.BATCH_SIZE,
            epochs=1,
            verbose=0,
            callbacks=[
                keras.callbacks.ModelCheckpoint(path, save_freq=4),
                worker.Recorder(raise_at=9),
            ],
        )
    loaded = keras.saving.load_model(path)
    assert keras_dp.is_private(loaded)
    assert fixtures.steps_taken(loaded) == 8
    resumed = loaded.fit(
        x,
        y,
        batch_size=worker.BATCH_SIZE,
        steps_per_epoch=total - 8,
        epochs=1,
        verbose=0,
        callbacks=[keras_dp.EpsilonLogger(delta=worker.DELTA)],
    )
    straight, uninterrupted_history = uninterrupted
    assert ledger_lib.optimizer_steps(loaded) == total
    assert (
        loaded.optimizer.privacy_ledger.get_config()
        == straight.optimizer.privacy_ledger.get_config()
    )
    expected = fixtures.rdp_reference(
        [(worker.NOISE_MULTIPLIER, SAMPLE_RATE, total)], worker.DELTA
    )
    assert resumed.history["epsilon"][-1] == pytest.approx(expected, rel=1e-9)
    assert resumed.history["epsilon"][-1] == pytest.approx(
        uninterrupted_history.history["epsilon"][-1], rel=1e-12
    )
    summary = keras_dp.privacy_summary(loaded, delta=worker.DELTA)
    assert f"noisy updates taken: {total}\n" in summary
    assert f"epsilon: {expected:.4g} at delta=" in summary


# ---------------------------------------------------------------------------
# Noise of the re-run step, in-process restores and fixed seeds.
# ---------------------------------------------------------------------------


def _sampler(seed=None, secure_mode=False):
    x, y = worker.make_data()
    kwargs = {"secure_mode": True} if secure_mode else {}
    return keras_dp.data.PoissonSampler(
        x, y, batch_size=worker.BATCH_SIZE, seed=seed, **kwargs
    )


def _fit_until(model, sampler, backup, raise_at):
    """`fit` with BackupAndRestore until it is interrupted after update
    `raise_at`; the recorder's rows (row 0: after the restore)."""
    recorder = worker.Recorder(raise_at=raise_at)
    with pytest.raises(worker.Interrupted):
        model.fit(
            sampler,
            epochs=worker.EPOCHS,
            verbose=0,
            callbacks=[
                keras.callbacks.BackupAndRestore(
                    str(backup), save_freq=worker.SAVE_FREQ
                ),
                recorder,
            ],
        )
    return recorder.rows


def _logical_batch(sampler, rows, k):
    """The indices of the batch of the update after row `k` (a sampler
    counts its epochs from the first epoch of its `fit`)."""
    epoch = rows[k + 1]["epoch"] - rows[1]["epoch"]
    drawn = copy.copy(sampler)
    drawn.epoch = epoch
    return drawn.sample_indices(rows[k + 1]["batch"])


@pytest.mark.parametrize("secure_mode", [False, True], ids=["default", "secure"])
def test_restore_in_the_same_process_draws_new_noise(tmp_path, secure_mode):
    # Keras's own BackupAndRestore pattern: `fit` raises, the same model
    # fits again and restores the backup. Without a seed the noise key's
    # secret belongs to the optimizer object, so only a new key after the
    # restore keeps the re-run step from drawing the lost step's noise.
    backup = tmp_path / "backup"
    model = worker.build_model(secure_mode=secure_mode)
    first = _fit_until(model, _sampler(secure_mode=secure_mode), backup, STALL_AT)
    second = _fit_until(model, _sampler(secure_mode=secure_mode), backup, 13)
    restored = second[0]["updates"]
    assert restored == 12 and first[restored]["checksum"] == second[0]["checksum"]
    lost = _probe_step(first, restored)
    assert np.abs(lost).max() > 0.1 * NOISE_SCALE
    assert not _same_noise(lost, _probe_step(second, 0))


def test_fixed_noise_seed_warns_at_the_restore_that_reuses_its_noise(tmp_path):
    # An integer noise seed reproduces its noise, also for the steps that
    # re-run after a restore; they run on other batches whatever the
    # sampler's seed (Keras re-runs the interrupted epoch from its first
    # batch, and a new sampler starts from its first epoch or from a new
    # seed), so the restore warns. With a seed the noise does not depend on
    # the optimizer object, so one model stands for the new processes.
    backup = tmp_path / "backup"
    model = worker.build_model(seed=7)
    first_sampler = _sampler(seed=3)
    first = _fit_until(model, first_sampler, backup, STALL_AT)
    # The probe moves by minus the learning rate times the noise.
    z = np.concatenate([_probe_step(first, k) for k in range(STALL_AT)])
    z = z / -NOISE_SCALE
    assert abs(z.mean()) < 5 / np.sqrt(z.size)
    assert abs(z.std() - 1) < 5 / np.sqrt(2 * z.size)
    for sampler_seed in (3, None):
        sampler = _sampler(seed=sampler_seed)
        with pytest.warns(UserWarning, match="fixed seed=7 was restored"):
            # Interrupted after one update: the backup stays for the next.
            second = _fit_until(model, sampler, backup, 13)
        restored = second[0]["updates"]
        assert restored == 12
        assert _same_noise(_probe_step(first, restored), _probe_step(second, 0))
        lost_batch = _logical_batch(first_sampler, first, restored)
        rerun_batch = _logical_batch(sampler, second, 0)
        assert not np.array_equal(np.sort(lost_batch), np.sort(rerun_batch))


def test_restore_without_drawn_noise_does_not_warn(tmp_path):
    # A model saved before any noisy update has no noise to reuse.
    model = worker.build_model(seed=7)
    model.optimizer.build(model.trainable_variables)
    path = str(tmp_path / "fresh.weights.h5")
    model.save_weights(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.load_weights(path)
    assert not [w for w in caught if "fixed seed" in str(w.message)]
