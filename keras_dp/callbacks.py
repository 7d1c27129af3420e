"""Keras callbacks that report and enforce the privacy budget."""

import keras

from keras_dp import accounting
from keras_dp import arguments
from keras_dp import keras_compat
from keras_dp import ledger as ledger_lib
from keras_dp.privacy_settings import is_private


def _check_private(model, callback):
    if not is_private(model):
        raise ValueError(
            f"{type(callback).__name__} reports the privacy of DP training, "
            "but this model is not private. Pass it through "
            "keras_dp.make_private(model) and compile it with a keras_dp DP "
            "optimizer."
        )


def _dataset_size(model):
    ledger = model.optimizer.privacy_ledger
    return None if not ledger.entries else ledger.entries[-1].get("n")


class EpsilonLogger(keras.callbacks.Callback):
    """Writes the privacy spent so far, `epsilon`, into the training logs.

    The value appears in the progress bar, `History`, `CSVLogger` and
    `TensorBoard` like any metric. It is computed with dp-accounting from the
    optimizer's privacy ledger (noise multipliers and sampling rates, step by
    step), so it stays right across repeated `fit` calls and save/load.
    When batches were not Poisson sampled, the logs also carry
    `epsilon_assumes_poisson = 1`: the value is what Poisson sampling at the
    same rate would give. After user-level training (`fit` on a
    `keras_dp.data.UserSampler`) the epsilon covers all the examples of one
    user: the logs carry `epsilon_user_level = 1`, the logger's
    `privacy_unit` is `"user"`, and it prints a line saying so once.

    Example:

    ```python
    model.fit(x, y, epochs=3, callbacks=[keras_dp.EpsilonLogger(delta=1e-5)])
    ```

    Args:
        delta: the delta of the guarantee. Defaults to the optimizer's
            `target_delta` when it was given one, else to `1 / n**1.1` for
            a training set of `n` examples; a warning is issued when
            `delta >= 1 / n`.
        accountant: `"rdp"` (default) or `"pld"` (tighter, slower).
        every_n_batches: also log every this many batches (None: only at
            the end of each epoch).
    """

    def __init__(self, delta=None, accountant="rdp", every_n_batches=None):
        super().__init__()
        self.delta = None if delta is None else accounting.check_delta(delta)
        self.accountant = accounting.check_accountant(accountant)
        self.every_n_batches = arguments.positive_int(
            "every_n_batches", every_n_batches, allow_none=True
        )
        # What the logged epsilon protects ("example", "user" or "mixed",
        # see `PrivacyLedger.privacy_unit`); set when it is first logged.
        self.privacy_unit = None

    def on_train_begin(self, logs=None):
        _check_private(self.model, self)
        n = _dataset_size(self.model)
        if self.delta is None:
            self.delta = getattr(self.model.optimizer, "target_delta", None)
        if self.delta is None:
            if n is None:
                raise ValueError(
                    "EpsilonLogger needs `delta` when keras_dp cannot see the "
                    "training-set size n. Pass EpsilonLogger(delta=...), "
                    "e.g. 1 / n**1.1."
                )
            self.delta = accounting.default_delta(n)
        else:
            accounting.check_delta(self.delta, n)

    def epsilon(self):
        """Epsilon of the training done so far, at `self.delta`."""
        steps = ledger_lib.optimizer_steps(self.model)
        return self.model.optimizer.privacy_ledger.epsilon(
            steps, self.delta, self.accountant
        )

    def _write(self, logs):
        if logs is None:
            return
        ledger = self.model.optimizer.privacy_ledger
        steps = ledger_lib.optimizer_steps(self.model)
        logs["epsilon"] = self.epsilon()
        logs["delta"] = self.delta
        if ledger.assumes_poisson(steps):
            logs["epsilon_assumes_poisson"] = 1.0
        unit = ledger.privacy_unit(steps)
        if unit == "user":
            logs["epsilon_user_level"] = 1.0
        if unit != self.privacy_unit and unit != "example":
            keras_compat.print_msg(_UNIT_NOTES[unit])
        self.privacy_unit = unit

    def on_train_batch_end(self, batch, logs=None):
        if self.every_n_batches and (batch + 1) % self.every_n_batches == 0:
            self._write(logs)

    def on_epoch_end(self, epoch, logs=None):
        self._write(logs)


_UNIT_NOTES = {
    "user": (
        "keras_dp.EpsilonLogger: epsilon is user-level: it covers all the "
        "examples of one user together (UserSampler)."
    ),
    "mixed": (
        "keras_dp.EpsilonLogger: this model trained both at the example and "
        "at the user level; its epsilon holds for one example, not for all "
        "of one user's examples."
    ),
}


class PrivacyBudget(keras.callbacks.Callback):
    """Stops training before the step that would exceed a privacy budget.

    After every step it checks the epsilon that one more noisy update would
    reach; if that exceeds `target_epsilon`, training stops and says so. A
    `fit` that starts with the budget already spent trains no step at all.
    Within one `fit` the noise and the sampling rate are fixed, so epsilon
    only grows with the number of updates: the last update within budget is
    found once when training begins (by bisection over this `fit`'s
    updates), and each step compares a counter with it.
    Keras runs callbacks once per `steps_per_execution` steps, so with
    `compile(steps_per_execution=s)` it looks ahead by the updates of one
    execution (`ceil(s / gradient_accumulation_steps)`) and may stop up
    to that many updates early, never late.

    Example:

    ```python
    model.fit(x, y, epochs=100,
              callbacks=[keras_dp.PrivacyBudget(target_epsilon=3.0, delta=1e-5)])
    ```

    Args:
        target_epsilon: the budget.
        delta: the delta of the guarantee, in (0, 1).
        accountant: `"rdp"` (default) or `"pld"`.
    """

    def __init__(self, target_epsilon, delta, accountant="rdp"):
        super().__init__()
        self.target_epsilon = arguments.positive_number(
            "target_epsilon", target_epsilon
        )
        self.delta = accounting.check_delta(delta)
        self.accountant = accounting.check_accountant(accountant)
        self.stopped_at_step = None
        # The most updates within budget, as far as this `fit` can reach
        # (None: not known, checked at every step).
        self._last_allowed_step = None

    def on_train_begin(self, logs=None):
        # `fit` of a private model already checked; this catches the callback
        # on a plain model, which would otherwise train without a budget.
        _check_private(self.model, self)
        self._last_allowed_step = self._last_step_within_budget(self.model)

    def _last_step_within_budget(self, model):
        """The largest update count whose epsilon is within budget, up to
        the last update this `fit` can reach; None when the length of the
        fit is unknown."""
        params = getattr(self, "params", None) or {}
        batches, epochs = params.get("steps"), params.get("epochs")
        if not batches or not epochs:
            return None
        accumulation = model.optimizer.gradient_accumulation_steps or 1
        ledger = model.optimizer.privacy_ledger
        low = ledger_lib.optimizer_steps(model)
        high = low + -(-batches * epochs // accumulation) + updates_per_execution(model)

        def within(steps):
            return ledger.epsilon(steps, self.delta, self.accountant) <= (
                self.target_epsilon
            )

        if within(high):
            return high
        if not within(low):
            return low - 1
        # Invariant: within(low) and not within(high).
        while high - low > 1:
            middle = (low + high) // 2
            if within(middle):
                low = middle
            else:
                high = middle
        return low

    def next_step_epsilon(self, model):
        """Epsilon after the updates of one more execution (one update
        without `steps_per_execution`) with the current setting."""
        steps = ledger_lib.optimizer_steps(model)
        return model.optimizer.privacy_ledger.epsilon(
            steps + updates_per_execution(model), self.delta, self.accountant
        )

    def check_before_fit(self, model):
        """False (and a message) when even one more step is over budget."""
        _check_private(model, self)
        if self.next_step_epsilon(model) > self.target_epsilon:
            self._stop(model)
            return False
        return True

    def _stop(self, model):
        self.stopped_at_step = ledger_lib.optimizer_steps(model)
        keras_compat.print_msg(
            f"keras_dp.PrivacyBudget: stopping after {self.stopped_at_step} "
            f"steps: one more step would exceed epsilon="
            f"{self.target_epsilon} at delta={self.delta}."
        )

    def on_train_batch_end(self, batch, logs=None):
        if self._last_allowed_step is None:
            over = self.next_step_epsilon(self.model) > self.target_epsilon
        else:
            steps = ledger_lib.optimizer_steps(self.model)
            over = steps + updates_per_execution(self.model) > self._last_allowed_step
        if over:
            self.model.stop_training = True
            self._stop(self.model)


def updates_per_execution(model):
    """The most optimizer updates one call of the train function applies:
    `ceil(steps_per_execution / gradient_accumulation_steps)`."""
    steps = int(getattr(model, "steps_per_execution", 1) or 1)
    accumulation = model.optimizer.gradient_accumulation_steps or 1
    return -(-steps // accumulation)
