"""What an audit reports (`AuditResult`), how it is computed from canary
scores (`audit_scores`), and what the audited run claimed."""

import dataclasses
import math
import warnings

import keras
import numpy as np

from keras_dp import accounting
from keras_dp import arguments
from keras_dp import ledger as ledger_lib
from keras_dp.auditing import bounds
from keras_dp.optimizers import is_dp_optimizer
from keras_dp.privacy_settings import is_private

# `audit_scores` warns when the delta term of the bound, `2 m delta` times
# a binomial ratio below 1, can exceed this.
_DELTA_TERM_WARNING = 0.1

_KINDS = {
    "input": "input-space canaries, black box: the final model only",
    "gradient": "gradient-space (Dirac) canaries, white box: every update",
    "scores": "canary scores given by the caller",
}


@dataclasses.dataclass(frozen=True)
class AuditResult:
    """The outcome of a one-run privacy audit.

    `epsilon_lower_bound` is a statistical lower bound on the epsilon of
    the audited run: with probability at least `confidence` (over the
    canaries' secret bits) the run is not `(eps, delta)`-DP for any smaller
    `eps`. A bound above `claimed_epsilon` (`passed` False) shows that the
    guarantee the run claims does not hold: a bug, or an analysis that does
    not fit the run. A bound below it (`passed` True) is no proof of
    privacy: a weak attack finds little leakage in any model.

    Example:

    ```python
    result = keras_dp.audit.audit_scores(scores, secrets, delta=1e-5)
    print(result.summary())
    result.epsilon_lower_bound, result.passed
    ```

    Attributes:
        epsilon_lower_bound: the lower bound on epsilon, `>= 0`.
        confidence: its confidence level.
        delta: the delta of the guarantee that was audited.
        num_canaries: `m`.
        k_plus: the guesses "in" (the highest scores) of the `(k+, k-)`
            pair that gave the bound.
        k_minus: its guesses "out" (the lowest scores).
        num_correct: how many of those `k_plus + k_minus` guesses were right.
        num_candidates: how many `(k+, k-)` pairs were tried (each was
            tested at level `(1 - confidence) / num_candidates`).
        claimed_epsilon: the epsilon the run claims at `delta` (from its
            privacy ledger; `inf` without noise), or None for a run that
            claims nothing (a non-private model).
        kind: `"input"`, `"gradient"` or `"scores"`: which canaries.
        scores: the canaries' scores (higher: more likely in).
        secrets: the canaries' secret bits (True: in the run).
    """

    epsilon_lower_bound: float
    confidence: float
    delta: float
    num_canaries: int
    k_plus: int
    k_minus: int
    num_correct: int
    num_candidates: int = 1
    claimed_epsilon: float = None
    kind: str = "scores"
    scores: np.ndarray = dataclasses.field(default=None, repr=False)
    secrets: np.ndarray = dataclasses.field(default=None, repr=False)

    @property
    def num_guesses(self):
        """`k_plus + k_minus`."""
        return self.k_plus + self.k_minus

    @property
    def passed(self):
        """`epsilon_lower_bound <= claimed_epsilon`; None without a claim."""
        if self.claimed_epsilon is None:
            return None
        return self.epsilon_lower_bound <= self.claimed_epsilon

    def summary(self):
        """A few lines for people: the bound, the guesses, the verdict."""
        lines = [
            f"One-run privacy audit ({_KINDS.get(self.kind, self.kind)})",
            f"  canaries: {self.num_canaries}, each in the run with probability 1/2",
            f"  guesses: {self.k_plus} in + {self.k_minus} out, "
            f"{self.num_correct} of {self.num_guesses} correct (best of "
            f"{self.num_candidates} (k+, k-) choices)",
            f"  epsilon lower bound: {self.epsilon_lower_bound:.3f} at "
            f"{self.confidence:.0%} confidence, delta={self.delta:.3g}",
        ]
        if self.claimed_epsilon is None:
            lines.append("  claimed epsilon: none (the run is not private)")
        else:
            verdict = (
                "passed: no evidence against the claim"
                if self.passed
                else "FAILED: the run leaks more than it claims"
            )
            lines.append(f"  claimed epsilon: {self.claimed_epsilon:.3f} -> {verdict}")
        return "\n".join(lines)

    def __str__(self):
        return self.summary()


def audit_scores(
    scores,
    secrets,
    delta=1e-5,
    confidence=0.95,
    guesses=None,
    claimed_epsilon=None,
    seed=0,
    kind="scores",
):
    """Audits from canary scores the caller computed: the last step of
    every one-run audit.

    Example:

    ```python
    secrets = rng.random(m) < 0.5          # which canaries were trained on
    ...                                     # train, then score each canary
    result = keras_dp.audit.audit_scores(scores, secrets, delta=1e-5,
                                         claimed_epsilon=3.0)
    ```

    Args:
        scores: `(m,)` floats, higher meaning "more likely in the run".
        secrets: `(m,)` booleans (or 0/1): True for the canaries that were.
            They must have been drawn independently with probability 1/2
            before training, or the bound does not hold.
        delta: the delta of the guarantee being audited.
        confidence: the confidence of the bound, in `(0, 1)`.
        guesses: None (try `keras_dp.audit.default_guess_candidates`
            and correct for the choice), one `(k+, k-)` pair (no
            correction: fix it before seeing the scores), or a list of
            pairs.
        claimed_epsilon: the epsilon the run claims at `delta`, if any.
        seed: seed of the random tie-breaking between equal scores.
        kind: what the canaries were (`"input"`, `"gradient"`,
            `"scores"`), for the summary.

    Returns:
        An `AuditResult`.
    """
    delta = arguments.probability("delta", delta)
    if claimed_epsilon is not None and not (
        arguments.is_number(claimed_epsilon) and claimed_epsilon >= 0
    ):
        raise ValueError(
            "`claimed_epsilon` must be a number >= 0 (inf for a run without "
            f"noise), or None. Received: claimed_epsilon={claimed_epsilon!r}."
        )
    num_canaries = int(np.size(scores))
    if 2 * num_canaries * delta > _DELTA_TERM_WARNING:
        warnings.warn(
            f"keras_dp.audit: 2 * m * delta = {2 * num_canaries * delta:.3g} "
            f"(m={num_canaries} canaries, delta={delta:.3g}): the bound's "
            "delta term adds up to that much to every p-value, so the "
            "audit can show little. Audit at a smaller delta (the claimed "
            "epsilon is then computed at that delta too), or use fewer "
            "canaries.",
            stacklevel=2,
        )
    candidates = _candidates(guesses)
    best = bounds.best_guesses(scores, secrets, delta, confidence, candidates, seed)
    return AuditResult(
        epsilon_lower_bound=best["epsilon_lower_bound"],
        confidence=float(confidence),
        delta=float(delta),
        num_canaries=num_canaries,
        k_plus=best["k_plus"],
        k_minus=best["k_minus"],
        num_correct=best["num_correct"],
        num_candidates=best["num_candidates"],
        claimed_epsilon=None if claimed_epsilon is None else float(claimed_epsilon),
        kind=kind,
        scores=np.asarray(scores, dtype="float64").reshape(-1),
        secrets=np.asarray(secrets).reshape(-1).astype(bool),
    )


def _candidates(guesses):
    if guesses is None:
        return None
    pairs = list(guesses)
    if len(pairs) == 2 and all(isinstance(k, (int, np.integer)) for k in pairs):
        return [tuple(pairs)]
    return [tuple(pair) for pair in pairs]


def secret_bits(num_canaries, rng):
    """`(m,)` booleans, each True with probability 1/2: which canaries go
    into the run."""
    return rng.random(num_canaries) < 0.5


def resolve_model(model):
    """The compiled model to audit: `model` itself, or what the factory
    `model()` returns. It must not have trained yet: the audit trains it."""
    if not isinstance(model, keras.Model):
        if not callable(model):
            raise TypeError(
                "`model` must be a compiled keras.Model or a function that "
                f"returns one. Received: {type(model).__name__}."
            )
        built = model()
        if not isinstance(built, keras.Model):
            raise TypeError(
                "The model factory must return a compiled keras.Model. It "
                f"returned: {type(built).__name__}."
            )
        model = built
    if not getattr(model, "compiled", False) or model.optimizer is None:
        raise ValueError(
            "The audited model must be compiled (optimizer, loss): the "
            "audit trains it with `model.fit`. Call `model.compile(...)` "
            "first, or pass a factory that returns a compiled model."
        )
    optimizer = model.optimizer
    updates = 0
    if optimizer.built:
        updates = int(keras.ops.convert_to_numpy(optimizer.iterations.value))
    if updates:
        raise ValueError(
            f"The audited model has already trained ({updates} updates): a "
            "one-run audit trains a fresh model with the "
            "canaries from its first step. Pass a new model, or a factory."
        )
    return model


def audit_delta(model, delta, num_examples):
    """The delta to audit at: `delta` when given; else the optimizer's
    `target_delta`; else `1 / n**1.1` (as `keras_dp.EpsilonLogger`)."""
    if delta is None:
        delta = getattr(model.optimizer, "target_delta", None)
    if delta is None:
        delta = accounting.default_delta(max(2, int(num_examples)))
    accounting.check_delta(delta)
    return float(delta)


def claimed_epsilon(model, delta):
    """The epsilon that `model`'s training claims at `delta`, from its
    privacy ledger; None for a model that is not private."""
    if not (is_private(model) and is_dp_optimizer(model.optimizer)):
        return None
    steps = ledger_lib.optimizer_steps(model)
    epsilon = model.optimizer.privacy_ledger.epsilon(steps, delta)
    return math.inf if math.isinf(epsilon) else float(epsilon)
