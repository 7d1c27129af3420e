"""Time of one Poisson draw against the dataset size.

    python benchmarks/sampler.py [--sizes 100000,1000000,10000000] [--batch 256]

For each `n`, times `keras_dp.data.poisson_sample` (the batch size from
Binomial(n, q), then that many distinct indices: O(B)) next to the draw it
replaced (a uniform per example, then the indices below `q`: O(n)), both on
one NumPy generator, alternating, and prints one JSON line per `n` with the
median milliseconds per draw and the whole step of a `PoissonSampler`
(draw, gather and padding of a 784-float example).
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from keras_dp import data as data_lib  # noqa: E402


def draw_per_example(rng, n, sample_rate):
    """The O(n) draw: one uniform per example."""
    return rng.permutation(np.flatnonzero(rng.random(n) < sample_rate))


def median_ms(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="100000,1000000,10000000")
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    for n in [int(v) for v in args.sizes.split(",")]:
        q = args.batch / n
        rng = np.random.default_rng(0)
        repeats = 50 if n <= 10**6 else 10
        # Rows of 784 floats that take no memory: the gather reads row 0.
        x = np.broadcast_to(np.zeros((1, 784), "float32"), (n, 784))
        y = np.broadcast_to(np.zeros((1,), "int32"), (n,))
        sampler = data_lib.PoissonSampler(x, y, batch_size=args.batch, seed=0)
        steps = iter(range(10**9))
        result = {
            "n": n,
            "batch": args.batch,
            "per_example_draw_ms": median_ms(
                lambda: draw_per_example(rng, n, q), repeats
            ),
            "poisson_sample_ms": median_ms(
                lambda: data_lib.poisson_sample(rng, n, q), repeats
            ),
            "sampler_step_ms": median_ms(lambda: sampler[next(steps) % 100], repeats),
        }
        print(json.dumps(result))


if __name__ == "__main__":
    main()
