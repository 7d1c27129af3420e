"""The black-box audit: canary examples in the input space, scored on the
final model only.

The auditor adds each of `m` canary examples to the training set with
probability 1/2, trains with the model's own `fit`, and scores every
canary on the trained model (by default the negative loss of its label):
canaries that were trained on should score higher. The threat model is the
weakest one DP covers: the attacker sees only the released model, not the
updates, and chooses examples, not gradients.
"""

import keras
import numpy as np

from keras_dp import arguments
from keras_dp.auditing import result as result_lib

# `fit` arguments the audit cannot pass on: they would split or weight the
# training set, which the audit builds itself.
_REFUSED_FIT_ARGUMENTS = ("validation_split", "sample_weight", "class_weight")


def make_input_canaries(x, y, num_canaries, seed=None):
    """`num_canaries` out-of-distribution canaries shaped like `(x, y)`.

    Each canary input is uniform noise over the range of `x`, with a label
    drawn uniformly from the classes of `y` (integer labels, `(n,)` or
    `(n, 1)`, or one-hot rows): examples no model predicts well unless it
    memorised them. For other data, make your own canaries and pass them
    to `audit_input_canaries(canaries=(x_canaries, y_canaries))`.

    Example:

    ```python
    x_c, y_c = keras_dp.audit.make_input_canaries(x_train, y_train, 500, seed=0)
    ```

    Args:
        x: the training inputs, one array.
        y: the training labels (classification).
        num_canaries: `m`.
        seed: seed of the canaries (an int, a `np.random.Generator`, or
            None: fresh entropy).

    Returns:
        `(x_canaries, y_canaries)`, NumPy arrays with `num_canaries` rows.
    """
    rng = np.random.default_rng(seed)
    x, y = _single_array(x, "x"), _single_array(y, "y")
    num_canaries = arguments.positive_int("num_canaries", num_canaries)
    dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.dtype("float32")
    low, high = float(np.min(x)), float(np.max(x))
    x_canaries = rng.uniform(low, high, (num_canaries,) + x.shape[1:]).astype(dtype)
    return x_canaries, _random_labels(y, num_canaries, rng)


def loss_scores(model, x, y, batch_size=256):
    """The default canary score: minus each canary's loss under the
    model's compiled loss (higher: fitted better, more likely trained on).

    Args:
        model: a compiled model with one output and one loss.
        x: the canaries' inputs.
        y: the canaries' labels.
        batch_size: rows per prediction batch.

    Returns:
        `(m,)` float64 scores.
    """
    loss = model.loss
    if isinstance(loss, (list, tuple, dict)):
        raise ValueError(
            "The default canary score needs one loss; this model has "
            f"{type(loss).__name__} of losses. Pass "
            "`score_fn(model, x_canaries, y_canaries)` that returns one "
            "score per canary (higher: more likely trained on)."
        )
    y_pred = model.predict(x, batch_size=batch_size, verbose=0)
    if isinstance(loss, keras.losses.Loss):
        values = loss.call(keras.ops.convert_to_tensor(y), y_pred)
    else:
        values = keras.losses.get(loss)(keras.ops.convert_to_tensor(y), y_pred)
    values = np.asarray(keras.ops.convert_to_numpy(values), dtype="float64")
    return -values.reshape(len(values), -1).mean(axis=1)


def audit_input_canaries(
    model,
    x,
    y,
    num_canaries=1000,
    *,
    canaries=None,
    score_fn=None,
    delta=None,
    confidence=0.95,
    guesses=None,
    seed=None,
    **fit_kwargs,
):
    """Audits one training run with input-space canaries (black box).

    Makes `num_canaries` canaries (or takes `canaries`), adds each to
    `(x, y)` with probability 1/2, trains `model` with `model.fit` on the
    result and `fit_kwargs` (epochs, batch size, callbacks: the run being
    audited), scores each canary on the final model, and turns the scores
    into a lower bound on epsilon (see `keras_dp.audit.audit_scores`).

    Example:

    ```python
    def make_model():
        model = keras_dp.make_private(build_model())
        model.compile(optimizer=keras_dp.DPSGD(learning_rate=0.5,
                                               noise_multiplier=1.0),
                      loss="sparse_categorical_crossentropy")
        return model

    result = keras_dp.audit.audit_input_canaries(
        make_model, x_train, y_train, num_canaries=1000,
        epochs=10, batch_size=64)
    print(result.summary())
    ```

    Args:
        model: a compiled model that has not trained yet (private or not),
            or a function that returns one.
        x: the training inputs (one array).
        y: the training labels (one array).
        num_canaries: `m`; more canaries give tighter bounds (the bound of
            `m` guesses all right is about `log(m)` for large `m`).
        canaries: optional `(x_canaries, y_canaries)` to use instead of
            `make_input_canaries(x, y, num_canaries)`.
        score_fn: optional `score_fn(model, x_canaries, y_canaries)` that
            returns one score per canary, higher for "trained on"; defaults
            to `loss_scores` (minus the canary's loss).
        delta: the delta to audit at. Defaults to the optimizer's
            `target_delta`, else `1 / n**1.1` for the `n` examples trained
            on (what `keras_dp.EpsilonLogger` reports).
        confidence: the confidence of the bound.
        guesses: the `(k+, k-)` choices (see `audit_scores`).
        seed: seed of the canaries, the secret bits and the tie-breaking
            (None: fresh entropy). The run's own randomness (Poisson
            sampling, noise) is the model's.
        **fit_kwargs: passed to `model.fit` (`verbose` defaults to 0).

    Returns:
        An `AuditResult` whose `claimed_epsilon` is the run's epsilon at
        `delta` (None for a model that is not private).
    """
    refused = sorted(set(fit_kwargs) & set(_REFUSED_FIT_ARGUMENTS))
    if refused:
        raise ValueError(
            f"audit_input_canaries cannot pass {refused} to fit: the audit "
            "builds the training set from (x, y) and the canaries. Pass "
            "`validation_data` for validation, and leave the weighting out."
        )
    rng = np.random.default_rng(seed)
    model = result_lib.resolve_model(model)
    x, y = _single_array(x, "x"), _single_array(y, "y")
    if canaries is None:
        x_canaries, y_canaries = make_input_canaries(x, y, num_canaries, rng)
    else:
        x_canaries, y_canaries = (np.asarray(part) for part in canaries)
        if len(x_canaries) != len(y_canaries):
            raise ValueError(
                "`canaries` must be `(x_canaries, y_canaries)` with as many "
                f"rows each. Received {len(x_canaries)} and {len(y_canaries)}."
            )
    secrets = result_lib.secret_bits(len(x_canaries), rng)
    x_train = np.concatenate([x, x_canaries[secrets].astype(x.dtype)])
    y_train = np.concatenate([y, y_canaries[secrets].astype(y.dtype)])
    order = rng.permutation(len(x_train))
    fit_kwargs.setdefault("verbose", 0)
    model.fit(x_train[order], y_train[order], **fit_kwargs)
    scores = (score_fn or loss_scores)(model, x_canaries, y_canaries)
    delta = result_lib.audit_delta(model, delta, len(x_train))
    return result_lib.audit_scores(
        scores,
        secrets,
        delta=delta,
        confidence=confidence,
        guesses=guesses,
        claimed_epsilon=result_lib.claimed_epsilon(model, delta),
        seed=int(rng.integers(2**31)),
        kind="input",
    )


def _single_array(value, name):
    if isinstance(value, (list, tuple, dict)):
        raise ValueError(
            f"The input-space audit takes `{name}` as one array. Received: "
            f"{type(value).__name__}. For models with several inputs or "
            "outputs, score your own canaries and call "
            "keras_dp.audit.audit_scores."
        )
    return np.asarray(value)


def _random_labels(y, count, rng):
    """Labels drawn uniformly from the classes of `y`."""
    if y.ndim == 2 and y.shape[1] > 1:
        if not np.all((y == 0) | (y == 1)):
            raise ValueError(
                "make_input_canaries draws class labels: `y` must hold "
                "integer labels or one-hot rows. For other targets, pass "
                "your own `canaries=(x_canaries, y_canaries)`."
            )
        classes = rng.integers(0, y.shape[1], count)
        return np.eye(y.shape[1], dtype=y.dtype)[classes]
    if not np.issubdtype(y.dtype, np.integer) and not np.all(y == np.round(y)):
        raise ValueError(
            "make_input_canaries draws class labels: `y` must hold integer "
            "labels or one-hot rows. For other targets, pass your own "
            "`canaries=(x_canaries, y_canaries)`."
        )
    num_classes = int(np.max(y)) + 1
    labels = rng.integers(0, num_classes, (count,) + y.shape[1:])
    return labels.astype(y.dtype)
