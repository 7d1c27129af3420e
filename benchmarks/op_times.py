"""Where a DP step's extra time goes: thread time per op type, plain vs DP.

    KERAS_BACKEND=tensorflow python benchmarks/op_times.py MODEL [BATCH]
        [--top N] [--ops TYPE[,TYPE...]] [--mode dp|dp-vmap|dp-poisson]

Builds the suite's plain and DP models (as `step.py` does), warms each up
with two epochs, then records one epoch of each (`step.STEPS` steps) with
TensorFlow's profiler, in one process. Prints, per op type, the time its
kernels ran per step summed over threads ("self time": a kernel that uses
both cores for 1 ms counts up to 2 ms), for the plain and the DP step and
their difference, largest difference first. The last line divides each
total by the step's wall time under the profiler: how many cores the step
kept busy on average. If that figure is about the same for both steps, the
DP step is slower because it does more work, not because it runs with less
parallelism.

`--ops` lists each step's individual ops of the given types, largest
first (their names follow the code's name scopes and `keras.ops` calls).

TensorFlow only: the JAX CPU client's profiler events cover only part of
each step's XLA kernels, so per-op totals from them would mislead. For JAX,
`jax.profiler.trace` with TensorBoard's or Perfetto's trace viewer shows
the timeline.

Example (2-core development machine, see RESULTS.md):

    KERAS_BACKEND=tensorflow python benchmarks/op_times.py resnet --top 12
"""

import argparse
import collections
import glob
import json
import os
import sys
import tempfile
import time

import step  # sets up sys.path (for models) and quiet TF logging
import models


def op_table(xplane_file):
    """Rows of TensorFlow's `framework_op_stats` tool as dicts."""
    from tensorflow.python.profiler.internal import _pywrap_profiler_plugin

    data = _pywrap_profiler_plugin.xspace_to_tools_data(
        [xplane_file], "framework_op_stats", {}
    )[0]
    table = json.loads(data)[0]
    labels = [column["label"] for column in table["cols"]]
    rows = []
    for row in table["rows"]:
        values = [cell.get("v") if cell else None for cell in row["c"]]
        rows.append(dict(zip(labels, values)))
    return [r for r in rows if r["Operation Type"] != "IDLE"]


def profile_epoch(model, mode, x, y, batch, directory):
    """(op rows, wall seconds per step) of one profiled epoch."""
    import tensorflow as tf

    tf.profiler.experimental.start(directory)
    start = time.perf_counter()
    step.fit_epoch(model, mode, x, y, batch)
    wall = (time.perf_counter() - start) / step.STEPS
    tf.profiler.experimental.stop()
    (xplane,) = glob.glob(f"{directory}/**/*.xplane.pb", recursive=True)
    return op_table(xplane), wall


def per_step_ms(rows, key):
    totals = collections.Counter()
    for row in rows:
        totals[row[key]] += row["Total self-time (us)"] / 1000 / step.STEPS
    return totals


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="mlp, cnn, resnet or transformer")
    parser.add_argument("batch", nargs="?", type=int, default=256)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--ops", default="")
    parser.add_argument("--mode", default="dp", choices=("dp", "dp-vmap", "dp-poisson"))
    args = parser.parse_args()
    import keras

    if keras.backend.backend() != "tensorflow":
        raise SystemExit(
            "op_times.py needs KERAS_BACKEND=tensorflow (see its docstring for JAX)."
        )
    x, y = models.data(args.model, args.batch * step.STEPS)
    modes = ("plain", args.mode)
    built = {mode: step.build(args.model, mode) for mode in modes}
    for mode, model in built.items():
        for _ in range(2):  # compile, then a warm epoch
            step.fit_epoch(model, mode, x, y, args.batch)
    rows, walls = {}, {}
    with tempfile.TemporaryDirectory() as root:
        for mode, model in built.items():
            rows[mode], walls[mode] = profile_epoch(
                model, mode, x, y, args.batch, os.path.join(root, mode)
            )
    plain, dp = (per_step_ms(rows[m], "Operation Type") for m in modes)
    print(
        f"{args.model}, batch {args.batch}, TensorFlow: step time under the "
        f"profiler {walls['plain'] * 1e3:.1f} ms plain, "
        f"{walls[args.mode] * 1e3:.1f} ms {args.mode} "
        f"(ratio {walls[args.mode] / walls['plain']:.2f})"
    )
    print(f"{'op type':32s} {'plain ms':>9s} {args.mode + ' ms':>9s} {'diff':>8s}")
    types = sorted(set(plain) | set(dp), key=lambda t: -abs(dp[t] - plain[t]))
    for op_type in types[: args.top]:
        print(
            f"{op_type[:32]:32s} {plain[op_type]:9.2f} {dp[op_type]:9.2f} "
            f"{dp[op_type] - plain[op_type]:+8.2f}"
        )
    total_plain, total_dp = sum(plain.values()), sum(dp.values())
    print(
        f"{'total (thread ms per step)':32s} {total_plain:9.2f} "
        f"{total_dp:9.2f} {total_dp - total_plain:+8.2f}"
    )
    print(
        f"{'cores busy (total / wall)':32s} "
        f"{total_plain / (walls['plain'] * 1e3):9.2f} "
        f"{total_dp / (walls[args.mode] * 1e3):9.2f}"
    )
    if args.ops:
        wanted = set(args.ops.split(","))
        for mode in modes:
            ops = per_step_ms(
                [r for r in rows[mode] if r["Operation Type"] in wanted],
                "Operation Name",
            )
            print(f"\n{mode} ops of type {args.ops}, ms per step:")
            for name, ms in ops.most_common(args.top):
                print(f"{ms:9.2f}  {name}")


if __name__ == "__main__":
    sys.exit(main())
