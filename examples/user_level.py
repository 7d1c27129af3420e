"""Example-level vs. user-level DP on scikit-learn's digits, 100 users.

The training digits are split among 100 synthetic users with uneven counts
(a seeded assignment: every user gets one digit, the rest go to users
drawn with log-normal weights, so some users hold a handful of digits and
others dozens). The same model is trained twice at the same noise
multiplier:

- example-level DP (`fit` on the arrays: Poisson sampling of examples),
  whose epsilon protects one digit, not a user's digits together;
- user-level DP (`fit` on a `keras_dp.data.UserSampler`: Poisson sampling
  of users, at most `--max-examples-per-user` digits of each, each user's
  gradient clipped as one unit), whose epsilon protects all the digits of
  one user.

    KERAS_BACKEND=jax python examples/user_level.py
    KERAS_BACKEND=jax python examples/user_level.py --smoke   # < 60 s

Each run prints its test accuracy and epsilon (delta=1e-5) and the command
that reproduces it. Nothing is downloaded.
"""

import argparse
import os
import shlex
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import keras_dp  # noqa: E402

DELTA = 1e-5
NUM_USERS = 100


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--users-per-batch", type=int, default=10)
    parser.add_argument("--max-examples-per-user", type=int, default=8)
    parser.add_argument("--noise-multiplier", type=float, default=1.0)
    parser.add_argument("--learning-rate", type=float, default=5e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--smoke", action="store_true", help="one short epoch each, for tests"
    )
    args = parser.parse_args()
    if args.smoke:
        args.epochs = 1
    return args


def load_data():
    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int32")
    return train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)


def assign_users(n, seed):
    """A user id (0 to 99) per training example: one example each, the
    rest by log-normal weights (uneven counts)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    weights = rng.lognormal(0.0, 1.0, NUM_USERS)
    users = np.empty(n, dtype="int64")
    users[order[:NUM_USERS]] = np.arange(NUM_USERS)
    users[order[NUM_USERS:]] = rng.choice(
        NUM_USERS, size=n - NUM_USERS, p=weights / weights.sum()
    )
    return users


def build_model():
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )


def train(data, args, fit_args, level):
    x_test, y_test = data
    keras.utils.set_random_seed(args.seed)
    model = keras_dp.make_private(build_model())
    model.compile(
        optimizer=keras_dp.DPAdam(
            learning_rate=args.learning_rate,
            noise_multiplier=args.noise_multiplier,
            l2_norm_clip=1.0,
        ),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    logger = keras_dp.EpsilonLogger(delta=DELTA)
    history = model.fit(**fit_args, epochs=args.epochs, verbose=0, callbacks=[logger])
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    updates = keras_dp.ledger.optimizer_steps(model)
    (entry,) = model.optimizer.privacy_ledger.entries
    assert logger.privacy_unit == level
    return accuracy, history.history["epsilon"][-1], updates, entry


def main():
    args = parse_args()
    command = " ".join(
        [f"KERAS_BACKEND={keras.backend.backend()}", "python", "examples/user_level.py"]
        + [shlex.quote(a) for a in sys.argv[1:]]
    )
    print(f"reproduce: {command}")
    x_train, x_test, y_train, y_test = load_data()
    users = assign_users(len(x_train), args.seed)
    counts = np.bincount(users, minlength=NUM_USERS)
    print(
        f"data: {len(x_train)} training digits of {NUM_USERS} users "
        f"(examples per user: min {counts.min()}, median "
        f"{int(np.median(counts))}, max {counts.max()}); noise multiplier "
        f"{args.noise_multiplier}, {args.epochs} epochs"
    )
    example_fit = {
        "x": x_train,
        "y": y_train,
        "batch_size": args.batch_size,
    }
    sampler = keras_dp.data.UserSampler(
        x_train,
        y_train,
        users,
        users_per_batch=args.users_per_batch,
        max_examples_per_user=args.max_examples_per_user,
        seed=args.seed,
    )
    runs = [
        ("example", example_fit, "one example"),
        ("user", {"x": sampler}, "all the examples of one user"),
    ]
    for level, fit_args, covers in runs:
        accuracy, epsilon, updates, entry = train(
            (x_test, y_test), args, fit_args, level
        )
        unit = "examples" if level == "example" else "users"
        extra = (
            ""
            if level == "example"
            else f", at most {args.max_examples_per_user} examples per user"
        )
        print(
            f"{level}-level DP: test accuracy {accuracy:.4f}, epsilon "
            f"{epsilon:.3f} (delta={DELTA:g}; protects {covers}; "
            f"q={entry['sample_rate']:.4g} of {entry['n']} {unit}{extra}; "
            f"{updates} updates)"
        )


if __name__ == "__main__":
    main()
