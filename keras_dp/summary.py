"""A readable account of a private model's DP settings and privacy spent.

```python
print(keras_dp.privacy_summary(model, delta=1e-5))
model.summary()   # a private model's summary ends with the same text
```
"""

import keras

from keras_dp import accounting
from keras_dp import arguments
from keras_dp import ledger as ledger_lib
from keras_dp.privacy_settings import is_private


def privacy_summary(model, delta=None, accountant="rdp"):
    """The DP settings of `model` and the privacy it has spent, as text.

    Args:
        model: a model passed through `keras_dp.make_private`.
        delta: the delta at which to report epsilon. Defaults to the
            optimizer's `target_delta`, else `1 / n**1.1` when the training
            set size `n` is known; without either no epsilon is shown.
        accountant: `"rdp"` or `"pld"`.

    Returns:
        A multi-line string.
    """
    arguments.instance_of("model", model, keras.Model, "a keras.Model")
    if delta is not None:
        delta = accounting.check_delta(delta)
    accountant = accounting.check_accountant(accountant)
    if not is_private(model):
        return (
            f"Model {model.name!r} is not private: pass it through "
            "keras_dp.make_private(model) and compile it with a keras_dp DP "
            "optimizer."
        )
    settings = model._keras_dp
    lines = [f"Privacy of model {model.name!r} (keras_dp)"]
    path = settings.per_example_path
    lines.append(
        "  per-example gradients: "
        + (
            f"{settings.per_example!r} (not traced yet)"
            if path is None
            else path[0] + ("" if path[1] is None else f" (fallback: {path[1]})")
        )
        + (
            ""
            if settings.microbatch_size is None
            else f", microbatches of {settings.microbatch_size}"
        )
    )
    lines.append(
        "  sampling: "
        + (
            "Poisson (in-memory arrays)"
            if settings.poisson_sampling
            else "fixed-size batches"
        )
        + (
            ""
            if settings.sample_rate is None
            else f", sample_rate={settings.sample_rate:.4g} given"
        )
    )
    optimizer = getattr(model, "optimizer", None)
    ledger = getattr(optimizer, "privacy_ledger", None)
    if not isinstance(ledger, ledger_lib.PrivacyLedger):
        lines.append("  optimizer: not compiled with a keras_dp DP optimizer")
        return "\n".join(lines)
    lines.append(f"  optimizer: {optimizer!r}")
    steps = ledger_lib.optimizer_steps(model)
    lines.append(f"  noisy updates taken: {steps}")
    unit = ledger.privacy_unit(steps)
    if unit == "user":
        lines.append(
            "  privacy unit: user (user-level DP, keras_dp.data.UserSampler: "
            "epsilon covers all the examples of one user; sample_rate is the "
            "users' rate)"
        )
    elif unit == "mixed":
        lines.append(
            "  privacy unit: mixed (example- and user-level updates: epsilon "
            "covers one example)"
        )
    for sigma, q, count in ledger.recorded_segments(steps):
        lines.append(
            f"    {count} at noise_multiplier={sigma:.4g}, sample_rate="
            + ("unknown" if q is None else f"{q:.4g}")
        )
    if delta is None:
        delta = getattr(optimizer, "target_delta", None)
    if delta is None and ledger.entries and ledger.entries[-1].get("n"):
        delta = accounting.default_delta(ledger.entries[-1]["n"])
    if delta is not None:
        try:
            epsilon = ledger.epsilon(steps, delta, accountant)
        except ValueError as error:
            lines.append(f"  epsilon: unknown ({error})")
        else:
            note = (
                " (assumes Poisson sampling)" if ledger.assumes_poisson(steps) else ""
            )
            level = " (user-level)" if unit == "user" else ""
            lines.append(
                f"  epsilon{level}: {epsilon:.4g} at delta={delta:.3g} "
                f"({accountant}){note}"
            )
    target = getattr(optimizer, "target_epsilon", None)
    if target is not None:
        lines.append(f"  target: epsilon={target} at delta={optimizer.target_delta}")
    return "\n".join(lines)
