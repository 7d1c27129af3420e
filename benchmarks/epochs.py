"""Whole epochs of `fit`, as a user runs them: the default DP path.

    KERAS_BACKEND=jax python benchmarks/epochs.py [MODEL] [--n 60000]
        [--batch 256] [--rounds 5]

Builds, in one process, the suite's model `MODEL` (default `mlp`) three
times: `plain` (keras SGD), `dp` (`make_private` and `fit(x, y)` with every
default: Poisson sampling with padding) and `dp-fixed` (the same with
`poisson_sampling=False`: shuffled fixed-size batches, what the peers'
benchmarks time). Each runs one warm-up epoch (compilation), then
`--rounds` rounds in which each mode runs one whole epoch of `fit(x, y,
batch_size=B)` on `n` random examples, in turn, so that slow drifts of a
shared machine fall on every mode alike. Prints one JSON line with each
mode's median epoch time and its ratio to `plain`. Five rounds by
default: on JAX a Poisson draw beyond the largest padded size compiles
one more batch shape during the epoch it falls in (about 1 step in 700
at batch 256: about one epoch in four at n = 60,000, until the sizes
beyond have compiled), and the median of five stays on the epochs
without one where up to two have one.

`ratio_to_plain` compares medians; `fastest_ratio_to_plain` compares each
mode's fastest epoch. Read the second where a mode's epochs fall into two
groups, as TensorFlow's do on a 2-core machine: `fit(x, y)` reads arrays
through `tf.data` with autotuning, whose thread competes with the step,
and a median of three such epochs can compare a slow epoch with a fast
one.
"""

import argparse
import json
import os
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import models  # noqa: E402

MODES = ("plain", "dp", "dp-fixed")


def build(name, mode):
    import keras_dp

    keras.utils.set_random_seed(0)
    model = models.build(name)
    if mode == "plain":
        model.compile(optimizer=keras.optimizers.SGD(0.01), loss=models.loss(name))
        return model
    model = keras_dp.make_private(model, poisson_sampling=mode == "dp")
    model.compile(
        optimizer=keras_dp.DPSGD(
            learning_rate=0.01, l2_norm_clip=1.0, noise_multiplier=1.0
        ),
        loss=models.loss(name),
    )
    return model


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default="mlp")
    parser.add_argument("--n", type=int, default=60000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    x, y = models.data(args.model, args.n)
    built = {mode: build(args.model, mode) for mode in MODES}
    first = {}
    for mode, model in built.items():
        start = time.perf_counter()
        model.fit(x, y, batch_size=args.batch, epochs=1, verbose=0)
        first[mode] = time.perf_counter() - start
    times = {mode: [] for mode in MODES}
    for _ in range(args.rounds):
        for mode, model in built.items():
            start = time.perf_counter()
            model.fit(x, y, batch_size=args.batch, epochs=1, verbose=0)
            times[mode].append(time.perf_counter() - start)
    epoch_s = {mode: float(np.median(t)) for mode, t in times.items()}
    print(
        json.dumps(
            {
                "backend": keras.backend.backend(),
                "model": args.model,
                "n": args.n,
                "batch": args.batch,
                "epoch_s": epoch_s,
                "ratio_to_plain": {m: epoch_s[m] / epoch_s["plain"] for m in MODES},
                "fastest_ratio_to_plain": {
                    m: min(times[m]) / min(times["plain"]) for m in MODES
                },
                "first_epoch_s": first,
                "epochs_s": times,
            }
        )
    )


if __name__ == "__main__":
    main()
