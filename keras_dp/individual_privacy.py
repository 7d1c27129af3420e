"""Individual privacy: each training example's own epsilon.

DP-SGD's epsilon holds for the worst example, one whose clipped gradient
has the full sensitivity `Delta` at every step. An example whose gradient
stays below the clipping threshold spends less (Feldman and Zrnic 2021,
"Individual Privacy Accounting via a Renyi Filter"; Yu et al. 2023,
"Individual Privacy Accounting for Differentially Private Stochastic
Gradient Descent"). `IndividualPrivacy` is a callback that measures, every
`every_epochs` epochs, each example's norm ratio `r_i = ||c_i g_i|| /
Delta` (its clipped gradient's norm over the sensitivity) in one pass over
the training data without an update, and accounts each example's steps
until the next pass as Poisson-subsampled Gaussian steps with noise
multiplier `sigma / r_i` (`keras_dp.individual_accounting`).

```python
individual = keras_dp.IndividualPrivacy(x_train, y_train, delta=1e-5)
model.fit(x_train, y_train, batch_size=256, epochs=10, callbacks=[individual])
individual.epsilons  # (n,) array, each at most the global epsilon
individual.summary_by_group(y_train)  # per class: min, median, mean, max
```

Between two passes the ratios are those of the weights at the earlier
pass, so the individual epsilons are an estimate (Yu et al. do the same).
They depend on the private data and are not themselves differentially
private: do not publish them as they are.
"""

import keras
import numpy as np
from keras import ops
from keras import tree

from keras_dp import accounting
from keras_dp import arguments
from keras_dp import backend as backend_lib
from keras_dp import clipping as clipping_lib
from keras_dp import data as data_lib
from keras_dp import individual_accounting
from keras_dp import ledger as ledger_lib
from keras_dp.per_example import Unsupported
from keras_dp.per_example import per_example_norms_and_sums
from keras_dp.per_example import vmap_clipped_gradient_sum
from keras_dp.privacy_settings import is_private

# Rows per chunk of the norm pass when neither the callback nor `fit` say.
DEFAULT_PASS_ROWS = 256

# Epochs between two norm passes. A pass is one forward and backward per
# example with the norms but no clipped sum, noise or update: 0.4 of an
# epoch of training on the benchmark MLP, 0.84 on the CNN, whose per-example
# conv norms are most of a step. Every 10 epochs keeps the passes under a
# tenth of the training time on both (docs/individual-privacy.md, "Cost").
DEFAULT_EVERY_EPOCHS = 10


_NO_USER_LEVEL = (
    "IndividualPrivacy accounts for each example's own privacy, but this "
    "training samples and clips users (keras_dp.data.UserSampler), where "
    "the unit is a user's examples together. Per-user individual "
    "accounting is not supported yet: use keras_dp.EpsilonLogger for the "
    "user-level epsilon, or train at the example level."
)


class IndividualPrivacy(keras.callbacks.Callback):
    """Tracks each training example's own epsilon during `fit`.

    Every `every_epochs` epochs (at the start of the epoch, and at the start
    of each `fit`) it runs one pass over the training data, without an
    update, that computes each example's norm ratio `r_i = ||c_i g_i|| /
    Delta`: the norm of its clipped gradient at the current weights over
    the sensitivity of the clipped sum. The steps until the next pass are
    accounted for example `i` as steps of the Poisson-subsampled Gaussian
    mechanism with noise multiplier `sigma / r_i`; the noise multipliers,
    sampling rates and steps come from the optimizer's privacy ledger.
    Steps taken without a pass of this callback (earlier `fit` calls)
    count at full sensitivity.

    By clipping mode (one formula, `||c_i g_i|| / Delta`, with the factors
    the train step uses):

    - flat: `min(||g_i||, C) / C`;
    - auto: `||g_i|| / (||g_i|| + 0.01)`, close to 1 for most examples;
    - global: `||g_i|| / Z` when `||g_i|| <= Z`, else 0 (the example is
      left out of the update);
    - clipping groups: `sqrt(sum_k (c_ik ||g_ik||)^2) / sqrt(sum_k C_k^2)`;
    - adaptive clipping: the ratio above at the thresholds of the pass,
      combined with the clip counts that every example moves by 1/2
      (`keras_dp.individual_accounting.ratios_with_clip_counts`): at least
      `sqrt(1 - (sigma / sigma_g)^2)`.

    An example whose gradient norm or loss is not finite counts at ratio 1.
    Ratios are rounded up to a multiple of `resolution`. Between two passes
    the epsilons are an estimate (the norms move with the weights), and
    they are computed from the private data: they are not themselves a
    differentially private release.

    Example:

    ```python
    individual = keras_dp.IndividualPrivacy(x, y, delta=1e-5)
    model.fit(x, y, batch_size=256, epochs=10, callbacks=[individual])
    individual.epsilons  # (n,) numpy array
    individual.summary_by_group(y)  # {class: {"min": ..., "median": ...}}
    individual.plot_histogram()  # needs matplotlib
    ```

    Args:
        x: the training inputs given to `fit` (after `validation_split`:
            the rows that train), or the `keras_dp.data.PoissonSampler`
            given to `fit`.
        y: the training targets.
        sample_weight: the sample weights given to `fit` (a `class_weight`
            must be given here as per-example weights).
        delta: the delta of the guarantee. Defaults to the optimizer's
            `target_delta`, else `1 / n**1.1`.
        every_epochs: epochs between two norm passes (default 10: a pass
            costs 0.4 of a training epoch on the benchmark MLP and 0.84 on
            the CNN; 1 gives the closest estimate).
        accountant: `"rdp"` (default) or `"pld"` (tighter; one PLD per
            distinct sequence of rounded ratios, so only with few of them:
            a coarse `resolution` and few passes).
        resolution: ratios are rounded up to a multiple of this (None: the
            exact ratios; one RDP computation per distinct value).
        batch_size: rows per chunk of the norm pass (default: the rows of a
            training batch, or `make_private`'s `microbatch_size`).
        max_pld_sequences: the most distinct ratio sequences PLD accounts
            for before it refuses.
        rdp_orders: the Renyi orders of the `"rdp"` accountant (default
            `keras_dp.accounting.DEFAULT_RDP_ORDERS`, as `EpsilonLogger`).

    Attributes:
        passes: `[start_step, end_step, ratios]` of each norm pass: the
            ratios (float32, `(n,)`) and the steps they are used for
            (`end_step` None while training continues).
    """

    def __init__(
        self,
        x,
        y=None,
        sample_weight=None,
        *,
        delta=None,
        every_epochs=DEFAULT_EVERY_EPOCHS,
        accountant="rdp",
        resolution=individual_accounting.DEFAULT_RESOLUTION,
        batch_size=None,
        max_pld_sequences=individual_accounting.DEFAULT_MAX_PLD_SEQUENCES,
        rdp_orders=None,
    ):
        super().__init__()
        if isinstance(x, data_lib.UserSampler):
            raise ValueError(_NO_USER_LEVEL)
        if isinstance(x, data_lib.PoissonSampler):
            if y is not None or sample_weight is not None:
                raise ValueError(
                    "IndividualPrivacy takes the data from the PoissonSampler "
                    "given as `x`: pass no `y` or `sample_weight` with it."
                )
            if x.x is None:
                raise ValueError(
                    "IndividualPrivacy reads every example at each norm pass, "
                    "from in-memory arrays: this PoissonSampler samples an "
                    "example `source`. Pass the arrays (or memmaps) to a "
                    "PoissonSampler, or to IndividualPrivacy directly."
                )
            x, y, sample_weight = x.x, x.y, x.sample_weight
        self.data = TrainingData(x, y, sample_weight)
        self.delta = None if delta is None else accounting.check_delta(delta)
        self.every_epochs = arguments.positive_int("every_epochs", every_epochs)
        self.accountant = accounting.check_accountant(accountant)
        self.resolution = individual_accounting.check_resolution(resolution)
        self.batch_size = arguments.positive_int(
            "batch_size", batch_size, allow_none=True
        )
        self.max_pld_sequences = arguments.positive_int(
            "max_pld_sequences", max_pld_sequences
        )
        if rdp_orders is not None:
            rdp_orders = tuple(accounting._orders(rdp_orders))
        self.rdp_orders = rdp_orders
        self.passes = []
        self._first_epoch = None
        self._norm_pass = None
        self._expected_batch_size = None
        self._cache = None

    @property
    def n(self):
        """The number of training examples."""
        return self.data.n

    # Training.

    def on_train_begin(self, logs=None):
        check_supported(self.model)
        self._check_data(self.model)
        if self.delta is None:
            self.delta = getattr(self.model.optimizer, "target_delta", None)
        if self.delta is None:
            self.delta = accounting.default_delta(self.n)
        else:
            accounting.check_delta(self.delta, self.n)
        self._first_epoch = None
        # Poisson sampling's `B`, which sets adaptive clipping's count
        # noise (kept for passes after `fit`).
        self._expected_batch_size = self.model._keras_dp.expected_batch_size

    def on_epoch_begin(self, epoch, logs=None):
        if self._first_epoch is None:
            self._first_epoch = epoch
        if (epoch - self._first_epoch) % self.every_epochs == 0:
            self.measure()

    def on_train_end(self, logs=None):
        self._close(ledger_lib.optimizer_steps(self.model))

    def measure(self):
        """Runs a norm pass now: its ratios are used from the current step
        on (`fit` calls this every `every_epochs` epochs)."""
        model = self.model
        step = ledger_lib.optimizer_steps(model)
        current = self._norm_pass
        if (
            current is None
            or current.model is not model
            or current.optimizer is not model.optimizer
        ):
            # A compiled pass holds the clipping settings of one optimizer.
            self._norm_pass = NormRatioPass(model, self._pass_rows(model))
        ratios = self._norm_pass(self.data)
        optimizer = model.optimizer
        if optimizer.adaptive_clipping is not None:
            ratios = individual_accounting.ratios_with_clip_counts(
                ratios,
                self.data.sample_weight > 0,
                optimizer.noise_multiplier,
                optimizer.gradient_noise_multiplier(self._expected_batch_size),
            )
        self._close(step)
        self.passes.append([step, None, ratios])

    def _close(self, step):
        if self.passes and self.passes[-1][1] is None:
            self.passes[-1][1] = step
        self._cache = None

    def _pass_rows(self, model):
        settings = model._keras_dp
        rows = (
            self.batch_size
            or settings.microbatch_size
            or settings.batch_size_hint
            or DEFAULT_PASS_ROWS
        )
        return min(rows, self.n)

    def _check_data(self, model):
        entries = model.optimizer.privacy_ledger.entries
        entry = entries[-1] if entries else {}
        if entry.get("unit") == "user":
            raise ValueError(_NO_USER_LEVEL)
        if not entry.get("poisson", False):
            raise ValueError(
                "IndividualPrivacy accounts for Poisson-sampled batches, but "
                "this fit trains on fixed-size batches (already-batched "
                "data, or make_private(poisson_sampling=False)). Pass "
                "in-memory arrays or a keras_dp.data.PoissonSampler to fit."
            )
        n = entry.get("n")
        if n is not None and n != self.n:
            raise ValueError(
                f"IndividualPrivacy was given {self.n} examples, but fit "
                f"trains on {n}. Give it the same arrays as fit: the rows "
                "that train (with validation_split=s, the first "
                "floor(n * (1 - s)) rows), or the PoissonSampler given to "
                "fit."
            )

    # Results.

    @property
    def steps(self):
        """Noisy updates the model has taken so far."""
        return ledger_lib.optimizer_steps(self.model)

    @property
    def epsilons(self):
        """Each example's epsilon at `delta`: an `(n,)` float64 array."""
        if self.model is None or self.delta is None:
            raise RuntimeError(
                "IndividualPrivacy has no epsilons yet: pass it to "
                "model.fit(..., callbacks=[...]) first."
            )
        steps = self.steps
        key = (steps, len(self.passes), self.delta, self.accountant)
        if self._cache is None or self._cache[0] != key:
            ledger = self.model.optimizer.privacy_ledger
            values = individual_accounting.individual_epsilons(
                [
                    (start, steps if end is None else end, r)
                    for start, end, r in self.passes
                ],
                lambda start, end: segments_between(ledger, start, end),
                steps,
                self.delta,
                self.accountant,
                resolution=self.resolution,
                rdp_orders=self.rdp_orders,
                max_pld_sequences=self.max_pld_sequences,
                n=self.n,
            )
            self._cache = (key, values)
        return self._cache[1]

    @property
    def global_epsilon(self):
        """The epsilon of the whole training (every example's bound), as
        `keras_dp.EpsilonLogger` reports it at the same delta and
        accountant."""
        ledger = self.model.optimizer.privacy_ledger
        return accounting.compute_epsilon_for_segments(
            ledger.segments(self.steps),
            self.delta,
            self.accountant,
            rdp_orders=self.rdp_orders,
        )

    def summary_by_group(self, groups):
        """Count, min, median, mean and max of the epsilons of each group.

        Args:
            groups: one label per example (`(n,)`, or one-hot `(n, k)`),
                e.g. the class labels `y`.

        Returns:
            `{label: {"count", "min", "median", "mean", "max"}}`, labels in
            sorted order.
        """
        return summary_by_group(self.epsilons, groups)

    def plot_histogram(self, ax=None, bins=50, groups=None):
        """A histogram of the epsilons (one per group with `groups`), with
        the global epsilon marked. Needs matplotlib (`pip install
        keras-dp[plots]`). Returns the matplotlib `Axes`."""
        return plot_histogram(
            self.epsilons, self.global_epsilon, ax=ax, bins=bins, groups=groups
        )


def check_supported(model):
    """Refuses models whose individual privacy the callback cannot
    account for, with what to do instead."""
    if not is_private(model):
        raise ValueError(
            "IndividualPrivacy reports the privacy of DP training, but this "
            "model is not private. Pass it through keras_dp.make_private(model) "
            "and compile it with a keras_dp DP optimizer."
        )
    optimizer = model.optimizer
    if getattr(optimizer, "privacy_ledger", None) is None:
        raise TypeError(
            "IndividualPrivacy needs a keras_dp DP optimizer (e.g. "
            "keras_dp.DPAdam). Received: "
            f"{type(optimizer).__name__}."
        )
    if getattr(model._keras_dp, "augment", None) is not None:
        raise ValueError(
            "IndividualPrivacy does not support augmentation multiplicity "
            "(make_private(augment=...)) yet: its norm pass computes each "
            "example's gradient without the augmented copies that the "
            "train step clips as one unit. Train without `augment`, or use "
            "keras_dp.EpsilonLogger for the global epsilon."
        )


def segments_between(ledger, start, end):
    """The ledger's `(noise_multiplier, sample_rate, count)` tuples of the
    steps `start <= t < end`."""
    ledger.segments(end)  # Raises when some steps cannot be accounted for.
    entries = ledger.entries
    segments = []
    for k, entry in enumerate(entries):
        stop = entries[k + 1]["start_step"] if k + 1 < len(entries) else end
        count = min(stop, end) - max(entry["start_step"], start)
        if count > 0:
            segments.append((entry["noise_multiplier"], entry["sample_rate"], count))
    return segments


class TrainingData:
    """The training arrays of `IndividualPrivacy`, in padded chunks."""

    def __init__(self, x, y=None, sample_weight=None):
        if x is None:
            raise ValueError("IndividualPrivacy needs the training inputs `x`.")
        self.x = tree.map_structure(_as_array, x)
        self.y = None if y is None else tree.map_structure(_as_array, y)
        self.n = data_lib.num_examples(self.x)
        for name, value in (("x", self.x), ("y", self.y)):
            rows = set() if value is None else {len(a) for a in tree.flatten(value)}
            if rows and rows != {self.n}:
                raise ValueError(
                    f"The arrays of `{name}` must have one row per example "
                    f"({self.n} rows, as x). Received row counts {sorted(rows)}."
                )
        self.sample_weight = _weights(sample_weight, self.n)

    def chunks(self, rows):
        """`(x, y, sample_weight, count)` of `rows` rows each; the last
        chunk is padded with rows of weight 0 (one shape for every call)."""
        for start in range(0, self.n, rows):
            stop = min(start + rows, self.n)

            def take(array, start=start, stop=stop):
                if stop - start == rows:
                    return array[start:stop]
                out = np.zeros((rows,) + array.shape[1:], dtype=array.dtype)
                out[: stop - start] = array[start:stop]
                return out

            x = tree.map_structure(take, self.x)
            y = None if self.y is None else tree.map_structure(take, self.y)
            yield x, y, take(self.sample_weight), stop - start


def _as_array(value):
    array = np.asarray(value)
    if np.issubdtype(array.dtype, np.floating):
        # As Keras's data adapters give them to the train step.
        array = array.astype(keras.backend.floatx())
    return array


def _weights(sample_weight, n):
    if sample_weight is None:
        return np.ones((n,), dtype="float32")
    weights = np.asarray(sample_weight, dtype="float32")
    if weights.shape != (n,) or not np.all(np.isfinite(weights) & (weights >= 0)):
        raise ValueError(
            f"`sample_weight` must be an array of {n} finite numbers >= 0 "
            "(one per example, as given to fit). Received an array of shape "
            f"{weights.shape}."
        )
    return weights


class NormRatioPass:
    """One pass over the training data: each example's `||c_i g_i|| /
    Delta` at the model's current weights, without an update.

    It takes the train step's path: the fast path's batched pass
    (`keras_dp.per_example.per_example_norms_and_sums`) where it supports
    the model, else the vmap path. Compiled once per model (`jax.jit`,
    `tf.function`; eager on PyTorch).

    Example:

    ```python
    ratios = NormRatioPass(model, rows=512)(TrainingData(x, y))
    ```
    """

    def __init__(self, model, rows):
        self.model = model
        self.optimizer = model.optimizer
        self.rows = rows
        settings = model._keras_dp
        # Clip factors need the clipping groups, resolved when the
        # optimizer is built (a pass may run before the first step).
        model.optimizer.build_for_model(model)
        clipping = model.optimizer.step_clipping()
        # Per-device groups' per-shard norms: the ratios below are per
        # variable, which the vmap path's recording gives.
        self.path = (
            "vmap"
            if settings.per_example == "vmap"
            or clipping.variable_partitions() is not None
            else "fast"
        )
        self._function = None

    def __call__(self, data):
        values = (
            _values(self.model.trainable_variables),
            _values(self.model.non_trainable_variables),
            self._thresholds(),
        )
        # Every chunk is dispatched before any result is read back, so that
        # the backend can queue them.
        results = [
            (self._run(values, x, y, sample_weight), count)
            for x, y, sample_weight, count in data.chunks(self.rows)
        ]
        return np.concatenate(
            [
                np.asarray(ops.convert_to_numpy(ratios), dtype=np.float32)[:count]
                for ratios, count in results
            ]
        )

    def _run(self, values, x, y, sample_weight):
        if self._function is None:
            self._function = _compiled(self._ratios)
        args = values + (x, y, sample_weight)
        try:
            return self._function(*args)
        except Unsupported:
            if self.path == "vmap":
                raise
            # The train step falls back the same way (and warns once).
            self.path = "vmap"
            self._function = _compiled(self._ratios)
            return self._function(*args)

    def _thresholds(self):
        """The current adaptive thresholds (an argument of the compiled
        pass, which must not keep the values it was traced with), or
        None."""
        thresholds = self.optimizer.group_thresholds
        if self.optimizer.adaptive_clipping is None or not thresholds:
            return None
        return np.asarray(list(thresholds.values()), dtype="float32")

    def _ratios(self, trainable, non_trainable, thresholds, x, y, sample_weight):
        model = self.model
        optimizer = self.optimizer
        if thresholds is None:
            clipping = optimizer.step_clipping()
            sensitivity = optimizer.sensitivity
        else:
            policy = optimizer.clipping_policy
            clipping = policy.for_thresholds(
                [thresholds[k] for k in range(policy.num_groups)]
            )
            sensitivity = ops.sqrt(ops.sum(ops.square(thresholds)))
        backend_ops = backend_lib.get_backend_module()
        if self.path == "fast":
            squared, _, losses, _, _ = per_example_norms_and_sums(
                model,
                backend_ops,
                trainable,
                non_trainable,
                x,
                y,
                sample_weight,
                rows_hint=self.rows,
            )
            factors = clipping.variable_clip_factors(squared)
        else:
            recording = _RecordingClipping(clipping)
            result = vmap_clipped_gradient_sum(
                model,
                recording,
                backend_ops,
                trainable,
                non_trainable,
                x,
                y,
                sample_weight,
            )
            squared, factors = recording.squared, recording.factors
            losses = result["losses"]
        return clipped_norm_ratios(squared, factors, losses, sensitivity)


def clipped_norm_ratios(squared_norms, factors, losses, sensitivity):
    """`||c_i g_i|| / Delta` from per-variable squared norms and clip
    factors (`(batch,)`, or `(batch, shards)` for per-device groups) and
    the sensitivity `Delta` (a number or a scalar tensor); 1 where the
    norm or the loss is not finite."""
    clipped = None
    for sq, f in zip(squared_norms, factors):
        term = ops.square(ops.cast(f, "float32")) * ops.cast(sq, "float32")
        if len(term.shape) > 1:
            term = ops.sum(term, axis=tuple(range(1, len(term.shape))))
        clipped = term if clipped is None else clipped + term
    ratios = ops.sqrt(clipped) / sensitivity
    unknown = ops.logical_or(
        clipping_lib.nonfinite_examples(squared_norms, losses),
        ops.logical_not(ops.isfinite(ratios)),
    )
    return ops.where(unknown, ops.ones_like(ratios), ops.minimum(ratios, 1.0))


class _RecordingClipping:
    """The step's clipping for the vmap path, keeping the squared norms
    and factors it sees; no adaptive counts."""

    num_count_groups = 0

    def __init__(self, clipping):
        self.clipping = clipping
        self.squared = None
        self.factors = None

    def variable_partitions(self):
        return self.clipping.variable_partitions()

    def clip_counts(self, squared_norms, mask=None):
        return None

    def variable_clip_factors(self, squared_norms):
        self.squared = squared_norms
        self.factors = self.clipping.variable_clip_factors(squared_norms)
        return self.factors


def _values(variables):
    backend = keras.backend.backend()
    if backend == "torch":
        return [v.value.detach() for v in variables]
    if backend == "tensorflow":
        import tensorflow as tf

        return [tf.convert_to_tensor(v.value) for v in variables]
    return [v.value for v in variables]


def _compiled(fn):
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.jit(fn)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(fn)
    return fn


def summary_by_group(epsilons, groups):
    """`{label: {"count", "min", "median", "mean", "max"}}` of `epsilons`
    by the label of each example in `groups` (`(n,)`, or one-hot)."""
    epsilons = np.asarray(epsilons)
    labels = np.asarray(groups)
    if labels.ndim == 2 and labels.shape[1] > 1:
        labels = np.argmax(labels, axis=1)
    labels = labels.reshape(len(labels), -1)[:, 0] if labels.ndim > 1 else labels
    if labels.shape != epsilons.shape:
        raise ValueError(
            f"`groups` must hold one label per example ({len(epsilons)}). "
            f"Received shape {np.shape(groups)}."
        )
    summary = {}
    for label in np.unique(labels):
        values = epsilons[labels == label]
        summary[label.item()] = {
            "count": int(len(values)),
            "min": float(np.min(values)),
            "median": float(np.median(values)),
            "mean": float(np.mean(values)),
            "max": float(np.max(values)),
        }
    return summary


def plot_histogram(epsilons, global_epsilon=None, ax=None, bins=50, groups=None):
    """A histogram of individual epsilons on `ax` (default: a new figure),
    one per group with `groups`, the global epsilon as a dashed line."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError(
            "Plotting individual epsilons needs matplotlib: pip install "
            "keras-dp[plots] (or pip install matplotlib)."
        ) from error
    epsilons = np.asarray(epsilons)
    if ax is None:
        _, ax = plt.subplots()
    if groups is None:
        ax.hist(epsilons, bins=bins)
    else:
        labels = np.asarray(groups)
        if labels.ndim == 2 and labels.shape[1] > 1:
            labels = np.argmax(labels, axis=1)
        labels = np.ravel(labels)
        edges = np.histogram_bin_edges(epsilons, bins=bins)
        for label in np.unique(labels):
            ax.hist(epsilons[labels == label], bins=edges, alpha=0.5, label=str(label))
        ax.legend(title="group")
    if global_epsilon is not None:
        ax.axvline(global_epsilon, color="black", linestyle="--", label="global")
    ax.set_xlabel("individual epsilon")
    ax.set_ylabel("examples")
    return ax
