"""Backend-specific pieces of the private train step: one module per backend.

Each module provides `value_and_grad(fn)` (gradient of a scalar function with
respect to its first argument, a list of tensors, with an auxiliary output),
`scan(f, init, xs)` (`jax.lax.scan` semantics), `after(dependencies,
tensors)` (tensors read only once the dependencies are computed) and
`train_step(model, ...)`, the private replacement for its trainer's
`train_step`. Each also provides `per_example_conv_kernel_grads(x, dy,
kernel_size, dilation, pads)` (the fast path's kernel gradients of stride-1
convolutions, without patches) with `GROUPED_CONV_MIN_POSITIONS` and
`GROUPED_CONV_CHUNK_BYTES`, where on its framework that is faster than
patches, and `standard_normal(shape, seed)`, the DP optimizers' noise
sampler; a module may add `noisy_gradients(grads, stddev, seed)`, the
gradients plus that sampler's flat draw in one fused kernel, and
`gather_patches(x, index)`, conv patches with the padding's zeros read
from the index, and `per_example_conv_kernel_norms(x, dy, kernel_size,
strides, dilation, pads, keep_grads)`, a 2-D conv's per-example kernel
gradients' squared norms (and the gradients) without patches, with
`conv_kernel_grad(...)`, the batch's summed kernel gradient (each None
where it cannot run). Everything else lives in backend-agnostic modules.
"""

import keras

SUPPORTED_BACKENDS = ("tensorflow", "jax")


def get_backend_module():
    name = keras.backend.backend()
    if name == "tensorflow":
        from keras_dp.backend import tensorflow as module
    elif name == "jax":
        from keras_dp.backend import jax as module
    else:
        raise NotImplementedError(
            f"keras_dp does not support the {name!r} Keras backend yet; "
            f"supported backends: {', '.join(SUPPORTED_BACKENDS)}. Set the "
            "environment variable KERAS_BACKEND=jax or "
            "KERAS_BACKEND=tensorflow before importing keras."
        )
    return module
