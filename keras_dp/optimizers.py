"""Differentially private Keras optimizers.

Each DP optimizer is a real subclass of the matching `keras.optimizers` class,
so every Keras argument (learning-rate schedules, weight decay, EMA, gradient
accumulation, ...) works unchanged. The DP part is the mechanism: clip each
example's gradient, sum, add Gaussian noise once per logical batch and divide
by the *expected* batch size.

Per-example gradients cannot be recovered from the summed gradient that Keras
passes to an optimizer, so a DP optimizer only trains models that went through
`keras_dp.make_private(model)`, which installs a per-example train step.

Example:

```python
model = keras_dp.make_private(model)
model.compile(
    optimizer=keras_dp.DPAdam(learning_rate=1e-3, noise_multiplier=1.1,
                              auto_clip=True),
    loss="sparse_categorical_crossentropy",
    metrics=["accuracy"],
)
model.fit(x, y, batch_size=256, epochs=3)
```
"""

import contextlib
import itertools
import math
import numbers
import secrets
import sys
import weakref

import keras
import numpy as np
from keras import ops

from keras.src.utils import io_utils

from keras_dp import accounting
from keras_dp import backend as backend_lib
from keras_dp import clipping as clipping_lib
from keras_dp import groups as groups_lib
from keras_dp import ledger as ledger_lib

_NOT_PRIVATE_MESSAGE = (
    "{name} needs per-example gradients, but this model's train step gives "
    "it gradients already summed over the batch, so the update would not "
    "be private. Pass "
    "the model through `keras_dp.make_private(model)` before `compile()`/"
    "`fit()`: it installs the per-example train step that this optimizer "
    "needs."
)

_DP_CONFIG_KEYS = (
    "l2_norm_clip",
    "noise_multiplier",
    "clipping",
    "global_clip_threshold",
    "seed",
)


class DPOptimizerMixin:
    """The DP mechanism shared by all DP optimizers.

    Args:
        l2_norm_clip: clipping threshold `C` (flat clipping) or scale `R`
            (auto and global clipping). Every example's clipped gradient has
            L2 norm at most this value, which is the sensitivity of the sum.
            Defaults to 1.0.
        noise_multiplier: `sigma`. The clipped sum receives Gaussian noise
            of standard deviation `sigma * l2_norm_clip`. Defaults to 1.0,
            or to the value calibrated from `target_epsilon`.
        target_epsilon, target_delta, epochs: instead of `noise_multiplier`:
            the smallest `sigma` that keeps training for `epochs` epochs
            within `(target_epsilon, target_delta)`-DP is calibrated when
            `fit` first sees the dataset size (for the number of updates
            `fit` really runs per epoch), printed, and kept in
            `optimizer.noise_multiplier`. `fit` then also stops training
            before the update that would exceed `target_epsilon` (training
            past `epochs` epochs, say), and `keras_dp.EpsilonLogger()`
            reports at `target_delta`.
        clipping: `"flat"` (Abadi et al., the default), `"auto"` (AUTO-S,
            Bu et al.: `c_i = R / (||g_i|| + 0.01)`, no threshold to tune) or
            `"global"` (Bu et al. 2023: examples with `||g_i|| <= Z` are
            kept with the same factor `R / Z`, larger ones are dropped).
        auto_clip: shorthand for `clipping="auto"`.
        global_clip_threshold: `Z` for `clipping="global"`; defaults to
            `l2_norm_clip`.
        seed: None (the default) or an integer. None draws the noise key
            from the operating system's entropy (`secrets`), independent of
            `keras.utils.set_random_seed`, and keeps it in this process's
            memory only: the saved optimizer state holds the step counter,
            not the key, so nobody can recompute the noise from a saved
            model. An integer makes the noise reproducible (tests,
            debugging); anyone who knows it can subtract the noise, which
            voids the guarantee against them. Do not train models you
            release with a fixed seed.
        privacy_ledger: restored from a saved config; leave it unset.
        clip_groups: group-wise clipping (He et al.; see `keras_dp.groups`):
            `"flat"` (one group), `"layers"` (groups named on layers with
            `keras_dp.set_clip_group`; unnamed layers form `"default"`),
            `"per_layer"`, `"per_variable"` or `"per_device"`. Default
            (None): `"layers"` if some layer of the model carries a group,
            else `"flat"`. Group `k` is clipped to `C_k` (its threshold, else
            `l2_norm_clip / sqrt(K)`); the sensitivity is
            `sqrt(sum_k C_k^2)` and the noise one isotropic Gaussian.
        clip_thresholds: optional `{group name: C_k}`; thresholds set on
            layers take precedence.
        adaptive_clipping: `True` or a `keras_dp.AdaptiveClipping`: each
            group's threshold follows a quantile of its gradient norms
            (Andrew et al.), at the same total privacy cost `sigma`.
            Flat clipping only.
        layer_clip_groups: restored from a saved config (the groups of the
            model's layers); leave it unset.

    All other arguments are those of the wrapped Keras optimizer.
    """

    def __init__(
        self,
        *args,
        l2_norm_clip=1.0,
        noise_multiplier=None,
        clipping="flat",
        auto_clip=False,
        global_clip_threshold=None,
        seed=None,
        target_epsilon=None,
        target_delta=None,
        epochs=None,
        privacy_ledger=None,
        clip_groups=None,
        clip_thresholds=None,
        adaptive_clipping=None,
        layer_clip_groups=None,
        **kwargs,
    ):
        if auto_clip:
            if clipping not in ("flat", "auto"):
                raise ValueError(
                    "`auto_clip=True` is shorthand for clipping='auto' and "
                    f"conflicts with clipping={clipping!r}. Pass one of them."
                )
            clipping = "auto"
        clipping_lib.validate_clipping(
            clipping, l2_norm_clip, global_clip_threshold
        )
        if target_epsilon is None:
            if target_delta is not None or epochs is not None:
                raise ValueError(
                    "`target_delta` and `epochs` calibrate the noise together "
                    "with `target_epsilon`; pass all three, or "
                    "`noise_multiplier` instead."
                )
            if noise_multiplier is None:
                noise_multiplier = 1.0
        else:
            _check_calibration_target(
                noise_multiplier, target_epsilon, target_delta, epochs
            )
        if noise_multiplier is not None and (
            not isinstance(noise_multiplier, numbers.Real)
            or noise_multiplier < 0
        ):
            raise ValueError(
                "`noise_multiplier` (sigma) must be a non-negative number. "
                f"Received: {noise_multiplier!r}."
            )
        if seed is not None and not isinstance(seed, int):
            raise ValueError(f"`seed` must be an integer. Received: {seed!r}.")
        for name in ("clipnorm", "global_clipnorm", "clipvalue"):
            if kwargs.get(name) is not None:
                raise ValueError(
                    f"`{name}` is Keras's clipping of the batch gradient, "
                    "which a DP optimizer would apply after the noise: it "
                    "is not the per-example clipping that differential "
                    "privacy needs. Remove it and set `l2_norm_clip` (each "
                    "example's gradient norm bound) instead."
                )
        if kwargs.get("loss_scale_factor") is not None:
            raise ValueError(
                "`loss_scale_factor` is not supported by DP optimizers: the "
                "per-example gradients are clipped before any rescaling. "
                "Remove the argument."
            )
        kwargs.setdefault("name", type(self).__name__)
        super().__init__(*args, **kwargs)
        self.l2_norm_clip = float(l2_norm_clip)
        self.noise_multiplier = (
            None if noise_multiplier is None else float(noise_multiplier)
        )
        self.target_epsilon = target_epsilon
        self.target_delta = target_delta
        self.epochs = epochs
        self.privacy_ledger = ledger_lib.PrivacyLedger(privacy_ledger)
        self.clipping = clipping
        self.global_clip_threshold = (
            None
            if global_clip_threshold is None
            else float(global_clip_threshold)
        )
        self.seed = seed
        # Set by the private train step for the duration of one update.
        self._expected_batch_size = None
        self._noise_spaces = None
        self._init_clip_groups(
            clip_groups, clip_thresholds, adaptive_clipping, layer_clip_groups
        )

    def _init_clip_groups(
        self, clip_groups, clip_thresholds, adaptive_clipping, layer_clip_groups
    ):
        if clip_groups is not None and clip_groups not in (
            groups_lib.CLIP_GROUP_MODES
        ):
            raise ValueError(
                f"Unknown clip_groups={clip_groups!r}. Use one of "
                f"{', '.join(repr(m) for m in groups_lib.CLIP_GROUP_MODES)}, "
                "or None."
            )
        if clip_thresholds is not None:
            if not isinstance(clip_thresholds, dict):
                raise ValueError(
                    "`clip_thresholds` must be a dict {group name: threshold}. "
                    f"Received: {clip_thresholds!r}."
                )
            clip_thresholds = {
                str(k): groups_lib._check_threshold(v, k)
                for k, v in clip_thresholds.items()
            }
        if adaptive_clipping is True:
            adaptive_clipping = clipping_lib.AdaptiveClipping()
        elif adaptive_clipping is False:
            adaptive_clipping = None
        elif isinstance(adaptive_clipping, dict):
            adaptive_clipping = clipping_lib.AdaptiveClipping.from_config(
                adaptive_clipping
            )
        if adaptive_clipping is not None:
            if not isinstance(adaptive_clipping, clipping_lib.AdaptiveClipping):
                raise ValueError(
                    "`adaptive_clipping` must be True, False or a "
                    "keras_dp.AdaptiveClipping. Received: "
                    f"{adaptive_clipping!r}."
                )
            if self.clipping != "flat":
                raise ValueError(
                    "Adaptive clipping thresholds need clipping='flat' (with "
                    f"clipping={self.clipping!r} the threshold is only a "
                    "scale). Use clipping='flat'."
                )
            if self.gradient_accumulation_steps:
                raise ValueError(
                    "Adaptive clipping does not support "
                    "gradient_accumulation_steps yet."
                )
        self.clip_groups = clip_groups
        self.clip_thresholds = clip_thresholds
        self.adaptive_clipping = adaptive_clipping
        self._layer_clip_groups = dict(layer_clip_groups or {})
        self._clip_assignment = None
        self._group_thresholds = None
        self._clip_thresholds_variable = None
        self._bound_model_ref = None
        self._step_values = None
        self._clip_counts = None
        self._static_batch_size = None

    def __repr__(self):
        noise = (
            f"noise_multiplier={self.noise_multiplier:.4g}"
            if self.noise_multiplier is not None
            else f"target_epsilon={self.target_epsilon} (not calibrated yet)"
        )
        groups = "" if self.clip_groups is None else f", clip_groups={self.clip_groups!r}"
        adaptive = "" if self.adaptive_clipping is None else ", adaptive"
        return (
            f"<{type(self).__name__} name={self.name!r} "
            f"l2_norm_clip={self.l2_norm_clip:g} {noise} "
            f"clipping={self.clipping!r}{groups}{adaptive}"
            + (
                f" gradient_accumulation_steps={self.gradient_accumulation_steps}"
                if self.gradient_accumulation_steps
                else ""
            )
            + (" seed=fixed" if self.seed is not None else "")
            + ">"
        )

    def calibrate_noise(self, sample_rate, updates_per_epoch=None):
        """Sets `noise_multiplier` from the target budget, once.

        Called by `fit` on a private model when it knows the sampling rate
        and, where it can, the number of updates per epoch (without it,
        `ceil(epochs / sample_rate)` updates are assumed). The privacy
        already spent by the model (its ledger) counts against the target.
        Returns the noise multiplier in use.
        """
        if self.noise_multiplier is None:
            if updates_per_epoch is None:
                steps = accounting.steps_for_epochs(self.epochs, sample_rate)
            else:
                steps = int(math.ceil(self.epochs * updates_per_epoch))
            ledger = self.privacy_ledger
            spent = ledger.segments(
                ledger.step_offset + ledger_lib.optimizer_updates(self)
            )
            self.noise_multiplier = accounting.calibrate_noise_multiplier(
                self.target_epsilon,
                self.target_delta,
                sample_rate,
                steps=steps,
                prior_segments=spent,
            )
            io_utils.print_msg(
                f"keras_dp: noise_multiplier={self.noise_multiplier:.4f} "
                f"gives epsilon <= {self.target_epsilon} at delta="
                f"{self.target_delta} for {self.epochs} epochs ({steps} "
                f"updates) at sample rate {sample_rate:.4g}; training stops "
                "before an update that would exceed it."
            )
        return self.noise_multiplier

    @property
    def sensitivity(self):
        """L2 sensitivity of the clipped sum.

        `l2_norm_clip` in every mode with one group; `sqrt(sum_k C_k^2)`
        with clipping groups (the current thresholds, when adaptive).
        """
        if self._group_thresholds is None:
            return clipping_lib.sensitivity(self.l2_norm_clip)
        if self._clip_thresholds_variable is not None:
            return clipping_lib.group_sensitivity(
                keras.ops.convert_to_numpy(self._clip_thresholds_variable)
            )
        return clipping_lib.group_sensitivity(self._group_thresholds)

    @property
    def clip_group_names(self):
        """Names of the clipping groups (known once the optimizer is built)."""
        if self._clip_assignment is None:
            return None
        return list(self._clip_assignment.names)

    @property
    def group_thresholds(self):
        """`{group: C_k}`: the current thresholds (None before build)."""
        if self._clip_assignment is None:
            return None
        values = self._group_thresholds
        if self._clip_thresholds_variable is not None:
            values = keras.ops.convert_to_numpy(self._clip_thresholds_variable)
        return {
            name: float(c) for name, c in zip(self._clip_assignment.names, values)
        }

    @property
    def noise_stddev(self):
        """Standard deviation of the noise added to the clipped sum."""
        return self.noise_multiplier * self.sensitivity

    def clip_factors(self, norms):
        """Per-example clip factors `c_i` for gradient norms `norms`."""
        return clipping_lib.clip_factors(
            norms, self.clipping, self.l2_norm_clip, self.global_clip_threshold
        )

    def variable_clip_factors(self, squared_norms):
        """Clip factors of each example for each trainable variable.

        Args:
            squared_norms: one `(batch,)` tensor per trainable variable (in
                the model's `trainable_variables` order): each example's
                squared gradient norm restricted to that variable.

        Returns:
            One `(batch,)` tensor of factors per variable. With one clipping
            group every variable gets the factors of the total norm; with
            groups, each variable gets the factors of its group's norm.

        With per-device groups of sharded variables (see
        `variable_partitions`), a sharded variable's entry is `(batch,
        shards)` (one squared norm per shard) and so are its factors.
        """
        if not self._is_grouped():
            factors = self.clip_factors(clipping_lib.total_norms(squared_norms))
            return [factors] * len(squared_norms)
        group_norms = self._group_norms(squared_norms)
        global_ratio = (
            self.global_clip_threshold or self.l2_norm_clip
        ) / self.l2_norm_clip
        group_factors = clipping_lib.group_clip_factors(
            group_norms, self.clipping, self._thresholds_in_step(), global_ratio
        )
        factors = []
        for spec in self._clip_assignment.variable_groups:
            if isinstance(spec, int):
                factors.append(group_factors[spec])
            else:
                first, _, shards = spec
                factors.append(
                    ops.stack(
                        [group_factors[first + j] for j in range(shards)], axis=1
                    )
                )
        return factors

    def clip_counts(self, squared_norms, mask=None):
        """Centred counts of adaptive clipping for one (micro)batch.

        Returns the `(K,)` tensor `sum_i mask_i (1{||g_i^(k)|| <= C_k} - 1/2)`
        (one example moves each entry by exactly 1/2), or None without
        adaptive clipping. `mask` marks real rows (padding: 0).
        """
        if self.adaptive_clipping is None:
            return None
        return clipping_lib.centred_counts(
            self._group_norms(squared_norms), self._thresholds_in_step(), mask
        )

    def _is_grouped(self):
        if self._clip_assignment is None:
            if self.clip_groups not in (None, "flat") or self.adaptive_clipping:
                raise RuntimeError(
                    f"{type(self).__name__}(clip_groups={self.clip_groups!r}"
                    f", adaptive_clipping={self.adaptive_clipping!r}) has not "
                    "resolved its clipping groups: they are resolved when "
                    "the optimizer is built for a model (model.fit does "
                    "this). In a custom loop call "
                    "optimizer.bind_clip_groups(model) before "
                    "optimizer.build(model.trainable_variables)."
                )
            return False
        return (
            self._clip_assignment.num_groups > 1
            or self.adaptive_clipping is not None
            or self.variable_partitions() is not None
            or self._group_thresholds[0] != self.l2_norm_clip
        )

    def _group_norms(self, squared_norms):
        assignment = self._clip_assignment
        sums = [None] * assignment.num_groups

        def add(k, value):
            sums[k] = value if sums[k] is None else sums[k] + value

        for sq, spec in zip(squared_norms, assignment.variable_groups):
            if isinstance(spec, int):
                if len(sq.shape) != 1:
                    sq = ops.sum(sq, axis=1)
                add(spec, sq)
            else:
                first, _, shards = spec
                if len(sq.shape) != 2:
                    raise ValueError(
                        "clip_groups='per_device' needs per-shard squared "
                        "norms of sharded variables (batch, shards); this "
                        "per-example method gave one norm per variable."
                    )
                for j in range(shards):
                    add(first + j, sq[:, j])
        return [ops.sqrt(s) for s in sums]

    def variable_partitions(self):
        """Per variable, None or `(axis, shards)`; None if nothing is split.

        Per-device groups of sharded variables need each example's squared
        norm per shard (`clipping.per_example_squared_norms(grads,
        partitions)`).
        """
        if self._clip_assignment is None:
            return None
        partitions = self._clip_assignment.partitions()
        return partitions if any(partitions) else None

    @property
    def needs_vmap_path(self):
        """Whether clipping needs more than per-variable norms.

        Per-device groups clip shards of variables, which needs per-shard
        norms that only the vmap path computes.
        """
        return self.variable_partitions() is not None

    @property
    def num_count_groups(self):
        """`K` when adaptive clipping needs counts from the step, else 0."""
        if self.adaptive_clipping is None or self._clip_assignment is None:
            return 0
        return self._clip_assignment.num_groups

    def _thresholds_in_step(self):
        """`C_k` per group: floats, or scalar tensors when adaptive.

        Inside a JAX step they come from the step's optimizer-variable
        values (`step_state`); inside `stateless_apply` from its scope; on
        TensorFlow from the variable.
        """
        variable = self._clip_thresholds_variable
        if variable is None:
            return list(self._group_thresholds)
        value = None
        if self._step_values is not None:
            for v, val in zip(self.variables, self._step_values):
                if v is variable:
                    value = val
                    break
        if value is None:
            value = variable.value
        value = ops.convert_to_tensor(value)
        return [value[k] for k in range(self._clip_assignment.num_groups)]

    @contextlib.contextmanager
    def step_state(self, optimizer_variables):
        """Reads optimizer state from `optimizer_variables` inside.

        The JAX train step passes the optimizer variables as values; clip
        factors computed inside (adaptive thresholds) use them.
        """
        self._step_values = list(optimizer_variables)
        try:
            yield
        finally:
            self._step_values = None

    def took_update(self, optimizer_variables=None):
        """Whether the step just applied updated the weights (bool tensor).

        False on the micro-steps of a `gradient_accumulation_steps` window
        that only accumulate. `optimizer_variables`: the JAX step's values.
        """
        if optimizer_variables is None:
            iterations = self._iterations.value
        else:
            (iterations,) = [
                value
                for v, value in zip(self.variables, optimizer_variables)
                if v is self._iterations
            ]
        steps = self.gradient_accumulation_steps or 1
        return ops.equal(iterations % steps, 0)

    def clip_threshold_logs(self, optimizer_variables=None):
        """`{"clip_threshold/<group>": C_k}` with adaptive clipping, else {}."""
        variable = self._clip_thresholds_variable
        if variable is None:
            return {}
        value = None
        if optimizer_variables is not None:
            for v, val in zip(self.variables, optimizer_variables):
                if v is variable:
                    value = val
        if value is None:
            value = variable.value
        return {
            f"clip_threshold/{name}": value[k]
            for k, name in enumerate(self._clip_assignment.names)
        }

    def gradient_noise_multiplier(self, expected_batch_size):
        """`sigma_g`, the multiplier of the gradient noise.

        `noise_multiplier` without adaptive clipping; with it,
        `(sigma^-2 - K (2 sigma_b)^-2)^(-1/2)` so that gradient and counts
        together cost `sigma` (error if `sigma >= 2 sigma_b / sqrt(K)`).
        """
        if self.adaptive_clipping is None:
            return self.noise_multiplier
        num_groups = self._clip_assignment.num_groups if (
            self._clip_assignment is not None
        ) else 1
        return clipping_lib.adaptive_noise_multipliers(
            self.noise_multiplier,
            self.adaptive_clipping.count_noise_stddev(expected_batch_size),
            num_groups,
        )

    def bind_clip_groups(self, model):
        """Resolves clipping groups from `model`'s layers at the next build.

        `model.fit` does this itself (the optimizer finds its model when
        Keras builds it); call it in custom training loops.
        """
        if self.built:
            if self._bound_model() is model:
                return
            raise RuntimeError(
                "bind_clip_groups must be called before the optimizer is "
                "built: groups and thresholds are fixed at build."
            )
        self._bound_model_ref = weakref.ref(model)

    def build_for_model(self, model):
        """Builds the optimizer for `model`'s trainable variables, once.

        The private train steps call it before computing clip factors,
        which need the clipping groups (TensorFlow's trainer would
        otherwise build the optimizer only inside `apply`).
        """
        if not self.built:
            self.bind_clip_groups(model)
            self.build(model.trainable_variables)

    def _bound_model(self):
        # A weak reference: the model must not become part of the
        # optimizer's saved state.
        ref = getattr(self, "_bound_model_ref", None)
        return None if ref is None else ref()

    def _resolve_clip_groups(self, variables, model):
        if model is None:
            model = self._bound_model()
        if model is not None:
            self._bound_model_ref = weakref.ref(model)
            groups_lib.apply_layer_groups(model, self._layer_clip_groups)
            self._layer_clip_groups = groups_lib.collect_layer_groups(model)
        assignment = groups_lib.resolve_groups(
            self.clip_groups,
            variables,
            model,
            keras.distribution.distribution(),
        )
        given = dict(self.clip_thresholds or {})
        unknown = set(given) - set(assignment.names)
        if unknown:
            raise ValueError(
                f"clip_thresholds names groups {sorted(unknown)} that this "
                f"model does not have. Its groups: {assignment.names}."
            )
        given.update(assignment.thresholds)
        split = self.l2_norm_clip / math.sqrt(assignment.num_groups)
        self._group_thresholds = [
            given.get(name, split) for name in assignment.names
        ]
        self._clip_assignment = assignment

    def build(self, variables):
        if self.built:
            return
        model = _check_model_is_private(self)
        self._resolve_clip_groups(variables, model)
        super().build(variables)
        # The noise generator's state is an optimizer variable: it is saved
        # with the model and threaded through JAX's stateless steps.
        with keras.name_scope(self.name, caller=self):
            self._noise_seed_generator = NoiseSeedGenerator(
                self.seed, name="dp_noise_seed"
            )
        self._track_variable(self._noise_seed_generator.state)
        if self.adaptive_clipping is not None:
            # Adaptive thresholds are optimizer state: saved and resumed.
            initial = np.asarray(self._group_thresholds, dtype="float32")
            # An initializer, not an assign: TensorFlow may build the
            # optimizer inside the traced train step.
            self._clip_thresholds_variable = self.add_variable(
                shape=(self._clip_assignment.num_groups,),
                initializer=lambda shape, dtype=None: ops.cast(
                    ops.convert_to_tensor(initial), dtype or "float32"
                ),
                dtype="float32",
                name="clip_thresholds",
            )

    @contextlib.contextmanager
    def private_update(
        self,
        expected_batch_size,
        noise_spaces=None,
        clip_counts=None,
        static_expected_batch_size=None,
    ):
        """Marks gradients applied inside as private train-step output.

        Used by the train step that `make_private` installs: inside, the
        gradients given to `apply`/`stateless_apply` are the clipped sums
        divided by `expected_batch_size`, plus data-independent terms
        (weight regularisation); the optimizer adds the noise.

        `noise_spaces` (optional) has one entry per trainable variable: None
        for noise on every coordinate, or `draw(standard_normal)` returning
        the variable-shaped image of standard noise drawn in a smaller
        privatised space (`keras_dp.LowRankSparse` carriers), where
        `standard_normal(shape, dtype)` samples the optimizer's noise.

        With adaptive clipping, `clip_counts` is the batch's `(K,)` centred
        count (`clip_counts()` summed over the batch) and
        `static_expected_batch_size` the Python value of `B` when known
        (for `sigma_b = B / 20`).
        """
        self._expected_batch_size = expected_batch_size
        self._noise_spaces = noise_spaces
        self._clip_counts = clip_counts
        self._static_batch_size = static_expected_batch_size
        try:
            yield
        finally:
            self._expected_batch_size = None
            self._noise_spaces = None
            self._clip_counts = None
            self._static_batch_size = None

    def _standard_normal(self, shape, dtype):
        # The backend's sampler: on a CPU keras_dp's compiled kernel
        # (`keras_dp.native`); the frameworks' own normal kernels are the
        # slowest part of a DP step on small models.
        draw = backend_lib.get_backend_module().standard_normal(
            shape, self._noise_seed_generator
        )
        return ops.cast(draw, dtype)

    def apply(self, grads, trainable_variables=None):
        if self._expected_batch_size is None:
            raise RuntimeError(
                _NOT_PRIVATE_MESSAGE.format(name=type(self).__name__)
            )
        return super().apply(grads, trainable_variables)

    def _clip_gradients(self, grads):
        # Called once per actual update, also under gradient accumulation
        # (on the averaged accumulated gradient), so noise is added once per
        # logical batch: the accumulated mean of n micro-steps needs noise
        # sigma * Delta / (B * n).
        if self.noise_multiplier is None:
            raise ValueError(
                f"{type(self).__name__} was given target_epsilon="
                f"{self.target_epsilon} but has not calibrated its noise yet: "
                "that needs the dataset size, which `fit` on in-memory "
                "arrays provides. For other data, call "
                "`optimizer.calibrate_noise(batch_size / n)` before fit, or "
                "pass `noise_multiplier`."
            )
        if self.adaptive_clipping is not None:
            grads = self._adaptive_noise_and_update(grads)
        elif self.noise_multiplier > 0:
            steps = self.gradient_accumulation_steps or 1
            stddev = self.noise_stddev / (
                ops.cast(self._expected_batch_size, "float32") * steps
            )
            grads = self._add_noise(grads, stddev)
        # Keras's clipnorm/clipvalue are refused in __init__; the base class
        # still gets its turn (a no-op then).
        return super()._clip_gradients(grads)

    def _add_noise(self, grads, stddev):
        """`g + stddev * N(0, I)`, drawn in each variable's noise space.

        Without a `keras.distribution`, the noise of all variables that
        have no noise space of their own is one draw, split: one random
        number kernel for the whole model is markedly faster than one per
        variable (on a CPU, 1.9 against 2.7 ms for the 670k coordinates of
        a 784-512-512-10 MLP on JAX). Under a distribution each variable
        keeps its own draw, which follows the variable's sharding.
        """
        spaces = getattr(self, "_noise_spaces", None) or [None] * len(grads)
        full = []
        if keras.distribution.distribution() is None:
            full = [
                k for k, (g, space) in enumerate(zip(grads, spaces))
                if g is not None and space is None
            ]
        out = list(grads)
        if full:
            out_full = self._noisy_flat([grads[k] for k in full], stddev)
            for k, g in zip(full, out_full):
                out[k] = g
        for k, (g, space) in enumerate(zip(grads, spaces)):
            if g is None or k in full:
                continue
            if space is None:
                z = self._standard_normal(ops.shape(g), "float32")
            else:
                z = space(self._standard_normal)
            out[k] = _plus_noise(g, stddev, z)
        return out

    def _noisy_flat(self, grads, stddev):
        """`grads` plus noise from one flat draw, split in order: the
        backend's fused kernel where it has one (TensorFlow's compiled op
        adds while it draws), else a draw and adds."""
        fused = getattr(
            backend_lib.get_backend_module(), "noisy_gradients", None
        )
        if fused is not None:
            noisy = fused(grads, stddev, self._noise_seed_generator)
            if noisy is not None:
                return noisy
        sizes = [_static_size(g) for g in grads]
        flat = self._standard_normal((sum(sizes),), "float32")
        offsets = [0] + list(itertools.accumulate(sizes))
        return [
            _plus_noise(g, stddev, ops.reshape(flat[a:b], ops.shape(g)))
            for g, a, b in zip(grads, offsets[:-1], offsets[1:])
        ]

    def _adaptive_noise_and_update(self, grads):
        """Gradient noise at `sigma_g`, then the noisy threshold update."""
        if self._clip_counts is None:
            raise RuntimeError(
                "Adaptive clipping got no clip counts from the train step: "
                "train the model through keras_dp.make_private."
            )
        adaptive = self.adaptive_clipping
        num_groups = self._clip_assignment.num_groups
        batch = ops.cast(self._expected_batch_size, "float32")
        static = _static_float(self._static_batch_size)
        if static is not None or adaptive.count_stddev is not None:
            sigma_b = adaptive.count_noise_stddev(static)
            sigma_g = clipping_lib.adaptive_noise_multipliers(
                self.noise_multiplier, sigma_b, num_groups
            )
        else:
            # B only known when the step runs: the same formula in tensors;
            # a noise multiplier too large for sigma_b gives NaN updates.
            sigma_b = adaptive.count_stddev_fraction * batch
            sigma = float(self.noise_multiplier)
            if sigma == 0:
                sigma_g = 0.0
            else:
                inverse = sigma**-2 - num_groups * (2.0 * sigma_b) ** -2
                sigma_g = ops.where(
                    inverse > 0, ops.rsqrt(ops.maximum(inverse, 1e-30)), np.nan
                )
        thresholds = ops.stack(self._thresholds_in_step())
        if not (isinstance(sigma_g, float) and sigma_g == 0):
            stddev = sigma_g * ops.sqrt(ops.sum(ops.square(thresholds))) / batch
            grads = self._add_noise(grads, stddev)
        counts = ops.cast(self._clip_counts, "float32")
        noisy = counts + sigma_b * self._standard_normal((num_groups,), "float32")
        fraction = noisy / batch + 0.5
        new = thresholds * ops.exp(
            -adaptive.learning_rate * (fraction - adaptive.target_quantile)
        )
        self._clip_thresholds_variable.assign(new)
        return grads

    def get_config(self):
        config = super().get_config()
        config.update({key: getattr(self, key) for key in _DP_CONFIG_KEYS})
        if self.noise_multiplier is None:
            config.update(
                target_epsilon=self.target_epsilon,
                target_delta=self.target_delta,
                epochs=self.epochs,
            )
        config["privacy_ledger"] = self.privacy_ledger.get_config()
        # Group settings only when used, so plain configs stay unchanged.
        if self.clip_groups is not None:
            config["clip_groups"] = self.clip_groups
        if self.clip_thresholds:
            config["clip_thresholds"] = dict(self.clip_thresholds)
        if self.adaptive_clipping is not None:
            config["adaptive_clipping"] = self.adaptive_clipping.get_config()
        model = self._bound_model() or _find_model(self)
        layer_groups = (
            groups_lib.collect_layer_groups(model)
            if model is not None
            else self._layer_clip_groups
        )
        if layer_groups:
            config["layer_clip_groups"] = layer_groups
        return config


class NoiseSeedGenerator(keras.random.SeedGenerator):
    """The DP noise's seed: a `keras.random.SeedGenerator` whose keys are
    offset by a secret when no seed is given.

    With `seed=None` the state variable (saved with the optimizer) starts
    at `[0, 0]` and two 31-bit words from the operating system's entropy
    are added to every key it hands out; they live in this object only, so
    neither `keras.utils.set_random_seed` nor a saved model reveals the
    noise. With an integer seed there is no secret: the noise is the
    reproducible stream of `keras.random.SeedGenerator(seed)`.
    """

    def __init__(self, seed=None, name=None):
        super().__init__(0 if seed is None else seed, name=name)
        self._secret = (
            None
            if seed is not None
            else (secrets.randbits(31), secrets.randbits(31))
        )

    def next(self, ordered=True):
        key = super().next(ordered=ordered)
        if self._secret is None:
            return key
        return key + ops.convert_to_tensor(self._secret, dtype=key.dtype)


def _check_calibration_target(noise_multiplier, target_epsilon, target_delta, epochs):
    if noise_multiplier is not None:
        raise ValueError(
            "Pass either `noise_multiplier` or `target_epsilon` (with "
            "`target_delta` and `epochs`), not both."
        )
    if target_delta is None or epochs is None:
        raise ValueError(
            "`target_epsilon` needs `target_delta` and `epochs` to calibrate "
            "the noise multiplier. Received: "
            f"target_delta={target_delta!r}, epochs={epochs!r}."
        )
    if not target_epsilon > 0:
        raise ValueError(
            f"`target_epsilon` must be positive. Received: {target_epsilon!r}."
        )
    accounting.check_delta(target_delta)
    if not epochs > 0:
        raise ValueError(f"`epochs` must be positive. Received: {epochs!r}.")


def _check_model_is_private(optimizer):
    """Fails fast when a model is about to train without the private step.

    Keras builds the optimizer from the model (`_symbolic_build` at the start
    of `fit`/`train_on_batch`, `compile_from_config` in `load_model`) before
    any step runs. The model is found on the call stack; raising here, rather
    than when the first step is traced, leaves the model intact (JAX's
    trainer has already detached the variables by then).
    """
    from keras_dp import private_model

    frame = _model_frame(optimizer, depth=12)
    if frame is None:
        return None
    owner = frame.f_locals["self"]
    if private_model.is_private(owner):
        return owner
    if frame.f_code.co_name == "compile_from_config":
        # `load_model` of a model saved with a DP optimizer: it was private
        # when saved, so it comes back private.
        private_model.make_private(owner)
        return owner
    raise RuntimeError(_NOT_PRIVATE_MESSAGE.format(name=type(optimizer).__name__))


def _find_model(optimizer, depth=40):
    """The model whose `optimizer` this is, from the call stack (saving)."""
    frame = _model_frame(optimizer, depth)
    return None if frame is None else frame.f_locals["self"]


def _model_frame(optimizer, depth):
    """The nearest of `depth` frames above the caller whose `self` is the
    model that owns `optimizer`, or None."""
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if (
            isinstance(owner, keras.Model)
            and getattr(owner, "optimizer", None) is optimizer
        ):
            return frame
        frame = frame.f_back
    return None


def _plus_noise(g, stddev, z):
    return g + ops.cast(stddev, g.dtype) * ops.cast(z, g.dtype)


def _static_size(tensor):
    size = 1
    for dim in tensor.shape:
        size *= int(dim)
    return size


def _static_float(value):
    """`value` as a Python float when known at trace time, else None."""
    if value is None:
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    try:
        return float(keras.ops.convert_to_numpy(value))
    except Exception:
        return None


_DP_CLASSES = {}


def make_dp_optimizer(optimizer_class):
    """Returns the DP version of a Keras optimizer class.

    The returned class subclasses `optimizer_class`, takes all its arguments
    plus the DP arguments of `DPOptimizerMixin`, and is registered for Keras
    serialization as `keras_dp>DP<Name>`. To load a saved model that used it,
    call `make_dp_optimizer` for the same class before `load_model`.

    Example:

    ```python
    DPAdagrad = keras_dp.make_dp_optimizer(keras.optimizers.Adagrad)
    optimizer = DPAdagrad(learning_rate=0.1, noise_multiplier=1.0)
    ```
    """
    if not (
        isinstance(optimizer_class, type)
        and issubclass(optimizer_class, keras.optimizers.Optimizer)
    ):
        raise TypeError(
            "make_dp_optimizer expects a keras.optimizers.Optimizer subclass, "
            f"e.g. keras.optimizers.Adagrad. Received: {optimizer_class!r}."
        )
    if issubclass(optimizer_class, DPOptimizerMixin):
        return optimizer_class
    if optimizer_class not in _DP_CLASSES:
        name = "DP" + optimizer_class.__name__
        dp_class = type(
            name,
            (DPOptimizerMixin, optimizer_class),
            {
                "__doc__": (
                    f"Differentially private `{optimizer_class.__name__}`.\n\n"
                    + DPOptimizerMixin.__doc__
                ),
                "__module__": __name__,
            },
        )
        _DP_CLASSES[optimizer_class] = keras.saving.register_keras_serializable(
            package="keras_dp", name=name
        )(dp_class)
    return _DP_CLASSES[optimizer_class]


DPSGD = make_dp_optimizer(keras.optimizers.SGD)
DPAdam = make_dp_optimizer(keras.optimizers.Adam)
DPAdamW = make_dp_optimizer(keras.optimizers.AdamW)
DPLamb = make_dp_optimizer(keras.optimizers.Lamb)


def is_dp_optimizer(optimizer):
    return isinstance(optimizer, DPOptimizerMixin)
