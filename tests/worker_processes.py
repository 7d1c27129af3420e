"""Starting the worker processes of a test that trains across processes
(`test_multiprocess.py`: JAX, `test_multiworker.py`: TensorFlow), and
reading what they wrote."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

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
