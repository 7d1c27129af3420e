"""The fast per-example path (keras_dp.per_example) against brute force.

References are per-example loops: one GradientTape / jax.grad /
torch.autograd.grad call per example, using plain Keras only.
"""

import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
from keras import layers as L
from keras import ops
from keras.src.backend.common import masking

import keras_dp
from keras_dp import backend as backend_lib
from keras_dp import native
from keras_dp import per_example
from keras_dp.per_example import conv as conv_rules
from keras_dp.per_example import linear
from keras_dp.per_example import losses as example_losses

RTOL = 2e-4


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def brute_force_grads(model, x, y):
    """Per-example gradients, one backward pass per example (no keras_dp)."""
    loss_fn = _loss()
    variables = model.trainable_variables
    per_example = []
    if keras.backend.backend() == "jax":
        import jax

        def loss_of(values, non_trainable, xi, yi):
            y_pred, _ = model.stateless_call(values, non_trainable, xi, training=True)
            return loss_fn(yi, y_pred)

        # Jitted once per model and reused for every example.
        jax_grad = jax.jit(jax.grad(loss_of))
    for i in range(len(y)):
        xi = keras.tree.map_structure(lambda t: t[i : i + 1], x)
        yi = y[i : i + 1]
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            with tf.GradientTape() as tape:
                loss = loss_fn(yi, model(xi, training=True))
            grads = tape.gradient(
                loss,
                [v.value for v in variables],
                unconnected_gradients=tf.UnconnectedGradients.ZERO,
            )
            grads = [tf.convert_to_tensor(g) for g in grads]
        elif keras.backend.backend() == "torch":
            import torch

            with torch.enable_grad():
                loss = loss_fn(yi, model(xi, training=True))
                grads = torch.autograd.grad(
                    loss, [v.value for v in variables], allow_unused=True
                )
            grads = [
                np.zeros(tuple(v.shape)) if g is None else g.detach().cpu().numpy()
                for v, g in zip(variables, grads)
            ]
        else:
            grads = jax_grad(
                [v.value for v in variables],
                [v.value for v in model.non_trainable_variables],
                xi,
                yi,
            )
        per_example.append([np.asarray(g) for g in grads])
    return [np.stack([p[k] for p in per_example]) for k in range(len(variables))]


def fast(model, x, y):
    model.compile(loss=_loss())
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    return per_example.per_example_norms_and_sums(
        model,
        backend_lib.get_backend_module(),
        trainable,
        non_trainable,
        keras.tree.map_structure(ops.convert_to_tensor, x),
        ops.convert_to_tensor(y),
    )


def assert_matches_brute_force(model, x, y):
    reference = brute_force_grads(model, x, y)
    squared, clipped_fn, losses, _, _ = fast(model, x, y)
    n = len(y)
    factors = np.linspace(0.25, 1.5, n).astype("float32")
    sums = clipped_fn([ops.convert_to_tensor(factors)] * len(reference))
    # Absolute tolerances on the scale of the whole gradient: some
    # gradients are exactly zero in theory (attention key bias) and only
    # rounding noise in practice.
    scale = max(np.abs(r).max() for r in reference)
    for variable, ref, sq, total in zip(
        model.trainable_variables, reference, squared, sums
    ):
        ref_sq = (ref.reshape(n, -1) ** 2).sum(axis=1)
        np.testing.assert_allclose(
            ops.convert_to_numpy(sq),
            ref_sq,
            rtol=RTOL,
            atol=1e-6 * scale**2,
            err_msg=f"squared norms of {variable.path}",
        )
        ref_sum = np.tensordot(factors, ref, axes=1)
        np.testing.assert_allclose(
            ops.convert_to_numpy(total),
            ref_sum,
            rtol=RTOL,
            atol=1e-5 * scale,
            err_msg=f"clipped sum of {variable.path}",
        )
    ref_losses = [
        float(
            ops.convert_to_numpy(
                _loss()(
                    y[i : i + 1],
                    model(keras.tree.map_structure(lambda t: t[i : i + 1], x)),
                )
            )
        )
        for i in range(n)
    ]
    np.testing.assert_allclose(ops.convert_to_numpy(losses), ref_losses, rtol=1e-5)


@pytest.fixture(params=["auto", "ghost", "instantiate"])
def method(request):
    linear._FORCE_METHOD = None if request.param == "auto" else request.param
    yield request.param
    linear._FORCE_METHOD = None


class _ConvKernelGrads:
    def __init__(self, way, monkeypatch):
        self.way = way
        self.grouped_calls = []
        self.compiled_calls = []
        self.sums_from_patches = 0
        self._monkeypatch = monkeypatch

    def set_chunk_bytes(self, chunk_bytes):
        """The chunk size of both ways, in bytes."""
        self._monkeypatch.setattr(conv_rules, "_PATCH_CHUNK_BYTES", chunk_bytes)
        self._monkeypatch.setattr(
            backend_lib.get_backend_module(), "GROUPED_CONV_CHUNK_BYTES", chunk_bytes
        )

    def assert_way_used(self, max_rows=None):
        """Some convolution took the way under test where it has its own
        calls: the compiled op, or the grouped path with at most
        `max_rows` examples per call."""
        if linear._FORCE_METHOD == "ghost":
            return
        if self.way == "compiled":
            assert any(ran for ran, _ in self.compiled_calls), (
                "no conv took the compiled op"
            )
            return
        if self.way != "grouped_conv":
            return
        assert self.grouped_calls, "no convolution took the grouped path"
        if max_rows is not None:
            rows = [x.shape[0] for x, *_ in self.grouped_calls]
            assert all(r is not None and r <= max_rows for r in rows), rows


@pytest.fixture(
    params=[
        "patches",
        "grouped_conv",
        "sum_from_patches",
        "compiled",
    ]
)
def conv_kernel_grads(request, monkeypatch):
    """How instantiated conv kernel gradients are computed: from patches,
    or by the backend's grouped convolution, for every stride-1 1-D/2-D
    conv with more than one input channel per group, however small; and
    whether they are kept for the clipped sum ("sum_from_patches": not
    kept where T <= filters, the sum comes from the patches again; the
    other two: always kept). "compiled": the backend's compiled
    `per_example_conv_kernel_norms` (keras_dp's kernels on a CPU), for
    1-D/2-D convs; patches for the others."""
    module = backend_lib.get_backend_module()
    state = _ConvKernelGrads(request.param, monkeypatch)
    if request.param == "compiled":
        built = {
            "tensorflow": native.tensorflow_ops,
            "torch": native.c_api,
        }.get(keras.backend.backend(), native.jax_target)()
        if not built:
            pytest.skip("keras_dp's kernels did not build here")
        original = module.per_example_conv_kernel_norms

        def counted(*args, **kwargs):
            result = original(*args, **kwargs)
            state.compiled_calls.append((result is not None, kwargs["keep_grads"]))
            return result

        monkeypatch.setattr(module, "per_example_conv_kernel_norms", counted)
        monkeypatch.setattr(module, "GROUPED_CONV_MIN_POSITIONS", 10**9)
        return state
    # The protocol's "cannot run here" answer: the caller instantiates them.
    monkeypatch.setattr(
        module, "per_example_conv_kernel_norms", lambda *args, **kwargs: None
    )
    monkeypatch.setattr(
        module, "CONV_CLIPPED_SUM_FROM_PATCHES", request.param == "sum_from_patches"
    )
    if request.param != "grouped_conv":
        monkeypatch.setattr(module, "GROUPED_CONV_MIN_POSITIONS", 10**9)
        original = conv_rules._norms_then_patches

        def counted_sums(*args):
            state.sums_from_patches += 1
            return original(*args)

        monkeypatch.setattr(conv_rules, "_norms_then_patches", counted_sums)
        return state
    monkeypatch.setattr(module, "GROUPED_CONV_MIN_POSITIONS", 1)
    original = module.per_example_conv_kernel_grads

    def counted(*args):
        state.grouped_calls.append(args)
        return original(*args)

    monkeypatch.setattr(module, "per_example_conv_kernel_grads", counted)
    return state


def _labels(n, classes=3):
    return np.random.RandomState(1).randint(0, classes, n)


def test_dense_2d_and_sequence(method):
    rng = np.random.RandomState(0)
    model = keras.Sequential(
        [
            keras.Input((7, 5)),
            L.Dense(4, activation="tanh"),  # sequence Dense, T = 7
            L.Flatten(),
            L.Dense(6, activation="relu"),  # 2-D Dense, T = 1
            L.Dense(3, use_bias=False),
        ]
    )
    x = rng.rand(6, 7, 5).astype("float32")
    assert_matches_brute_force(model, x, _labels(6))


def test_einsum_dense_and_attention(method):
    rng = np.random.RandomState(0)
    inputs = keras.Input((6, 4))
    h = L.EinsumDense("abc,cd->abd", output_shape=(None, 5), bias_axes="d")(inputs)
    h = L.EinsumDense(
        "...c,cde->...de", output_shape=(2, 3), bias_axes="e", activation="relu"
    )(h)
    h = L.Reshape((6, 6))(h)
    h = L.MultiHeadAttention(2, 3)(h, h)
    h = L.LayerNormalization()(h)
    h = L.EinsumDense("abc,c->ab", output_shape=(6,))(h)  # to (batch, 6)
    outputs = L.EinsumDense("ab,bc->ac", output_shape=3, bias_axes="c")(h)
    model = keras.Model(inputs, outputs)
    x = rng.rand(5, 6, 4).astype("float32")
    assert_matches_brute_force(model, x, _labels(5))


@pytest.mark.parametrize("sequence", [False, True])
def test_dense_with_lora(method, sequence):
    """Keras LoRA adapters: A_i^T (s B_i b^T) and (s A_i a)^T B_i."""
    rng = np.random.RandomState(0)
    shape = (4, 6) if sequence else (6,)
    inputs = keras.Input(shape)
    h = L.Dense(7, activation="tanh", name="adapted")(inputs)
    if sequence:
        h = L.GlobalAveragePooling1D()(h)
    outputs = L.Dense(3, name="head")(h)
    model = keras.Model(inputs, outputs)
    model.get_layer("adapted").enable_lora(2, lora_alpha=3.0)
    # lora_kernel_b starts at zero, which would make a's gradient zero.
    b = model.get_layer("adapted").lora_kernel_b
    b.assign(rng.normal(size=b.shape).astype("float32"))
    plan = per_example.build_plan(model)
    assert [e.kind for e in plan] == ["dense_lora", "dense"]
    x = rng.rand(5, *shape).astype("float32")
    assert_matches_brute_force(model, x, _labels(5))


def test_embedding_repeated_tokens_and_masking(method):
    ids = np.random.RandomState(0).randint(1, 6, (6, 9))
    ids[:, 6:] = 0  # padding, masked downstream
    ids[0, :] = 3  # every token the same
    ids[1, :4] = [2, 2, 5, 2]
    inputs = keras.Input((9,), dtype="int32")
    h = L.Embedding(6, 4, mask_zero=True)(inputs)
    h = L.Dense(5, activation="relu")(h)
    h = L.GlobalAveragePooling1D()(h)  # uses the mask
    outputs = L.Dense(3)(h)
    model = keras.Model(inputs, outputs)
    assert_matches_brute_force(model, ids, _labels(6))


@pytest.mark.parametrize("tie_weights", [True, False])
def test_reversible_embedding_as_lookup(tie_weights):
    """ReversibleEmbedding used forward (a lookup, with its own mask)."""
    ids = np.random.RandomState(0).randint(1, 6, (5, 7))
    ids[:, 5:] = 0
    ids[0, :] = 4
    inputs = keras.Input((7,), dtype="int32")
    embedding = L.ReversibleEmbedding(6, 4, tie_weights=tie_weights, mask_zero=True)
    h = embedding(inputs)
    h = L.GlobalAveragePooling1D()(h)  # uses the mask set inside call
    outputs = L.Dense(3)(h)
    model = keras.Model(inputs, outputs)
    assert [e.kind for e in per_example.build_plan(model)] == ["embedding", "dense"]
    assert_matches_brute_force(model, ids, _labels(5))


def test_reversible_embedding_reverse_call_falls_back():
    class TiedLogits(keras.Model):
        def __init__(self):
            super().__init__()
            self.embedding = L.ReversibleEmbedding(6, 4)

        def call(self, ids):
            h = ops.mean(self.embedding(ids), axis=1)
            return self.embedding(h, reverse=True)

    model = TiedLogits()
    model(np.zeros((1, 3), "int32"))
    with pytest.raises(per_example.Unsupported, match="reverse=True|more than once"):
        fast(model, np.ones((2, 3), "int32"), np.array([1, 2]))


def test_keras_hub_bert_backbone():
    """keras-hub BERT: ReversibleEmbedding, PositionEmbedding, attention."""
    keras_hub = pytest.importorskip("keras_hub")
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=11,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=9,
        dropout=0.0,
    )
    outputs = L.Dense(3)(backbone.output["pooled_output"])
    model = keras.Model(backbone.input, outputs)
    kinds = {e.layer.name: e.kind for e in per_example.build_plan(model)}
    assert kinds["token_embedding"] == "embedding"
    assert kinds["position_embedding"] == "position_embedding"
    assert "generic" not in kinds.values()
    rng = np.random.RandomState(0)
    ids = rng.randint(1, 11, (4, 6))
    ids[0, :] = 5  # repeated tokens
    mask = np.ones((4, 6), bool)
    mask[1, 4:] = False
    x = {
        "token_ids": ids.astype("int32"),
        "segment_ids": (rng.rand(4, 6) > 0.5).astype("int32"),
        "padding_mask": mask,
    }
    assert_matches_brute_force(model, x, _labels(4))


def _keras_hub_decoder(keras_hub, name):
    if name == "gpt2":
        return keras_hub.models.GPT2Backbone(
            vocabulary_size=11,
            num_layers=1,
            num_heads=2,
            hidden_dim=8,
            intermediate_dim=16,
            max_sequence_length=9,
            dropout=0.0,
        )
    return keras_hub.models.GemmaBackbone(
        vocabulary_size=11,
        num_layers=1,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=8,
        intermediate_dim=16,
        head_dim=4,
    )


@pytest.mark.skipif(
    keras.backend.backend() == "jax",
    reason="eager JAX compiles each op of the brute-force loop (about 30 s "
    "per model); the rules are the same keras.ops code on every backend, and "
    "JAX's attention and LoRA rules are checked by the BERT and test_lora "
    "tests",
)
@pytest.mark.parametrize("name", ["gpt2", "gemma"])
def test_keras_hub_decoders_with_lora(name):
    """keras-hub GPT-2 and Gemma with LoRA adapters on their attention
    (EinsumDense) layers: the adapters' clipped sum against brute force."""
    keras_hub = pytest.importorskip("keras_hub")
    backbone = _keras_hub_decoder(keras_hub, name)
    backbone.enable_lora(rank=2)
    pooled = L.GlobalAveragePooling1D()(backbone.output)
    model = keras.Model(backbone.input, L.Dense(3)(pooled))
    assert any("lora" in v.path for v in model.trainable_variables)
    rng = np.random.RandomState(1)
    mask = np.ones((4, 6), bool)
    mask[2, 3:] = False
    x = {"token_ids": rng.randint(1, 11, (4, 6)).astype("int32"), "padding_mask": mask}
    assert_matches_brute_force(model, x, _labels(4))


def test_embedding_single_token():
    ids = np.random.RandomState(0).randint(0, 6, (5, 1))
    model = keras.Sequential(
        [keras.Input((1,), dtype="int32"), L.Embedding(6, 4), L.Flatten(), L.Dense(3)]
    )
    assert_matches_brute_force(model, ids, _labels(5))


@pytest.mark.parametrize(
    "input_shape, convs",
    [
        (
            (9, 9, 4),
            lambda: [
                L.Conv2D(6, 3, strides=2, padding="same", activation="relu"),
                L.Conv2D(4, 2, dilation_rate=2, groups=2),
                L.GroupNormalization(2),
                # "same", stride 1: symmetric and uneven (0, 1) zeros.
                L.Conv2D(4, 3, padding="same", dilation_rate=2),
                L.Conv2D(4, 2, padding="same"),
                L.Conv2D(4, (2, 3), strides=(1, 2), padding="same"),
            ],
        ),
        # One input channel per group: tap-major patches from strided slices.
        (
            (9, 8, 1),
            lambda: [
                L.Conv2D(4, 3, strides=(2, 1), padding="same", activation="relu"),
                L.Conv2D(4, (2, 3), dilation_rate=(2, 1), groups=4),
                L.Conv2D(2, 2, strides=2, padding="same", groups=2),
            ],
        ),
    ],
    ids=["multi_channel", "single_channel"],
)
def test_conv2d_stride_padding_dilation_groups(
    method, conv_kernel_grads, input_shape, convs
):
    if conv_kernel_grads.way == "grouped_conv" and input_shape[-1] == 1:
        pytest.skip("one input channel per group: strided slices, not grouped")
    rng = np.random.RandomState(0)
    model = keras.Sequential(
        [keras.Input(input_shape)] + convs() + [L.Flatten(), L.Dense(3)]
    )
    x = rng.rand(5, *input_shape).astype("float32")
    assert_matches_brute_force(model, x, _labels(5))
    conv_kernel_grads.assert_way_used()


def test_conv_clipped_sum_from_patches_again(method, conv_kernel_grads):
    """Conv layers with no more output positions than filters per group
    (T <= F): where the backend sets `CONV_CLIPPED_SUM_FROM_PATCHES`, the
    instantiated kernel gradients give the norms only and the clipped sum
    comes from the patches gathered again."""
    rng = np.random.RandomState(0)
    model = keras.Sequential(
        [
            keras.Input((5, 5, 3)),
            # T = 9 output positions, 12 filters.
            L.Conv2D(12, 3, strides=2, padding="same", activation="relu"),
            # Per group: T = 4, 4 filters.
            L.Conv2D(8, 2, groups=2),
            L.Flatten(),
            L.Dense(3),
        ]
    )
    x = rng.rand(5, 5, 5, 3).astype("float32")
    assert_matches_brute_force(model, x, _labels(5))
    instantiated = method != "ghost"
    if conv_kernel_grads.way == "sum_from_patches" and instantiated:
        # Both layers, the second once per group.
        assert conv_kernel_grads.sums_from_patches == 3
    else:
        assert conv_kernel_grads.sums_from_patches == 0
    if conv_kernel_grads.way == "compiled" and instantiated:
        # Norms only, the clipped sum as one weighted kernel gradient.
        assert conv_kernel_grads.compiled_calls == [(True, False)] * 3


def test_conv_clipped_sum_from_patches_in_chunks(monkeypatch, conv_kernel_grads):
    """The clipped sum from patches gathered again comes in the same chunks
    of examples as the kernel gradients (2 + 2 + 1 rows here)."""
    rng = np.random.RandomState(0)
    model = keras.Sequential(
        [
            keras.Input((5, 5, 3)),
            # T = 9 output positions, 12 filters: 2 examples' patches are
            # 2 * 9 * 27 floats.
            L.Conv2D(12, 3, strides=2, padding="same", activation="relu"),
            L.Flatten(),
            L.Dense(3),
        ]
    )
    conv_kernel_grads.set_chunk_bytes(4 * 2 * 9 * 27)
    monkeypatch.setattr(linear, "_FORCE_METHOD", "instantiate")
    sum_rows = []
    original = linear.weighted_product_sum

    def recorded(A, B, c):
        sum_rows.append(A.shape[0])
        return original(A, B, c)

    monkeypatch.setattr(linear, "weighted_product_sum", recorded)
    x = rng.rand(5, 5, 5, 3).astype("float32")
    assert_matches_brute_force(model, x, _labels(5))
    if conv_kernel_grads.way == "sum_from_patches":
        assert sum_rows == [2, 2, 1], sum_rows
    else:
        assert sum_rows == [], sum_rows


def test_conv1d_and_conv3d_single_channel(method):
    rng = np.random.RandomState(0)
    inputs_1d = keras.Input((10, 1))
    h = L.Conv1D(3, 3, padding="causal", dilation_rate=2)(inputs_1d)
    inputs_3d = keras.Input((4, 5, 4, 1))
    k = L.Conv3D(2, (2, 3, 2), strides=(1, 2, 1), padding="same")(inputs_3d)
    merged = L.Concatenate()([L.Flatten()(h), L.Flatten()(k)])
    model = keras.Model([inputs_1d, inputs_3d], L.Dense(3)(merged))
    x = [
        rng.rand(5, 10, 1).astype("float32"),
        rng.rand(5, 4, 5, 4, 1).astype("float32"),
    ]
    assert_matches_brute_force(model, x, _labels(5))


def test_conv_patches_in_chunks(monkeypatch, conv_kernel_grads):
    """Per-example kernel gradients in chunks of 2 examples (5 = 2+2+1)."""
    rng = np.random.RandomState(0)
    model = keras.Sequential(
        [
            keras.Input((7, 7, 3)),
            L.Conv2D(4, 3, strides=2, padding="same", activation="relu"),
            L.Conv2D(4, 2, dilation_rate=2, groups=2),
            L.Flatten(),
            L.Dense(3),
        ]
    )
    if conv_kernel_grads.way != "grouped_conv":
        # 2 examples' patches of the first layer: 2 * 16 positions * 27 floats.
        chunk_bytes = 4 * 2 * 16 * 27
    else:
        # 2 examples of the second layer's grouped convolutions (4x4x2
        # inputs and 2x2x2 output gradients per group); 1 of the first's
        # patches.
        chunk_bytes = 4 * 2 * (16 * 2 + 4 * 2)
    conv_kernel_grads.set_chunk_bytes(chunk_bytes)
    monkeypatch.setattr(linear, "_FORCE_METHOD", "instantiate")
    x = rng.rand(5, 7, 7, 3).astype("float32")
    assert_matches_brute_force(model, x, _labels(5))
    conv_kernel_grads.assert_way_used(max_rows=2)


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="only TensorFlow traces with an unknown batch size",
)
def test_conv_patches_in_chunks_unknown_batch_size(monkeypatch, conv_kernel_grads):
    """TensorFlow traces `fit` with an unknown batch size: chunks are sized
    by `rows_hint` and the last one's row count is not static."""
    import tensorflow as tf

    rng = np.random.RandomState(0)
    model = keras.Sequential(
        [
            keras.Input((7, 7, 3)),
            L.Conv2D(4, 3, strides=2, padding="same", activation="relu"),
            L.Conv2D(4, 3, padding="same"),
            L.Flatten(),
            L.Dense(3),
        ]
    )
    model.compile(loss=_loss())
    if conv_kernel_grads.way != "grouped_conv":
        # 2 examples' patches of either layer (16 positions, 27 or 36 floats).
        chunk_bytes = 4 * 2 * 16 * 36
    else:
        # 2 examples of the second layer's grouped convolution (6x6x4
        # padded inputs, 4x4x4 output gradients); 1 of the first's patches.
        chunk_bytes = 4 * 2 * (36 + 16) * 4
    conv_kernel_grads.set_chunk_bytes(chunk_bytes)
    monkeypatch.setattr(linear, "_FORCE_METHOD", "instantiate")
    x = rng.rand(5, 7, 7, 3).astype("float32")
    y = _labels(5)
    factors = np.linspace(0.25, 1.5, 5).astype("float32")
    trainable = [v.value for v in model.trainable_variables]

    def norms_and_sums(x, y, rows_hint):
        squared, clipped_fn, _, _, _ = per_example.per_example_norms_and_sums(
            model,
            backend_lib.get_backend_module(),
            trainable,
            [],
            x,
            y,
            rows_hint=rows_hint,
        )
        c = tf.constant(factors)[: tf.shape(x)[0]]
        return squared, clipped_fn([c] * len(trainable))

    expected = norms_and_sums(tf.constant(x), tf.constant(y), None)
    # Chunks of 2 rows for a hinted 4: 2 + (the rest).
    traced = tf.function(
        lambda x, y: norms_and_sums(x, y, 4),
        input_signature=[
            tf.TensorSpec((None, 7, 7, 3), "float32"),
            tf.TensorSpec((None,), y.dtype),
        ],
    )
    got = traced(x, y)
    for a, b in zip(tf.nest.flatten(got), tf.nest.flatten(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    conv_kernel_grads.assert_way_used()


def test_conv1d_causal_and_strided(method, conv_kernel_grads):
    rng = np.random.RandomState(0)
    model = keras.Sequential(
        [
            keras.Input((10, 3)),
            L.Conv1D(4, 3, padding="causal", dilation_rate=2, activation="relu"),
            L.Conv1D(4, 4, padding="same"),
            L.Conv1D(4, 3, strides=2, padding="same"),
            L.Flatten(),
            L.Dense(3),
        ]
    )
    x = rng.rand(5, 10, 3).astype("float32")
    assert_matches_brute_force(model, x, _labels(5))
    conv_kernel_grads.assert_way_used()


def test_mixed_model_with_generic_layers():
    rng = np.random.RandomState(0)
    inputs = keras.Input((6, 6, 2))
    h = L.Conv2D(3, 3, padding="same")(inputs)
    h = L.LayerNormalization(axis=-1)(h)
    h = L.DepthwiseConv2D(2)(h)  # no fast formula: per-example vjp
    h = L.Flatten()(h)
    h = L.Dense(4, activation="relu")(h)
    outputs = L.Dense(3)(h)
    model = keras.Model(inputs, outputs)
    x = rng.rand(5, 6, 6, 2).astype("float32")
    assert_matches_brute_force(model, x, _labels(5))


# Keras deprecates `rms_scaling=True` but still supports it.
@pytest.mark.filterwarnings("ignore:You passed `rms_scaling=True`")
@pytest.mark.parametrize(
    "norm",
    [
        lambda: L.LayerNormalization(),
        pytest.param(
            lambda: L.LayerNormalization(axis=[1, 2], center=False),
            marks=pytest.mark.skipif(
                keras.backend.backend() == "torch",
                reason="Keras's PyTorch layer_normalization gives adjacent axes "
                "that are not the last ones to F.layer_norm, which normalizes "
                "the last axes only: the plain model fails (layer_split_axes "
                "covers axes that are not the last on PyTorch)",
            ),
        ),
        lambda: L.LayerNormalization(axis=[1, 3]),
        lambda: L.LayerNormalization(rms_scaling=True),
        lambda: L.GroupNormalization(2),
        lambda: L.GroupNormalization(3, axis=1, scale=False),
        lambda: L.RMSNormalization(axis=[-2, -1]),
    ],
    ids=[
        "layer",
        "layer_two_axes",
        "layer_split_axes",
        "layer_rms",
        "group",
        "group_axis1",
        "rms",
    ],
)
def test_normalization_layers_closed_form(norm):
    """scale/center gradients `sum(dy * xhat)`, `sum(dy)` per example."""
    rng = np.random.RandomState(0)
    layer = norm()
    inputs = keras.Input((3, 4, 6))
    h = L.Dense(6, activation="tanh")(inputs)
    h = layer(h)
    h = L.Flatten()(h)
    outputs = L.Dense(3)(h)
    model = keras.Model(inputs, outputs)
    # Non-trivial scale and center, so that neither gradient is symmetric.
    for variable in layer.trainable_variables:
        variable.assign(rng.normal(size=variable.shape).astype("float32"))
    plan = per_example.build_plan(model)
    assert [e.kind for e in plan] == ["dense", "normalization", "dense"]
    x = rng.rand(5, 3, 4, 6).astype("float32")
    assert_matches_brute_force(model, x, _labels(5))


def test_group_normalization_input_far_from_zero_mean():
    """GroupNormalization's sums come from `sum(dy * x) - mean * sum(dy)`:
    still exact to tolerance when the mean is about 1000 standard
    deviations from zero."""
    rng = np.random.RandomState(0)
    inputs = keras.Input((4, 4, 6))
    h = L.Conv2D(6, 2, padding="same")(inputs)
    norm = L.GroupNormalization(3)
    h = norm(h)
    outputs = L.Dense(3)(L.Flatten()(h))
    model = keras.Model(inputs, outputs)
    for variable in norm.trainable_variables:
        variable.assign(rng.normal(size=variable.shape).astype("float32"))
    x = (rng.rand(5, 4, 4, 6) + 300.0).astype("float32")
    assert_matches_brute_force(model, x, _labels(5))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(groups=2),
        dict(groups=3, axis=1, scale=False),
        dict(groups=2, center=False),
        dict(groups=3, dtype="mixed_bfloat16"),
    ],
    ids=["group", "group_axis1", "no_center", "mixed_bfloat16"],
)
def test_group_normalization_forward_is_the_layers_call(kwargs):
    """The batched pass computes GroupNormalization's output itself, to keep
    its statistics: the same output (values, dtype) as the layer's call,
    and statistics that give the layer's normalized input."""
    from keras_dp.per_example.normalization import normalization_forward

    rng = np.random.RandomState(0)
    layer = L.GroupNormalization(**kwargs)
    x = (rng.normal(size=(4, 6, 5, 6)) * 3 + 1).astype("float32")
    layer.build(x.shape)
    for variable in layer.trainable_variables:
        variable.assign(rng.normal(size=variable.shape).astype("float32"))
    inputs = ops.cast(x, layer.compute_dtype)  # as `__call__` hands them on
    saved = {}
    got = normalization_forward(layer, layer.call, (inputs,), {}, saved)
    want = layer.call(inputs)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(
        ops.convert_to_numpy(ops.cast(got, "float32")),
        ops.convert_to_numpy(ops.cast(want, "float32")),
    )
    axis = layer.axis % 4
    grouped = np.moveaxis(ops.convert_to_numpy(ops.cast(inputs, "float32")), axis, -1)
    grouped = grouped.reshape(4, -1, layer.groups, 6 // layer.groups)
    mean = grouped.mean(axis=(1, 3))
    inv = 1 / np.sqrt(grouped.var(axis=(1, 3)) + layer.epsilon)
    np.testing.assert_allclose(ops.convert_to_numpy(saved["mean"]), mean, rtol=1e-5)
    np.testing.assert_allclose(ops.convert_to_numpy(saved["inv"]), inv, rtol=1e-4)


class _DiscardsALayer(keras.Model):
    def __init__(self):
        super().__init__()
        self.used = L.Dense(3)
        self.discarded = L.Dense(4)

    def call(self, x, training=None):
        self.discarded(x)
        return self.used(x)


def test_layer_whose_output_the_loss_does_not_use():
    """No gradient reaches the discarded layer's tap (on TensorFlow its
    handler then runs after the backward pass): zero norms and sums."""
    rng = np.random.RandomState(0)
    model = _DiscardsALayer()
    x = rng.rand(5, 6).astype("float32")
    model(x)
    assert sorted(e.layer.name for e in per_example.build_plan(model)) == sorted(
        [model.used.name, model.discarded.name]
    )
    assert_matches_brute_force(model, x, _labels(5))
    squared, _, _, _, _ = fast(model, x, _labels(5))
    discarded = {id(v) for v in model.discarded.trainable_variables}
    positions = [
        k for k, v in enumerate(model.trainable_variables) if id(v) in discarded
    ]
    assert len(positions) == 2
    for k in positions:
        np.testing.assert_array_equal(ops.convert_to_numpy(squared[k]), 0.0)


def test_choose_method():
    assert linear.choose_method(1, 784, 512) == "ghost"
    # Long sequences, small layer: instantiate (2 T^2 >= p d).
    assert linear.choose_method(676, 9, 32) == "instantiate"
    # Per-example gradient no bigger than the activations: instantiate.
    assert linear.choose_method(128, 128, 512) == "instantiate"
    # Short sequence, wide layer: ghost.
    assert linear.choose_method(8, 1024, 1024) == "ghost"
    assert linear.choose_method(None, 64, 64) == "ghost"


def _one_example_losses(model, y, y_pred, sw):
    """Each example's loss from the compiled loss on a one-example batch."""
    out = []
    for i in range(len(y_pred)):
        out.append(
            float(
                model.compute_loss(
                    y=y[i : i + 1],
                    y_pred=y_pred[i : i + 1],
                    sample_weight=None if sw is None else sw[i : i + 1],
                )
            )
        )
    return np.array(out)


@pytest.mark.parametrize(
    "loss, loss_weights, out_shape, sw_shape",
    [
        (
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            None,
            (3,),
            None,
        ),
        ("categorical_crossentropy", 0.5, (4,), (12,)),
        ("binary_crossentropy", None, (1,), (12, 1)),
        (
            keras.losses.BinaryFocalCrossentropy(gamma=1.5, label_smoothing=0.1),
            None,
            (5, 2),
            (12, 5),
        ),
        ("mse", None, (6, 3), (12, 6)),
        (keras.losses.Huber(delta=0.3), 2.0, (2, 3, 2), None),
        (keras.losses.CosineSimilarity(), None, (7,), None),
        ("sparse_categorical_crossentropy", None, (5, 4), (12, 5)),
    ],
)
def test_batched_example_losses_equal_one_example_batches(
    loss, loss_weights, out_shape, sw_shape
):
    """One call of the compiled loss on the batch gives each example's loss
    as the loss of that example alone: sequence outputs averaged per
    example, sample weights of every rank, loss weights, and exactly 0 for
    rows whose weights are all 0."""
    rng = np.random.default_rng(2)
    n = 12
    model = keras.Sequential([keras.Input((3,)), L.Dense(1)])
    model.compile(loss=loss, loss_weights=loss_weights)
    y_pred = rng.random((n,) + out_shape).astype("float32") * 0.8 + 0.1
    if "sparse" in str(getattr(loss, "name", loss)):
        y = rng.integers(0, out_shape[-1], (n,) + out_shape[:-1]).astype("int32")
    elif out_shape[-1] == 1 or "binary" in str(getattr(loss, "name", loss)):
        y = rng.integers(0, 2, (n,) + out_shape).astype("float32")
    else:
        y = rng.random((n,) + out_shape).astype("float32")
    sw = None
    if sw_shape is not None:
        sw = rng.random(sw_shape).astype("float32")
        sw[3] = 0.0
    losses = example_losses.batched_example_losses(
        model,
        ops.convert_to_tensor(y),
        ops.convert_to_tensor(y_pred),
        None if sw is None else ops.convert_to_tensor(sw),
    )
    assert losses is not None
    np.testing.assert_allclose(
        ops.convert_to_numpy(losses),
        _one_example_losses(model, y, y_pred, sw),
        rtol=1e-5,
        atol=1e-7,
    )
    if sw is not None:
        assert float(ops.convert_to_numpy(losses)[3]) == 0.0


class _OwnLoss(keras.Model):
    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        return ops.mean(ops.square(y_pred - y))


def _mean_over_batch(y_true, y_pred):
    return ops.mean(y_pred - y_true)


@pytest.mark.parametrize(
    "case",
    [
        "own_loss_function",
        "dice",
        "axis",
        "compute_loss",
        "two_outputs",
        "mask",
        "ignore_class",
    ],
)
def test_batched_example_losses_only_where_exact(case):
    """Losses that may mix examples or weigh them by the batch (user
    functions, `dice`, another axis, masks, `ignore_class`), an overridden
    `compute_loss` and several outputs: None, so the step maps the compiled
    loss over the examples, and trains like the vmap path. (Under a
    `tf.distribute` strategy both give each example's own loss, unscaled
    from Keras's 1/replicas: `tests/test_tf_distribute.py`.)"""
    n = 8
    inputs = keras.Input((3,))
    outputs = L.Dense(2)(inputs)
    model = (_OwnLoss if case == "compute_loss" else keras.Model)(inputs, outputs)
    y = np.random.default_rng(0).random((n, 2)).astype("float32")
    y_pred = ops.convert_to_tensor(y[::-1].copy())
    loss = {
        "own_loss_function": _mean_over_batch,
        "dice": keras.losses.Dice(),
        "axis": keras.losses.CategoricalCrossentropy(axis=0),
        "ignore_class": keras.losses.SparseCategoricalCrossentropy(ignore_class=0),
    }.get(case, "mse")
    if case == "two_outputs":
        model = keras.Model(inputs, [outputs, L.Dense(1)(inputs)])
        model.compile(loss=["mse", "mse"])
        y_true, y_pred = (y, y[:, :1]), (y_pred, y_pred[:, :1])
    else:
        model.compile(loss=loss)
        y_true = y
    if case == "ignore_class":
        y_true = np.zeros((n,), "int32")
    if case == "mask":
        y_pred = L.Masking(0.5)(y_pred)
        if masking.get_keras_mask(y_pred) is None:
            pytest.skip("this backend's tensors carry no Keras mask here")
    assert (
        example_losses.batched_example_losses(
            model,
            keras.tree.map_structure(ops.convert_to_tensor, y_true),
            y_pred,
            None,
        )
        is None
    )


_MIRRORED_REPLICAS_CHECK = """
import os
os.environ["KERAS_BACKEND"] = "tensorflow"
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2
)
import keras
from keras_dp.per_example import losses as example_losses
from keras_dp.backend import tensorflow as tf_backend

inputs = keras.Input((3,))
model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
model.compile(loss="mse")
y = np.random.default_rng(0).random((8, 2)).astype("float32")
y_pred = tf.constant(y[::-1].copy())
mapping = list(zip(model.trainable_variables, model.trainable_variables))
x = np.zeros((1, 3), "float32")

def losses():
    batched = example_losses.batched_example_losses(model, y, y_pred, None)
    one = example_losses.example_loss(model, mapping, x, y[:1], y_pred[:1], None)
    return tf_backend.replicas_in_sync(), batched, one

replicas, batched, one = losses()
assert replicas == 1
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])

def in_replica():
    replicas, batched, one = losses()
    return tf.constant(replicas), batched, one

per_replica = strategy.run(tf.function(in_replica))
for got in zip(*(strategy.experimental_local_results(t) for t in per_replica)):
    assert int(got[0]) == 2, int(got[0])
    np.testing.assert_allclose(got[1].numpy(), batched.numpy(), rtol=1e-6)
    np.testing.assert_allclose(got[2].numpy(), one.numpy(), rtol=1e-6)
print("ok")
"""


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="tf.distribute strategies are TensorFlow's",
)
def test_example_losses_are_unscaled_under_mirrored_strategy():
    """Under a real MirroredStrategy of two CPU devices (own process: the
    logical devices must be set before TensorFlow starts), the backend
    counts two replicas, and an example's loss, batched or through Keras's
    `compute_loss` (which scales it by 1/2 there), is the one it has
    without the strategy."""
    result = subprocess.run(
        [sys.executable, "-c", _MIRRORED_REPLICAS_CHECK],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def _shared_layer_model():
    shared = L.Dense(5, activation="tanh")
    inputs = keras.Input((5,))
    h = shared(shared(inputs))
    return keras.Model(inputs, L.Dense(3)(h))


@pytest.mark.parametrize(
    "build, reason",
    [
        (_shared_layer_model, "more than once"),
        (
            lambda: keras.Sequential(
                [keras.Input((5,)), L.Dense(4, activity_regularizer="l2"), L.Dense(3)]
            ),
            "activity regularizer",
        ),
    ],
)
def test_unsupported_models_fall_back_to_vmap(build, reason):
    x = np.random.RandomState(0).rand(16, 5).astype("float32")
    y = _labels(16)
    weights = {}
    for mode in ("auto", "vmap"):
        keras.utils.set_random_seed(3)
        model = keras_dp.make_private(build(), per_example=mode, poisson_sampling=False)
        model.compile(
            optimizer=keras_dp.DPSGD(
                learning_rate=0.5, noise_multiplier=0.0, l2_norm_clip=0.1
            ),
            loss=_loss(),
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
            model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
        fallbacks = [
            str(w.message)
            for w in caught
            if "fast per-example path does not support" in str(w.message)
        ]
        weights[mode] = [
            ops.convert_to_numpy(v.value) for v in model.trainable_variables
        ]
        if mode == "auto":
            path, why = model._keras_dp.per_example_path
            assert path == "vmap" and reason in why
            # Once per model, however often the step is traced, with the
            # reason and the way to silence it.
            assert len(fallbacks) == 1, fallbacks
            assert reason in fallbacks[0]
            assert "per_example='vmap'" in fallbacks[0]
        else:
            assert fallbacks == []
            assert model._keras_dp.per_example_path == ("vmap", "per_example='vmap'")
    for a, b in zip(weights["auto"], weights["vmap"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(Exception, match="does not support"):
        model = keras_dp.make_private(build(), per_example="fast")
        model.compile(optimizer=keras_dp.DPSGD(noise_multiplier=0.0), loss=_loss())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(x, y, batch_size=8, epochs=1, verbose=0)


def test_per_example_option_validated():
    with pytest.raises(ValueError, match="per_example"):
        keras_dp.make_private(
            keras.Sequential([keras.Input((2,)), L.Dense(1)]), per_example="x"
        )


def _train_model(dropout):
    return keras.Sequential(
        [
            keras.Input((6, 4)),
            L.Conv1D(5, 3, padding="same", activation="relu"),
            L.Dropout(dropout),
            L.LayerNormalization(),
            L.Dense(6, activation="relu"),
            L.Flatten(),
            L.Dense(3),
        ]
    )


@pytest.mark.parametrize(
    "clipping, microbatch_size, poisson",
    [
        ("flat", None, False),
        ("auto", None, False),
        ("global", None, False),
        ("flat", 8, False),
        ("flat", None, True),
    ],
)
def test_train_step_fast_equals_vmap(clipping, microbatch_size, poisson):
    rng = np.random.RandomState(0)
    x = rng.rand(48, 6, 4).astype("float32")
    y = _labels(48)
    sample_weight = np.ones(48, "float32")
    sample_weight[::5] = 0.0  # zero-weight rows contribute nothing
    kwargs = {} if clipping == "global" else {"l2_norm_clip": 0.2}
    if clipping == "global":
        kwargs = {"l2_norm_clip": 0.5, "global_clip_threshold": 2.0}
    weights, paths = {}, {}
    for mode in ("auto", "vmap"):
        keras.utils.set_random_seed(5)
        model = keras_dp.make_private(
            _train_model(0.0),
            per_example=mode,
            microbatch_size=microbatch_size,
            poisson_sampling=poisson,
        )
        model._keras_dp.sampling_seed = 11
        model.compile(
            optimizer=keras_dp.DPSGD(
                learning_rate=0.5, noise_multiplier=0.0, clipping=clipping, **kwargs
            ),
            loss=_loss(),
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(
                x,
                y,
                sample_weight=sample_weight,
                batch_size=16,
                epochs=1,
                verbose=0,
                shuffle=False,
            )
        weights[mode] = [
            ops.convert_to_numpy(v.value) for v in model.trainable_variables
        ]
        paths[mode] = model._keras_dp.per_example_path
    assert paths["auto"] == ("fast", None)
    for a, b in zip(weights["auto"], weights["vmap"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("microbatch_size", [None, 8])
def test_dropout_trains_and_advances_seed_state(microbatch_size):
    x = np.random.RandomState(0).rand(32, 6, 4).astype("float32")
    y = _labels(32)
    states = {}
    for mode in ("auto", "vmap"):
        keras.utils.set_random_seed(5)
        model = keras_dp.make_private(
            _train_model(0.5),
            per_example=mode,
            microbatch_size=microbatch_size,
            poisson_sampling=False,
        )
        model.compile(
            optimizer=keras_dp.DPSGD(learning_rate=0.1, noise_multiplier=0.0),
            loss=_loss(),
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            history = model.fit(x, y, batch_size=16, epochs=1, verbose=0)
        assert np.isfinite(history.history["loss"][0])
        states[mode] = [
            ops.convert_to_numpy(v.value) for v in model.non_trainable_variables
        ]
    for a, b in zip(states["auto"], states["vmap"]):
        np.testing.assert_array_equal(a, b)
