"""The privacy ledger: what the accountant needs, kept as optimizer state.

The number of noisy updates that touched a model's weights is the ledger's
`step_offset` (updates taken by earlier optimizers of the same model) plus
the current optimizer's `iterations` variable (it counts updates, not
micro-steps, under gradient accumulation), saved with the model. The ledger
adds the change points of the noise multiplier and the sampling rate, stored
in the optimizer's config, so `model.save` -> `keras.saving.load_model` ->
`fit` continues the count, and a private model compiled again with a new DP
optimizer hands its ledger on to it (`keras_dp.make_private` does this).

After a crash the count is that of the weights restored: a checkpoint
holds `iterations` with the weights, so the updates lost after it are not
counted and those that run again are counted once. `BackupAndRestore`
(and `load_weights`) restore the variables but not the config: the
resumed process records its own setting from step 0 when `fit` starts,
which is right when it runs the same code as the crashed one (as Keras
requires of `BackupAndRestore`); `load_model` restores the change points
too (`tests/test_fault_tolerance.py` kills a run and checks both).
"""

import keras

from keras_dp import accounting
from keras_dp import keras_compat


class PrivacyLedger:
    """Change points of `(noise_multiplier, sample_rate)` over optimizer steps.

    Each entry is a dict with `start_step`, `noise_multiplier`,
    `sample_rate`, `poisson` (whether batches really were Poisson sampled;
    if not, the epsilon computed from the ledger assumes it), `n`, the
    training-set size when known, and `unit`, the privacy unit that was
    sampled and clipped: `"example"`, or `"user"` for user-level training
    (`keras_dp.data.UserSampler`: `sample_rate` is the users' rate and `n`
    counts users). Entries saved before `unit` existed read as
    `"example"`. `step_offset` counts the updates taken by earlier
    optimizers of the same model; steps are numbered from the model's
    first private update.
    """

    def __init__(self, entries=None, step_offset=0):
        if isinstance(entries, dict):
            # The saved form of `get_config`.
            step_offset = entries.get("step_offset", 0)
            entries = entries.get("entries")
        self.entries = [{"unit": "example", **dict(entry)} for entry in (entries or [])]
        self.step_offset = int(step_offset)

    def record(
        self, step, noise_multiplier, sample_rate, poisson, n=None, unit="example"
    ):
        """Notes that steps from `step` on use this setting.

        `sample_rate=None` records updates whose sampling rate is unknown
        (`train_on_batch` without `make_private(sample_rate=...)`): epsilon
        over them is refused.
        """
        if sample_rate is not None and not 0 < sample_rate <= 1:
            raise ValueError(
                f"The sample rate q = batch_size / n = {sample_rate:.4g} is "
                "outside (0, 1]. The expected batch size cannot exceed the "
                "dataset size: use a smaller batch_size."
            )
        entry = {
            "start_step": int(step),
            "noise_multiplier": float(noise_multiplier),
            "sample_rate": None if sample_rate is None else float(sample_rate),
            "poisson": bool(poisson),
            "n": None if n is None else int(n),
            "unit": _unit(unit),
        }
        if self.entries:
            last = self.entries[-1]
            same = all(last[k] == entry[k] for k in entry if k != "start_step")
            if same:
                return
            if last["start_step"] >= entry["start_step"]:
                # No step was taken with the previous setting.
                self.entries.pop()
        self.entries.append(entry)

    def recorded_segments(self, steps):
        """`(noise_multiplier, sample_rate, steps)` tuples up to `steps`, as
        recorded: a sample rate is None where it is unknown."""
        segments = []
        for k, entry in enumerate(self.entries):
            end = (
                self.entries[k + 1]["start_step"]
                if k + 1 < len(self.entries)
                else steps
            )
            count = min(end, steps) - entry["start_step"]
            if count > 0:
                segments.append(
                    (entry["noise_multiplier"], entry["sample_rate"], count)
                )
        return segments

    def segments(self, steps):
        """`(noise_multiplier, sample_rate, steps)` tuples up to `steps`.

        Raises ValueError when some of the `steps` have no recorded
        setting (noisy updates taken outside `fit` / `train_on_batch` of a
        private model) or an unknown sampling rate: their privacy cost is
        unknown.
        """
        if steps > 0 and (not self.entries or self.entries[0]["start_step"] > 0):
            first = self.entries[0]["start_step"] if self.entries else steps
            raise ValueError(
                f"The privacy ledger has no sampling rate for the first "
                f"{min(first, steps)} of the {steps} noisy updates taken, so "
                "keras_dp cannot account for them. Train a private model "
                "only through model.fit or model.train_on_batch (they record "
                "the sampling rate), or compute epsilon with "
                "keras_dp.accounting.compute_epsilon_for_segments."
            )
        segments = self.recorded_segments(steps)
        unknown = sum(count for _, q, count in segments if q is None)
        if unknown:
            raise ValueError(
                f"{unknown} of the {steps} noisy updates were taken by "
                "train_on_batch at a sampling rate keras_dp does not "
                "know, so it cannot account for them. Pass "
                "`sample_rate=batch_size / n` to keras_dp.make_private("
                "model, ...) before train_on_batch (n: the training-set "
                "size), or train with model.fit."
            )
        return segments

    def assumes_poisson(self, steps):
        """Whether any counted step used batches that were not Poisson."""
        return any(
            not entry["poisson"]
            for entry in self.entries
            if entry["start_step"] < steps
        )

    def privacy_unit(self, steps):
        """What the epsilon after `steps` updates protects: `"user"` when
        every counted update was user-level (all of one user's examples),
        `"example"` when none was, `"mixed"` otherwise (the epsilon then
        holds for one example, not for a user's examples together)."""
        units = {entry["unit"] for entry in self.entries if entry["start_step"] < steps}
        if units == {"user"}:
            return "user"
        return "mixed" if "user" in units else "example"

    def epsilon(self, steps, delta, accountant="rdp"):
        """Epsilon after `steps` noisy updates."""
        return accounting.compute_epsilon_for_segments(
            self.segments(steps), delta, accountant=accountant
        )

    def get_config(self):
        return {
            "entries": [dict(entry) for entry in self.entries],
            "step_offset": self.step_offset,
        }


PRIVACY_UNITS = ("example", "user")


def _unit(unit):
    if unit not in PRIVACY_UNITS:
        raise ValueError(
            f"The privacy unit of a ledger entry must be one of "
            f"{PRIVACY_UNITS}. Received: unit={unit!r}."
        )
    return unit


def optimizer_steps(model):
    """Noisy updates that touched the model's weights so far (those of
    earlier optimizers included), also in the middle of a JAX `fit`."""
    optimizer = model.optimizer
    return optimizer.privacy_ledger.step_offset + optimizer_updates(optimizer, model)


def optimizer_updates(optimizer, model=None):
    """Updates `optimizer` itself has applied.

    In the middle of a JAX `fit` the trainer keeps the live state outside
    the variables; reading it from there avoids a full state sync.
    """
    values = None if model is None else keras_compat.live_optimizer_variables(model)
    if values is not None:
        iterations = keras_compat.optimizer_iterations(optimizer)
        for variable, value in zip(optimizer.variables, values):
            if variable is iterations:
                steps = optimizer.gradient_accumulation_steps or 1
                return int(value) // steps
    if not optimizer.built:
        return 0
    return int(keras.ops.convert_to_numpy(optimizer.iterations))
