"""Brute-force references for the per-example tests. Does not use keras_dp.

Per-example gradients are computed one example at a time (a plain Python
loop), each with the backend's own autodiff on a batch of one:
`tf.GradientTape` around `model(x_i, training=True)` on TensorFlow,
`jax.grad` over `model.stateless_call(...)` on JAX, `torch.autograd.grad`
after `model(x_i, training=True)` on PyTorch.

The per-example loss is `loss_fn(y_i, model(x_i), w_i)` (the compiled loss
on a batch of one; `loss_fn` is given explicitly, e.g. a `keras.losses.Loss`)
plus the layers' activity-regularization and `add_loss` losses of that call.
Weight regularizers are *not* part of it (they are data-independent and
added once, unclipped): they are switched off while the per-example
gradients are taken, and their gradient is computed separately by
`regularization_gradients`. An example whose sample weights are all zero
contributes nothing (gradient exactly zero), as keras_dp documents.

Clip factors follow docs/algorithms.md, "Clip factors".
"""

import contextlib
import inspect
import weakref

import keras
import numpy as np
from keras import tree

FLAT_EPSILON = 1e-6  # docs/algorithms.md, "Clip factors"
AUTO_GAMMA = 0.01  # AUTO-S (docs/algorithms.md, "Clip factors")


# ---------------------------------------------------------------- clip factors


def flat_factors(norms, C):
    norms = np.asarray(norms, dtype="float64")
    return np.minimum(1.0, C / (norms + FLAT_EPSILON))


def auto_factors(norms, R):
    norms = np.asarray(norms, dtype="float64")
    return R / (norms + AUTO_GAMMA)


def global_factors(norms, R, Z=None):
    norms = np.asarray(norms, dtype="float64")
    Z = R if Z is None else Z
    return np.where(norms <= Z, R / Z, 0.0)


def clip_factors(norms, clipping, C, Z=None):
    if clipping == "flat":
        return flat_factors(norms, C)
    if clipping == "auto":
        return auto_factors(norms, C)
    if clipping == "global":
        return global_factors(norms, C, Z)
    raise ValueError(f"unknown clipping {clipping!r}")


# ------------------------------------------------------ per-example gradients


def _row(structure, i):
    return tree.map_structure(lambda a: np.asarray(a)[i : i + 1], structure)


def _num_rows(x):
    return int(np.asarray(tree.flatten(x)[0]).shape[0])


def _call_kwargs(model):
    params = inspect.signature(model.call).parameters
    return {"training": True} if "training" in params else {}


@contextlib.contextmanager
def _without_weight_regularizers(model):
    saved = [(v, v.regularizer) for v in model.trainable_weights]
    for v, _ in saved:
        v.regularizer = None
    try:
        yield
    finally:
        for v, r in saved:
            v.regularizer = r


def _all_zero(w):
    return w is not None and all(
        not np.any(np.asarray(a) != 0) for a in tree.flatten(w)
    )


def _grads_tensorflow(model, x, y, w, loss_fn):
    import tensorflow as tf

    kwargs = _call_kwargs(model)
    with tf.GradientTape() as tape:
        y_pred = model(x, **kwargs)
        loss = tf.cast(loss_fn(y, y_pred, w), "float32")
        for extra in model.losses:
            loss = loss + tf.reduce_sum(tf.cast(extra, "float32"))
    grads = tape.gradient(
        loss,
        model.trainable_variables,
        unconnected_gradients=tf.UnconnectedGradients.ZERO,
    )
    # Embedding gradients come back as IndexedSlices.
    return [np.asarray(tf.convert_to_tensor(g), dtype="float64") for g in grads]


def _grads_torch(model, x, y, w, loss_fn):
    import torch

    kwargs = _call_kwargs(model)
    variables = model.trainable_variables
    with torch.enable_grad():
        y_pred = model(x, **kwargs)
        loss = loss_fn(y, y_pred, w).to(torch.float32)
        for extra in model.losses:
            loss = loss + torch.sum(extra.to(torch.float32))
        grads = torch.autograd.grad(
            loss, [v.value for v in variables], allow_unused=True
        )
    return [
        np.zeros(tuple(v.shape))
        if g is None
        else g.detach().cpu().to(torch.float64).numpy()
        for v, g in zip(variables, grads)
    ]


def _jax_grad_fn(model, loss_fn):
    """`jax.grad` of one example's loss (jitted: one trace, reused per row)."""
    import jax
    import jax.numpy as jnp

    kwargs = _call_kwargs(model)

    def loss_of(params, non_trainable, x, y, w):
        y_pred, _, losses = model.stateless_call(
            params, non_trainable, x, return_losses=True, **kwargs
        )
        loss = jnp.asarray(loss_fn(y, y_pred, w), dtype="float32")
        for extra in losses:
            loss = loss + jnp.sum(jnp.asarray(extra, dtype="float32"))
        return loss

    grad = jax.jit(jax.grad(loss_of))

    def grads_of(model, x, y, w, loss_fn):
        trainable = [jnp.asarray(v.value) for v in model.trainable_variables]
        non_trainable = [jnp.asarray(v.value) for v in model.non_trainable_variables]
        grads = grad(trainable, non_trainable, x, y, w)
        return [np.asarray(g, dtype="float64") for g in grads]

    return grads_of


_JAX_GRAD_FNS = weakref.WeakKeyDictionary()


def per_example_gradients(model, x, y, loss_fn, sample_weight=None):
    """Data gradient of each example, one call per example.

    Returns a list (one entry per row) of lists of float64 numpy arrays in
    `model.trainable_variables` order.
    """
    if keras.backend.backend() == "jax":
        cache = _JAX_GRAD_FNS.setdefault(model, {})
        if loss_fn not in cache:
            cache[loss_fn] = _jax_grad_fn(model, loss_fn)
        grad_fn = cache[loss_fn]
    elif keras.backend.backend() == "torch":
        grad_fn = _grads_torch
    else:
        grad_fn = _grads_tensorflow
    # Eager calls may move non-trainable state (seeds, counters): restore it.
    saved = [np.array(v.numpy()) for v in model.non_trainable_variables]
    shapes = [tuple(v.shape) for v in model.trainable_variables]
    out = []
    try:
        with _without_weight_regularizers(model):
            for i in range(_num_rows(x)):
                w = None if sample_weight is None else _row(sample_weight, i)
                if _all_zero(w):
                    out.append([np.zeros(s) for s in shapes])
                    continue
                out.append(grad_fn(model, _row(x, i), _row(y, i), w, loss_fn))
    finally:
        for v, value in zip(model.non_trainable_variables, saved):
            v.assign(value)
    return out


def regularization_gradients(model):
    """Gradient of the weight-regularization penalty (no data)."""
    variables = model.trainable_variables
    shapes = [tuple(v.shape) for v in variables]
    regularized = [k for k, v in enumerate(variables) if v.regularizer]
    grads = [np.zeros(s) for s in shapes]
    if not regularized:
        return grads
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            total = tf.add_n(
                [
                    tf.cast(variables[k].regularizer(variables[k].value), "float32")
                    for k in regularized
                ]
            )
        values = tape.gradient(total, [variables[k].value for k in regularized])
    elif backend == "torch":
        import torch

        with torch.enable_grad():
            params = [variables[k].value for k in regularized]
            total = sum(
                variables[k].regularizer(p).to(torch.float32)
                for k, p in zip(regularized, params)
            )
            values = torch.autograd.grad(total, params)
        values = [g.detach().cpu().numpy() for g in values]
    else:
        import jax

        def total(params):
            return sum(variables[k].regularizer(p) for k, p in zip(regularized, params))

        values = jax.grad(total)([variables[k].value for k in regularized])
    for k, g in zip(regularized, values):
        grads[k] = np.asarray(g, dtype="float64")
    return grads


def norms_of(per_example):
    """L2 norm of each example's full gradient (all variables)."""
    return np.array(
        [np.sqrt(sum(np.sum(g**2) for g in grads)) for grads in per_example]
    )


def clipped_reference(
    model,
    x,
    y,
    loss_fn,
    clipping,
    C,
    Z=None,
    sample_weight=None,
    per_example=None,
):
    """Everything about one DP-SGD step with sigma = 0.

    Returns a dict with `per_example` (gradients), `norms`, `factors`,
    `batch_size` (B, the row count), `clipped_mean` (`(1/B) sum_i c_i g_i`),
    `regularization` (weight-regularizer gradient) and `update`
    (`-clipped_mean - regularization`, the change of the weights under
    SGD with learning rate 1). `per_example`: gradients already computed by
    `per_example_gradients` for the same arguments, to reuse.
    """
    if per_example is None:
        per_example = per_example_gradients(model, x, y, loss_fn, sample_weight)
    norms = norms_of(per_example)
    factors = clip_factors(norms, clipping, C, Z)
    B = _num_rows(x)
    clipped_mean = [
        sum(c * grads[k] for c, grads in zip(factors, per_example)) / B
        for k in range(len(model.trainable_variables))
    ]
    regularization = regularization_gradients(model)
    update = [-(m + r) for m, r in zip(clipped_mean, regularization)]
    return {
        "per_example": per_example,
        "norms": norms,
        "factors": factors,
        "batch_size": B,
        "clipped_mean": clipped_mean,
        "regularization": regularization,
        "update": update,
    }


def expected_sgd_update(
    model,
    x,
    y,
    loss_fn,
    clipping,
    C,
    Z=None,
    sample_weight=None,
    per_example=None,
):
    """Weight change of one DPSGD(learning_rate=1, sigma=0) step.

    `-(1/B) sum_i c_i g_i - grad(weight regularization)` per trainable
    variable, as float64 numpy arrays; B is the number of rows.
    """
    return clipped_reference(
        model, x, y, loss_fn, clipping, C, Z, sample_weight, per_example
    )["update"]


# ------------------------------------------------------------ test helpers


def step_update(model, x, y, **train_kwargs):
    """Weight change of one `train_on_batch`, float64, per trainable var."""
    before = [np.array(v.numpy(), dtype="float64") for v in model.trainable_variables]
    model.train_on_batch(x, y, **train_kwargs)
    return [
        np.array(v.numpy(), dtype="float64") - b
        for v, b in zip(model.trainable_variables, before)
    ]


def assert_updates_close(actual, expected, rtol=1e-5):
    """Equal up to float32 rounding: atol = rtol * the update's scale."""
    scale = max(float(np.max(np.abs(e))) for e in expected)
    assert scale > 0, "the reference update is zero: the test would be vacuous"
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=0, atol=rtol * scale)


def split_threshold(norms):
    """A threshold strictly between the lower and upper half of `norms`."""
    s = np.sort(norms)
    return float((s[len(s) // 2 - 1] + s[len(s) // 2]) / 2)
