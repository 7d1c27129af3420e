"""Times or measures one benchmark configuration in a fresh process.

    KERAS_BACKEND=jax python benchmarks/step.py MODEL time MODE[,MODE...] [BATCH]
    KERAS_BACKEND=jax python benchmarks/step.py MODEL memory MODE [BATCH]

MODE: plain | dp (fast path, fixed batches) | dp-vmap (general path, fixed
batches) | dp-poisson (fast path, Poisson sampling with padding) |
dp-secure (as dp-poisson, with `secure_mode=True`: noise keyed by OS
entropy at every step and drawn by `keras_dp.secure_noise`, batches drawn
from OS entropy) |
dp-framework-noise (as dp, but the noise from the framework's own random
ops instead of keras_dp's compiled kernel, as with KERAS_DP_NATIVE=0) |
dp-rgp, dp-lsg (as dp, the model wrapped in `keras_dp.LowRankSparse` with
rank 8, sparsity 0 (RGP) or 0.5 (LSG), carriers refreshed every 100
updates; on the fast path).

`time`: builds one model per mode in this process, compiles and warms each
up with one epoch, then times rounds in which every mode runs one epoch of
20 steps, in turn: at least `BENCH_EPOCHS` (default 5) rounds, and more
(up to 50) until the timed epochs add up to `BENCH_SECONDS` (default 10),
so that models with millisecond steps get more than a fraction of a second
of timing. Alternating in one process (as the peers' scripts do) keeps
slow drifts of a shared machine out of the ratios. Prints one JSON line
with each mode's median step time.

`memory`: one mode per process, so that peaks do not mix. After a warm-up
epoch the freed heap is returned to the OS and the peaks are reset; one
more epoch is run. Prints one JSON line with `train_peak_mb` (peak resident
memory during that epoch minus the resident memory once data and frameworks
were loaded: model, optimizer state, compiled step and its buffers),
`peak_mb` (`ru_maxrss` growth over the whole run, compilation included) and,
on TensorFlow, `allocator_peak_mb` (peak bytes held by TensorFlow's CPU
allocator during that epoch). JAX and PyTorch (CPU) have resident memory
only (`allocator_peak_mb` is null). On PyTorch the baseline is taken after
the imports that the first `build` would make (`load_frameworks`), so that
both modes' `train_peak_mb` is the training's own memory.

PyTorch (`KERAS_BACKEND=torch`): Keras's PyTorch trainer, eager (Keras
resolves `jit_compile="auto"` to no compilation on PyTorch, for the plain
model and keras_dp's step alike), on the arrays as on JAX.

On TensorFlow the batches come from a `tf.data.Dataset` with autotuning
off, for plain and DP alike (Poisson batches through the sampler's
`as_tf_dataset`): on a 2-core machine tf.data's autotuner thread
competes with the step for a core and makes about half of the epochs of
`fit(x, y)` take twice as long, for either step.
"""

import contextlib
import ctypes
import gc
import json
import os
import resource
import sys
import time
import warnings
from unittest import mock

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import keras  # noqa: E402

import models  # noqa: E402

STEPS = 20
# Rounds for models whose epochs are short (see `time_modes`).
MAX_ROUNDS = 50


def maxrss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def status_mb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def reset_peaks():
    """Resets VmHWM (Linux >= 4.0) and TensorFlow's allocator peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.reset_memory_stats("CPU:0")


def allocator_peak_mb():
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    return tf.config.experimental.get_memory_info("CPU:0")["peak"] / 2**20


def load_frameworks(name):
    """Imports what the first `build(name, ...)` would import, so that a
    memory baseline taken after it holds them: `keras.utils.set_random_seed`
    imports TensorFlow where it is installed (several hundred MB resident,
    whatever the backend) and the BERT models import keras-hub. Used on
    PyTorch only: the TensorFlow and JAX rows keep the baseline of their
    earlier runs (on JAX these imports count in both modes' MB)."""
    keras.utils.set_random_seed(0)
    if name in models.BERT_CONFIGS:
        import keras_hub  # noqa: F401


def release_freed_heap():
    """Returns freed malloc arenas to the OS (glibc), so RSS is live memory."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def batches(x, y, batch):
    """What `fit` trains on: the arrays, or on TensorFlow a dataset of
    fixed-size batches with tf.data autotuning off (see module docstring)."""
    if keras.backend.backend() != "tensorflow":
        return {"x": x, "y": y, "batch_size": batch}
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(
        batch, drop_remainder=True
    )
    return {"x": dataset.with_options(options)}


LOW_RANK_SPARSITY = {"dp-rgp": 0.0, "dp-lsg": 0.5}


def build(name, mode):
    """The suite's model `name`, compiled for `mode`."""
    import keras_dp

    keras.utils.set_random_seed(0)
    model = models.build(name)
    loss = models.loss(name)
    if mode == "plain":
        model.compile(optimizer=keras.optimizers.SGD(0.01), loss=loss)
        return model
    if mode in LOW_RANK_SPARSITY:
        model = keras_dp.LowRankSparse(
            model, rank=8, sparsity=LOW_RANK_SPARSITY[mode], refresh_every=100
        )
    model = keras_dp.make_private(
        model,
        poisson_sampling=mode in ("dp-poisson", "dp-secure"),
        per_example="vmap" if mode == "dp-vmap" else "fast",
    )
    model.compile(
        optimizer=keras_dp.DPSGD(
            learning_rate=0.01,
            l2_norm_clip=1.0,
            noise_multiplier=float(os.environ.get("BENCH_NOISE", "1.0")),
            secure_mode=mode == "dp-secure",
        ),
        loss=loss,
    )
    return model


def noise_sampler(mode):
    """Where the step is traced: the framework's sampler for
    `dp-framework-noise`, keras_dp's kernel otherwise."""
    if mode != "dp-framework-noise":
        return contextlib.nullcontext()
    return mock.patch.dict(os.environ, {"KERAS_DP_NATIVE": "0"})


def poisson_batches(x, y, batch, secure_mode):
    """What `fit(x, y)` on a private model trains on (Poisson batches), or
    on TensorFlow the same sampler's `tf.data` form with autotuning off,
    as `batches` gives the other modes: through `fit(x, y)` Keras would
    read the sampler with autotuning on, for this mode only."""
    if keras.backend.backend() != "tensorflow":
        return {"x": x, "y": y, "batch_size": batch}
    import keras_dp
    import tensorflow as tf

    sampler = keras_dp.data.PoissonSampler(
        x, y, batch_size=batch, secure_mode=secure_mode
    )
    options = tf.data.Options()
    options.autotune.enabled = False
    return {"x": sampler.as_tf_dataset().with_options(options)}


def fit_epoch(model, mode, x, y, batch):
    if mode in ("dp-poisson", "dp-secure"):
        data = poisson_batches(x, y, batch, secure_mode=mode == "dp-secure")
    else:
        data = batches(x, y, batch)
    model.fit(**data, epochs=1, verbose=0)


def path_of(model, mode):
    return None if mode == "plain" else model._keras_dp.per_example_path


def time_modes(name, modes, batch):
    x, y = models.data(name, batch * STEPS)
    built = {mode: build(name, mode) for mode in modes}
    for mode, model in built.items():
        with noise_sampler(mode):
            fit_epoch(model, mode, x, y, batch)  # compile + warm-up
    times = {mode: [] for mode in modes}
    min_rounds = int(os.environ.get("BENCH_EPOCHS", "5"))
    min_seconds = float(os.environ.get("BENCH_SECONDS", "10"))
    timed = 0.0
    while len(times[modes[0]]) < min_rounds or (
        timed < min_seconds and len(times[modes[0]]) < MAX_ROUNDS
    ):
        for mode, model in built.items():
            start = time.perf_counter()
            fit_epoch(model, mode, x, y, batch)
            elapsed = time.perf_counter() - start
            timed += elapsed
            times[mode].append(elapsed / STEPS)
    return {
        "backend": keras.backend.backend(),
        "model": name,
        "batch": batch,
        "step_s": {m: float(np.median(t)) for m, t in times.items()},
        "epochs_s": times,
        "path": {m: path_of(built[m], m) for m in modes},
    }


def measure_memory(name, mode, batch):
    x, y = models.data(name, batch * STEPS)
    if keras.backend.backend() == "torch":
        load_frameworks(name)
    baseline = maxrss_mb()
    baseline_rss = status_mb("VmRSS")
    model = build(name, mode)
    with noise_sampler(mode):
        fit_epoch(model, mode, x, y, batch)  # compile + warm-up
    release_freed_heap()
    reset_peaks()
    fit_epoch(model, mode, x, y, batch)
    return {
        "backend": keras.backend.backend(),
        "model": name,
        "mode": mode,
        "batch": batch,
        "train_peak_mb": status_mb("VmHWM") - baseline_rss,
        "peak_mb": maxrss_mb() - baseline,
        "allocator_peak_mb": allocator_peak_mb(),
        "path": path_of(model, mode),
    }


def main():
    name, what, modes = sys.argv[1], sys.argv[2], sys.argv[3]
    batch = int(sys.argv[4]) if len(sys.argv) > 4 else 256
    if what == "time":
        result = time_modes(name, modes.split(","), batch)
    elif what == "memory":
        result = measure_memory(name, modes, batch)
    else:
        raise SystemExit(f"unknown measurement {what!r}: time or memory")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
