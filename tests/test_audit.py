"""Tests for `keras_dp.audit`, the one-run privacy auditor.

The statistics are checked against the paper's bound recomputed here by
brute force (binomial tails summed term by term), and for validity on
mechanisms whose privacy is known exactly (random guesses: epsilon 0;
randomized response: epsilon exactly `eps`). The audits train tiny MLPs
on scikit-learn's digits with fixed seeds (Keras, Poisson sampling, noise
and the audit's own), on every backend.
"""

import math

import keras
import numpy as np
import pytest
from sklearn.datasets import load_digits

import keras_dp
from keras_dp import audit
from keras_dp.auditing import bounds

DELTA = 1e-5


# --------------------------------------------------------------------------
# The bound, against brute force.


def reference_p_value(m, r, v, eps, delta):
    """The paper's bound, summed term by term:
    `f(v) + 2 m delta max_i (f(v - i) - f(v)) / i`, with
    `f(t) = P[Binomial(r, e^eps / (1 + e^eps)) >= t]`."""
    q = math.exp(eps) / (1.0 + math.exp(eps))
    pmf = [math.comb(r, k) * q**k * (1.0 - q) ** (r - k) for k in range(r + 1)]

    def f(t):
        return math.fsum(pmf[max(t, 0) :])

    tail = f(v)
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    alpha = max((f(v - i) - tail) / i for i in range(1, v + 1))
    return min(tail + 2 * m * delta * alpha, 1.0)


def test_p_value_matches_the_bound_summed_by_brute_force():
    for m, r, v, eps, delta in [
        (100, 40, 30, 0.5, 0.0),
        (100, 40, 30, 0.5, 1e-3),
        (100, 100, 100, 3.0, 1e-5),
        (500, 120, 90, 1.2, 1e-5),
        (500, 120, 60, 0.0, 1e-4),
        (1000, 200, 200, 5.0, 1e-6),
        (50, 10, 0, 1.0, 1e-2),
        (300, 150, 140, 2.5, 2e-4),
    ]:
        expected = reference_p_value(m, r, v, eps, delta)
        assert audit.p_value(m, r, v, eps, delta) == pytest.approx(
            expected, rel=1e-9, abs=1e-300
        ), (m, r, v, eps, delta)


def test_lower_bound_is_the_largest_rejected_epsilon():
    for m, r, v, delta in [
        (1000, 100, 80, 0.0),
        (1000, 100, 80, 1e-5),
        (500, 250, 240, 1e-5),
        (200, 60, 45, 0.0),
    ]:
        bound = audit.epsilon_lower_bound(m, r, v, delta, confidence=0.95)
        assert bound > 0
        # Rejected at the bound, not a little above it (the bisection's
        # tolerance is 1e-6 relative).
        assert reference_p_value(m, r, v, bound, delta) <= 0.05
        above = bound * (1 + 1e-4) + 1e-6
        assert reference_p_value(m, r, v, above, delta) > 0.05


def test_all_guesses_correct_gives_the_closed_form_maximum():
    # delta = 0, v = r: P[Bin(r, q) >= r] = q**r = 0.05, so
    # eps = logit(0.05 ** (1 / r)).
    for r in (10, 100, 1000):
        expected = math.log(0.05 ** (1 / r) / (1 - 0.05 ** (1 / r)))
        assert audit.epsilon_lower_bound(1000, r, r, 0.0) == pytest.approx(
            expected, rel=1e-5
        )
    # 1000 canaries, all guessed right: about 5.81, the most one run of
    # 1000 canaries can show at 95%; a delta only lowers it.
    assert audit.epsilon_lower_bound(1000, 1000, 1000) == pytest.approx(5.809, abs=1e-3)
    assert audit.epsilon_lower_bound(1000, 1000, 1000, 1e-5) < 5.809


def test_no_evidence_gives_zero():
    assert audit.epsilon_lower_bound(1000, 100, 50, 1e-5) == 0.0
    assert audit.epsilon_lower_bound(1000, 100, 0) == 0.0


def test_random_guesses_reject_epsilon_zero_at_most_five_percent_of_runs():
    # Scores independent of the secrets: a 0-DP "run". At 95% confidence
    # at most 5% of the audits may report a positive bound (bound 5% +
    # 3 binomial standard deviations over 400 audits).
    rng = np.random.default_rng(0)
    trials = 400
    tolerance = 0.05 + 3 * math.sqrt(0.05 * 0.95 / trials)
    for guesses in ((50, 50), None):
        positive = 0
        for _ in range(trials):
            secrets = rng.random(200) < 0.5
            result = audit.audit_scores(
                rng.normal(size=200), secrets, delta=DELTA, guesses=guesses
            )
            positive += result.epsilon_lower_bound > 0
        assert positive / trials <= tolerance, (guesses, positive)


def test_randomized_response_bound_is_valid_and_nearly_tight():
    # eps-randomized response on each secret bit is exactly eps-DP, and its
    # correct guesses are Binomial(m, e^eps / (1 + e^eps)): the bound may
    # exceed eps in at most 5% of runs, and sits near eps otherwise.
    rng = np.random.default_rng(1)
    eps, m, trials = 1.0, 1000, 200
    q = math.exp(eps) / (1 + math.exp(eps))
    lower = []
    for _ in range(trials):
        secrets = rng.random(m) < 0.5
        reported = np.where(rng.random(m) < q, secrets, ~secrets)
        # Guess every reported bit: m guesses, fixed in advance.
        correct = int(np.sum(reported == secrets))
        lower.append(audit.epsilon_lower_bound(m, m, correct))
    lower = np.array(lower)
    assert np.mean(lower > eps) <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / trials)
    assert 0.7 < np.median(lower) < eps


def test_count_correct_against_a_hand_count():
    scores = np.array([0.9, 0.1, 0.5, 0.7, 0.3, 0.2])
    secrets = np.array([1, 0, 1, 0, 1, 0], dtype=bool)
    # Highest two (0.9, 0.7) guessed in: one right; lowest two (0.1, 0.2)
    # guessed out: both right.
    assert bounds.count_correct(scores, secrets, 2, 2) == 3
    assert bounds.count_correct(scores, secrets, 0, 3) == 2  # 0.1, 0.2, 0.3
    assert bounds.count_correct(scores, secrets, 1, 0) == 1


def test_guess_search_pays_for_the_choice():
    rng = np.random.default_rng(2)
    secrets = rng.random(400) < 0.5
    scores = secrets + rng.normal(scale=0.8, size=400)
    candidates = audit.default_guess_candidates(400)
    searched = audit.audit_scores(scores, secrets, delta=DELTA)
    assert searched.num_candidates == len(candidates)
    # The winner, tested alone at the Bonferroni level, gives the same
    # bound; tested alone at the full level, a larger one.
    pair = (searched.k_plus, searched.k_minus)
    correct = bounds.count_correct(scores, secrets, *pair)
    assert correct == searched.num_correct
    level = 1 - 0.05 / len(candidates)
    assert searched.epsilon_lower_bound == pytest.approx(
        audit.epsilon_lower_bound(400, sum(pair), correct, DELTA, level)
    )
    alone = audit.audit_scores(scores, secrets, delta=DELTA, guesses=pair)
    assert alone.num_candidates == 1
    assert alone.epsilon_lower_bound > searched.epsilon_lower_bound > 0


def test_default_candidates_are_valid_and_halve():
    candidates = audit.default_guess_candidates(1000)
    assert (500, 500) in candidates and (500, 0) in candidates
    assert all(1 <= a + b <= 1000 and a >= 0 and b >= 0 for a, b in candidates)
    assert audit.default_guess_candidates(1) == [(1, 0)]


def test_result_reports_the_verdict():
    result = audit.audit_scores(
        np.arange(100.0), np.arange(100) >= 50, delta=DELTA, claimed_epsilon=1.0
    )
    assert result.epsilon_lower_bound > 1.0 and result.passed is False
    assert "FAILED" in result.summary() and "95% confidence" in result.summary()
    assert "claimed_epsilon=1.0" in repr(result) and "scores=" not in repr(result)
    unclaimed = audit.audit_scores(np.zeros(10), np.arange(10) < 5, delta=DELTA)
    assert unclaimed.passed is None
    assert "not private" in unclaimed.summary()


def test_bound_errors_name_the_argument():
    with pytest.raises(
        ValueError, match="`num_correct` must be an integer >= 0 and <= 5"
    ):
        audit.p_value(10, 5, 6, 1.0)
    with pytest.raises(
        ValueError, match=r"`confidence` must be in the open interval \(0, 1\)"
    ):
        audit.epsilon_lower_bound(10, 5, 5, confidence=1.0)
    with pytest.raises(ValueError, match="`epsilon` must be a non-negative finite"):
        audit.p_value(10, 5, 5, -1.0)
    with pytest.raises(ValueError, match=r"1 <= k\+ \+ k- <= m = 4"):
        audit.audit_scores(np.zeros(4), np.ones(4), guesses=(3, 2))
    with pytest.raises(ValueError, match="one entry per canary"):
        audit.audit_scores(np.zeros(4), np.ones(3))
    with pytest.raises(ValueError, match="not finite"):
        audit.audit_scores(np.array([0.0, np.nan]), np.array([1, 0]))
    with pytest.raises(ValueError, match="`claimed_epsilon` must be a number >= 0"):
        audit.audit_scores(np.zeros(4), np.ones(4), claimed_epsilon=-1.0)
    with pytest.raises(ValueError, match="`num_canaries` must be a positive integer"):
        audit.make_input_canaries(np.zeros((4, 2)), np.zeros(4, "int32"), 0)
    with pytest.warns(UserWarning, match="2 \\* m \\* delta = 1"):
        audit.audit_scores(np.zeros(500), np.arange(500) < 250, delta=1e-3)


# --------------------------------------------------------------------------
# Audits of real training runs.


def digits(n):
    data = load_digits()
    x = (data.data[:n] / 16.0).astype("float32")
    return x, data.target[:n].astype("int32")


def mlp(width):
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(width, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )


def private_mlp(width, noise_multiplier, learning_rate=0.5):
    model = keras_dp.make_private(mlp(width))
    model._keras_dp.sampling_seed = 1  # reproducible Poisson batches
    model.compile(
        optimizer=keras_dp.DPSGD(
            learning_rate=learning_rate,
            noise_multiplier=noise_multiplier,
            l2_norm_clip=1.0,
            seed=3,
        ),
        loss="sparse_categorical_crossentropy",
    )
    return model


def test_input_audit_of_memorising_training_gives_a_large_bound():
    # Full-batch Adam without privacy, 60 steps: the 256-unit MLP memorises
    # the random-labelled noise canaries it trained on (loss ~0.02) while
    # the others keep a loss ~7, except the ~1 in 10 whose random label is
    # the class the model happens to give them. With m = 300 the most any
    # audit can show is 4.0 (300 guesses all right, at the Bonferroni
    # level of the 11 candidate (k+, k-)), 3.3 for 150 guesses all right;
    # the threshold 2.5 leaves room for ~10 wrong guesses among 300.
    def make_model():
        model = mlp(256)
        model.compile(
            optimizer=keras.optimizers.Adam(2e-2),
            loss="sparse_categorical_crossentropy",
        )
        return model

    x, y = digits(200)
    result = audit.audit_input_canaries(
        make_model,
        x,
        y,
        num_canaries=300,
        seed=0,
        delta=DELTA,
        epochs=60,
        batch_size=512,
    )
    assert result.kind == "input" and result.num_canaries == 300
    assert result.claimed_epsilon is None and result.passed is None
    assert result.epsilon_lower_bound > 2.5, result.summary()
    scores, secrets = result.scores, result.secrets
    assert np.median(scores[secrets]) > np.median(scores[~secrets]) + 2.0


def test_input_audit_of_dp_training_stays_below_the_claim():
    x, y = digits(200)
    result = audit.audit_input_canaries(
        lambda: private_mlp(64, noise_multiplier=1.0),
        x,
        y,
        num_canaries=200,
        seed=0,
        delta=DELTA,
        epochs=3,
        batch_size=50,
    )
    assert 0 < result.claimed_epsilon < 100
    assert result.passed, result.summary()
    assert result.epsilon_lower_bound <= result.claimed_epsilon


# q = 100 / 200 = 0.5, 16 updates.
GRADIENT_RUN = dict(num_canaries=500, seed=0, delta=DELTA, epochs=8, batch_size=100)


def test_gradient_audit_without_noise_finds_the_maximum_bound():
    # sigma = 0: an included canary's score is Delta / B times the updates
    # it joined (it misses all 16 with probability 0.5**16 = 1.5e-5), an
    # excluded one scores exactly 0. The
    # audit then guesses as well as an oracle that knows the secrets.
    x, y = digits(200)
    result = audit.audit_gradient_canaries(
        private_mlp(16, noise_multiplier=0.0), x, y, **GRADIENT_RUN
    )
    assert result.kind == "gradient" and result.claimed_epsilon == math.inf
    oracle = audit.audit_scores(
        result.secrets.astype(float), result.secrets, delta=DELTA
    )
    assert result.epsilon_lower_bound >= 0.97 * oracle.epsilon_lower_bound
    assert result.epsilon_lower_bound > 3.0
    assert np.all(result.scores[~result.secrets] == 0)
    # Each included canary joined each update independently at rate q, like
    # a real example: its count of updates (score / (Delta / B), Delta = 1,
    # B = 100) is Binomial(16, 0.5), mean 8 and variance 4 (bounds: 4
    # standard errors over 250 canaries; a sampling that repeated one draw
    # at every update would give variance 64).
    counts = result.scores[result.secrets] / 0.01
    np.testing.assert_allclose(counts, np.round(counts), atol=1e-3)
    assert abs(np.mean(counts) - 8.0) < 4 * math.sqrt(4.0 / len(counts))
    assert 2.5 < np.var(counts) < 5.5


def test_gradient_audit_with_dp_noise_stays_below_the_claim():
    x, y = digits(200)
    result = audit.audit_gradient_canaries(
        private_mlp(16, noise_multiplier=4.0), x, y, **GRADIENT_RUN
    )
    # q = 0.5, 16 updates, sigma = 4: epsilon 2.34 at delta 1e-5 (RDP).
    assert result.claimed_epsilon == pytest.approx(2.336, abs=0.01)
    assert result.passed, result.summary()


class _TooLittleNoise(keras_dp.GaussianNoise):
    """A bug: the noise actually added is 1% of what the multiplier says."""

    def add(self, grads, stddev, seed_generator, noise_spaces=None):
        return super().add(grads, 0.01 * stddev, seed_generator, noise_spaces)


def test_gradient_audit_catches_too_little_noise():
    # The same run as above, claiming sigma = 4 (epsilon 2.34) but adding
    # noise of sigma 0.04: the audit's bound exceeds the claim.
    x, y = digits(200)
    model = private_mlp(16, noise_multiplier=4.0)
    model.optimizer.noise = _TooLittleNoise(4.0, seed=3)
    result = audit.audit_gradient_canaries(model, x, y, **GRADIENT_RUN)
    assert result.passed is False, result.summary()
    assert result.epsilon_lower_bound > result.claimed_epsilon + 1.0
    # The optimizer is itself again after the audit.
    assert "privatize" not in vars(model.optimizer)


def test_gradient_audit_refuses_what_it_cannot_audit():
    x, y = digits(50)
    plain = mlp(16)
    plain.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match="needs a private model"):
        audit.audit_gradient_canaries(plain, x, y, num_canaries=10)
    adaptive = keras_dp.make_private(mlp(16))
    adaptive.compile(
        optimizer=keras_dp.DPSGD(adaptive_clipping=True),
        loss="sparse_categorical_crossentropy",
    )
    with pytest.raises(ValueError, match="adaptive clipping"):
        audit.audit_gradient_canaries(adaptive, x, y, num_canaries=10)
    with pytest.raises(ValueError, match="the model has 1210"):
        audit.audit_gradient_canaries(private_mlp(16, 1.0), x, y, num_canaries=5000)


def test_input_audit_refuses_what_it_cannot_audit():
    x, y = digits(50)
    with pytest.raises(ValueError, match="cannot pass \\['validation_split'\\]"):
        audit.audit_input_canaries(
            lambda: private_mlp(16, 1.0), x, y, num_canaries=10, validation_split=0.1
        )
    trained = private_mlp(16, 1.0)
    trained.optimizer.build_for_model(trained)
    trained.optimizer.iterations.assign(3)  # as after 3 updates
    with pytest.raises(ValueError, match="already trained \\(3 updates\\)"):
        audit.audit_input_canaries(trained, x, y, num_canaries=10)
    with pytest.raises(ValueError, match="integer labels or one-hot"):
        audit.make_input_canaries(x, x[:, 0] + 0.5, 10)


def test_input_canaries_look_like_the_data():
    x, y = digits(100)
    x_c, y_c = audit.make_input_canaries(x, y, 50, seed=0)
    assert x_c.shape == (50, 64) and x_c.dtype == x.dtype
    assert x_c.min() >= x.min() and x_c.max() <= x.max()
    assert set(np.unique(y_c)) <= set(range(10)) and len(np.unique(y_c)) > 5
    one_hot = np.eye(10, dtype="float32")[y]
    _, y_c = audit.make_input_canaries(x, one_hot, 50, seed=0)
    assert y_c.shape == (50, 10) and np.all(y_c.sum(axis=1) == 1)
