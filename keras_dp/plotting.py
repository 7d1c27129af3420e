"""Figures of private training: epsilon per epoch, accuracy against epsilon.

```python
from keras_dp import plotting

history = model.fit(x, y, epochs=10,
                    callbacks=[keras_dp.EpsilonLogger(delta=1e-5)])
plotting.plot_epsilon(history, path="epsilon.png")
plotting.plot_accuracy_vs_epsilon(
    {"DP-SGD": [(1.0, 0.57), (8.0, 0.79)], "non-private": [(None, 0.95)]},
    path="accuracy.png",
)
```

matplotlib is optional: `pip install "keras-dp[plots]"`. It is imported
only when a function here is called. Without a figure of your own (`ax`),
each function draws on a new figure: a pyplot figure when your program has
imported `matplotlib.pyplot` (so `plt.show()` shows it), else a bare
`matplotlib.figure.Figure`, which saves to a file with the Agg canvas and
needs no display.
"""

import math
import sys

INSTALL_HINT = 'pip install "keras-dp[plots]"'


def _matplotlib_figure():
    try:
        from matplotlib import figure
    except ImportError as error:
        raise ImportError(
            "keras_dp.plotting needs matplotlib, which is not installed. "
            f"Install it with: {INSTALL_HINT} (or pip install matplotlib)."
        ) from error
    return figure


def _new_axes():
    figure = _matplotlib_figure()
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        return pyplot.subplots()[1]
    return figure.Figure().add_subplot()


def _finish(ax, path, title):
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    if path is not None:
        ax.figure.savefig(path, bbox_inches="tight")
    return ax


def _logs(history):
    """`history.history` of a Keras `History`, or a dict of logs itself."""
    logs = getattr(history, "history", history)
    if not isinstance(logs, dict):
        raise TypeError(
            "Pass the `History` that `model.fit` returns (or its "
            f"`history.history` dict). Received: {type(history).__name__}."
        )
    return logs


def epsilon_curve(history):
    """The `(epochs, epsilons)` that `plot_epsilon` draws.

    `epochs` counts from 1 (epsilon after the first epoch is at 1); a
    `History` of a `fit` resumed with `initial_epoch` keeps its own epoch
    numbers.

    Raises:
        ValueError: when the logs have no `epsilon` (train with
            `keras_dp.EpsilonLogger` among the callbacks).
    """
    logs = _logs(history)
    if "epsilon" not in logs:
        raise ValueError(
            "The training logs have no `epsilon`: pass "
            "callbacks=[keras_dp.EpsilonLogger(delta=...)] to the private "
            "model's fit. Logged keys: " + ", ".join(sorted(logs)) + "."
        )
    epsilons = [float(e) for e in logs["epsilon"]]
    epochs = list(getattr(history, "epoch", None) or range(len(epsilons)))
    return [int(e) + 1 for e in epochs[: len(epsilons)]], epsilons


def plot_epsilon(history, ax=None, path=None, label=None, title=None):
    """Plots the privacy spent, epsilon, against the epoch.

    ```python
    history = model.fit(..., callbacks=[keras_dp.EpsilonLogger(delta=1e-5)])
    ax = keras_dp.plotting.plot_epsilon(history, path="epsilon.png")
    ax.figure  # the matplotlib Figure
    ```

    Call it again with the same `ax` (and a `label` each) to compare runs
    on one figure.

    Args:
        history: the `History` that `fit` returns, or its `history` dict,
            with the `epsilon` that `keras_dp.EpsilonLogger` logs at the
            end of each epoch.
        ax: a matplotlib `Axes` to draw on (None: a new figure).
        path: optional file to save the figure to (`.png`, `.pdf`, ...).
        label: the line's name in the legend.
        title: the figure's title.

    Returns:
        The matplotlib `Axes` (its figure is `ax.figure`).

    Raises:
        ImportError: matplotlib is missing (`pip install "keras-dp[plots]"`).
        ValueError: the logs have no `epsilon`.
    """
    epochs, epsilons = epsilon_curve(history)
    if ax is None:
        ax = _new_axes()
    ax.plot(epochs, epsilons, marker="o", label=label)
    from matplotlib import ticker

    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("epsilon")
    return _finish(ax, path, title)


def _series(results):
    """`[(name, [(epsilon, accuracy, std or None), ...]), ...]` from a dict
    or one list of `(epsilon, accuracy[, std])` points."""
    if isinstance(results, dict):
        items = list(results.items())
    else:
        items = [(None, results)]
    series = []
    for name, points in items:
        pairs = []
        for point in points:
            try:
                epsilon, accuracy, *spread = point
                if len(spread) > 1:
                    raise ValueError
            except (TypeError, ValueError):
                raise ValueError(
                    "Each result is an (epsilon, accuracy) pair or an "
                    "(epsilon, accuracy, std) triple; use epsilon None for a "
                    f"non-private run. Received: {point!r}."
                ) from None
            std = float(spread[0]) if spread and spread[0] is not None else None
            pairs.append((epsilon, float(accuracy), std))
        series.append((name, pairs))
    return series


def _is_private(epsilon):
    return epsilon is not None and math.isfinite(float(epsilon))


def plot_accuracy_vs_epsilon(
    results, ax=None, path=None, title=None, xlabel="epsilon", ylabel="accuracy"
):
    """Plots accuracy against epsilon, one line per method.

    ```python
    keras_dp.plotting.plot_accuracy_vs_epsilon(
        {
            "DP-LoRA": [(3.0, 0.86), (8.0, 0.88)],
            "full fine-tuning": [(3.0, 0.84), (8.0, 0.87)],
            "non-private": [(None, 0.93)],
        },
        path="accuracy_vs_epsilon.png",
    )
    ```

    Points are joined in order of epsilon. A point may carry the spread of
    its accuracy over seeds, `(epsilon, mean, std)`: it gets an error bar of
    one std each side. A run with epsilon None or infinite (no privacy) has
    no place on the epsilon axis: it is drawn as a dashed horizontal line at
    its accuracy, with a band of one std each side where it has one.

    Args:
        results: `{method name: [(epsilon, accuracy), ...]}` (or `(epsilon,
            accuracy, std)` triples), or one list of such points.
        ax: a matplotlib `Axes` to draw on (None: a new figure).
        path: optional file to save the figure to.
        title: the figure's title.
        xlabel: the x axis' label.
        ylabel: the y axis' label.

    Returns:
        The matplotlib `Axes` (its figure is `ax.figure`).

    Raises:
        ImportError: matplotlib is missing (`pip install "keras-dp[plots]"`).
        ValueError: a result is not an `(epsilon, accuracy)` pair or an
            `(epsilon, accuracy, std)` triple.
    """
    series = _series(results)
    if ax is None:
        ax = _new_axes()
    for name, pairs in series:
        private = sorted((float(e), a, s) for e, a, s in pairs if _is_private(e))
        if private:
            (line,) = ax.plot(
                [e for e, _, _ in private],
                [a for _, a, _ in private],
                marker="o",
                label=name,
            )
            if any(s is not None for _, _, s in private):
                ax.errorbar(
                    [e for e, _, _ in private],
                    [a for _, a, _ in private],
                    yerr=[s or 0.0 for _, _, s in private],
                    fmt="none",
                    capsize=3,
                    color=line.get_color(),
                )
        for epsilon, accuracy, std in pairs:
            if not _is_private(epsilon):
                ax.axhline(
                    accuracy,
                    linestyle="--",
                    color="gray",
                    label=name if not private else f"{name} (no privacy)",
                )
                if std is not None:
                    ax.axhspan(accuracy - std, accuracy + std, color="gray", alpha=0.15)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return _finish(ax, path, title)
