"""Tests of `keras_dp.LowRankSparse` (RGP / LSG, docs/algorithms.md).

References are brute force and written here in numpy: the projection
`P_L G + G P_R - P_L G P_R`, per-example gradients from one
`GradientTape` / `jax.grad` / `torch.autograd.grad` call per example, the
clip factors of flat clipping, and the support sizes
`ceil((1 - sparsity) * size)`. Everything is seeded.
"""

import math
import os

import keras
import numpy as np
import pytest
from keras import ops

import keras_dp
from keras_dp import accounting

FLAT_EPSILON = 1e-6  # flat clipping: c_i = min(1, C / (||g_i|| + 1e-6))


# ----------------------------------------------------------------- helpers


def _np(t):
    return np.asarray(ops.convert_to_numpy(t), dtype="float64")


def _mlp(in_dim=6, hidden=5, out=3, seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((in_dim,)),
            keras.layers.Dense(hidden, activation="tanh", name="d1"),
            keras.layers.Dense(out, name="head"),
        ]
    )


def _mixed_model(seed=0):
    """EinsumDense (3-d kernel, matrix view (4, 6)), Conv2D (view (54, 4))
    and Dense kernels, plus biases.

    (Conv2D before Reshape + EinsumDense is avoided: TensorFlow's
    `tf.vectorized_map` aborts on that graph, with or without keras_dp.)
    """
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6, 6, 4))
    h = keras.layers.EinsumDense(
        "bxyc,cnh->bxynh", output_shape=(6, 6, 2, 3), bias_axes="nh", name="ein"
    )(inputs)
    h = keras.layers.Reshape((6, 6, 6))(h)
    h = keras.layers.Conv2D(4, 3, activation="tanh", name="conv")(h)
    h = keras.layers.Flatten()(h)
    outputs = keras.layers.Dense(3, name="head")(h)
    return keras.Model(inputs, outputs)


def _data(n, in_shape, classes=3, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.randn(n, *in_shape).astype("float32")
    y = rng.randint(0, classes, size=n).astype("int32")
    return x, y


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _carrier_arrays(model):
    """`[(L, R, mask_L, mask_R)]` of each wrapped kernel, as numpy."""
    return [tuple(_np(v) for v in c.variables) for c in model._carriers]


def _orthonormal(rng, rows, cols):
    q, _ = np.linalg.qr(rng.randn(rows, cols))
    return q


def _projection(G, L, R):
    PL, PR = L @ L.T, R.T @ R
    return PL @ G + G @ PR - PL @ G @ PR


def _per_example_gradients(model, x, y, loss_fn):
    """One autodiff call per example (no vectorization), float64 numpy."""
    out = []
    if keras.backend.backend() == "jax":
        import jax
        import jax.numpy as jnp

        def loss_of(params, non_trainable, xi, yi):
            y_pred, _ = model.stateless_call(params, non_trainable, xi)
            return jnp.asarray(loss_fn(yi, y_pred), "float32")

        grad = jax.grad(loss_of)
        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]
        for i in range(len(x)):
            g = grad(trainable, non_trainable, x[i : i + 1], y[i : i + 1])
            out.append([np.asarray(a, "float64") for a in g])
    elif keras.backend.backend() == "torch":
        import torch

        variables = model.trainable_variables
        for i in range(len(x)):
            with torch.enable_grad():
                loss = loss_fn(y[i : i + 1], model(x[i : i + 1]))
                g = torch.autograd.grad(
                    loss, [v.value for v in variables], allow_unused=True
                )
            out.append(
                [
                    np.zeros(tuple(v.shape))
                    if a is None
                    else a.detach().cpu().to(torch.float64).numpy()
                    for v, a in zip(variables, g)
                ]
            )
    else:
        import tensorflow as tf

        for i in range(len(x)):
            with tf.GradientTape() as tape:
                loss = loss_fn(y[i : i + 1], model(x[i : i + 1]))
            g = tape.gradient(loss, model.trainable_variables)
            out.append([np.asarray(a, "float64") for a in g])
    return out


def _private(model, sigma, lr=1.0, clip=1.0, loss=None, **opt_kwargs):
    model = keras_dp.make_private(model)
    model.compile(
        optimizer=keras_dp.DPSGD(
            learning_rate=lr,
            noise_multiplier=sigma,
            l2_norm_clip=clip,
            seed=0,
            **opt_kwargs,
        ),
        loss=loss or _loss(),
    )
    return model


def _weights(model):
    return [_np(v) for v in model.trainable_variables]


# ---------------------------------------------- projection / reconstruction


@pytest.mark.parametrize("builder,in_shape", [(_mlp, (6,)), (_mixed_model, (6, 6, 4))])
def test_reconstruction_is_the_idempotent_projection(builder, in_shape):
    inner = builder()
    model = keras_dp.LowRankSparse(inner, rank=2, sparsity=0.0, seed=3)
    rng = np.random.RandomState(1)
    # Replace the carriers by our own orthonormal ones, masks of ones.
    position = {id(v): k for k, v in enumerate(model.non_trainable_variables)}
    non_trainable = [v.value for v in model.non_trainable_variables]
    mine = {}
    for c in model._carriers:
        L = _orthonormal(rng, c.p, c.rank)
        R = _orthonormal(rng, c.d, c.rank).T
        mine[id(c.kernel)] = (c, L, R)
        for var, value in zip(
            c.variables, (L, R, np.ones((c.p, c.rank)), np.ones((c.rank, c.d)))
        ):
            non_trainable[position[id(var)]] = ops.convert_to_tensor(
                value.astype("float32")
            )
    assert len(mine) == (3 if builder is _mixed_model else 2)
    space = model.private_gradient_space(non_trainable)

    batch = 4
    grads = [
        rng.randn(batch, *v.shape).astype("float32") for v in model.trainable_variables
    ]
    parts = space.project([ops.convert_to_tensor(g) for g in grads])
    summed = [[ops.sum(p, axis=0) for p in variable_parts] for variable_parts in parts]
    rebuilt = [_np(t) for t in space.reconstruct(summed)]

    for var, g, got in zip(model.trainable_variables, grads, rebuilt):
        assert got.shape == tuple(var.shape)
        if id(var) not in mine:
            np.testing.assert_allclose(got, g.sum(0), rtol=1e-5, atol=1e-5)
            continue
        c, L, R = mine[id(var)]
        expected = sum(
            _projection(g[i].astype("float64").reshape(c.p, c.d), L, R)
            for i in range(batch)
        ).reshape(var.shape)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
        # Not the identity: the test would notice a space that does nothing.
        assert np.abs(expected - g.sum(0)).max() > 1e-2

    # Idempotent: projecting the reconstruction again changes nothing.
    again_parts = space.project(
        [ops.convert_to_tensor(r[None].astype("float32")) for r in rebuilt]
    )
    again = space.reconstruct(
        [[p[0] for p in variable_parts] for variable_parts in again_parts]
    )
    for first, second in zip(rebuilt, again):
        np.testing.assert_allclose(_np(second), first, rtol=1e-4, atol=1e-4)


# -------------------------------------------------------------- carriers


def _assert_orthonormal(model):
    for L, R, _, _ in _carrier_arrays(model):
        r = L.shape[1]
        np.testing.assert_allclose(L.T @ L, np.eye(r), atol=1e-5)
        np.testing.assert_allclose(R @ R.T, np.eye(r), atol=1e-5)


def _assert_same_carriers(actual, expected, atol=1e-5):
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, _np(b), atol=atol)


def test_carriers_orthonormal_after_init():
    model = keras_dp.LowRankSparse(_mixed_model(), rank=3, sparsity=0.3)
    assert len(model._carriers) == 3
    _assert_orthonormal(model)
    # The carriers are those of the current weights at refresh index 0.
    _assert_same_carriers(
        _carrier_arrays(model),
        model._carrier_values(
            [v.value for v in model.trainable_variables], ops.convert_to_tensor(0)
        ),
    )


def test_carriers_are_a_function_of_weights_and_refresh_index_only():
    model = keras_dp.LowRankSparse(_mlp(), rank=2, sparsity=0.5, refresh_every=3)
    weights = [v.value for v in model.trainable_variables]
    first = model._carrier_values(weights, ops.convert_to_tensor(5))
    second = model._carrier_values(weights, ops.convert_to_tensor(5))
    _assert_same_carriers([[_np(t) for t in c] for c in first], second, atol=0)
    # A new refresh index draws new public randomness.
    other = model._carrier_values(weights, ops.convert_to_tensor(6))
    assert np.abs(_np(first[0][0]) - _np(other[0][0])).max() > 1e-3

    # after_private_update: the new carriers depend on the released weights
    # and the step count, not on the old carriers or any other state.
    position = {id(v): k for k, v in enumerate(model.non_trainable_variables)}
    nt = [v.value for v in model.non_trainable_variables]
    nt[position[id(model._refresh_count)]] = ops.convert_to_tensor(14, "int32")
    garbage = list(nt)
    for c in model._carriers:
        for var in c.variables:
            garbage[position[id(var)]] = ops.ones(var.shape) * 7.0
    update = ops.convert_to_tensor(True)
    out_a = model.after_private_update(weights, nt, update)
    out_b = model.after_private_update(weights, garbage, update)
    assert int(_np(out_a[position[id(model._refresh_count)]])) == 15
    for c in model._carriers:
        for var in c.variables:
            np.testing.assert_array_equal(
                _np(out_a[position[id(var)]]), _np(out_b[position[id(var)]])
            )
    _assert_same_carriers(
        [[_np(out_a[position[id(v)]]) for v in c.variables] for c in model._carriers],
        model._carrier_values(weights, ops.convert_to_tensor(5)),
    )
    # Not a refresh step: old carriers are kept.
    garbage[position[id(model._refresh_count)]] = ops.convert_to_tensor(15, "int32")
    kept = model.after_private_update(weights, garbage, update)
    for c in model._carriers:
        for var in c.variables:
            np.testing.assert_array_equal(_np(kept[position[id(var)]]), 7.0)
    # An accumulation micro-step (no update) neither counts nor refreshes,
    # even when the count is at a refresh point.
    garbage[position[id(model._refresh_count)]] = ops.convert_to_tensor(14, "int32")
    held = model.after_private_update(weights, garbage, ops.convert_to_tensor(False))
    assert int(_np(held[position[id(model._refresh_count)]])) == 14
    for c in model._carriers:
        for var in c.variables:
            np.testing.assert_array_equal(_np(held[position[id(var)]]), 7.0)


def test_carriers_do_not_depend_on_the_batch():
    """Same weights, different data: identical carriers after refreshes.

    With learning rate 0 the released weights never move, so two models
    trained on different data must end with the same carriers and supports;
    any dependence on the batch would show.
    """
    results = []
    for data_seed in (1, 2):
        model = keras_dp.LowRankSparse(
            _mlp(seed=0), rank=2, sparsity=0.5, refresh_every=2, seed=4
        )
        initial = _carrier_arrays(model)
        model = _private(model, sigma=1.0, lr=0.0)
        x, y = _data(32, (6,), seed=data_seed)
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
        steps = int(_np(model._refresh_count))
        assert steps == int(_np(model.optimizer.iterations)) >= 2
        results.append((_carrier_arrays(model), steps))
    (first, steps_a), (second, steps_b) = results
    assert steps_a == steps_b
    for a, b in zip(first, second):
        for u, v in zip(a, b):
            np.testing.assert_allclose(u, v, atol=1e-6)
    # They were refreshed (new public randomness), not left at init.
    assert np.abs(first[0][0] - initial[0][0]).max() > 1e-3


def test_refreshed_carriers_through_fit_equal_carrier_values_of_released_weights():
    model = keras_dp.LowRankSparse(
        _mixed_model(), rank=2, sparsity=0.4, refresh_every=2, seed=1
    )
    model = keras_dp.make_private(model, poisson_sampling=False)
    model.compile(
        optimizer=keras_dp.DPSGD(learning_rate=0.05, noise_multiplier=0.5, seed=0),
        loss=_loss(),
    )
    x, y = _data(32, (6, 6, 4))
    with pytest.warns(UserWarning):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    count = int(_np(model._refresh_count))
    assert count == 4
    _assert_orthonormal(model)
    _assert_same_carriers(
        _carrier_arrays(model),
        model._carrier_values(
            [v.value for v in model.trainable_variables],
            ops.convert_to_tensor(count // 2),
        ),
        atol=1e-4,
    )


# ---------------------------------------------- sparse support, dimension


def test_support_and_noise_dimension():
    sparsity = 0.6
    model = keras_dp.LowRankSparse(_mixed_model(), rank=3, sparsity=sparsity)
    covered = {id(c.kernel) for c in model._carriers}
    rest = sum(
        math.prod(v.shape) for v in model.trainable_variables if id(v) not in covered
    )
    expected = rest
    for c, (L, R, mL, mR) in zip(model._carriers, _carrier_arrays(model)):
        r = min(3, c.p, c.d)
        assert c.p * c.d == math.prod(c.kernel.shape)
        assert L.shape == (c.p, r) and R.shape == (r, c.d)
        for mask, size in ((mL, c.p * r), (mR, r * c.d)):
            assert set(np.unique(mask)) <= {0.0, 1.0}
            assert mask.sum() == math.ceil((1 - sparsity) * size)
            expected += math.ceil((1 - sparsity) * size)
    assert model.noise_dimension == expected

    full = keras_dp.LowRankSparse(_mixed_model(), rank=3, sparsity=0.0)
    assert full.noise_dimension == rest + sum(
        c.rank * (c.p + c.d) for c in full._carriers
    )
    excluded = keras_dp.LowRankSparse(
        _mixed_model(), rank=3, sparsity=0.0, exclude=("head",)
    )
    head = excluded.inner.get_layer("head").kernel
    assert excluded.noise_dimension == full.noise_dimension - sum(
        c.rank * (c.p + c.d) for c in full._carriers if c.kernel.path == head.path
    ) + math.prod(head.shape)


def test_coordinates_outside_the_support_are_zero():
    model = keras_dp.LowRankSparse(_mixed_model(), rank=3, sparsity=0.7, seed=2)
    carriers = _carrier_arrays(model)
    space = model.private_gradient_space(
        [v.value for v in model.non_trainable_variables]
    )
    rng = np.random.RandomState(0)
    grads = [
        ops.convert_to_tensor(rng.randn(5, *v.shape).astype("float32"))
        for v in model.trainable_variables
    ]
    parts = space.project(grads)
    position = {id(v): k for k, v in enumerate(model.trainable_variables)}
    for c, (L, R, mL, mR) in zip(model._carriers, carriers):
        d_left, d_right = (_np(p) for p in parts[position[id(c.kernel)]])
        assert np.all(d_left[:, mL == 0] == 0)
        assert np.all(d_right[:, mR == 0] == 0)
        assert np.any(d_left[:, mL == 1] != 0) and np.any(d_right[:, mR == 1] != 0)

    # Noise in carrier space: entries drawn outside the support never
    # reach the update (changing them changes nothing, bit for bit).
    spaces = space.noise_spaces()
    for c, (L, R, mL, mR) in zip(model._carriers, carriers):
        draw = spaces[position[id(c.kernel)]]
        base = {
            (c.p, c.rank): rng.randn(c.p, c.rank),
            (c.rank, c.d): rng.randn(c.rank, c.d),
        }
        masks = {(c.p, c.rank): mL, (c.rank, c.d): mR}

        def normal(shape, dtype, off_support=0.0):
            z = base[tuple(shape)] + off_support * (1 - masks[tuple(shape)])
            return ops.convert_to_tensor(z.astype(dtype))

        a = _np(draw(normal))
        b = _np(draw(lambda s, d: normal(s, d, off_support=1e3)))
        np.testing.assert_array_equal(a, b)
        # And the drawn image is the reconstruction of the masked noise.
        zl, zr = base[(c.p, c.rank)] * mL, base[(c.rank, c.d)] * mR
        expected = zl @ R + L @ zr - L @ (L.T @ zl) @ R
        np.testing.assert_allclose(
            a, expected.reshape(c.kernel.shape), rtol=1e-4, atol=1e-4
        )
    for var, s in zip(model.trainable_variables, spaces):
        assert (s is None) == (id(var) not in {id(c.kernel) for c in model._carriers})


# ------------------------------------------ exact private step, sigma = 0


@pytest.mark.parametrize("path", ["fast", "vmap"])
@pytest.mark.parametrize("microbatch_size", [None, 3])
def test_private_step_matches_brute_force(microbatch_size, path):
    inner = _mlp(in_dim=7, hidden=6, out=4, seed=1)
    model = keras_dp.LowRankSparse(
        inner, rank=2, sparsity=0.4, exclude=("head",), refresh_every=100, seed=5
    )
    x, y = _data(8, (7,), classes=4, seed=3)
    loss_fn = _loss()
    carriers = {
        id(c.kernel): (c, arrays)
        for c, arrays in zip(model._carriers, _carrier_arrays(model))
    }
    assert len(carriers) == 1  # d1 only; the head is excluded

    per_example = _per_example_gradients(model, x, y, loss_fn)
    variables = model.trainable_variables

    def project(g_list):
        parts = []
        for var, g in zip(variables, g_list):
            if id(var) in carriers:
                c, (L, R, mL, mR) = carriers[id(var)]
                G = g.reshape(c.p, c.d)
                parts.append([(G @ R.T) * mL, (L.T @ G) * mR])
            else:
                parts.append([g])
        return parts

    projected = [project(g) for g in per_example]
    norms = np.array(
        [np.sqrt(sum(np.sum(p**2) for vp in parts for p in vp)) for parts in projected]
    )
    clip = float(np.median(norms))
    factors = np.minimum(1.0, clip / (norms + FLAT_EPSILON))
    assert np.any(factors < 1) and np.any(factors == 1)
    batch = len(x)
    expected = []
    for k, var in enumerate(variables):
        summed = [
            sum(factors[i] * projected[i][k][j] for i in range(batch))
            for j in range(len(projected[0][k]))
        ]
        if id(var) in carriers:
            c, (L, R, _, _) = carriers[id(var)]
            d_left, d_right = summed
            dW = d_left @ R + L @ d_right - L @ (L.T @ d_left) @ R
            expected.append(-dW.reshape(var.shape) / batch)
        else:
            expected.append(-summed[0] / batch)

    model = keras_dp.make_private(
        model, microbatch_size=microbatch_size, per_example=path
    )
    model.compile(
        optimizer=keras_dp.DPSGD(
            learning_rate=1.0, noise_multiplier=0.0, l2_norm_clip=clip
        ),
        loss=loss_fn,
    )
    before = _weights(model)
    model.train_on_batch(x, y)
    assert model._keras_dp.per_example_path[0] == path
    after = _weights(model)
    for var, b, a, e in zip(variables, before, after, expected):
        np.testing.assert_allclose(a - b, e, rtol=1e-4, atol=1e-6, err_msg=var.path)
    # The wrapped kernel's update is not the full clipped gradient.
    k = [id(v) for v in variables].index(next(iter(carriers)))
    full = -sum(factors[i] * per_example[i][k] for i in range(batch)) / batch
    assert np.abs(full - (after[k] - before[k])).max() > 1e-4


# ----------------------------------------------------------------- noise


def _zero_loss(y_true, y_pred):
    return ops.sum(y_pred, axis=-1) * 0.0


def test_noise_lies_in_carrier_space_with_the_right_scale():
    sigma, clip, batch, steps = 1.5, 2.0, 16, 8
    keras.utils.set_random_seed(0)
    inner = keras.Sequential(
        [
            keras.Input((32,)),
            keras.layers.Dense(64, name="wide"),
            keras.layers.Dense(2, name="head"),
        ]
    )
    model = keras_dp.LowRankSparse(inner, rank=4, sparsity=0.0, refresh_every=1000)
    model = _private(model, sigma=sigma, clip=clip, loss=_zero_loss)
    carriers = {
        c.kernel.path: (c, a) for c, a in zip(model._carriers, _carrier_arrays(model))
    }
    c, (L, R, _, _) = carriers["sequential/wide/kernel"]
    x = np.random.RandomState(0).randn(batch, 32).astype("float32")
    y = np.zeros((batch,), "int32")
    wide = inner.get_layer("wide")
    z_right, z_orth, bias_noise = [], [], []
    scale = sigma * clip / batch
    for _ in range(steps):
        before = _np(wide.kernel), _np(wide.bias)
        model.train_on_batch(x, y)
        update = -(_np(wide.kernel) - before[0])  # lr = 1
        # In the carrier subspace: its projection is itself.
        np.testing.assert_allclose(_projection(update, L, R), update, atol=1e-5)
        z_right.append((L.T @ update) / scale)
        z_orth.append(((np.eye(c.p) - L @ L.T) @ update @ R.T) / scale)
        bias_noise.append(-(_np(wide.bias) - before[1]) / scale)
    z_right = np.concatenate([z.ravel() for z in z_right])
    z_orth = np.stack(z_orth)
    bias_noise = np.concatenate(bias_noise)
    # Carrier coordinates are N(0, 1) after dividing by sigma C / B.
    # 8 * 4 * 64 = 2048 samples: the std estimate is within 4 % with
    # overwhelming probability; allow 8 %.
    assert abs(np.std(z_right) - 1) < 0.08
    assert abs(np.mean(z_right)) < 0.1
    # (I - P_L) z_L keeps (p - r) of p dimensions of each column's variance.
    per_step = np.sum(z_orth**2, axis=(1, 2)).mean()
    assert abs(per_step / ((c.p - c.rank) * c.rank) - 1) < 0.15
    assert abs(np.std(bias_noise) - 1) < 0.15  # 512 samples
    # Noise dimension: r (p + d) per kernel (head: rank capped at 2), biases.
    assert model.noise_dimension == 4 * (32 + 64) + 64 + 2 * (64 + 2) + 2


def test_sparse_noise_is_zero_outside_support_in_the_update():
    sigma, batch = 1.0, 8
    keras.utils.set_random_seed(0)
    inner = keras.Sequential([keras.Input((12,)), keras.layers.Dense(10, name="d")])
    model = keras_dp.LowRankSparse(inner, rank=3, sparsity=0.8, refresh_every=1000)
    model = _private(model, sigma=sigma, loss=_zero_loss)
    ((L, R, mL, mR),) = _carrier_arrays(model)
    x = np.random.RandomState(0).randn(batch, 12).astype("float32")
    before = _np(inner.get_layer("d").kernel)
    model.train_on_batch(x, np.zeros((batch,), "int32"))
    update = _np(inner.get_layer("d").kernel) - before
    z_right = L.T @ update
    assert np.abs(z_right[mR == 0]).max() < 1e-6
    assert np.abs(z_right[mR == 1]).min() > 1e-6


# --------------------------------------------------------------- epsilon


def test_epsilon_equals_plain_dp_sgd():
    sigma, batch, n, delta = 1.1, 10, 60, 1e-5
    model = keras_dp.LowRankSparse(_mlp(), rank=2, sparsity=0.5, refresh_every=2)
    model = _private(model, sigma=sigma, lr=0.1)
    x, y = _data(n, (6,))
    logger = keras_dp.EpsilonLogger(delta=delta)
    history = model.fit(x, y, batch_size=batch, epochs=2, verbose=0, callbacks=[logger])
    steps = int(_np(model.optimizer.iterations))
    assert steps == 12
    expected = accounting.compute_epsilon(sigma, batch / n, steps, delta)
    ledger_eps = model.optimizer.privacy_ledger.epsilon(steps, delta)
    assert ledger_eps == pytest.approx(expected, rel=1e-9)
    assert history.history["epsilon"][-1] == pytest.approx(expected, rel=1e-9)
    assert 0 < expected < 1e3


# ------------------------------------------------- gradient accumulation


def test_gradient_accumulation_keeps_one_carrier_space_per_update():
    keras.utils.set_random_seed(0)
    inner = keras.Sequential([keras.Input((8,)), keras.layers.Dense(6, name="d")])
    model = keras_dp.LowRankSparse(inner, rank=2, sparsity=0.0, refresh_every=1)
    model = _private(model, sigma=0.5, lr=1.0, gradient_accumulation_steps=2)
    ((L, R, _, _),) = _carrier_arrays(model)
    x, y = _data(8, (8,), classes=6, seed=1)
    before = _np(inner.get_layer("d").kernel)
    model.train_on_batch(x, y)  # micro-step 1: accumulated, no update
    model.train_on_batch(x, y)  # micro-step 2: noisy update
    update = _np(inner.get_layer("d").kernel) - before
    assert np.abs(update).max() > 1e-4
    # The whole update (signal and noise) lies in one carrier space: the
    # one in force when the accumulation window started.
    np.testing.assert_allclose(_projection(update, L, R), update, atol=1e-5)


# ------------------------------------------------------------ save / load


def test_save_load_round_trip(tmp_path):
    model = keras_dp.LowRankSparse(
        _mixed_model(), rank=2, sparsity=0.3, refresh_every=2, seed=7
    )
    initial = _carrier_arrays(model)
    model = _private(model, sigma=0.8, lr=0.05)
    x, y = _data(32, (6, 6, 4))
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    carriers = _carrier_arrays(model)
    assert np.abs(carriers[0][0] - initial[0][0]).max() > 1e-3  # refreshed
    path = os.path.join(tmp_path, "lowrank.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, keras_dp.LowRankSparse)
    assert (loaded.rank, loaded.sparsity, loaded.refresh_every, loaded.seed) == (
        2,
        0.3,
        2,
        7,
    )
    assert int(_np(loaded._refresh_count)) == int(_np(model._refresh_count))
    for a, b in zip(_carrier_arrays(loaded), carriers):
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u, v)
    np.testing.assert_allclose(
        _np(loaded.predict(x, verbose=0)), _np(model.predict(x, verbose=0)), atol=1e-6
    )
    assert loaded.noise_dimension == model.noise_dimension
    # It keeps training privately.
    loaded.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert int(_np(loaded.optimizer.iterations)) > int(_np(model.optimizer.iterations))


# ----------------------------------------------------------------- errors


def test_errors():
    with pytest.raises(ValueError, match="`rank` must be a positive integer"):
        keras_dp.LowRankSparse(_mlp(), rank=0)
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"`sparsity` must be in \[0, 1\)"):
            keras_dp.LowRankSparse(_mlp(), sparsity=bad)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.LayerNormalization(name="norm"),
            keras.layers.Dense(2),
        ]
    )
    with pytest.raises(
        ValueError,
        match=r"`exclude` names layers that have no matrix kernel: \['norm'\]",
    ):
        keras_dp.LowRankSparse(model, exclude=("norm",))
    with pytest.raises(ValueError, match="no matrix kernel"):
        keras_dp.LowRankSparse(_mlp(), exclude=("missing",))
    unbuilt = keras.Sequential([keras.layers.Dense(3)])
    with pytest.raises(ValueError, match="LowRankSparse needs a built model"):
        keras_dp.LowRankSparse(unbuilt)


# ------------------------------------------------------ carrier choices


def _spans_power_iteration_of(model, matrices):
    """Per carrier, `||(I - R^T R) M^T L||` for the given `M`: zero when
    the carriers came from one power iteration on `M` (`R^T` spans
    `M^T L`)."""
    residuals = []
    for (L, R, _, _, *_), M in zip(_carrier_arrays(model), matrices):
        residuals.append(
            np.abs((np.eye(R.shape[1]) - R.T @ R) @ M.T @ L).max() / np.abs(M).max()
        )
    return residuals


def test_history_carriers_come_from_the_released_change_since_the_last_refresh():
    inner = _mlp(in_dim=8, hidden=7, out=6, seed=2)
    model = keras_dp.LowRankSparse(inner, rank=2, refresh_every=2, carriers="history")
    weights_model = keras_dp.LowRankSparse(
        _mlp(in_dim=8, hidden=7, out=6, seed=2), rank=2, carriers="weights"
    )
    # Before any update there is no history: the carriers of the weights.
    _assert_same_carriers(
        [a[:4] for a in _carrier_arrays(model)], _carrier_arrays(weights_model)
    )
    kernels = [c.kernel for c in model._carriers]
    before = [_np(k) for k in kernels]
    model = _private(model, sigma=0.5, lr=0.5)
    x, y = _data(16, (8,), classes=6, seed=1)
    model.train_on_batch(x, y)
    model.train_on_batch(x, y)  # the second update refreshes
    after = [_np(k) for k in kernels]
    change = [a - b for a, b in zip(after, before)]
    assert max(_spans_power_iteration_of(model, change)) < 1e-4
    # ... and not of the weights themselves.
    assert min(_spans_power_iteration_of(model, after)) > 1e-2
    # The kernel at this refresh is kept for the next one.
    for (*_, last), a in zip(_carrier_arrays(model), after):
        np.testing.assert_allclose(last, a, atol=1e-6)
    _assert_orthonormal_carriers(model)


def _assert_orthonormal_carriers(model):
    for L, R, *_ in _carrier_arrays(model):
        np.testing.assert_allclose(L.T @ L, np.eye(L.shape[1]), atol=1e-5)
        np.testing.assert_allclose(R @ R.T, np.eye(R.shape[0]), atol=1e-5)


def test_carriers_argument_round_trips_and_is_checked():
    model = keras_dp.LowRankSparse(_mlp(), rank=2, carriers="history")
    config = model.get_config()
    assert config["carriers"] == "history"
    again = keras_dp.LowRankSparse.from_config(config)
    assert again.carriers == "history"
    assert len(again.non_trainable_variables) == len(model.non_trainable_variables)
    with pytest.raises(
        ValueError,
        match="`carriers` must be one of 'weights', 'history'",
    ):
        keras_dp.LowRankSparse(_mlp(), carriers="random")
