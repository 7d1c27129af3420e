"""DP fine-tuning at equal epsilon: full vs DP-LoRA vs LSG vs RGP.

Offline setup (scikit-learn digits, nothing downloaded):

1. "Public" pre-training: an MLP (64-256-256-10) is trained without privacy
   on digits 0-4 (all of them).
2. Private fine-tuning on digits 5-9 (75 % train / 25 % test, stratified),
   starting from the pre-trained weights, with DP-Adam and the same noise
   multiplier, sampling rate and number of steps for every method, so epsilon
   is identical (printed):
   - full: every weight clipped and noised;
   - DP-LoRA: Keras's built-in `enable_lora(rank)` on both hidden layers
     (frozen kernels, trainable factors, biases and head);
   - LSG: `keras_dp.LowRankSparse(rank, sparsity=0.5)`;
   - RGP: `keras_dp.LowRankSparse(rank, sparsity=0)`.
   The head (10 x 256) is privatised in full by all four methods.
3. Reported: test accuracy on digits 5-9 (mean and std over seeds), noise
   dimension, and the DP step time relative to full fine-tuning (mean time
   of an epoch after the first, divided by its steps; median over epochs).
   Every method takes keras_dp's fast per-example path (ghost norms; for
   LowRankSparse, of the projected activations).

    KERAS_BACKEND=jax python benchmarks/finetune_comparison.py

Defaults: 3 seeds, 12 epochs, batch 64, sigma 1.0, rank 8. About 3-5
minutes on a 2-core CPU.
"""

import argparse
import os
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import keras_dp  # noqa: E402

from private_fine_tuning import DELTA  # noqa: E402
from private_fine_tuning import METHODS  # noqa: E402
from private_fine_tuning import fit_private  # noqa: E402
from private_fine_tuning import for_method  # noqa: E402

LABELS = {
    "full": "Full DP fine-tuning",
    "lora": "DP-LoRA",
    "lsg": "LSG (LowRankSparse, sparsity 0.5)",
    "rgp": "RGP (LowRankSparse, sparsity 0)",
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--noise-multiplier", type=float, default=1.0)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--lora-learning-rate", type=float, default=1e-2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument(
        "--carriers",
        default="weights",
        choices=("weights", "history"),
        help="LowRankSparse carriers (LSG and RGP)",
    )
    parser.add_argument(
        "--refresh-every", type=int, default=20, help="LowRankSparse refresh"
    )
    parser.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated subset"
    )
    return parser.parse_args()


def load():
    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int32")
    public = y < 5
    x_priv, y_priv = x[~public], y[~public]
    x_train, x_test, y_train, y_test = train_test_split(
        x_priv, y_priv, test_size=0.25, random_state=0, stratify=y_priv
    )
    return (x[public], y[public]), (x_train, y_train), (x_test, y_test)


def build():
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(256, activation="relu", name="h1"),
            keras.layers.Dense(256, activation="relu", name="h2"),
            keras.layers.Dense(10, name="head"),
        ]
    )


def pretrain(public, seed):
    keras.utils.set_random_seed(seed)
    model = build()
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(*public, batch_size=32, epochs=20, verbose=0)
    return model.get_weights()


def fine_tune(method, weights, train, test, args, seed):
    keras.utils.set_random_seed(seed)
    model = build()
    model.set_weights(weights)
    model = for_method(
        model,
        method,
        lora_layers=[model.get_layer(name) for name in ("h1", "h2")],
        rank=args.rank,
        sparsity=args.sparsity,
        refresh_every=args.refresh_every,
        exclude=("head",),
        seed=seed,
        carriers=args.carriers,
    )
    run = fit_private(
        model,
        train,
        learning_rate=(
            args.lora_learning_rate if method == "lora" else args.learning_rate
        ),
        noise_multiplier=args.noise_multiplier,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        batch_size=args.batch_size,
        epochs=args.epochs,
        seed=seed,
    )
    _, accuracy = run.model.evaluate(*test, verbose=0)
    return accuracy, run.epsilon, run.steps, run.dimension, run.step_time, run.path


def main():
    args = parse_args()
    start = time.perf_counter()
    public, train, test = load()
    n = len(train[0])
    q = args.batch_size / n
    print(
        f"backend {keras.backend.backend()}; public: {len(public[0])} digits 0-4; "
        f"private: {n} train / {len(test[0])} test digits 5-9"
    )
    print(
        f"sigma {args.noise_multiplier}, q = {args.batch_size}/{n} = {q:.4f}, "
        f"{args.epochs} epochs, rank {args.rank}, delta {DELTA}"
    )
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}: choose from {METHODS}")
    print(
        f"LowRankSparse carriers: {args.carriers}, refresh every {args.refresh_every}"
    )
    results = {m: [] for m in methods}
    for seed in range(args.seeds):
        weights = pretrain(public, seed)
        for method in methods:
            results[method].append(fine_tune(method, weights, train, test, args, seed))
            acc, eps, steps, dim, st, path = results[method][-1]
            print(
                f"  seed {seed} {method:5s} acc {acc:.3f} eps {eps:.3f} "
                f"steps {steps} dim {dim} step {st * 1e3:.1f} ms "
                f"({path} per-example path)",
                flush=True,
            )
    epsilons = {round(r[1], 9) for m in methods for r in results[m]}
    steps = {r[2] for m in methods for r in results[m]}
    expected = (
        keras_dp.compute_epsilon(args.noise_multiplier, q, steps.pop(), DELTA)
        if len(steps) == 1
        else None
    )
    print(
        f"\nepsilon of every run: {sorted(epsilons)} "
        f"(compute_epsilon for plain DP-SGD: {expected})"
    )
    base_method = "full" if "full" in results else methods[0]
    base = np.mean([r[4] for r in results[base_method]])
    print(
        "\n| Method | Test accuracy (mean ± std, "
        f"{args.seeds} seeds) | Noise dimension | DP step time vs {base_method} |"
    )
    print("|---|---|---|---|")
    for method in methods:
        acc = np.array([r[0] for r in results[method]])
        dim = results[method][0][3]
        ratio = np.mean([r[4] for r in results[method]]) / base
        print(
            f"| {LABELS[method]} | {acc.mean():.3f} ± {acc.std():.3f} | "
            f"{dim:,} | {ratio:.2f} |"
        )
    print(f"\ntotal time {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
