"""Tests of keras_dp's compiled CPU kernels (`keras_dp.native`): the noise
kernel (a TensorFlow op, a JAX XLA FFI handler, PyTorch's plain C library)
and the per-example conv kernel gradients (TensorFlow and JAX only; the
framework ops that PyTorch uses instead are checked against the same
loop).

The kernel's numbers are checked against its recipe (the header comment of
`keras_dp/native/noise.h`) computed in float64 NumPy: Threefry-2x32 of the
counters (j, 0) under the seed generator's state, then the Box-Muller
transform. The distribution itself is tested in `test_optimizers.py`
(`test_backend_noise_sampler_is_standard_normal`, on both the kernel and
the framework's sampler).
"""

import math
import os
import sys
import warnings

import keras
import numpy as np
import pytest
from keras import ops

from keras_dp import backend as backend_lib
from keras_dp import native

ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def threefry_2x32(key0, key1, x0, x1):
    """Threefry-2x32, 20 rounds (Salmon et al. 2011; JAX's threefry_2x32),
    on uint32 arrays."""
    keys = [np.uint32(key0), np.uint32(key1)]
    keys.append(keys[0] ^ keys[1] ^ np.uint32(0x1BD11BDA))
    x0, x1 = x0 + keys[0], x1 + keys[1]
    for i in range(5):
        for r in ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = (x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r))
            x1 = x1 ^ x0
        x0 = x0 + keys[(i + 1) % 3]
        x1 = x1 + keys[(i + 2) % 3] + np.uint32(i + 1)
    return x0, x1


def reference_normal(key0, key1, n):
    """noise.h's recipe in float64."""
    half = (n + 1) // 2
    w0, w1 = threefry_2x32(
        key0, key1, np.arange(half, dtype=np.uint32), np.zeros(half, np.uint32)
    )
    u = ((w0 >> 8).astype(np.float64) + 1) * 2.0**-24
    radius = np.sqrt(-2 * np.log(u))
    quadrant = (w1 >> 30).astype(np.float64)
    phi = ((w1 & 0x3FFFFFFF).astype(np.float64) * 2.0**-30 - 0.5) * np.pi / 2
    theta = quadrant * np.pi / 2 + phi
    return np.concatenate([radius * np.cos(theta), radius * np.sin(theta)])[:n]


def test_threefry_reference_known_answer():
    """The reference hash against Random123's published known-answer
    vectors for Threefry-2x32-20 (kat_vectors), so the kernel is checked
    against Threefry itself, not against a copy of its own code."""
    cases = [
        ((0, 0), (0, 0), (0x6B200159, 0x99BA4EFE)),
        ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
        ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
    ]
    for (key0, key1), (c0, c1), expected in cases:
        out = threefry_2x32(
            key0, key1, np.array([c0], np.uint32), np.array([c1], np.uint32)
        )
        assert (int(out[0][0]), int(out[1][0])) == expected


@pytest.fixture
def kernel_available():
    if keras.backend.backend() == "tensorflow":
        available = native.tensorflow_ops() is not None
    elif keras.backend.backend() == "torch":
        available = native.c_api() is not None
    else:
        available = native.jax_target() is not None
    assert available, (
        "keras_dp could not build its noise kernel here; see the warning "
        "above (a C++17 compiler is needed)"
    )


def _key(seed):
    """The seed generator's state now: the key of its next draw."""
    return np.asarray(ops.convert_to_numpy(seed.state.value)).astype(np.uint32)


def _sample(shape, seed):
    """The backend's sampler inside a compiled function, as in a train step
    (a tensor of the backend)."""
    sampler = backend_lib.get_backend_module().standard_normal
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.function(lambda: sampler(shape, seed))()
    return sampler(shape, seed)


def _draw(shape, seed):
    """`_sample` as numpy."""
    return ops.convert_to_numpy(_sample(shape, seed))


@pytest.mark.parametrize("shape", [(1,), (2,), (3,), (5, 3), (2049,), (3, 44445)])
def test_kernel_matches_its_recipe(kernel_available, shape):
    """Every number within 2e-6 of the float64 recipe (Cephes'
    single-precision log, sin and cos on 24-bit inputs are good to a few
    ulp), for even, odd and block-crossing sizes; the key is the seed
    generator's state before the draw, which then advances."""
    seed = keras.random.SeedGenerator(11)
    for _ in range(2):
        key0, key1 = _key(seed)
        z = _draw(shape, seed)
        assert z.shape == shape and z.dtype == np.float32
        expected = reference_normal(key0, key1, math.prod(shape)).reshape(shape)
        np.testing.assert_allclose(z, expected, rtol=0, atol=2e-6)


def test_kernel_draws_are_finite_and_bounded(kernel_available):
    """The largest radius is sqrt(-2 log 2**-24) = 5.77: a word of all
    zeros gives the smallest u, never 0 (no infinite noise coordinate)."""
    z = _draw((1_000_000,), keras.random.SeedGenerator(3))
    assert np.all(np.isfinite(z))
    assert np.abs(z).max() <= math.sqrt(-2 * math.log(2.0**-24)) + 1e-5


def _fresh_native(monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_DP_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_loaded", {})


def test_failed_build_warns_once_and_falls_back(monkeypatch, tmp_path):
    """Without a compiler the sampler warns once, says what to do, and
    draws with the framework's own ops (finite, standard scale)."""
    _fresh_native(monkeypatch, tmp_path)

    def no_compiler():
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")

    monkeypatch.setattr(native, "_compiler", no_compiler)
    seed = keras.random.SeedGenerator(1)
    with pytest.warns(UserWarning) as record:
        first = _draw((4001,), seed)
        second = _draw((4001,), seed)
    messages = [str(w.message) for w in record if "keras_dp" in str(w.message)]
    assert len(messages) == 1
    assert "could not build its compiled noise kernel" in messages[0]
    assert "no C++ compiler found" in messages[0]
    assert "KERAS_DP_NATIVE=0" in messages[0]
    for z in (first, second):
        assert np.all(np.isfinite(z)) and 0.9 < z.std() < 1.1
    assert not np.array_equal(first, second)
    assert not list(tmp_path.iterdir())


def test_switched_off_by_environment(monkeypatch, tmp_path):
    """KERAS_DP_NATIVE=0: no build, no warning, the framework's numbers."""
    _fresh_native(monkeypatch, tmp_path)
    monkeypatch.setenv("KERAS_DP_NATIVE", "0")
    seed = keras.random.SeedGenerator(2)
    key0, key1 = _key(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        z = _sample((1000,), seed)
    # Converted outside: Keras's PyTorch `convert_to_numpy` warns on NumPy 2.
    z = ops.convert_to_numpy(z)
    assert np.abs(z - reference_normal(key0, key1, 1000)).max() > 0.1
    assert not list(tmp_path.iterdir())


def test_build_is_cached_per_source_and_version(monkeypatch, tmp_path):
    """A second build with the same sources and framework version reuses
    the library; another version builds its own.

    `native.build` keys its cache the same way whatever the source, so the
    plain C library (no framework headers) stands in on every backend;
    `kernel_available` builds and loads each framework's own kernel."""
    _fresh_native(monkeypatch, tmp_path)
    source, flags, links = "c_api.cc", [], ["-pthread"]
    path = native.build("t", source, flags, links, version="1")
    built_at = os.stat(path).st_mtime_ns
    assert native.build("t", source, flags, links, version="1") == path
    assert os.stat(path).st_mtime_ns == built_at
    other = native.build("t", source, flags, links, version="2")
    assert other != path
    assert sorted(os.listdir(tmp_path / "native")) == sorted(
        [os.path.basename(path), os.path.basename(other)]
    )


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="TensorFlow's XLA compile"
)
def test_tensorflow_xla_compiled_step_uses_its_own_ops(kernel_available):
    """Under `jit_compile=True` the custom op cannot run (XLA has no
    kernel for it): the sampler takes TensorFlow's own ops there."""
    import tensorflow as tf

    sampler = backend_lib.get_backend_module().standard_normal
    seed = keras.random.SeedGenerator(4)
    key0, key1 = _key(seed)
    z = tf.function(lambda: sampler((999,), seed), jit_compile=True)().numpy()
    assert np.all(np.isfinite(z)) and 0.85 < z.std() < 1.15
    assert np.abs(z - reference_normal(key0, key1, 999)).max() > 0.1


@pytest.mark.skipif(
    keras.backend.backend() == "jax",
    reason="JAX has no fused op: the optimizer draws and adds, and XLA fuses "
    "the two (`noisy_gradients` returns None)",
)
def test_noisy_gradients_are_the_flat_draw_added(kernel_available):
    """The fused op (TensorFlow's op, PyTorch's C entry point) gives
    `g + stddev * z` with `z` the flat draw (the recipe) split over the
    gradients in order, for shapes whose sizes cross pairs and blocks; it
    leaves its inputs' values alone."""
    module = backend_lib.get_backend_module()
    rng = np.random.default_rng(0)
    shapes = [(3, 5), (7,), (1,), (40, 51), (2, 2)]
    grads = [
        ops.convert_to_tensor(rng.standard_normal(s).astype(np.float32)) for s in shapes
    ]
    before = [ops.convert_to_numpy(g).copy() for g in grads]
    seed = keras.random.SeedGenerator(9)
    key0, key1 = _key(seed)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        noisy = tf.function(lambda: module.noisy_gradients(grads, 0.25, seed))()
    else:
        noisy = module.noisy_gradients(grads, 0.25, seed)
    assert noisy is not None
    sizes = [math.prod(s) for s in shapes]
    z = reference_normal(key0, key1, sum(sizes))
    offsets = np.cumsum([0] + sizes)
    for g, out, a, b, s in zip(before, noisy, offsets[:-1], offsets[1:], shapes):
        assert tuple(out.shape) == s
        np.testing.assert_allclose(
            ops.convert_to_numpy(out), g + 0.25 * z[a:b].reshape(s), rtol=0, atol=1e-6
        )
    for g, b in zip(grads, before):
        np.testing.assert_array_equal(ops.convert_to_numpy(g), b)
    # Not float32: the optimizer's own draw and add.
    assert module.noisy_gradients([ops.zeros((3,), "float16")], 1.0, seed) is None


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="TensorFlow's norms op"
)
@pytest.mark.parametrize(
    "shape", [(5, 1), (4, 17), (3, 2, 33), (2, 3, 4100), (2, 9000), (0, 7)]
)
def test_tensorflow_squared_norms_op_matches_float64_sums(kernel_available, shape):
    """Each example's sum of squares, over rows shorter than the 16 lanes,
    with a partial last vector, and over several of the kernel's 4096-long
    blocks, to float32 precision of the float64 sum."""
    import tensorflow as tf

    from keras_dp.backend import tensorflow as tf_backend

    x = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    sq = tf.function(tf_backend.per_example_squared_norms)(tf.constant(x))
    expected = (x.astype(np.float64) ** 2).sum(axis=tuple(range(1, len(shape))))
    assert sq.shape == (shape[0],)
    np.testing.assert_allclose(sq.numpy(), expected, rtol=1e-6, atol=0)
    # Not float32: the caller squares and sums.
    assert tf_backend.per_example_squared_norms(tf.zeros((2, 3), tf.float16)) is None


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="TensorFlow's patches op"
)
@pytest.mark.parametrize(
    "input_shape, kernel_size, strides, dilation, padding",
    [
        ((9, 9, 4), (3, 3), (1, 1), (1, 1), "same"),
        ((8, 7, 3), (2, 3), (2, 1), (1, 1), "same"),
        ((9, 10, 2), (3, 2), (1, 1), (2, 1), "valid"),
        ((9, 10, 2), (3, 3), (2, 2), (1, 1), "valid"),
        ((11, 3), (3,), (1,), (2,), "causal"),
        ((12, 5), (4,), (3,), (1,), "same"),
        ((5, 6, 4, 2), (2, 3, 2), (1, 2, 1), (1, 1, 1), "same"),
        ((5, 6, 4, 2), (2, 3, 2), (1, 1, 1), (1, 1, 2), "same"),
    ],
)
def test_tensorflow_conv_patches_op_matches_pad_and_gather(
    kernel_available, input_shape, kernel_size, strides, dilation, padding
):
    """The compiled patches op reads the conv's zeros from its index: its
    patches equal those of `tf.pad` and a gather, for strides, dilations,
    even kernels and causal, valid and same padding, in 1-D to 3-D."""
    import tensorflow as tf

    from keras_dp.per_example import patches
    from keras_dp.backend import tensorflow as tf_backend

    layer = {1: keras.layers.Conv1D, 2: keras.layers.Conv2D, 3: keras.layers.Conv3D}[
        len(kernel_size)
    ](2, kernel_size, strides=strides, dilation_rate=dilation, padding=padding)
    x = np.random.default_rng(3).standard_normal((4,) + input_shape).astype("float32")
    out_spatial = layer.compute_output_shape((4,) + input_shape)[1:-1]
    conv = (kernel_size, strides, dilation, padding, tuple(out_spatial))
    used = []

    class WithOp:
        def gather_patches(x, index):
            used.append(index)
            return tf_backend.gather_patches(x, index)

    class WithoutOp:
        def gather_patches(x, index):
            return None  # the protocol's answer where the op cannot run

    with_op = patches.conv_patches(tf.constant(x), *conv, WithOp)
    without = patches.conv_patches(tf.constant(x), *conv, WithoutOp)
    assert used and (used[0] == -1).any() == (padding != "valid")
    np.testing.assert_array_equal(with_op.numpy(), without.numpy())
    # An index past the input is an error, not a read out of bounds.
    with pytest.raises(tf.errors.InvalidArgumentError, match="index out of range"):
        tf_backend.gather_patches(
            tf.constant(x.reshape(4, -1, input_shape[-1])),
            np.full((2, 2), x[0, ..., 0].size, "int32"),
        )


def _example_kernel_grad(layer, x_i, dy_i):
    """The layer's kernel gradient for one example, by the framework's own
    autodiff, as (taps * C, F)."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            inner = tf.reduce_sum(layer(x_i) * dy_i)
        grad = tape.gradient(inner, layer.kernel)
    elif keras.backend.backend() == "torch":
        import torch

        with torch.enable_grad():
            inner = torch.sum(layer(x_i) * ops.convert_to_tensor(dy_i))
            (grad,) = torch.autograd.grad(inner, [layer.kernel.value])
    else:
        import jax
        import jax.numpy as jnp

        def inner(kernel):
            outputs, _ = layer.stateless_call([kernel], [], x_i)
            return jnp.sum(outputs * dy_i)

        grad = jax.grad(inner)(layer.kernel.value)
    return ops.convert_to_numpy(grad).reshape(-1, layer.filters)


def _compiled_conv_grads(x, dy, geometry, vector_width):
    """The compiled op called directly, 2-D, `geometry` = (kernel_size,
    strides, dilations, pads before) of 2 values each, vectors at most
    `vector_width` floats wide; (squared norms, grads)."""
    kernel_size, strides, dilations, pads = geometry
    if keras.backend.backend() == "torch":
        import torch

        from keras_dp.backend import torch as torch_backend

        return torch_backend.compiled_conv_kernel_grads(
            native.c_api(),
            torch.as_tensor(x),
            torch.as_tensor(dy),
            list(kernel_size) + list(strides) + list(dilations) + list(pads),
            keep_grads=True,
            vector_width=vector_width,
        )
    if keras.backend.backend() == "tensorflow":
        return native.tensorflow_ops().keras_dp_conv_kernel_grads(
            x,
            dy,
            kernel_size=kernel_size,
            strides=strides,
            dilations=dilations,
            pads=pads,
            keep_grads=True,
            vector_width=vector_width,
        )
    import jax

    columns = kernel_size[0] * kernel_size[1] * x.shape[-1]
    return jax.ffi.ffi_call(
        native.JAX_CONV_TARGET,
        (
            jax.ShapeDtypeStruct((x.shape[0],), "float32"),
            jax.ShapeDtypeStruct((x.shape[0], dy.shape[-1], columns), "float32"),
        ),
    )(
        x,
        dy,
        geometry=np.array(
            list(kernel_size)
            + list(strides)
            + list(dilations)
            + list(pads)
            + [vector_width],
            "int64",
        ),
    )


_CONV_CASES = pytest.mark.parametrize(
    "input_shape, filters, kernel_size, strides, dilation, padding",
    [
        # Channel and filter counts that leave partial tiles (16 channels
        # by 16 or 32 filters per tile) and padded filter vectors.
        ((9, 9, 3), 17, (3, 3), (1, 1), (1, 1), "same"),
        ((8, 7, 20), 10, (2, 3), (2, 1), (1, 1), "same"),
        ((9, 10, 2), 33, (3, 2), (1, 1), (2, 1), "valid"),
        ((9, 10, 1), 48, (3, 3), (2, 2), (1, 1), "valid"),
        ((6, 6, 9), 64, (3, 3), (2, 2), (1, 1), "same"),
        ((11, 3), 5, (3,), (1,), (2,), "causal"),
        ((12, 5), 40, (4,), (3,), (1,), "same"),
    ],
)


def _conv_case(input_shape, filters, kernel_size, strides, dilation, padding):
    """A conv layer, 5 examples' inputs and output gradients, and their
    per-example kernel gradients by the framework's autodiff, one example
    at a time: `(x, dy, pads, expected (n, F, K * C), expected squared
    norms)`."""
    from keras_dp.per_example import patches

    layer = {1: keras.layers.Conv1D, 2: keras.layers.Conv2D}[len(kernel_size)](
        filters,
        kernel_size,
        strides=strides,
        dilation_rate=dilation,
        padding=padding,
        use_bias=False,
    )
    n = 5
    rng = np.random.default_rng(4)
    x = rng.standard_normal((n,) + input_shape).astype("float32")
    layer.build((n,) + input_shape)
    dy = rng.standard_normal(layer.compute_output_shape((n,) + input_shape)).astype(
        "float32"
    )
    expected = np.stack(
        [_example_kernel_grad(layer, x[i : i + 1], dy[i : i + 1]).T for i in range(n)]
    )
    expected_squared = np.sum(expected.astype("float64") ** 2, axis=(1, 2))
    pads = patches.conv_pads(
        input_shape[:-1], kernel_size, strides, dilation, padding, dy.shape[1:-1]
    )
    return x, dy, pads, expected, expected_squared


@_CONV_CASES
def test_conv_kernel_grads_match_per_example_loop(
    input_shape, filters, kernel_size, strides, dilation, padding
):
    """The per-example kernel gradients and their norms equal each
    example's own gradient through the Keras layer (the framework's
    autodiff, one example at a time), for strides, dilations, even
    kernels, same, valid and causal padding, in 1-D and 2-D: the backend's
    grouped convolutions (stride 1, called as the conv rule calls them),
    `conv_kernel_grad` (their sum; 1-D convs as 2-D) and keras_dp's
    compiled kernel at every vector width."""
    from keras_dp.per_example import patches

    module = backend_lib.get_backend_module()
    x, dy, pads, expected, expected_squared = _conv_case(
        input_shape, filters, kernel_size, strides, dilation, padding
    )
    x_t, dy_t, conv = patches.as_2d_conv(
        ops.convert_to_tensor(x),
        ops.convert_to_tensor(dy),
        (kernel_size, strides, dilation, pads),
    )
    if all(s == 1 for s in strides):
        grouped = module.per_example_conv_kernel_grads(
            ops.convert_to_tensor(x),
            ops.convert_to_tensor(dy),
            kernel_size,
            dilation,
            pads,
        )
        np.testing.assert_allclose(
            ops.convert_to_numpy(grouped), expected, rtol=1e-5, atol=1e-5
        )
    total = module.conv_kernel_grad(x_t, dy_t, *conv)
    np.testing.assert_allclose(
        ops.convert_to_numpy(total), expected.sum(0).T, rtol=1e-4, atol=1e-4
    )
    if keras.backend.backend() == "tensorflow":
        assert native.tensorflow_ops() is not None, "the kernel did not build"
    elif keras.backend.backend() == "torch":
        assert native.c_api() is not None, "the kernel did not build"
    else:
        assert native.jax_target() is not None, "the kernel did not build"
    squared, grads = module.per_example_conv_kernel_norms(
        x_t, dy_t, *conv, keep_grads=True
    )
    np.testing.assert_allclose(
        ops.convert_to_numpy(grads), expected, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        ops.convert_to_numpy(squared), expected_squared, rtol=1e-5
    )
    squared_only, no_grads = module.per_example_conv_kernel_norms(
        x_t, dy_t, *conv, keep_grads=False
    )
    assert no_grads is None
    np.testing.assert_allclose(
        ops.convert_to_numpy(squared_only), expected_squared, rtol=1e-5
    )
    # The AVX2 and 128-bit vector code, as on CPUs without AVX-512.
    kernel_2d, strides_2d, dilation_2d, pads_2d = conv
    geometry = (
        list(kernel_2d),
        list(strides_2d),
        list(dilation_2d),
        [before for before, _ in pads_2d],
    )
    for width in (8, 4):
        squared, grads = _compiled_conv_grads(
            ops.convert_to_numpy(x_t), ops.convert_to_numpy(dy_t), geometry, width
        )
        np.testing.assert_allclose(np.asarray(grads), expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(squared), expected_squared, rtol=1e-5)


def test_conv_kernel_grads_kernel_checks_its_arguments(kernel_available):
    x, dy = np.zeros((2, 5, 5, 3), "float32"), np.zeros((2, 5, 5, 4), "float32")
    geometry = ([3, 3], [0, 1], [1, 1], [1, 1])
    with pytest.raises(Exception, match="must be positive"):
        ops.convert_to_numpy(_compiled_conv_grads(x, dy, geometry, 0)[0])
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        with pytest.raises(tf.errors.InvalidArgumentError, match="one value per"):
            native.tensorflow_ops().keras_dp_conv_kernel_grads(
                x,
                dy,
                kernel_size=[3, 3],
                strides=[1, 1],
                dilations=[1, 1],
                pads=[1],
                keep_grads=True,
            )


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="PyTorch's C library")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/maps")
def test_c_library_shares_pytorch_openmp_threads_with_the_same_results(
    kernel_available,
):
    """On Linux the C library runs its kernels on PyTorch's OpenMP team
    (`native.openmp_parallel`), and gives the numbers it gives on threads
    of its own: noise over many chunks and conv kernel gradients of many
    examples, on two threads each way."""
    import torch

    from keras_dp.backend import torch as torch_backend

    library = native.c_api()
    runner = native.openmp_parallel()
    assert runner is not None

    def results():
        noise = torch.empty(1_000_003)
        library.KerasDpStandardNormalC(3, 4, noise.data_ptr(), noise.numel(), 0, 2)
        rng = np.random.default_rng(0)
        x = torch.as_tensor(rng.standard_normal((33, 9, 9, 5)).astype("float32"))
        dy = torch.as_tensor(rng.standard_normal((33, 7, 7, 6)).astype("float32"))
        norms, grads = torch_backend.compiled_conv_kernel_grads(
            library, x, dy, [3, 3, 1, 1, 1, 1, 0, 0], keep_grads=True
        )
        return noise.numpy(), norms.numpy(), grads.numpy()

    shared = results()
    library.KerasDpSetParallelRunner(None)
    try:
        own = results()
    finally:
        library.KerasDpSetParallelRunner(runner)
    for a, b in zip(shared, own):
        np.testing.assert_array_equal(a, b)
    assert np.isfinite(shared[0]).all() and shared[1].min() > 0
