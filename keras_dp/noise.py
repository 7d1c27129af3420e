"""The Gaussian noise of the DP mechanism: its multiplier, its seed, and
the draw that adds it to the clipped gradients.

A DP optimizer holds one `GaussianNoise` (`optimizer.noise`). The train
step hands the optimizer the clipped sum of a batch (`ClippedBatch`); the
optimizer asks its noise object to add `stddev * N(0, I)` to it, with
`stddev = sigma * Delta / B` (`sigma` the noise multiplier, `Delta` the
clipping policy's sensitivity, `B` the expected batch size).

The standard normal numbers come from the backend's sampler
(`standard_normal` of `keras_dp.backend`: keras_dp's compiled kernel on a
CPU, the framework's own ops elsewhere), keyed by a `NoiseSeedGenerator`
whose state is an optimizer variable: saved with the model, and threaded
through JAX's stateless steps.

Example:

```python
noise = keras_dp.GaussianNoise(noise_multiplier=1.1)
noise.get_config()   # {"noise_multiplier": 1.1, "seed": None, "secure_mode": False}
```
"""

import itertools
import secrets
import warnings

import keras
import numpy as np
from keras import ops

from keras_dp import arguments
from keras_dp import backend as backend_lib
from keras_dp import processes
from keras_dp import secure_noise


class NoiseSeedGenerator(keras.random.SeedGenerator):
    """The DP noise's seed: a `keras.random.SeedGenerator` whose keys are
    offset by a secret when no seed is given.

    With `seed=None` the state variable (saved with the optimizer) starts
    at `[0, 0]` and two 31-bit words from the operating system's entropy
    are added to every key it hands out; they live in this object only, so
    neither `keras.utils.set_random_seed` nor a saved model reveals the
    noise. Under `jax.distributed` every process holds process 0's words,
    so that all draw the same noise. With an integer seed there is no
    secret: the noise is the reproducible stream of
    `keras.random.SeedGenerator(seed)`.

    In secure mode (`secure=True`) the keys come from fresh
    operating-system entropy at every draw (the backend's secure
    sampler): the state only counts draws, and `next()` returns the count.
    """

    def __init__(self, seed=None, name=None, secure=False):
        super().__init__(0 if seed is None else seed, name=name)
        self._fixed_seed = seed
        # Across processes, each computes the noise of the whole batch
        # from this key: one draw only if all hold process 0's secret.
        self.process_count = processes.count()
        self._secret = (
            None
            if seed is not None or secure
            else processes.broadcast((secrets.randbits(31), secrets.randbits(31)))
        )

    def next(self, ordered=True):
        key = super().next(ordered=ordered)
        if self._secret is None:
            return key
        return key + ops.convert_to_tensor(self._secret, dtype=key.dtype)

    def restored(self):
        """Called by the DP optimizer after its saved variables were loaded
        into the state (`load_weights`, `keras.saving.load_model`,
        `keras.callbacks.BackupAndRestore`), which can move the counter
        back to where this generator has drawn before.

        Without a seed, the secret stays the same as long as this object
        lives, so a restore in the process that trained (`fit` again with
        `BackupAndRestore` after an exception) would hand the re-run steps
        the keys of the lost ones: the same noise on other batches, and two
        updates from the same weights would differ by exactly their clipped
        sums' difference. The state's first word moves by a fresh random
        offset instead, so the keys after a restore are new ones (a new
        process has a new secret anyway; secure mode needs nothing).

        An integer seed is there to reproduce the noise, restores included:
        the re-run steps draw the lost steps' noise again, and no
        reproducible key keeps it from meeting other batches (Keras's
        `BackupAndRestore` re-runs the interrupted epoch from its first
        batch, and a new sampler starts again from its first epoch; mixing
        the sampler's seed into the key would help only where that seed is
        fresh, i.e. where nothing is reproducible anyway). Refusing would
        break the save-and-resume of reproducible tests, so this warns.
        """
        state = np.array(ops.convert_to_numpy(self.state.value), dtype="int64")
        if self._secret is not None:
            state[0] = (state[0] + processes.broadcast(secrets.randbits(31))) % 2**31
            self.state.assign(ops.cast(state, self.state.dtype))
        elif self._fixed_seed is not None and state[1] > 0:
            warnings.warn(
                f"DP noise with a fixed seed={self._fixed_seed} was restored "
                f"after {state[1]} draws. If training went on from this state "
                "before (a run that crashed after this checkpoint, or the "
                "model that saved it), the updates that run again draw the "
                "same noise as those did, on other batches, which reveals "
                "the difference of their clipped gradient sums to anyone "
                "who sees both. Use seed=None (the default) for models you "
                "release.",
                stacklevel=2,
            )


class GaussianNoise:
    """Gaussian noise of multiplier `sigma`, from a seeded generator.

    Args:
        noise_multiplier: `sigma`, a non-negative number, or None while it
            is still to be calibrated from a target epsilon.
        seed: None (the default: the key comes from the operating
            system's entropy and is never saved; see `NoiseSeedGenerator`)
            or an integer (reproducible noise, for tests and debugging:
            anyone who knows it can subtract the noise).
        secure_mode: False (the default) or True: every draw is keyed
            afresh by the operating system's entropy and sampled by
            `keras_dp.secure_noise` (right tails, no floating-point gaps
            to attack); not reproducible, so `seed` must be None.
    """

    def __init__(self, noise_multiplier=1.0, seed=None, secure_mode=False):
        noise_multiplier = arguments.non_negative_number(
            "noise_multiplier",
            noise_multiplier,
            allow_none=True,
            hint="sigma, the ratio of the noise standard deviation to the "
            "sensitivity; None until calibrated from a target epsilon",
        )
        seed = arguments.seed("seed", seed)
        secure_mode = arguments.boolean("secure_mode", secure_mode)
        if secure_mode and seed is not None:
            raise ValueError(
                "`secure_mode=True` keys every noise draw with fresh entropy "
                "from the operating system, so the noise cannot be "
                f"reproduced from a seed. Received seed={seed!r}: pass "
                "seed=None, or secure_mode=False for reproducible noise."
            )
        self.noise_multiplier = (
            None if noise_multiplier is None else float(noise_multiplier)
        )
        self.seed = seed
        self.secure_mode = secure_mode

    def seed_generator(self, name="dp_noise_seed"):
        """A new `NoiseSeedGenerator` for this noise's seed."""
        return NoiseSeedGenerator(self.seed, name=name, secure=self.secure_mode)

    def standard_normal(self, shape, seed_generator, dtype="float32"):
        """Standard normal numbers of `shape` from the backend's sampler
        (secure mode: `keras_dp.secure_noise`'s)."""
        if self.secure_mode:
            draw = backend_lib.get_backend_module().secure_standard_normal(
                tuple(shape), seed_generator
            )
            if draw is None:
                draw = secure_noise.standard_normal(tuple(shape), seed_generator)
        else:
            draw = backend_lib.get_backend_module().standard_normal(
                shape, seed_generator
            )
        return ops.cast(draw, dtype)

    def add(self, grads, stddev, seed_generator, noise_spaces=None):
        """`g + stddev * N(0, I)` for each gradient `g` of `grads`.

        `noise_spaces` (optional) has one entry per gradient: None for
        noise on every coordinate, or `draw(standard_normal)` returning the
        gradient-shaped image of standard noise drawn in a smaller
        privatised space (`keras_dp.LowRankSparse` carriers).

        Without a `keras.distribution`, the noise of all gradients with
        no space of their own is one draw, split in order: one random
        number kernel for the whole model instead of one per variable.
        Under a distribution each variable keeps its own draw, which
        follows the variable's sharding.
        """
        spaces = noise_spaces or [None] * len(grads)
        full = []
        if keras.distribution.distribution() is None:
            full = [
                k
                for k, (g, space) in enumerate(zip(grads, spaces))
                if g is not None and space is None
            ]
        out = list(grads)
        if full:
            noisy = self._add_flat([grads[k] for k in full], stddev, seed_generator)
            for k, g in zip(full, noisy):
                out[k] = g

        def standard_normal(shape, dtype):
            return self.standard_normal(shape, seed_generator, dtype)

        for k, (g, space) in enumerate(zip(grads, spaces)):
            if g is None or k in full:
                continue
            if space is None:
                z = standard_normal(ops.shape(g), "float32")
            else:
                z = space(standard_normal)
            out[k] = _plus_noise(g, stddev, z)
        return out

    def _add_flat(self, grads, stddev, seed_generator):
        """`grads` plus noise from one flat draw, split in order: the
        backend's fused kernel where it has one (it adds while it draws),
        else a draw and adds."""
        backend = backend_lib.get_backend_module()
        fused = (
            backend.secure_noisy_gradients
            if self.secure_mode
            else backend.noisy_gradients
        )
        noisy = fused(grads, stddev, seed_generator)
        if noisy is not None:
            return noisy
        sizes = [_static_size(g) for g in grads]
        flat = self.standard_normal((sum(sizes),), seed_generator)
        offsets = [0] + list(itertools.accumulate(sizes))
        return [
            _plus_noise(g, stddev, ops.reshape(flat[a:b], ops.shape(g)))
            for g, a, b in zip(grads, offsets[:-1], offsets[1:])
        ]

    def get_config(self):
        return {
            "noise_multiplier": self.noise_multiplier,
            "seed": self.seed,
            "secure_mode": self.secure_mode,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        return (
            f"GaussianNoise(noise_multiplier={self.noise_multiplier!r}, "
            f"seed={'fixed' if self.seed is not None else None}"
            + (", secure_mode=True)" if self.secure_mode else ")")
        )


def _plus_noise(g, stddev, z):
    return g + ops.cast(stddev, g.dtype) * ops.cast(z, g.dtype)


def _static_size(tensor):
    size = 1
    for dim in tensor.shape:
        size *= int(dim)
    return size
