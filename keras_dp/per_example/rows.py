"""Tensors whose leading axis is the examples: the helpers both paths share.

Scaling and keeping rows with `safe` (the rows whose factor is 0 left out
exactly, even where they are infinite or NaN: see `keras_dp.clipping`),
each example's squared norm, masks of real (non-padding) rows, padding,
per-example seed offsets, and adding or removing a batch axis of one.
"""

import keras
import numpy as np
from keras import ops
from keras import tree

from keras_dp import backend as backend_lib
from keras_dp import clipping as clipping_lib
from keras_dp import keras_compat

# Odd constant that spreads example (or microbatch) indices over the first
# word of a SeedGenerator state; the second word is the per-call counter,
# which must stay aligned across examples.
SEED_STRIDE = 1_000_003


def f32(t):
    return ops.cast(t, "float32")


def scaled_rows(x, c, safe):
    """`x` (n, ...) with row `i` times `c_i`; with `safe`, rows whose
    factor is 0 are exactly 0, even where they are not finite."""
    c = clipping_lib.rows_of(c, x)
    if safe:
        return clipping_lib.multiply_no_nan(x, c)
    return x * c


def kept_rows(x, c, safe):
    """`x` (n, ...); with `safe`, its rows whose factor in `c` is 0 set to
    exactly 0."""
    if not safe:
        return x
    return clipping_lib.multiply_no_nan(x, clipping_lib.rows_of(ops.not_equal(c, 0), x))


def factor_rows(c):
    """`(n,)`: 1.0 for the rows of `(n, shards)` factors with a non-zero
    factor (per-device groups give all of a left-out example's shards 0)."""
    return ops.cast(ops.any(ops.not_equal(c, 0), axis=1), "float32")


def rows_dot(c, g, safe):
    """`sum_i c_i g_i` over the rows of the per-example gradients `g`."""
    return ops.tensordot(c, kept_rows(g, c, safe), axes=1)


def squared_norms(x):
    """Each example's sum of squares, (n,) from (n, ...).

    The backend's one-pass kernel where it has one: TensorFlow runs Square
    and Sum as two passes, and its Sum is slow on the fast path's many
    small per-example reductions.
    """
    if len(x.shape) == 1:
        return ops.square(x)
    sq = backend_lib.get_backend_module().per_example_squared_norms(x)
    if sq is not None:
        return sq
    return ops.sum(ops.square(x), axis=tuple(range(1, len(x.shape))))


def instantiated_terms(variable, per_example_grads):
    """A rule's `(variable, squared_norms, clipped_sum)` triple from the
    variable's per-example gradients `(n, *variable.shape)`, held until the
    clipped sum is taken (an `InstantiatedTerms`)."""
    return InstantiatedTerms(variable, f32(per_example_grads))


class InstantiatedTerms(tuple):
    """The `(variable, squared_norms, clipped_sum)` triple of per-example
    gradients `grads` held as one tensor.

    Held whole, they also give per-device clipping groups
    (`clip_groups="per_device"`) what they need for a sharded variable:
    `per_shard(partition)`.
    """

    def __new__(cls, variable, grads):
        terms = super().__new__(
            cls,
            (variable, squared_norms(grads), lambda c, safe: rows_dot(c, grads, safe)),
        )
        terms.grads = grads
        return terms

    def per_shard(self, partition):
        """`sharded_terms(grads, partition)`."""
        return sharded_terms(self.grads, partition)


def sharded_terms(grads, partition):
    """`(squared norms (n, shards), clipped_sum)` of per-example gradients
    `grads` `(n, *shape)` split into `shards` equal pieces along `axis`
    (`partition = (axis, shards)`, an axis of `shape`);
    `clipped_sum(c, safe)` takes `(n, shards)` factors and returns
    `shape`."""
    sq = clipping_lib.per_example_squared_norms([grads], [partition])[0]

    def clipped(c, safe):
        return clipping_lib.weighted_sum([grads], [c], [partition], zero_rows=safe)[0]

    return sq, clipped


def shaped_like(x, reference):
    """`x` reshaped to `reference`'s shape; `x` itself where the static
    shapes already agree (a reshape is one of Keras's costliest ops to
    dispatch on eager PyTorch)."""
    if None not in x.shape and tuple(x.shape) == tuple(reference.shape):
        return x
    return ops.reshape(x, ops.shape(reference))


def static_prod(dims):
    """The product of `dims`, or None if one of them is not static."""
    total = 1
    for d in dims:
        if d is None:
            return None
        total *= int(d)
    return total


def row_mask(sample_weight):
    """1.0 for rows with any non-zero sample weight, else 0.0."""
    flags = []
    for w in tree.flatten(sample_weight):
        if len(w.shape) == 1:
            flags.append(ops.not_equal(w, 0))
            continue
        w = ops.reshape(w, (ops.shape(w)[0], -1))
        flags.append(ops.any(ops.not_equal(w, 0), axis=1))
    present = flags[0]
    for f in flags[1:]:
        present = ops.logical_or(present, f)
    return ops.cast(present, "float32")


def example_is_present(sample_weight):
    """For one example's sample weights (no batch axis): whether any is
    non-zero. Padding rows have weight 0 everywhere."""
    return ops.any(
        ops.stack([ops.any(ops.not_equal(w, 0)) for w in tree.flatten(sample_weight)])
    )


def pad_rows(structure, pad):
    """Every tensor of `structure` with `pad` rows of zeros appended."""

    def pad_one(t):
        widths = [(0, pad)] + [(0, 0)] * (len(t.shape) - 1)
        return ops.pad(t, widths)

    return tree.map_structure(pad_one, structure)


def expand(structure):
    """Every tensor with a leading batch axis of one."""
    return tree.map_structure(lambda t: ops.expand_dims(t, 0), structure)


def squeeze(structure):
    """Every tensor without its leading batch axis of one."""
    return tree.map_structure(lambda t: ops.squeeze(t, 0), structure)


def tensor_leaves(structure):
    return [t for t in tree.flatten(structure) if ops.is_tensor(t)]


def replace_tensor_leaves(structure, new):
    new = iter(new)
    return tree.pack_sequence_as(
        structure,
        [next(new) if ops.is_tensor(t) else t for t in tree.flatten(structure)],
    )


def seed_state_ids(model):
    """`id`s of the state variables of every SeedGenerator in `model`."""
    return {id(state) for state in keras_compat.seed_generator_states(model)}


def seed_state_positions(model):
    """Positions of the seed states in `model.non_trainable_variables`."""
    ids = seed_state_ids(model)
    return [k for k, v in enumerate(model.non_trainable_variables) if id(v) in ids]


def offset_seed_states(non_trainable, positions, number):
    """`non_trainable` (a new list) with the seed states at `positions`
    offset by `number` (an int32 scalar: an example's or a microbatch's),
    so that each draws its own random numbers; and the offsets, which
    `restore_seed_states` takes off again after the call, so that the
    state advances as for one call."""
    non_trainable = list(non_trainable)
    offsets = {}
    for k in positions:
        state = non_trainable[k]
        offset = ops.cast(
            ops.stack([(ops.cast(number, "int32") + 1) * SEED_STRIDE, 0]),
            state.dtype,
        )
        offsets[k] = offset
        non_trainable[k] = state + offset
    return non_trainable, offsets


def restore_seed_states(new_non_trainable, offsets, positions=None):
    """Takes the `offset_seed_states` offsets off the updated states (only
    at `positions`, when given: the states the call updated)."""
    for k, offset in offsets.items():
        if positions is None or k in positions:
            new_non_trainable[k] = new_non_trainable[k] - offset
    return new_non_trainable


def is_float_tensor(t):
    return ops.is_tensor(t) and keras.backend.is_float_dtype(
        keras.backend.standardize_dtype(t.dtype)
    )


def mappable(structure):
    """`structure` with its numpy arrays as tensors: `torch.vmap` (Keras's
    `ops.vectorized_map` on PyTorch) maps over tensors only, and arrays
    given to `train_on_batch` arrive as numpy arrays there."""
    return tree.map_structure(
        lambda a: ops.convert_to_tensor(a) if isinstance(a, np.ndarray) else a,
        structure,
    )
