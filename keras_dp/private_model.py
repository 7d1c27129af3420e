"""`make_private`: give any Keras model a differentially private train step."""

import types
import warnings

import keras
import numpy as np
from keras import tree

from keras_dp import arguments
from keras_dp import callbacks as callbacks_lib
from keras_dp import checks
from keras_dp import data as data_lib
from keras_dp import example_independence
from keras_dp import fit_data
from keras_dp import keras_compat
from keras_dp import ledger as ledger_lib
from keras_dp.optimizers import is_dp_optimizer
from keras_dp import summary as summary_lib
from keras_dp import train_steps
from keras_dp.privacy_settings import PrivacySettings
from keras_dp.privacy_settings import is_private  # noqa: F401 (public API)


def make_private(
    model,
    microbatch_size=None,
    poisson_sampling=True,
    sample_rate=None,
    per_example="auto",
    augment=None,
    augmentations=1,
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
            `keras_dp.per_example` (ghost norms and book-keeping from one
            batched forward/backward pass, for Dense, EinsumDense, Conv,
            Embedding; other weighted layers such as LayerNormalization get
            per-example gradients layer by layer) when it supports the
            model, else the general vmap path. The fast path falls back,
            with a warning that gives the reason, for shared layers (a
            layer called twice per step), activity regularizers or
            `add_loss` in `call`, layers that own weights and have weighted
            sublayers, and weights not owned by a layer; it assumes a
            layer's weights are only used inside its own `call`.
            `"vmap"`: always
            the general path (per-example gradients of the whole model).
            `"fast"`: the fast path or an error when the step is first
            traced. Both give the same clipped sums.
        augment: optional function `augment(x, seed) -> x` that returns
            one randomly augmented copy of the batch inputs `x` (same
            structure, shapes and dtypes), written with `keras.ops` and
            `keras.random`; it runs inside the compiled train step.
            `seed` is a `keras.random.SeedGenerator` for that copy and
            step: pass it as `seed=` to every `keras.random` call (each
            call draws new numbers; it is seeded differently for every
            copy and every step). Keras preprocessing layers keep their
            own seed state and would repeat one augmentation on JAX: use
            `keras.random` with `seed`. Evaluation and prediction are not
            augmented.
        augmentations: augmented copies per example, K (default 1).
            Augmentation multiplicity (De et al. 2022): each example's
            gradient is the mean of its K copies' gradients, then clipped,
            summed and noised as usual, so the sensitivity, the noise and
            the privacy accounting are those of one example, while the
            clipped gradient is less noisy. A step computes K times the
            rows; `microbatch_size` counts examples (K rows each). The
            logged loss and metrics are over the copies. K > 1 needs
            `augment`.

    Augmentation multiplicity, with a random flip and a random crop:

    ```python
    def augment(x, seed):
        # x: (n, 32, 32, 3) images.
        n = keras.ops.shape(x)[0]
        flip = keras.random.uniform((n, 1, 1, 1), seed=seed) < 0.5
        x = keras.ops.where(flip, keras.ops.flip(x, axis=2), x)
        # Random 32x32 crops of the images padded by 4 pixels.
        padded = keras.ops.pad(x, [(0, 0), (4, 4), (4, 4), (0, 0)])
        shift = keras.random.randint((n, 2), 0, 9, seed=seed)
        rows = shift[:, :1] + keras.ops.arange(32)[None, :]
        cols = shift[:, 1:] + keras.ops.arange(32)[None, :]
        padded = keras.ops.take_along_axis(padded, rows[:, :, None, None], axis=1)
        return keras.ops.take_along_axis(padded, cols[:, None, :, None], axis=2)


    model = keras_dp.make_private(model, augment=augment, augmentations=8)
    ```

    `augment` is a function, so it is not saved with the model: a loaded
    model that was saved with augmentation refuses to train until
    `make_private(model, augment=..., augmentations=...)` is called again
    (`make_private(model)` trains it without augmentation).

    `fit` also records each step's noise multiplier and sampling rate in the
    optimizer's privacy ledger (saved with the model), and calibrates the
    noise when the optimizer was given `target_epsilon`.

    Returns:
        `model`, now private. Compile it with a keras_dp DP optimizer.
    """
    train_step = train_steps.train_step_for_backend()
    arguments.instance_of("model", model, keras.Model, "a keras.Model")
    per_example = arguments.one_of("per_example", per_example, ("auto", "fast", "vmap"))
    microbatch_size = arguments.positive_int(
        "microbatch_size", microbatch_size, allow_none=True
    )
    augment, augmentations = _augmentation_arguments(augment, augmentations)
    poisson_sampling = arguments.boolean("poisson_sampling", poisson_sampling)
    sample_rate = arguments.probability(
        "sample_rate",
        sample_rate,
        low_open=True,
        allow_none=True,
        hint="batch_size / n, for data whose size fit cannot see",
    )
    if type(model).train_step is not keras.Model.train_step:
        raise ValueError(
            f"{type(model).__name__} overrides `train_step`, which "
            "make_private would replace. Put custom loss logic in "
            "`compute_loss` instead (it is evaluated once per example) or "
            "train with the model's own step and no DP optimizer."
        )
    checks.check_no_example_mixing_layers(model)

    settings = getattr(model, "_keras_dp", None)
    if settings is None:
        model._keras_dp = PrivacySettings(
            microbatch_size, poisson_sampling, sample_rate, per_example
        )
        model.make_train_function = types.MethodType(
            _checked_make_train_function(type(model).make_train_function),
            model,
        )
        model.fit = types.MethodType(_private_fit(_trainer_fit(model)), model)
        model.train_on_batch = types.MethodType(
            _private_train_on_batch(type(model).train_on_batch), model
        )
        model.compile = types.MethodType(_private_compile(type(model).compile), model)
        model.summary = types.MethodType(_private_summary(type(model).summary), model)
        model.get_compile_config = types.MethodType(
            _private_get_compile_config(type(model).get_compile_config), model
        )
    else:
        settings.microbatch_size = microbatch_size
        settings.poisson_sampling = poisson_sampling
        settings.sample_rate = sample_rate
        settings.per_example = per_example
    _set_augmentation(model._keras_dp, augment, augmentations)
    model.train_step = types.MethodType(train_step, model)
    if is_dp_optimizer(getattr(model, "optimizer", None)):
        # Compiled before it was made private: attach its optimizer now.
        model.optimizer.bind_clip_groups(model)
    # A train function compiled before make_private would bypass the new step.
    model.train_function = None
    return model


def _augmentation_arguments(augment, augmentations):
    augmentations = arguments.positive_int(
        "augmentations",
        augmentations,
        hint="augmented copies per example (augmentation multiplicity)",
    )
    augment = arguments.function(
        "augment", augment, 2, "augment(x, seed) -> x", allow_none=True
    )
    if augment is None and augmentations > 1:
        raise ValueError(
            f"make_private(augmentations={augmentations}) needs `augment`, "
            "the function that makes each copy of an example different "
            "(`augment(x, seed) -> x`): identical copies give the same "
            "clipped gradient as one, at K times the cost. Pass augment=... "
            "or leave augmentations=1."
        )
    return augment, augmentations


def _set_augmentation(settings, augment, augmentations):
    """Augmentation multiplicity's settings; a call of `make_private`
    after loading a model decides on it (see `saved_augmentations`)."""
    settings.augment = augment
    settings.augmentations = augmentations
    settings.saved_augmentations = None
    if augment is not None and settings.augment_seed is None:
        # Its state is only read (the copies' seeds are derived from it):
        # it need not be a variable of the model.
        settings.augment_seed = keras.random.SeedGenerator(
            name="keras_dp_augmentation_seed"
        )


def _check_augmentation_restored(model):
    saved = model._keras_dp.saved_augmentations
    if saved is not None:
        raise ValueError(
            f"This model was saved after make_private(augment=..., "
            f"augmentations={saved}); the `augment` function is not saved "
            "with it. Call keras_dp.make_private(model, augment=..., "
            f"augmentations={saved}) after loading to train with "
            "augmentation multiplicity again, or keras_dp.make_private(model) "
            "to train without it."
        )


# The key of a private model's compile config that records its
# augmentation multiplicity (the function itself cannot be saved).
_AUGMENTATION_KEY = "keras_dp_augmentations"


def _private_get_compile_config(get_compile_config):
    def private_get_compile_config(model):
        config = get_compile_config(model)
        augmentations = model._keras_dp.saved_augmentations
        if model._keras_dp.augment is not None:
            augmentations = model._keras_dp.augmentations
        if config is not None and augmentations is not None:
            config = dict(config)
            config[_AUGMENTATION_KEY] = augmentations
        return config

    private_get_compile_config.__doc__ = get_compile_config.__doc__
    return private_get_compile_config


def _checked_make_train_function(make_train_function):
    # Keras builds the train function before the first step (and, on JAX,
    # before detaching the variables), so errors raised here leave the model
    # intact.
    def checked(model, force=False):
        checks.check_dp_optimizer(model)
        checks.check_no_example_mixing_layers(model)
        _check_augmentation_restored(model)
        settings = model._keras_dp
        # The traced step bakes in the divisor B and the noise multiplier:
        # retrace when either changed (a Poisson `fit` followed by
        # `train_on_batch`, a re-calibrated sigma).
        trace_key = (
            settings.expected_batch_size,
            model.optimizer.noise_multiplier,
            settings.rows_per_user,
        )
        if settings.traced_with != trace_key:
            force = force or model.train_function is not None
            settings.traced_with = trace_key
        result = make_train_function(model, force=force)
        if model.optimizer.secure_mode and not hasattr(
            model.train_function, "keras_dp_step_entropy"
        ):
            model.train_function = _with_step_entropy(model, model.train_function)
        return result

    return checked


def _with_step_entropy(model, train_function):
    """`train_function` run inside the optimizer's `step_entropy()`: in
    secure mode on TensorFlow, each call loads fresh OS entropy for its
    noise (the compiled step cannot read it)."""
    optimizer = model.optimizer

    def with_step_entropy(*args, **kwargs):
        # The entropy is attached to the noise seed generator, which the
        # optimizer's build creates.
        optimizer.build_for_model(model)
        with optimizer.step_entropy():
            return train_function(*args, **kwargs)

    with_step_entropy.keras_dp_step_entropy = True
    return with_step_entropy


def _trainer_fit(model):
    """The `fit` that the private one calls: the model's own, except that of
    keras-hub pipeline models (`Task`s), which batch and preprocess the data
    in their own `tf.data` pipeline where no Poisson sampler fits; for them
    keras_dp preprocesses the data itself (`_preprocessed`) and calls the
    Keras trainer's `fit`."""
    for cls in type(model).__mro__:
        if "fit" in vars(cls) and not cls.__module__.startswith("keras_hub."):
            return cls.fit
    return type(model).fit


def _preprocessed(model, x, y, sample_weight, validation_data):
    """`(x, y, sample_weight, validation_data)` through a keras-hub task's
    preprocessor, for arrays and `tf.data` (the preprocessor works on each
    example alone: tokenizing, packing; it sees no other example)."""
    if getattr(model, "preprocessor", None) is None:
        return x, y, sample_weight, validation_data
    preprocess = model.preprocess_samples

    def arrays(x, y, sample_weight):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(
            preprocess(x, y, sample_weight)
        )
        return tree.map_structure(
            lambda t: None if t is None else keras.ops.convert_to_numpy(t),
            (x, y, sample_weight),
        )

    if keras_compat.is_tf_dataset(x):
        x = x.map(preprocess)
    elif x is not None and not isinstance(x, keras.utils.PyDataset):
        x, y, sample_weight = arrays(x, y, sample_weight)
    if validation_data is not None:
        if keras_compat.is_tf_dataset(validation_data):
            validation_data = validation_data.map(preprocess)
        else:
            validation_data = arrays(
                *keras.utils.unpack_x_y_sample_weight(validation_data)
            )
    return x, y, sample_weight, validation_data


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
        fit_data.check_replicas(model, x)
        strategy = fit_data.multi_worker_strategy(model)
        if strategy is not None and not keras_compat.in_strategy_scope():
            # Samplers and checks ask `keras_dp.processes` which worker
            # this is, which it reads from the strategy in scope.
            with strategy.scope():
                return private_fit(
                    model,
                    x,
                    y,
                    batch_size,
                    epochs,
                    verbose,
                    callbacks,
                    validation_split,
                    validation_data,
                    shuffle,
                    class_weight,
                    sample_weight,
                    initial_epoch,
                    steps_per_epoch,
                    **kwargs,
                )
        _check_augmentation_restored(model)
        optimizer = model.optimizer
        fit_data.check_whole_windows_done(optimizer)
        x, y, sample_weight, validation_data = _preprocessed(
            model, x, y, sample_weight, validation_data
        )
        accumulation = optimizer.gradient_accumulation_steps or 1
        expected_batch_size = None
        arrays = (x, y, sample_weight)
        if settings.poisson_sampling and keras_compat.can_convert_arrays(arrays):
            if validation_split and validation_data is None:
                arrays, validation_data = keras_compat.train_validation_split(
                    arrays, validation_split
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
                secure_mode=optimizer.secure_mode,
            )
            y = sample_weight = batch_size = steps_per_epoch = None
        fit_data.check_secure_sampling(optimizer, x)
        fit_data.check_processes(optimizer, x)
        sampler = fit_data.poisson_sampler_of(x)
        if sampler is not None:
            sampler.pad_for_step(_compiles_per_batch_shape(model))
        rows_per_user = None
        if isinstance(sampler, data_lib.UserSampler):
            _check_user_level(model)
            rows_per_user = sampler.max_examples_per_user
        if sampler is not None:
            plan = fit_data.poisson_plan(sampler, accumulation)
            expected_batch_size = sampler.expected_batch_size
        else:
            plan = fit_data.fixed_batch_plan(
                model,
                x,
                y,
                batch_size,
                steps_per_epoch,
                validation_split,
                accumulation,
            )
            if not settings.warned_fixed_batches:
                settings.warned_fixed_batches = True
                warnings.warn(
                    "keras_dp: training on already-batched data (or with "
                    "poisson_sampling=False): batches are shuffled fixed-size "
                    "slices, not Poisson samples. The epsilon that keras_dp "
                    "reports assumes Poisson sampling at rate "
                    f"q={plan.sample_rate:.4g}; for fixed-size batches the "
                    "real guarantee can be weaker. Pass in-memory arrays or a "
                    "keras_dp.data.PoissonSampler for the analysed mechanism "
                    "(for a tf.data pipeline over batches, build it on the "
                    "sampler's as_tf_dataset()).",
                    stacklevel=2,
                )
        if not settings.examples_checked:
            ex_x, ex_y, ex_w, x = fit_data.first_examples(x, y, sample_weight)
            check_examples(model, ex_x, ex_y, ex_w)
        noise_multiplier = optimizer.calibrate_noise(
            plan.sample_rate, plan.updates_per_epoch
        )
        optimizer.privacy_ledger.record(
            ledger_lib.optimizer_steps(model),
            noise_multiplier,
            plan.sample_rate,
            plan.poisson,
            plan.n,
            unit=getattr(plan, "unit", "example"),
        )
        callbacks = _private_callbacks(optimizer, callbacks)
        for callback in _as_list(callbacks):
            if hasattr(callback, "check_before_fit") and not (
                callback.check_before_fit(model)
            ):
                return keras.callbacks.History()
        if plan.poisson:
            # The sampler's batches are already random; Keras shuffling its
            # items would split the parts of one logical batch (gradient
            # accumulation) across updates.
            shuffle = False
        settings.expected_batch_size = expected_batch_size
        settings.rows_per_user = rows_per_user
        settings.batch_size_hint = _rows_per_batch(x, batch_size)
        try:
            with fit_data.sampler_shards(model, x, steps_per_epoch) as (
                x,
                steps_per_epoch,
            ):
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
            # `train_on_batch` divides by each batch's own size, and its
            # rows are examples.
            settings.expected_batch_size = None
            settings.rows_per_user = None
            settings.batch_size_hint = None

    private_fit.__doc__ = fit.__doc__
    return private_fit


def _check_user_level(model):
    """Refuses what user-level training (a `UserSampler`) cannot do yet."""
    settings = model._keras_dp
    if settings.augment is not None:
        raise ValueError(
            "fit was given a keras_dp.data.UserSampler (user-level privacy: "
            "each user's rows are one privacy unit), but the model was made "
            f"private with augment=... (augmentations={settings.augmentations}"
            "), which makes each example's copies a unit; the two cannot be "
            "combined yet. Call keras_dp.make_private(model) without "
            "`augment` for user-level training, or train on examples "
            "(arrays or a PoissonSampler) with augmentation."
        )


def _private_callbacks(optimizer, callbacks):
    """`callbacks` as `fit` on a private model runs them.

    keras_dp's `EpsilonLogger`s come first, so that every other callback
    (`CSVLogger`, `TensorBoard`, ...) sees `epsilon` in the logs whatever
    the order the user listed them in; and an optimizer given a target
    epsilon adds a `PrivacyBudget` at that target, so training past the
    calibrated epochs stops before it exceeds the target instead of
    overshooting silently.
    """
    if isinstance(callbacks, keras.callbacks.CallbackList):
        listed = callbacks.callbacks
    else:
        listed = _as_list(callbacks)
    loggers = [c for c in listed if isinstance(c, callbacks_lib.EpsilonLogger)]
    ordered = loggers + [c for c in listed if c not in loggers]
    if optimizer.target_epsilon is not None:
        ordered.append(
            callbacks_lib.PrivacyBudget(
                optimizer.target_epsilon, optimizer.target_delta
            )
        )
    if isinstance(callbacks, keras.callbacks.CallbackList):
        callbacks.callbacks = ordered
        return callbacks
    return ordered


def check_examples(model, x, y=None, sample_weight=None):
    """Runs the checks that need real examples, once per model, before its
    first private step (see `keras_dp.example_independence`)."""
    settings = model._keras_dp
    if settings.examples_checked or x is None:
        return
    example_independence.check_examples_independent(model, x, y, sample_weight)
    settings.examples_checked = True


def _private_train_on_batch(train_on_batch):
    def private_train_on_batch(
        model,
        x,
        y=None,
        sample_weight=None,
        class_weight=None,
        return_dict=False,
    ):
        settings = model._keras_dp
        checks.check_dp_optimizer(model)
        if fit_data.replica_strategy(model) is not None:
            raise ValueError(
                "train_on_batch is not supported under a tf.distribute "
                "strategy of several replicas: each replica would scale its "
                "part of the batch by the part's size, not the batch's. Train "
                "with model.fit on in-memory arrays or a keras_dp.data."
                "PoissonSampler."
            )
        _check_augmentation_restored(model)
        optimizer = model.optimizer
        if optimizer.noise_multiplier is None:
            raise ValueError(
                f"{type(optimizer).__name__} was given target_epsilon and "
                "calibrates its noise for a number of epochs, which "
                "train_on_batch cannot tell. Pass `noise_multiplier` (and "
                "keep to a budget with keras_dp.PrivacyBudget or "
                "keras_dp.accounting), or train with model.fit."
            )
        # Without `make_private(sample_rate=...)` the update is recorded
        # with an unknown rate: epsilon is then refused, never understated.
        sample_rate = None
        if settings.sample_rate is not None:
            accumulation = optimizer.gradient_accumulation_steps or 1
            sample_rate = min(1.0, settings.sample_rate * accumulation)
        check_examples(model, x, y, sample_weight)
        steps = ledger_lib.optimizer_steps(model)
        ledger = optimizer.privacy_ledger
        ledger.record(steps, optimizer.noise_multiplier, sample_rate, False)
        if (
            optimizer.target_epsilon is not None
            and ledger.epsilon(steps + 1, optimizer.target_delta)
            > optimizer.target_epsilon
        ):
            raise ValueError(
                f"One more update would exceed the optimizer's "
                f"target_epsilon={optimizer.target_epsilon} at delta="
                f"{optimizer.target_delta}: this model has spent its "
                "privacy budget."
            )
        return train_on_batch(
            model,
            x,
            y=y,
            sample_weight=sample_weight,
            class_weight=class_weight,
            return_dict=return_dict,
        )

    private_train_on_batch.__doc__ = train_on_batch.__doc__
    return private_train_on_batch


def _private_compile(compile_fn):
    def private_compile(model, *args, **kwargs):
        previous = getattr(model, "optimizer", None)
        steps = 0
        if is_dp_optimizer(previous):
            steps = ledger_lib.optimizer_steps(model)
        new = args[0] if args else kwargs.get("optimizer")
        if steps and new is not previous:
            _check_no_history_of_its_own(new, steps)
        if is_dp_optimizer(new):
            # Keras would wrap a DP optimizer in a LossScaleOptimizer under
            # mixed_float16, which scales the batch-mean loss against
            # underflow; per-example gradients carry no 1/B factor, and
            # their clip factors and 1/B scaling are applied in float32.
            kwargs["auto_scale_loss"] = False
        result = compile_fn(model, *args, **kwargs)
        optimizer = model.optimizer
        if is_dp_optimizer(optimizer):
            # The owner link: the optimizer builds (and saves its clipping
            # groups) for this model, and only for a private one.
            optimizer.bind_clip_groups(model)
        if steps and optimizer is not previous and is_dp_optimizer(optimizer):
            optimizer.privacy_ledger = ledger_lib.PrivacyLedger(
                previous.privacy_ledger.entries, step_offset=steps
            )
        return result

    private_compile.__doc__ = compile_fn.__doc__
    return private_compile


def _private_summary(summary_fn):
    def private_summary(model, *args, **kwargs):
        result = summary_fn(model, *args, **kwargs)
        print_fn = kwargs.get("print_fn") or print
        print_fn(summary_lib.privacy_summary(model))
        return result

    private_summary.__doc__ = summary_fn.__doc__
    return private_summary


def _check_no_history_of_its_own(optimizer, steps):
    """The privacy a model has spent is handed on to its new optimizer (the
    guarantee is about the model's weights, not about one optimizer); one
    that trained before cannot take it on."""
    if not is_dp_optimizer(optimizer):
        return  # `fit` refuses it.
    if optimizer.privacy_ledger.entries or ledger_lib.optimizer_updates(optimizer):
        raise ValueError(
            f"This model has taken {steps} noisy updates, and the new "
            f"optimizer {optimizer.name!r} has a privacy history of its own "
            "(it has trained before), so the privacy spent cannot be "
            "combined into one ledger. Compile with a new DP optimizer "
            "(the model's ledger is carried over to it)."
        )


def _compiles_per_batch_shape(model):
    """Whether the model's train step is compiled once per batch shape:
    XLA, as on JAX (always padded to a few shapes, also when eager, since a
    `keras.distribution` splits each batch evenly over its devices) and
    with `jit_compile=True` on the other backends."""
    if keras.backend.backend() == "jax":
        return True
    return bool(model.jit_compile) and not model.run_eagerly


def _rows_per_batch(x, batch_size):
    """Rows of the batches `fit` will draw from `x`, or None if unknown."""
    sampler = fit_data.poisson_sampler_of(x)
    if sampler is not None:
        return sampler.padded_size
    if keras_compat.can_convert_arrays((x,)):
        return batch_size or 32
    if keras_compat.is_tf_dataset(x):
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
    weights = np.array([class_weight.get(int(c), 1.0) for c in labels], dtype="float32")
    if sample_weight is not None:
        weights = weights * np.asarray(sample_weight, dtype="float32")
    return weights


def _restore_private_models_on_load():
    """Makes `keras.saving.load_model` give back a private model as private.

    Keras compiles a loaded model with `Model.compile_from_config`, which
    builds the optimizer. A model saved with a keras_dp DP optimizer was
    private when it was saved, so the wrapped method makes it private (with
    default settings) before Keras compiles it; the private `compile` then
    attaches the optimizer. Installed once, when keras_dp is imported.
    """
    original = keras.Model.compile_from_config
    if getattr(original, "_keras_dp_hook", False):
        return

    def compile_from_config(self, config):
        augmentations = None
        if isinstance(config, dict) and _AUGMENTATION_KEY in config:
            config = dict(config)
            augmentations = config.pop(_AUGMENTATION_KEY)
        if not is_private(self) and _names_dp_optimizer(config):
            make_private(self)
        if augmentations is not None and is_private(self):
            self._keras_dp.saved_augmentations = augmentations
        return original(self, config)

    compile_from_config._keras_dp_hook = True
    compile_from_config.__doc__ = original.__doc__
    keras.Model.compile_from_config = compile_from_config


def _names_dp_optimizer(compile_config):
    optimizer = (compile_config or {}).get("optimizer")
    if not isinstance(optimizer, dict):
        return False
    return str(optimizer.get("registered_name") or "").startswith("keras_dp>")


_restore_private_models_on_load()
