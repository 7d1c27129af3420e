"""keras_dp benchmark suite: DP vs non-private step time and peak memory.

    .venv/bin/python benchmarks/run.py [--backends tensorflow,jax[,torch]]
        [--models mlp,mlp1,cnn,transformer,resnet] [--batch 256] [--vmap]
        [--low-rank] [--peers DIR [--peer-venvs DIR]] [--write /tmp/results]

For each backend and model, one fresh process times every mode (`plain`:
keras SGD; `dp-poisson`, the headline row: what `fit(x, y)` on a private
model does by default, the fast path on Poisson-sampled batches padded as
`fit` pads them for the backend's step; `dp`: the fast path on fixed-size batches like the peers;
optionally `dp-vmap`, the general path, and `dp-rgp`, `dp-lsg`,
LowRankSparse) epoch by epoch in turn, and one fresh process per mode
measures its memory (see `step.py`). Timing protocol of the peers'
benchmark scripts (Opacus, TF Privacy, jax_privacy; not part of this
repository): `model.fit` on random data, a warm-up epoch, then the median
over timed epochs of 20 steps. `--peers DIR` also runs their `bench_*.py`
from the folder DIR, each in its own venv under `--peer-venvs` (default:
the system's temporary folder; `PEER_RUNS` names them) when that venv
exists, after keras_dp's rows. The peers' scripts define `mlp` and `cnn`
only (`PEER_MODELS`).

`--backends torch` (Keras's PyTorch backend, eager, on the CPU) measures
memory as on JAX: resident memory only, no allocator column. Its peer is
Opacus (`bench_opacus.py`, venv `venv-opacus`), PyTorch's own DP-SGD on
the same architectures written in `torch.nn`.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# (venv folder under --peer-venvs, script in --peers, its arguments, label)
PEER_RUNS = [
    ("venv-opacus", "bench_opacus.py", ["hooks"], "Opacus hooks"),
    ("venv-opacus", "bench_opacus.py", ["ghost"], "Opacus ghost"),
    ("venv-opacus", "bench_opacus.py", ["functorch"], "Opacus functorch"),
    ("venv-jp", "bench_jax_privacy.py", [], "jax_privacy keras_api"),
    ("venv-tfp", "bench_tf_privacy.py", ["fast"], "TF Privacy fast"),
    ("venv-tfp", "bench_tf_privacy.py", ["optimizer"], "TF Privacy optimizer"),
]
# The models the peers' scripts define (the suite's others have no peer).
PEER_MODELS = ("mlp", "cnn")
HEADER = (
    "| backend | model | mode | plain step s | DP step s | time ratio "
    "| plain MB | DP MB | memory ratio | TF allocator ratio | path |"
)


def run_step(backend, args, timeout):
    env = dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=ROOT)
    cmd = [sys.executable, os.path.join(HERE, "step.py")] + args
    return json_result(cmd, env, timeout)


def json_result(cmd, env, timeout):
    """The last JSON line `cmd` prints, or `{"error": ...}`."""
    try:
        out = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timeout {timeout}s"}
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"error": (out.stderr.strip().splitlines() or ["?"])[-1][:200]}


def run_peer(peers_dir, venv, script, extra, model, batch, timeout):
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(python):
        return None
    cmd = [python, os.path.join(peers_dir, script), model, str(batch)] + extra
    return json_result(cmd, None, timeout)


def ratio(a, b):
    return None if a is None or b is None else a / b


def fmt(v, digits=2, bold=False):
    if v is None:
        return "n/a"
    text = f"{v:.{digits}f}"
    return f"**{text}**" if bold else text


def benchmark(backend, model, modes, batch, timeout):
    """Rows (dicts) for every DP mode of `model` on `backend`."""
    timing = run_step(backend, [model, "time", ",".join(modes), str(batch)], timeout)
    memory = {
        m: run_step(backend, [model, "memory", m, str(batch)], timeout) for m in modes
    }
    rows = []
    for mode in modes[1:]:
        row = {
            "backend": backend,
            "model": model,
            "mode": mode,
            "timing": timing,
            "memory": {"plain": memory["plain"], mode: memory[mode]},
        }
        errors = [
            r["error"] for r in (timing, memory["plain"], memory[mode]) if "error" in r
        ]
        if errors:
            row["error"] = errors[0]
        else:
            plain_s, dp_s = timing["step_s"]["plain"], timing["step_s"][mode]
            plain_mem, dp_mem = memory["plain"], memory[mode]
            row.update(
                plain_step_s=plain_s,
                dp_step_s=dp_s,
                time_ratio=dp_s / plain_s,
                plain_mb=plain_mem["train_peak_mb"],
                dp_mb=dp_mem["train_peak_mb"],
                memory_ratio=dp_mem["train_peak_mb"] / plain_mem["train_peak_mb"],
                allocator_ratio=ratio(
                    dp_mem["allocator_peak_mb"], plain_mem["allocator_peak_mb"]
                ),
                path=(timing["path"][mode] or ["?"])[0],
            )
        rows.append(row)
    return rows


def low_rank_lines(rows):
    """LowRankSparse step time over the full DP step's, from one timing
    run (the modes alternate in one process)."""
    lines = []
    for row in rows:
        if row["mode"] != "dp" or "error" in row:
            continue
        steps = row["timing"]["step_s"]
        lines.append(
            f"| {row['backend']} | {row['model']} | "
            + " | ".join(
                fmt(ratio(steps.get(mode), steps["dp"]), bold=True)
                for mode in ("dp-rgp", "dp-lsg")
            )
            + " |"
        )
    return lines


def table_line(row):
    if "error" in row:
        return (
            f"| {row['backend']} | {row['model']} | {row['mode']} | "
            f"error: {row['error']} |"
        )
    return (
        f"| {row['backend']} | {row['model']} | {row['mode']} | "
        f"{row['plain_step_s']:.4f} | {row['dp_step_s']:.4f} | "
        f"{fmt(row['time_ratio'], bold=True)} | {row['plain_mb']:.0f} | "
        f"{row['dp_mb']:.0f} | {fmt(row['memory_ratio'], bold=True)} | "
        f"{fmt(row['allocator_ratio'])} | {row['path']} |"
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--backends", default="tensorflow,jax")
    parser.add_argument("--models", default="mlp,mlp1,cnn,transformer,resnet")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--vmap", action="store_true")
    parser.add_argument(
        "--low-rank",
        action="store_true",
        help="also time LowRankSparse (RGP and LSG, rank 8) against full DP",
    )
    parser.add_argument(
        "--peers",
        default=None,
        metavar="DIR",
        help="folder of the peers' bench_*.py scripts",
    )
    parser.add_argument(
        "--peer-venvs",
        default=tempfile.gettempdir(),
        metavar="DIR",
        help="folder of the peers' venvs",
    )
    parser.add_argument("--timeout", type=int, default=2400)
    parser.add_argument(
        "--peer-timeout",
        type=int,
        default=420,
        help="seconds per peer run (some take hours)",
    )
    parser.add_argument(
        "--write", default=None, help="path prefix for .json and .table.md results"
    )
    args = parser.parse_args()
    modes = (
        ["plain", "dp-poisson", "dp"]
        + (["dp-vmap"] if args.vmap else [])
        + (["dp-rgp", "dp-lsg"] if args.low_rank else [])
    )
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    print(HEADER)
    print("|" + "---|" * 11, flush=True)
    rows = []
    for backend in args.backends.split(","):
        for model in args.models.split(","):
            for row in benchmark(backend, model, modes, args.batch, args.timeout):
                print(table_line(row), flush=True)
                rows.append(row)
    if args.low_rank:
        print("\n| backend | model | RGP step / DP step | LSG step / DP step |")
        print("|---|---|---|---|")
        for line in low_rank_lines(rows):
            print(line, flush=True)
    peer_lines = []
    if args.peers:
        for model in args.models.split(","):
            if model not in PEER_MODELS:
                continue
            for venv_name, script, extra, label in PEER_RUNS:
                venv = os.path.join(args.peer_venvs, venv_name)
                result = run_peer(
                    args.peers,
                    venv,
                    script,
                    extra,
                    model,
                    args.batch,
                    args.peer_timeout,
                )
                if result is None:
                    line = f"| {label} | {model} | not run: {venv} missing |"
                elif "error" in result:
                    line = f"| {label} | {model} | error: {result['error']} |"
                else:
                    line = (
                        f"| {label} | {model} | {result['plain_step_s']:.4f} "
                        f"| {result['dp_step_s']:.4f} | "
                        f"**{result['ratio']:.2f}** |"
                    )
                print(line, flush=True)
                peer_lines.append(line)
    if args.write:
        with open(args.write + ".json", "w") as f:
            json.dump(rows, f, indent=1)
        with open(args.write + ".table.md", "w") as f:
            f.write(
                f"<!-- {started} to "
                f"{time.strftime('%H:%M:%S UTC', time.gmtime())}: "
                f"benchmarks/run.py {' '.join(sys.argv[1:])} -->\n"
            )
            f.write(HEADER + "\n|" + "---|" * 11 + "\n")
            f.write("\n".join(table_line(r) for r in rows) + "\n")
            if peer_lines:
                f.write(
                    "\n| peer | model | plain step s | DP step s | ratio |\n"
                    "|---|---|---|---|---|\n" + "\n".join(peer_lines) + "\n"
                )


if __name__ == "__main__":
    main()
