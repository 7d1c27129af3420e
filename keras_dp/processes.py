"""Training across processes: which process this is, and the values that
every process must hold alike.

Two engines train across processes:

- JAX (`keras.distribution.initialize`, then a
  `keras.distribution.DataParallel` over the devices of every process):
  each process runs the same compiled step on its own part of the global
  batch. What the step computes once for the whole batch (the noise, drawn
  from a replicated key) is only computed once if every process holds the
  same key, and the parts only assemble into one global batch if every
  process pads its part to the same number of rows.
- TensorFlow's `tf.distribute.MultiWorkerMirroredStrategy`, while it is
  in scope (keras_dp's `fit` enters the model's strategy): each worker
  process is one replica, which clips its part of the batch; Keras sums
  the replicas' gradients, and replica 0 alone adds the noise
  (`keras_dp.backend` `replica_id`; the same under a `MirroredStrategy`
  over the devices of one process, where nothing is exchanged here).

This module says how many processes there are, hands every process
process 0's value of a secret drawn on each (`broadcast`), and refuses
settings that differ between processes (`check_same`).

Without either (one process) nothing is exchanged:

```python
from keras_dp import processes

processes.count(), processes.index()   # (1, 0) in one process
seed = processes.broadcast(secrets.randbits(63))
```
"""

import sys

import keras
import numpy as np


def _jax():
    """JAX, if it is the Keras backend and `jax.distributed` has been
    initialized (asking JAX for the process count before that would start
    its backends, and `jax.distributed.initialize` must come first)."""
    if keras.backend.backend() != "jax" or "jax" not in sys.modules:
        return None
    import jax

    # Older JAX has no `is_initialized`: ask for the count itself.
    initialized = getattr(jax.distributed, "is_initialized", None)
    if initialized is not None and not initialized():
        return None
    return jax


def _tensorflow():
    """TensorFlow, if it is the Keras backend and imported (a strategy
    can only exist then)."""
    if keras.backend.backend() != "tensorflow" or "tensorflow" not in sys.modules:
        return None
    import tensorflow as tf

    return tf


def is_multi_worker(strategy):
    """Whether `strategy` is TensorFlow's `MultiWorkerMirroredStrategy`."""
    tf = _tensorflow()
    return tf is not None and isinstance(
        strategy, tf.distribute.MultiWorkerMirroredStrategy
    )


def multi_worker_strategy():
    """The `tf.distribute.MultiWorkerMirroredStrategy` in scope on the
    TensorFlow backend, else None."""
    tf = _tensorflow()
    if tf is None or not tf.distribute.has_strategy():
        return None
    strategy = tf.distribute.get_strategy()
    return strategy if is_multi_worker(strategy) else None


def worker_count(strategy):
    """The worker processes of a `MultiWorkerMirroredStrategy`."""
    spec = strategy.cluster_resolver.cluster_spec()
    return sum(spec.num_tasks(job) for job in ("chief", "worker") if job in spec.jobs)


def worker_index(strategy):
    """This process's index among `worker_count(strategy)`."""
    # MultiWorkerMirroredStrategy numbers a chief first, then the workers.
    resolver = strategy.cluster_resolver
    if resolver.task_type in (None, "chief"):
        return 0
    has_chief = "chief" in resolver.cluster_spec().jobs
    return int(resolver.task_id) + (1 if has_chief else 0)


def count():
    """The number of processes that train together (1 without
    `jax.distributed` or a multi-worker strategy in scope)."""
    strategy = multi_worker_strategy()
    if strategy is not None:
        return worker_count(strategy)
    jax = _jax()
    return 1 if jax is None else jax.process_count()


def index():
    """This process's index, from 0 to `count() - 1`."""
    strategy = multi_worker_strategy()
    if strategy is not None:
        return worker_index(strategy)
    jax = _jax()
    return 0 if jax is None else jax.process_index()


def broadcast(value):
    """Process 0's `value` (an integer, or a tuple of integers) on every
    process; every process must call it at the same point. One process:
    `value` itself."""
    if count() == 1:
        return value
    values = value if isinstance(value, tuple) else (value,)
    shared = _integers(_gathered_words(_words(values))[0])
    return tuple(shared) if isinstance(value, tuple) else shared[0]


def _gathered_words(words):
    """Every process's `words` (uint32, (k, 2)), stacked in process order:
    (count(), k, 2)."""
    strategy = multi_worker_strategy()
    if strategy is None:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(words))
    tf = _tensorflow()
    # A sum over the workers of each one's words in its own row: every
    # worker is one replica (keras_dp refuses several per worker).
    rows = np.zeros((worker_count(strategy),) + words.shape, np.int64)
    rows[worker_index(strategy)] = words
    per_replica = strategy.run(lambda: tf.constant(rows))
    return strategy.reduce("SUM", per_replica, axis=None).numpy().astype(np.uint32)


def check_same(values, what):
    """Raises ValueError on every process if the integers `values` (a dict
    of name to value) are not the same on all processes; every process
    must call it at the same point. `what` names their owner in the
    message."""
    if count() == 1:
        return
    names = sorted(values)
    local = [int(values[name]) for name in names]
    gathered = np.asarray(
        [_integers(words) for words in _gathered_words(_words(local))]
    )
    differ = [
        name for k, name in enumerate(names) if np.any(gathered[:, k] != local[k])
    ]
    if differ:
        detail = "; ".join(
            f"{name}: {', '.join(str(int(v)) for v in gathered[:, names.index(name)])}"
            for name in differ
        )
        raise ValueError(
            f"{what} differs between the {count()} processes ({detail}, for "
            "processes 0, 1, ...). Every process must build it with the same "
            "arguments and the same data size (each reads only its own shard "
            "of the examples): pass the same values, and the same seed, on "
            "every process."
        )


def _words(integers):
    """Non-negative integers below 2**64 as pairs of uint32 words: JAX
    exchanges 32-bit integers unless 64-bit mode is on."""
    return np.asarray(
        [[(v >> 32) & 0xFFFFFFFF, v & 0xFFFFFFFF] for v in integers], dtype=np.uint32
    )


def _integers(words):
    return [(int(high) << 32) | int(low) for high, low in np.asarray(words)]
