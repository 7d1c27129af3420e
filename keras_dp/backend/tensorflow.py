"""keras_dp's backend operations on TensorFlow (see
`keras_dp.backend.protocol`).

Random ops with per-example seeds have no vectorized converter in TF's pfor,
so `tf.vectorized_map` runs those few ops (dropout masks) in a loop and
everything else vectorized; the notice it logs for them is filtered out.
"""

import contextlib
import logging
import math
import secrets

import keras
import numpy as np
import tensorflow as tf
from tensorflow.python.ops import control_flow_util

from keras_dp import keras_compat
from keras_dp import native


class _ExpectedFallbackFilter(logging.Filter):
    """Hides pfor's notice for the random ops it loops over by design."""

    def filter(self, record):
        message = record.getMessage()
        return not (
            message.startswith("Using a while_loop for converting")
            and "StatelessRandom" in message
        )


tf.get_logger().addFilter(_ExpectedFallbackFilter())


def value_and_grad(fn):
    """`fn(params, *args) -> (value, aux)` becomes `((value, aux), grads)`
    by a `tf.GradientTape`; unconnected gradients are zeros."""

    def wrapped(params, *args):
        params = list(params)
        with tf.GradientTape() as tape:
            tape.watch(params)
            value, aux = fn(params, *args)
        grads = tape.gradient(
            value, params, unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
        return (value, aux), grads

    return wrapped


def seeded_random_ops():
    """Changes nothing: every `keras.random` draw is a function of its
    seed tensor already."""
    return contextlib.nullcontext()


def multiply_no_nan(x, y):
    """`x * y` (broadcast), exactly 0 where `y` is 0 even where `x` is
    infinite or NaN: one op (`tf.math.multiply_no_nan`), where a select
    after the product would be a second pass in TensorFlow."""
    return tf.math.multiply_no_nan(x, tf.cast(y, x.dtype))


@contextlib.contextmanager
def vectorizable_layers(model):
    """Recurrent layers unrolled while the vmap path traces its
    per-example step.

    `tf.vectorized_map` cannot vectorize the TensorList of the while loop
    in which a recurrent layer with a mask or dropout runs ("`dtype`
    variant is not compatible"); unrolled, the loop has none. Only layers
    whose number of time steps is known are unrolled (Keras cannot unroll
    others).
    """
    changed = []
    for layer in keras_compat.flatten_layers(model, include_self=False):
        if (
            isinstance(layer, keras.layers.RNN)
            and not layer.unroll
            and (_static_time_steps(layer))
        ):
            layer.unroll = True
            changed.append(layer)
    try:
        yield
    finally:
        for layer in changed:
            layer.unroll = False


def _static_time_steps(layer):
    for shape in keras_compat.build_input_shapes(layer).values():
        shape = tuple(shape) if shape is not None else ()
        return len(shape) > 1 and isinstance(shape[1], int)
    return False


def after(dependencies, tensors):
    """`tensors` (a structure), read only once `dependencies` are computed.

    TensorFlow runs every op whose inputs are ready, so without this the
    per-layer work of the fast path (patches, per-example gradients) of all
    layers could be in memory at once.
    """
    if not dependencies:
        return tensors
    with tf.control_dependencies(tf.nest.flatten(dependencies)):
        return tf.nest.map_structure(tf.identity, tensors)


# The conv fallback's settings (CONV_CLIPPED_SUM_FROM_PATCHES and
# GROUPED_CONV_*): where keras_dp's compiled kernel runs, 1-D/2-D conv
# layers take `per_example_conv_kernel_norms` instead.
#
# Stride-1 1-D/2-D convolutions with at least this many output positions
# take `per_example_conv_kernel_grads` (the conv rule of
# `keras_dp.per_example.conv`), in chunks of about 4 MiB of inputs and
# output gradients. oneDNN's grouped filter gradient beats patches on large maps
# (more so the more channels); with strides, and on small maps from many
# channels, patches are faster, hence the threshold. Smaller chunks were
# no faster. `benchmarks/RESULTS.md` ("Design measurements") has the
# figures.
GROUPED_CONV_MIN_POSITIONS = 1024
GROUPED_CONV_CHUNK_BYTES = 4 * 2**20


# Conv layers with no more output positions than filters keep only the
# norms of their per-example kernel gradients and take the clipped sum
# from their patches, gathered again: less memory at the peak for the
# same step time, since gathering is cheap here (`gather_patches`).
CONV_CLIPPED_SUM_FROM_PATCHES = True

# The clipped sums that leave out non-finite examples cost a few passes
# over the per-example tensors (selects); the conditional runs them only
# in a step that has such an example.
NONFINITE_SUMS_IN_CONDITIONAL = True

# Graphs run ops in any order their data dependencies allow (`after`).
RUNS_IN_PROGRAM_ORDER = False


def per_example_conv_kernel_grads(x, dy, kernel_size, dilation, pads):
    """Per-example kernel gradients of a stride-1 1-D/2-D convolution.

    `x`: (n, *in_spatial, C) inputs; `dy`: (n, *out_spatial, F) output
    gradients; `pads`: the (before, after) zeros the convolution reads on
    each spatial axis. Returns (n, F, K * C), the columns ordered like the
    kernel's (taps, C) rows.

    The examples become the groups of one grouped convolution, whose filter
    gradient (oneDNN's direct kernel, no patches) has one (taps, C, F)
    block per example. No patches are built, and "same" zeros are the
    op's own padding, which is faster than a `tf.pad` first.
    """
    if len(kernel_size) == 1:
        x, dy = x[:, None], dy[:, None]
        kernel_size, dilation = (1,) + tuple(kernel_size), (1,) + tuple(dilation)
        pads = [(0, 0)] + list(pads)
    channels, filters = x.shape[-1], dy.shape[-1]
    n = tf.shape(x)[0]
    x, padding = _padded_for_conv2d(x, dy, kernel_size, (1, 1), dilation, pads)

    def examples_as_channels(t):
        merged = tf.transpose(t, (1, 2, 0, 3))
        return tf.reshape(merged, (1, t.shape[1], t.shape[2], -1))

    kernel = tf.raw_ops.Conv2DBackpropFilter(
        input=examples_as_channels(x),
        filter_sizes=tf.stack([kernel_size[0], kernel_size[1], channels, n * filters]),
        out_backprop=examples_as_channels(dy),
        strides=[1, 1, 1, 1],
        padding=padding,
        dilations=[1, dilation[0], dilation[1], 1],
    )
    taps = kernel_size[0] * kernel_size[1]
    kernel = tf.reshape(kernel, (taps * channels, -1, filters))
    return tf.transpose(kernel, (1, 2, 0))


def per_example_conv_kernel_norms(
    x, dy, kernel_size, strides, dilation, pads, keep_grads
):
    """Squared norms of a 2-D convolution's per-example kernel
    gradients, as one compiled op (`keras_dp.native`) that reads them in
    place from the inputs and output gradients: `(squared_norms (n,),
    grads)`, `grads` the (n, F, K * C) gradients (columns ordered like the
    kernel's (taps, C) rows) when `keep_grads`, else None. None where the
    op cannot run (the caller then instantiates them its own way).

    `x`: (n, H, W, C) inputs; `dy`: (n, Ho, Wo, F) output gradients;
    `pads`: the (before, after) zeros the convolution reads on each
    spatial axis (1-D convs come as 2-D). Any stride and dilation.
    Faster than grouped convolutions and patches on every layer shape
    measured, the norms and the clipped sum (`conv_kernel_grad`)
    included.
    """
    native_ops = _native_ops()
    if native_ops is None or x.dtype != tf.float32 or len(kernel_size) != 2:
        return None
    squared_norms, grads = native_ops.keras_dp_conv_kernel_grads(
        x,
        dy,
        kernel_size=list(kernel_size),
        strides=list(strides),
        dilations=list(dilation),
        pads=[before for before, _ in pads],
        keep_grads=keep_grads,
    )
    return squared_norms, grads if keep_grads else None


def conv_kernel_grad(x, dy, kernel_size, strides, dilation, pads):
    """The kernel gradient of a 2-D convolution summed over the batch,
    (K * C, F) (rows ordered like the kernel's (taps, C)): one filter
    gradient, as in the non-private step. With `dy` scaled by the clip
    factors, the clipped sum of layers whose per-example gradients were
    not kept (`per_example_conv_kernel_norms`)."""
    x, padding = _padded_for_conv2d(x, dy, kernel_size, strides, dilation, pads)
    kernel = tf.raw_ops.Conv2DBackpropFilter(
        input=x,
        filter_sizes=[kernel_size[0], kernel_size[1], x.shape[-1], dy.shape[-1]],
        out_backprop=dy,
        strides=[1, strides[0], strides[1], 1],
        padding=padding,
        dilations=[1, dilation[0], dilation[1], 1],
    )
    return tf.reshape(kernel, (-1, dy.shape[-1]))


def _padded_for_conv2d(x, dy, kernel_size, strides, dilation, pads):
    """`(x, padding)` for a TensorFlow 2-D conv op that reads `pads` zeros:
    its own "SAME" where those are its pads (oneDNN's kernels then read no
    padded copy), else a padded copy of `x` and "VALID"."""
    same = True
    for i, (before, after) in enumerate(pads):
        size, k, s, d = x.shape[1 + i], kernel_size[i], strides[i], dilation[i]
        out = -(-size // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        same &= dy.shape[1 + i] == out and (before, after) == (
            total // 2,
            total - total // 2,
        )
    if same:
        return x, "SAME"
    if any(p != (0, 0) for p in pads):
        x = tf.pad(x, [(0, 0)] + [tuple(p) for p in pads] + [(0, 0)])
    return x, "VALID"


def replicas_in_sync():
    """Replicas of the `tf.distribute` strategy in scope (1 without one)."""
    return tf.distribute.get_strategy().num_replicas_in_sync


def replica_id():
    """This replica's index in the `tf.distribute` strategy's replicas (a
    scalar tensor in a replica's step; 0 without a strategy)."""
    context = tf.distribute.get_replica_context()
    return 0 if context is None else context.replica_id_in_sync_group


def per_example_squared_norms(x):
    """Each example's sum of squares, `(n,)` from a float32 `(n, ...)`
    tensor, as one compiled op (`keras_dp.native`) that reads `x` once;
    None where it cannot run (the caller then squares and sums)."""
    native_ops = _native_ops()
    if native_ops is None or x.dtype != tf.float32:
        return None
    return native_ops.keras_dp_squared_norms(x)


def gather_patches(x, index):
    """Conv patches `x[:, index]` with zeros where `index` is -1, as one
    compiled op (`keras_dp.native`); None where it cannot run (the caller
    then pads and gathers).

    `x`: (n, P, C) a conv layer's input with its positions flattened;
    `index`: static (T, K) integers, each output position's input
    positions. Without a padded copy of the input, so faster than
    `tf.pad` and `tf.gather`.
    """
    native_ops = _native_ops()
    if native_ops is None or x.dtype != tf.float32:
        return None
    return native_ops.keras_dp_conv_patches(x, index)


# Plain Python (a compiler run, a library load): AutoGraph must not
# convert it when a traced train step calls it.
@tf.autograph.experimental.do_not_convert
def _native_ops():
    """keras_dp's compiled ops (noise, conv gradients and patches), where
    they can run: on a CPU-only machine, outside XLA compilation
    (`jit_compile=True`)."""
    if tf.config.list_logical_devices("GPU") or (
        control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())
    ):
        return None
    return native.tensorflow_ops()


def standard_normal(shape, seed):
    """Standard normal float32 numbers of static `shape` from `seed` (a
    `keras.random.SeedGenerator`), for the DP noise.

    keras_dp's compiled kernel (`keras_dp.native`) where it can run, else
    `box_muller`.
    """
    if not all(isinstance(d, int) for d in shape):
        return keras.random.normal(shape, seed=seed)
    native_ops = _native_ops()
    if native_ops is None:
        return box_muller(shape, seed)
    key = tf.cast(seed.next(), tf.int32)
    z = native_ops.keras_dp_standard_normal(key=key, n=math.prod(shape))
    return tf.reshape(z, shape)


def noisy_gradients(grads, stddev, seed):
    """`[g + stddev * z]`, with `z` one flat `standard_normal` draw split
    over the gradients in order, as one compiled op that adds the noise as
    it draws it; None where that op cannot run or the gradients are not
    float32 of static shapes (the optimizer then draws and adds).

    TensorFlow runs the split, the scaling and the add as separate passes
    over memory, which on a small model cost a visible part of the step.
    """
    return _fused_noisy_gradients(
        grads, stddev, lambda: tf.cast(seed.next(), tf.int32), secure=False
    )


def secure_standard_normal(shape, seed):
    """Secure mode's standard normal float32 numbers of static `shape` by
    keras_dp's compiled kernel, under a key from the operating-system
    entropy that `os_entropy` loaded for this call of the train function
    plus `seed`'s counter (advanced once); None where the kernel cannot
    run (the caller then draws from `os_random_bits`)."""
    native_ops = _native_ops()
    if native_ops is None or not all(isinstance(d, int) for d in shape):
        return None
    z = native_ops.keras_dp_standard_normal(
        key=_os_key(seed), n=math.prod(shape), secure=True
    )
    return tf.reshape(z, shape)


def secure_noisy_gradients(grads, stddev, seed):
    """`noisy_gradients` with secure mode's sampler and key (see
    `secure_standard_normal`)."""
    return _fused_noisy_gradients(grads, stddev, lambda: _os_key(seed), secure=True)


def _fused_noisy_gradients(grads, stddev, key, secure):
    """The compiled op `KerasDpNoisyGradients` under `key()` (called only
    where the op runs, so that the seed advances only then)."""
    if any(g.dtype != tf.float32 or not g.shape.is_fully_defined() for g in grads):
        return None
    native_ops = _native_ops()
    if native_ops is None:
        return None
    return native_ops.keras_dp_noisy_gradients(
        key=key(),
        stddev=tf.cast(stddev, tf.float32),
        grads=grads,
        secure=secure,
    )


def _os_key(seed):
    """Two int32 words: the 64-bit entropy word plus the draw counter."""
    word = _os_entropy_words(seed)[0] + _counter(seed)
    high = tf.bitwise.right_shift(word, tf.constant(32, tf.int64))
    # int64 -> int32 keeps the low 32 bits of each.
    return tf.stack([tf.cast(high, tf.int32), tf.cast(word, tf.int32)])


def _counter(seed):
    counter = tf.cast(seed.next(), tf.int64)
    return counter[0] * (2**32) + counter[1]


def box_muller(shape, seed):
    """Standard normal float32 numbers of static `shape`, in TensorFlow ops.

    The Box-Muller transform of Philox uniforms, as TensorFlow's own
    `stateless_normal` kernel computes it (so the same distribution, the
    same tails: at most about 5.65 in absolute value), but as Eigen's
    vectorised elementwise ops, where that kernel transforms one pair of
    numbers at a time, hence faster.
    """
    size = math.prod(shape)
    half = (size + 1) // 2
    # In [0, 1), multiples of 2**-23: `1 - u` is never 0.
    u = keras.random.uniform((2, half), seed=seed)
    radius = tf.sqrt(-2.0 * tf.math.log(1.0 - u[0]))
    angle = (2.0 * math.pi) * u[1]
    pairs = tf.concat([radius * tf.cos(angle), radius * tf.sin(angle)], 0)
    return tf.reshape(pairs[:size], shape)


def scan(f, init, xs):
    """`jax.lax.scan` semantics: `f(carry, x) -> (carry, y)`, ys stacked."""
    xs_flat = [tf.convert_to_tensor(t) for t in tf.nest.flatten(xs)]
    n = tf.shape(xs_flat[0])[0]

    def read(i):
        return tf.nest.pack_sequence_as(xs, [t[i] for t in xs_flat])

    # The first step runs outside the loop: it gives the structure of `ys`
    # that the TensorArrays need.
    carry, ys = f(init, read(0))
    ys_spec = ys
    arrays = [
        tf.TensorArray(y.dtype, size=n, element_shape=y.shape).write(0, y)
        for y in tf.nest.flatten(ys)
    ]

    def body(i, carry, arrays):
        carry, ys = f(carry, read(i))
        arrays = [a.write(i, y) for a, y in zip(arrays, tf.nest.flatten(ys))]
        return i + 1, carry, arrays

    # One iteration at a time: the point of scanning (microbatches, patch
    # chunks) is that only one chunk's intermediates exist at once.
    _, carry, arrays = tf.while_loop(
        lambda i, *_: i < n,
        body,
        (tf.constant(1), carry, arrays),
        parallel_iterations=1,
    )
    ys = tf.nest.pack_sequence_as(ys_spec, [a.stack() for a in arrays])
    return carry, ys


def os_random_bits(shape, seed):
    """uint32 words of static `shape` (secure mode's noise): TensorFlow's
    stateless Philox, seeded with the 128 bits of operating-system entropy
    that `os_entropy` loaded before this call of the train function, the
    second word offset by `seed`'s counter (advanced once), so that every
    draw of one call has its own stream. A compiled step cannot read the
    entropy itself (a `py_function` does not compile with XLA)."""
    entropy = _os_entropy_words(seed)
    key = tf.stack([entropy[0], entropy[1] + _counter(seed)])
    return tf.random.stateless_uniform(
        tuple(shape), seed=key, minval=None, maxval=None, dtype=tf.uint32
    )


def _os_entropy_words(seed):
    entropy = getattr(seed, "_keras_dp_os_entropy", None)
    if entropy is None:
        raise RuntimeError(
            "secure_mode on TensorFlow reads fresh entropy that keras_dp "
            "loads before each call of the model's train function, and none "
            "was loaded. Train with model.fit or model.train_on_batch on a "
            "model made private with keras_dp.make_private; a custom "
            "training loop must run each step inside "
            "`with optimizer.step_entropy():`."
        )
    return entropy


@contextlib.contextmanager
def os_entropy(seed):
    """Loads 128 fresh bits of operating-system entropy into a variable
    that `os_random_bits` reads, for one call of the train function, and
    overwrites them with zeros after it. The variable is not tracked by
    the optimizer: no checkpoint holds it."""
    entropy = getattr(seed, "_keras_dp_os_entropy", None)
    if entropy is None:
        with tf.init_scope():
            entropy = tf.Variable(
                tf.zeros((2,), tf.int64), trainable=False, name="os_entropy"
            )
        # Set with object.__setattr__: no framework tracking of it.
        object.__setattr__(seed, "_keras_dp_os_entropy", entropy)
    entropy.assign(np.frombuffer(secrets.token_bytes(16), dtype=np.int64))
    try:
        yield
    finally:
        entropy.assign(tf.zeros((2,), tf.int64))
