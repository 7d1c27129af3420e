"""Accuracy at fixed epsilon: keras_dp DP-SGD on scikit-learn digits.

The task of the peers' Opacus utility script (`utility_opacus.py`, kept
outside this repository), so rows compare with Opacus: digits scaled to [0, 1], `train_test_split(test_size=0.25,
random_state=0, stratify=y)`; MLP 64-128-10 ReLU; Poisson sampling with
expected batch 64; 40 epochs; delta 1e-5; flat clipping C = 1; SGD with
momentum 0.9; learning rates {0.01, 0.02, 0.05, 0.1}; for each epsilon the
learning rate with the best mean test accuracy over 5 seeds. The noise
multiplier is calibrated by keras_dp (`target_epsilon`, RDP accountant, as
Opacus's `make_private_with_epsilon`).

    KERAS_BACKEND=jax python benchmarks/utility.py [--seeds 5] [--write F]

Prints one JSON line per epsilon (None: non-private, shuffled batches).
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import keras_dp  # noqa: E402

EPOCHS, BATCH, DELTA = 40, 64, 1e-5
LEARNING_RATES = (0.01, 0.02, 0.05, 0.1)


def load():
    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    return train_test_split(
        x, digits.target, test_size=0.25, random_state=0, stratify=digits.target
    )


def run(data, epsilon, learning_rate, seed):
    x_train, x_test, y_train, y_test = data
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    if epsilon is None:
        optimizer = keras.optimizers.SGD(learning_rate, momentum=0.9)
    else:
        model = keras_dp.make_private(model)
        optimizer = keras_dp.DPSGD(
            learning_rate,
            momentum=0.9,
            l2_norm_clip=1.0,
            target_epsilon=epsilon,
            target_delta=DELTA,
            epochs=EPOCHS,
            seed=seed,
        )
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x_train, y_train, batch_size=BATCH, epochs=EPOCHS, verbose=0)
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    sigma = None if epsilon is None else model.optimizer.noise_multiplier
    return accuracy, sigma


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epsilons", default="1,3,8,none")
    parser.add_argument("--write", default=None, help="append JSON lines here")
    args = parser.parse_args()
    data = load()
    for text in args.epsilons.split(","):
        epsilon = None if text == "none" else float(text)
        start = time.perf_counter()
        best = None
        for learning_rate in LEARNING_RATES:
            runs = [run(data, epsilon, learning_rate, s) for s in range(args.seeds)]
            accuracies = [a for a, _ in runs]
            if best is None or np.mean(accuracies) > best["acc_mean"]:
                best = {
                    "acc_mean": round(float(np.mean(accuracies)), 4),
                    "acc_std": round(float(np.std(accuracies)), 4),
                    "best_lr": learning_rate,
                    "noise_multiplier": runs[0][1],
                }
        line = {
            "library": "keras_dp",
            "backend": keras.backend.backend(),
            "task": "digits-mlp",
            "epsilon": epsilon,
            **best,
            "seconds": round(time.perf_counter() - start, 1),
        }
        print(json.dumps(line), flush=True)
        if args.write:
            with open(args.write, "a") as f:
                f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
