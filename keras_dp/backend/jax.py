"""Private train step for the JAX backend (`jax.vmap` over `stateless_call`)."""

import math

import jax
import jax.numpy as jnp
import keras
import numpy as np
from jax.extend.random import threefry_2x32

from keras_dp import native


def value_and_grad(fn):
    return jax.value_and_grad(fn, has_aux=True)


def after(dependencies, tensors):
    """`tensors` (a structure), read only once `dependencies` are computed.

    XLA would otherwise be free to compute, say, a layer's patches from its
    input during the forward pass and hold them until the backward pass
    reaches the layer. On the CPU `optimization_barrier` does not order
    anything (it is expanded away before scheduling), so the float tensors
    get a data dependency instead: `+ 0 * d` for one element `d` of each
    dependency (XLA keeps `0 * d` for floats; it is NaN only where `d` is,
    and a step with a NaN gradient is lost anyway).
    """
    leaves = [d for d in jax.tree_util.tree_leaves(dependencies) if d.size]
    if not leaves:
        return tensors
    zero = sum(jnp.ravel(d)[0].astype("float32") for d in leaves) * 0.0

    def gate(t):
        if jnp.issubdtype(t.dtype, jnp.floating):
            return t + zero.astype(t.dtype)
        return t

    return jax.tree_util.tree_map(gate, tensors)


# The conv fallback's settings (CONV_CLIPPED_SUM_FROM_PATCHES and
# GROUPED_CONV_*): where keras_dp's compiled kernel runs, 1-D/2-D conv
# layers take `per_example_conv_kernel_norms` instead.
#
# Per-example kernel gradients are kept for the clipped sum: gathering the
# patches again (`fast_norms._norms_then_patches`) made the ResNet
# benchmark's DP step slower on JAX (see there).
CONV_CLIPPED_SUM_FROM_PATCHES = False


# Used for stride-1 1-D/2-D convolutions with at least this many output
# positions, in chunks of about 512 KiB of inputs and output gradients
# (see `fast_norms._handle_conv`). Measured per layer at batch 256 (2-core
# EPYC), against patches: 32x32x3 -> 16, 10 against 20 ms; 32x32x16 ->
# 16, 43 against 56; 16x16x32 -> 32, 19 against 38. With strides,
# patches are faster (32x32x16 -> 16x16x32: 18 against 24), and chunks of
# 4 MiB or more lose most of the gain (57 ms for the 32x32x16 layer). On
# the benchmark ResNet, DP/plain step time 1.07-1.09 (512 KiB chunks),
# 1.13-1.15 (1 MiB) and 1.15 (2 MiB) against 1.38-1.42 with patches, same
# process; but smaller chunks hold more memory: the DP step's peak
# resident memory (`benchmarks/step.py resnet memory dp`) is 1277 MB with
# 512 KiB chunks, 1099 with 1 MiB, 1044 with 2 MiB, 1894 with 128 KiB
# and 1073 with patches (plain: about 940). The
# benchmark CNN (11x11 outputs from 32 channels) was slower: 0.97 against
# 0.90, hence the threshold.
GROUPED_CONV_MIN_POSITIONS = 256
GROUPED_CONV_CHUNK_BYTES = 2**19


def replicas_in_sync():
    """1: a JAX step sees the whole batch, also under a
    `keras.distribution` (one program over all devices)."""
    return 1


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
    # made the ResNet benchmark's DP step no faster (1.14 against 1.11-1.13).
    x = jnp.pad(x, [(0, 0)] + [tuple(p) for p in pads] + [(0, 0)])
    n, channels, filters = x.shape[0], x.shape[-1], dy.shape[-1]
    rank = len(kernel_size)
    spatial = "DHW"[3 - rank:]
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
    spatial axis (1-D convs come as 2-D, `fast_norms._as_2d_conv`). Any
    stride and dilation. On the benchmark ResNet
    (batch 256) the DP step went from 1.10-1.12x the plain step's time to
    0.87x, and its memory from 1.34x to 0.96x; the CNN from 0.88-0.91x to
    0.83x.
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
        list(kernel_size) + list(strides) + list(dilation)
        + [before for before, _ in pads] + [0],
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
    spatial = "DHW"[3 - rank:]
    kernel_shape = tuple(kernel_size) + (x.shape[-1], dy.shape[-1])

    def conv(kernel):
        return jax.lax.conv_general_dilated(
            x, kernel,
            window_strides=tuple(strides),
            padding=[tuple(p) for p in pads],
            rhs_dilation=tuple(dilation),
            dimension_numbers=(
                "N" + spatial + "C", spatial + "IO", "N" + spatial + "C"
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
        return jax.ffi.ffi_call(
            target, jax.ShapeDtypeStruct(shape, jnp.float32)
        )(key)

    # Lowered for the platform the step runs on: the kernel on a CPU,
    # XLA's own ops on an accelerator.
    return jax.lax.platform_dependent(
        key, cpu=kernel, default=lambda key: xla_standard_normal(shape, key)
    )


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
      such loops over an odd number of elements into far slower code:
      `jax.random.normal` of 669,707 numbers takes 13 ms against 1.4 for
      669,706 (2-core EPYC).

    On the benchmark MLP, in one process, the DP step took 1.38x the plain
    step against 1.77x with `keras.random.normal`; with a one-unit head (an
    odd number of parameters) 1.52x against 5.29x.
    """
    size = math.prod(shape)
    counters = jax.lax.iota(jnp.uint32, -(-size // 4) * 4)
    bits = threefry_2x32((key[0], key[1]), counters)
    return normal_from_bits(bits)[:size].reshape(shape)


def normal_from_bits(bits):
    """`jax.random.normal`'s transform of uint32 `bits`: a uniform number
    in (-1, 1) from the top 23 bits, then `sqrt(2) * erfinv`; finite for
    every input (at most about 5.4 in absolute value)."""
    unit = jax.lax.bitcast_convert_type(
        (bits >> 9) | jnp.uint32(0x3F800000), jnp.float32
    ) - 1.0
    low = np.nextafter(np.float32(-1), np.float32(0))
    uniform = jnp.maximum(low, unit * (1.0 - low) + low)
    return np.float32(math.sqrt(2)) * jax.lax.erf_inv(uniform)


def scan(f, init, xs):
    return jax.lax.scan(f, init, xs)

