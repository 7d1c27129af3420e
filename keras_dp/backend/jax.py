"""keras_dp's backend operations on JAX (see `keras_dp.backend.protocol`).

XLA fuses most of what the TensorFlow module does by hand (squares and
sums, the noise's scaling and add), so several members return None here
and the callers' `keras.ops` forms run instead.
"""

import contextlib
import math
import secrets

import jax
import jax.experimental
import jax.numpy as jnp
import keras
import numpy as np
from jax.extend.random import threefry_2x32

from keras_dp import native


def value_and_grad(fn):
    """`jax.value_and_grad(fn, has_aux=True)`."""
    return jax.value_and_grad(fn, has_aux=True)


@contextlib.contextmanager
def vectorizable_layers(model):
    """Changes nothing: `jax.vmap` vectorizes every layer as it is,
    recurrent loops included."""
    del model
    yield


def seeded_random_ops():
    """Changes nothing: every `keras.random` draw is a function of its
    seed tensor already."""
    return contextlib.nullcontext()


def multiply_no_nan(x, y):
    """`x * y` (broadcast), exactly 0 wherever `y` is 0, even where `x` is
    infinite or NaN: a select that XLA fuses with the product."""
    y = y.astype(x.dtype)
    return jnp.where(y == 0, jnp.zeros((), x.dtype), x * y)


def per_example_squared_norms(x):
    """None: XLA fuses the square and the sum of `keras.ops` into one pass
    already."""
    del x
    return None


def gather_patches(x, index):
    """None: there is no compiled kernel for it on JAX; the caller pads
    and gathers with `keras.ops`."""
    del x, index
    return None


def noisy_gradients(grads, stddev, seed):
    """None: the optimizer draws with `standard_normal` and adds, and
    XLA fuses the scaling and the add into one pass."""
    del grads, stddev, seed
    return None


def after(dependencies, tensors):
    """`tensors` (a structure), read only once `dependencies` are computed.

    XLA would otherwise be free to compute, say, a layer's patches from its
    input during the forward pass and hold them until the backward pass
    reaches the layer. On the CPU `optimization_barrier` does not order
    anything (it is expanded away before scheduling), so the float tensors
    get a data dependency instead: `+ 0 * d` for one element `d` of each
    dependency (XLA keeps `0 * d` for floats), with `d` made finite first:
    that element is one example's (its norm, say), and a non-finite one
    must not turn every other example's tensors into NaN (the step leaves
    that example out, `keras_dp.per_example.clip_factors`).
    """
    leaves = [d for d in jax.tree_util.tree_leaves(dependencies) if d.size]
    if not leaves:
        return tensors
    zero = (
        sum(
            jnp.nan_to_num(
                jnp.ravel(d)[0].astype("float32"), nan=0.0, posinf=0.0, neginf=0.0
            )
            for d in leaves
        )
        * 0.0
    )

    def gate(t):
        if jnp.issubdtype(t.dtype, jnp.floating):
            return t + zero.astype(t.dtype)
        return t

    return jax.tree_util.tree_map(gate, tensors)


# Every step takes the clipped sums that leave out non-finite examples
# (selects that XLA fuses into the sums) rather than an XLA conditional
# between them and the plain sums. On the CPU, XLA leaves the convolutions
# in a conditional's branches in the layout it was given, off its fast
# kernels: the filter gradient that is the clipped sum of a conv layer
# without kept per-example gradients ran on the slow path there
# (`benchmarks/RESULTS.md`, "Design measurements"). On an accelerator a
# conditional also copies its predicate to the host at every step.
NONFINITE_SUMS_IN_CONDITIONAL = False

# XLA orders ops by their data dependencies only (`after`).
RUNS_IN_PROGRAM_ORDER = False


# The conv fallback's settings (CONV_CLIPPED_SUM_FROM_PATCHES and
# GROUPED_CONV_*): where keras_dp's compiled kernel runs, 1-D/2-D conv
# layers take `per_example_conv_kernel_norms` instead.
#
# Per-example kernel gradients are kept for the clipped sum: gathering the
# patches again made the benchmark ResNet's DP step slower on JAX.
CONV_CLIPPED_SUM_FROM_PATCHES = False


# Stride-1 1-D/2-D convolutions with at least this many output positions
# take `per_example_conv_kernel_grads` (the conv rule of
# `keras_dp.per_example.conv`), in chunks of about 512 KiB of inputs and
# output gradients. XLA's grouped convolution beats patches on large maps;
# with strides, and on small maps from many channels (the benchmark CNN),
# patches are faster, hence the threshold. Larger chunks lose most of the
# gain; smaller ones hold more memory at the peak. `benchmarks/RESULTS.md`
# ("Design measurements") has the figures.
GROUPED_CONV_MIN_POSITIONS = 256
GROUPED_CONV_CHUNK_BYTES = 2**19


def replicas_in_sync():
    """1: a JAX step sees the whole batch, also under a
    `keras.distribution` (one program over all devices)."""
    return 1


def replica_id():
    """0: the one program of a step is its only replica."""
    return 0


def per_example_conv_kernel_grads(x, dy, kernel_size, dilation, pads):
    """Per-example kernel gradients of a stride-1 convolution.

    `x`: (n, *in_spatial, C) inputs; `dy`: (n, *out_spatial, F) output
    gradients; `pads`: the (before, after) zeros the convolution reads on
    each spatial axis. Returns (n, F, K * C), the columns ordered like the
    kernel's (taps, C) rows.

    Each example's gradient is the correlation of its input with its output
    gradient: one convolution with the examples as feature groups, the
    input channels as its batch and the output gradients as its kernel. No
    patches are built.
    """
    # Padded first: zeros passed to the convolution as its own padding
    # made the benchmark ResNet's DP step no faster.
    x = jnp.pad(x, [(0, 0)] + [tuple(p) for p in pads] + [(0, 0)])
    n, channels, filters = x.shape[0], x.shape[-1], dy.shape[-1]
    rank = len(kernel_size)
    spatial = "DHW"[3 - rank :]
    lhs = jnp.transpose(x, (rank + 1,) + tuple(range(1, rank + 1)) + (0,))
    rhs = jnp.transpose(dy, tuple(range(1, rank + 1)) + (0, rank + 1))
    rhs = rhs.reshape(dy.shape[1:-1] + (1, n * filters))
    kernel = jax.lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides=tuple(dilation),
        padding="VALID",
        dimension_numbers=("N" + spatial + "C", spatial + "IO", "N" + spatial + "C"),
        feature_group_count=n,
    )
    # (C, *kernel_size, n * F) -> (n, F, *kernel_size, C)
    kernel = kernel.reshape((channels,) + tuple(kernel_size) + (n, filters))
    kernel = jnp.transpose(
        kernel, (rank + 1, rank + 2) + tuple(range(1, rank + 1)) + (0,)
    )
    return kernel.reshape(n, filters, -1)


def per_example_conv_kernel_norms(
    x, dy, kernel_size, strides, dilation, pads, keep_grads
):
    """Squared norms of a 2-D convolution's per-example kernel
    gradients, by keras_dp's compiled kernel (`keras_dp/native/
    conv_grads.h`, an XLA FFI call) that reads them in place from the
    inputs and output gradients: `(squared_norms (n,), grads)`, `grads`
    the (n, F, K * C) gradients (columns ordered like the kernel's (taps,
    C) rows) when `keep_grads`, else None. None where it cannot run: off
    the CPU, without the kernel, under a `keras.distribution`, for 3-D
    convolutions or other dtypes (the caller then instantiates them its
    own way).

    `x`: (n, H, W, C) inputs; `dy`: (n, Ho, Wo, F) output gradients;
    `pads`: the (before, after) zeros the convolution reads on each
    spatial axis (1-D convs come as 2-D). Any stride and dilation. Faster
    than grouped convolutions or patches, and no per-example gradients
    need be kept for the norms, which saves most of the fast path's
    memory on conv networks.
    """
    if (
        len(kernel_size) != 2
        or x.dtype != jnp.float32
        or dy.dtype != jnp.float32
        or keras.distribution.distribution() is not None
        or jax.default_backend() != "cpu"
        or native.jax_target() is None
    ):
        return None
    n, filters = x.shape[0], dy.shape[-1]
    columns = kernel_size[0] * kernel_size[1] * x.shape[-1]
    geometry = np.array(
        list(kernel_size)
        + list(strides)
        + list(dilation)
        + [before for before, _ in pads]
        + [0],
        np.int64,
    )
    squared_norms, grads = jax.ffi.ffi_call(
        native.JAX_CONV_TARGET,
        (
            jax.ShapeDtypeStruct((n,), jnp.float32),
            jax.ShapeDtypeStruct(
                (n if keep_grads else 0, filters, columns), jnp.float32
            ),
        ),
    )(x, dy, geometry=geometry)
    return squared_norms, grads if keep_grads else None


def conv_kernel_grad(x, dy, kernel_size, strides, dilation, pads):
    """The kernel gradient of a 1-D/2-D/3-D convolution summed over the
    batch, (K * C, F) (rows ordered like the kernel's (taps, C)): XLA's
    filter gradient, as in the non-private step. With `dy` scaled by the
    clip factors, the clipped sum of layers whose per-example gradients
    were not kept (`per_example_conv_kernel_norms`)."""
    rank = len(kernel_size)
    spatial = "DHW"[3 - rank :]
    kernel_shape = tuple(kernel_size) + (x.shape[-1], dy.shape[-1])

    def conv(kernel):
        return jax.lax.conv_general_dilated(
            x,
            kernel,
            window_strides=tuple(strides),
            padding=[tuple(p) for p in pads],
            rhs_dilation=tuple(dilation),
            dimension_numbers=(
                "N" + spatial + "C",
                spatial + "IO",
                "N" + spatial + "C",
            ),
        )

    _, vjp = jax.vjp(conv, jnp.zeros(kernel_shape, x.dtype))
    return vjp(dy)[0].reshape(-1, dy.shape[-1])


def standard_normal(shape, seed):
    """Standard normal float32 numbers of `shape` from `seed` (a
    `keras.random.SeedGenerator`), for the DP noise.

    On a CPU, keras_dp's compiled kernel (`keras_dp.native`, a Box-Muller
    transform of threefry words, as an XLA FFI call); elsewhere, or
    without the kernel, `xla_standard_normal`. Under a
    `keras.distribution`, `keras.random.normal`, whose counters follow the
    variable's sharding.
    """
    if keras.distribution.distribution() is not None:
        return keras.random.normal(shape, seed=seed)
    key = seed.next().astype(jnp.uint32)
    target = native.jax_target()
    shape = tuple(shape)
    if target is None:
        return xla_standard_normal(shape, key)

    def kernel(key):
        return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, jnp.float32))(
            key, secure=False
        )

    # Lowered for the platform the step runs on: the kernel on a CPU,
    # XLA's own ops on an accelerator.
    return jax.lax.platform_dependent(
        key, cpu=kernel, default=lambda key: xla_standard_normal(shape, key)
    )


def secure_standard_normal(shape, seed):
    """Secure mode's standard normal float32 numbers of `shape` by
    keras_dp's compiled kernel, keyed by two words of operating-system
    entropy that a host callback reads at every call inside the compiled
    step (`seed` advanced once); None off the CPU, without the kernel or
    under a `keras.distribution` (the caller then draws in XLA ops from
    `os_random_bits`)."""
    target = native.jax_target()
    if (
        target is None
        or jax.default_backend() != "cpu"
        or keras.distribution.distribution() is not None
    ):
        return None
    shape = tuple(shape)
    seed.next()
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, jnp.float32))(
        _os_key(), secure=True
    )


def secure_noisy_gradients(grads, stddev, seed):
    """None: XLA fuses the add (`secure_standard_normal` draws)."""
    del grads, stddev, seed
    return None


def xla_standard_normal(shape, key):
    """Standard normal numbers from a (2,) uint32 `key`, in XLA ops.

    JAX's threefry bits and inverse error function, as `jax.random.normal`
    computes them, with two differences that matter on the CPU:

    - Each threefry block gives two numbers. `jax.random.normal` hashes one
      block per number and keeps the xor of its two words (its
      partitionable form, which lets a sharded array draw its own shards):
      twice the hashing.
    - The count drawn is a multiple of 4, so that the hash and the
      transform loop over even numbers of elements. XLA:CPU compiles
      such loops over an odd number of elements into far slower code
      (a model with an odd number of parameters would pay for it on every
      step).
    """
    size = math.prod(shape)
    counters = jax.lax.iota(jnp.uint32, -(-size // 4) * 4)
    bits = threefry_2x32((key[0], key[1]), counters)
    return normal_from_bits(bits)[:size].reshape(shape)


def normal_from_bits(bits):
    """`jax.random.normal`'s transform of uint32 `bits`: a uniform number
    in (-1, 1) from the top 23 bits, then `sqrt(2) * erfinv`; finite for
    every input (at most about 5.4 in absolute value)."""
    unit = (
        jax.lax.bitcast_convert_type((bits >> 9) | jnp.uint32(0x3F800000), jnp.float32)
        - 1.0
    )
    low = np.nextafter(np.float32(-1), np.float32(0))
    uniform = jnp.maximum(low, unit * (1.0 - low) + low)
    return np.float32(math.sqrt(2)) * jax.lax.erf_inv(uniform)


def scan(f, init, xs):
    """`jax.lax.scan(f, init, xs)`."""
    return jax.lax.scan(f, init, xs)


def os_random_bits(shape, seed):
    """uint32 words of `shape` (secure mode's noise): `jax.random.bits`
    under a threefry key of two words read from the operating system's
    entropy by a host callback at every call, inside the compiled step.
    `seed` is advanced (its count of draws is saved) but does not key the
    draw."""
    seed.next()
    return jax.random.bits(_os_key(), tuple(shape), jnp.uint32)


def _os_key():
    """Two uint32 words of operating-system entropy, read by a host
    callback each time the compiled step runs this call."""
    return jax.experimental.io_callback(
        _os_key_words, jax.ShapeDtypeStruct((2,), jnp.uint32), ordered=False
    )


def _os_key_words():
    return np.frombuffer(secrets.token_bytes(8), dtype=np.uint32).copy()


def os_entropy(seed):
    """Changes nothing: the step reads the entropy itself
    (`os_random_bits`)."""
    del seed
    return contextlib.nullcontext()
