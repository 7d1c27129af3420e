"""The examples run end to end offline (small settings, in subprocesses).

Each prints accuracy and epsilon; the tests check both are there and sane.
"""

import os
import re
import subprocess
import sys

import keras
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKEND = keras.backend.backend()


def run_example(name, *args, timeout=600):
    env = dict(os.environ, KERAS_BACKEND=BACKEND)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", name), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def epsilons(output):
    """The epsilon printed on each summary line (progress lines skipped)."""
    values = []
    for line in output.splitlines():
        if " - " in line:  # a Keras progress line
            continue
        match = re.search(r"epsilon\D*?(\d+\.\d+)", line)
        if match:
            values.append(float(match.group(1)))
    return values


def test_digits_demo():
    out = run_example("digits_demo.py", "--epochs", "2")
    assert re.search(r"non-private test accuracy\s+0\.\d+", out), out
    assert re.search(r"DP test accuracy\s+0\.\d+", out), out
    values = epsilons(out)
    assert values and all(0 < e < 100 for e in values), out


@pytest.mark.skipif(
    BACKEND != "tensorflow",
    reason="one backend is enough for the vision example (the text example "
    "covers LowRankSparse on JAX)",
)
def test_dp_vision_lowrank():
    out = run_example("dp_vision_lowrank.py", "--epochs", "1", "--train-size", "400")
    values = epsilons(out)
    assert values and all(0 < e < 100 for e in values), out
    assert "accuracy" in out.lower(), out


@pytest.mark.skipif(
    BACKEND != "jax",
    reason="LowRankSparse on BERT uses the vmap path, which TF/oneDNN "
    "crashes on for EinsumDense (see README, known limitations)",
)
def test_dp_text_classifier_offline():
    pytest.importorskip("keras_hub")
    out = run_example(
        "dp_text_classifier.py",
        "--train-size",
        "200",
        "--epochs",
        "1",
        "--batch-size",
        "50",
        "--seq-len",
        "8",
    )
    values = epsilons(out)
    assert len(values) >= 2 and all(0 < e < 1000 for e in values), out
    assert "accuracy" in out.lower(), out


@pytest.mark.skipif(
    BACKEND != "tensorflow",
    reason="one backend is enough for the audit example (tests/test_audit.py "
    "runs the auditor itself on every backend)",
)
def test_audit_smoke():
    out = run_example("audit.py", "--smoke")
    assert re.search(
        r"^reproduce: KERAS_BACKEND=\w+ python examples/audit.py --smoke$",
        out,
        re.MULTILINE,
    ), out
    rows = re.findall(
        r"^(non-private|DP)\s+(input|gradient) canaries\s+claimed epsilon\s+(\S+)"
        r"\s+lower bound (\d+\.\d+) at 95% confidence",
        out,
        re.MULTILINE,
    )
    runs = {
        (name, kind): (claimed, float(lower)) for name, kind, claimed, lower in rows
    }
    assert len(runs) == 4, out
    assert runs["non-private", "input"][0] == "none", out
    assert runs["non-private", "input"][1] > 1.5, out
    assert runs["non-private", "gradient"][0] == "inf", out
    assert runs["non-private", "gradient"][1] > 2.0, out
    for kind in ("input", "gradient"):
        claimed, lower = runs["DP", kind]
        assert 0 < float(claimed) < 100 and lower <= float(claimed), out
