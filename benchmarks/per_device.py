"""Per-device clipping groups: the fast path against the vmap path.

    python benchmarks/per_device.py [MODEL] [--batch B] [--devices 8]

Runs on JAX with `--devices` virtual CPU devices (a real accelerator mesh
when there is one: then `--devices` is ignored) under a
`keras.distribution.ModelParallel` mesh of (2, devices / 2) over the
"batch" and "model" axes. Every variable whose last axis divides by the
model axis is sharded along it (kernels, embedding tables, normalization
scales), so the step clips `devices / 2` shard groups plus the replicated
variables. MODEL is one of `benchmarks/models.py` (default `transformer`,
the small keras-hub BERT).

Modes, each a model built under the mesh and trained with fixed batches:
`flat` (one clipping group, fast path), `per_device` (fast path) and
`per_device-vmap` (`per_example="vmap"`). As `benchmarks/step.py time`,
all are compiled and warmed up first, then timed in alternating rounds of
one 20-step epoch each; prints one JSON line with each mode's median step
time and the ratios to `flat`.
"""

import argparse
import json
import os
import statistics
import sys
import time
import warnings

warnings.filterwarnings("ignore")
os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

STEPS, ROUNDS = 20, 5
MODES = ("flat", "per_device", "per_device-vmap")


def layout_for(model, mesh, shards):
    """Each variable sharded along its last axis where that divides."""
    import keras

    layout = keras.distribution.LayoutMap(mesh)
    for v in model.weights:
        if v.shape and v.shape[-1] % shards == 0:
            layout[v.path] = (None,) * (len(v.shape) - 1) + ("model",)
    return layout


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="transformer")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--devices", type=int, default=8)
    args = parser.parse_args()
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    import jax
    import keras
    import numpy as np

    import keras_dp
    import models

    devices = jax.devices()
    shards = len(devices) // 2
    mesh = keras.distribution.DeviceMesh((2, shards), ["batch", "model"], devices)
    x, y = models.data(args.model, args.batch * STEPS)
    keras.utils.set_random_seed(0)
    layout = layout_for(models.build(args.model), mesh, shards)
    distribution = keras.distribution.ModelParallel(
        layout_map=layout, batch_dim_name="batch"
    )
    keras.distribution.set_distribution(distribution)
    trained = {}
    for mode in MODES:
        keras.utils.set_random_seed(0)
        model = keras_dp.make_private(
            models.build(args.model),
            poisson_sampling=False,
            per_example="vmap" if mode.endswith("vmap") else "fast",
        )
        model.compile(
            optimizer=keras_dp.DPSGD(
                learning_rate=0.01,
                noise_multiplier=1.0,
                l2_norm_clip=1.0,
                clip_groups="flat" if mode == "flat" else "per_device",
            ),
            loss=models.loss(args.model),
        )
        model.fit(x, y, batch_size=args.batch, epochs=1, verbose=0)
        trained[mode] = model
    times = {mode: [] for mode in MODES}
    for _ in range(ROUNDS):
        for mode in MODES:
            start = time.perf_counter()
            trained[mode].fit(x, y, batch_size=args.batch, epochs=1, verbose=0)
            times[mode].append((time.perf_counter() - start) / STEPS)
    medians = {mode: statistics.median(t) for mode, t in times.items()}
    groups = trained["per_device"].optimizer.clip_group_names
    print(
        json.dumps(
            {
                "model": args.model,
                "batch": args.batch,
                "devices": f"{len(devices)} x {devices[0].platform}",
                "groups": len(groups),
                "step_ms": {m: round(1000 * t, 2) for m, t in medians.items()},
                "ratio_to_flat": {
                    m: round(t / medians["flat"], 3) for m, t in medians.items()
                },
                "sharded_variables": int(
                    np.sum([v.path in layout for v in trained["flat"].weights])
                ),
            }
        )
    )


if __name__ == "__main__":
    main()
