"""Times one (backend, model, mode) configuration in a fresh process.

Usage: KERAS_BACKEND=jax python benchmarks/step.py MODEL MODE [BATCH]
MODE: plain | dp (fast path, fixed batches) | dp-vmap (general path, fixed
batches) | dp-poisson (fast path, Poisson sampling with padding).

Protocol of /work/shared/peers: model.fit on random data, one warm-up epoch
(compiles), then the median of 3 timed epochs of 20 steps. Prints one JSON
line with the step time and the peak resident memory growth (ru_maxrss
after training minus ru_maxrss once data and frameworks are loaded).
"""

import json
import os
import resource
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import keras  # noqa: E402

import models  # noqa: E402

STEPS = 20


def maxrss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def status_mb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def reset_peak():
    """Resets VmHWM (Linux >= 4.0), so it shows the peak from now on."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def main():
    name, mode = sys.argv[1], sys.argv[2]
    batch = int(sys.argv[3]) if len(sys.argv) > 3 else 256
    import keras_dp

    x, y = models.data(name, batch * STEPS)
    keras.utils.set_random_seed(0)
    baseline = maxrss_mb()
    baseline_rss = status_mb("VmRSS")
    model = models.build(name)
    loss = "categorical_crossentropy"
    path = None
    if mode == "plain":
        model.compile(optimizer=keras.optimizers.SGD(0.01), loss=loss)
    else:
        model = keras_dp.make_private(
            model,
            poisson_sampling=(mode == "dp-poisson"),
            per_example="vmap" if mode == "dp-vmap" else "fast",
        )
        model.compile(
            optimizer=keras_dp.DPSGD(
                learning_rate=0.01, l2_norm_clip=1.0,
                noise_multiplier=float(os.environ.get("BENCH_NOISE", "1.0")),
            ),
            loss=loss,
        )

    def epoch():
        model.fit(x, y, batch_size=batch, epochs=1, verbose=0)

    epoch()  # compile + warm-up
    reset_peak()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        epoch()
        times.append((time.perf_counter() - start) / STEPS)
    if mode != "plain":
        path = model._keras_dp.per_example_path
    print(json.dumps({
        "backend": keras.backend.backend(), "model": name, "mode": mode,
        "batch": batch, "step_s": float(np.median(times)),
        "peak_mb": maxrss_mb() - baseline,
        "train_peak_mb": status_mb("VmHWM") - baseline_rss, "path": path,
    }))


if __name__ == "__main__":
    main()
