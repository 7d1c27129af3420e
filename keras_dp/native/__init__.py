"""keras_dp's compiled CPU kernels (noise, conv gradients), built on first use.

On a CPU the Gaussian noise is most of what a DP step adds to a small
model's step, and the frameworks' own samplers do more work per number
than needed (JAX hashes one Threefry block per number, TensorFlow's kernel
transforms one pair at a time). `noise.h` gets two numbers from each hash
and transforms them in vectorised blocks (Threefry-2x32 counters and a
Box-Muller transform; its header comment gives the exact recipe), which
is faster even on one core. This module compiles it with the system's C++
compiler the first time a DP step needs noise on a CPU, as a JAX FFI
handler or TensorFlow ops, and caches the library:

- in `$KERAS_DP_CACHE_DIR`, else `$XDG_CACHE_HOME/keras_dp`, else
  `~/.cache/keras_dp`, under a name that hashes the sources, the compiler,
  the flags, the platform and the framework's version (a new TensorFlow or
  jaxlib gets a fresh build);
- with `$CXX` as the compiler if set, else `c++`, `g++` or `clang++`.

A build runs once per cache key, the first time it is needed. When
it fails (no compiler, no framework headers), keras_dp warns once and
draws the noise with the framework's own random ops: the same
distribution, other numbers, a slower step. `KERAS_DP_NATIVE=0` skips the
kernel (and the warning). Accelerators never use it: there the
framework's own sampler is fast. The setting is read when a train step is
traced: a model keeps the sampler it was traced with.

On PyTorch the noise comes from a third, plain C library (`c_api.cc`,
no framework headers) called through ctypes on the tensors' buffers
(`c_api()`); the same key gives the same numbers as on the other two.

The three libraries also hold the fast path's per-example conv kernel
gradients (`conv_grads.h`: `KerasDpConvKernelGrads`, a TensorFlow op,
an XLA FFI handler and a C function): a 1-D/2-D conv's per-example kernel
gradients and their norms, computed in place from the layer's inputs and
output gradients with no patches (`per_example_conv_kernel_norms` in
`keras_dp.backend.tensorflow`, `.jax` and `.torch`). The TensorFlow library has
`KerasDpConvPatches` too, conv patches with the padding's zeros written
in the same pass (`gather_patches`), for the layers that still use
patches (ghost norms, 3-D). Without the library the fast path uses the
framework's ops: patches or grouped convolutions.
"""

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings

_SOURCE_DIR = os.path.dirname(os.path.abspath(__file__))
_HEADERS = ("noise.h", "chunks.h", "conv_grads.h")
# -fno-math-errno and -fno-trapping-math let the compiler vectorise the
# transform (sqrt without errno, comparisons as masks); nothing here reads
# errno or floating-point exceptions.
_FLAGS = (
    "-std=c++17",
    "-O3",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-fPIC",
    "-shared",
)

_lock = threading.Lock()
_loaded = {}


def enabled():
    """False when `KERAS_DP_NATIVE=0`: the framework's sampler is used."""
    return os.environ.get("KERAS_DP_NATIVE", "1") != "0"


def cache_dir():
    root = os.environ.get("KERAS_DP_CACHE_DIR")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
            os.path.expanduser("~"), ".cache"
        )
        root = os.path.join(base, "keras_dp")
    return os.path.join(root, "native")


def _compiler():
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    raise RuntimeError("no C++ compiler found (set CXX, or install g++ or clang++)")


def build(name, source, compile_flags=(), link_flags=(), version=""):
    """Compiles `source` (in this directory) into a shared library in the
    cache, unless an identical build is there; returns its path."""
    compiler = _compiler()
    digest = hashlib.sha256()
    for part in (source,) + _HEADERS:
        with open(os.path.join(_SOURCE_DIR, part), "rb") as f:
            digest.update(f.read())
    flags = list(_FLAGS) + ["-I", _SOURCE_DIR] + list(compile_flags)
    host = [sys.platform, platform.machine()]
    for part in [compiler, version] + host + flags + list(link_flags):
        digest.update(part.encode() + b"\0")
    filename = f"{name}-{digest.hexdigest()[:16]}.so"
    directory = cache_dir()
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError:  # a read-only home: this user's temporary directory
        directory = os.path.join(
            tempfile.gettempdir(), f"keras_dp-{os.getuid()}", "native"
        )
        os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, filename)
    if os.path.exists(path):
        return path
    # Built under a name of its own, then renamed: two processes building
    # at once (the test suite runs both backends at once) never load a
    # half-written library.
    partial = f"{path}.{os.getpid()}.{threading.get_ident()}.partial"
    command = (
        [compiler]
        + flags
        + ["-o", partial, os.path.join(_SOURCE_DIR, source)]
        + list(link_flags)
    )
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        if os.path.exists(partial):
            os.remove(partial)
        errors = [line for line in result.stderr.splitlines() if "error" in line]
        raise RuntimeError(
            f"`{' '.join(command)}` failed: "
            + ("; ".join(errors[:3]) or result.stderr[-500:])
        )
    os.replace(partial, path)
    return path


def _load(framework, loader):
    """`loader()`'s result, once per process; None (with one warning)
    if the kernel is switched off or cannot be built."""
    if not enabled():
        return None
    with _lock:
        if framework not in _loaded:
            try:
                _loaded[framework] = loader()
            except Exception as error:  # any build or load failure
                _loaded[framework] = None
                warnings.warn(
                    f"keras_dp could not build its compiled noise kernel for "
                    f"{framework} ({error}). DP steps on the CPU draw their "
                    f"noise with {framework}'s own random ops instead: the "
                    "same distribution, other numbers, a slower step on "
                    "small models. Install a C++17 compiler (g++ or "
                    "clang++) to get the kernel, or set KERAS_DP_NATIVE=0 "
                    "to use the framework's ops without this warning.",
                    stacklevel=4,
                )
        return _loaded[framework]


JAX_TARGET = "keras_dp_standard_normal"
JAX_CONV_TARGET = "keras_dp_conv_kernel_grads"


def _load_jax():
    import ctypes

    import jax
    import jax.ffi
    import jaxlib

    path = build(
        "jax_ffi",
        "jax_ffi.cc",
        compile_flags=["-I", jax.ffi.include_dir()],
        version=f"jaxlib {jaxlib.__version__}",
    )
    library = ctypes.cdll.LoadLibrary(path)
    jax.ffi.register_ffi_target(
        JAX_TARGET,
        jax.ffi.pycapsule(library.KerasDpStandardNormal),
        platform="cpu",
    )
    jax.ffi.register_ffi_target(
        JAX_CONV_TARGET,
        jax.ffi.pycapsule(library.KerasDpConvKernelGrads),
        platform="cpu",
    )
    return JAX_TARGET


def jax_target():
    """The name of the registered noise XLA FFI target (CPU only), or None.
    Where it is registered, so is `JAX_CONV_TARGET` (the conv kernel
    gradients), from the same library."""
    return _load("JAX", _load_jax)


def _load_tensorflow():
    import tensorflow as tf

    path = build(
        "tf_ops",
        "tf_ops.cc",
        compile_flags=tf.sysconfig.get_compile_flags(),
        link_flags=tf.sysconfig.get_link_flags(),
        version=f"tensorflow {tf.__version__}",
    )
    return tf.load_op_library(path)


def tensorflow_ops():
    """The loaded TensorFlow op module (`keras_dp_standard_normal`,
    `keras_dp_noisy_gradients`, `keras_dp_conv_kernel_grads`,
    `keras_dp_conv_patches`), or None."""
    return _load("TensorFlow", _load_tensorflow)


def _load_c_api():
    import ctypes

    path = build("c_api", "c_api.cc", link_flags=["-pthread"])
    library = ctypes.cdll.LoadLibrary(path)
    u32, i32, i64, ptr = (
        ctypes.c_uint32,
        ctypes.c_int32,
        ctypes.c_int64,
        ctypes.c_void_p,
    )
    library.KerasDpStandardNormalC.argtypes = [u32, u32, ptr, i64, i32, i32]
    library.KerasDpStandardNormalC.restype = None
    library.KerasDpNoisyGradientsC.argtypes = [
        u32,
        u32,
        i64,
        ptr,
        ptr,
        ptr,
        ctypes.c_float,
        i32,
        i32,
    ]
    library.KerasDpNoisyGradientsC.restype = None
    library.KerasDpConvKernelGradsC.argtypes = [ptr] * 7 + [i32, i32]
    library.KerasDpConvKernelGradsC.restype = ctypes.c_char_p
    library.KerasDpSetParallelRunner.argtypes = [ptr]
    library.KerasDpSetParallelRunner.restype = None
    library.KerasDpSetParallelRunner(openmp_parallel())
    return library


def openmp_parallel():
    """The address of `GOMP_parallel` in the OpenMP runtime loaded in this
    process (PyTorch's ATen runs its CPU ops on it), or None.

    The C library's kernels share their work with that runtime's threads
    instead of starting threads of their own: after each parallel op
    those threads spin for a while on the cores, waiting for the next, and
    threads of keras_dp's own would compete with them for the cores. Linux
    only (the runtime is found in `/proc/self/maps`); elsewhere, or without
    one, the kernels start their own threads.
    """
    import ctypes
    import re

    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return None
    paths = set(re.findall(r"(/\S*/lib(?:gomp|iomp5)[^/\s]*\.so[^/\s]*)", maps))
    # PyTorch's own first, where other libraries brought another.
    for path in sorted(paths, key=lambda path: ("torch" not in path, path)):
        try:
            runtime = ctypes.CDLL(path)
            return ctypes.cast(runtime.GOMP_parallel, ctypes.c_void_p).value
        except (OSError, AttributeError):
            continue
    return None


def c_api():
    """The plain C library (`c_api.cc`: `KerasDpStandardNormalC`,
    `KerasDpNoisyGradientsC`, `KerasDpConvKernelGradsC`, called through
    ctypes on CPU buffers, as PyTorch does), or None. It needs no
    framework headers."""
    return _load("PyTorch", _load_c_api)
