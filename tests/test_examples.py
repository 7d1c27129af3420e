"""The examples run end to end offline (small settings, in subprocesses).

Each prints accuracy and epsilon; the tests check both are there and sane,
and that the examples' plots are written (into a temporary folder).
"""

import importlib.util
import os
import re
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest

import keras_dp

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
    BACKEND != "torch",
    reason="one backend is enough for the text example (the rules it uses "
    "are tested on every backend); PyTorch's suite is the shortest",
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


def load_example(name):
    """An example script imported as a module (its `main` is not run)."""
    spec = importlib.util.spec_from_file_location(
        f"example_{name}", os.path.join(ROOT, "examples", f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    # As when the script runs: its folder first on the path, for the
    # examples' shared helpers (examples/step_timer.py).
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(os.path.join(ROOT, "examples"))
    return module


def assert_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n", path


def result_lines(output):
    return [line for line in output.splitlines() if line.startswith("result: ")]


@pytest.mark.skipif(
    BACKEND != "torch",
    reason="one backend is enough for the CIFAR-10 recipe (its weight-"
    "standardized convolution is checked on every backend below); "
    "PyTorch's suite is the shortest",
)
def test_cifar10_smoke(tmp_path):
    out = run_example("cifar10.py", "--smoke", "--out", str(tmp_path))
    assert re.search(
        rf"^reproduce: KERAS_BACKEND={BACKEND} python examples/cifar10.py --smoke "
        r"--out \S+$",
        out,
        re.MULTILINE,
    ), out
    assert "augmentations 2;" in out, out
    (line,) = result_lines(out)
    match = re.search(
        r"target epsilon 8: test accuracy (\d+\.\d+)% \(published 79\.5%\), "
        r"epsilon (\d+\.\d+) \(delta=1e-05\), noise multiplier (\d+\.\d+) "
        r"\(published 3\), (\d+) updates in 1 epochs, (\d+\.\d+) steps/s",
        line,
    )
    assert match, line
    accuracy, epsilon, sigma, updates, rate = map(float, match.groups())
    assert 0 <= accuracy <= 100 and 0 < epsilon <= 8.0 and sigma > 0, line
    # 256 examples, logical batch 64: about 4 updates (Poisson sampling).
    assert 1 <= updates <= 8 and rate > 0, line
    assert_png(tmp_path / "epsilon.png")
    assert not (tmp_path / "accuracy_vs_epsilon.png").exists()  # one epsilon


def test_cifar10_weight_standardized_conv_trains_correctly_on_the_fast_path():
    """The WRN's weight-standardized convolution gets the generic rule on
    the fast path (never the closed-form Conv2D rule, which would assume
    the raw kernel), and one private step equals the vmap path's."""
    from keras_dp.per_example.plan import build_plan

    cifar10 = load_example("cifar10")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 10, 6).astype("int32")

    def build():
        keras.utils.set_random_seed(0)
        return cifar10.wide_resnet(10, 1, groups=4, input_shape=(8, 8, 3))

    kinds = {}
    for entry in build_plan(build()):
        kinds.setdefault(type(entry.layer).__name__, set()).add(entry.kind)
    assert kinds["WSConv2D"] == {"generic"}, kinds
    assert kinds["Dense"] == {"dense"}, kinds

    def one_step(per_example):
        model = keras_dp.make_private(build(), per_example=per_example)
        model.compile(
            optimizer=keras_dp.DPSGD(
                learning_rate=1.0, noise_multiplier=0.0, l2_norm_clip=0.05
            ),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        before = [np.array(w) for w in model.get_weights()]
        model.train_on_batch(x, y)
        summary = keras_dp.privacy_summary(model)
        return before, model.get_weights(), summary

    before, fast, summary = one_step("fast")
    assert "per-example gradients: fast\n" in summary + "\n", summary
    _, vmap, _ = one_step("vmap")
    moved = 0
    for b, f, v in zip(before, fast, vmap):
        np.testing.assert_allclose(f, v, rtol=1e-4, atol=1e-6)
        moved += not np.allclose(b, f)
    assert moved > len(before) // 2  # the step really updated the weights


def test_parameter_averaging_moves_once_per_update():
    """cifar10.py passes De et al.'s EMA momentum (per update) unchanged to
    a DP optimizer with gradient accumulation: the average must move at the
    updates only, not at the accumulation steps."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 3)).astype("float32")
    y = x @ rng.normal(size=(3, 1)).astype("float32")
    model = keras_dp.make_private(
        keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)]),
        poisson_sampling=False,
    )
    model.compile(
        optimizer=keras_dp.DPSGD(
            learning_rate=0.2,
            noise_multiplier=0.5,
            seed=0,
            use_ema=True,
            ema_momentum=0.5,
            gradient_accumulation_steps=4,
        ),
        loss="mse",
    )
    kernels = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            kernel = self.model.layers[0].kernel
            kernels.append(np.array(keras.ops.convert_to_numpy(kernel)))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fixed-size batches: a warning
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[Record()])
    assert len(kernels) == 8
    after_updates = [kernels[3], kernels[7]]
    assert not np.allclose(*after_updates)
    expected = 0.5 * after_updates[0] + 0.5 * after_updates[1]
    final = keras.ops.convert_to_numpy(model.layers[0].kernel)
    np.testing.assert_allclose(final, expected, rtol=1e-5, atol=1e-6)


def test_cifar10_augment_flips_and_crops_each_image():
    cifar10 = load_example("cifar10")
    pad = cifar10.CROP_PADDING
    rng = np.random.default_rng(1)
    x = rng.normal(size=(16, 8, 8, 2)).astype("float32")
    out = keras.ops.convert_to_numpy(cifar10.augment(x, keras.random.SeedGenerator(3)))
    assert out.shape == x.shape
    found = set()
    for image, augmented in zip(x, out):
        matches = []
        for flip in (False, True):
            source = image[:, ::-1] if flip else image
            padded = np.pad(source, [(pad, pad), (pad, pad), (0, 0)], mode="reflect")
            for dy in range(2 * pad + 1):
                for dx in range(2 * pad + 1):
                    crop = padded[dy : dy + 8, dx : dx + 8]
                    if np.allclose(crop, augmented, atol=1e-5):
                        matches.append((flip, dy, dx))
        assert matches, "an output is no flip and crop of its input"
        found.add(matches[0])
    # Drawn per image: 16 images do not all get the same flip and crop.
    assert len(found) > 1
    one = keras.ops.convert_to_numpy(
        cifar10.augment(x[0], keras.random.SeedGenerator(3))
    )
    assert one.shape == x[0].shape


@pytest.mark.skipif(
    BACKEND != "torch",
    reason="one backend is enough for the BERT example (the layers it "
    "trains are tested on every backend: test_fast_norms, test_lora); "
    "PyTorch's suite is the shortest",
)
def test_text_lora_smoke(tmp_path):
    pytest.importorskip("keras_hub")
    out = run_example("text_lora.py", "--smoke", "--out", str(tmp_path))
    assert re.search(
        rf"^reproduce: KERAS_BACKEND={BACKEND} python examples/text_lora.py --smoke "
        r"--out \S+$",
        out,
        re.MULTILINE,
    ), out
    lines = result_lines(out)
    assert len(lines) == 5, out
    assert re.search(
        r"non-private fine-tuning: test accuracy 0\.\d+, no privacy, "
        r"([\d,]+) of \1 weights trained, \d+\.\d+ steps/s",
        lines[0],
    ), lines[0]
    runs = {}
    for line in lines[1:]:
        match = re.search(
            r"^result: (DP-LoRA \(rank 2\)|full DP fine-tuning) at target "
            r"epsilon (\d+): test accuracy (0\.\d+|1\.0+), epsilon (\d+\.\d+) "
            r"\(delta=1e-05\), ([\d,]+) of ([\d,]+) weights trained, "
            r"per-example path fast, (\d+\.\d+) steps/s$",
            line,
        )
        assert match, line
        method, target, _, epsilon, trained, total, _ = match.groups()
        assert 0 < float(epsilon) <= float(target), line
        runs[method.split()[0], int(target)] = (
            int(trained.replace(",", "")),
            int(total.replace(",", "")),
        )
    assert set(runs) == {("DP-LoRA", 3), ("DP-LoRA", 8), ("full", 3), ("full", 8)}
    lora_trained, total = runs["DP-LoRA", 8]
    assert runs["full", 8] == (total, total) and 0 < lora_trained < total / 4
    assert_png(tmp_path / "epsilon.png")
    assert_png(tmp_path / "accuracy_vs_epsilon.png")
