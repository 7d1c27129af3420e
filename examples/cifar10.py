"""DP-SGD on CIFAR-10 from scratch: the WRN-16-4 recipe of De et al. (2022).

"Unlocking High-Accuracy Differentially Private Image Classification
through Scale" (De, Berrada, Hayes, Smith and Balle, arXiv:2204.13650)
trains a Wide ResNet 16-4 privately from scratch to 56.8 / 65.9 / 73.5 /
79.5% test accuracy at epsilon 1 / 2 / 4 / 8 (delta 1e-5). Their recipe,
as this script runs it with keras_dp:

- WRN-16-4 with GroupNormalization (16 groups) and weight-standardized
  convolutions (`WSConv2D` below), no BatchNormalization, no dropout;
- DP-SGD (no momentum, learning rate 2, clipping norm 1) on logical
  batches of 4096, made of `--physical-batch` rows at a time with the
  optimizer's `gradient_accumulation_steps`; noise added once per logical
  batch, the noise multiplier calibrated by keras_dp for the target
  epsilon over the paper's number of updates;
- augmentation multiplicity: each example's gradient is the mean over
  `--augmentations` (16) random flips and crops of it, before clipping
  (`keras_dp.make_private(model, augment=augment, augmentations=K)`);
- parameter averaging: an exponential moving average of the weights
  (Keras's `use_ema=True`, `ema_momentum=0.999`), which is what is
  evaluated.

    KERAS_BACKEND=jax python examples/cifar10.py --epsilon 8        # a GPU
    KERAS_BACKEND=jax python examples/cifar10.py --epsilon 1 2 4 8  # all four
    KERAS_BACKEND=jax python examples/cifar10.py --smoke            # offline

`--smoke` trains a tiny WRN (`--depth 10 --width 1`) for one epoch on 256
generated images (nothing is downloaded): it checks that the recipe runs,
in well under a minute on a CPU; its accuracy means nothing. The real run
downloads CIFAR-10 with `keras.datasets.cifar10.load_data()`.

The script prints the command that reproduces it, and for each epsilon the
test accuracy next to the published one, the epsilon spent, the noise
multiplier and the train steps per second; it writes `epsilon.png`
(epsilon against epoch) and, for several epsilons,
`accuracy_vs_epsilon.png` into `--out`.

Per-example gradients: a weight-standardized convolution computes its
output from a function of its whole kernel, so keras_dp's closed-form
Conv2D rule (which assumes the kernel is used as it is) does not apply to
it (a subclass that overrides `call` never gets its base class's rule). On
the default fast path these layers get keras_dp's generic rule (each
example's gradients of the layer alone, by a vector-Jacobian product of its
own `call`), GroupNormalization and Dense their own rules.
"""

import argparse
import math
import os
import shlex
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

import keras_dp  # noqa: E402
from keras_dp import plotting  # noqa: E402
from step_timer import StepTimer  # noqa: E402

DELTA = 1e-5
# De et al. 2022, WRN-16-4 from scratch on CIFAR-10, delta = 1e-5, logical
# batch 4096, 16 augmentations: epsilon -> (test accuracy %, noise
# multiplier, number of updates).
PUBLISHED = {
    1.0: (56.8, 10.0, 875),
    2.0: (65.9, 6.0, 1125),
    4.0: (73.5, 4.0, 1593),
    8.0: (79.5, 3.0, 2468),
}
# The usual per-channel statistics of CIFAR-10: fixed constants, so that
# nothing is fitted on the private images outside the private training.
CIFAR_MEAN = np.array([0.4914, 0.4822, 0.4465], dtype="float32")
CIFAR_STD = np.array([0.2470, 0.2435, 0.2616], dtype="float32")
CROP_PADDING = 4


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--epsilon",
        type=float,
        nargs="+",
        default=[8.0],
        help="target epsilon(s), each trained from scratch (published: 1 2 4 8)",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny model, 256 generated images"
    )
    parser.add_argument("--depth", type=int, default=None, help="WRN depth (16)")
    parser.add_argument("--width", type=int, default=None, help="WRN width (4)")
    parser.add_argument("--groups", type=int, default=16, help="GroupNorm groups")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="logical batch (4096)"
    )
    parser.add_argument(
        "--physical-batch",
        type=int,
        default=None,
        help="rows per step; the logical batch is accumulated over "
        "batch-size / physical-batch steps (256)",
    )
    parser.add_argument(
        "--augmentations",
        type=int,
        default=None,
        help="augmentation multiplicity K (16); 0 trains without augmentation",
    )
    parser.add_argument("--learning-rate", type=float, default=2.0)
    parser.add_argument(
        "--ema",
        type=float,
        default=0.999,
        help="EMA momentum per update (0: no averaging)",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="default: the published number of updates, in epochs",
    )
    parser.add_argument("--train-size", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", default=None, help="folder for the plots (results/cifar10)"
    )
    args = parser.parse_args(argv)
    defaults = (
        dict(
            depth=10,
            width=1,
            batch_size=64,
            physical_batch=32,
            augmentations=2,
            epochs=1,
            train_size=256,
        )
        if args.smoke
        else dict(
            depth=16,
            width=4,
            batch_size=4096,
            physical_batch=256,
            augmentations=16,
        )
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.out is None:
        args.out = os.path.join("results", "cifar10")
    if args.batch_size % args.physical_batch:
        parser.error(
            f"--batch-size {args.batch_size} must be a multiple of "
            f"--physical-batch {args.physical_batch}"
        )
    if (args.depth - 4) % 6:
        parser.error(f"--depth must be 6k + 4 (10, 16, 22, ...), got {args.depth}")
    return args


class WSConv2D(keras.layers.Conv2D):
    """Conv2D with scaled weight standardization and a learned gain.

    The convolution uses the kernel `gain * (W - mean) / sqrt(fan_in * var)`,
    mean and variance taken over each output channel's `fan_in` weights
    (Qiao et al. 2019; the scaled form of Brock et al. 2021, as in De et
    al.), so each output channel's kernel has unit norm times its gain
    whatever `W`'s scale.
    """

    def __init__(self, filters, kernel_size, epsilon=1e-4, **kwargs):
        kwargs.setdefault(
            "kernel_initializer",
            keras.initializers.VarianceScaling(1.0, "fan_in", "truncated_normal"),
        )
        super().__init__(filters, kernel_size, **kwargs)
        self.epsilon = epsilon

    def build(self, input_shape):
        super().build(input_shape)
        self.gain = self.add_weight(
            shape=(self.filters,), initializer="ones", name="gain"
        )

    def standardized_kernel(self):
        kernel = self.kernel
        axes = tuple(range(len(kernel.shape) - 1))
        fan_in = math.prod(kernel.shape[:-1])
        mean = ops.mean(kernel, axis=axes, keepdims=True)
        var = ops.var(kernel, axis=axes, keepdims=True)
        scale = ops.rsqrt(ops.maximum(var * fan_in, self.epsilon)) * self.gain
        return (kernel - mean) * scale

    def call(self, inputs):
        outputs = self.convolution_op(inputs, self.standardized_kernel())
        if self.use_bias:
            outputs = outputs + self.bias
        return self.activation(outputs)

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


def wide_resnet(depth, width, groups, num_classes=10, input_shape=(32, 32, 3)):
    """WRN-depth-width (pre-activation: ReLU, GroupNorm, conv), as in De et
    al.: a 1x1 convolution on the skip path of each stage's first block."""
    blocks = (depth - 4) // 6
    inputs = keras.Input(input_shape)
    x = WSConv2D(16, 3, padding="same", name="stem")(inputs)

    def norm_relu_conv(h, channels, kernel, strides, name):
        h = keras.layers.ReLU()(h)
        h = keras.layers.GroupNormalization(groups=groups, name=f"{name}_norm")(h)
        return WSConv2D(channels, kernel, strides=strides, padding="same", name=name)(h)

    for stage, (channels, strides) in enumerate(
        [(16 * width, 1), (32 * width, 2), (64 * width, 2)], start=1
    ):
        for block in range(blocks):
            name = f"stage{stage}_block{block}"
            first = block == 0
            skip = (
                norm_relu_conv(x, channels, 1, strides, f"{name}_skip") if first else x
            )
            h = norm_relu_conv(x, channels, 3, strides if first else 1, f"{name}_a")
            h = norm_relu_conv(h, channels, 3, 1, f"{name}_b")
            x = keras.layers.Add()([h, skip])
    x = keras.layers.ReLU()(x)
    x = keras.layers.GroupNormalization(groups=groups, name="final_norm")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=f"wrn_{depth}_{width}")


def augment(x, seed):
    """A random horizontal flip and a random crop of each image padded by
    4 pixels (reflection), drawn independently for each image from `seed`.

    `x`: images `(n, height, width, channels)`, or one image without the
    leading axis.
    """
    x = ops.convert_to_tensor(x)
    single = len(x.shape) == 3
    if single:
        x = ops.expand_dims(x, 0)
    height, width = x.shape[1], x.shape[2]
    # One draw for both choices: two draws from the same seed would repeat.
    draws = keras.random.uniform((ops.shape(x)[0], 3), seed=seed)
    flip = ops.reshape(draws[:, 0] < 0.5, (-1, 1, 1, 1))
    x = ops.where(flip, ops.flip(x, axis=2), x)
    pad = CROP_PADDING
    padded = ops.pad(x, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode="reflect")
    offsets = ops.minimum(
        ops.cast(ops.floor(draws[:, 1:] * (2 * pad + 1)), "int32"), 2 * pad
    )
    # The crop as two one-hot selections (rows, then columns): one offset
    # per image, the same code on every backend.
    rows = ops.one_hot(
        offsets[:, :1] + ops.arange(height, dtype="int32")[None], height + 2 * pad
    )
    cols = ops.one_hot(
        offsets[:, 1:] + ops.arange(width, dtype="int32")[None], width + 2 * pad
    )
    dtype = padded.dtype
    out = ops.einsum(
        "nih,nhwc,njw->nijc",
        ops.cast(rows, dtype),
        padded,
        ops.cast(cols, dtype),
    )
    return out[0] if single else out


def load_data(args):
    if args.smoke:
        # Classes told apart by a mean colour, so the smoke run has a
        # signal; the images are noise otherwise.
        rng = np.random.default_rng(args.seed)
        colours = rng.normal(size=(10, 1, 1, 3)).astype("float32")

        def make(n):
            y = rng.integers(0, 10, n).astype("int32")
            x = rng.normal(size=(n, 32, 32, 3)).astype("float32") + colours[y]
            return x, y

        return make(args.train_size), make(128)
    (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()

    def standardise(x):
        return ((x.astype("float32") / 255.0 - CIFAR_MEAN) / CIFAR_STD).astype(
            "float32"
        )

    if args.train_size:
        x_train, y_train = x_train[: args.train_size], y_train[: args.train_size]
    return (
        (standardise(x_train), y_train.reshape(-1).astype("int32")),
        (standardise(x_test), y_test.reshape(-1).astype("int32")),
    )


def epochs_for(epsilon, n, args):
    """`--epochs`, else the published number of updates (or that of the
    nearest published epsilon) in epochs of `ceil(n / batch_size)` updates,
    as `fit` runs them."""
    if args.epochs:
        return args.epochs
    nearest = min(PUBLISHED, key=lambda e: abs(math.log(e / epsilon)))
    updates = PUBLISHED[nearest][2]
    return max(1, round(updates / math.ceil(n / args.batch_size)))


def noise_for(epsilon, n, epochs, batch_size):
    """The noise multiplier that spends `epsilon` (at DELTA) over the
    updates `fit` runs: `ceil(n / batch_size)` Poisson batches per epoch.

    Calibrated here, once, so that the noise multiplier is printed next
    to the published one before training (the optimizer's
    `target_epsilon=` would calibrate the same value when `fit` starts).
    The epsilon printed at the end is the privacy ledger's, whatever this
    function computed.
    """
    return keras_dp.calibrate_noise_multiplier(
        epsilon,
        DELTA,
        sample_rate=batch_size / n,
        steps=epochs * math.ceil(n / batch_size),
    )


def train(epsilon, data, args):
    (x_train, y_train), (x_test, y_test) = data
    keras.utils.set_random_seed(args.seed)
    model = wide_resnet(args.depth, args.width, args.groups)
    augmentation = {}
    if args.augmentations:
        augmentation = dict(augment=augment, augmentations=args.augmentations)
    model = keras_dp.make_private(model, **augmentation)
    epochs = epochs_for(epsilon, len(x_train), args)
    accumulation = args.batch_size // args.physical_batch
    optimizer = keras_dp.DPSGD(
        learning_rate=args.learning_rate,
        l2_norm_clip=1.0,
        noise_multiplier=noise_for(epsilon, len(x_train), epochs, args.batch_size),
        gradient_accumulation_steps=accumulation if accumulation > 1 else None,
        # Parameter averaging: post-processing of the released updates, no
        # privacy cost. keras_dp moves the average once per update (not
        # at the accumulation steps), as De et al. do.
        use_ema=args.ema > 0,
        ema_momentum=args.ema if args.ema > 0 else 0.99,
    )
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    logger = keras_dp.EpsilonLogger(delta=DELTA)
    timer = StepTimer()
    history = model.fit(
        x_train,
        y_train,
        batch_size=args.physical_batch,
        epochs=epochs,
        verbose=2,
        callbacks=[logger, timer],
    )
    # After fit, the model holds the averaged (EMA) weights.
    _, accuracy = model.evaluate(x_test, y_test, batch_size=500, verbose=0)
    summary = keras_dp.privacy_summary(model).splitlines()
    path = next(
        (s.split(":", 1)[1].strip() for s in summary if "per-example" in s), "?"
    )
    return dict(
        accuracy=accuracy,
        epsilon=history.history["epsilon"][-1],
        sigma=optimizer.noise_multiplier,
        updates=keras_dp.ledger.optimizer_steps(model),
        epochs=epochs,
        steps_per_second=timer.steps_per_second(),
        history=history,
        path=path,
    )


def main(argv=None):
    args = parse_args(argv)
    command = " ".join(
        [f"KERAS_BACKEND={keras.backend.backend()}", "python", "examples/cifar10.py"]
        + [shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)]
    )
    print(f"reproduce: {command}")
    data = load_data(args)
    n = len(data[0][0])
    accumulation = args.batch_size // args.physical_batch
    print(
        f"data: {'generated (smoke)' if args.smoke else 'CIFAR-10'}, {n} train / "
        f"{len(data[1][0])} test images; model WRN-{args.depth}-{args.width} "
        f"(GroupNorm {args.groups}, weight-standardized convolutions); logical "
        f"batch {args.batch_size} = {args.physical_batch} x {accumulation} "
        f"accumulation steps; augmentations {args.augmentations or 'off'}; "
        f"EMA {args.ema if args.ema > 0 else 'off'}; delta={DELTA:g}"
    )
    os.makedirs(args.out, exist_ok=True)
    results = {}
    epsilon_axes = None
    for target in args.epsilon:
        print(f"\n== target epsilon {target:g}")
        r = train(target, data, args)
        results[target] = r
        published = PUBLISHED.get(target)
        reference = (
            f" (published {published[0]:.1f}%)" if published else " (not published)"
        )
        print(f"per-example path: {r['path']}")
        print(
            f"result: target epsilon {target:g}: test accuracy "
            f"{100 * r['accuracy']:.2f}%{reference}, epsilon {r['epsilon']:.3f} "
            f"(delta={DELTA:g}), noise multiplier {r['sigma']:.3f}"
            + (f" (published {published[1]:g})" if published else "")
            + f", {r['updates']} updates in {r['epochs']} epochs, "
            f"{r['steps_per_second']:.2f} steps/s"
        )
        epsilon_axes = plotting.plot_epsilon(
            r["history"], ax=epsilon_axes, label=f"target {target:g}"
        )

    print("\n| target epsilon | test accuracy | published (WRN-16-4) | epsilon |")
    print("|---|---|---|---|")
    for target, r in results.items():
        published = PUBLISHED.get(target)
        print(
            f"| {target:g} | {100 * r['accuracy']:.1f}% | "
            f"{f'{published[0]:.1f}%' if published else '-'} | {r['epsilon']:.2f} |"
        )
    paths = [os.path.join(args.out, "epsilon.png")]
    epsilon_axes.set_title(f"CIFAR-10 WRN-{args.depth}-{args.width}, DP-SGD")
    epsilon_axes.figure.savefig(paths[0], bbox_inches="tight")
    if len(results) > 1:
        series = {
            f"keras_dp WRN-{args.depth}-{args.width}": [
                (r["epsilon"], r["accuracy"]) for r in results.values()
            ],
            "De et al. 2022 (WRN-16-4)": [
                (e, a / 100) for e, (a, _, _) in PUBLISHED.items()
            ],
        }
        paths.append(os.path.join(args.out, "accuracy_vs_epsilon.png"))
        plotting.plot_accuracy_vs_epsilon(
            series, path=paths[-1], title="CIFAR-10, delta = 1e-5"
        )
    for path in paths:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
