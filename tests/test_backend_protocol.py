"""Backend modules provide every member of `BackendOps` and import nothing
above them."""

import ast
import inspect
import pathlib

import keras
import numpy as np
import pytest

from keras_dp import backend as backend_lib
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
