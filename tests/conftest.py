import gc
import os

# Must run before anything imports keras.
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Most of a JAX test's time (and of a TensorFlow test's with jit_compile)
# is XLA compiling a train step that then runs a few times on a handful of
# examples: compile it without LLVM's expensive optimization passes. The
# arithmetic stays IEEE float32 (XLA's CPU fast-math is off either way);
# results differ from an optimized build by rounding only, well inside the
# tests' tolerances. Examples run in subprocesses inherit it.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = " ".join(
        [
            os.environ.get("XLA_FLAGS", ""),
            "--xla_backend_optimization_level=0",
            "--xla_llvm_disable_expensive_passes=true",
        ]
    ).strip()

import keras  # noqa: E402
import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: slow test")


@pytest.fixture
def backend():
    return keras.backend.backend()


@pytest.fixture(scope="module", autouse=True)
def _collect_frozen_garbage():
    # Once per test module, what the tests before it froze (below) and no
    # longer use is collected: memory stays bounded by one module's tests.
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    yield


@pytest.fixture(autouse=True)
def _reset_keras_state():
    # clear_session collects the garbage of the tests before; what survives
    # is frozen too, so that each collection scans one test's objects, not
    # every object the suite has kept alive so far (on TensorFlow that
    # scan grew to more than the tests themselves took).
    keras.backend.clear_session()
    gc.freeze()
    keras.utils.set_random_seed(0)
    yield
