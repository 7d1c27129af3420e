"""The white-box audit: Dirac canaries in gradient space, observed at every
update.

Canary `i` is a gradient that is zero except on one coordinate `j_i` of
the trainable parameters (a different one per canary), where it equals the
clipped sum's sensitivity `Delta` (`l2_norm_clip` for one group): the
largest contribution a clipped example can make, aimed where the attacker
looks. Each canary is in the run with probability 1/2 (its secret bit) and,
like a real example, joins each update's batch with the run's sampling rate
`q`; when it does, `Delta / B` is added to coordinate `j_i` of the clipped
sum before the noise (`B` the expected batch size). Its score is the sum,
over the updates, of the noisy gradient along `j_i` minus the real
examples' clipped sum there: what an attacker who knows every example but
the canaries, and sees every update, can compute. That attacker is the one
DP's guarantee is stated against (adding the real examples' contribution to
what is released is a data-independent step of an adaptive composition),
so the bound audits the noise, its scale and the accounting of the
subsampled Gaussian mechanism, with no slack from a weak attack.

The canaries enter through a wrapper around the optimizer's `privatize`
(`DiracCanaries.install`), the one point where the clipped sum meets the
noise. They bypass clipping and the data sampler (the auditor samples them
itself), which the input-space audit exercises instead.
"""

import dataclasses
import types

import keras
import numpy as np
from keras import ops

from keras_dp import arguments
from keras_dp import keras_compat
from keras_dp.auditing import result as result_lib
from keras_dp.clipped_batch import ClippedBatch
from keras_dp.optimizers import is_dp_optimizer
from keras_dp.privacy_settings import is_private


class DiracCanaries:
    """Dirac gradient canaries on a private model's DP optimizer.

    `install` wraps the optimizer's `privatize`; every update then adds the
    canaries that are in the run and sampled for it to the clipped sum, and
    adds their observed values to `scores()`. `remove` restores the
    optimizer. `keras_dp.audit.audit_gradient_canaries` does all of this
    around one `fit`; use the class directly for your own training loop.

    Example:

    ```python
    canaries = keras_dp.audit.DiracCanaries(num_canaries=1000, seed=0)
    canaries.install(model)        # compiled private model, built
    model.fit(x, y, epochs=3, batch_size=64)
    canaries.remove()
    result = keras_dp.audit.audit_scores(canaries.scores(), canaries.secrets,
                                         delta=1e-5)
    ```

    Args:
        num_canaries: `m`, at most the model's number of trainable
            parameters (each canary has a coordinate of its own).
        secrets: optional `(m,)` booleans, True for the canaries in the
            run; drawn with probability 1/2 each by default.
        seed: seed of the secret bits, the coordinates and the canaries'
            sampling (None: fresh entropy).
    """

    def __init__(self, num_canaries, secrets=None, seed=None):
        num_canaries = arguments.positive_int("num_canaries", num_canaries)
        self._rng = np.random.default_rng(seed)
        if secrets is None:
            secrets = result_lib.secret_bits(num_canaries, self._rng)
        secrets = np.asarray(secrets).reshape(-1).astype(bool)
        if len(secrets) != num_canaries:
            raise ValueError(
                f"`secrets` must have one entry per canary ({num_canaries}). "
                f"Received: {len(secrets)}."
            )
        self.num_canaries = num_canaries
        self.secrets = secrets
        self._sampling_seed = int(self._rng.integers(2**31))
        self._optimizer = None
        self._scores = None

    def install(self, model):
        """Wraps the DP optimizer of `model` (compiled, built, private) so
        that its updates carry the canaries. Builds the optimizer."""
        optimizer = _check_auditable(model)
        if self._optimizer is not None:
            raise RuntimeError(
                "These canaries are already installed; call `remove()` "
                "first, or make new DiracCanaries for another run."
            )
        if not model.built:
            raise ValueError(
                "The gradient-space audit places its canaries on the "
                "model's weights, which do not exist yet. Build the model "
                "first: give it a `keras.Input`, or call `model.build(...)` "
                "or the model on a batch."
            )
        optimizer.build_for_model(model)
        variables = model.trainable_variables
        sizes = [int(np.prod(v.shape)) for v in variables]
        if self.num_canaries > sum(sizes):
            raise ValueError(
                f"{self.num_canaries} gradient canaries need as many "
                f"trainable parameters; the model has {sum(sizes)}. Use "
                "fewer canaries."
            )
        # Distinct coordinates of the flattened parameters, in increasing
        # order: canary `order[k]` sits at position `positions[k]`.
        positions = np.sort(
            self._rng.choice(sum(sizes), self.num_canaries, replace=False)
        )
        self._order = self._rng.permutation(self.num_canaries)
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        self._hosts = []
        for k, (start, end) in enumerate(zip(offsets[:-1], offsets[1:])):
            inside = np.flatnonzero((positions >= start) & (positions < end))
            if len(inside):
                self._hosts.append(
                    (k, int(inside[0]), (positions[inside] - start).astype("int32"))
                )
        with keras.name_scope("keras_dp_audit"):
            self._scores = optimizer.add_variable(
                shape=(self.num_canaries,),
                initializer="zeros",
                dtype="float32",
                name="canary_scores",
            )
            self._generator = keras.random.SeedGenerator(
                self._sampling_seed, name="canary_sampling"
            )
        keras_compat.track_variable(optimizer, self._generator.state)
        self._optimizer = optimizer
        self._model = model
        optimizer.privatize = types.MethodType(_privatize_with(self), optimizer)
        # A train function traced before would bypass the wrapper.
        model.train_function = None

    def remove(self):
        """Restores the optimizer's own `privatize` (the scores stay)."""
        if self._optimizer is None:
            return
        del self._optimizer.privatize
        self._model.train_function = None
        self._optimizer = None

    def scores(self):
        """`(m,)` scores: each canary's summed observation, in canary order."""
        if self._scores is None:
            raise RuntimeError("The canaries have not been installed on a model.")
        observed = np.asarray(keras.ops.convert_to_numpy(self._scores.value), "float64")
        scores = np.empty_like(observed)
        scores[self._order] = observed
        return scores

    def _sample_rate(self, optimizer):
        entries = optimizer.privacy_ledger.entries
        rate = entries[-1]["sample_rate"] if entries else None
        if rate is None:
            raise ValueError(
                "The gradient-space audit samples its canaries at the run's "
                "rate, which the privacy ledger does not know: train with "
                "`model.fit` on arrays (or pass `sample_rate` to "
                "keras_dp.make_private for train_on_batch)."
            )
        return rate

    def _canary_gradients(self, optimizer, batch):
        """`{variable index: addition}`: what the canaries in the run and
        sampled for this update add to the clipped sum."""
        rate = self._sample_rate(optimizer)
        in_run = ops.convert_to_tensor(self.secrets[self._order].astype("float32"))
        sampled = ops.cast(
            ops.less(
                keras.random.uniform((self.num_canaries,), seed=self._generator), rate
            ),
            "float32",
        )
        scale = optimizer.sensitivity / ops.cast(batch.expected_batch_size, "float32")
        weights = in_run * sampled * scale
        additions = {}
        for k, start, indices in self._hosts:
            gradient = batch.gradients[k]
            size = int(np.prod(gradient.shape))
            values = weights[start : start + len(indices)]
            flat = ops.scatter(ops.convert_to_tensor(indices[:, None]), values, (size,))
            additions[k] = ops.cast(ops.reshape(flat, gradient.shape), gradient.dtype)
        return additions

    def _observe(self, clean, noisy):
        """Adds this update's observation of each canary to the scores."""
        parts = []
        for k, _, indices in self._hosts:
            change = ops.reshape(noisy[k] - clean[k], (-1,))
            parts.append(
                ops.cast(ops.take(change, ops.convert_to_tensor(indices)), "float32")
            )
        observed = parts[0] if len(parts) == 1 else ops.concatenate(parts)
        self._scores.assign(self._scores.value + observed)


def _privatize_with(canaries):
    def privatize(optimizer, batch):
        if not isinstance(batch, ClippedBatch):
            # The optimizer's own error message.
            return type(optimizer).privatize(optimizer, batch)
        spaces = batch.noise_spaces or []
        if any(space is not None for space in spaces):
            raise ValueError(
                "The gradient-space audit puts its canaries on single "
                "coordinates of the clipped sum, but this model draws the "
                "noise of some variables in a smaller space (LowRankSparse). "
                "Audit it with input-space canaries (audit_input_canaries) "
                "instead."
            )
        clean = list(batch.gradients)
        for k, _, _ in canaries._hosts:
            if clean[k] is None:
                raise ValueError(
                    f"Trainable variable {k} has no gradient, so canaries "
                    "placed on it would never be observed. Audit a model "
                    "whose trainable weights all get gradients."
                )
        with_canaries = list(clean)
        for k, addition in canaries._canary_gradients(optimizer, batch).items():
            with_canaries[k] = clean[k] + addition
        noisy = type(optimizer).privatize(
            optimizer, dataclasses.replace(batch, gradients=with_canaries)
        )
        canaries._observe(clean, noisy)
        return noisy

    return privatize


def _check_auditable(model):
    if not isinstance(model, keras.Model) or not is_private(model):
        raise ValueError(
            "The gradient-space audit needs a private model: pass it "
            "through keras_dp.make_private(model) and compile it with a "
            "keras_dp DP optimizer."
        )
    optimizer = getattr(model, "optimizer", None)
    if not is_dp_optimizer(optimizer):
        raise ValueError(
            "The gradient-space audit needs a model compiled with a keras_dp "
            f"DP optimizer. Received: {type(optimizer).__name__}."
        )
    if optimizer.adaptive_clipping is not None:
        raise ValueError(
            "The gradient-space audit does not support adaptive clipping "
            "(its sensitivity changes at every update). Audit with fixed "
            "thresholds, or with input-space canaries."
        )
    if optimizer.gradient_accumulation_steps:
        raise ValueError(
            "The gradient-space audit adds its canaries once per update and "
            "does not support gradient_accumulation_steps. Audit with a "
            "larger batch_size instead."
        )
    return optimizer


def audit_gradient_canaries(
    model,
    x,
    y,
    num_canaries=1000,
    *,
    delta=None,
    confidence=0.95,
    guesses=None,
    seed=None,
    **fit_kwargs,
):
    """Audits one private training run with Dirac gradient canaries (white
    box: the auditor sees every update).

    Installs `DiracCanaries` on the model's DP optimizer, trains with
    `model.fit(x, y, **fit_kwargs)`, and turns the canaries' scores into a
    lower bound on epsilon (see `keras_dp.audit.audit_scores`). The run's
    claimed epsilon comes from its privacy ledger.

    Example:

    ```python
    model = keras_dp.make_private(build_model())
    model.compile(optimizer=keras_dp.DPSGD(learning_rate=0.1,
                                           noise_multiplier=1.0),
                  loss="sparse_categorical_crossentropy")
    result = keras_dp.audit.audit_gradient_canaries(
        model, x_train, y_train, num_canaries=1000, epochs=3, batch_size=64)
    assert result.passed
    ```

    Args:
        model: a compiled, built private model that has not trained yet,
            or a function that returns one.
        x: the training inputs, as `model.fit` takes them.
        y: the training targets, as `model.fit` takes them.
        num_canaries: `m`.
        delta: the delta to audit at. Defaults to the optimizer's
            `target_delta`, else `1 / n**1.1` for the `n` training examples.
        confidence: the confidence of the bound.
        guesses: the `(k+, k-)` choices (see `audit_scores`).
        seed: seed of the canaries (None: fresh entropy).
        **fit_kwargs: passed to `model.fit` (`verbose` defaults to 0).

    Returns:
        An `AuditResult`.
    """
    rng = np.random.default_rng(seed)
    model = result_lib.resolve_model(model)
    canaries = DiracCanaries(num_canaries, seed=rng)
    canaries.install(model)
    fit_kwargs.setdefault("verbose", 0)
    try:
        model.fit(x, y, **fit_kwargs)
    finally:
        canaries.remove()
    ledger = model.optimizer.privacy_ledger
    n = ledger.entries[-1].get("n") if ledger.entries else None
    delta = result_lib.audit_delta(model, delta, n or len(np.asarray(x)))
    return result_lib.audit_scores(
        canaries.scores(),
        canaries.secrets,
        delta=delta,
        confidence=confidence,
        guesses=guesses,
        claimed_epsilon=result_lib.claimed_epsilon(model, delta),
        seed=int(rng.integers(2**31)),
        kind="gradient",
    )
