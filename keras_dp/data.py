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
"""

import math
import secrets

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


def _round_up(value, multiple):
    return max(multiple, -(-value // multiple) * multiple)


def num_examples(x):
    return int(tree.flatten(x)[0].shape[0])


class PoissonSampler(keras.utils.PyDataset):
    """Batches in which every example appears independently with rate `q`.

    Args:
        x: input arrays (array, or list/dict of arrays, all with `n` rows).
        y: optional targets, same structure rules.
        sample_weight: optional per-example weights (shape `(n,)`).
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

    Each item is `(x, y, sample_weight)` with `padded_batch_size` rows; rows
    beyond the sampled examples are zeros with sample weight 0 (copies of
    a real example would carry its values into steps it was not sampled
    in). The train step leaves rows of weight 0 out of the update exactly,
    even where their loss or gradient is not finite.
    """

    def __init__(
        self,
        x,
        y=None,
        sample_weight=None,
        batch_size=32,
        steps_per_epoch=None,
        accumulation_steps=1,
        seed=None,
        secure_mode=False,
    ):
        super().__init__()
        secure_mode = arguments.boolean("secure_mode", secure_mode)
        seed = arguments.seed("seed", seed)
        if secure_mode and seed is not None:
            raise ValueError(
                "`secure_mode=True` draws every batch from fresh operating-"
                f"system entropy, so it takes no seed. Received seed={seed!r}: "
                "pass seed=None, or secure_mode=False for reproducible batches."
            )
        self.secure_mode = secure_mode
        # Secure mode: the current logical batch, kept until all its
        # accumulation parts are read (each part must come from one draw).
        self._secure_batch = None
        if y is None:
            raise ValueError(
                "PoissonSampler needs targets `y`: padding rows are marked by "
                "sample weight 0, which Keras only passes along with targets. "
                "For a model whose loss ignores targets, pass any array with "
                "one row per example as `y`."
            )
        self.x = x
        self.y = y
        self.n = num_examples(x)
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
        self.sample_weight = _sample_weights(sample_weight, self.n)
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
        chosen = np.flatnonzero(rng.random(self.n) < self.sample_rate)
        return rng.permutation(chosen)

    def __getitem__(self, index):
        update, part = divmod(index, self.accumulation_steps)
        chosen = np.array_split(self._logical_batch(update), self.accumulation_steps)[
            part
        ]
        rows = max(self.padded_size, _round_up(len(chosen), 8))
        return (
            _lists_as_tuples(_take_padded(self.x, chosen, rows)),
            _lists_as_tuples(_take_padded(self.y, chosen, rows)),
            _take_padded(self.sample_weight, chosen, rows),
        )

    def _logical_batch(self, update):
        if not self.secure_mode:
            return self.sample_indices(update)
        key = (self.epoch, update)
        if self._secure_batch is None or self._secure_batch[0] != key:
            self._secure_batch = (key, self.sample_indices(update))
        return self._secure_batch[1]

    def on_epoch_end(self):
        self.epoch += 1
        self._secure_batch = None


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
    """The rows `indices` of each array, then zeros up to `rows` rows."""

    def take(array):
        array = np.asarray(array)
        out = np.zeros((rows,) + array.shape[1:], dtype=array.dtype)
        out[: len(indices)] = array[indices]
        return out

    return tree.map_structure(take, structure)


def _lists_as_tuples(structure):
    """Lists of arrays as tuples: Keras turns a `PyDataset`'s items into a
    `tf.data` signature on TensorFlow, which takes tuples, not lists (a
    model with several inputs or outputs takes either)."""
    if isinstance(structure, (list, tuple)):
        return tuple(_lists_as_tuples(item) for item in structure)
    if isinstance(structure, dict):
        return {key: _lists_as_tuples(value) for key, value in structure.items()}
    return structure
