"""The package's structure, checked: module sizes, Keras internals behind
one module, no call-stack inspection, nothing that points outside the
repository. (Import cycles are checked by import-linter: `make
lint-imports`.)"""

import ast
import pathlib
import re

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "keras_dp"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_LINES = 800


@pytest.fixture(autouse=True)
def _reset_keras_state():
    """Overrides conftest's: these tests read source files and build no
    Keras state, so they skip its `clear_session` and garbage collection."""
    yield


def _relative(path):
    return str(path.relative_to(PACKAGE.parent))


@pytest.mark.parametrize("path", MODULES, ids=_relative)
def test_no_module_is_over_800_lines(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{_relative(path)} has {lines} lines"


@pytest.mark.parametrize("path", MODULES, ids=_relative)
def test_no_call_stack_inspection(path):
    source = path.read_text()
    for pattern in (
        "_getframe",
        "inspect.stack",
        "inspect.currentframe",
        "f_back",
        "f_locals",
    ):
        assert pattern not in source, f"{_relative(path)} uses {pattern}"


@pytest.mark.parametrize("path", MODULES, ids=_relative)
def test_keras_internals_only_through_keras_compat(path):
    if path.name == "keras_compat.py":
        return
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            names = [f"{node.value.id}.{node.attr}"]
        for name in names:
            assert not name.startswith("keras.src"), (
                f"{_relative(path)}:{node.lineno} uses {name}; go through "
                "keras_dp.keras_compat"
            )


_OUTSIDE = re.compile(r"ALGORITHMS\.md|shared/|\bspec section|\.\./")


@pytest.mark.parametrize("path", MODULES, ids=_relative)
def test_nothing_points_outside_the_repository(path):
    for number, line in enumerate(path.read_text().splitlines(), 1):
        assert not _OUTSIDE.search(line), f"{_relative(path)}:{number}: {line.strip()}"


def test_the_version_is_the_installed_package_metadata():
    import importlib.metadata
    import tomllib

    import keras_dp

    pyproject = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
    assert keras_dp.__version__ == importlib.metadata.version("keras-dp")
    assert keras_dp.__version__ == pyproject["project"]["version"]
