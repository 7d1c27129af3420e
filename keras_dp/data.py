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

Across JAX processes (`jax.distributed`), every process builds the same
sampler on the same data; each yields its shard of one Poisson batch
(`process_index`, `process_count`; docs/large-data.md):

```python
keras.distribution.initialize()
sampler = keras_dp.data.PoissonSampler(x, y, batch_size=4096)  # this process's shard
```

For user-level privacy (one person's many examples protected together),
`UserSampler` samples users instead of examples
(`keras_dp.user_sampling`, docs/user-level-dp.md):

```python
sampler = keras_dp.data.UserSampler(
    x, y, user_ids, users_per_batch=64, max_examples_per_user=8
)
model.fit(sampler, epochs=3)
```
"""

import numpy as np
from keras import tree

from keras_dp import arguments
from keras_dp.poisson_batches import PADDING_STDDEVS  # noqa: F401 (public)
from keras_dp.poisson_batches import PoissonBatches
from keras_dp.poisson_batches import check_rows
from keras_dp.poisson_batches import lists_as_tuples
from keras_dp.poisson_batches import num_examples  # noqa: F401 (public)
from keras_dp.poisson_batches import padded_batch_size  # noqa: F401 (public)
from keras_dp.poisson_batches import padded_batch_sizes  # noqa: F401 (public)
from keras_dp.poisson_batches import padding
from keras_dp.poisson_batches import poisson_sample  # noqa: F401 (public)
from keras_dp.poisson_batches import sample_weights
from keras_dp.poisson_batches import take_padded
from keras_dp.user_sampling import UserSampler  # noqa: F401 (public)

__all__ = [
    "ArrayExamples",
    "PoissonSampler",
    "SourceExamples",
    "UserSampler",
    "num_examples",
    "padded_batch_size",
    "padded_batch_sizes",
    "poisson_sample",
]


class PoissonSampler(PoissonBatches):
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
        process_index: training across processes (JAX multi-process):
            this process's index, from 0 to `process_count - 1`. None
            (the default, with `process_count=None`) reads it from
            `jax.distributed` (0 without it).
        process_count: the number of processes (None: from
            `jax.distributed`, 1 without it). Every process is
            given the same data (an example source or memmaps: only the
            sampled rows are read) and the same arguments; each draws the
            logical batch of the whole data set from the shared seed and
            yields the sampled examples of its shard, the rows
            `[k * n // P, (k + 1) * n // P)` of process `k` of `P`, so the
            union of the processes' batches is one Poisson sample at rate
            `q`. All processes pad their part to the same number of rows.
            With seed=None the seed of process 0 is shared. Every
            process must build the sampler at the same point of its
            script: the processes exchange the seed and check that their
            arguments agree.

    Each item is `(x, y, sample_weight)`, padded to one of the few row
    counts of `padded_batch_sizes` (a step compiled once per batch shape
    compiles each once); `fit` pads to each batch's own size instead where
    the model's step is not compiled per shape (`pad_for_step`). Rows
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
        process_index=None,
        process_count=None,
    ):
        super().__init__(
            seed=seed,
            secure_mode=secure_mode,
            workers=workers,
            use_multiprocessing=use_multiprocessing,
            max_queue_size=max_queue_size,
            process_index=process_index,
            process_count=process_count,
        )
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
        self._set_rate(
            self.examples.n,
            batch_size,
            steps_per_epoch,
            accumulation_steps,
            "batch_size",
            "n",
        )

    # The arrays of an array-backed sampler (None for a source).
    x = property(lambda self: getattr(self.examples, "x", None))
    y = property(lambda self: getattr(self.examples, "y", None))
    sample_weight = property(lambda self: getattr(self.examples, "sample_weight", None))

    def __getitem__(self, index):
        chosen, rows = self.padded_part(index)
        bx, by, bw = self.examples.padded(chosen, rows)
        return lists_as_tuples(bx), lists_as_tuples(by), bw

    def first_examples(self, count):
        """`(x, y, sample_weight)` of the first `count` examples (fewer
        when there are fewer), for checks before training."""
        return self.examples.padded(np.arange(min(count, self.n)), None)


class ArrayExamples:
    """The examples of in-memory arrays (or memmaps): `x`, `y` and the
    per-example weights, gathered by row."""

    def __init__(self, x, y, sample_weight):
        check_rows("PoissonSampler", x=x, y=y)
        self.x = x
        self.y = y
        self.n = num_examples(x)
        self.sample_weight = sample_weights(sample_weight, self.n)

    def padded(self, indices, rows):
        """The examples `indices`, then zero rows up to `rows` rows (None:
        no padding)."""
        return (
            take_padded(self.x, indices, rows),
            take_padded(self.y, indices, rows),
            take_padded(self.sample_weight, indices, rows),
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
            out = padding((rows,) + template.shape, template.dtype)
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
