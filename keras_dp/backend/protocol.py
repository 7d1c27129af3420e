"""What a backend module provides: the `BackendOps` protocol.

keras_dp is written with `keras.ops`, except for the few operations below,
which each Keras backend it supports provides in its own module
(`keras_dp/backend/tensorflow.py`, `keras_dp/backend/jax.py`). Every module
provides every member. Where a framework has no fast version of an
operation, its member still exists and returns None (the caller then uses
its `keras.ops` form) or, for `vectorizable_layers`, changes nothing.

A backend module imports nothing from keras_dp but `keras_dp.native` (the
compiled kernels) and `keras_dp.keras_compat` (Keras internals), so that
everything above can use it without a cycle.

```python
from keras_dp import backend

ops = backend.get_backend_module()   # a module that satisfies BackendOps
(loss, aux), grads = ops.value_and_grad(loss_fn)(params, batch)
```

To add a backend: write `keras_dp/backend/<name>.py` with every member
below, return it from `get_backend_module()`, and run
`tests/test_backend_protocol.py`.
"""

from typing import Any, Callable, ContextManager, Optional, Protocol, Sequence
from typing import runtime_checkable


@runtime_checkable
class BackendOps(Protocol):
    """The members of a keras_dp backend module (see the module docstring).

    Tensors are the backend's own. "None where it cannot run" means the
    caller falls back to its `keras.ops` form, which gives the same values.
    """

    GROUPED_CONV_MIN_POSITIONS: int
    """Fewest output positions for which a stride-1 1-D/2-D convolution's
    per-example kernel gradients come from
    `per_example_conv_kernel_grads` instead of patches (below it patches
    are faster on this framework)."""

    GROUPED_CONV_CHUNK_BYTES: int
    """Bytes of inputs and output gradients per chunk of examples that
    `per_example_conv_kernel_grads` is called on: small chunks stay in
    cache, but too small ones cost more peak memory."""

    CONV_CLIPPED_SUM_FROM_PATCHES: bool
    """Whether conv layers with no more output positions than filters keep
    only the norms of their per-example kernel gradients and take the
    clipped sum from their patches gathered again (less memory where
    gathering is cheap), instead of keeping the gradients."""

    NONFINITE_SUMS_IN_CONDITIONAL: bool
    """Whether the clipped sums that leave out non-finite examples run
    under `ops.cond`, only in steps that have one (else in every step;
    `keras_dp.per_example.clip_factors.sums_leaving_out_nonfinite`)."""

    RUNS_IN_PROGRAM_ORDER: bool
    """Whether every op runs when it is called, in program order (eager
    PyTorch): `after` then returns its tensors as they are, and callers
    skip gathering them."""

    def value_and_grad(self, fn: Callable) -> Callable:
        """`fn(params, *args) -> (value, aux)` becomes
        `g(params, *args) -> ((value, aux), grads)`: the gradient of the
        scalar `value` with respect to `params`, a list of tensors (zeros
        for unconnected ones), with the auxiliary output passed through.

        ```python
        (loss, aux), grads = ops.value_and_grad(loss_fn)(trainable, x)
        ```
        """

    def scan(self, f: Callable, init: Any, xs: Any) -> tuple:
        """`jax.lax.scan` semantics: `f(carry, x) -> (carry, y)` over the
        first axis of the structure `xs`; returns `(carry, ys stacked)`.
        One iteration at a time: only one step's intermediates exist at
        once (microbatches, conv chunks)."""

    def after(self, dependencies: Any, tensors: Any) -> Any:
        """`tensors` (a structure), read only once `dependencies` (a
        structure of tensors) are computed: orders the fast path's
        per-layer work so that one layer's temporaries are freed before
        the next layer's are made."""

    def vectorizable_layers(self, model: Any) -> ContextManager:
        """A context inside which the vmap path can vectorize `model`'s
        per-example step (TensorFlow: recurrent layers of static length
        unrolled); a context that changes nothing where the framework's
        vmap takes every layer as it is."""

    def seeded_random_ops(self) -> ContextManager:
        """A context inside which every `keras.random` draw of a layer is a
        function of its seed tensor (the same seed state, the same
        numbers), as the example-independence check needs (PyTorch:
        Keras's dropout of a layer made without a seed draws from the
        global generator); a context that changes nothing where that
        holds already."""

    def multiply_no_nan(self, x: Any, y: Any) -> Any:
        """`x * y` (broadcast, `y` cast to `x`'s dtype), exactly 0 wherever
        `y` is 0 even where `x` is infinite or NaN: how non-finite
        examples are left out of a clipped sum."""

    def replicas_in_sync(self) -> int:
        """How many replicas each compute a part of the batch (TensorFlow:
        the `tf.distribute` strategy's; 1 where one program sees the whole
        batch)."""

    def replica_id(self) -> Any:
        """This replica's index among `replicas_in_sync()`, in a train
        step (0 where one program sees the whole batch): replica 0 adds
        the noise, once for the whole batch."""

    def per_example_squared_norms(self, x: Any) -> Optional[Any]:
        """Each example's sum of squares, `(n,)` from an `(n, ...)`
        tensor, in one pass over `x`; None where it cannot run."""

    def gather_patches(self, x: Any, index: Any) -> Optional[Any]:
        """Conv patches `x[:, index]`, zeros where `index` is -1, without a
        padded copy of the input; None where it cannot run.

        `x`: (n, P, C), a conv layer's input with its positions flattened;
        `index`: static (T, K) integers, each output position's input
        positions. Returns (n, T, K, C)."""

    def per_example_conv_kernel_grads(
        self,
        x: Any,
        dy: Any,
        kernel_size: Sequence[int],
        dilation: Sequence[int],
        pads: Sequence[tuple],
    ) -> Any:
        """Per-example kernel gradients of a stride-1 1-D/2-D convolution,
        without patches.

        `x`: (n, *in_spatial, C) inputs; `dy`: (n, *out_spatial, F) output
        gradients; `pads`: the (before, after) zeros the convolution reads
        on each spatial axis. Returns (n, F, K * C), the columns ordered
        like the kernel's (taps, C) rows."""

    def per_example_conv_kernel_norms(
        self,
        x: Any,
        dy: Any,
        kernel_size: Sequence[int],
        strides: Sequence[int],
        dilation: Sequence[int],
        pads: Sequence[tuple],
        keep_grads: bool,
    ) -> Optional[tuple]:
        """`(squared_norms (n,), grads)` of a 2-D convolution's per-example
        kernel gradients, read in place from the inputs and output
        gradients by keras_dp's compiled kernel; `grads` is (n, F, K * C)
        (columns like the kernel's (taps, C) rows) when `keep_grads`, else
        None. Any stride and dilation; 1-D convolutions come as 2-D.
        None where it cannot run (no compiled kernel, another device,
        dtype or rank)."""

    def conv_kernel_grad(
        self,
        x: Any,
        dy: Any,
        kernel_size: Sequence[int],
        strides: Sequence[int],
        dilation: Sequence[int],
        pads: Sequence[tuple],
    ) -> Any:
        """The kernel gradient of a convolution summed over the batch,
        (K * C, F), rows ordered like the kernel's (taps, C). With `dy`
        scaled by the clip factors: the clipped sum of a layer whose
        per-example gradients were not kept."""

    def standard_normal(self, shape: Sequence[int], seed: Any) -> Any:
        """Standard normal float32 numbers of `shape` from `seed` (a
        `keras.random.SeedGenerator`, advanced once): the DP noise.

        ```python
        noise = stddev * ops.standard_normal((n,), seed_generator)
        ```
        """

    def noisy_gradients(
        self,
        grads: Sequence[Any],
        stddev: Any,
        seed: Any,
    ) -> Optional[list]:
        """`[g + stddev * z]` with `z` one flat `standard_normal(total
        size, seed)` draw split over `grads` in order, as one pass that
        adds the noise while drawing it; None where it cannot run (the
        caller then draws with `standard_normal` and adds)."""

    def secure_standard_normal(self, shape: Sequence[int], seed: Any) -> Any:
        """Secure mode's standard normal float32 numbers of `shape` (the
        sampler of `keras_dp.secure_noise`) by keras_dp's compiled kernel,
        keyed by fresh operating-system entropy (`seed`, the noise seed
        generator, advanced once); None where the kernel cannot run (the
        caller then draws from `os_random_bits`)."""

    def secure_noisy_gradients(
        self, grads: Sequence[Any], stddev: Any, seed: Any
    ) -> Optional[list]:
        """`noisy_gradients` with secure mode's sampler and key; None where
        it cannot run."""

    def os_random_bits(self, shape: Sequence[int], seed: Any) -> Any:
        """Integers uniform on `[0, 2^32)` of static `shape` (uint32, or
        int64 where the framework lacks uint32 ops), from a generator keyed
        afresh by the operating system's cryptographic entropy at every
        call inside a step: secure mode's noise words
        (`keras_dp.secure_noise`). `seed` is the optimizer's noise seed
        generator (advanced once); nothing that keys the draw is saved.
        """

    def os_entropy(self, seed: Any) -> ContextManager:
        """A context around one call of the compiled train function in
        secure mode: where the step cannot read the OS entropy itself
        (TensorFlow), it loads fresh entropy for `os_random_bits` on entry
        and wipes it on exit; elsewhere it changes nothing."""


def member_names():
    """The names of `BackendOps`' members, sorted."""
    names = set(BackendOps.__annotations__)
    names |= {
        name
        for name, value in vars(BackendOps).items()
        if callable(value) and not name.startswith("_")
    }
    return sorted(names)
