"""DP fine-tuning of a keras-hub BERT text classifier: LoRA vs LowRankSparse.

Two ways to keep the noise small when fine-tuning a large model privately
(docs/algorithms.md, "Low-rank and sparse gradients" and "DP fine-tuning
with LoRA"):

- DP-LoRA: `backbone.enable_lora(rank)` freezes the backbone and adds rank-r
  factors to the attention query/value projections; only those factors and
  the classification head are clipped and noised.
- LowRankSparse (RGP / LSG): every weight stays trainable, but each kernel's
  per-example gradient is projected on rank-r carriers (optionally sparse)
  before clipping, and the noise lives in that small space.

Both are trained with `keras_dp.make_private` + `keras_dp.DPAdam` and report
test accuracy, epsilon (from the optimizer's privacy ledger, via
`keras_dp.EpsilonLogger`) and the number of noised coordinates.

Offline (the default, `--offline`): a small BERT is built from its config
(random weights, a tiny word vocabulary) and fine-tuned on a synthetic
sentiment task that the script generates from word lists: a sentence is
positive when it has more positive than negative words. The "pre-trained"
weights come from a short non-private training run on a separate *public*
synthetic corpus that uses the other half of the sentiment words, so the
private runs fine-tune a backbone that knows the task format but not the
private task's sentiment words.

What to expect offline (JAX, defaults, epsilon 5.6): LowRankSparse reaches
~0.99 test accuracy; DP-LoRA stays near chance, because its backbone --
word embeddings included -- is frozen, and the private task's sentiment
words were never seen in pre-training. That is the synthetic task's design
(it exposes what LoRA cannot adapt), not a keras_dp limitation; with a real
preset, whose embeddings already encode sentiment, DP-LoRA is the usual
choice.

    KERAS_BACKEND=jax python examples/dp_text_classifier.py
    KERAS_BACKEND=jax python examples/dp_text_classifier.py --method lora

With network access, `--preset bert_tiny_en_uncased` (or any BERT preset)
loads real pre-trained weights with `BertTextClassifier.from_preset`; the
preset's preprocessor needs keras-hub's full dependencies (tensorflow-text)
and the data is still the synthetic sentiment text unless you plug in
your own.

Backend note: the example defaults to JAX. LowRankSparse always uses
keras_dp's vmap per-example path, and on TensorFlow 2.21 that path aborts
the process for models with EinsumDense layers on 3-d inputs (BERT's
attention projections) -- a known issue, see tests/test_lora.py.
"""

import argparse
import os
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_dp  # noqa: E402

try:
    import keras_hub  # noqa: E402
except ImportError as error:  # pragma: no cover
    raise SystemExit(
        f"This example needs keras-hub: pip install keras-hub (import failed: {error})."
    )

DELTA = 1e-5
POSITIVE = (
    "good great excellent wonderful superb lovely brilliant fine happy "
    "enjoyable delightful pleasant fantastic amazing perfect"
).split()
NEGATIVE = (
    "bad awful terrible horrible poor boring dull sad ugly annoying "
    "dreadful weak painful mediocre disappointing"
).split()
NEUTRAL = (
    "the a movie film plot actor scene story this that was is it and of "
    "with very quite rather script music ending"
).split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB = SPECIAL + POSITIVE + NEGATIVE + NEUTRAL
INDEX = {w: i for i, w in enumerate(VOCAB)}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=["lora", "lowrank", "both"], default="both")
    parser.add_argument(
        "--offline",
        action="store_true",
        default=True,
        help="random-init BERT from config (default)",
    )
    parser.add_argument(
        "--preset", default=None, help="keras-hub preset to fine-tune (needs network)"
    )
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--noise-multiplier", type=float, default=0.8)
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=3e-3,
        help="DP-Adam learning rate of LowRankSparse",
    )
    parser.add_argument(
        "--lora-learning-rate",
        type=float,
        default=2e-2,
        help="DP-Adam learning rate of DP-LoRA (few weights, "
        "B factors start at zero: a larger rate is usual)",
    )
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def make_sentences(n, seed, length=12, public=False):
    """Synthetic sentiment data: label 1 iff more positive than negative words.

    The public corpus uses the first half of each sentiment word list, the
    private task the second half: the pre-trained model has never seen the
    private task's sentiment words, so fine-tuning has something to learn.
    """
    rng = np.random.RandomState(seed)
    half = len(POSITIVE) // 2
    positive = POSITIVE[:half] if public else POSITIVE[half:]
    negative = NEGATIVE[:half] if public else NEGATIVE[half:]
    texts, labels = [], []
    while len(texts) < n:
        n_pos, n_neg = rng.randint(0, 4, size=2)
        if n_pos == n_neg:
            continue
        words = list(rng.choice(positive, n_pos)) + list(rng.choice(negative, n_neg))
        words += list(rng.choice(NEUTRAL, max(0, length - len(words))))
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(int(n_pos > n_neg))
    return texts, np.array(labels, dtype="int32")


def tokenize(texts, seq_len):
    """Whitespace word tokenizer over VOCAB, BERT input dict."""
    ids = np.zeros((len(texts), seq_len), dtype="int32")
    for row, text in enumerate(texts):
        tokens = [INDEX["[CLS]"]]
        tokens += [INDEX.get(w, INDEX["[UNK]"]) for w in text.split()]
        tokens = tokens[: seq_len - 1] + [INDEX["[SEP]"]]
        ids[row, : len(tokens)] = tokens
    return {
        "token_ids": ids,
        "segment_ids": np.zeros_like(ids),
        "padding_mask": (ids != 0).astype("int32"),
    }


def build_classifier(args):
    if args.preset:
        return keras_hub.models.BertTextClassifier.from_preset(
            args.preset, num_classes=2
        )
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=len(VOCAB),
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        intermediate_dim=64,
        max_sequence_length=args.seq_len,
        dropout=0.0,
    )
    return keras_hub.models.BertTextClassifier(
        backbone, num_classes=2, preprocessor=None, dropout=0.0
    )


def pretrain(classifier, args):
    """Non-private training on a public corpus (stands in for pre-training)."""
    texts, labels = make_sentences(4000, seed=10_000 + args.seed, public=True)
    classifier.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    classifier.fit(
        tokenize(texts, args.seq_len), labels, batch_size=50, epochs=2, verbose=0
    )
    return classifier.get_weights()


def fine_tune(method, weights, data, args):
    keras.utils.set_random_seed(args.seed)
    classifier = build_classifier(args)
    if weights is not None:
        classifier.set_weights(weights)
    if method == "lora":
        classifier.backbone.enable_lora(args.rank)
        # A plain functional model over the same layers: keras-hub's
        # `Task.fit` turns its input into a tf.data pipeline and cannot take
        # the Poisson sampler that keras_dp's private `fit` passes on.
        model = keras.Model(classifier.input, classifier.output)
        noised = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    else:
        head = classifier.output_dense.name
        model = keras_dp.LowRankSparse(
            classifier,
            rank=args.rank,
            sparsity=args.sparsity,
            refresh_every=20,
            exclude=(head,),
            seed=args.seed,
        )
        noised = model.noise_dimension
    total = sum(int(np.prod(v.shape)) for v in classifier.weights)
    model = keras_dp.make_private(model)
    model.compile(
        optimizer=keras_dp.DPAdam(
            learning_rate=(
                args.lora_learning_rate if method == "lora" else args.learning_rate
            ),
            noise_multiplier=args.noise_multiplier,
            auto_clip=True,
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    (x_train, y_train), (x_test, y_test) = data
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
    return {
        "accuracy": accuracy,
        "epsilon": logger.epsilon(),
        "noised": noised,
        "total": total,
        "seconds": seconds,
    }


def main():
    args = parse_args()
    print(f"backend: {keras.backend.backend()}, keras-hub {keras_hub.__version__}")
    train_texts, y_train = make_sentences(args.train_size, seed=args.seed)
    test_texts, y_test = make_sentences(1000, seed=args.seed + 1)
    data = (
        (tokenize(train_texts, args.seq_len), y_train),
        (tokenize(test_texts, args.seq_len), y_test),
    )
    weights = None
    if not args.preset:
        keras.utils.set_random_seed(args.seed)
        base = build_classifier(args)
        weights = pretrain(base, args)
        _, base_accuracy = base.evaluate(*data[1], verbose=0)
        print(
            f"after public pre-training (no fine-tuning): "
            f"test accuracy {base_accuracy:.3f}"
        )
    methods = ["lora", "lowrank"] if args.method == "both" else [args.method]
    for method in methods:
        r = fine_tune(method, weights, data, args)
        name = {
            "lora": f"DP-LoRA (rank {args.rank})",
            "lowrank": f"LowRankSparse (rank {args.rank}, sparsity {args.sparsity})",
        }[method]
        print(
            f"{name}: test accuracy {r['accuracy']:.3f}, epsilon "
            f"{r['epsilon']:.2f} (delta={DELTA}), noised coordinates "
            f"{r['noised']:,} of {r['total']:,} weights, {r['seconds']:.0f}s"
        )


if __name__ == "__main__":
    main()
