"""Extra training time of `keras_dp.IndividualPrivacy`.

    KERAS_BACKEND=jax python benchmarks/individual_privacy_cost.py [MODEL]
        [--n 50000] [--epochs 5] [--every-epochs 5] [--rounds 4]

Builds the suite's model `MODEL` (default `mlp`) twice, private with
DPSGD, and times whole `fit(x, y, epochs=E, batch_size=256)` calls with
and without the callback, alternated in one process (the order swapped
each round, so slow drifts of a shared machine fall on both). With
`--every-epochs` equal to `--epochs`, each timed fit runs one norm pass
(at its start). Prints one JSON line: total wall time with / without, the
passes' share of the training time, and one pass against one training
epoch.
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

import keras_dp  # noqa: E402
import models  # noqa: E402

BATCH = 256


def build(name):
    keras.utils.set_random_seed(0)
    model = keras_dp.make_private(models.build(name))
    model.compile(
        optimizer=keras_dp.DPSGD(
            learning_rate=0.1, noise_multiplier=1.0, l2_norm_clip=1.0
        ),
        loss=models.loss(name),
    )
    return model


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default="mlp")
    parser.add_argument("--n", type=int, default=50000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--every-epochs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    x, y = models.data(args.model, args.n)
    without, tracked = build(args.model), build(args.model)
    callback = keras_dp.IndividualPrivacy(
        x, y, delta=1e-5, every_epochs=args.every_epochs
    )
    pass_seconds = []
    measure = callback.measure

    def timed_measure():
        start = time.perf_counter()
        measure()
        pass_seconds.append(time.perf_counter() - start)

    callback.measure = timed_measure
    # Compilation of the step and of the pass, outside the timings.
    without.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    tracked.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[callback])
    pass_seconds.clear()
    seconds = {"without": 0.0, "with": 0.0}
    for round_index in range(args.rounds):
        runs = [("without", without, []), ("with", tracked, [callback])]
        for label, model, callbacks in runs[:: 1 if round_index % 2 == 0 else -1]:
            start = time.perf_counter()
            model.fit(
                x,
                y,
                batch_size=BATCH,
                epochs=args.epochs,
                verbose=0,
                callbacks=callbacks,
            )
            seconds[label] += time.perf_counter() - start
    epoch_seconds = seconds["without"] / (args.rounds * args.epochs)
    print(
        json.dumps(
            {
                "backend": keras.backend.backend(),
                "model": args.model,
                "n": args.n,
                "every_epochs": args.every_epochs,
                "wall_ratio": seconds["with"] / seconds["without"],
                "passes_share": sum(pass_seconds) / seconds["without"],
                "pass_per_epoch": min(pass_seconds) / epoch_seconds,
                "passes": len(pass_seconds),
            }
        )
    )


if __name__ == "__main__":
    main()
