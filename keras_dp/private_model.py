"""`make_private`: give any Keras model a differentially private train step."""

import types
import warnings

import keras
import numpy as np
from keras import tree
from keras.src.trainers.data_adapters import array_data_adapter
from keras.src.trainers.data_adapters import array_slicing
from keras.src.trainers import data_adapters

from keras_dp import backend as backend_lib
from keras_dp import checks
from keras_dp import data as data_lib
from keras_dp import ledger as ledger_lib


class PrivacySettings:
    """Per-model settings of the private train step.

    Attributes:
        microbatch_size: examples whose per-example gradients are
            materialised at once (None: the whole batch).
        poisson_sampling: whether `fit` on in-memory arrays draws Poisson
            batches.
        sample_rate: the sampling rate for data whose size `fit` cannot
            see (generators), or None.
        expected_batch_size: the `B` that clipped sums are divided by.
            None means each batch's own size (fixed-size batches); Poisson
            sampling sets it to the expected size `q * n`.
        per_example: "auto", "fast" or "vmap" (see `make_private`).
        per_example_path: set when a train step is traced: `("fast", None)`
            or `("vmap", reason the fast path was not used)`.
    """

    def __init__(
        self,
        microbatch_size=None,
        poisson_sampling=True,
        sample_rate=None,
        per_example="auto",
    ):
        self.microbatch_size = microbatch_size
        self.per_example = per_example
        self.per_example_path = None
        self.poisson_sampling = poisson_sampling
        self.sample_rate = sample_rate
        self.expected_batch_size = None
        # Rows per batch of the current `fit`, when known: TensorFlow traces
        # the step with an unknown batch size, and the fast path sizes its
        # memory-bounded chunks by this.
        self.batch_size_hint = None
        self.sampling_seed = None
        self.warned_fixed_batches = False
        # What the current train function was traced with.
        self.traced_with = None


def make_private(
    model,
    microbatch_size=None,
    poisson_sampling=True,
    sample_rate=None,
    per_example="auto",
):
    """Installs a differentially private train step on `model`.

    The returned model is the same object. Its `train_step` computes
    per-example gradients (vectorized: `jax.vmap` over `stateless_call` on
    JAX, `tf.vectorized_map` on TensorFlow), lets the DP optimizer clip them,
    sums them, and has the optimizer add noise once per logical batch.
    Evaluation and prediction are unchanged.

    Example:

    ```python
    model = keras_dp.make_private(model)
    model.compile(optimizer=keras_dp.DPAdam(auto_clip=True),
                  loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(x, y, batch_size=256, epochs=3)
    ```

    Args:
        model: a `keras.Model` (Sequential, Functional or subclassed) that
            does not override `train_step` and has no BatchNormalization.
        microbatch_size: optional positive int. The batch is processed in
            chunks of this many examples, so memory holds only one chunk's
            per-example gradients; the result does not change. Batches that
            are not a multiple are padded with zero-weight rows, which
            contribute nothing.
        poisson_sampling: when `fit` gets in-memory arrays, draw each batch
            by Poisson sampling at rate `q = batch_size / n` (what the
            accountant assumes), padded to a fixed shape. Set False to use
            Keras's shuffled fixed-size batches; the logged epsilon is then
            marked as assuming Poisson sampling.
        sample_rate: `batch_size / n` for data whose size `fit` cannot see
            (Python generators). Not needed for arrays, `PyDataset`s and
            `tf.data` datasets of known cardinality.
        per_example: how per-example gradient norms and the clipped sum are
            computed. `"auto"` (default): the fast path of
            `keras_dp.fast_norms` (ghost norms and book-keeping from one
            batched forward/backward pass, for Dense, EinsumDense, Conv,
            Embedding; other weighted layers such as LayerNormalization get
            per-example gradients layer by layer) when it supports the
            model, else the general vmap path. The fast path falls back,
            with a warning that gives the reason, for shared layers (a
            layer called twice per step), activity regularizers or
            `add_loss` in `call`, layers that own weights and have weighted
            sublayers, and weights not owned by a layer; it assumes a
            layer's weights are only used inside its own `call`.
            `LowRankSparse` models and `clip_groups="per_device"` over
            sharded variables always take the vmap path. `"vmap"`: always
            the general path (per-example gradients of the whole model).
            `"fast"`: the fast path or an error when the step is first
            traced. Both give the same clipped sums.

    `fit` also records each step's noise multiplier and sampling rate in the
    optimizer's privacy ledger (saved with the model), and calibrates the
    noise when the optimizer was given `target_epsilon`.

    Returns:
        `model`, now private. Compile it with a keras_dp DP optimizer.
    """
    backend_module = backend_lib.get_backend_module()
    if not isinstance(model, keras.Model):
        raise TypeError(
            "make_private expects a keras.Model. Received: "
            f"{type(model).__name__}."
        )
    if per_example not in ("auto", "fast", "vmap"):
        raise ValueError(
            "`per_example` must be 'auto', 'fast' or 'vmap'. Received: "
            f"{per_example!r}."
        )
    if microbatch_size is not None and (
        not isinstance(microbatch_size, int) or microbatch_size <= 0
    ):
        raise ValueError(
            "`microbatch_size` must be a positive integer or None. Received: "
            f"{microbatch_size!r}."
        )
    if type(model).train_step is not keras.Model.train_step:
        raise ValueError(
            f"{type(model).__name__} overrides `train_step`, which "
            "make_private would replace. Put custom loss logic in "
            "`compute_loss` instead (it is evaluated once per example) or "
            "train with the model's own step and no DP optimizer."
        )
    checks.check_no_example_mixing_layers(model)

    if sample_rate is not None and not 0 < sample_rate <= 1:
        raise ValueError(
            "`sample_rate` (batch_size / n) must be in (0, 1]. Received: "
            f"{sample_rate!r}."
        )
    settings = getattr(model, "_keras_dp", None)
    if settings is None:
        model._keras_dp = PrivacySettings(
            microbatch_size, poisson_sampling, sample_rate, per_example
        )
        model.make_train_function = types.MethodType(
            _checked_make_train_function(type(model).make_train_function),
            model,
        )
        model.fit = types.MethodType(_private_fit(type(model).fit), model)
    else:
        settings.microbatch_size = microbatch_size
        settings.poisson_sampling = poisson_sampling
        settings.sample_rate = sample_rate
        settings.per_example = per_example
    model.train_step = types.MethodType(backend_module.train_step, model)
    # A train function compiled before make_private would bypass the new step.
    model.train_function = None
    return model


def _checked_make_train_function(make_train_function):
    # Keras builds the train function before the first step (and, on JAX,
    # before detaching the variables), so errors raised here leave the model
    # intact.
    def checked(model, force=False):
        checks.check_dp_optimizer(model)
        checks.check_no_example_mixing_layers(model)
        settings = model._keras_dp
        # The traced step bakes in the divisor B and the noise multiplier:
        # retrace when either changed (a Poisson `fit` followed by
        # `train_on_batch`, a re-calibrated sigma).
        trace_key = (
            settings.expected_batch_size,
            model.optimizer.noise_multiplier,
        )
        if settings.traced_with != trace_key:
            force = force or model.train_function is not None
            settings.traced_with = trace_key
        return make_train_function(model, force=force)

    return checked


def _private_fit(fit):
    def private_fit(
        model,
        x=None,
        y=None,
        batch_size=None,
        epochs=1,
        verbose="auto",
        callbacks=None,
        validation_split=0.0,
        validation_data=None,
        shuffle=True,
        class_weight=None,
        sample_weight=None,
        initial_epoch=0,
        steps_per_epoch=None,
        **kwargs,
    ):
        settings = model._keras_dp
        checks.check_dp_optimizer(model)
        optimizer = model.optimizer
        accumulation = optimizer.gradient_accumulation_steps or 1
        expected_batch_size = None
        arrays = (x, y, sample_weight)
        if settings.poisson_sampling and array_data_adapter.can_convert_arrays(
            arrays
        ):
            if validation_split and validation_data is None:
                arrays, validation_data = array_slicing.train_validation_split(
                    arrays, validation_split=validation_split
                )
                validation_split = 0.0
            x, y, sample_weight = arrays
            if class_weight is not None:
                sample_weight = _class_weights_as_sample_weights(
                    y, class_weight, sample_weight
                )
                class_weight = None
            x = data_lib.PoissonSampler(
                x,
                y,
                sample_weight,
                batch_size=batch_size or 32,
                steps_per_epoch=steps_per_epoch,
                accumulation_steps=accumulation,
                seed=settings.sampling_seed,
            )
            y = sample_weight = batch_size = steps_per_epoch = None
        n = None
        if isinstance(x, data_lib.PoissonSampler):
            sample_rate, poisson, n = x.sample_rate, True, x.n
            expected_batch_size = x.expected_batch_size
        else:
            if array_data_adapter.can_convert_arrays((x, y)):
                n = data_lib.num_examples(x) * (1 - validation_split)
            sample_rate, poisson = _fixed_batch_sample_rate(
                model, x, y, batch_size, steps_per_epoch, accumulation
            ), False
            if not settings.warned_fixed_batches:
                settings.warned_fixed_batches = True
                warnings.warn(
                    "keras_dp: training on already-batched data (or with "
                    "poisson_sampling=False): batches are shuffled fixed-size "
                    "slices, not Poisson samples. The epsilon that keras_dp "
                    "reports assumes Poisson sampling at rate "
                    f"q={sample_rate:.4g}; for fixed-size batches the real "
                    "guarantee can be weaker. Pass in-memory arrays or a "
                    "keras_dp.data.PoissonSampler for the analysed mechanism.",
                    stacklevel=2,
                )
        noise_multiplier = optimizer.calibrate_noise(sample_rate)
        optimizer.privacy_ledger.record(
            ledger_lib.optimizer_steps(model),
            noise_multiplier,
            sample_rate,
            poisson,
            n,
        )
        for callback in _as_list(callbacks):
            if hasattr(callback, "check_before_fit") and not (
                callback.check_before_fit(model)
            ):
                return keras.callbacks.History()
        if poisson:
            # The sampler's batches are already random; Keras shuffling its
            # items would split the parts of one logical batch (gradient
            # accumulation) across updates.
            shuffle = False
        settings.expected_batch_size = expected_batch_size
        settings.batch_size_hint = _rows_per_batch(x, batch_size)
        try:
            return fit(
                model,
                x=x,
                y=y,
                batch_size=batch_size,
                epochs=epochs,
                verbose=verbose,
                callbacks=callbacks,
                validation_split=validation_split,
                validation_data=validation_data,
                shuffle=shuffle,
                class_weight=class_weight,
                sample_weight=sample_weight,
                initial_epoch=initial_epoch,
                steps_per_epoch=steps_per_epoch,
                **kwargs,
            )
        finally:
            # `train_on_batch` divides by each batch's own size.
            settings.expected_batch_size = None
            settings.batch_size_hint = None

    private_fit.__doc__ = fit.__doc__
    return private_fit


def _rows_per_batch(x, batch_size):
    """Rows of the batches `fit` will draw from `x`, or None if unknown."""
    if isinstance(x, data_lib.PoissonSampler):
        return x.padded_size
    if array_data_adapter.can_convert_arrays((x,)):
        return batch_size or 32
    if data_adapters.is_tf_dataset(x):
        for spec in tree.flatten(x.element_spec):
            if spec.shape.rank:
                return spec.shape[0]
    return None


def _as_list(callbacks):
    if callbacks is None:
        return []
    if isinstance(callbacks, keras.callbacks.CallbackList):
        return list(callbacks.callbacks)
    return list(callbacks)


def _class_weights_as_sample_weights(y, class_weight, sample_weight):
    if len(tree.flatten(y)) != 1:
        raise ValueError(
            "`class_weight` is only supported for models with one output. "
            "Pass `sample_weight` instead."
        )
    labels = np.asarray(tree.flatten(y)[0])
    if labels.ndim == 2 and labels.shape[1] > 1:
        labels = np.argmax(labels, axis=1)
    labels = labels.reshape(len(labels), -1)[:, 0].astype("int64")
    weights = np.array(
        [class_weight.get(int(c), 1.0) for c in labels], dtype="float32"
    )
    if sample_weight is not None:
        weights = weights * np.asarray(sample_weight, dtype="float32")
    return weights


def _fixed_batch_sample_rate(model, x, y, batch_size, steps_per_epoch, accumulation):
    """Sampling rate of fixed-size batches: one update per `1/q` updates."""
    settings = model._keras_dp
    if settings.sample_rate is not None:
        return settings.sample_rate
    if array_data_adapter.can_convert_arrays((x, y)):
        n = data_lib.num_examples(x)
        return min(1.0, (batch_size or 32) * accumulation / n)
    batches = None
    if isinstance(x, keras.utils.PyDataset):
        batches = x.num_batches
    elif data_adapters.is_tf_dataset(x):
        cardinality = int(x.cardinality())
        batches = cardinality if cardinality > 0 else None
    if batches is None:
        raise ValueError(
            "keras_dp cannot tell the sampling rate of this data (no known "
            "dataset size), so it could not account for privacy. Pass "
            "`sample_rate=batch_size / n` to keras_dp.make_private(model, "
            "...), or train on arrays or a keras_dp.data.PoissonSampler."
        )
    return min(1.0, accumulation / batches)


def is_private(model):
    """Whether `make_private` was applied to `model`."""
    return getattr(model, "_keras_dp", None) is not None
