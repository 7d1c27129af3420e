"""DP fine-tuning with Keras's built-in LoRA (docs/algorithms.md).

`layer.enable_lora(rank)` freezes a Dense / EinsumDense kernel and adds two
trainable factors. A private model must then clip and noise only the
trainable variables: frozen weights stay bit-identical, and the noise
dimension is the trainable parameter count.
"""

import math
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from keras import ops

import keras_dp


_TF = keras.backend.backend() == "tensorflow"
_TF_VMAP_EINSUM_CRASH = (
    "TensorFlow backend, per_example='vmap': fit of a model with an "
    "EinsumDense on 3-d inputs ('btc,cnh->btnh') kills the process "
    "(SIGABRT/SIGSEGV inside tf.vectorized_map); see "
    "test_vmap_path_with_einsum_does_not_crash."
)


def _np(t):
    return np.asarray(ops.convert_to_numpy(t))


def _lora_model(rank=2, seed=0, einsum=True):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((5, 8))
    if einsum:
        h = keras.layers.EinsumDense(
            "btc,cnh->btnh", output_shape=(5, 2, 4), bias_axes="nh", name="attn"
        )(inputs)
    else:
        h = keras.layers.Dense(8, name="attn")(inputs)
    h = keras.layers.Reshape((5, 8))(h)
    h = keras.layers.LayerNormalization(name="norm")(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(16, activation="relu", name="ffn")(h)
    outputs = keras.layers.Dense(3, name="head")(h)
    model = keras.Model(inputs, outputs)
    model.get_layer("attn").enable_lora(rank)
    model.get_layer("ffn").enable_lora(rank)
    return model


def _data(n=48, seed=0):
    rng = np.random.RandomState(seed)
    return rng.randn(n, 5, 8).astype("float32"), rng.randint(0, 3, n).astype("int32")


def _frozen(model):
    return {v.path: _np(v).copy() for v in model.non_trainable_variables}


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _spy_on_noise(optimizer):
    """Records the shapes of the gradients that receive noise."""
    seen = []
    original = optimizer.privatize

    def spy(batch):
        seen.append([tuple(g.shape) for g in batch.gradients if g is not None])
        return original(batch)

    optimizer.privatize = spy
    return seen


@pytest.mark.parametrize("per_example", ["auto", "vmap"])
def test_lora_privatises_only_trainable_variables(per_example):
    # On TensorFlow the vmap path runs with a Dense in place of the
    # EinsumDense (_TF_VMAP_EINSUM_CRASH).
    model = _lora_model(einsum=not (per_example == "vmap" and _TF))
    trainable_paths = sorted(v.path for v in model.trainable_variables)
    assert any("lora_kernel_a" in p for p in trainable_paths)
    assert not any(
        p.endswith("attn/kernel") or p.endswith("ffn/kernel") for p in trainable_paths
    )
    frozen_before = _frozen(model)
    assert any(p.endswith("ffn/kernel") for p in frozen_before)
    trainable_before = {v.path: _np(v).copy() for v in model.trainable_variables}

    model = keras_dp.make_private(model, per_example=per_example)
    model.compile(
        optimizer=keras_dp.DPAdam(learning_rate=1e-2, noise_multiplier=1.0, seed=0),
        loss=_loss(),
    )
    seen = _spy_on_noise(model.optimizer)
    x, y = _data()
    model.fit(x, y, batch_size=8, epochs=2, verbose=0)

    # Frozen weights: bit-identical.
    for v in model.non_trainable_variables:
        if v.path in frozen_before and "seed" not in v.path:
            assert np.array_equal(_np(v), frozen_before[v.path]), v.path
    # Every trainable variable moved (noise reaches all of them).
    for v in model.trainable_variables:
        assert not np.array_equal(_np(v), trainable_before[v.path]), v.path
    # Noise dimension = trainable parameter count.
    trainable_count = sum(math.prod(v.shape) for v in model.trainable_variables)
    assert seen, "the optimizer saw no gradients"
    assert sum(math.prod(s) for s in seen[-1]) == trainable_count
    total = trainable_count + sum(
        math.prod(v.shape)
        for v in model.non_trainable_variables
        if "seed" not in v.path
    )
    assert trainable_count < total / 2


def test_lora_sigma_zero_update_is_the_same_on_both_paths():
    """Fast (ghost norm) and vmap paths give the same LoRA update."""
    updates = []
    for per_example in ("auto", "vmap"):
        model = _lora_model(seed=1, einsum=not _TF)
        before = [_np(v).copy() for v in model.trainable_variables]
        model = keras_dp.make_private(model, per_example=per_example)
        model.compile(
            optimizer=keras_dp.DPSGD(
                learning_rate=1.0, noise_multiplier=0.0, l2_norm_clip=0.5
            ),
            loss=_loss(),
        )
        x, y = _data(8, seed=2)
        model.train_on_batch(x, y)  # a first step makes lora_kernel_b non-zero
        model.train_on_batch(x, y)
        updates.append([_np(v) - b for v, b in zip(model.trainable_variables, before)])
    for a, b in zip(*updates):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert any(np.abs(u).max() > 1e-4 for u in updates[0])


def test_lora_layers_are_left_to_plain_dp_by_low_rank_sparse():
    # LowRankSparse always takes the vmap path (_TF_VMAP_EINSUM_CRASH).
    model = _lora_model(einsum=not _TF)
    wrapped = keras_dp.LowRankSparse(model, rank=2, sparsity=0.5)
    # Only the head has a trainable, non-LoRA kernel.
    assert [c.kernel.path for c in wrapped._carriers] == [
        model.get_layer("head").kernel.path
    ]
    frozen_before = _frozen(model)
    wrapped = keras_dp.make_private(wrapped)
    wrapped.compile(
        optimizer=keras_dp.DPSGD(learning_rate=0.1, noise_multiplier=1.0, seed=0),
        loss=_loss(),
    )
    x, y = _data(32)
    wrapped.fit(x, y, batch_size=8, epochs=1, verbose=0)
    for v in model.non_trainable_variables:
        if v.path in frozen_before and "seed" not in v.path:
            assert np.array_equal(_np(v), frozen_before[v.path]), v.path
    head = model.get_layer("head").kernel
    rest = sum(math.prod(v.shape) for v in wrapped.trainable_variables if v is not head)
    c = wrapped._carriers[0]
    assert wrapped.noise_dimension == rest + math.ceil(0.5 * c.p * c.rank) + math.ceil(
        0.5 * c.rank * c.d
    )


_CRASH_SCRIPT = """
import numpy as np, keras, keras_dp
keras.utils.set_random_seed(0)
model = keras.Sequential([
    keras.Input((5, 8)),
    keras.layers.EinsumDense("btc,cnh->btnh", output_shape=(5, 2, 4)),
    keras.layers.Flatten(),
    keras.layers.Dense(3),
])
model = keras_dp.make_private(model, per_example="vmap")
model.compile(
    optimizer=keras_dp.DPSGD(learning_rate=0.1, noise_multiplier=1.0),
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
)
rng = np.random.RandomState(0)
model.fit(rng.randn(16, 5, 8).astype("float32"), rng.randint(0, 3, 16),
          batch_size=8, verbose=0)
print("finished")
"""


@pytest.mark.skipif(not _TF, reason="documents a TensorFlow-only crash")
# Not strict: the crash is not deterministic (one full-suite run did not
# hit it).
@pytest.mark.xfail(_TF, strict=False, reason=_TF_VMAP_EINSUM_CRASH)
def test_vmap_path_with_einsum_does_not_crash():
    """In a subprocess: the crash takes the whole interpreter down."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, KERAS_BACKEND=keras.backend.backend())
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_CRASH_SCRIPT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "finished" in result.stdout, (
        result.returncode,
        result.stderr[-2000:],
    )
