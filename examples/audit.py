"""Audit the privacy of one training run with canaries (keras_dp.audit).

Trains an MLP on MNIST four times, each time with its own canaries: without
privacy and with keras_dp's DP-SGD, audited black box (out-of-distribution
canary images, scored on the final model) and white box (Dirac canary
gradients, observed at every update). For each run it prints the epsilon
the run claims and the lower bound the audit proves, at 95% confidence.

    KERAS_BACKEND=jax python examples/audit.py            # MNIST (downloads it)
    KERAS_BACKEND=jax python examples/audit.py --smoke    # offline, seconds

`--smoke` trains on scikit-learn's 8x8 digits instead (nothing is
downloaded) with fewer canaries and updates. A lower bound above the claim
would mean the run leaks more than its epsilon says (a bug); a bound below
it is what a correct implementation gives, and proves nothing by itself.
The canaries and the DP noise are seeded by `--seed`; the Poisson batches
are not, so the bounds move a little between runs.
"""

import argparse
import os
import shlex
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

import keras_dp  # noqa: E402
from keras_dp import audit  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke", action="store_true", help="offline: scikit-learn digits, small"
    )
    parser.add_argument("--canaries", type=int, default=None, help="m per audit")
    parser.add_argument("--epochs", type=int, default=None, help="DP epochs")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--noise-multiplier", type=float, default=1.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def settings(args):
    """The run's sizes: small for `--smoke`, MNIST-sized otherwise."""
    # The non-private run: full-batch Adam on the digits, minibatches on
    # MNIST (None: the whole training set in one batch).
    defaults = (
        dict(canaries=300, epochs=3, batch_size=128, memorise=(60, None))
        if args.smoke
        else dict(canaries=1000, epochs=5, batch_size=256, memorise=(20, 128))
    )
    for name in ("canaries", "epochs", "batch_size"):
        if getattr(args, name) is not None:
            defaults[name] = getattr(args, name)
    return defaults


def load_data(smoke):
    if smoke:
        from sklearn.datasets import load_digits

        digits = load_digits()
        return (digits.data / 16.0).astype("float32"), digits.target.astype("int32")
    (x, y), _ = keras.datasets.mnist.load_data()
    return (x.reshape(len(x), -1) / 255.0).astype("float32"), y.astype("int32")


def build_mlp(features, width):
    return keras.Sequential(
        [
            keras.Input((features,)),
            keras.layers.Dense(width, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )


def main():
    args = parse_args()
    run = settings(args)
    x, y = load_data(args.smoke)
    features = x.shape[1]
    command = " ".join(
        [f"KERAS_BACKEND={keras.backend.backend()}", "python", "examples/audit.py"]
        + [shlex.quote(a) for a in sys.argv[1:]]
    )
    print(f"reproduce: {command}")
    print(
        f"data: {'digits' if args.smoke else 'MNIST'}, {len(x)} examples; "
        f"{run['canaries']} canaries per audit; delta={args.delta:g}"
    )

    def plain_model():
        # Adam for many epochs: it memorises what it sees.
        keras.utils.set_random_seed(args.seed)
        model = build_mlp(features, 256)
        model.compile(
            optimizer=keras.optimizers.Adam(2e-2 if args.smoke else 1e-3),
            loss="sparse_categorical_crossentropy",
        )
        return model

    def private_model(noise_multiplier):
        keras.utils.set_random_seed(args.seed)
        model = keras_dp.make_private(build_mlp(features, 64))
        model.compile(
            optimizer=keras_dp.DPSGD(
                learning_rate=0.5,
                noise_multiplier=noise_multiplier,
                l2_norm_clip=1.0,
                # Reproducible noise: fine for an audit run, never for a
                # model you release.
                seed=args.seed,
            ),
            loss="sparse_categorical_crossentropy",
        )
        return model

    common = dict(
        num_canaries=run["canaries"],
        delta=args.delta,
        confidence=args.confidence,
        seed=args.seed,
    )
    dp_fit = dict(epochs=run["epochs"], batch_size=run["batch_size"])
    memorise_epochs, memorise_batch = run["memorise"]
    results = [
        (
            "non-private",
            audit.audit_input_canaries(
                plain_model,
                x,
                y,
                epochs=memorise_epochs,
                batch_size=memorise_batch or len(x) + run["canaries"],
                **common,
            ),
        ),
        (
            "non-private",
            # keras_dp without noise (sigma = 0): it claims epsilon = inf.
            audit.audit_gradient_canaries(
                lambda: private_model(0.0), x, y, **common, **dp_fit
            ),
        ),
        (
            "DP",
            audit.audit_input_canaries(
                lambda: private_model(args.noise_multiplier), x, y, **common, **dp_fit
            ),
        ),
        (
            "DP",
            audit.audit_gradient_canaries(
                lambda: private_model(args.noise_multiplier), x, y, **common, **dp_fit
            ),
        ),
    ]

    print()
    for name, result in results:
        print(f"== {name}, {result.kind} canaries")
        print(result.summary())
    print()
    for name, result in results:
        claimed = (
            "none"
            if result.claimed_epsilon is None
            else f"{result.claimed_epsilon:.3f}"
        )
        verdict = {True: "passed", False: "FAILED", None: "-"}[result.passed]
        print(
            f"{name:<12} {result.kind + ' canaries':<18} claimed epsilon {claimed:>6}  "
            f"lower bound {result.epsilon_lower_bound:.3f} at "
            f"{result.confidence:.0%} confidence  {verdict}"
        )


if __name__ == "__main__":
    main()
