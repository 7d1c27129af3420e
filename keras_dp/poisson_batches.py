"""Poisson-sampled batches: what every keras_dp sampler shares.

A sampler draws, for each optimizer update, a Poisson sample of its
*privacy units* (the examples of `keras_dp.data.PoissonSampler`, the users
of `keras_dp.data.UserSampler`): every unit joins independently with rate
`q`, as the accountant assumes. `PoissonBatches` holds the parts that do
not depend on what a unit is: the seed or secure mode, the logical batch
of an update and its split into gradient-accumulation parts, the number
of batches per epoch and the `tf.data` form (`as_tf_dataset`). A subclass
sets the rate with `_set_rate`, and turns a part's unit indices into
padded rows in `__getitem__`.

```python
class Sampler(PoissonBatches):
    def __init__(self, n, batch_size):
        super().__init__(seed=0)
        self._set_rate(n, batch_size, None, 1, "batch_size", "n")

    def __getitem__(self, index):
        units = self.part_units(index)  # this batch's sampled unit indices
        ...
```
"""

import math
import secrets
import threading

import keras
import numpy as np
from keras import tree

from keras_dp import arguments
from keras_dp import processes

# A train step compiled once per batch shape (XLA: every JAX step, and
# `jit_compile=True` on TensorFlow and PyTorch) gets batches padded to one of
# three sizes: the expected batch (about half of the draws fit), plus 1
# standard deviation of the Binomial batch size (about 84%) and plus 3 (all
# but about 1 in 1,000), each rounded up to a multiple of 8. Each size costs
# one compilation, once; a single size would make every step compute the
# padding rows of the largest. A larger draw is padded to the next multiple
# of 8 (one more compilation), never truncated.
PADDING_STDDEVS = (0.0, 1.0, 3.0)


def padded_batch_sizes(batch_size, sample_rate):
    """Rows a padded Poisson batch of expected size `batch_size` has under a
    train step compiled once per batch shape, in increasing order: each
    batch is padded to the first that holds it."""
    stddev = math.sqrt(batch_size * (1.0 - sample_rate))
    return tuple(
        sorted(
            {
                round_up(int(math.ceil(batch_size + k * stddev)), 8)
                for k in PADDING_STDDEVS
            }
        )
    )


def padded_batch_size(batch_size, sample_rate):
    """The most rows of a padded Poisson batch of expected size
    `batch_size`, but for a rare larger draw (about 1 in 1,000)."""
    return padded_batch_sizes(batch_size, sample_rate)[-1]


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


def round_up(value, multiple):
    return max(multiple, -(-value // multiple) * multiple)


def num_examples(x):
    return int(tree.flatten(x)[0].shape[0])


def check_rows(sampler, **arrays):
    """Raises a ValueError unless every array in `arrays` (name: an array or
    a structure of arrays) has as many rows as the first: a shorter one
    would fail only when a draw first reaches past its end."""
    sizes = {}
    for name, structure in arrays.items():
        leaves = tree.flatten(structure)
        for k, leaf in enumerate(leaves):
            if leaf is None:
                continue
            label = name if len(leaves) == 1 else f"{name}[{k}]"
            shape = getattr(leaf, "shape", ())
            sizes[label] = int(shape[0]) if len(shape) else None
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{label}: {rows}" for label, rows in sizes.items())
        raise ValueError(
            f"{sampler} needs one row per example in every array, but their "
            f"rows differ ({listed}; None: not an array with a row axis). "
            "Pass arrays that all hold the same examples, in the same order."
        )


class PoissonBatches(keras.utils.PyDataset):
    """Base of the Poisson samplers (see the module docstring).

    Attributes set by `_set_rate`: `n` (units), `batch_size` (expected
    units per batch), `accumulation_steps`, `sample_rate` (`q`, per
    logical batch), `updates_per_epoch`, `seed` (None in secure mode),
    `padded_sizes` (the units a batch is padded to, `pad_for_step`).
    """

    def __init__(
        self,
        seed=None,
        secure_mode=False,
        workers=1,
        use_multiprocessing=False,
        max_queue_size=10,
        process_index=None,
        process_count=None,
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
        self._set_processes(process_index, process_count)
        if seed is None and not secure_mode:
            if self.process_count > processes.count():
                raise ValueError(
                    f"This sampler is shard {self.process_index} of "
                    f"{self.process_count} processes, which must all draw "
                    "the same batches (each keeps its own shard's units), "
                    "but seed=None draws a seed of its own in each process "
                    "and jax.distributed is not running to share one. Pass "
                    "the same seed=... on every process."
                )
            # One seed for all processes: process 0's.
            seed = processes.broadcast(secrets.randbits(63))
        self.seed = None if secure_mode else int(seed)
        # Secure mode: the current logical batch, kept until all its
        # accumulation parts are read (each part must come from one draw,
        # also when worker threads read parts at once).
        self._secure_batch = None
        self._secure_lock = threading.Lock()
        self.epoch = 0

    def _set_processes(self, process_index, process_count):
        if (process_index is None) != (process_count is None):
            raise ValueError(
                "Pass both `process_index` and `process_count` (this "
                "process's shard and the number of processes), or neither "
                "(they are then read from jax.distributed). Received: "
                f"process_index={process_index!r}, "
                f"process_count={process_count!r}."
            )
        if process_count is None:
            process_index, process_count = processes.index(), processes.count()
        self.process_count = arguments.positive_int(
            "process_count", process_count, hint="the number of processes"
        )
        self.process_index = arguments.integer(
            "process_index",
            process_index,
            low=0,
            high=self.process_count - 1,
            hint="this process's index: processes are numbered from 0 to "
            "process_count - 1",
        )
        if self.secure_mode and self.process_count > 1:
            raise ValueError(
                "`secure_mode=True` draws every batch from this process's "
                "own operating-system entropy, which the other processes "
                f"cannot share, and the {self.process_count} processes must "
                "agree on the size of every batch. Training across processes "
                "needs secure_mode=False (with the same seed, or seed=None "
                "under jax.distributed)."
            )

    def _set_rate(
        self, n, batch_size, steps_per_epoch, accumulation_steps, size_name, n_name
    ):
        """Checks and sets the sampling of `n` units, `batch_size`
        expected per batch (`size_name` and `n_name` name them in errors)."""
        self.n = n
        self.batch_size = arguments.positive_int(
            size_name, batch_size, hint="the expected batch size"
        )
        steps_per_epoch = arguments.positive_int(
            "steps_per_epoch", steps_per_epoch, allow_none=True
        )
        self.accumulation_steps = (
            arguments.positive_int(
                "accumulation_steps", accumulation_steps, allow_none=True
            )
            or 1
        )
        logical = self.batch_size * self.accumulation_steps
        if logical > n:
            raise ValueError(
                f"The sample rate q = {size_name} * accumulation_steps / "
                f"{n_name} = {logical} / {n} is above 1: the expected batch "
                f"cannot be larger than the dataset. Use a smaller "
                f"{size_name}. Received: {size_name}={self.batch_size}, "
                f"accumulation_steps={self.accumulation_steps}, {n_name}={n}."
            )
        self.sample_rate = logical / n
        self.updates_per_epoch = steps_per_epoch or math.ceil(n / logical)
        self.pad_for_step(compiled_per_shape=True)
        # Process k reads the units of the block [bounds[k], bounds[k+1]).
        self._bounds = np.array(
            [k * n // self.process_count for k in range(self.process_count + 1)]
        )
        processes.check_same(
            {
                "n": n,
                size_name: self.batch_size,
                "steps_per_epoch": self.updates_per_epoch,
                "accumulation_steps": self.accumulation_steps,
                "process_count": self.process_count,
                "seed": -1 if self.seed is None else self.seed,
            },
            f"The {type(self).__name__}",
        )

    @property
    def padded_size(self):
        """The most units of this process's batches but for rare draws
        (about 1 in 1,000), whether or not they are padded: the rows the
        train step plans for where it traces a batch of unknown size (a
        TensorFlow graph sizes its conv chunks for it, so that all but the
        rarest batches stay within the chunks' memory)."""
        return padded_batch_size(self._expected_share, self.batch_size / self.n)

    @property
    def _expected_share(self):
        # Each process pads its part to the units of its expected share.
        return self.batch_size / self.process_count

    @property
    def expected_batch_size(self):
        """Expected units per batch: what the clipped sum is divided by."""
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

    def part_units(self, index):
        """The sampled unit indices of batch `index` (one accumulation part
        of its update's logical batch) that this process reads: those of
        its shard (all of them in one process)."""
        return self.padded_part(index)[0]

    def padded_units(self, index):
        """Units of padded batch `index` (see `padded_part`)."""
        return self.padded_part(index)[1]

    def padded_part(self, index):
        """`(units, padded)`: this process's sampled unit indices of batch
        `index`, and the units its padded batch has (`padded_rows` of
        the largest part on any process). Every process
        pads to the same size (their parts assemble into one global batch
        of one shape); each draws the whole logical batch from the one
        seed, so it knows the size of every other part without asking."""
        update, part = divmod(index, self.accumulation_steps)
        logical = self._logical_batch(update)
        if self.process_count == 1:
            own, counts = logical, (len(logical),)
        else:
            owner = np.searchsorted(self._bounds, logical, side="right") - 1
            own = logical[owner == self.process_index]
            counts = np.bincount(owner, minlength=self.process_count).tolist()
        k = self.accumulation_steps
        largest = max(accumulation_part_size(c, k, part) for c in counts)
        return accumulation_part(own, k, part), self.padded_rows(largest)

    def padded_rows(self, units):
        """Units of a padded batch whose largest part (over the processes)
        has `units` units: the first of `padded_sizes` that holds it, else
        the next multiple of 8; each batch's own size (at least 1) when
        `padded_sizes` is empty (`pad_for_step`)."""
        for size in self.padded_sizes:
            if units <= size:
                return size
        return round_up(units, 8) if self.padded_sizes else max(units, 1)

    def pad_for_step(self, compiled_per_shape):
        """Pads the batches for the train step that reads them, which `fit`
        calls before it trains. A step compiled once per batch shape
        (`compiled_per_shape=True`: XLA) gets the few sizes of
        `padded_batch_sizes`. Any other step (PyTorch's eager step, a
        TensorFlow graph, which traces a batch of unknown size once) gets
        each batch at its own size, so it computes no padding rows.
        `padded_size` stays the most rows of all but rare batches."""
        self.padded_sizes = (
            padded_batch_sizes(self._expected_share, self.batch_size / self.n)
            if compiled_per_shape
            else ()
        )

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

    def first_examples(self, count):
        """`(x, y, sample_weight)` of the first `count` examples, for checks
        before training."""
        raise NotImplementedError

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
            lists_as_tuples(tree.map_structure(spec, first[0])),
            lists_as_tuples(tree.map_structure(spec, first[1])),
            spec(first[2]),
        )
        dataset = tf.data.Dataset.from_generator(
            batches, output_signature=signature
        ).apply(tf.data.experimental.assert_cardinality(len(self)))
        # `fit` finds the sampler here (keras_dp.fit_data.poisson_sampler_of).
        dataset._keras_dp_sampler = self
        return dataset


def sample_weights(sample_weight, n):
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


def accumulation_part_size(count, parts, part):
    """Units in part `part` of `count` units split into `parts` parts as
    `np.array_split` splits them (the first `count % parts` get one more)."""
    return count // parts + (part < count % parts)


def accumulation_part(units, parts, part):
    """`np.array_split(units, parts)[part]`, without building the others."""
    start = part * (len(units) // parts) + min(part, len(units) % parts)
    return units[start : start + accumulation_part_size(len(units), parts, part)]


def take_padded(structure, indices, rows, positions=None):
    """The rows `indices` of each array, then zeros up to `rows` rows
    (None: `len(indices)` rows). `positions`: the output rows that receive
    them (default: the first `len(indices)`)."""
    indices = np.asarray(indices, dtype=np.intp)
    count = len(indices) if rows is None else rows
    if positions is None:
        positions = slice(0, len(indices))
        padding_rows = slice(len(indices), count)
    else:
        padding_rows = np.ones((count,), dtype=bool)
        padding_rows[positions] = False
    low, high = (int(indices.min()), int(indices.max())) if len(indices) else (0, -1)

    def take(array):
        array = np.asarray(array)
        if len(array) == 0:
            return padding((count,) + array.shape[1:], array.dtype)
        # One batch-sized buffer, each row written once: a zero-filled
        # batch with the rows copied in would write the batch twice and
        # hold two batch-sized buffers, and blanking the padding rows by a
        # mask over all rows costs as much as the gather.
        out = np.empty((count,) + array.shape[1:], dtype=array.dtype)
        if isinstance(positions, slice) and 0 <= low and high < len(array):
            # `mode="clip"` takes straight into `out` (the default mode
            # buffers); it would clip an index out of range, so it only
            # takes indices in range. Others index as NumPy does (negative
            # ones wrap, ones beyond the array raise IndexError).
            np.take(array, indices, axis=0, out=out[positions], mode="clip")
        else:
            out[positions] = array[indices]
        out[padding_rows] = padding((), array.dtype)
        return out

    return tree.map_structure(take, structure)


def padding(shape, dtype):
    """Padding rows: zeros, or empty strings in arrays of text (a text
    preprocessor tokenizes them like any other string)."""
    if dtype.kind in "OSU":
        return np.full(shape, "", dtype=dtype if dtype.kind != "O" else object)
    return np.zeros(shape, dtype=dtype)


def lists_as_tuples(structure):
    """Lists of arrays as tuples: Keras turns a `PyDataset`'s items into a
    `tf.data` signature on TensorFlow, which takes tuples, not lists (a
    model with several inputs or outputs takes either)."""
    if isinstance(structure, (list, tuple)):
        return tuple(lists_as_tuples(item) for item in structure)
    if isinstance(structure, dict):
        return {key: lists_as_tuples(value) for key, value in structure.items()}
    return structure
