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


def pytest_collection_finish(session):
    # The frameworks, Keras, keras_dp and the test modules, all imported by
    # now, live until the end: keep their objects out of the full garbage
    # collection that `clear_session` runs before every test, which then
    # scans only what the tests themselves create.
    gc.collect()
    gc.freeze()


@pytest.fixture
def backend():
    return keras.backend.backend()


@pytest.fixture(autouse=True)
def _reset_keras_state():
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    yield
