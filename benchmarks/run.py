"""keras_dp benchmark suite: DP vs non-private step time and peak memory.

    .venv/bin/python benchmarks/run.py [--backends jax,tensorflow]
        [--models cnn,mlp,resnet,transformer] [--batch 256] [--vmap]
        [--poisson] [--peers] [--write benchmarks/RESULTS.md]

Every (backend, model, mode) runs in a fresh subprocess (`step.py`), so the
peak memory of one does not leak into another. Timing protocol of
/work/shared/peers: model.fit on random data, one warm-up epoch, median of
3 timed epochs of 20 steps. Modes: `plain` (keras SGD), `dp` (keras_dp
fast path, fixed-size batches like the peers), optionally `dp-vmap`
(general path) and `dp-poisson` (Poisson sampling with padding rows).
`--peers` also runs /work/shared/peers/bench_*.py in their venvs when those
exist (/tmp/venv-opacus, /tmp/venv-tfp, /tmp/venv-jp).
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PEERS = "/work/shared/peers"
PEER_RUNS = [
    ("/tmp/venv-opacus", "bench_opacus.py", ["hooks"], "Opacus hooks"),
    ("/tmp/venv-opacus", "bench_opacus.py", ["ghost"], "Opacus ghost"),
    ("/tmp/venv-opacus", "bench_opacus.py", ["functorch"], "Opacus functorch"),
    ("/tmp/venv-jp", "bench_jax_privacy.py", [], "jax_privacy keras_api"),
    ("/tmp/venv-tfp", "bench_tf_privacy.py", ["fast"], "TF Privacy fast"),
    ("/tmp/venv-tfp", "bench_tf_privacy.py", ["optimizer"], "TF Privacy optimizer"),
]


def run_step(backend, model, mode, batch, timeout):
    env = dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=ROOT)
    cmd = [sys.executable, os.path.join(HERE, "step.py"), model, mode, str(batch)]
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout {timeout}s"}
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"error": (out.stderr.strip().splitlines() or ["?"])[-1][:200]}


def run_peer(venv, script, extra, model, batch, timeout):
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(python):
        return None
    cmd = [python, os.path.join(PEERS, script), model, str(batch)] + extra
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout {timeout}s"}
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"error": (out.stderr.strip().splitlines() or ["?"])[-1][:200]}


def fmt(v, digits=3):
    return "n/a" if v is None else f"{v:.{digits}f}"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--backends", default="jax,tensorflow")
    parser.add_argument("--models", default="cnn,mlp,resnet,transformer")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--vmap", action="store_true")
    parser.add_argument("--poisson", action="store_true")
    parser.add_argument("--peers", action="store_true")
    parser.add_argument("--timeout", type=int, default=1800)
    parser.add_argument("--peer-timeout", type=int, default=420,
                        help="seconds per peer run (some take hours)")
    parser.add_argument("--write", default=None)
    args = parser.parse_args()
    modes = ["dp"] + (["dp-vmap"] if args.vmap else []) + (
        ["dp-poisson"] if args.poisson else [])
    rows = []
    header = ("| backend | model | mode | plain step s | DP step s | time ratio "
              "| plain peak MB | DP peak MB | peak ratio | train-phase peak ratio "
              "| path |")
    print(header)
    print("|" + "---|" * 11)
    for backend in args.backends.split(","):
        for model in args.models.split(","):
            plain = run_step(backend, model, "plain", args.batch, args.timeout)
            for mode in modes:
                dp = run_step(backend, model, mode, args.batch, args.timeout)
                row = {"backend": backend, "model": model, "mode": mode,
                       "plain": plain, "dp": dp}
                ok = "error" not in plain and "error" not in dp
                if ok:
                    row["ratio"] = dp["step_s"] / plain["step_s"]
                    row["peak_ratio"] = dp["peak_mb"] / plain["peak_mb"]
                    row["train_peak_ratio"] = (
                        dp["train_peak_mb"] / plain["train_peak_mb"])
                    line = (f"| {backend} | {model} | {mode} | "
                            f"{fmt(plain['step_s'], 4)} | {fmt(dp['step_s'], 4)} | "
                            f"**{row['ratio']:.2f}** | {plain['peak_mb']:.0f} | "
                            f"{dp['peak_mb']:.0f} | **{row['peak_ratio']:.2f}** | "
                            f"{row['train_peak_ratio']:.2f} | "
                            f"{(dp.get('path') or ['?'])[0]} |")
                else:
                    line = (f"| {backend} | {model} | {mode} | error: "
                            f"{plain.get('error') or dp.get('error')} |")
                print(line, flush=True)
                rows.append((row, line))
    peer_lines = []
    if args.peers:
        for model in args.models.split(","):
            if model not in ("cnn", "mlp"):
                continue
            for venv, script, extra, label in PEER_RUNS:
                result = run_peer(venv, script, extra, model, args.batch,
                                  args.peer_timeout)
                if result is None:
                    line = f"| {label} | {model} | not run: {venv} missing |"
                elif "error" in result:
                    line = f"| {label} | {model} | error: {result['error']} |"
                else:
                    line = (f"| {label} | {model} | {result['plain_step_s']:.4f} | "
                            f"{result['dp_step_s']:.4f} | **{result['ratio']:.2f}** |")
                print(line, flush=True)
                peer_lines.append(line)
    if args.write:
        with open(args.write + ".json", "w") as f:
            json.dump([r for r, _ in rows], f, indent=1)
        with open(args.write + ".table.md", "w") as f:
            f.write(f"<!-- {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}"
                    f" {' '.join(sys.argv)} -->\n")
            f.write(header + "\n|" + "---|" * 11 + "\n")
            f.write("\n".join(line for _, line in rows) + "\n")
            if peer_lines:
                f.write("\n| peer | model | plain step s | DP step s | ratio |\n"
                        "|---|---|---|---|---|\n" + "\n".join(peer_lines) + "\n")


if __name__ == "__main__":
    main()
