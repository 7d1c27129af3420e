"""The statistics of a one-run audit: from the auditor's correct guesses to
a lower bound on epsilon (Steinke, Nasr and Jagielski, "Privacy Auditing
with One (1) Training Run", NeurIPS 2023).

`m` canaries each enter the training run independently with probability
1/2 (the secret bits `S`). After training, the auditor guesses "in" for the
`k+` canaries with the highest scores, "out" for the `k-` with the lowest,
and abstains on the rest: `r = k+ + k-` guesses, `v` of them correct. If the
run is `(epsilon, delta)`-DP with respect to each canary, then (the paper's
main theorem for approximate DP)

    P[W >= v] <= f(v) + 2 m delta * max_{1 <= i <= v} (f(v - i) - f(v)) / i,

with `f(v) = P[Binomial(r, e^eps / (1 + e^eps)) >= v]`: the number of
correct guesses `W` is stochastically dominated by that of `r` coin flips
that land right with probability `e^eps / (1 + e^eps)`, up to the `delta`
term. The right-hand side is the p-value of `v` correct guesses under the
hypothesis "the run is `(eps, delta)`-DP" (`p_value`); the lower bound at
confidence `c` is the largest `eps` that this rejects at level `1 - c`
(`epsilon_lower_bound`).

`k+` and `k-` must be fixed before looking at the guesses' outcome. The
paper tries several and reports the best; `best_guesses` tries a list of
candidates too, and pays for the choice with a union bound (Bonferroni):
each candidate is tested at level `(1 - c) / L` for `L` candidates, so the
reported bound holds at confidence `c` whichever candidate wins.

Example:

```python
from keras_dp.auditing import bounds

bounds.epsilon_lower_bound(1000, num_guesses=100, num_correct=100)  # 3.49
bounds.p_value(1000, num_guesses=100, num_correct=70, epsilon=1.0)
```
"""

import numpy as np
from scipy import special
from scipy import stats

from keras_dp import arguments

# Bisection stops when the bracket is this narrow (in epsilon).
_TOLERANCE = 1e-6
# Candidates of `default_guess_candidates`: the smallest number of guesses.
_MIN_GUESSES = 8


def p_value(num_canaries, num_guesses, num_correct, epsilon, delta=0.0):
    """The probability of `num_correct` or more correct guesses out of
    `num_guesses` if the run is `(epsilon, delta)`-DP for each of
    `num_canaries` canaries (the bound of the module docstring, capped at
    1).

    Args:
        num_canaries: `m`, the canaries that were each included with
            probability 1/2.
        num_guesses: `r = k+ + k-`, the guesses made (abstentions excluded).
        num_correct: `v`, the correct guesses.
        epsilon: the epsilon of the hypothesis, `>= 0`.
        delta: the delta of the hypothesis, in `[0, 1]`.

    Returns:
        The p-value, a Python float in `[0, 1]`.
    """
    m, r, v = _check_counts(num_canaries, num_guesses, num_correct)
    epsilon = arguments.non_negative_number("epsilon", epsilon)
    delta = arguments.probability("delta", delta)
    q = float(special.expit(epsilon))
    tail = float(stats.binom.sf(v - 1, r, q))  # f(v) = P[Bin(r, q) >= v]
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    i = np.arange(1, v + 1)
    # f(v - i) - f(v) = P[v - i <= Bin(r, q) < v].
    gaps = stats.binom.sf(v - i - 1, r, q) - tail
    alpha = float(np.max(gaps / i))
    return min(tail + 2.0 * m * delta * alpha, 1.0)


def epsilon_lower_bound(
    num_canaries, num_guesses, num_correct, delta=0.0, confidence=0.95
):
    """The largest epsilon that `num_correct` correct guesses out of
    `num_guesses` reject at `confidence`: the run is not `(eps, delta)`-DP
    for any smaller `eps`, with probability at least `confidence` over the
    canaries' secret bits.

    It is 0 when even `eps = 0` is not rejected (no evidence of leakage),
    and at most `logit((1 - confidence) ** (1 / r))` (all `r` guesses
    right, `delta = 0`).

    Args:
        num_canaries: `m`.
        num_guesses: `r`.
        num_correct: `v`.
        delta: the delta of the guarantee being audited.
        confidence: in `(0, 1)`; the test's level is `1 - confidence`.

    Returns:
        The lower bound on epsilon, a Python float `>= 0`.
    """
    significance = 1.0 - _check_confidence(confidence)

    def rejected(eps):
        return p_value(num_canaries, num_guesses, num_correct, eps, delta) <= (
            significance
        )

    # The delta term only adds to the p-value: when eps = 0 survives without
    # it, it survives with it (and this skips the costly term in the common
    # case of a private run).
    if p_value(num_canaries, num_guesses, num_correct, 0.0) > significance:
        return 0.0
    if not rejected(0.0):
        return 0.0
    low, high = 0.0, 1.0
    while rejected(high):
        low, high = high, 2.0 * high
    while high - low > _TOLERANCE * max(1.0, low):
        mid = 0.5 * (low + high)
        if rejected(mid):
            low = mid
        else:
            high = mid
    return low


def default_guess_candidates(num_canaries):
    """The `(k+, k-)` pairs that `best_guesses` tries by default.

    Two-sided guesses `k+ = k- = r / 2` and one-sided ones `(r, 0)`, for
    `r` halving from `m` (two-sided) or `m / 2` (one-sided) down to
    `_MIN_GUESSES`: a geometric ladder, because the best number of guesses
    ranges from all canaries (a model that memorises them) to a few percent
    (a private one, whose evidence sits in the extreme scores).
    """
    m = arguments.positive_int("num_canaries", num_canaries)
    candidates = []
    r = m
    while r >= max(2, min(_MIN_GUESSES, m)):
        candidates.append((r // 2, r // 2))
        if 2 * r <= m:
            candidates.append((r, 0))
        r //= 2
    if not candidates:
        candidates.append((1, 0))
    return sorted(set(candidates), key=lambda pair: (-sum(pair), -pair[1]))


def count_correct(scores, secrets, k_plus, k_minus, seed=0):
    """Correct guesses when the `k_plus` highest scores are guessed "in"
    and the `k_minus` lowest "out" (ties broken at random, by `seed`).

    Args:
        scores: `(m,)` floats, higher meaning "more likely in".
        secrets: `(m,)` booleans, True for the canaries that were in.
        k_plus: guesses "in", a non-negative int.
        k_minus: guesses "out", a non-negative int (`k_plus + k_minus <= m`).
        seed: seed of the tie-breaking order.

    Returns:
        The number of correct guesses, a Python int.
    """
    scores, secrets = _check_scores(scores, secrets)
    _check_guesses(k_plus, k_minus, len(scores))
    return _correct(_ranking(scores, seed), secrets, k_plus, k_minus)


def best_guesses(scores, secrets, delta=0.0, confidence=0.95, candidates=None, seed=0):
    """The best lower bound over `candidates` (`(k+, k-)` pairs), each
    tested at level `(1 - confidence) / len(candidates)`.

    Args:
        scores: `(m,)` floats, higher meaning "more likely in".
        secrets: `(m,)` booleans, True for the canaries that were in.
        delta: the delta of the guarantee being audited.
        confidence: the confidence of the reported bound.
        candidates: a list of `(k+, k-)` pairs; None for
            `default_guess_candidates(m)`.
        seed: seed of the tie-breaking order.

    Returns:
        A dict with `epsilon_lower_bound`, `k_plus`, `k_minus`,
        `num_correct` (of the winning candidate) and `num_candidates`.
    """
    scores, secrets = _check_scores(scores, secrets)
    confidence = _check_confidence(confidence)
    m = len(scores)
    if candidates is None:
        candidates = default_guess_candidates(m)
    candidates = [tuple(pair) for pair in candidates]
    if not candidates:
        raise ValueError("`candidates` must list at least one (k+, k-) pair.")
    for k_plus, k_minus in candidates:
        _check_guesses(k_plus, k_minus, m)
    per_candidate = 1.0 - (1.0 - confidence) / len(candidates)
    order = _ranking(scores, seed)
    best = None
    for k_plus, k_minus in candidates:
        correct = _correct(order, secrets, k_plus, k_minus)
        bound = epsilon_lower_bound(m, k_plus + k_minus, correct, delta, per_candidate)
        if best is None or bound > best["epsilon_lower_bound"]:
            best = {
                "epsilon_lower_bound": bound,
                "k_plus": int(k_plus),
                "k_minus": int(k_minus),
                "num_correct": correct,
            }
    best["num_candidates"] = len(candidates)
    return best


def _correct(order, secrets, k_plus, k_minus):
    """Correct guesses of "in" for the last `k_plus` of `order` (lowest
    score first) and "out" for its first `k_minus`."""
    top = order[len(order) - k_plus :]
    return int(np.sum(secrets[top]) + np.sum(~secrets[order[:k_minus]]))


def _ranking(scores, seed):
    """Indices from the lowest score to the highest, ties in random order:
    a tie must not favour the canaries listed first."""
    tie_break = np.random.default_rng(seed).permutation(len(scores))
    return np.lexsort((tie_break, scores))


def _check_scores(scores, secrets):
    scores = np.asarray(scores, dtype="float64").reshape(-1)
    secrets = np.asarray(secrets).reshape(-1)
    if secrets.dtype != bool:
        if not np.all((secrets == 0) | (secrets == 1)):
            raise ValueError(
                "`secrets` must be booleans or 0/1 (1: the canary was in "
                f"the training run). Received values {np.unique(secrets)[:5]}."
            )
        secrets = secrets.astype(bool)
    if scores.shape != secrets.shape or not len(scores):
        raise ValueError(
            "`scores` and `secrets` must have one entry per canary (and at "
            f"least one). Received: {scores.shape[0]} scores and "
            f"{secrets.shape[0]} secrets."
        )
    if not np.all(np.isfinite(scores)):
        raise ValueError(
            f"{int(np.sum(~np.isfinite(scores)))} canary scores are not "
            "finite: the score function must return finite numbers."
        )
    return scores, secrets


def _check_counts(num_canaries, num_guesses, num_correct):
    m = arguments.positive_int("num_canaries", num_canaries)
    r = arguments.integer(
        "num_guesses", num_guesses, low=0, high=m, hint="at most num_canaries"
    )
    v = arguments.integer(
        "num_correct", num_correct, low=0, high=r, hint="at most num_guesses"
    )
    return m, r, v


def _check_guesses(k_plus, k_minus, m):
    hint = "each (k+, k-) pair holds guesses 'in' and 'out'"
    k_plus = arguments.integer("k+", k_plus, low=0, hint=hint)
    k_minus = arguments.integer("k-", k_minus, low=0, hint=hint)
    if not 1 <= k_plus + k_minus <= m:
        raise ValueError(
            "Each (k+, k-) pair needs 1 <= k+ + k- <= m = "
            f"{m} (the number of canaries). Received: ({k_plus}, {k_minus})."
        )


def _check_confidence(confidence):
    return arguments.probability(
        "confidence", confidence, low_open=True, high_open=True, hint="e.g. 0.95"
    )
