"""The privacy ledger: what the accountant needs, kept as optimizer state.

The number of noisy updates is the optimizer's `iterations` variable (it
counts updates, not micro-steps, under gradient accumulation), saved with the
model. The ledger adds the change points of the noise multiplier and the
sampling rate, stored in the optimizer's config, so `model.save` ->
`keras.saving.load_model` -> `fit` continues the count.
"""

import keras

from keras_dp import accounting


class PrivacyLedger:
    """Change points of `(noise_multiplier, sample_rate)` over optimizer steps.

    Each entry is a dict with `start_step`, `noise_multiplier`,
    `sample_rate`, `poisson` (whether batches really were Poisson sampled;
    if not, the epsilon computed from the ledger assumes it) and `n`, the
    training-set size when known.
    """

    def __init__(self, entries=None):
        self.entries = [dict(entry) for entry in (entries or [])]

    def record(self, step, noise_multiplier, sample_rate, poisson, n=None):
        """Notes that steps from `step` on use this setting."""
        if not 0 < sample_rate <= 1:
            raise ValueError(
                f"The sample rate q = batch_size / n = {sample_rate:.4g} is "
                "outside (0, 1]. The expected batch size cannot exceed the "
                "dataset size: use a smaller batch_size."
            )
        entry = {
            "start_step": int(step),
            "noise_multiplier": float(noise_multiplier),
            "sample_rate": float(sample_rate),
            "poisson": bool(poisson),
            "n": None if n is None else int(n),
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

    def segments(self, steps):
        """`(noise_multiplier, sample_rate, steps)` tuples up to `steps`."""
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

    def assumes_poisson(self, steps):
        """Whether any counted step used batches that were not Poisson."""
        return any(
            not entry["poisson"]
            for entry in self.entries
            if entry["start_step"] < steps
        )

    def epsilon(self, steps, delta, accountant="rdp"):
        """Epsilon after `steps` noisy updates."""
        if steps > 0 and not self.entries:
            raise ValueError(
                "The privacy ledger has no sampling rate for the steps taken. "
                "Train with model.fit on a private model (it records the "
                "sampling rate), or compute epsilon with "
                "keras_dp.compute_epsilon."
            )
        return accounting.compute_epsilon_for_segments(
            self.segments(steps), delta, accountant=accountant
        )

    def get_config(self):
        return [dict(entry) for entry in self.entries]


def optimizer_steps(model):
    """Noisy updates taken so far, also in the middle of a JAX `fit`.

    JAX's trainer keeps the live state outside the variables during an
    epoch; reading it from there avoids a full state sync.
    """
    optimizer = model.optimizer
    state = getattr(model, "_jax_state", None)
    if state and not getattr(model, "_jax_state_synced", True):
        values = state.get("optimizer_variables")
        if values is not None:
            for variable, value in zip(optimizer.variables, values):
                if variable is optimizer._iterations:
                    iterations = int(value)
                    break
            steps = optimizer.gradient_accumulation_steps or 1
            return iterations // steps
    return int(keras.ops.convert_to_numpy(optimizer.iterations))
