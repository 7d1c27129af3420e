"""What keras_dp reads from the data given to `fit` before training.

The accountant needs the sampling rate `q` of every noisy update and, to
calibrate a target epsilon, the number of updates per epoch; the checks
that run before the first step need a few real examples. This module works
them out for every kind of data `fit` accepts, and refuses the settings in
which an example could enter one update more than once:

- Poisson batches (`keras_dp.data.PoissonSampler`, built by `fit` for
  in-memory arrays): `q = k * B / n` for `k` accumulation steps, and the
  sampler must draw one logical batch per update (its
  `accumulation_steps` equal to the optimizer's).
- Fixed-size batches (`poisson_sampling=False`, `PyDataset`, `tf.data`,
  generators): `q = k * B / n`, from the training part of the arrays
  (after `validation_split`), the dataset's number of batches, or the
  `sample_rate = B / n` given to `make_private`. With gradient
  accumulation the batches of one pass over the data must fill whole
  windows of `k`, so that no window spans the reshuffle between two passes
  (where it could hold the same example twice).

Example (what `fit` does):

```python
plan = fit_data.fixed_batch_plan(model, x, y, batch_size=32,
                                 steps_per_epoch=None, validation_split=0.0,
                                 accumulation=1)
plan.sample_rate, plan.n, plan.updates_per_epoch
```
"""

import contextlib
import math
import types

import keras
import numpy as np
from keras import tree

from keras_dp import data as data_lib
from keras_dp import keras_compat
from keras_dp import processes
from keras_dp.example_independence import CHECK_ROWS
from keras_dp.poisson_batches import PoissonBatches


class SamplingPlan:
    """How `fit`'s data becomes noisy updates.

    Attributes:
        sample_rate: `q`, the probability (Poisson) or fraction (fixed
            batches) of the examples that one update sees.
        poisson: whether batches are Poisson samples.
        n: the training-set size, or None when unknown.
        updates_per_epoch: optimizer updates per epoch, or None when
            unknown.
        unit: the privacy unit that is sampled and clipped: "example",
            or "user" (a `keras_dp.data.UserSampler`; `n` counts users).
    """

    def __init__(
        self, sample_rate, poisson, n=None, updates_per_epoch=None, unit="example"
    ):
        self.unit = unit
        self.sample_rate = sample_rate
        self.poisson = poisson
        self.n = n
        self.updates_per_epoch = updates_per_epoch


# tf.data steps that may stand between a sampler's `as_tf_dataset()` and
# `fit`: they change neither which examples a batch holds nor the order of
# the batches (another step could, and the accounting would be wrong).
_BATCH_PRESERVING_STEPS = (
    "_MapDataset",
    "_ParallelMapDataset",
    "_PrefetchDataset",
    "_OptionsDataset",
)


def poisson_sampler_of(x):
    """The Poisson sampler (`PoissonSampler` or `UserSampler`) whose
    batches `x` is: the sampler itself, or the one behind a `tf.data`
    pipeline built on `sampler.as_tf_dataset()` (None for other data).
    Refuses a pipeline with a step that could change the sampled
    batches."""
    if isinstance(x, PoissonBatches):
        return x
    if not keras_compat.is_tf_dataset(x):
        return None
    pending = [(x, [], [])]
    while pending:
        current, steps, nodes = pending.pop()
        sampler = getattr(current, "_keras_dp_sampler", None)
        if sampler is not None:
            foreign = [s for s in steps if s not in _BATCH_PRESERVING_STEPS]
            if foreign:
                raise ValueError(
                    "This tf.data pipeline is built on a PoissonSampler's "
                    "as_tf_dataset(), but has steps that change which "
                    f"examples a batch holds or the order of the batches "
                    f"({', '.join(name.lstrip('_') for name in foreign)}): "
                    "the batches would no longer be the Poisson samples that "
                    "keras_dp accounts for. Use only map, prefetch and "
                    "with_options after as_tf_dataset(); filter or shuffle "
                    "the examples before sampling."
                )
            if getattr(x.options(), "deterministic", None) is False or any(
                getattr(node, "_deterministic", None) == "false" for node in nodes
            ):
                raise ValueError(
                    "This tf.data pipeline on a PoissonSampler's "
                    "as_tf_dataset() may reorder the batches (a map with "
                    "deterministic=False, or options.deterministic=False): "
                    "the parts of one logical batch (gradient accumulation) "
                    "could then be split across updates. Keep the order "
                    "(deterministic=True, the default)."
                )
            return sampler
        inputs = getattr(current, "_inputs", None)
        for parent in inputs() if inputs is not None else ():
            pending.append(
                (parent, steps + [type(current).__name__], nodes + [current])
            )
    return None


def poisson_plan(sampler, accumulation):
    """The plan of a `PoissonSampler`; refuses one whose logical batches
    do not match the optimizer's gradient accumulation."""
    if sampler.accumulation_steps != accumulation:
        raise ValueError(
            f"The {_sampler_name(sampler)} draws one logical batch per "
            f"{sampler.accumulation_steps} batches (accumulation_steps="
            f"{sampler.accumulation_steps}), but the optimizer applies an "
            f"update every {accumulation} batches "
            f"(gradient_accumulation_steps={accumulation if accumulation > 1 else None}"
            "), so one example could enter an update more than once while "
            "the accountant assumes at most once. Build the sampler with "
            f"accumulation_steps={accumulation}."
        )
    return SamplingPlan(
        sampler.sample_rate,
        True,
        sampler.n,
        sampler.updates_per_epoch,
        unit="user" if isinstance(sampler, data_lib.UserSampler) else "example",
    )


def _sampler_name(sampler):
    """The keras_dp class a sampler is (also for a subclass of it)."""
    if isinstance(sampler, data_lib.UserSampler):
        return "UserSampler"
    return "PoissonSampler"


def check_secure_sampling(optimizer, x):
    """Refuses data that secure mode cannot sample: its guarantee covers
    the batches too, so they must be Poisson samples drawn from the
    operating system's entropy."""
    if not optimizer.secure_mode:
        return
    sampler = poisson_sampler_of(x)
    if sampler is not None and sampler.secure_mode:
        return
    if sampler is not None:
        name = _sampler_name(sampler)
        why = f"this {name} draws from a reproducible NumPy stream"
        fix = f"Build it with keras_dp.data.{name}(..., secure_mode=True)"
    else:
        why = (
            "this data is batched by Keras or by its own pipeline (fixed-size "
            "shuffled batches from a reproducible generator), or "
            "make_private(poisson_sampling=False) was given"
        )
        fix = (
            "Train on in-memory arrays with Poisson sampling (fit then builds "
            "a secure sampler), or pass "
            "keras_dp.data.PoissonSampler(x, y, ..., secure_mode=True)"
        )
    raise ValueError(
        f"{type(optimizer).__name__} has secure_mode=True, which draws the "
        f"batches from the operating system's entropy as well, but {why}. "
        f"{fix}, or use secure_mode=False."
    )


def check_processes(optimizer, x):
    """Refuses what training across processes (`jax.distributed`, or
    TensorFlow's `MultiWorkerMirroredStrategy` in scope) cannot do: each
    process must read its own shard of one Poisson batch, and the noise
    must be added once."""
    count = processes.count()
    sampler = poisson_sampler_of(x)
    if count == 1:
        if sampler is not None and sampler.process_count > 1:
            raise ValueError(
                f"This {_sampler_name(sampler)} reads shard "
                f"{sampler.process_index} of {sampler.process_count} "
                "processes, but fit runs in one process (jax.distributed is "
                "not initialized), so each update would see only that shard's "
                "part of the batch. Call keras.distribution.initialize(...) "
                "in every process first, or build the sampler without "
                "process_index and process_count."
            )
        return
    multi_worker = processes.multi_worker_strategy() is not None
    engine = "MultiWorkerMirroredStrategy" if multi_worker else "jax.distributed"
    where = (
        f"Training across {count} processes ({engine}, this is "
        f"process {processes.index()})"
    )
    if not multi_worker and keras.distribution.distribution() is None:
        raise ValueError(
            f"{where} needs a distribution over the devices of all "
            "processes, so that every step is one program over the global "
            "batch: call keras.distribution.set_distribution("
            "keras.distribution.DataParallel()) before building the model."
        )
    if optimizer.secure_mode:
        raise ValueError(
            f"{where} cannot use secure_mode=True: each process would draw "
            "its batches (and key the noise) from its own operating-system "
            "entropy, so the shards would not be parts of one Poisson "
            "batch. Use secure_mode=False."
        )
    generator = getattr(optimizer, "_noise_seed_generator", None)
    if not multi_worker and generator is not None and generator.process_count != count:
        raise ValueError(
            f"{where}, but the optimizer {optimizer.name!r} was built before "
            "jax.distributed was initialized, so its noise key was not "
            "shared between the processes. Call keras.distribution."
            "initialize(...) first, then build the model and optimizer."
        )
    if sampler is None:
        raise ValueError(
            f"{where} needs Poisson-sampled data that each process shards: "
            "in-memory arrays (fit builds the sampler), or a "
            "keras_dp.data.PoissonSampler or UserSampler. Fixed-size "
            "batches (poisson_sampling=False, a PyDataset, a tf.data "
            "pipeline of batches, a generator) are not sharded by keras_dp, "
            "and every process could feed the same examples into one step."
        )
    if (sampler.process_index, sampler.process_count) != (processes.index(), count):
        raise ValueError(
            f"{where}, but the {_sampler_name(sampler)} reads shard "
            f"{sampler.process_index} of {sampler.process_count}. Build it "
            f"without process_index and process_count (they are read from "
            f"{engine}), or with this process's index and "
            f"process_count={count}."
        )


def check_replicas(model, x=None):
    """Refuses what training under a TensorFlow `tf.distribute` strategy
    of several replicas cannot do. Each replica clips the gradients of its
    part of the batch, Keras sums the replicas' gradients, and replica 0
    adds the noise: under `MirroredStrategy` (one process, Keras splits
    each batch between its devices) and `MultiWorkerMirroredStrategy` with
    one replica per worker process (each worker reads its own shard of
    every Poisson batch, `keras_dp.processes`). Other strategies, several
    replicas per worker, what would run per replica (adaptive clipping's
    thresholds), what Keras itself cannot run under a strategy (gradient
    accumulation) and what is untested across replicas (a `UserSampler`)
    are refused with what to do."""
    strategy = replica_strategy(model)
    if strategy is None:
        return
    replicas = strategy.num_replicas_in_sync
    if processes.is_multi_worker(strategy):
        workers = processes.worker_count(strategy)
        if workers != replicas:
            raise ValueError(
                f"This model trains under a MultiWorkerMirroredStrategy of "
                f"{replicas} replicas on {workers} worker processes. keras_dp "
                "trains with one replica per worker (each worker reads its "
                "own shard of every Poisson batch): give each worker one "
                "device, e.g. processes that see one GPU each "
                "(CUDA_VISIBLE_DEVICES), or start one worker per device."
            )
    elif not _is_mirrored(strategy):
        raise ValueError(
            f"This model trains under a tf.distribute strategy of {replicas} "
            f"replicas ({type(strategy).__name__}), which keras_dp does not "
            "support. Train under tf.distribute.MirroredStrategy (the devices "
            "of one process) or MultiWorkerMirroredStrategy (one device per "
            "worker process), without a strategy, or on the JAX backend with "
            "keras.distribution.DataParallel (README, 'Training at scale')."
        )
    optimizer = model.optimizer
    sampler = poisson_sampler_of(x)
    unsupported = [
        reason
        for reason, used in (
            (
                "adaptive clipping (each replica would update its own "
                "clipping thresholds)",
                optimizer.adaptive_clipping is not None,
            ),
            (
                "gradient_accumulation_steps (Keras's own gradient "
                "accumulation fails under a tf.distribute strategy, also "
                "without keras_dp: its update sits in a conditional that "
                "holds the replicas' synchronization)",
                optimizer.gradient_accumulation_steps,
            ),
            (
                "a UserSampler (user-level sampling is not tested across replicas)",
                isinstance(sampler, data_lib.UserSampler),
            ),
        )
        if used
    ]
    if unsupported:
        raise ValueError(
            f"Training under a tf.distribute strategy of {replicas} replicas "
            f"({type(strategy).__name__}) does not support "
            f"{'; '.join(unsupported)} yet. Train without them, without the "
            "strategy, or on the JAX backend (README, 'Training at scale')."
        )


def _is_mirrored(strategy):
    import tensorflow as tf

    return isinstance(strategy, tf.distribute.MirroredStrategy)


def replica_strategy(model):
    """The TensorFlow `tf.distribute` strategy of several replicas `model`
    trains under, else None."""
    strategy = getattr(model, "distribute_strategy", None)
    return strategy if getattr(strategy, "num_replicas_in_sync", 1) > 1 else None


def multi_worker_strategy(model):
    """The TensorFlow `MultiWorkerMirroredStrategy` `model` trains under,
    else None."""
    strategy = replica_strategy(model)
    return strategy if processes.is_multi_worker(strategy) else None


@contextlib.contextmanager
def sampler_shards(model, x, steps_per_epoch):
    """While training across processes on a keras_dp sampler (or a
    `tf.data` pipeline on one), what `fit` reads: `(x, steps_per_epoch)`.

    - JAX: the distribution's `auto_shard_dataset` is off, since each
      process's sampler already yields its own shard, which Keras must
      take as it is (it would shard a `tf.data` pipeline again, and
      refuses to shard other data).
    - TensorFlow's `MultiWorkerMirroredStrategy`: each worker's batches go
      to its replica as they are (`distribute_datasets_from_function`).
    - Under it and `MirroredStrategy` (whose replicas Keras hands parts of
      each batch), Keras's trainer is mended where it fails under the
      strategy (`keras_compat.distributed_fit`).
    """
    strategy = replica_strategy(model)
    sampler = poisson_sampler_of(x)
    if strategy is not None:
        if sampler is None:
            raise ValueError(
                f"Training under a tf.distribute strategy of "
                f"{strategy.num_replicas_in_sync} replicas needs Poisson-"
                "sampled data: in-memory arrays (fit builds the sampler), or "
                "a keras_dp.data.PoissonSampler. Each replica scales its part "
                "of a fixed-size batch (poisson_sampling=False, a PyDataset, "
                "a tf.data pipeline of batches, a generator) by its own size, "
                "not the batch's."
            )
        if processes.is_multi_worker(strategy):
            # Not Keras's distribution of a dataset, which would shard
            # it again and split its batches.
            dataset = x if keras_compat.is_tf_dataset(x) else sampler.as_tf_dataset()
            x = strategy.distribute_datasets_from_function(lambda context: dataset)
            steps_per_epoch = steps_per_epoch or len(sampler)
        with keras_compat.distributed_fit(model, strategy):
            yield x, steps_per_epoch
        return
    distribution = keras.distribution.distribution()
    if (
        processes.count() == 1
        or sampler is None
        or not getattr(distribution, "auto_shard_dataset", False)
    ):
        yield x, steps_per_epoch
        return
    distribution.auto_shard_dataset = False
    try:
        yield x, steps_per_epoch
    finally:
        distribution.auto_shard_dataset = True


def fixed_batch_plan(
    model, x, y, batch_size, steps_per_epoch, validation_split, accumulation
):
    """The plan of shuffled fixed-size batches (see the module docstring)."""
    settings = model._keras_dp
    batch_size = batch_size or 32
    n = None
    batches = None  # in one pass over the data
    if keras_compat.can_convert_arrays((x, y)):
        n = data_lib.num_examples(x)
        if validation_split:
            # Keras's own split: the first floor(n * (1 - split)) rows train.
            n = int(math.floor(n * (1.0 - validation_split)))
        batches = -(-n // batch_size)
    elif isinstance(x, keras.utils.PyDataset):
        batches = x.num_batches
    elif keras_compat.is_tf_dataset(x):
        batches = _tf_dataset_batches(x, settings.sample_rate is not None)
    if accumulation > 1:
        _check_whole_windows(
            batches if batches is not None else steps_per_epoch,
            steps_per_epoch,
            accumulation,
        )
    if settings.sample_rate is not None:
        sample_rate = min(1.0, settings.sample_rate * accumulation)
    elif n is not None:
        sample_rate = min(1.0, batch_size * accumulation / n)
    elif batches is not None:
        sample_rate = min(1.0, accumulation / batches)
    else:
        raise ValueError(
            "keras_dp cannot tell the sampling rate of this data (no known "
            "dataset size), so it could not account for privacy. Pass "
            "`sample_rate=batch_size / n` to keras_dp.make_private(model, "
            "...), or train on arrays or a keras_dp.data.PoissonSampler."
        )
    steps = steps_per_epoch or batches
    updates = None if steps is None else steps // accumulation
    return SamplingPlan(sample_rate, False, n, updates)


def _tf_dataset_batches(dataset, sample_rate_given):
    """Batches in one pass over a `tf.data` dataset, or None if unknown.

    A `repeat()` in the pipeline makes the cardinality count every example
    several times, which would understate `q`: refused unless the user
    gives the rate.
    """
    if not sample_rate_given and _repeats(dataset):
        raise ValueError(
            "This tf.data pipeline calls repeat(), so its length counts each "
            "example several times and keras_dp cannot tell the sampling "
            "rate from it. Remove the repeat() (fit's `epochs` repeats the "
            "data), or pass `sample_rate=batch_size / n` to "
            "keras_dp.make_private(model, ...) with n the number of distinct "
            "examples."
        )
    cardinality = int(dataset.cardinality())
    return cardinality if cardinality > 0 else None


def _repeats(dataset):
    pending = [dataset]
    while pending:
        current = pending.pop()
        if type(current).__name__ in ("_RepeatDataset", "RepeatDataset"):
            return True
        inputs = getattr(current, "_inputs", None)
        if inputs is not None:
            pending.extend(inputs())
    return False


def _check_whole_windows(batches, steps_per_epoch, accumulation):
    if batches is None:
        raise ValueError(
            f"gradient_accumulation_steps={accumulation} with fixed-size "
            "batches of data whose length keras_dp cannot see: an update "
            "could combine batches from two passes over the data and hold "
            "one example twice. Train on arrays (Poisson sampling), a "
            "keras_dp.data.PoissonSampler, a PyDataset or a tf.data "
            "dataset of known length."
        )
    for name, count in (("batches", batches), ("steps_per_epoch", steps_per_epoch)):
        if count is not None and count % accumulation:
            raise ValueError(
                f"With fixed-size batches and gradient_accumulation_steps="
                f"{accumulation}, the {count} {name} of an epoch do not fill "
                f"whole accumulation windows, so one update would combine "
                "batches from two shuffles of the data and could hold the "
                f"same example twice. Make the number of batches per epoch "
                f"a multiple of {accumulation} (batch_size or "
                "steps_per_epoch), or use Poisson sampling (the default "
                "for in-memory arrays)."
            )


def check_whole_windows_done(optimizer):
    """Refuses to start training in the middle of an accumulation window
    left by an earlier `fit`: its accumulated gradients came from other
    batches, which new data could repeat."""
    steps = optimizer.gradient_accumulation_steps or 1
    if steps == 1:
        return
    done = int(keras.ops.convert_to_numpy(keras_compat.optimizer_iterations(optimizer)))
    if done % steps:
        raise ValueError(
            f"The optimizer is in the middle of a gradient-accumulation "
            f"window ({done % steps} of {steps} batches accumulated, "
            "training stopped before the update): new data could add the "
            "same examples to this update again. Compile the model with a "
            "new DP optimizer (the privacy already spent is carried over) "
            "to drop the partial window."
        )


def first_examples(x, y=None, sample_weight=None):
    """`(x, y, sample_weight, x_for_fit)`: a few real examples of the data
    `fit` will train on, without consuming it (`x_for_fit` replaces `x`:
    a generator is chained back together). Examples are None when they
    cannot be read (the checks then run on the first batch `fit` draws)."""
    if isinstance(x, PoissonBatches):
        return (*x.first_examples(CHECK_ROWS), x)
    if keras_compat.can_convert_arrays((x, y, sample_weight)):
        return _rows(x), _rows(y), _rows(sample_weight), x
    batch = None
    if isinstance(x, keras.utils.PyDataset):
        batch = x[0]
    elif keras_compat.is_tf_dataset(x):
        batch = next(iter(x.take(1)))
        batch = tree.map_structure(
            lambda t: t.numpy() if hasattr(t, "numpy") else t, batch
        )
    elif isinstance(x, types.GeneratorType):
        batch = next(x)
        x = _chained(batch, x)
    if batch is None:
        return None, None, None, x
    bx, by, bw = keras.utils.unpack_x_y_sample_weight(batch)
    return _rows(bx), _rows(by), _rows(bw), x


def _chained(first, rest):
    # A generator again: Keras takes generators, not other iterators.
    yield first
    yield from rest


def _rows(structure):
    if structure is None:
        return None
    return tree.map_structure(
        lambda t: np.asarray(t)[:CHECK_ROWS] if np.ndim(t) else t, structure
    )
