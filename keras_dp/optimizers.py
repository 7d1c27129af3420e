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
import numbers
import sys

import keras
from keras import ops

from keras.src.utils import io_utils

from keras_dp import accounting
from keras_dp import clipping as clipping_lib
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
            `fit` first sees the dataset size, printed, and kept in
            `optimizer.noise_multiplier`.
        clipping: `"flat"` (Abadi et al., the default), `"auto"` (AUTO-S,
            Bu et al.: `c_i = R / (||g_i|| + 0.01)`, no threshold to tune) or
            `"global"` (Bu et al. 2023: examples with `||g_i|| <= Z` are
            kept with the same factor `R / Z`, larger ones are dropped).
        auto_clip: shorthand for `clipping="auto"`.
        global_clip_threshold: `Z` for `clipping="global"`; defaults to
            `l2_norm_clip`.
        seed: integer seed of the noise. The noise generator's state is an
            optimizer variable, so it is saved and restored with the model.
        privacy_ledger: restored from a saved config; leave it unset.

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

    def calibrate_noise(self, sample_rate):
        """Sets `noise_multiplier` from the target budget, once.

        Called by `fit` on a private model when it knows the sampling rate.
        Returns the noise multiplier in use.
        """
        if self.noise_multiplier is None:
            self.noise_multiplier = accounting.calibrate_noise_multiplier(
                self.target_epsilon,
                self.target_delta,
                sample_rate,
                epochs=self.epochs,
            )
            io_utils.print_msg(
                f"keras_dp: noise_multiplier={self.noise_multiplier:.4f} "
                f"gives epsilon <= {self.target_epsilon} at delta="
                f"{self.target_delta} for {self.epochs} epochs at sample "
                f"rate {sample_rate:.4g}."
            )
        return self.noise_multiplier

    @property
    def sensitivity(self):
        """L2 sensitivity of the clipped sum (`l2_norm_clip` in every mode)."""
        return clipping_lib.sensitivity(self.l2_norm_clip)

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
            group every variable gets the factors of the total norm.
        """
        factors = self.clip_factors(clipping_lib.total_norms(squared_norms))
        return [factors] * len(squared_norms)

    def build(self, variables):
        if self.built:
            return
        _check_model_is_private(self)
        super().build(variables)
        # The noise generator's state is an optimizer variable: it is saved
        # with the model and threaded through JAX's stateless steps.
        with keras.name_scope(self.name, caller=self):
            self._noise_seed_generator = keras.random.SeedGenerator(
                self.seed, name="dp_noise_seed"
            )
        self._track_variable(self._noise_seed_generator.state)

    @contextlib.contextmanager
    def private_update(self, expected_batch_size, noise_spaces=None):
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
        """
        self._expected_batch_size = expected_batch_size
        self._noise_spaces = noise_spaces
        try:
            yield
        finally:
            self._expected_batch_size = None
            self._noise_spaces = None

    def _standard_normal(self, shape, dtype):
        return keras.random.normal(
            shape, dtype=dtype, seed=self._noise_seed_generator
        )

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
        if self.noise_multiplier > 0:
            steps = self.gradient_accumulation_steps or 1
            stddev = self.noise_stddev / (
                ops.cast(self._expected_batch_size, "float32") * steps
            )
            spaces = getattr(self, "_noise_spaces", None) or [None] * len(grads)
            grads = [
                g
                if g is None
                else g
                + ops.cast(stddev, g.dtype)
                * (
                    self._standard_normal(ops.shape(g), g.dtype)
                    if space is None
                    else ops.cast(space(self._standard_normal), g.dtype)
                )
                for g, space in zip(grads, spaces)
            ]
        # Keras's own clipnorm/clipvalue, if set, act on the noised gradient
        # (post-processing, no privacy cost).
        return super()._clip_gradients(grads)

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
        return config


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

    frame = sys._getframe(1)
    for _ in range(12):
        if frame is None:
            return
        owner = frame.f_locals.get("self")
        if (
            isinstance(owner, keras.Model)
            and getattr(owner, "optimizer", None) is optimizer
        ):
            if private_model.is_private(owner):
                return
            if frame.f_code.co_name == "compile_from_config":
                # `load_model` of a model saved with a DP optimizer: it was
                # private when saved, so it comes back private.
                private_model.make_private(owner)
                return
            raise RuntimeError(
                _NOT_PRIVATE_MESSAGE.format(name=type(optimizer).__name__)
            )
        frame = frame.f_back


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
