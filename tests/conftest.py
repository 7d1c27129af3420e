import os

# Must run before anything imports keras.
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: slow test")


@pytest.fixture
def backend():
    return keras.backend.backend()


@pytest.fixture(autouse=True)
def _reset_keras_state():
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    yield
