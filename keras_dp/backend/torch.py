"""keras_dp's backend operations on PyTorch (see `keras_dp.backend.protocol`).

PyTorch runs eagerly, op by op, so there is nothing to order (`after`
returns its tensors) and several members return None: the callers'
`keras.ops` forms do the same work in as many passes. Gradients come from
`torch.func` (`grad_and_value`), which composes with `torch.vmap` for the
vmap path.
"""

import contextlib
import secrets

import keras
import numpy as np
import torch
import torch.nn.functional as F

from keras_dp import keras_compat
from keras_dp import native


def value_and_grad(fn):
    """`torch.func.grad_and_value(fn, has_aux=True)`, with the result in
    `((value, aux), grads)` order. Unconnected parameters get zeros."""
    grad_and_value = torch.func.grad_and_value(fn, has_aux=True)

    def wrapped(params, *args):
        grads, (value, aux) = grad_and_value(list(params), *args)
        return (value, aux), list(grads)

    return wrapped


def scan(f, init, xs):
    """`keras.ops.scan`: a Python loop over the first axis, one step's
    intermediates at a time (each step's are freed before the next)."""
    return keras.ops.scan(f, init, xs)


def after(dependencies, tensors):
    """`tensors` as they are: PyTorch computes eagerly, in program order."""
    del dependencies
    return tensors


@contextlib.contextmanager
def vectorizable_layers(model):
    """Random layers drawn per example under `torch.vmap`
    (`seeded_random_ops`), convolutions without the channels-last copies
    and `one_hot` without the host check that `torch.vmap` cannot make. Recurrent loops need nothing:
    `torch.vmap` runs Keras's Python loops over time steps as they are."""
    del model
    nn = keras_compat.backend_nn_module()
    with (
        _replaced(nn, {"one_hot": _one_hot}),
        seeded_random_ops(),
        keras_compat.without_channels_last_copies(),
    ):
        yield


@contextlib.contextmanager
def _replaced(module, functions):
    """`module`'s attributes named in `functions` replaced by them inside
    the context (Keras's backend modules: their functions are looked up by
    attribute at each call)."""
    saved = {name: getattr(module, name) for name in functions}
    for name, fn in functions.items():
        setattr(module, name, fn)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(module, name, fn)


def _one_hot(x, num_classes, axis=-1, dtype=None, sparse=False):
    """`keras.ops.one_hot` by comparison with the class indices:
    `torch.nn.functional.one_hot` checks its input's largest value on the
    host, which `torch.vmap` refuses (Keras's sparse cross-entropies call
    it before Keras 3.14). Negative indices give zero rows, as in Keras."""
    if sparse:
        raise ValueError("Unsupported value `sparse=True` with torch backend")
    x = torch.as_tensor(x).to(torch.long)
    classes = torch.arange(num_classes, device=x.device)
    output = (x.unsqueeze(-1) == classes).to(_torch_dtype(dtype))
    if axis != -1 and axis != output.ndim - 1:
        output = torch.movedim(output, -1, axis)
    return output


@contextlib.contextmanager
def seeded_random_ops():
    """`keras.random`'s `dropout`, `uniform` and `normal` as functions of
    their seed tensors.

    Keras's PyTorch random ops seed a `torch.Generator` from a Python int
    made of the seed tensor, which `torch.vmap` cannot do for a seed that
    differs per example (as the vmap path's do: each example gets its own
    seed state, so its own dropout mask); and a layer created without a
    seed (a plain `Dropout(0.1)`) draws from PyTorch's global generator,
    not from its seed state. Inside this context these ops draw instead
    from a counter-based hash of the seed tensor in tensor ops, which
    `torch.vmap` maps like any other op; outside `torch.func`'s transforms
    (the fast path) they draw from PyTorch's generator keyed by the seed
    tensor instead. These numbers drive dropout masks and augmentation,
    not the DP noise (`standard_normal`).
    """
    module = keras_compat.backend_random_module()
    with _replaced(
        module, {"dropout": _dropout, "uniform": _uniform, "normal": _normal}
    ):
        yield


_MASK32 = 0xFFFFFFFF


def _mix32(h):
    """murmur3's 32-bit finalizer on int64 tensors holding uint32 values:
    products of two values below 2**32 wrap around int64, which leaves
    their low 32 bits (all that is kept) exact."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _MASK32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


def _seed_words(seed):
    """The (2,) int64 seed tensor of a `seed` argument of `keras.random`:
    a SeedGenerator (advanced once) or an int."""
    if isinstance(seed, keras.random.SeedGenerator):
        words = seed.next()
    else:
        words = torch.tensor([int(seed), 0])
    return torch.as_tensor(words).to(torch.int64) & _MASK32


def _uniform_bits(count, words):
    """`count` hashed uint32 words (int64 tensor) of the counters
    `0..count-1` under the seed's two `words`."""
    key = _mix32((words[0] * 0x9E3779B9 + words[1]) & _MASK32)
    counters = torch.arange(count, dtype=torch.int64, device=words.device)
    h = _mix32((counters * 0x9E3779B9 + key) & _MASK32)
    return _mix32(h ^ words[1])


def _splitmix64(high, low):
    """splitmix64's finalizer of the 64-bit word `(high, low)`: every bit
    of the result depends on every bit of the seed (PyTorch's CPU
    generator keeps only the low 32 bits of its seed)."""
    z = (((high << 32) | low) + 0x9E3779B97F4A7C15) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return z ^ (z >> 31)


def _unit_uniform(shape, seed, dtype):
    """Uniform numbers in [0, 1) of `shape`, 24 bits each."""
    shape = tuple(int(d) for d in shape)
    words = _seed_words(seed)
    if torch._C._functorch.peek_interpreter_stack() is None:
        # Outside `torch.vmap` and `torch.func` (the fast path's batched
        # pass): PyTorch's generator keyed by the seed's two words, as
        # Keras's own PyTorch random ops draw (the key is read on the
        # host); the hash below costs a dozen integer passes per number.
        generator = torch.Generator(device=words.device)
        generator.manual_seed(_splitmix64(*words.tolist()))
        unit = torch.rand(shape, generator=generator, device=words.device)
        return unit.to(dtype)
    count = 1
    for d in shape:
        count *= d
    bits = _uniform_bits(count, words)
    unit = (bits >> 8).to(torch.float32) * (1.0 / (1 << 24))
    return unit.reshape(shape).to(dtype)


def _torch_dtype(dtype):
    return getattr(
        torch, keras.backend.standardize_dtype(dtype or keras.config.floatx())
    )


def _uniform(shape, minval=0.0, maxval=1.0, dtype=None, seed=None):
    dtype = _torch_dtype(dtype)
    return minval + (maxval - minval) * _unit_uniform(shape, seed, dtype)


def _normal(shape, mean=0.0, stddev=1.0, dtype=None, seed=None):
    """Box-Muller from two uniforms per number."""
    shape = tuple(int(d) for d in shape)
    pair = _unit_uniform((2,) + shape, seed, torch.float32)
    radius = torch.sqrt(-2.0 * torch.log1p(-pair[0]))
    z = radius * torch.cos(2.0 * torch.pi * pair[1])
    return (mean + stddev * z).to(_torch_dtype(dtype))


def _dropout(inputs, rate, noise_shape=None, seed=None):
    if rate == 0.0:
        return inputs
    shape = tuple(
        inputs.shape[i] if d is None else d
        for i, d in enumerate(noise_shape or (None,) * inputs.ndim)
    )
    keep = _unit_uniform(shape, seed, torch.float32) >= rate
    keep = torch.broadcast_to(keep, inputs.shape)
    return torch.where(keep, inputs / (1.0 - rate), 0.0)


def multiply_no_nan(x, y):
    """`x * y` (broadcast), exactly 0 wherever `y` is 0, even where `x` is
    infinite or NaN."""
    y = y.to(x.dtype)
    return torch.where(y == 0, torch.zeros((), dtype=x.dtype, device=x.device), x * y)


def replicas_in_sync():
    """1: a step sees the whole batch."""
    return 1


def replica_id():
    """0: a step is its only replica."""
    return 0


def per_example_squared_norms(x):
    """Each example's sum of squares, `(n,)` from a float32 `(n, ...)`
    tensor, by one reduction that reads `x` once (the squared 2-norm);
    squaring and then summing writes a squared copy and reads it again.
    None for other dtypes (the caller then squares and sums)."""
    if x.dtype != torch.float32:
        return None
    return torch.square(torch.linalg.vector_norm(torch.flatten(x, 1), dim=1))


def gather_patches(x, index):
    """None: the caller pads and gathers with `keras.ops`."""
    del x, index
    return None


@torch.compiler.disable
def per_example_conv_kernel_norms(
    x, dy, kernel_size, strides, dilation, pads, keep_grads
):
    """Squared norms of a 2-D convolution's per-example kernel gradients,
    by keras_dp's compiled kernel (`keras_dp/native/conv_grads.h`, through
    ctypes) that reads them in place from the inputs and output
    gradients: `(squared_norms (n,), grads)`, `grads` the (n, F, K * C)
    gradients (columns ordered like the kernel's (taps, C) rows) when
    `keep_grads`, else None. None off the CPU, without the kernel, for 3-D
    convolutions or other dtypes (the conv rule then uses grouped
    convolutions, `per_example_conv_kernel_grads`, or patches).

    `x`: (n, H, W, C) inputs; `dy`: (n, Ho, Wo, F) output gradients;
    `pads`: the (before, after) zeros the convolution reads on each
    spatial axis (1-D convs come as 2-D). Any stride and dilation.
    """
    if (
        len(kernel_size) != 2
        or x.dtype != torch.float32
        or dy.dtype != torch.float32
        or x.device.type != "cpu"
        or dy.device.type != "cpu"
        or x.requires_grad
        or dy.requires_grad
    ):
        return None
    library = _native_library(x.device)
    if library is None:
        return None
    attributes = (
        list(kernel_size)
        + list(strides)
        + list(dilation)
        + [before for before, _ in pads]
    )
    return compiled_conv_kernel_grads(library, x, dy, attributes, keep_grads)


def compiled_conv_kernel_grads(library, x, dy, attributes, keep_grads, vector_width=0):
    """`per_example_conv_kernel_norms` by the C library `library`, with
    the conv's 8 `attributes` (kernel size, strides, dilations, pads
    before) and vectors of at most `vector_width` floats (0: the widest
    this CPU runs)."""
    x, dy = x.contiguous(), dy.contiguous()
    n, filters = x.shape[0], dy.shape[-1]
    columns = attributes[0] * attributes[1] * x.shape[-1]
    words = [
        torch.tensor([int(v) for v in values], dtype=torch.int64)
        for values in (attributes, x.shape, dy.shape)
    ]
    squared_norms = torch.empty(n, dtype=torch.float32)
    grads = torch.empty((n, filters, columns) if keep_grads else (0,))
    error = library.KerasDpConvKernelGradsC(
        *[w.data_ptr() for w in words],
        x.data_ptr(),
        dy.data_ptr(),
        squared_norms.data_ptr(),
        grads.data_ptr() if keep_grads else None,
        vector_width,
        torch.get_num_threads(),
    )
    if error is not None:
        raise ValueError(f"keras_dp's conv kernel: {error.decode()}")
    return squared_norms, grads if keep_grads else None


# Patches are gathered again for the clipped sum of conv layers with no
# more output positions than filters only where that saves memory at no
# cost; on PyTorch the kept gradients are reused, as on JAX.
CONV_CLIPPED_SUM_FROM_PATCHES = False

# The clipped sums that leave out non-finite examples cost a few passes
# over the per-example tensors (selects); the conditional runs them only
# in a step that has such an example.
NONFINITE_SUMS_IN_CONDITIONAL = True

# Eager: each op runs when it is called, so `after` is the identity.
RUNS_IN_PROGRAM_ORDER = True

# Stride-1 1-D/2-D convolutions with at least this many output positions
# take `per_example_conv_kernel_grads` (grouped convolutions), in chunks of
# about this many bytes of inputs and output gradients; smaller maps use
# patches. The same settings as JAX until measured on PyTorch.
GROUPED_CONV_MIN_POSITIONS = 256
GROUPED_CONV_CHUNK_BYTES = 2**19

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_WEIGHT_GRAD = {
    1: torch.nn.grad.conv1d_weight,
    2: torch.nn.grad.conv2d_weight,
    3: torch.nn.grad.conv3d_weight,
}


def _channels_first(x):
    """(n, *spatial, C) -> (n, C, *spatial)."""
    rank = x.ndim - 2
    return x.permute((0, rank + 1) + tuple(range(1, rank + 1)))


def _pad_spatial(x, pads):
    """Zeros on the spatial axes of a channels-first tensor: `pads` holds
    (before, after) per spatial axis, first axis first."""
    flat = []
    for before, after in reversed(list(pads)):
        flat += [int(before), int(after)]
    return F.pad(x, flat) if any(flat) else x


def per_example_conv_kernel_grads(x, dy, kernel_size, dilation, pads):
    """Per-example kernel gradients of a stride-1 convolution.

    `x`: (n, *in_spatial, C) inputs; `dy`: (n, *out_spatial, F) output
    gradients; `pads`: the (before, after) zeros the convolution reads on
    each spatial axis. Returns (n, F, K * C), the columns ordered like the
    kernel's (taps, C) rows.

    Each example's gradient is the correlation of its input with its output
    gradient: one convolution with the examples as groups, the input
    channels as its batch and the output gradients as its kernels.
    """
    rank = len(kernel_size)
    n, channels, filters = x.shape[0], x.shape[-1], dy.shape[-1]
    # (n, *sp, C) -> (C, n, *sp): channels as the batch, examples as groups.
    lhs = _pad_spatial(_channels_first(x).transpose(0, 1), pads)
    # (n, *out_sp, F) -> (n * F, 1, *out_sp): each example's F kernels.
    rhs = _channels_first(dy).reshape((n * filters, 1) + tuple(dy.shape[1:-1]))
    # The convolution's dilation is the correlation's stride.
    kernel = _CONV[rank](lhs, rhs, stride=tuple(dilation), groups=n)
    # (C, n * F, *kernel_size) -> (n, F, *kernel_size, C)
    kernel = kernel.reshape((channels, n, filters) + tuple(kernel_size))
    kernel = kernel.permute((1, 2) + tuple(range(3, rank + 3)) + (0,))
    return kernel.reshape(n, filters, -1)


def conv_kernel_grad(x, dy, kernel_size, strides, dilation, pads):
    """The kernel gradient of a 1-D/2-D/3-D convolution summed over the
    batch, (K * C, F) (rows ordered like the kernel's (taps, C)):
    PyTorch's weight gradient, as in the non-private step. With `dy`
    scaled by the clip factors, the clipped sum of layers whose
    per-example gradients were not kept."""
    rank = len(kernel_size)
    channels, filters = x.shape[-1], dy.shape[-1]
    lhs = _pad_spatial(_channels_first(x), pads)
    grad = _CONV_WEIGHT_GRAD[rank](
        lhs,
        (filters, channels) + tuple(kernel_size),
        _channels_first(dy),
        stride=tuple(strides),
        padding=0,
        dilation=tuple(dilation),
    )
    # (F, C, *kernel_size) -> (*kernel_size, C, F)
    grad = grad.permute(tuple(range(2, rank + 2)) + (1, 0))
    return grad.reshape(-1, filters)


def _noise_key(seed):
    """The two uint32 words of `seed` (a SeedGenerator, advanced once)."""
    return _seed_words(seed).reshape(-1).tolist()


def _native_library(device):
    """keras_dp's compiled noise library on a CPU, else None."""
    if torch.device(device).type != "cpu":
        return None
    return native.c_api()


@torch.compiler.disable
def standard_normal(shape, seed):
    """Standard normal float32 numbers of `shape` from `seed` (a
    `keras.random.SeedGenerator`, advanced once): the DP noise.

    On a CPU, keras_dp's compiled kernel (`keras_dp.native.c_api`, the same
    numbers for the same key as the TensorFlow and JAX kernels); elsewhere,
    or without the kernel, `torch.randn` from a generator seeded with both
    64 bits of the key. The same seed state gives the same numbers (the
    state is saved with the optimizer). Outside `torch.compile`: the key is
    read on the host.
    """
    shape = tuple(int(d) for d in shape)
    device = seed.state.value.device
    key0, key1 = _noise_key(seed)
    library = _native_library(device)
    if library is not None:
        z = torch.empty(shape, dtype=torch.float32)
        library.KerasDpStandardNormalC(
            key0, key1, z.data_ptr(), z.numel(), 0, torch.get_num_threads()
        )
        return z
    generator = torch.Generator(device=device)
    generator.manual_seed((key0 << 32) | key1)
    return torch.randn(shape, generator=generator, dtype=torch.float32, device=device)


@torch.compiler.disable
def secure_standard_normal(shape, seed):
    """Secure mode's standard normal float32 numbers of `shape` by
    keras_dp's compiled kernel on a CPU, under a key of 64 bits of fresh
    operating-system entropy (`seed` advanced once); None elsewhere."""
    shape = tuple(int(d) for d in shape)
    library = _native_library(seed.state.value.device)
    if library is None:
        return None
    key0, key1 = _os_key(seed)
    z = torch.empty(shape, dtype=torch.float32)
    library.KerasDpStandardNormalC(
        key0, key1, z.data_ptr(), z.numel(), 1, torch.get_num_threads()
    )
    return z


def _os_key(seed):
    seed.next()
    key = secrets.randbits(64)
    return key >> 32, key & 0xFFFFFFFF


@torch.compiler.disable
def noisy_gradients(grads, stddev, seed):
    """`[g + stddev * z]` in one pass by keras_dp's compiled kernel, `z` the
    numbers `standard_normal(total size, seed)` gives; None off the CPU,
    without the kernel, or for gradients that are not contiguous float32
    (the caller then draws and adds)."""
    return _noisy_gradients(grads, stddev, seed, secure=False)


@torch.compiler.disable
def secure_noisy_gradients(grads, stddev, seed):
    """`noisy_gradients` with secure mode's sampler, keyed by fresh
    operating-system entropy."""
    return _noisy_gradients(grads, stddev, seed, secure=True)


def _noisy_gradients(grads, stddev, seed, secure):
    import ctypes

    grads = list(grads)
    if not grads or any(
        g.dtype != torch.float32 or g.device.type != "cpu" or not g.is_contiguous()
        for g in grads
    ):
        return None
    library = _native_library(grads[0].device)
    if library is None:
        return None
    key0, key1 = _os_key(seed) if secure else _noise_key(seed)
    out = [torch.empty_like(g) for g in grads]
    offsets = [0]
    for g in grads:
        offsets.append(offsets[-1] + g.numel())
    pointers = ctypes.c_void_p * len(grads)
    library.KerasDpNoisyGradientsC(
        key0,
        key1,
        len(grads),
        ctypes.cast((ctypes.c_int64 * len(offsets))(*offsets), ctypes.c_void_p),
        ctypes.cast(pointers(*[g.data_ptr() for g in grads]), ctypes.c_void_p),
        ctypes.cast(pointers(*[o.data_ptr() for o in out]), ctypes.c_void_p),
        float(stddev),
        int(secure),
        torch.get_num_threads(),
    )
    return out


@torch.compiler.disable
def os_random_bits(shape, seed):
    """int64 words in `[0, 2^32)` of `shape` (secure mode's noise), keyed
    afresh by the operating system's entropy at every call: on a CPU,
    NumPy's Philox under a 128-bit key (PyTorch's CPU generator keeps only
    32 bits of a seed); elsewhere the device's Philox generator seeded
    with 64 bits. `seed` is advanced (its count of draws is saved) but
    does not key the draw."""
    shape = tuple(int(d) for d in shape)
    device = seed.state.value.device
    seed.next()
    if torch.device(device).type == "cpu":
        rng = np.random.Generator(np.random.Philox(key=secrets.randbits(128)))
        words = rng.integers(0, 2**32, size=shape, dtype=np.uint32)
        return torch.from_numpy(words.astype(np.int64))
    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(64))
    return torch.randint(
        0, 2**32, shape, generator=generator, dtype=torch.int64, device=device
    )


def os_entropy(seed):
    """Changes nothing: the step reads the entropy itself
    (`os_random_bits`)."""
    del seed
    return contextlib.nullcontext()
