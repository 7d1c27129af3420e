"""DP fine-tuning of BERT on IMDB: DP-LoRA against full fine-tuning.

A keras-hub BERT classifier (`bert_base_en_uncased` by default) is
fine-tuned on the IMDB reviews (`keras.datasets.imdb`, 25,000 training and
25,000 test reviews, decoded back to text with its word index and
tokenized by the preset's own preprocessor) three ways:

- non-private: Adam on every weight, the reference accuracy;
- DP-LoRA: `classifier.backbone.enable_lora(rank)` freezes the backbone
  and adds rank-r adapters to the attention's query and value
  projections; only the adapters and the classification head are clipped
  and noised (Yu et al. 2022, "Differentially Private Fine-tuning of
  Language Models");
- full DP fine-tuning: every weight clipped and noised (Li et al. 2022,
  "Large Language Models Can Be Strong Differentially Private Learners").

Each private method is trained with `keras_dp.make_private` and
`keras_dp.DPAdam` (automatic clipping, logical batches of `--batch-size`
accumulated from `--physical-batch` rows) at each target epsilon (3 and 8
by default, delta 1e-5; the noise multiplier is calibrated by keras_dp).

    KERAS_BACKEND=jax python examples/text_lora.py                # a GPU
    KERAS_BACKEND=jax python examples/text_lora.py --methods lora --epsilon 8
    KERAS_BACKEND=jax python examples/text_lora.py --smoke        # offline

The real run downloads IMDB and the preset, and the preset's tokenizer
needs keras-hub's full dependencies (tensorflow-text). `--smoke` builds a
tiny BERT from its config (random weights, a 64-token vocabulary) and
fine-tunes it on generated token sequences (label 1 when a sequence holds
more "positive" than "negative" tokens): nothing is downloaded, it only
checks that every run works; its accuracies mean nothing.

The script prints the command that reproduces it, and for each run the
test accuracy, the epsilon spent, the number of noised weights and the
train steps per second; it writes `epsilon.png` (epsilon against epoch of
each private run) and, for several epsilons, `accuracy_vs_epsilon.png`
(the non-private accuracy as a dashed line) into `--out`.

Backend: JAX by default. TensorFlow with oneDNN can crash in
`tf.vectorized_map` over the LoRA attention projections' gradients (see
the README's known limitations).
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

import keras_dp  # noqa: E402
from keras_dp import plotting  # noqa: E402
from step_timer import StepTimer  # noqa: E402

try:
    import keras_hub  # noqa: E402
except ImportError as error:  # pragma: no cover
    raise SystemExit(
        f"This example needs keras-hub: pip install keras-hub (import failed: {error})."
    )

DELTA = 1e-5
METHODS = {"lora": "DP-LoRA", "full": "full DP fine-tuning"}
# The smoke run's generated "sentiment" tokens (ids below 5 are special).
SMOKE_VOCAB = 64
POSITIVE = np.arange(5, 15)
NEGATIVE = np.arange(15, 25)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny BERT, offline")
    parser.add_argument("--preset", default="bert_base_en_uncased")
    parser.add_argument(
        "--methods", nargs="+", choices=sorted(METHODS), default=["lora", "full"]
    )
    parser.add_argument("--epsilon", type=float, nargs="+", default=[3.0, 8.0])
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip the non-private run"
    )
    parser.add_argument("--rank", type=int, default=None, help="LoRA rank (8)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens (256)")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="logical DP batch (1024)"
    )
    parser.add_argument(
        "--physical-batch", type=int, default=None, help="rows per step (32)"
    )
    parser.add_argument("--epochs", type=int, default=None, help="DP epochs (6)")
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=5e-4,
        help="DP-Adam rate of full fine-tuning",
    )
    parser.add_argument(
        "--lora-learning-rate",
        type=float,
        default=2e-3,
        help="DP-Adam rate of DP-LoRA (few weights, adapters start at zero)",
    )
    parser.add_argument(
        "--baseline-learning-rate", type=float, default=2e-5, help="non-private Adam"
    )
    parser.add_argument(
        "--baseline-epochs", type=int, default=None, help="non-private epochs (2)"
    )
    parser.add_argument("--train-size", type=int, default=None)
    parser.add_argument("--test-size", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", default=None, help="folder for the plots (results/text_lora)"
    )
    args = parser.parse_args(argv)
    defaults = (
        dict(
            seq_len=16,
            batch_size=64,
            physical_batch=32,
            epochs=1,
            baseline_epochs=1,
            train_size=256,
            test_size=128,
            rank=2,
        )
        if args.smoke
        else dict(
            seq_len=256,
            batch_size=1024,
            physical_batch=32,
            epochs=6,
            baseline_epochs=2,
            rank=8,
        )
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.out is None:
        args.out = os.path.join("results", "text_lora")
    if args.batch_size % args.physical_batch:
        parser.error(
            f"--batch-size {args.batch_size} must be a multiple of "
            f"--physical-batch {args.physical_batch}"
        )
    return args


def smoke_data(args):
    """Generated token sequences: label 1 iff more positive than negative
    tokens. BERT inputs as the preset preprocessor makes them."""
    rng = np.random.default_rng(args.seed)

    def make(n):
        ids = rng.integers(5, SMOKE_VOCAB, (n, args.seq_len)).astype("int32")
        ids[:, 0], ids[:, -1] = 2, 3  # [CLS] ... [SEP]
        positive = np.isin(ids, POSITIVE).sum(axis=1)
        negative = np.isin(ids, NEGATIVE).sum(axis=1)
        y = (positive > negative).astype("int32")
        return bert_inputs(ids), y

    return make(args.train_size), make(args.test_size)


def bert_inputs(ids):
    return {
        "token_ids": ids,
        "segment_ids": np.zeros_like(ids),
        "padding_mask": (ids != 0).astype("int32"),
    }


def imdb_data(args):
    """IMDB reviews as text (decoded with the data set's word index),
    tokenized by the preset's preprocessor."""
    (x_train, y_train), (x_test, y_test) = keras.datasets.imdb.load_data()
    words = {
        index + 3: word for word, index in keras.datasets.imdb.get_word_index().items()
    }

    def texts(sequences, size):
        sequences = sequences[:size] if size else sequences
        # Index 1 marks the start of a review; 0-3 are not words.
        return [" ".join(words.get(i, "") for i in s[1:] if i > 3) for s in sequences]

    preprocessor = keras_hub.models.BertTextClassifierPreprocessor.from_preset(
        args.preset, sequence_length=args.seq_len
    )

    def tokenize(batch):
        parts = [preprocessor(batch[i : i + 1000]) for i in range(0, len(batch), 1000)]
        return {
            key: np.concatenate([keras.ops.convert_to_numpy(p[key]) for p in parts])
            for key in parts[0]
        }

    train_texts = texts(x_train, args.train_size)
    test_texts = texts(x_test, args.test_size)
    return (
        (tokenize(train_texts), y_train[: len(train_texts)].astype("int32")),
        (tokenize(test_texts), y_test[: len(test_texts)].astype("int32")),
    )


def build_classifier(args):
    if args.smoke:
        backbone = keras_hub.models.BertBackbone(
            vocabulary_size=SMOKE_VOCAB,
            num_layers=1,
            num_heads=2,
            hidden_dim=16,
            intermediate_dim=32,
            max_sequence_length=args.seq_len,
            dropout=0.0,
        )
        return keras_hub.models.BertTextClassifier(
            backbone, num_classes=2, preprocessor=None, dropout=0.0
        )
    return keras_hub.models.BertTextClassifier.from_preset(
        args.preset, num_classes=2, preprocessor=None
    )


def count(variables):
    return sum(int(np.prod(v.shape)) for v in variables)


def train(method, epsilon, data, args):
    """One run: `method` "lora" or "full", `epsilon` None for no privacy."""
    (x_train, y_train), (x_test, y_test) = data
    keras.utils.set_random_seed(args.seed)
    classifier = build_classifier(args)
    total = count(classifier.weights)
    if method == "lora":
        classifier.backbone.enable_lora(args.rank)
    # A plain functional model over the same layers: keras-hub's `Task.fit`
    # turns its input into a tf.data pipeline and cannot take the Poisson
    # sampler that keras_dp's private `fit` passes on.
    model = keras.Model(classifier.input, classifier.output)
    trained = count(model.trainable_variables)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    timer = StepTimer()
    if epsilon is None:
        model.compile(
            optimizer=keras.optimizers.Adam(args.baseline_learning_rate),
            loss=loss,
            metrics=["accuracy"],
        )
        history = model.fit(
            x_train,
            y_train,
            batch_size=args.physical_batch,
            epochs=args.baseline_epochs,
            verbose=2,
            callbacks=[timer],
        )
        path = "-"
    else:
        accumulation = args.batch_size // args.physical_batch
        model = keras_dp.make_private(model)
        model.compile(
            optimizer=keras_dp.DPAdam(
                learning_rate=(
                    args.lora_learning_rate if method == "lora" else args.learning_rate
                ),
                auto_clip=True,
                # Calibrated once for the updates `fit` will run (what
                # `target_epsilon=` would do when `fit` starts), so each
                # method's noise is fixed before training. The epsilon
                # printed is the privacy ledger's.
                noise_multiplier=keras_dp.calibrate_noise_multiplier(
                    epsilon,
                    DELTA,
                    sample_rate=args.batch_size / len(y_train),
                    steps=args.epochs * math.ceil(len(y_train) / args.batch_size),
                ),
                gradient_accumulation_steps=accumulation if accumulation > 1 else None,
            ),
            loss=loss,
            metrics=["accuracy"],
        )
        history = model.fit(
            x_train,
            y_train,
            batch_size=args.physical_batch,
            epochs=args.epochs,
            verbose=2,
            callbacks=[keras_dp.EpsilonLogger(delta=DELTA), timer],
        )
        summary = keras_dp.privacy_summary(model).splitlines()
        path = next(
            (s.split(":", 1)[1].strip() for s in summary if "per-example" in s), "?"
        )
    _, accuracy = model.evaluate(x_test, y_test, batch_size=64, verbose=0)
    return dict(
        accuracy=accuracy,
        epsilon=history.history["epsilon"][-1] if epsilon is not None else None,
        history=history,
        trained=trained,
        total=total,
        steps_per_second=timer.steps_per_second(),
        path=path,
    )


def main(argv=None):
    args = parse_args(argv)
    command = " ".join(
        [f"KERAS_BACKEND={keras.backend.backend()}", "python", "examples/text_lora.py"]
        + [shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)]
    )
    print(f"reproduce: {command}")
    data = smoke_data(args) if args.smoke else imdb_data(args)
    model_name = "tiny random BERT (smoke)" if args.smoke else args.preset
    print(
        f"data: {'generated tokens (smoke)' if args.smoke else 'IMDB'}, "
        f"{len(data[0][1])} train / {len(data[1][1])} test examples, "
        f"{args.seq_len} tokens; model {model_name}; DP: logical batch "
        f"{args.batch_size} = {args.physical_batch} x "
        f"{args.batch_size // args.physical_batch}, {args.epochs} epochs, "
        f"delta={DELTA:g}; keras-hub {keras_hub.__version__}"
    )
    os.makedirs(args.out, exist_ok=True)
    runs = [] if args.no_baseline else [("full", None)]
    runs += [(m, e) for m in args.methods for e in args.epsilon]
    results = []
    epsilon_axes = None
    for method, epsilon in runs:
        name = "non-private fine-tuning" if epsilon is None else METHODS[method]
        if method == "lora":
            name += f" (rank {args.rank})"
        target = "" if epsilon is None else f" at target epsilon {epsilon:g}"
        print(f"\n== {name}{target}")
        r = train(method, epsilon, data, args)
        results.append((method, epsilon, r))
        privacy = (
            "no privacy"
            if epsilon is None
            else f"epsilon {r['epsilon']:.3f} (delta={DELTA:g})"
        )
        noised = "" if epsilon is None else f", per-example path {r['path']}"
        print(
            f"result: {name}{target}: test accuracy {r['accuracy']:.4f}, "
            f"{privacy}, {r['trained']:,} of {r['total']:,} weights trained"
            f"{noised}, {r['steps_per_second']:.2f} steps/s"
        )
        if epsilon is not None:
            epsilon_axes = plotting.plot_epsilon(
                r["history"], ax=epsilon_axes, label=f"{name}, target {epsilon:g}"
            )

    print("\n| method | target epsilon | test accuracy | epsilon |")
    print("|---|---|---|---|")
    for method, epsilon, r in results:
        label = "non-private" if epsilon is None else METHODS[method]
        target = "-" if epsilon is None else f"{epsilon:g}"
        spent = "-" if epsilon is None else f"{r['epsilon']:.2f}"
        print(f"| {label} | {target} | {r['accuracy']:.4f} | {spent} |")
    paths = []
    if epsilon_axes is not None:
        paths.append(os.path.join(args.out, "epsilon.png"))
        epsilon_axes.set_title(f"IMDB, {model_name}")
        epsilon_axes.figure.savefig(paths[-1], bbox_inches="tight")
    if len(args.epsilon) > 1:
        series = {}
        for method, epsilon, r in results:
            label = "non-private" if epsilon is None else METHODS[method]
            series.setdefault(label, []).append((epsilon, r["accuracy"]))
        paths.append(os.path.join(args.out, "accuracy_vs_epsilon.png"))
        plotting.plot_accuracy_vs_epsilon(
            series, path=paths[-1], title=f"IMDB, {model_name}, delta = 1e-5"
        )
    for path in paths:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
