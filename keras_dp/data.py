"""Poisson sampling: the batch sampling that DP-SGD's accounting assumes.

The privacy analysis of DP-SGD (and the accountants in `keras_dp.accounting`)
assumes each example joins each batch independently with probability
`q = batch_size / n`. Shuffled fixed-size batches are a different mechanism
whose guarantee can be weaker. `PoissonSampler` draws batches the way the
accountant assumes and pads them to a fixed number of rows, so compiled train
steps keep one shape; padding rows are all zeros (inputs, targets, sample
weight 0), so no real example's values enter a step it was not sampled in,
and they contribute exactly nothing to the clipped gradient sum (even where a
row of zeros gives the model a non-finite loss: see `keras_dp.per_example`).

`fit` on a private model uses it automatically for in-memory data; build one
yourself for a custom pipeline:

```python
sampler = keras_dp.data.PoissonSampler(x, y, batch_size=256)
model.fit(sampler, epochs=3)
```

Data that is not in memory is sampled from an *example source*: anything
with `len(source)` and `source[i]` returning example `i` as `(x, y)` or
`(x, y, sample_weight)` (a list of files read on access, an array_record
or Grain data source, a `PyDataset` of single examples). Only the sampled
examples are read, and a step costs O(batch), whatever `n`:

```python
sampler = keras_dp.data.PoissonSampler(source=ImageFiles(paths), batch_size=256)
model.fit(sampler, epochs=3)
```
"""

import math
import secrets
import threading

import keras
import numpy as np
from keras import tree

from keras_dp import arguments

# Padded rows = expected batch + this many standard deviations of the
# Binomial batch size. A larger batch (probability ~1e-3 per step) is padded
# to the next multiple of 8 instead, costing one retrace, never truncated.
PADDING_STDDEVS = 3.0


def padded_batch_size(batch_size, sample_rate):
    """Rows of a padded Poisson batch of expected size `batch_size`."""
    stddev = math.sqrt(batch_size * (1.0 - sample_rate))
    return _round_up(int(math.ceil(batch_size + PADDING_STDDEVS * stddev)), 8)


def poisson_sample(rng, n, sample_rate):
    """Indices of a Poisson sample of `range(n)` at rate `sample_rate`, in
    random order, drawn by the NumPy generator `rng`.

    Every index is in the sample independently with probability
    `sample_rate`. The draw costs O(batch) rather than O(n): the sample's
    size is Binomial(n, q), and given its size a Poisson sample is a
    uniformly random subset of that size, which `Generator.choice` draws
    without replacement (Floyd's algorithm when the subset is small next
    to `n`), so no `n` uniforms are drawn or stored.
    """
    size = int(rng.binomial(n, sample_rate))
    return rng.choice(n, size=size, replace=False, shuffle=True)


def _round_up(value, multiple):
    return max(multiple, -(-value // multiple) * multiple)


def num_examples(x):
    return int(tree.flatten(x)[0].shape[0])


class PoissonSampler(keras.utils.PyDataset):
    """Batches in which every example appears independently with rate `q`.

    Args:
        x: input arrays (array, or list/dict of arrays, all with `n` rows;
            NumPy memmaps are read row by row, only where sampled).
        y: targets, same structure rules.
        sample_weight: optional per-example weights (shape `(n,)`).
        source: instead of `x`, `y` and `sample_weight`, an example source:
            `len(source)` examples, `source[i]` returning example `i` as
            `(x, y)` or `(x, y, sample_weight)` (arrays without a batch
            axis, the same shapes for every example). Only the sampled
            examples are read.
        batch_size: the *expected* (logical) batch size `B`; `q = B / n`.
        steps_per_epoch: optimizer steps per epoch; defaults to
            `ceil(n / B)`, so an epoch sees each example once on average.
        accumulation_steps: with the optimizer's
            `gradient_accumulation_steps=k`, one logical batch (rate
            `q = k * B / n`) is drawn per update and split into `k`
            micro-batches of expected size `B`, so an example enters an
            update at most once.
        seed: seed of the sampling. None draws one from the OS entropy pool.
            (NumPy's generator is not a cryptographic one; like other DP
            libraries, this sampler does not defend against an adversary
            who can predict its pseudo-random stream: see `secure_mode`.)
        secure_mode: False (the default) or True: every logical batch is
            drawn by a generator keyed with 128 fresh bits of the
            operating system's cryptographic entropy (`secrets`), never
            stored, instead of the reproducible stream of `seed` (which
            must then be None). A private model's `fit` builds its sampler
            this way when the DP optimizer has `secure_mode=True`.

        workers: as for `keras.utils.PyDataset`: read batches ahead in
            this many threads, for sources whose reads wait on storage.
        use_multiprocessing: as for `keras.utils.PyDataset`: processes
            instead of threads (not with `secure_mode`).
        max_queue_size: as for `keras.utils.PyDataset`.

    Each item is `(x, y, sample_weight)` with `padded_batch_size` rows; rows
    beyond the sampled examples are zeros with sample weight 0 (copies of
    a real example would carry its values into steps it was not sampled
    in). The train step leaves rows of weight 0 out of the update exactly,
    even where their loss or gradient is not finite.
    """

    def __init__(
        self,
        x=None,
        y=None,
        sample_weight=None,
        batch_size=32,
        steps_per_epoch=None,
        accumulation_steps=1,
        seed=None,
        secure_mode=False,
        source=None,
        workers=1,
        use_multiprocessing=False,
        max_queue_size=10,
    ):
        super().__init__(
            workers=workers,
            use_multiprocessing=use_multiprocessing,
            max_queue_size=max_queue_size,
        )
        secure_mode = arguments.boolean("secure_mode", secure_mode)
        seed = arguments.seed("seed", seed)
        if secure_mode and seed is not None:
            raise ValueError(
                "`secure_mode=True` draws every batch from fresh operating-"
                f"system entropy, so it takes no seed. Received seed={seed!r}: "
                "pass seed=None, or secure_mode=False for reproducible batches."
            )
        self.secure_mode = secure_mode
        if secure_mode and use_multiprocessing:
            raise ValueError(
                "`secure_mode=True` draws each logical batch once and keeps "
                "it until all its accumulation parts are read, which worker "
                "processes cannot share. Use threads (`workers` with "
                "use_multiprocessing=False), or secure_mode=False."
            )
        # Secure mode: the current logical batch, kept until all its
        # accumulation parts are read (each part must come from one draw,
        # also when worker threads read parts at once).
        self._secure_batch = None
        self._secure_lock = threading.Lock()
        if source is not None:
            if x is not None or y is not None or sample_weight is not None:
                raise ValueError(
                    "Pass either arrays (`x`, `y`, `sample_weight`) or an "
                    "example `source`, not both: a source's examples carry "
                    "their own targets and weights."
                )
            self.examples = SourceExamples(source)
        else:
            if y is None:
                raise ValueError(
                    "PoissonSampler needs targets `y`: padding rows are "
                    "marked by sample weight 0, which Keras only passes "
                    "along with targets. For a model whose loss ignores "
                    "targets, pass any array with one row per example as "
                    "`y`." + ("" if x is not None else " Or pass an example `source`.")
                )
            self.examples = ArrayExamples(x, y, sample_weight)
        self.n = self.examples.n
        batch_size = arguments.positive_int(
            "batch_size", batch_size, hint="the expected batch size"
        )
        steps_per_epoch = arguments.positive_int(
            "steps_per_epoch", steps_per_epoch, allow_none=True
        )
        self.batch_size = batch_size
        self.accumulation_steps = (
            arguments.positive_int(
                "accumulation_steps", accumulation_steps, allow_none=True
            )
            or 1
        )
        logical = batch_size * self.accumulation_steps
        if logical > self.n:
            raise ValueError(
                f"The sample rate q = batch_size * accumulation_steps / n = "
                f"{logical} / {self.n} is above 1: the expected batch cannot "
                "be larger than the dataset. Use a smaller batch_size. "
                f"Received: batch_size={batch_size}, accumulation_steps="
                f"{self.accumulation_steps}, n={self.n}."
            )
        self.sample_rate = logical / self.n
        self.updates_per_epoch = steps_per_epoch or math.ceil(self.n / logical)
        self.seed = (
            None
            if secure_mode
            else (secrets.randbits(63) if seed is None else int(seed))
        )
        self.padded_size = padded_batch_size(batch_size, batch_size / self.n)
        self.epoch = 0

    @property
    def expected_batch_size(self):
        return self.batch_size

    def __len__(self):
        return self.updates_per_epoch * self.accumulation_steps

    def sample_indices(self, update):
        """Indices of the logical batch of optimizer update `update` (in
        secure mode a fresh draw at each call)."""
        if self.secure_mode:
            rng = np.random.Generator(np.random.Philox(key=secrets.randbits(128)))
        else:
            rng = np.random.default_rng([self.seed, self.epoch, update])
        return poisson_sample(rng, self.n, self.sample_rate)

    # The arrays of an array-backed sampler (None for a source).
    x = property(lambda self: getattr(self.examples, "x", None))
    y = property(lambda self: getattr(self.examples, "y", None))
    sample_weight = property(lambda self: getattr(self.examples, "sample_weight", None))

    def __getitem__(self, index):
        update, part = divmod(index, self.accumulation_steps)
        chosen = np.array_split(self._logical_batch(update), self.accumulation_steps)[
            part
        ]
        rows = max(self.padded_size, _round_up(len(chosen), 8))
        bx, by, bw = self.examples.padded(chosen, rows)
        return _lists_as_tuples(bx), _lists_as_tuples(by), bw

    def as_tf_dataset(self):
        """This sampler's batches as a `tf.data.Dataset`, one pass per
        epoch, for a `tf.data` pipeline that works on batches (a keras-hub
        preprocessor, tokenization, augmentation):

        ```python
        sampler = keras_dp.data.PoissonSampler(texts, labels, batch_size=64)
        batches = sampler.as_tf_dataset().map(
            lambda x, y, w: (preprocessor(x), y, w), num_parallel_calls=4
        )
        model.fit(batches.prefetch(2), epochs=3)
        ```

        `fit` recognises the pipeline and accounts for it as Poisson
        sampling at the sampler's rate. Between the sampler and `fit` only
        maps, prefetching and options may stand: any other step (filter,
        unbatch, rebatch, shuffle, cache, repeat, take) would change which
        examples a step sees, and is refused by `fit`. Padding rows hold
        zeros (empty strings in string arrays) and keep weight 0 through
        the map. Needs TensorFlow installed (any Keras backend).
        """
        import tensorflow as tf

        def spec(array):
            dtype = tf.string if array.dtype.kind in "OSU" else array.dtype
            return tf.TensorSpec((None,) + array.shape[1:], dtype)

        def batches():
            for index in range(len(self)):
                yield self[index]
            self.on_epoch_end()

        first = self.first_examples(1)
        signature = (
            _lists_as_tuples(tree.map_structure(spec, first[0])),
            _lists_as_tuples(tree.map_structure(spec, first[1])),
            spec(first[2]),
        )
        dataset = tf.data.Dataset.from_generator(
            batches, output_signature=signature
        ).apply(tf.data.experimental.assert_cardinality(len(self)))
        # `fit` finds the sampler here (keras_dp.fit_data.poisson_sampler_of).
        dataset._keras_dp_sampler = self
        return dataset

    def first_examples(self, count):
        """`(x, y, sample_weight)` of the first `count` examples (fewer
        when there are fewer), for checks before training."""
        return self.examples.padded(np.arange(min(count, self.n)), None)

    def _logical_batch(self, update):
        if not self.secure_mode:
            return self.sample_indices(update)
        key = (self.epoch, update)
        with self._secure_lock:
            if self._secure_batch is None or self._secure_batch[0] != key:
                self._secure_batch = (key, self.sample_indices(update))
            return self._secure_batch[1]

    def on_epoch_end(self):
        self.epoch += 1
        self._secure_batch = None


class ArrayExamples:
    """The examples of in-memory arrays (or memmaps): `x`, `y` and the
    per-example weights, gathered by row."""

    def __init__(self, x, y, sample_weight):
        self.x = x
        self.y = y
        self.n = num_examples(x)
        self.sample_weight = _sample_weights(sample_weight, self.n)

    def padded(self, indices, rows):
        """The examples `indices`, then zero rows up to `rows` rows (None:
        no padding)."""
        return (
            _take_padded(self.x, indices, rows),
            _take_padded(self.y, indices, rows),
            _take_padded(self.sample_weight, indices, rows),
        )


class SourceExamples:
    """The examples of an example source (`len(source)`, `source[i]`),
    read one by one where sampled and stacked into a batch."""

    def __init__(self, source):
        if not (hasattr(source, "__len__") and hasattr(source, "__getitem__")):
            raise arguments.ArgumentTypeError(
                "`source` must support `len(source)` and `source[i]` (one "
                "example as `(x, y)` or `(x, y, sample_weight)`). Received: "
                f"source of type {type(source).__name__}."
            )
        self.source = source
        self.n = len(source)
        if self.n < 1:
            raise ValueError("`source` has no examples: len(source) is 0.")
        first = self._example(0)
        self._template = tree.map_structure(lambda a: np.zeros_like(a), first)

    def _example(self, index):
        example = self.source[int(index)]
        if not isinstance(example, (tuple, list)) or len(example) not in (2, 3):
            raise ValueError(
                "Each example of `source` must be a tuple `(x, y)` or `(x, y, "
                f"sample_weight)`. Received for source[{int(index)}]: "
                f"{type(example).__name__}"
                + (f" of length {len(example)}" if hasattr(example, "__len__") else "")
                + "."
            )
        x, y, weight = tuple(example) + (None,) * (3 - len(example))
        weight = np.float32(1.0 if weight is None else weight)
        if not (np.isfinite(weight) and weight >= 0):
            raise ValueError(
                f"The sample weight of source[{int(index)}] must be a finite "
                f"number >= 0. Received: {float(weight)!r}."
            )
        return (
            tree.map_structure(np.asarray, x),
            tree.map_structure(np.asarray, y),
            np.asarray(weight, dtype="float32"),
        )

    def padded(self, indices, rows):
        examples = [self._example(i) for i in indices]
        count = len(examples)
        rows = count if rows is None else rows

        def stack(template, *values):
            out = _padding((rows,) + template.shape, template.dtype)
            for row, value in enumerate(values):
                if value.shape != template.shape:
                    raise ValueError(
                        "The examples of `source` must all have the same "
                        f"shapes (they are stacked into batches): source["
                        f"{int(indices[row])}] has an array of shape "
                        f"{value.shape} where source[0] has {template.shape}. "
                        "Pad or crop them to one shape in the source."
                    )
                out[row] = value
            return out

        if not examples:
            return tree.map_structure(stack, self._template)
        return tree.map_structure(stack, self._template, *examples)


def _sample_weights(sample_weight, n):
    """Per-example weights as float32 with `n` rows (ones by default).

    A negative weight would turn the example's loss around and a
    non-finite one its whole gradient (the train step would drop that
    example from every batch it is in): both are refused."""
    if sample_weight is None:
        return np.ones((n,), dtype="float32")
    try:
        # A weight beyond float32's range becomes inf, refused below.
        with np.errstate(over="ignore"):
            weights = np.asarray(sample_weight, dtype="float32")
    except (TypeError, ValueError):
        weights = None
    if weights is None or weights.ndim == 0 or weights.shape[0] != n:
        raise arguments.ArgumentTypeError(
            f"`sample_weight` must be an array of numbers with one row per "
            f"example ({n} rows), or None. Received: sample_weight of type "
            f"{type(sample_weight).__name__}"
            + ("" if weights is None else f" and shape {weights.shape}")
            + "."
        )
    bad = np.argwhere(~(np.isfinite(weights) & (weights >= 0)))
    if len(bad):
        index = ", ".join(str(int(i)) for i in bad[0])
        raise ValueError(
            "`sample_weight` must hold finite numbers >= 0 (as float32). "
            f"Received: sample_weight[{index}]={float(weights[tuple(bad[0])])!r} "
            f"({len(bad)} such entries)."
        )
    return weights


def _take_padded(structure, indices, rows):
    """The rows `indices` of each array, then zeros up to `rows` rows
    (None: `len(indices)` rows)."""

    def take(array):
        array = np.asarray(array)
        count = len(indices) if rows is None else rows
        out = _padding((count,) + array.shape[1:], array.dtype)
        out[: len(indices)] = array[indices]
        return out

    return tree.map_structure(take, structure)


def _padding(shape, dtype):
    """Padding rows: zeros, or empty strings in arrays of text (a text
    preprocessor tokenizes them like any other string)."""
    if dtype.kind in "OSU":
        return np.full(shape, "", dtype=dtype if dtype.kind != "O" else object)
    return np.zeros(shape, dtype=dtype)


def _lists_as_tuples(structure):
    """Lists of arrays as tuples: Keras turns a `PyDataset`'s items into a
    `tf.data` signature on TensorFlow, which takes tuples, not lists (a
    model with several inputs or outputs takes either)."""
    if isinstance(structure, (list, tuple)):
        return tuple(_lists_as_tuples(item) for item in structure)
    if isinstance(structure, dict):
        return {key: _lists_as_tuples(value) for key, value in structure.items()}
    return structure
