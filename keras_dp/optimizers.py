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
import math
import numbers
import weakref

import keras
import numpy as np
from keras import ops

from keras_dp import accounting
from keras_dp import arguments
from keras_dp import backend as backend_lib
from keras_dp import clipping as clipping_lib
from keras_dp import groups as groups_lib
from keras_dp import keras_compat
from keras_dp import ledger as ledger_lib
from keras_dp.clipped_batch import ClippedBatch
from keras_dp.clipped_batch import NoisyGradients
from keras_dp.clipping_policy import ClippingPolicy
from keras_dp.noise import GaussianNoise
from keras_dp.noise import NoiseSeedGenerator  # noqa: F401 (public name)

_NOT_PRIVATE_MESSAGE = (
    "{name} needs per-example gradients, but {why}, so the update would "
    "not be private. Pass the model through `keras_dp.make_private(model)` "
    "before `compile()`/`fit()`: it installs the per-example train step "
    "that this optimizer needs and attaches the optimizer to the model. "
    "(In a custom training loop that computes private gradients itself, "
    "call `optimizer.bind_clip_groups(model)` before building the "
    "optimizer.)"
)


class DPOptimizerMixin:
    """The DP mechanism shared by all DP optimizers.

    A DP optimizer composes two mechanism objects: `clipping_policy` (a
    `keras_dp.ClippingPolicy`: how each example's gradient is bounded) and
    `noise` (a `keras_dp.GaussianNoise`: the noise added to the clipped
    sum). The private train step computes the clipped sum of a batch
    (`keras_dp.ClippedBatch`), hands it to `privatize` (noise, adaptive
    threshold update), and applies the result with Keras's own `apply`
    (accumulation, weight decay, the update rule). `apply` refuses any
    other gradients.

    Args:
        l2_norm_clip: clipping threshold `C` (flat clipping) or scale `R`
            (auto and global clipping). Every example's clipped gradient has
            L2 norm at most this value, which is the sensitivity of the sum.
            Defaults to 1.0.
        noise_multiplier: `sigma`. The clipped sum receives Gaussian noise
            of standard deviation `sigma * l2_norm_clip`. Defaults to 1.0,
            or to the value calibrated from `target_epsilon`.
        target_epsilon: instead of `noise_multiplier`, with `target_delta`
            and `epochs`: the smallest `sigma` that keeps training for
            `epochs` epochs within `(target_epsilon, target_delta)`-DP is
            calibrated when `fit` first sees the dataset size (for the
            number of updates `fit` really runs per epoch), printed, and
            kept in `optimizer.noise_multiplier`. `fit` then also stops
            training before the update that would exceed `target_epsilon`
            (training past `epochs` epochs, say), and
            `keras_dp.EpsilonLogger()` reports at `target_delta`.
        target_delta: the delta of the target guarantee (with
            `target_epsilon`).
        epochs: the number of epochs the noise is calibrated for (with
            `target_epsilon`).
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
        secure_mode: False (the default) or True. True keys the noise of
            every step afresh with the operating system's cryptographic
            entropy (never stored) and samples it with
            `keras_dp.secure_noise` (a sum of four Gaussians with tails
            right out to 16 standard deviations, against the
            floating-point attacks on Gaussian samplers), and `fit` draws
            the Poisson batches from the same entropy
            (`keras_dp.data.PoissonSampler(secure_mode=True)`). Nothing is
            reproducible: `seed` must be None. See the "Security and
            reliability" docs for what it protects against.
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
        secure_mode=False,
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
        if arguments.boolean("auto_clip", auto_clip):
            if clipping not in ("flat", "auto"):
                raise ValueError(
                    "`auto_clip=True` is shorthand for clipping='auto' and "
                    f"conflicts with clipping={clipping!r}. Pass one of them."
                )
            clipping = "auto"
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
            target_epsilon, target_delta, epochs = _check_calibration_target(
                noise_multiplier, target_epsilon, target_delta, epochs
            )
        _refuse_keras_clipping(kwargs)
        clipping_policy = ClippingPolicy(
            l2_norm_clip,
            clipping,
            global_clip_threshold,
            clip_groups,
            clip_thresholds,
            adaptive_clipping,
        )
        noise = GaussianNoise(noise_multiplier, seed, secure_mode)
        kwargs.setdefault("name", type(self).__name__)
        super().__init__(*args, **kwargs)
        self.clipping_policy = clipping_policy
        self.noise = noise
        if self.clipping_policy.adaptive_clipping and self.gradient_accumulation_steps:
            raise ValueError(
                "Adaptive clipping does not support gradient_accumulation_steps yet."
            )
        self.target_epsilon = target_epsilon
        self.target_delta = target_delta
        self.epochs = epochs
        self.privacy_ledger = ledger_lib.PrivacyLedger(privacy_ledger)
        self._layer_clip_groups = dict(layer_clip_groups or {})
        self._owner_ref = None
        self._clip_thresholds_variable = None

    # The settings, as the mechanism objects hold them.

    l2_norm_clip = property(lambda self: self.clipping_policy.l2_norm_clip)
    clipping = property(lambda self: self.clipping_policy.clipping)
    global_clip_threshold = property(
        lambda self: self.clipping_policy.global_clip_threshold
    )
    clip_groups = property(lambda self: self.clipping_policy.clip_groups)
    clip_thresholds = property(lambda self: self.clipping_policy.clip_thresholds)
    adaptive_clipping = property(lambda self: self.clipping_policy.adaptive_clipping)
    seed = property(lambda self: self.noise.seed)
    secure_mode = property(lambda self: self.noise.secure_mode)

    @property
    def noise_multiplier(self):
        """`sigma` (None until calibrated, with `target_epsilon`)."""
        return self.noise.noise_multiplier

    @noise_multiplier.setter
    def noise_multiplier(self, value):
        self.noise = GaussianNoise(value, self.noise.seed, self.noise.secure_mode)

    def __repr__(self):
        noise = (
            f"noise_multiplier={self.noise_multiplier:.4g}"
            if self.noise_multiplier is not None
            else f"target_epsilon={self.target_epsilon} (not calibrated yet)"
        )
        groups = (
            "" if self.clip_groups is None else f", clip_groups={self.clip_groups!r}"
        )
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
            + (" secure_mode=True" if self.secure_mode else "")
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
            keras_compat.print_msg(
                f"keras_dp: noise_multiplier={self.noise_multiplier:.4f} "
                f"gives epsilon <= {self.target_epsilon} at delta="
                f"{self.target_delta} for {self.epochs} epochs ({steps} "
                f"updates) at sample rate {sample_rate:.4g}; training stops "
                "before an update that would exceed it."
            )
        return self.noise_multiplier

    @property
    def sensitivity(self):
        """L2 sensitivity of the clipped sum: `l2_norm_clip` in every mode
        with one group; `sqrt(sum_k C_k^2)` with clipping groups (the
        current thresholds, when adaptive)."""
        thresholds = None
        if self._clip_thresholds_variable is not None:
            thresholds = keras.ops.convert_to_numpy(self._clip_thresholds_variable)
        return self.clipping_policy.sensitivity(thresholds)

    @property
    def noise_stddev(self):
        """Standard deviation of the noise added to the clipped sum."""
        return self.noise_multiplier * self.sensitivity

    @property
    def clip_group_names(self):
        """Names of the clipping groups (known once the optimizer is built)."""
        policy = self.clipping_policy
        return list(policy.assignment.names) if policy.resolved else None

    @property
    def group_thresholds(self):
        """`{group: C_k}`: the current thresholds (None before build)."""
        policy = self.clipping_policy
        if not policy.resolved:
            return None
        values = policy.initial_thresholds
        if self._clip_thresholds_variable is not None:
            values = keras.ops.convert_to_numpy(self._clip_thresholds_variable)
        return {name: float(c) for name, c in zip(policy.assignment.names, values)}

    def gradient_noise_multiplier(self, expected_batch_size):
        """`sigma_g`, the multiplier of the gradient noise.

        `noise_multiplier` without adaptive clipping; with it,
        `(sigma^-2 - K (2 sigma_b)^-2)^(-1/2)` so that gradient and counts
        together cost `sigma` (error if `sigma >= 2 sigma_b / sqrt(K)`).
        """
        adaptive = self.adaptive_clipping
        if adaptive is None:
            return self.noise_multiplier
        policy = self.clipping_policy
        return clipping_lib.adaptive_noise_multipliers(
            self.noise_multiplier,
            adaptive.count_noise_stddev(expected_batch_size),
            policy.num_groups if policy.resolved else 1,
        )

    # The owner link.

    def _owner(self):
        """The model this optimizer trains (None until attached). A method,
        not a property: Keras's saving walks an optimizer's attributes."""
        return None if self._owner_ref is None else self._owner_ref()

    def bind_clip_groups(self, model):
        """Attaches the optimizer to `model`, the model it trains.

        The model's layers define the clipping groups (resolved when the
        optimizer is built) and its saved config carries them.
        `keras_dp.make_private` and a private model's `compile` attach the
        optimizer themselves; call this in a custom training loop, before
        `optimizer.build(model.trainable_variables)`.
        """
        if self.built and self._owner() is not model:
            raise RuntimeError(
                "bind_clip_groups must be called before the optimizer is "
                "built: groups and thresholds are fixed at build, for the "
                "model it was built for. Use a new optimizer for another "
                "model."
            )
        # A weak reference: the model must not become part of the
        # optimizer's saved state.
        self._owner_ref = weakref.ref(model)

    def load_own_variables(self, store):
        super().load_own_variables(store)
        # A restore can move the noise counter back (see
        # `NoiseSeedGenerator.restored`).
        generator = getattr(self, "_noise_seed_generator", None)
        if generator is not None:
            generator.restored()

    def build_for_model(self, model):
        """Builds the optimizer for `model`'s trainable variables, once.

        The TensorFlow train step calls it before computing clip factors,
        which need the clipping groups (TensorFlow's trainer would
        otherwise build the optimizer only inside `apply`).
        """
        if not self.built:
            self.bind_clip_groups(model)
            self.build(model.trainable_variables)

    def build(self, variables):
        if self.built:
            return
        model = self._owner()
        if model is None:
            raise RuntimeError(
                _NOT_PRIVATE_MESSAGE.format(
                    name=type(self).__name__,
                    why="it is not attached to a private model",
                )
            )
        groups_lib.apply_layer_groups(model, self._layer_clip_groups)
        self._layer_clip_groups = groups_lib.collect_layer_groups(model)
        self.clipping_policy.resolve(variables, model)
        super().build(variables)
        # The noise generator's state is an optimizer variable: it is saved
        # with the model and threaded through JAX's stateless steps.
        with keras.name_scope(self.name, caller=self):
            self._noise_seed_generator = self.noise.seed_generator()
        keras_compat.track_variable(self, self._noise_seed_generator.state)
        if self.adaptive_clipping is not None:
            # Adaptive thresholds are optimizer state: saved and resumed.
            initial = np.asarray(
                self.clipping_policy.initial_thresholds, dtype="float32"
            )
            # An initializer, not an assign: TensorFlow may build the
            # optimizer inside the traced train step.
            self._clip_thresholds_variable = self.add_variable(
                shape=(self.clipping_policy.num_groups,),
                initializer=lambda shape, dtype=None: ops.cast(
                    ops.convert_to_tensor(initial), dtype or "float32"
                ),
                dtype="float32",
                name="clip_thresholds",
            )

    # One private step: clip factors, noise, update.

    def step_entropy(self):
        """The context to run one call of a compiled train function in:
        in secure mode on TensorFlow it loads the step's fresh
        operating-system entropy and wipes it afterwards (the private
        model's `fit` and `train_on_batch` do this; a custom TensorFlow
        loop wraps each step in it). Elsewhere it changes nothing."""
        if not self.secure_mode:
            return contextlib.nullcontext()
        return backend_lib.get_backend_module().os_entropy(self._noise_seed_generator)

    def step_clipping(self, optimizer_variables=None):
        """The `keras_dp.StepClipping` of one step: the clipping policy
        with the step's thresholds, which the per-example engine uses to
        turn squared norms into clip factors. With adaptive clipping the
        thresholds are the optimizer variable's values: from
        `optimizer_variables` (a JAX step's values) when given."""
        variable = self._clip_thresholds_variable
        if variable is None:
            return self.clipping_policy.for_thresholds()
        value = ops.convert_to_tensor(
            self._value_in_step(variable, optimizer_variables)
        )
        return self.clipping_policy.for_thresholds(
            [value[k] for k in range(self.clipping_policy.num_groups)]
        )

    def clip_factors(self, norms):
        """Per-example clip factors `c_i` for gradient norms `norms`."""
        return self.step_clipping().clip_factors(norms)

    def variable_clip_factors(self, squared_norms):
        """Per-variable clip factors from per-variable squared norms (see
        `keras_dp.StepClipping.variable_clip_factors`)."""
        return self.step_clipping().variable_clip_factors(squared_norms)

    def privatize(self, batch):
        """The clipped gradients of `batch` (a `keras_dp.ClippedBatch`)
        with the DP noise added: `NoisyGradients`, for `apply`.

        The noise is `N(0, (sigma * Delta / B)^2)` per coordinate. Under
        `gradient_accumulation_steps = n` it is added on the last
        micro-step of each window only; Keras then averages the window's
        gradients, so the update receives noise of `sigma * Delta / (B n)`
        for the window's mean, once per logical batch. With adaptive
        clipping the noise multiplier is split between the gradient and
        the threshold counts, and the thresholds move (see
        `keras_dp.AdaptiveClipping`).
        """
        if not isinstance(batch, ClippedBatch):
            raise TypeError(
                "`privatize` takes a keras_dp.ClippedBatch (the clipped "
                "gradient sum of a private train step). Received: "
                f"{type(batch).__name__}."
            )
        if self.noise_multiplier is None:
            raise ValueError(
                f"{type(self).__name__} was given target_epsilon="
                f"{self.target_epsilon} but has not calibrated its noise yet: "
                "that needs the dataset size, which `fit` on in-memory "
                "arrays provides. For other data, call "
                "`optimizer.calibrate_noise(batch_size / n)` before fit, or "
                "pass `noise_multiplier`."
            )
        grads = list(batch.gradients)
        if self.adaptive_clipping is not None:
            grads = self._adaptive_noise_and_update(grads, batch)
        elif self.noise_multiplier > 0:
            stddev = self.noise_stddev / ops.cast(batch.expected_batch_size, "float32")
            if self.gradient_accumulation_steps:
                stddev = stddev * ops.cast(self._is_update_step(), "float32")
            backend = backend_lib.get_backend_module()
            if backend.replicas_in_sync() > 1:
                # Keras sums the replicas' gradients: one replica's noise
                # is the whole batch's.
                stddev = stddev * ops.cast(
                    ops.equal(backend.replica_id(), 0), "float32"
                )
            grads = self.noise.add(
                grads, stddev, self._noise_seed_generator, batch.noise_spaces
            )
        return NoisyGradients(grads)

    def stateless_privatize(self, optimizer_variables, batch):
        """`privatize` as a pure function of the optimizer variables' values
        (JAX): returns `(noisy gradients, new optimizer variable values)`."""
        mapping = list(zip(self.variables, optimizer_variables))
        with keras.StatelessScope(state_mapping=mapping) as scope:
            noisy = self.privatize(batch)
        new_values = []
        for variable, value in zip(self.variables, optimizer_variables):
            current = scope.get_current_value(variable)
            new_values.append(value if current is None else current)
        return noisy, new_values

    def apply(self, grads, trainable_variables=None):
        if not isinstance(grads, NoisyGradients):
            raise RuntimeError(
                _NOT_PRIVATE_MESSAGE.format(
                    name=type(self).__name__,
                    why=(
                        "the gradients it was given did not come from "
                        "`optimizer.privatize` (this model's train step sums "
                        "them over the batch)"
                    ),
                )
            )
        return super().apply(list(grads), trainable_variables)

    def _is_update_step(self):
        """Whether the step being applied ends an accumulation window."""
        steps = self.gradient_accumulation_steps or 1
        # `_iterations` counts micro-steps (`iterations` counts updates).
        return ops.equal((keras_compat.optimizer_iterations(self) + 1) % steps, 0)

    def _adaptive_noise_and_update(self, grads, batch):
        """Gradient noise at `sigma_g`, then the noisy threshold update."""
        if batch.clip_counts is None:
            raise RuntimeError(
                "Adaptive clipping got no clip counts from the train step: "
                "train the model through keras_dp.make_private."
            )
        adaptive = self.adaptive_clipping
        num_groups = self.clipping_policy.num_groups
        expected = ops.cast(batch.expected_batch_size, "float32")
        sigma_g, sigma_b = adaptive.noise_multipliers(
            self.noise_multiplier,
            num_groups,
            expected,
            _static_float(batch.static_expected_batch_size),
        )
        thresholds = ops.convert_to_tensor(self._clip_thresholds_variable.value)
        if not (isinstance(sigma_g, float) and sigma_g == 0):
            stddev = sigma_g * ops.sqrt(ops.sum(ops.square(thresholds))) / expected
            grads = self.noise.add(
                grads, stddev, self._noise_seed_generator, batch.noise_spaces
            )
        counts = ops.cast(batch.clip_counts, "float32")
        noisy = counts + sigma_b * self.noise.standard_normal(
            (num_groups,), self._noise_seed_generator
        )
        self._clip_thresholds_variable.assign(
            adaptive.updated_thresholds(thresholds, noisy, expected)
        )
        return grads

    def _value_in_step(self, variable, optimizer_variables=None):
        """`variable`'s value: from `optimizer_variables` (the values of
        `self.variables` in a JAX step) when given, else its own."""
        if optimizer_variables is not None:
            for v, value in zip(self.variables, optimizer_variables):
                if v is variable:
                    return value
        return variable.value

    def took_update(self, optimizer_variables=None):
        """Whether the step just applied updated the weights (bool tensor).

        False on the micro-steps of a `gradient_accumulation_steps` window
        that only accumulate. `optimizer_variables`: the JAX step's values.
        """
        iterations = self._value_in_step(
            keras_compat.optimizer_iterations(self), optimizer_variables
        )
        steps = self.gradient_accumulation_steps or 1
        return ops.equal(iterations % steps, 0)

    def clip_threshold_logs(self, optimizer_variables=None):
        """`{"clip_threshold/<group>": C_k}` with adaptive clipping, else {}."""
        variable = self._clip_thresholds_variable
        if variable is None:
            return {}
        value = self._value_in_step(variable, optimizer_variables)
        return {
            f"clip_threshold/{name}": value[k]
            for k, name in enumerate(self.clipping_policy.assignment.names)
        }

    def get_config(self):
        config = super().get_config()
        config.update(self.clipping_policy.get_config())
        config.update(self.noise.get_config())
        if self.noise_multiplier is None:
            config.update(
                target_epsilon=self.target_epsilon,
                target_delta=self.target_delta,
                epochs=self.epochs,
            )
        config["privacy_ledger"] = self.privacy_ledger.get_config()
        model = self._owner()
        layer_groups = (
            groups_lib.collect_layer_groups(model)
            if model is not None
            else self._layer_clip_groups
        )
        if layer_groups:
            config["layer_clip_groups"] = layer_groups
        return config


def _refuse_keras_clipping(kwargs):
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
    return (
        arguments.positive_number("target_epsilon", target_epsilon),
        accounting.check_delta(target_delta, name="target_delta"),
        arguments.positive_number(
            "epochs", epochs, hint="the epochs the noise is calibrated for"
        ),
    )


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

    The returned class subclasses `optimizer_class` (on PyTorch, through
    the class Keras instantiates for it, which updates all variables with
    `torch._foreach_*` ops), takes all its arguments
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
            (DPOptimizerMixin, keras_compat.backend_optimizer_class(optimizer_class)),
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
