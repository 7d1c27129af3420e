"""DP-Adam on all weights vs. LowRankSparse (RGP / LSG) on an image task.

The same small CNN is trained privately twice, with the same noise
multiplier, sampling rate and number of steps (hence the same epsilon):

- "full": `keras_dp.make_private(model)`: every weight is clipped and noised;
- "low-rank": `keras_dp.LowRankSparse(model, rank, sparsity)`: each kernel's
  per-example gradient is projected on rank-r carriers (kept sparse at the
  given sparsity) before clipping, and the noise is drawn in that much
  smaller space (the classification head is excluded: it is small).

    python examples/dp_vision_lowrank.py                   # digits, offline
    python examples/dp_vision_lowrank.py --dataset mnist   # downloads MNIST
    KERAS_BACKEND=jax python examples/dp_vision_lowrank.py

scikit-learn's 8x8 digits ship with scikit-learn (nothing is downloaded);
`--dataset mnist` uses `keras.datasets.mnist` (needs network the first
time). The script prints test accuracy, epsilon and the noise dimension
(number of noised coordinates per step) of both runs.
"""

import argparse
import os
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

import keras_dp  # noqa: E402

DELTA = 1e-5


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=["digits", "mnist"], default="digits")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--noise-multiplier", type=float, default=1.0)
    parser.add_argument("--learning-rate", type=float, default=5e-3)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument(
        "--train-size",
        type=int,
        default=None,
        help="subsample the training set (MNIST on a CPU)",
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def load_data(name, train_size=None):
    if name == "digits":
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        x = (digits.images / 16.0).astype("float32")[..., None]
        y = digits.target.astype("int32")
        x_train, x_test, y_train, y_test = train_test_split(
            x, y, test_size=0.25, random_state=0, stratify=y
        )
    else:
        (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
        x_train = (x_train / 255.0).astype("float32")[..., None]
        x_test = (x_test / 255.0).astype("float32")[..., None]
        y_train, y_test = y_train.astype("int32"), y_test.astype("int32")
    if train_size:
        x_train, y_train = x_train[:train_size], y_train[:train_size]
    return (x_train, y_train), (x_test, y_test)


def build_model(input_shape):
    # No BatchNormalization: it mixes examples (make_private rejects it).
    return keras.Sequential(
        [
            keras.Input(input_shape),
            keras.layers.Conv2D(16, 3, activation="relu", padding="same"),
            keras.layers.Conv2D(32, 3, activation="relu", strides=2),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10, name="head"),
        ]
    )


def train(method, data, args):
    (x_train, y_train), (x_test, y_test) = data
    keras.utils.set_random_seed(args.seed)
    model = build_model(x_train.shape[1:])
    noise_dimension = model.count_params()
    if method == "low-rank":
        model = keras_dp.LowRankSparse(
            model,
            rank=args.rank,
            sparsity=args.sparsity,
            refresh_every=50,
            exclude=("head",),
            seed=args.seed,
        )
        noise_dimension = model.noise_dimension
    model = keras_dp.make_private(model)
    model.compile(
        optimizer=keras_dp.DPAdam(
            learning_rate=args.learning_rate,
            noise_multiplier=args.noise_multiplier,
            l2_norm_clip=1.0,
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    logger = keras_dp.EpsilonLogger(delta=DELTA)
    start = time.perf_counter()
    model.fit(
        x_train,
        y_train,
        batch_size=args.batch_size,
        epochs=args.epochs,
        verbose=0,
        callbacks=[logger],
    )
    seconds = time.perf_counter() - start
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    return accuracy, logger.epsilon(), noise_dimension, seconds


def main():
    args = parse_args()
    data = load_data(args.dataset, args.train_size)
    n = len(data[0][0])
    print(
        f"backend {keras.backend.backend()}, {args.dataset}: {n} training "
        f"examples, batch {args.batch_size}, sigma {args.noise_multiplier}, "
        f"{args.epochs} epochs"
    )
    for method in ("full", "low-rank"):
        accuracy, epsilon, dimension, seconds = train(method, data, args)
        label = (
            "DP-Adam, all weights"
            if method == "full"
            else f"DP-Adam + LowRankSparse(rank={args.rank}, sparsity={args.sparsity})"
        )
        print(
            f"{label}: test accuracy {accuracy:.3f}, epsilon {epsilon:.2f} "
            f"(delta={DELTA}), noise dimension {dimension:,}, {seconds:.0f}s"
        )


if __name__ == "__main__":
    main()
