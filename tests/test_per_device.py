"""Per-device clipping groups on 8 simulated CPU devices (JAX).

`--xla_force_host_platform_device_count=8` must be set before JAX starts, so
each check runs in a fresh Python subprocess with that flag.
"""

import os
import subprocess
import sys
import textwrap

import keras
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="keras.distribution runs on JAX; the check runs in a JAX subprocess",
)

PRELUDE = textwrap.dedent(
    """
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["KERAS_BACKEND"] = "jax"
    import warnings
    warnings.simplefilter("ignore")
    import math
    import jax
    import keras
    import numpy as np
    import keras_dp
    from keras_dp import clipping

    assert len(jax.devices()) == 8, jax.devices()
    N, D, H, O = 32, 6, 16, 8
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(N, D)) * rng.uniform(0.3, 3.0, (N, 1))).astype("float32")
    y = rng.normal(size=(N, O)).astype("float32")

    def build():
        keras.utils.set_random_seed(1)
        inputs = keras.Input((D,))
        h = keras.layers.Dense(H, activation="tanh", name="body")(inputs)
        return keras.Model(inputs, keras.layers.Dense(O, name="head")(h))

    INIT = [w.copy() for w in build().get_weights()]

    def run(distribution, sigma, clip_groups="per_device", C=0.5,
            per_example="auto", build=build, init=INIT, data=(x, y)):
        # One full-batch update of build() from weights init on data.
        keras.distribution.set_distribution(distribution)
        try:
            model = build()
            model.set_weights(init)
            model = keras_dp.make_private(model, poisson_sampling=False,
                                          per_example=per_example)
            opt = keras_dp.DPSGD(learning_rate=1.0, noise_multiplier=sigma,
                                 l2_norm_clip=C, clip_groups=clip_groups,
                                 seed=7)
            model.compile(optimizer=opt, loss="mse")
            model.fit(*data, batch_size=N, epochs=1, shuffle=False, verbose=0)
            update = [np.asarray(w) - w0
                      for w, w0 in zip(model.get_weights(), init)]
            run.path = model._keras_dp.per_example_path
            return update, opt
        finally:
            keras.distribution.set_distribution(None)

    def flat(update):
        return np.concatenate([u.ravel() for u in update])

    def per_example_grads():
        model = build()
        model.set_weights(INIT)
        params = [v.value for v in model.trainable_variables]
        def loss(p, xi, yi):
            pred, _ = model.stateless_call(p, [], xi)
            return jax.numpy.mean((pred - yi) ** 2)
        grad = jax.jit(jax.grad(loss))
        names = [v.path for v in model.trainable_variables]
        return names, [[np.asarray(g, "float64") for g in
                        grad(params, x[i:i + 1], y[i:i + 1])] for i in range(N)]
    """
)


def run_in_subprocess(body):
    code = PRELUDE + textwrap.dedent(body) + "\nprint('OK')\n"
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["KERAS_BACKEND"] = "jax"
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert result.returncode == 0 and "OK" in result.stdout, (
        result.stdout[-3000:] + result.stderr[-6000:]
    )


def test_data_parallel_matches_one_device():
    """DataParallel over 8 devices: one group per replica (the whole model).

    At sigma = 0 the update equals the single-device flat update. At
    sigma > 0 the noise is drawn once for the logical batch: the 8-device
    update equals the one-device update under the same seed, and the noise
    std is sigma * C / B (d = 248 coordinates: relative standard error
    ~4.5%; tolerance 20%). (The one-device reference runs under a
    distribution too: without one, the noise of all variables is a single
    draw, a different stream.)
    """
    run_in_subprocess(
        """
        dp = keras.distribution.DataParallel(devices=jax.devices())
        one_device = keras.distribution.DataParallel(devices=jax.devices()[:1])
        one, _ = run(None, 0.0, clip_groups="flat")
        eight, opt = run(dp, 0.0)
        assert opt.clip_group_names == ["device"], opt.clip_group_names
        np.testing.assert_allclose(flat(eight), flat(one), rtol=1e-5, atol=1e-7)

        noisy_one, _ = run(one_device, 2.0, clip_groups="flat")
        noisy_eight, _ = run(dp, 2.0)
        np.testing.assert_allclose(
            flat(noisy_eight), flat(noisy_one), rtol=1e-4, atol=1e-6)
        noise = flat(noisy_eight) - flat(eight)
        expected = 2.0 * 0.5 / N
        assert abs(np.std(noise) / expected - 1) < 0.2, (np.std(noise), expected)
        """
    )


def test_model_parallel_groups_are_device_shards():
    """ModelParallel (mesh batch=2 x model=4) with kernels sharded 4 ways.

    Groups: shard j of both kernels (`model:j`, j < 4) plus the replicated
    biases; thresholds C / sqrt(5). The sigma = 0 update equals a numpy
    brute force that clips each example's shards separately, on the fast
    path (the default) and on the vmap path. The per-shard norms compile to
    no cross-device collective.
    """
    run_in_subprocess(
        """
        mesh = keras.distribution.DeviceMesh((2, 4), ["batch", "model"],
                                             jax.devices())
        layout = keras.distribution.LayoutMap(mesh)
        layout["body/kernel"] = (None, "model")
        layout["head/kernel"] = ("model", None)
        mp = keras.distribution.ModelParallel(layout_map=layout,
                                              batch_dim_name="batch")
        update, opt = run(mp, 0.0)
        assert run.path == ("fast", None), run.path
        assert opt.clip_group_names == [
            "model:0", "model:1", "model:2", "model:3", "replicated"
        ], opt.clip_group_names
        C_k = 0.5 / math.sqrt(5)
        for value in opt.group_thresholds.values():
            assert abs(value - C_k) < 1e-7
        assert abs(opt.sensitivity - 0.5) < 1e-7

        names, grads = per_example_grads()
        kinds = {"body/kernel": 1, "head/kernel": 0}  # sharded axis
        total = [np.zeros_like(g) for g in grads[0]]
        for example in grads:
            sq = np.zeros(5)
            pieces = []
            for name, g in zip(names, example):
                if name in kinds:
                    parts = np.split(g, 4, axis=kinds[name])
                    sq[:4] += [np.sum(p ** 2) for p in parts]
                else:
                    sq[4] += np.sum(g ** 2)
            f = np.minimum(1.0, C_k / (np.sqrt(sq) + 1e-6))
            for v, (name, g) in enumerate(zip(names, example)):
                if name in kinds:
                    parts = np.split(g, 4, axis=kinds[name])
                    g = np.concatenate([p * f[j] for j, p in enumerate(parts)],
                                       axis=kinds[name])
                else:
                    g = g * f[4]
                total[v] += g
        expected = [-t / N for t in total]
        vmap_update, _ = run(mp, 0.0, per_example="vmap")
        for got, vmap_got, want in zip(update, vmap_update, expected):
            np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)
            np.testing.assert_allclose(vmap_got, want, rtol=2e-4, atol=1e-6)

        # Per-shard squared norms of a gradient sharded like the kernel
        # (batch over "batch", axis 1 over "model") need no communication.
        from jax.sharding import NamedSharding, PartitionSpec as P
        jmesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4),
                                  ("batch", "model"))
        g = jax.device_put(np.ones((8, D, H), "float32"),
                           NamedSharding(jmesh, P("batch", None, "model")))
        fn = jax.jit(
            lambda g: clipping.per_example_squared_norms([g], [(1, 4)])[0],
            out_shardings=NamedSharding(jmesh, P("batch", "model")))
        hlo = fn.lower(g).compile().as_text()
        for op in ("all-gather", "all-reduce", "all-to-all",
                   "collective-permute"):
            assert op not in hlo, op
        np.testing.assert_allclose(np.asarray(fn(g)), D * H / 4)
        """
    )


def test_fast_path_per_shard_norms_of_sequence_layers_match_vmap():
    """The fast path's per-shard norms and sums for the layers a sharded
    transformer has: embeddings split by rows and by columns, keras-hub's
    position embedding split by columns, EinsumDense
    kernels split on an input letter and on an output letter (each the
    second letter of its side, so a shard is a strided piece of the
    kernel's matrix view), a Dense over positions split on its input axis,
    and LayerNorm's scale and offset; with ghost norms and with
    instantiated gradients forced, and with one example whose loss is
    infinite (left out). The sigma = 0 update equals the vmap path's,
    which `test_model_parallel_groups_are_device_shards` checks against a
    brute force.
    """
    run_in_subprocess(
        """
        import keras_hub
        from keras_dp.per_example import linear

        T, V = 6, 16
        ids = rng.integers(0, V, size=(N, T)).astype("int32")
        targets = rng.normal(size=(N, T, 3)).astype("float32")
        targets[3] = np.inf

        def build_sequence():
            keras.utils.set_random_seed(2)
            inputs = keras.Input((T,), dtype="int32")
            h = (keras.layers.Embedding(V, 8, name="tok")(inputs)
                 + keras.layers.Embedding(V, 8, name="seg")(inputs))
            h = h + keras_hub.layers.PositionEmbedding(T + 2, name="pos")(h)
            h = keras.layers.LayerNormalization(name="ln")(h)
            h = keras.layers.EinsumDense("btd,dhk->bthk", (T, 4, 4),
                                         name="attn_in")(h)
            h = keras.layers.EinsumDense("bthk,hkd->btd", (T, 8),
                                         name="attn_out")(h)
            h = keras.layers.Dense(16, activation="tanh", name="ff")(h)
            return keras.Model(inputs, keras.layers.Dense(3, name="head")(h))

        mesh = keras.distribution.DeviceMesh((2, 4), ["batch", "model"],
                                             jax.devices())
        layout = keras.distribution.LayoutMap(mesh)
        layout["tok/embeddings"] = ("model", None)
        layout["seg/embeddings"] = (None, "model")
        layout["pos/embeddings"] = (None, "model")
        layout["ln/gamma"] = ("model",)
        layout["ln/beta"] = ("model",)
        layout["attn_in/kernel"] = (None, None, "model")
        layout["attn_out/kernel"] = (None, "model", None)
        layout["ff/kernel"] = ("model", None)
        mp = keras.distribution.ModelParallel(layout_map=layout,
                                              batch_dim_name="batch")
        keras.distribution.set_distribution(mp)
        init = [w.copy() for w in build_sequence().get_weights()]
        keras.distribution.set_distribution(None)

        def sequence_update(per_example):
            update, opt = run(mp, 0.0, per_example=per_example,
                              build=build_sequence, init=init,
                              data=(ids, targets))
            assert opt.clip_group_names[:4] == [
                "model:0", "model:1", "model:2", "model:3"]
            return update

        reference = sequence_update("vmap")
        assert all(np.all(np.isfinite(r)) for r in reference)
        assert any(np.any(r != 0) for r in reference)
        for method in ("ghost", "instantiate"):
            linear._FORCE_METHOD = method
            fast = sequence_update("fast")
            for got, want in zip(fast, reference):
                np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6,
                                           err_msg=method)
        linear._FORCE_METHOD = None

        # A rule that gives one norm per variable (conv) sends the step to
        # the vmap path, saying why.
        conv_layout = keras.distribution.LayoutMap(mesh)
        conv_layout["conv/kernel"] = (None, None, "model")
        keras.distribution.set_distribution(keras.distribution.ModelParallel(
            layout_map=conv_layout, batch_dim_name="batch"))
        try:
            inputs = keras.Input((T, 2))
            h = keras.layers.Conv1D(8, 3, name="conv")(inputs)
            model = keras_dp.make_private(
                keras.Model(inputs, keras.layers.Dense(1)(h)),
                poisson_sampling=False)
            model.compile(optimizer=keras_dp.DPSGD(
                learning_rate=0.1, noise_multiplier=0.0, l2_norm_clip=1.0,
                clip_groups="per_device"), loss="mse")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                model.fit(rng.normal(size=(N, T, 2)), np.zeros((N, T - 2, 1)),
                          batch_size=N, verbose=0)
        finally:
            keras.distribution.set_distribution(None)
        path, reason = model._keras_dp.per_example_path
        assert path == "vmap" and "one norm for the sharded variable" in reason, (
            path, reason)
        assert any("conv/kernel" in str(w.message) for w in caught)
        """
    )
