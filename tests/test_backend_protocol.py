"""Backend modules provide every member of `BackendOps` and import nothing
above them."""

import ast
import inspect
import pathlib

import keras
import numpy as np
import pytest

from keras_dp import backend as backend_lib
from keras_dp import keras_compat
from keras_dp.backend import protocol

BACKEND_DIR = pathlib.Path(backend_lib.__file__).parent
# What a backend module may import from keras_dp: the compiled kernels and
# the Keras internals, both below it.
ALLOWED_KERAS_DP_IMPORTS = {"keras_dp.native", "keras_dp.keras_compat"}


def _protocol_signature(name):
    signature = inspect.signature(getattr(protocol.BackendOps, name))
    parameters = list(signature.parameters.values())[1:]  # self
    return signature.replace(parameters=parameters)


def test_member_names_lists_functions_and_constants():
    names = protocol.member_names()
    assert {"value_and_grad", "scan", "standard_normal"} <= set(names)
    assert "GROUPED_CONV_MIN_POSITIONS" in names
    assert "member_names" not in names


@pytest.mark.parametrize("name", protocol.member_names())
def test_current_backend_provides_member(name):
    module = backend_lib.get_backend_module()
    assert hasattr(module, name), (
        f"keras_dp/backend/{keras.backend.backend()}.py has no {name!r}; "
        "every member of keras_dp.backend.protocol.BackendOps must exist "
        "(return None where the backend has no fast version)."
    )
    expected = getattr(protocol.BackendOps, name, None)
    if not callable(expected):
        annotation = protocol.BackendOps.__annotations__[name]
        assert isinstance(getattr(module, name), annotation)
        return
    wanted = _protocol_signature(name)
    got = inspect.signature(getattr(module, name))
    assert list(got.parameters)[: len(wanted.parameters)] == list(wanted.parameters), (
        f"{name}{got} does not take the protocol's arguments {wanted}"
    )
    for extra in list(got.parameters.values())[len(wanted.parameters) :]:
        assert extra.default is not inspect.Parameter.empty, (
            f"{name}: extra argument {extra.name!r} needs a default"
        )


def test_current_backend_is_a_backend_ops():
    assert isinstance(backend_lib.get_backend_module(), protocol.BackendOps)


def _keras_dp_imports(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                found.append("." * node.level + (node.module or ""))
            elif node.module == "keras_dp":
                found += [f"keras_dp.{alias.name}" for alias in node.names]
            else:
                found.append(node.module)
    return [name for name in found if name.startswith(("keras_dp", "."))]


@pytest.mark.parametrize("module", sorted(backend_lib.SUPPORTED_BACKENDS))
def test_backend_module_imports_nothing_above_it(module):
    imports = _keras_dp_imports(BACKEND_DIR / f"{module}.py")
    outside = [
        name
        for name in imports
        if not any(
            name == allowed or name.startswith(allowed + ".")
            for allowed in ALLOWED_KERAS_DP_IMPORTS
        )
    ]
    assert not outside, (
        f"keras_dp/backend/{module}.py imports {outside}; backend modules "
        f"may import only {sorted(ALLOWED_KERAS_DP_IMPORTS)} from keras_dp."
    )


def test_protocol_imports_nothing_from_keras_dp():
    assert _keras_dp_imports(BACKEND_DIR / "protocol.py") == []


def test_multiply_no_nan_zeroes_non_finite_values_where_y_is_zero():
    module = backend_lib.get_backend_module()
    x = keras.ops.convert_to_tensor(np.array([[np.inf, 2.0], [np.nan, 3.0]], "float32"))
    y = keras.ops.convert_to_tensor(np.array([[0.0], [2.0]], "float32"))
    result = keras.ops.convert_to_numpy(module.multiply_no_nan(x, y))
    np.testing.assert_array_equal(result[0], [0.0, 0.0])
    assert np.isnan(result[1, 0]) and result[1, 1] == 6.0


def test_vectorizable_layers_restores_the_model():
    module = backend_lib.get_backend_module()
    model = keras.Sequential([keras.Input((5, 2)), keras.layers.SimpleRNN(3)])
    rnn = model.layers[0]
    with module.vectorizable_layers(model):
        pass
    assert rnn.unroll is False


def test_optional_fast_ops_return_none_or_a_result():
    module = backend_lib.get_backend_module()
    x = keras.ops.ones((2, 3), "float16")
    # No backend has a float16 kernel: None, and the caller falls back.
    assert module.per_example_squared_norms(x) is None
    seed = keras.random.SeedGenerator(0)
    assert module.noisy_gradients([keras.ops.ones((3,), "float16")], 1.0, seed) is None


def test_per_example_squared_norms_are_sums_of_squares():
    """Each example's sum of squares, by the backend's own float32
    reduction where it has one (`keras.ops` otherwise), matches float64's
    to float32 rounding, for examples of several axes, a batch of none and
    values far from 1."""
    from keras_dp.per_example.rows import squared_norms

    rng = np.random.default_rng(0)
    for shape, scale in (
        ((5, 3, 7), 1.0),
        ((4, 300), 1e-12),
        ((3, 2), 1e12),
        ((0, 4), 1.0),
    ):
        x = (rng.normal(size=shape) * scale).astype("float32")
        sq = squared_norms(keras.ops.convert_to_tensor(x))
        want = np.sum(x.astype("float64") ** 2, axis=tuple(range(1, len(shape))))
        got = keras.ops.convert_to_numpy(sq)
        assert got.shape == (shape[0],)
        np.testing.assert_allclose(got, want, rtol=2e-6)


def test_after_returns_its_tensors_where_ops_run_in_program_order():
    module = backend_lib.get_backend_module()
    x = keras.ops.ones((2, 3, 4))
    gated = module.after([keras.ops.ones((2,))], [x])
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(gated[0]), np.ones((2, 3, 4))
    )
    if module.RUNS_IN_PROGRAM_ORDER:
        # Callers skip `after` there: it must change nothing.
        assert gated[0] is x


def test_shaped_like_reshapes_only_where_the_shapes_differ():
    from keras_dp.per_example.rows import shaped_like

    x = keras.ops.reshape(keras.ops.arange(6, dtype="float32"), (2, 3))
    assert shaped_like(x, keras.ops.zeros((2, 3))) is x
    y = shaped_like(x, keras.ops.zeros((3, 2)))
    assert tuple(y.shape) == (3, 2)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(y), np.arange(6, dtype="float32").reshape(3, 2)
    )


def _dropout_masks(seed_state, rows=4):
    """Masks of an unseeded Dropout layer (PyTorch: drawn from the global
    generator outside `seeded_random_ops`) from a given seed state."""
    layer = keras.layers.Dropout(0.5)
    layer.seed_generator.state.assign(seed_state)
    x = keras.ops.ones((rows, 64))
    return keras.ops.convert_to_numpy(layer(x, training=True)) != 0


def test_seeded_random_ops_draw_the_same_numbers_from_the_same_seed_state():
    module = backend_lib.get_backend_module()
    with module.seeded_random_ops():
        a = _dropout_masks([3, 0])
        b = _dropout_masks([3, 0])
        c = _dropout_masks([4, 0])
    np.testing.assert_array_equal(a, b)
    assert (a != c).mean() > 0.3  # independent masks differ in half the places
    # Outside the context, the backend's own ops are back.
    assert keras_compat.backend_random_module().dropout.__module__.startswith("keras")


def test_seeded_random_ops_distributions():
    """uniform, normal and dropout inside the context: moments and a
    Kolmogorov-Smirnov test at fixed seeds (on TensorFlow and JAX these are
    the frameworks' own samplers). n = 20000: the KS statistic's 0.1%
    critical value is 1.95 / sqrt(n) = 0.0138."""
    from scipy import stats

    module = backend_lib.get_backend_module()
    n = 20000
    with module.seeded_random_ops():
        u = keras.ops.convert_to_numpy(
            keras.random.uniform((n,), seed=keras.random.SeedGenerator(5))
        )
        z = keras.ops.convert_to_numpy(
            keras.random.normal((n,), seed=keras.random.SeedGenerator(6))
        )
        kept = keras.ops.convert_to_numpy(
            keras.random.dropout(
                keras.ops.ones((n,)), 0.25, seed=keras.random.SeedGenerator(7)
            )
        )
    assert stats.kstest(u, "uniform").statistic < 0.0138
    assert stats.kstest(z, "norm").statistic < 0.0138
    assert set(np.unique(kept)) <= {0.0, np.float32(1 / 0.75)}
    # Binomial(n, 0.75): 5 standard deviations.
    assert abs((kept != 0).mean() - 0.75) < 5 * np.sqrt(0.75 * 0.25 / n)


def test_seeded_random_ops_give_each_example_its_own_draw_under_vectorized_map():
    module = backend_lib.get_backend_module()
    seeds = keras.ops.convert_to_tensor(np.array([[1, 0], [2, 0], [1, 0]], "int32"))

    def one(seed_state):
        generator = keras.random.SeedGenerator(0)
        return keras.random.uniform((32,), seed=_StateSeed(generator, seed_state))

    if keras.backend.backend() != "torch":
        pytest.skip("TensorFlow and JAX vectorize their own random ops")
    with module.seeded_random_ops():
        draws = keras.ops.convert_to_numpy(keras.ops.vectorized_map(one, seeds))
    np.testing.assert_array_equal(draws[0], draws[2])
    assert not np.allclose(draws[0], draws[1])


class _StateSeed(keras.random.SeedGenerator):
    """A SeedGenerator whose next() returns a given (batched) state."""

    def __init__(self, base, state):
        self.__dict__.update(base.__dict__)
        self._given = state

    def next(self, ordered=True):
        return self._given


def test_vectorizable_layers_let_vectorized_map_run_one_hot():
    """PyTorch's own one_hot reads its input's largest value on the host,
    which torch.vmap refuses (Keras's sparse cross-entropies call it before
    Keras 3.14)."""
    module = backend_lib.get_backend_module()
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    labels = np.array([[2], [0], [-1], [3]], "int32")

    def one(row):
        return keras.ops.one_hot(row, 4)

    with module.vectorizable_layers(model):
        mapped = keras.ops.vectorized_map(one, keras.ops.convert_to_tensor(labels))
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(mapped),
        keras.ops.convert_to_numpy(keras.ops.one_hot(labels, 4)),
    )
