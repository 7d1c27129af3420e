"""Starting the worker processes of a test that trains across processes
(`test_multiprocess.py`: JAX, `test_tf_distribute.py`: TensorFlow),
reading what they wrote, and the checks both make of it against the same
training in one process (`multiprocess_worker.train`)."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import keras_dp
import multiprocess_worker as worker
from keras_dp import accounting

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_workers(script, arguments, backend, out, timeout=240, count=2):
    """Runs `python tests/<script> <k> *arguments <out>` for each worker
    `k` of `range(count)` under `backend`, and returns what each wrote:
    `(arrays of process_<k>.npz, result of process_<k>.json)`. Fails the
    test with the logs if a worker fails or does not print OK."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["KERAS_BACKEND"] = backend
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logs = [out / f"log_{k}.txt" for k in range(count)]
    started = []
    for k, log in enumerate(logs):
        with open(log, "w") as f:
            started.append(
                subprocess.Popen(
                    [sys.executable, os.path.join(ROOT, "tests", script), str(k)]
                    + list(arguments)
                    + [str(out)],
                    env=env,
                    cwd=ROOT,
                    stdout=f,
                    stderr=subprocess.STDOUT,
                )
            )
    # A worker that fails leaves the other waiting in a collective: stop
    # it at once rather than at the deadline.
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            codes = [process.poll() for process in started]
            if all(code is not None for code in codes) or any(codes):
                break
            time.sleep(0.2)
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
            process.wait()
    texts = [log.read_text() for log in logs]
    if not all(p.returncode == 0 and "OK" in t for p, t in zip(started, texts)):
        pytest.fail(
            "\n".join(
                f"process {k} (exit code {p.returncode}):\n{t[-4000:]}"
                for k, (p, t) in enumerate(zip(started, texts))
            )
        )
    results = []
    for k in range(count):
        with open(out / f"process_{k}.json") as f:
            results.append((dict(np.load(out / f"process_{k}.npz")), json.load(f)))
    return results


def updates(arrays, prefix):
    """The per-variable updates `prefix_0, prefix_1, ...` a worker wrote."""
    return [
        arrays[f"{prefix}_{k}"] for k in range(len(arrays)) if f"{prefix}_{k}" in arrays
    ]


def assert_update_without_noise_equals(got, reference):
    """A run's update without noise equals the one-process `reference`,
    which moves the weights."""
    assert len(got) == len(reference)
    for a, b in zip(got, reference):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert any(np.abs(u).max() > 1e-3 for u in reference)


def assert_noise_of_one_draw(noisy, reference_run):
    """`noisy` (a run's updates) equals the reference run's update under
    the same seeds, and its probe moved by one draw of the noise per step:
    the probe's update is noise alone, `NOISY_STEPS` draws of std
    `sigma * C / B`, whose standard deviation over 9,216 coordinates has a
    relative standard error of 0.7%; noise added by each process would
    make it sqrt(2) (independent draws) or 2 (the same draw) times larger.
    Tolerance 5%."""
    model, reference, _ = reference_run
    assert len(noisy) == len(reference)
    for a, b in zip(noisy, reference):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    names = [v.path for v in model.trainable_variables]
    probe = np.concatenate(
        [u.ravel() for name, u in zip(names, noisy) if name.startswith("probe")]
    )
    assert probe.size == worker.PROBE * (worker.FEATURES + worker.OUTPUTS)
    expected = (
        worker.LEARNING_RATE
        * worker.NOISE_MULTIPLIER
        * worker.L2_NORM_CLIP
        / worker.BATCH_SIZE
        * np.sqrt(worker.NOISY_STEPS)
    )
    assert abs(np.std(probe) / expected - 1) < 0.05, (np.std(probe), expected)


def assert_ledgers_count_global_steps(results, reference_run):
    """Each process's ledger (`results` of `run_workers`) holds the global
    steps at the global rate q = B / n, and its epsilon is one process's
    (the reference run's) for the same q, sigma and steps."""
    model, _, sampler = reference_run
    steps, epsilon = worker.epsilon(model)
    entries = model.optimizer.privacy_ledger.get_config()["entries"]
    assert steps == worker.NOISY_STEPS
    assert sampler.sample_rate == worker.BATCH_SIZE / worker.N
    direct = accounting.compute_epsilon(
        worker.NOISE_MULTIPLIER, sampler.sample_rate, steps, worker.DELTA
    )
    assert epsilon == pytest.approx(direct, rel=1e-12)
    for _, result in results:
        assert result["steps"] == steps
        assert result["entries"] == json.loads(json.dumps(entries))
        assert result["epsilon"] == pytest.approx(epsilon, rel=1e-12)


def assert_shards_are_one_sample(results):
    """The two processes' first batches are the parts, in their own
    halves of the rows, of the one-process sampler's batch."""
    x, y = worker.data()
    whole = keras_dp.data.PoissonSampler(
        x, y, batch_size=worker.BATCH_SIZE, steps_per_epoch=1, seed=worker.SAMPLING_SEED
    )
    (first, r0), (second, _) = results
    whole.epoch = r0["sampled_epoch"]
    half = worker.N // 2
    assert np.all(first["sampled"] < half) and np.all(second["sampled"] >= half)
    union = np.concatenate([first["sampled"], second["sampled"]])
    np.testing.assert_array_equal(np.sort(union), np.sort(whole.sample_indices(0)))
