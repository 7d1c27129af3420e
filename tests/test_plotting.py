"""keras_dp.plotting draws what the training logged, and says how to install
matplotlib when it is missing."""

import math
import sys

import keras
import numpy as np
import pytest

import keras_dp
from keras_dp import plotting

pytest.importorskip("matplotlib")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def private_history(epochs=3):
    """A real History: a small private regression, EpsilonLogger on."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = x @ rng.normal(size=(4, 1)).astype("float32")
    model = keras_dp.make_private(
        keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    )
    model.compile(
        optimizer=keras_dp.DPSGD(learning_rate=0.05, noise_multiplier=1.2, seed=1),
        loss="mse",
    )
    return model.fit(
        x,
        y,
        batch_size=16,
        epochs=epochs,
        verbose=0,
        callbacks=[keras_dp.EpsilonLogger(delta=1e-5)],
    )


def assert_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE


def test_plot_epsilon_draws_the_logged_epsilon(tmp_path):
    history = private_history(epochs=3)
    logged = history.history["epsilon"]
    assert len(logged) == 3 and logged == sorted(logged) and logged[0] > 0
    path = tmp_path / "epsilon.png"
    ax = plotting.plot_epsilon(history, path=str(path), label="run")
    (line,) = ax.get_lines()
    np.testing.assert_array_equal(line.get_xdata(), [1, 2, 3])
    np.testing.assert_allclose(line.get_ydata(), logged)
    assert line.get_label() == "run"
    assert ax.get_xlabel() == "epoch" and ax.get_ylabel() == "epsilon"
    assert_png(path)


def test_plot_epsilon_accepts_the_logs_dict_and_an_axes():
    first = {"epsilon": [0.5, 0.9], "loss": [1.0, 0.5]}
    ax = plotting.plot_epsilon(first, label="a")
    plotting.plot_epsilon({"epsilon": [0.2, 0.3, 0.4]}, ax=ax, label="b")
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["a", "b"]
    np.testing.assert_allclose(lines[1].get_ydata(), [0.2, 0.3, 0.4])
    np.testing.assert_array_equal(lines[1].get_xdata(), [1, 2, 3])


def test_plot_epsilon_keeps_the_epochs_of_a_resumed_fit():
    class Resumed:  # what History holds after fit(initial_epoch=2)
        history = {"epsilon": [1.0, 1.5]}
        epoch = [2, 3]

    xs, ys = plotting.epsilon_curve(Resumed())
    assert xs == [3, 4] and ys == [1.0, 1.5]


def test_plot_epsilon_without_epsilon_says_to_add_the_logger():
    with pytest.raises(ValueError, match="EpsilonLogger") as info:
        plotting.plot_epsilon({"loss": [1.0]})
    assert "loss" in str(info.value)
    with pytest.raises(TypeError, match="History"):
        plotting.plot_epsilon([1.0, 2.0])


def test_plot_accuracy_vs_epsilon_sorts_points_and_draws_baselines(tmp_path):
    results = {
        "DP-LoRA": [(8.0, 0.88), (3.0, 0.85)],
        "full": [(3, 0.80), (8, 0.86), (math.inf, 0.93)],
        "non-private": [(None, 0.94)],
    }
    path = tmp_path / "accuracy.png"
    ax = plotting.plot_accuracy_vs_epsilon(results, path=str(path))
    lines = {line.get_label(): line for line in ax.get_lines()}
    np.testing.assert_allclose(lines["DP-LoRA"].get_xdata(), [3.0, 8.0])
    np.testing.assert_allclose(lines["DP-LoRA"].get_ydata(), [0.85, 0.88])
    np.testing.assert_allclose(lines["full"].get_ydata(), [0.80, 0.86])
    # Runs without privacy: horizontal lines at their accuracy.
    np.testing.assert_allclose(lines["non-private"].get_ydata(), [0.94, 0.94])
    np.testing.assert_allclose(lines["full (no privacy)"].get_ydata(), [0.93, 0.93])
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert set(legend) == set(lines)
    assert_png(path)


def test_plot_accuracy_vs_epsilon_takes_one_list_and_checks_pairs():
    ax = plotting.plot_accuracy_vs_epsilon([(2.0, 0.6), (1.0, 0.5)], title="t")
    (line,) = ax.get_lines()
    np.testing.assert_allclose(line.get_xdata(), [1.0, 2.0])
    assert ax.get_title() == "t"
    with pytest.raises(ValueError, match=r"\(epsilon, accuracy, std\) triple"):
        plotting.plot_accuracy_vs_epsilon({"a": [(1.0, 0.5, 0.1, 3)]})


def test_plot_accuracy_vs_epsilon_draws_one_std_each_side():
    ax = plotting.plot_accuracy_vs_epsilon(
        {
            "DP": [(8.0, 0.9, 0.02), (1.0, 0.7, 0.05)],
            "non-private": [(None, 0.95, 0.01)],
        }
    )
    (bars,) = ax.containers
    # The error bars of the sorted points: [mean - std, mean + std].
    (segments,) = bars.lines[2]
    ends = np.array([s[:, 1] for s in segments.get_segments()])
    np.testing.assert_allclose(ends, [[0.65, 0.75], [0.88, 0.92]])
    from matplotlib import colors

    line = next(line for line in ax.get_lines() if line.get_label() == "DP")
    np.testing.assert_allclose(
        segments.get_color()[0][:3], colors.to_rgb(line.get_color())
    )
    # The non-private run's band (a Rectangle or, in older matplotlib, a
    # Polygon).
    (band,) = ax.patches
    if hasattr(band, "get_height"):
        low, high = band.get_y(), band.get_y() + band.get_height()
    else:
        low, high = band.get_xy()[:, 1].min(), band.get_xy()[:, 1].max()
    np.testing.assert_allclose([low, high], [0.94, 0.96])


def test_missing_matplotlib_says_how_to_install(monkeypatch):
    # A None entry in sys.modules makes `import matplotlib` fail, as it
    # does where matplotlib is not installed.
    for name in list(sys.modules):
        if name == "matplotlib" or name.startswith("matplotlib."):
            monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    for call in (
        lambda: plotting.plot_epsilon({"epsilon": [1.0]}),
        lambda: plotting.plot_accuracy_vs_epsilon([(1.0, 0.5)]),
    ):
        with pytest.raises(ImportError, match=r'pip install "keras-dp\[plots\]"'):
            call()
