"""Training across processes: which process this is, and the values that
every process must hold alike.

Under JAX multi-process training (`keras.distribution.initialize`, then a
`keras.distribution.DataParallel` over the devices of every process), each
process runs the same compiled step on its own part of the global batch.
What the step computes once for the whole batch (the noise, drawn from a
replicated key) is only computed once if every process holds the same
key, and the parts only assemble into one global batch if every process
pads its part to the same number of rows. This module says how many
processes there are, hands every process process 0's value of a secret
drawn on each (`broadcast`), and refuses settings that differ between
processes (`check_same`).

Without `jax.distributed` (one process, or another backend) there is one
process and nothing is exchanged:

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


def count():
    """The number of processes that train together (1 without
    `jax.distributed`)."""
    jax = _jax()
    return 1 if jax is None else jax.process_count()


def index():
    """This process's index, from 0 to `count() - 1`."""
    jax = _jax()
    return 0 if jax is None else jax.process_index()


def broadcast(value):
    """Process 0's `value` (an integer, or a tuple of integers) on every
    process; every process must call it at the same point. One process:
    `value` itself."""
    if count() == 1:
        return value
    from jax.experimental import multihost_utils

    values = value if isinstance(value, tuple) else (value,)
    shared = _integers(multihost_utils.broadcast_one_to_all(_words(values)))
    return tuple(shared) if isinstance(value, tuple) else shared[0]


def check_same(values, what):
    """Raises ValueError on every process if the integers `values` (a dict
    of name to value) are not the same on all processes; every process
    must call it at the same point. `what` names their owner in the
    message."""
    if count() == 1:
        return
    from jax.experimental import multihost_utils

    names = sorted(values)
    local = [int(values[name]) for name in names]
    gathered = np.asarray(
        [
            _integers(words)
            for words in np.asarray(multihost_utils.process_allgather(_words(local)))
        ]
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
