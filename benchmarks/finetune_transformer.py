"""DP fine-tuning of a small transformer at equal epsilon: full vs DP-LoRA vs RGP vs LSG.

Offline (the data is generated here, the model is built from its config,
nothing is downloaded):

1. Synthetic token sequences. A 400-token vocabulary: 5 special tokens
   ([PAD] [UNK] [CLS] [SEP] [MASK]), 8 topics of 40 topic words each, 8
   "polar" words (4 of kind A, 4 of kind B) and 67 background words. A
   sequence is [CLS], `seq_len - 2` words, [SEP]; it belongs to one topic,
   and each word is one of that topic's words with probability
   `TOPIC_RATE` (0.2), else a background word; then 1 to 3 positions are
   overwritten with polar words, all of one kind.
2. "Public" pre-training task: masked-token prediction (15 % of the words
   masked) on 20,000 such sequences. A keras-hub `BertBackbone` (random
   init, built from its config: 2 layers, hidden 32, 2 heads) is trained on
   it without privacy (plain Keras `fit`); it learns which words go
   together (the topics, the two kinds of polar words) but sees no label.
3. Private fine-tuning task, sequences from the same generator with a
   label: "sentiment" whose marker words change meaning with the context.
   The label is 1 for polar words of kind A, except in the 4 "reversed"
   topics (4 to 7), where kind A means 0. Neither the marker nor the topic
   alone says anything about the label (chance is 0.5): the model has to
   combine them. A new linear head reads the mean of the backbone's token
   outputs. With the default 2,000 training examples a non-private
   fine-tune from the pre-trained backbone learns the task, the same from
   random init does not; the script prints both and the gap (pre-training
   must help for the comparison to mean anything; the gap shrinks fast
   with more training examples, which is why the private set is small).
4. Private fine-tuning from the pre-trained backbone with DP-Adam, flat
   clipping C = 1, Poisson sampling, and the same noise multiplier,
   sampling rate and steps for every method at each epsilon (so the same
   epsilon; the ledger's epsilon of every run is printed and checked
   against `keras_dp.compute_epsilon` for plain DP-SGD):
   - full: every weight clipped and noised;
   - lora: keras-hub's `backbone.enable_lora(rank)` (rank-r adapters on the
     attention query and value projections, the rest of the backbone
     frozen), the new head trainable;
   - rgp: `keras_dp.LowRankSparse(rank, sparsity=0)`, the head excluded
     (privatised in full); embeddings and norms are privatised in full
     too (they are not matrix layers);
   - lsg: the same with `--sparsity` (0.5).
   The noise multipliers are calibrated to `--epsilons` (or given with
   `--noise-multipliers`).
5. The same tuning budget for every method: a learning-rate grid of the
   same size per method family (full, lora, low-rank for rgp and lsg,
   non-private). Every rate is run with the first `--tuning-seeds` seeds
   (1); at each epsilon the rate with the best mean accuracy on a held-out
   validation split is chosen, the other seeds are run with it, and the
   test accuracy of the chosen rate is reported (mean and std over all
   seeds). The seed sets the initialisation, the pre-training, the new
   head, the sampling and the noise; the data is fixed.

Reported: a markdown table (method x epsilon test accuracy, the non-private
references, noise dimension, DP step time relative to full fine-tuning in
the same invocation: median over epochs after the first of an epoch's time
divided by its steps, averaged over the method's runs), the chosen learning
rates, and a plot of test accuracy against epsilon per method
(`keras_dp.plotting`, error bars: std over seeds) written to `--out`.

    KERAS_BACKEND=jax python benchmarks/finetune_transformer.py
    KERAS_BACKEND=jax python benchmarks/finetune_transformer.py --smoke

The backend is KERAS_BACKEND (JAX when unset). `--smoke` runs tiny sizes
(1 seed, 1 epsilon, 1 epoch, one rate per grid) to check that every method
runs; its numbers mean nothing, and its plot goes to the temporary folder
unless `--out` is given. `--carriers` is passed on to `LowRankSparse` only
when given.
"""

import argparse
import math
import os
import shlex
import sys
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_dp  # noqa: E402

from private_fine_tuning import DELTA  # noqa: E402
from private_fine_tuning import fit_private  # noqa: E402
from private_fine_tuning import for_method  # noqa: E402
from keras_dp import plotting  # noqa: E402

try:
    import keras_hub  # noqa: E402
except ImportError as error:  # pragma: no cover
    raise SystemExit(
        f"This benchmark needs keras-hub: pip install keras-hub (import failed: {error})."
    )

METHODS = ("full", "lora", "rgp", "lsg")
LABELS = {
    "full": "Full DP fine-tuning",
    "lora": "DP-LoRA",
    "rgp": "RGP (LowRankSparse, sparsity 0)",
    "lsg": "LSG (LowRankSparse, sparsity {sparsity:g})",
}
# Learning-rate grids per method family; LoRA's adapters start at zero
# and are few, so its usual rates are larger.
FAMILY = {"full": "full", "lora": "lora", "rgp": "lowrank", "lsg": "lowrank"}
DEFAULT_RATES = {
    "full": (3e-3, 1e-2, 3e-2),
    "lora": (1e-2, 3e-2, 1e-1),
    "lowrank": (3e-3, 1e-2, 3e-2),
    "nonprivate": (1e-3, 3e-3, 1e-2),
}

# Vocabulary (token ids).
PAD, UNK, CLS, SEP, MASK = range(5)
NUM_TOPICS = 8
TOPIC_WORDS = 40
POLAR_WORDS = 8  # the first half of kind A, the second of kind B
VOCABULARY = 400
FIRST_TOPIC_WORD = 5
FIRST_POLAR_WORD = FIRST_TOPIC_WORD + NUM_TOPICS * TOPIC_WORDS
FIRST_BACKGROUND_WORD = FIRST_POLAR_WORD + POLAR_WORDS
REVERSED_TOPICS = (4, 5, 6, 7)
# Fraction of a sequence's words drawn from its topic: low enough that the
# topic is spread over several words, not one giveaway token.
TOPIC_RATE = 0.2
DATA_SEED = 1234
MASK_RATE = 0.15
HEAD = "head"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, < 60 s")
    parser.add_argument("--seeds", type=int, default=None, help="seeds (3)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument(
        "--epsilons",
        type=float,
        nargs="+",
        default=None,
        help="target epsilons; one noise multiplier each is calibrated (1 3 8)",
    )
    budget.add_argument(
        "--noise-multipliers",
        type=float,
        nargs="+",
        default=None,
        help="noise multipliers instead of target epsilons",
    )
    parser.add_argument("--epochs", type=int, default=None, help="DP epochs (15)")
    parser.add_argument("--batch-size", type=int, default=None, help="(100)")
    parser.add_argument("--rank", type=int, default=None, help="(8)")
    parser.add_argument("--sparsity", type=float, default=0.5, help="of LSG")
    parser.add_argument(
        "--refresh-every",
        type=int,
        default=20,
        help="train steps between LowRankSparse carrier refreshes",
    )
    parser.add_argument(
        "--carriers",
        choices=("weights", "history"),
        default=None,
        help="LowRankSparse carriers (passed on only when given)",
    )
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    for family, rates in DEFAULT_RATES.items():
        parser.add_argument(
            f"--{family}-learning-rates",
            type=float,
            nargs="+",
            default=None,
            help=f"grid of the {family} family ({' '.join(f'{r:g}' for r in rates)})",
        )
    parser.add_argument(
        "--tuning-seeds",
        type=int,
        default=1,
        help="seeds every rate of a grid is run with (the other seeds run "
        "only the chosen rate)",
    )
    parser.add_argument("--train-size", type=int, default=None, help="(2000)")
    parser.add_argument("--public-size", type=int, default=None, help="(20000)")
    parser.add_argument("--pretrain-epochs", type=int, default=None, help="(3)")
    parser.add_argument("--seq-len", type=int, default=None, help="(32)")
    parser.add_argument(
        "--out",
        default=None,
        help="the plot (benchmarks/finetune_transformer.png; smoke: temp folder)",
    )
    args = parser.parse_args(argv)
    defaults = (
        dict(
            seeds=1,
            epsilons=[8.0],
            epochs=1,
            batch_size=64,
            rank=2,
            train_size=256,
            public_size=512,
            pretrain_epochs=1,
            seq_len=16,
            hidden_dim=16,
            num_layers=1,
            val_size=64,
            test_size=64,
        )
        if args.smoke
        else dict(
            seeds=3,
            epsilons=[1.0, 3.0, 8.0],
            epochs=15,
            batch_size=100,
            rank=8,
            train_size=2000,
            public_size=20000,
            pretrain_epochs=3,
            seq_len=32,
            hidden_dim=32,
            num_layers=2,
            val_size=1000,
            test_size=2000,
        )
    )
    if args.noise_multipliers is not None:
        defaults.pop("epsilons")
    if args.out is None:
        args.out = (
            os.path.join(tempfile.gettempdir(), "finetune_transformer_smoke.png")
            if args.smoke
            else os.path.join("benchmarks", "finetune_transformer.png")
        )
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    for family in DEFAULT_RATES:
        name = f"{family}_learning_rates"
        if getattr(args, name) is None:
            rates = DEFAULT_RATES[family]
            setattr(args, name, list(rates[1:2] if args.smoke else rates))
    sizes = {len(getattr(args, f"{f}_learning_rates")) for f in DEFAULT_RATES}
    if len(sizes) != 1:
        parser.error(
            "every learning-rate grid must have the same size (the same "
            "tuning budget per method)"
        )
    return args


def make_sequences(n, rng, seq_len):
    """Sequences of the generator (see the module docstring).

    Returns token ids, topics, and the kind (0: A, 1: B) of the polar
    words when the sequence has one kind, else -1.
    """
    topics = rng.integers(0, NUM_TOPICS, n)
    words = seq_len - 2
    from_topic = rng.random((n, words)) < TOPIC_RATE
    topic_words = (
        FIRST_TOPIC_WORD
        + topics[:, None] * TOPIC_WORDS
        + rng.integers(0, TOPIC_WORDS, (n, words))
    )
    background = rng.integers(FIRST_BACKGROUND_WORD, VOCABULARY, (n, words))
    body = np.where(from_topic, topic_words, background)
    kinds = rng.integers(0, 2, n)
    polar_count = rng.integers(1, 4, n)
    half = POLAR_WORDS // 2
    for row in range(n):
        positions = rng.choice(words, polar_count[row], replace=False)
        body[row, positions] = (
            FIRST_POLAR_WORD + kinds[row] * half + rng.integers(0, half, len(positions))
        )
    ids = np.concatenate(
        [np.full((n, 1), CLS), body, np.full((n, 1), SEP)], axis=1
    ).astype("int32")
    return ids, topics.astype("int32"), kinds.astype("int32")


def public_task(args):
    """Masked-token prediction on sequences of the generator.

    15 % of the words are replaced by [MASK]; the targets are the original
    tokens, weighted 1 at the masked positions only.
    """
    rng = np.random.default_rng(DATA_SEED)
    ids, _, _ = make_sequences(args.public_size, rng, args.seq_len)
    masked = rng.random(ids.shape) < MASK_RATE
    masked[:, 0] = masked[:, -1] = False
    inputs = np.where(masked, MASK, ids).astype("int32")
    return bert_inputs(inputs), ids, masked.astype("float32")


def private_task(args):
    """Train, validation and test splits of the private task."""
    rng = np.random.default_rng(DATA_SEED + 1)
    sizes = (args.train_size, args.val_size, args.test_size)
    ids, topics, kinds = make_sequences(sum(sizes), rng, args.seq_len)
    labels = (kinds == 0).astype("int32")
    reversed_topic = np.isin(topics, REVERSED_TOPICS)
    labels = np.where(reversed_topic, 1 - labels, labels).astype("int32")
    splits = []
    start = 0
    for size in sizes:
        part = slice(start, start + size)
        splits.append((bert_inputs(ids[part]), labels[part]))
        start += size
    return splits


def bert_inputs(ids):
    return {
        "token_ids": ids,
        "segment_ids": np.zeros_like(ids),
        "padding_mask": (ids != PAD).astype("int32"),
    }


def build_classifier(num_classes, args):
    """A keras-hub BERT backbone (random init) and a linear head on the
    mean of its token outputs.

    Returns the model and its backbone. The mean rather than BERT's [CLS]
    pooler: every token's output reaches the head directly, so a new head
    can read the marker words at once, and what fine-tuning has to adapt is
    the context (attention) the tokens carry. The unused pooler is frozen.
    """
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=VOCABULARY,
        num_layers=args.num_layers,
        num_heads=2,
        hidden_dim=args.hidden_dim,
        intermediate_dim=2 * args.hidden_dim,
        max_sequence_length=args.seq_len,
        dropout=0.0,
    )
    backbone.get_layer("pooled_dense").trainable = False
    tokens = backbone(backbone.input)["sequence_output"]
    pooled = keras.layers.GlobalAveragePooling1D(name="mean")(tokens)
    logits = keras.layers.Dense(num_classes, name=HEAD)(pooled)
    return keras.Model(backbone.input, logits), backbone


def loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def pretrain(public, args, seed):
    """Non-private masked-token prediction; returns the backbone's weights
    and the masked-token accuracy on the last epoch."""
    keras.utils.set_random_seed(seed)
    _, backbone = build_classifier(2, args)
    tokens = backbone(backbone.input)["sequence_output"]
    model = keras.Model(backbone.input, keras.layers.Dense(VOCABULARY)(tokens))
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=loss(),
        weighted_metrics=["accuracy"],
    )
    x, y, weights = public
    history = model.fit(
        x,
        y,
        sample_weight=weights,
        batch_size=64,
        epochs=args.pretrain_epochs,
        verbose=0,
    )
    return backbone.get_weights(), history.history["accuracy"][-1]


def new_classifier(backbone_weights, args, seed):
    keras.utils.set_random_seed(seed)
    model, backbone = build_classifier(2, args)
    if backbone_weights is not None:
        backbone.set_weights(backbone_weights)
    return model, backbone


def evaluate(model, data):
    return float(model.evaluate(*data, batch_size=500, verbose=0)[1])


def fine_tune_nonprivate(backbone_weights, learning_rate, data, args, seed):
    train, val, test = data
    model, _ = new_classifier(backbone_weights, args, seed)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=loss(),
        metrics=["accuracy"],
    )
    model.fit(*train, batch_size=args.batch_size, epochs=args.epochs, verbose=0)
    return dict(val=evaluate(model, val), test=evaluate(model, test))


def fine_tune_private(method, backbone_weights, sigma, learning_rate, data, args, seed):
    train, val, test = data
    start = time.perf_counter()
    model, backbone = new_classifier(backbone_weights, args, seed)
    model = for_method(
        model,
        method,
        lora_layers=[backbone],
        rank=args.rank,
        sparsity=args.sparsity,
        refresh_every=args.refresh_every,
        exclude=(HEAD,),
        seed=seed,
        **({} if args.carriers is None else dict(carriers=args.carriers)),
    )
    run = fit_private(
        model,
        train,
        learning_rate=learning_rate,
        noise_multiplier=sigma,
        loss=loss(),
        batch_size=args.batch_size,
        epochs=args.epochs,
        seed=seed,
    )
    return dict(
        val=evaluate(run.model, val),
        test=evaluate(run.model, test),
        epsilon=run.epsilon,
        steps=run.steps,
        dimension=run.dimension,
        step_time=run.step_time,
        path=run.path,
        seconds=time.perf_counter() - start,
    )


def tune(run, grid, seeds, tuning_seeds):
    """Runs every rate of `grid` with the first `tuning_seeds` seeds, picks
    the one with the best mean validation accuracy, runs the other seeds
    with it. Returns the rate, its runs (all seeds) and the tuning runs."""
    tried = {rate: [run(rate, seed) for seed in seeds[:tuning_seeds]] for rate in grid}
    rate = max(grid, key=lambda r: np.mean([x["val"] for x in tried[r]]))
    runs = tried[rate] + [run(rate, seed) for seed in seeds[tuning_seeds:]]
    return dict(rate=rate, runs=runs, tried=tried)


def mean_std(runs, key="test"):
    values = np.array([r[key] for r in runs])
    return values.mean(), values.std()


def label(method, args):
    return LABELS[method].format(sparsity=args.sparsity)


def plot(results, references, epsilons, args):
    stats = {
        method: [mean_std(tuned["runs"]) for tuned in by_epsilon]
        for method, by_epsilon in results.items()
    }
    series = {
        label(method, args): [(e, m, s) for e, (m, s) in zip(epsilons, stats[method])]
        for method in results
    }
    series["non-private fine-tuning"] = [(None, references["pre-trained"][0])]
    ax = plotting.plot_accuracy_vs_epsilon(
        series,
        title=(
            f"DP fine-tuning of a {args.num_layers}-layer BERT "
            f"(synthetic task), delta = {DELTA:g}"
        ),
        ylabel="test accuracy",
    )
    if "random init" in references:
        ax.axhline(
            references["random init"][0],
            linestyle=":",
            color="black",
            label="non-private, random init",
        )
    ax.axhline(0.5, linestyle="-.", color="lightgray", label="chance")
    if len(epsilons) > 1:
        ax.set_xscale("log")
    # Only the epsilons run are labelled (the log axis' minor labels would
    # overlap them).
    ax.minorticks_off()
    ax.set_xticks(epsilons, [f"{e:.3g}" for e in epsilons])
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.02, 0.5))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    ax.figure.savefig(args.out, bbox_inches="tight")


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    command = " ".join(
        [
            f"KERAS_BACKEND={keras.backend.backend()}",
            "python",
            "benchmarks/finetune_transformer.py",
        ]
        + [shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)]
    )
    print(f"reproduce: {command}")
    public = public_task(args)
    data = private_task(args)
    train = data[0]
    n = len(train[1])
    q = args.batch_size / n
    steps = args.epochs * math.ceil(n / args.batch_size)
    if args.noise_multipliers is not None:
        sigmas = list(args.noise_multipliers)
    else:
        sigmas = [
            keras_dp.calibrate_noise_multiplier(e, DELTA, sample_rate=q, steps=steps)
            for e in args.epsilons
        ]
    epsilons = [keras_dp.compute_epsilon(s, q, steps, DELTA) for s in sigmas]
    seeds = list(range(args.seeds))
    tuning_seeds = min(args.tuning_seeds, len(seeds))
    print(
        f"backend {keras.backend.backend()}, keras-hub {keras_hub.__version__}; "
        f"BERT {args.num_layers} layers, hidden {args.hidden_dim}, "
        f"{args.seq_len} tokens, vocabulary {VOCABULARY}"
    )
    print(
        f"public: {args.public_size} sequences (masked tokens); private: "
        f"{n} train / {args.val_size} validation / {args.test_size} test, "
        f"label base rate {train[1].mean():.3f}"
    )
    print(
        f"DP: q = {args.batch_size}/{n} = {q:.4f}, {args.epochs} epochs = "
        f"{steps} steps, delta {DELTA:g}, clip 1, rank {args.rank}, refresh "
        f"every {args.refresh_every}"
        + ("" if args.carriers is None else f", carriers {args.carriers}")
    )
    for sigma, epsilon in zip(sigmas, epsilons):
        print(f"  sigma {sigma:.4f} -> epsilon {epsilon:.3f}")
    grids = {f: getattr(args, f"{f}_learning_rates") for f in DEFAULT_RATES}
    print(
        f"learning-rate grids, each rate run with {tuning_seeds} seed(s), "
        "chosen on validation per method and epsilon, the other seeds run "
        "with the chosen rate: "
        + "; ".join(f"{f} {' '.join(f'{r:g}' for r in g)}" for f, g in grids.items()),
        flush=True,
    )

    backbones = {}
    for seed in seeds:
        backbones[seed], public_accuracy = pretrain(public, args, seed)
        print(
            f"seed {seed}: pre-trained, masked-token accuracy {public_accuracy:.3f} "
            "(low by design: words are random given topic and kind)",
            flush=True,
        )

    references = {}
    # The smoke run skips the random-init reference (it checks only that
    # the code runs, and must stay short).
    starts = (("pre-trained", True),) + (
        () if args.smoke else (("random init", False),)
    )
    for name, pretrained in starts:

        def run(rate, seed, pretrained=pretrained):
            weights = backbones[seed] if pretrained else None
            return fine_tune_nonprivate(weights, rate, data, args, seed)

        tuned = tune(run, grids["nonprivate"], seeds, tuning_seeds)
        references[name] = (*mean_std(tuned["runs"]), tuned["rate"])
        print(
            f"non-private fine-tuning from {name}: test accuracy "
            f"{references[name][0]:.3f} ± {references[name][1]:.3f} "
            f"(rate {tuned['rate']:g})",
            flush=True,
        )
    if "random init" in references:
        gap = references["pre-trained"][0] - references["random init"][0]
        verdict = (
            "pre-training helps"
            if gap >= 0.05
            else "WARNING: pre-training does not clearly help"
        )
        print(f"{verdict}: pre-trained - random init = {gap:+.3f} test accuracy")

    results = {m: [] for m in args.methods}
    for k, sigma in enumerate(sigmas):
        for method in args.methods:

            def run(rate, seed, method=method, sigma=sigma, k=k):
                r = fine_tune_private(
                    method, backbones[seed], sigma, rate, data, args, seed
                )
                print(
                    f"  eps {epsilons[k]:.2f} {method:4s} rate {rate:g} seed "
                    f"{seed}: val {r['val']:.3f} test {r['test']:.3f} eps "
                    f"{r['epsilon']:.3f} steps {r['steps']} dim "
                    f"{r['dimension']} step {r['step_time'] * 1e3:.1f} ms "
                    f"({r['path']} per-example path), {r['seconds']:.0f} s in all",
                    flush=True,
                )
                return r

            results[method].append(
                tune(run, grids[FAMILY[method]], seeds, tuning_seeds)
            )

    everything = [
        r
        for by_epsilon in results.values()
        for tuned in by_epsilon
        for r in tuned["runs"] + [x for xs in tuned["tried"].values() for x in xs]
    ]
    spent = sorted({round(r["epsilon"], 6) for r in everything})
    expected = sorted(round(e, 6) for e in epsilons)
    print(
        f"\nepsilon of every run: {spent}, steps "
        f"{sorted({r['steps'] for r in everything})}; compute_epsilon for plain "
        f"DP-SGD: {expected}"
        + ("" if spent == expected else " -- WARNING: they differ")
    )
    step_times = {
        m: float(
            np.mean(
                [
                    r["step_time"]
                    for tuned in results[m]
                    for xs in [tuned["runs"], *tuned["tried"].values()]
                    for r in xs
                ]
            )
        )
        for m in results
    }
    base = step_times.get("full")
    heading = " | ".join(f"ε = {e:.3g}" for e in epsilons)
    print(
        f"\nTest accuracy (mean ± std over {len(seeds)} seeds; learning rate "
        f"chosen on validation):\n"
    )
    print(
        f"| Method | {heading} | no privacy | Noise dimension | DP step time vs full |"
    )
    print("|---|" + "---|" * len(epsilons) + "---|---|---|")
    blank = " | ".join("-" for _ in epsilons)
    for name, (mean, std, _) in references.items():
        print(
            f"| Non-private fine-tuning ({name}) | {blank} | {mean:.3f} ± "
            f"{std:.3f} | - | - |"
        )
    for method, by_epsilon in results.items():
        cells = " | ".join(
            "{:.3f} ± {:.3f}".format(*mean_std(tuned["runs"])) for tuned in by_epsilon
        )
        dimension = by_epsilon[0]["runs"][0]["dimension"]
        ratio = f"{step_times[method] / base:.2f}" if base else "-"
        print(f"| {label(method, args)} | {cells} | - | {dimension:,} | {ratio} |")
    print(
        "\nChosen learning rates (mean validation accuracy of the tuning runs; "
        "non-private: "
        + ", ".join(f"{name} {references[name][2]:g}" for name in references)
        + "):\n"
    )
    print(f"| Method | {heading} |")
    print("|---|" + "---|" * len(epsilons))
    for method, by_epsilon in results.items():
        cells = " | ".join(
            f"{t['rate']:g} ({mean_std(t['tried'][t['rate']], 'val')[0]:.3f})"
            for t in by_epsilon
        )
        print(f"| {label(method, args)} | {cells} |")
    print(
        "\nmean DP step times: "
        + ", ".join(f"{m} {t * 1e3:.1f} ms" for m, t in step_times.items())
    )
    plot(results, references, epsilons, args)
    print(f"wrote {args.out}")
    print(f"total time {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
