"""The few operations keras_dp writes per framework: one module per backend.

`keras_dp/backend/tensorflow.py`, `jax.py` and `torch.py` each provide
every member of `keras_dp.backend.protocol.BackendOps` (gradients, a scan,
ordering, the fast path's conv kernels, the noise sampler...); everything
else in keras_dp is written with `keras.ops`. Backend modules import
nothing from keras_dp but `keras_dp.native` and `keras_dp.keras_compat`.

```python
from keras_dp import backend

ops = backend.get_backend_module()
noise = ops.standard_normal((10,), keras.random.SeedGenerator(0))
```
"""

import keras

SUPPORTED_BACKENDS = ("tensorflow", "jax", "torch")


def get_backend_module():
    """The module of the current Keras backend: a module that satisfies
    `keras_dp.backend.protocol.BackendOps` (every member there exists).

    Raises NotImplementedError for a backend keras_dp does not support.
    """
    name = keras.backend.backend()
    if name == "tensorflow":
        from keras_dp.backend import tensorflow as module
    elif name == "jax":
        from keras_dp.backend import jax as module
    elif name == "torch":
        from keras_dp.backend import torch as module
    else:
        raise NotImplementedError(
            f"keras_dp does not support the {name!r} Keras backend yet; "
            f"supported backends: {', '.join(SUPPORTED_BACKENDS)}. Set the "
            "environment variable KERAS_BACKEND to one of them before "
            "importing keras."
        )
    return module
