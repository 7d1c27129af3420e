"""Every use of Keras internals in keras_dp, one named function each.

keras_dp needs things Keras does not export: the layers inside a model, the
seed generators a layer owns, the parts of the compiled loss, the hooks of
its trainers. They all go through this module, so that a Keras release that
renames one breaks one function here, which `make compat-test` (the lowest
Keras that pyproject.toml allows and the pinned one, on both backends)
finds, instead of a traced train step somewhere else.

Each function's docstring names the Keras versions it was checked
against ("Keras 3.10.0-3.15.1": the lowest allowed and the pinned one).
Keras modules are imported inside the functions: a moved module then
fails only the functions that read it, not `import keras_dp`.

```python
from keras_dp import keras_compat

for layer in keras_compat.flatten_layers(model, include_self=False):
    ...
with keras_compat.losses_override(model, activity_losses):
    loss = keras_compat.compute_loss(model, x, y, y_pred, sample_weight)
```

This module imports nothing from keras_dp.
"""

import contextlib

# The versions every function below was checked against.
CHECKED_KERAS_VERSIONS = ("3.10.0", "3.15.1")

_MISSING = object()


# --------------------------------------------------------------------------
# Layers and models.


def flatten_layers(layer, include_self=True, recursive=True):
    """The layers inside `layer` (a list), parents before their children:
    `Layer._flatten_layers`. Checked: Keras 3.10.0-3.15.1.

    ```python
    dense = [l for l in flatten_layers(model, include_self=False)
             if isinstance(l, keras.layers.Dense)]
    ```
    """
    return list(layer._flatten_layers(include_self=include_self, recursive=recursive))


def seed_generators(layer):
    """The `keras.random.SeedGenerator`s that `layer` itself created (not
    its sublayers'): `Layer._seed_generators`. Checked: Keras
    3.10.0-3.15.1."""
    return list(getattr(layer, "_seed_generators", None) or [])


def seed_generator_states(model):
    """The state variables of every seed generator in `model` and its
    layers, in layer order (the per-example path gives each example its
    own seed by offsetting them). Checked: Keras 3.10.0-3.15.1."""
    return [
        generator.state
        for layer in flatten_layers(model, include_self=True)
        for generator in seed_generators(layer)
    ]


def call_has_training_arg(layer):
    """Whether `layer.call` takes a `training` argument:
    `Layer._call_has_training_arg`. Checked: Keras 3.10.0-3.15.1."""
    return bool(layer._call_has_training_arg)


def own_variables(layer):
    """The variables `layer` created itself (not its sublayers'),
    trainable ones first: `Layer._trainable_variables +
    Layer._non_trainable_variables`. Checked: Keras 3.10.0-3.15.1."""
    return list(getattr(layer, "_trainable_variables", None) or []) + list(
        getattr(layer, "_non_trainable_variables", None) or []
    )


def build_input_shapes(layer):
    """`{argument name: shape}` that `layer` was built with (`{}` when it
    was not built by a call): `Layer._build_shapes_dict`. Checked: Keras
    3.10.0-3.15.1."""
    return dict(getattr(layer, "_build_shapes_dict", None) or {})


def lora_base_kernel(layer):
    """The frozen base kernel of a LoRA-enabled `Dense` (its `kernel`
    property returns the base plus the low-rank product):
    `Dense._kernel`. Checked: Keras 3.10.0-3.15.1."""
    return layer._kernel


def base_conv_call():
    """Keras's own `call` of convolution layers (`BaseConv.call`), to
    tell a `Conv2D` whose `call` a subclass replaced. Checked: Keras
    3.10.0-3.15.1.

    ```python
    plain = type(layer).call is base_conv_call()
    ```
    """
    from keras.src.layers.convolutional.base_conv import BaseConv

    return BaseConv.call


def is_functional(model):
    """Whether `model` is a functional model (`keras.Model(inputs,
    outputs)`, or a subclass of Keras's `Functional` such as a keras-hub
    backbone; a `Sequential` is not):
    `isinstance(model, keras.src.models.functional.Functional)`. Checked:
    Keras 3.10.0-3.15.1."""
    from keras.src.models.functional import Functional

    return isinstance(model, Functional)


def add_clone_hook(hook):
    """Makes `keras.models.clone_model` call `hook(layer, clone)` for every
    layer it clones (nested models cloned as one layer included), once
    per hook. Wraps `keras.src.models.cloning._wrap_clone_function`.
    Checked: Keras 3.10.0-3.15.1.

    ```python
    add_clone_hook(lambda layer, clone: copy_metadata(layer, clone))
    ```
    """
    from keras.src.models import cloning

    installed = cloning._wrap_clone_function
    hooks = getattr(installed, "keras_dp_clone_hooks", None)
    if hooks is None:
        hooks = []

        def wrap_clone_function(*args, **kwargs):
            clone_fn = installed(*args, **kwargs)

            def cloned(layer):
                clone = clone_fn(layer)
                for each in list(hooks):
                    each(layer, clone)
                return clone

            return cloned

        wrap_clone_function.keras_dp_clone_hooks = hooks
        cloning._wrap_clone_function = wrap_clone_function
    if hook not in hooks:
        hooks.append(hook)


def override_attribute(obj, name, value):
    """Sets `obj.name = value` on the instance past Keras's tracking
    `Layer.__setattr__` (which would track or refuse it); returns what to
    hand to `restore_attribute`. Checked: Keras 3.10.0-3.15.1.

    ```python
    saved = override_attribute(layer, "call", recording_call)
    try:
        ...
    finally:
        restore_attribute(layer, "call", saved)
    ```
    """
    saved = obj.__dict__.get(name, _MISSING)
    object.__setattr__(obj, name, value)
    return saved


def restore_attribute(obj, name, saved):
    """Undoes `override_attribute`: the instance attribute it replaced, or
    none (the class attribute shows again). Checked: Keras
    3.10.0-3.15.1."""
    if saved is _MISSING:
        obj.__dict__.pop(name, None)
    else:
        object.__setattr__(obj, name, saved)


def in_strategy_scope():
    """Whether a `tf.distribute` strategy is in scope (TensorFlow).
    Checked: Keras 3.10.0-3.15.1."""
    import tensorflow as tf

    return tf.distribute.has_strategy()


@contextlib.contextmanager
def distributed_fit(model, strategy):
    """While `fit` trains `model` under the `tf.distribute` strategy
    `strategy` of several replicas, works around the two places where
    Keras 3's TensorFlow trainer fails under `MultiWorkerMirroredStrategy`
    without keras_dp (keras-team/keras#20585), the first also under
    `MirroredStrategy` with replicas' parts of unequal sizes: the first
    batch it builds the model from is a mean over the replicas of their
    parts (which cannot be computed eagerly across workers, nor for parts
    of different sizes), and the logs are reduced across workers with
    `axis=0`, which scalars do not have. Here the model is built from this
    process's first replica's part and scalar logs are averaged over the
    replicas. Checked: Keras 3.10.0-3.15.1 (under the strategies:
    3.15.1)."""
    from keras.src import tree
    from keras.src.backend.tensorflow import trainer as tf_trainer

    def local_batch(value):
        if isinstance(value, tf_trainer.tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    def symbolic_build(iterator=None, data_batch=None):
        if iterator is not None:
            for _, _, batches in iterator:
                data_batch = tree.map_structure(local_batch, next(batches))
                break
        with strategy.scope():
            model._symbolic_build(data_batch=data_batch)

    reduce_per_replica = tf_trainer.reduce_per_replica

    def reduce_logs(values, reduce_strategy, reduction):
        def reduce(value):
            shape = tf_trainer.tf.TensorShape(
                getattr(local_batch(value), "shape", None)
            )
            if reduction in ("auto", "mean") and shape.rank == 0:
                return reduce_strategy.reduce("MEAN", value, axis=None)
            return reduce_per_replica(value, reduce_strategy, reduction)

        return tree.map_structure(reduce, values)

    saved = override_attribute(model, "_maybe_symbolic_build", symbolic_build)
    tf_trainer.reduce_per_replica = reduce_logs
    try:
        yield
    finally:
        tf_trainer.reduce_per_replica = reduce_per_replica
        restore_attribute(model, "_maybe_symbolic_build", saved)


def backend_random_module():
    """The current Keras backend's random module (`keras.random`'s
    functions call its `normal`, `uniform`, `dropout`... by attribute at
    each call, so replacing one with `override_attribute` changes what
    every layer draws). Checked: Keras 3.10.0-3.15.1."""
    from keras.src import backend

    return backend.random


def backend_nn_module():
    """The current Keras backend's nn module (`keras.ops`' functions, and
    the module's own losses, call its `one_hot`... by attribute at each
    call). Checked: Keras 3.10.0-3.15.1."""
    from keras.src import backend

    return backend.nn


@contextlib.contextmanager
def without_channels_last_copies():
    """A context in which Keras's PyTorch convolutions do not copy their
    inputs into channels-last memory format (newer Keras does, for speed),
    which `torch.vmap` cannot do; the values are the same. Changes nothing
    on other backends or where Keras makes no such copy. Checked: Keras
    3.10.0 (no copy) - 3.15.1."""
    from keras.src import backend

    nn = backend.nn
    name = "_maybe_convert_to_channels_last"
    if backend.backend() != "torch" or not hasattr(nn, name):
        yield
        return
    saved = getattr(nn, name)
    setattr(nn, name, lambda tensor: tensor)
    try:
        yield
    finally:
        setattr(nn, name, saved)


# --------------------------------------------------------------------------
# Losses.


def compute_loss(model, x=None, y=None, y_pred=None, sample_weight=None, training=True):
    """`model.compute_loss(...)`, also for overrides written before its
    `training` argument existed: `Trainer._compute_loss`. Checked: Keras
    3.10.0-3.15.1."""
    return model._compute_loss(
        x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training
    )


@contextlib.contextmanager
def losses_override(model, losses):
    """Inside it, `model.losses` (what `compute_loss` adds to the compiled
    loss) is `losses` instead of the layers' own: `Layer._losses_override`.
    A non-empty list also keeps the weight regularization out. Checked:
    Keras 3.10.0-3.15.1.

    ```python
    with losses_override(model, activity_losses or [ops.zeros(())]):
        loss = compute_loss(model, x, y, y_pred)
    ```
    """
    model._losses_override = list(losses)
    try:
        yield
    finally:
        model._losses_override = []


def regularization_losses(model):
    """The weight regularizers' losses of `model` (a list of scalars, no
    activity losses): `Layer._get_regularization_losses`. Checked: Keras
    3.10.0-3.15.1."""
    return list(model._get_regularization_losses())


def aggregate_additional_loss(model, loss):
    """One extra loss term (a regularizer's) as `compute_loss` adds it (cast
    to the loss dtype, scaled under a `tf.distribute` strategy):
    `Trainer._aggregate_additional_loss`. Checked: Keras 3.10.0-3.15.1."""
    return model._aggregate_additional_loss(loss)


def has_default_compute_loss(model):
    """Whether `model` keeps Keras's own `compute_loss` (no override):
    `type(model).compute_loss is Trainer.compute_loss`. Checked: Keras
    3.10.0-3.15.1."""
    from keras.src.trainers.trainer import Trainer

    return type(model).compute_loss is Trainer.compute_loss


def compile_loss(model):
    """The loss `model.compile(loss=...)` built (a `CompileLoss`), or None
    before `compile`: `Trainer._compile_loss`. Checked: Keras
    3.10.0-3.15.1."""
    return getattr(model, "_compile_loss", None)


def loss_with_output_trackers(model):
    """The compiled loss when it is built and keeps one loss tracker per
    output (models with several outputs), else None. Checked: Keras
    3.10.0-3.15.1."""
    compiled_loss = compile_loss(model)
    if compiled_loss is None or not compiled_loss.built:
        return None
    return compiled_loss if compiled_loss.metrics else None


def flat_losses(compiled_loss):
    """The compiled loss's `(path, loss, weight, name)` per output (a list;
    build it first): `CompileLoss._flat_losses`. Checked: Keras
    3.10.0-3.15.1."""
    return list(compiled_loss._flat_losses or [])


def loss_trackers(compiled_loss):
    """The compiled loss's per-output `Mean` trackers (`label_loss`...), in
    output order: `CompileLoss._metrics`. Checked: Keras 3.10.0-3.15.1."""
    return list(compiled_loss._metrics)


def set_loss_trackers(compiled_loss, trackers):
    """Replaces the compiled loss's per-output trackers; a None entry
    skips that output's update (`CompileLoss.call` zips trackers with
    losses and skips Nones): `CompileLoss._metrics`. Checked: Keras
    3.10.0-3.15.1.

    ```python
    saved = loss_trackers(loss)
    set_loss_trackers(loss, [None] * len(saved))
    try:
        ...
    finally:
        set_loss_trackers(loss, saved)
    ```
    """
    compiled_loss._metrics = list(trackers)


def is_loss_function_wrapper(loss):
    """Whether `loss` is Keras's `LossFunctionWrapper` (a plain loss
    function such as `keras.losses.mean_squared_error`, given to
    `compile` by name or as a function). Checked: Keras 3.10.0-3.15.1."""
    from keras.src.losses.losses import LossFunctionWrapper

    return isinstance(loss, LossFunctionWrapper)


def loss_function_kwargs(loss):
    """The keyword arguments a `LossFunctionWrapper` passes to its function
    (e.g. `axis`): `LossFunctionWrapper._fn_kwargs`. Checked: Keras
    3.10.0-3.15.1."""
    return dict(loss._fn_kwargs)


def builtin_loss_name(fn):
    """The name of a built-in Keras loss function (`"mean_squared_error"`
    for `keras.losses.mean_squared_error`), None for any other function:
    they live in `keras.src.losses.losses`. Checked: Keras 3.10.0-3.15.1."""
    if getattr(fn, "__module__", None) != "keras.src.losses.losses":
        return None
    return getattr(fn, "__name__", None)


def reduce_weighted_values(values, sample_weight=None, reduction="none", dtype=None):
    """Loss values times their sample weights, reduced as a Keras loss
    reduces them (`"none"` keeps every value):
    `keras.src.losses.loss.reduce_weighted_values`. Checked: Keras
    3.10.0-3.15.1."""
    from keras.src.losses import loss as loss_lib

    return loss_lib.reduce_weighted_values(
        values, sample_weight=sample_weight, reduction=reduction, dtype=dtype
    )


def keras_mask(x):
    """The Keras mask a layer attached to tensor `x`, or None:
    `keras.src.backend.common.masking.get_keras_mask`. Checked: Keras
    3.10.0-3.15.1."""
    from keras.src.backend.common import masking

    return masking.get_keras_mask(x)


def set_keras_mask(x, mask):
    """Attaches `mask` to tensor `x` as its Keras mask (None removes it):
    `keras.src.backend.common.masking.set_keras_mask`. Checked: Keras
    3.10.0-3.15.1."""
    from keras.src.backend.common import masking

    masking.set_keras_mask(x, mask)


# --------------------------------------------------------------------------
# Metrics and trainers.


def loss_tracker(model):
    """The `Mean` metric behind the logged `loss`: `Trainer._loss_tracker`.
    Checked: Keras 3.10.0-3.15.1."""
    return model._loss_tracker


def compile_metrics(model):
    """The metrics `model.compile(metrics=...)` built (a `CompileMetrics`),
    or None: `Trainer._compile_metrics`. Checked: Keras 3.10.0-3.15.1."""
    return getattr(model, "_compile_metrics", None)


def flat_metrics(compiled_metrics):
    """The unweighted compiled metrics, one `MetricsList` per output (its
    `.metrics`; None where an output has none); build them first:
    `CompileMetrics._flat_metrics`. Checked: Keras 3.10.0-3.15.1."""
    return list(compiled_metrics._flat_metrics)


def set_flat_metrics(compiled_metrics, metrics):
    """Replaces the unweighted compiled metrics (see `flat_metrics`):
    `CompileMetrics._flat_metrics`. Checked: Keras 3.10.0-3.15.1."""
    compiled_metrics._flat_metrics = list(metrics)


def update_metrics_variables(
    model, metrics_variables, loss, x, y, y_pred, sample_weight
):
    """The JAX trainer's stateless metrics update: `(logs, new metrics
    variables)` after the loss tracker and the compiled metrics saw this
    batch: `JAXTrainer._update_metrics_variables`. JAX backend only.
    Checked: Keras 3.10.0-3.15.1."""
    return model._update_metrics_variables(
        metrics_variables, loss, x, y, y_pred, sample_weight
    )


def live_optimizer_variables(model):
    """In the middle of a JAX `fit`, the values of `model.optimizer`'s
    variables (in `optimizer.variables` order) that the trainer holds
    outside the variables; None when the variables are up to date or on
    another backend: `JAXTrainer._jax_state` and `_jax_state_synced`.
    (A callback's `self.model` syncs the state first: read the model
    object itself.) Checked: Keras 3.10.0-3.15.1."""
    state = getattr(model, "_jax_state", None)
    if not state or getattr(model, "_jax_state_synced", True):
        return None
    return state.get("optimizer_variables")


# --------------------------------------------------------------------------
# Optimizers.


def optimizer_iterations(optimizer):
    """The variable that counts `optimizer`'s steps, gradient-accumulation
    micro-steps included (`optimizer.iterations` divides by the
    accumulation steps): `BaseOptimizer._iterations`. Checked: Keras
    3.10.0-3.15.1."""
    return optimizer._iterations


def backend_optimizer_class(optimizer_class):
    """The class that Keras instantiates for `optimizer_class` on the
    current backend. On PyTorch, `TorchOptimizer.__new__` swaps Keras's
    built-in optimizers (SGD, Adam, AdamW, ...) for versions that update
    all variables with `torch._foreach_*` calls; a subclass is not swapped
    and updates its variables one by one, with a new tensor per variable.
    Elsewhere: `optimizer_class`. Checked: Keras 3.10.0-3.15.1."""
    import keras

    if keras.backend.backend() != "torch":
        return optimizer_class
    # `__new__` alone (no `__init__`): the object is only asked its type.
    return type(optimizer_class.__new__(optimizer_class))


def track_variable(optimizer, variable):
    """Makes `variable` one of `optimizer.variables` (saved with it, and
    threaded through JAX's stateless steps): `BaseOptimizer._track_variable`.
    Checked: Keras 3.10.0-3.15.1."""
    optimizer._track_variable(variable)


# --------------------------------------------------------------------------
# Data given to `fit`, and the rest.


def can_convert_arrays(arrays):
    """Whether `fit` takes this structure as in-memory arrays (NumPy,
    backend tensors, pandas...): `array_data_adapter.can_convert_arrays`.
    Checked: Keras 3.10.0-3.15.1."""
    from keras.src.trainers.data_adapters import array_data_adapter

    return array_data_adapter.can_convert_arrays(arrays)


def is_tf_dataset(x):
    """Whether `x` is a `tf.data.Dataset` (without importing TensorFlow):
    `keras.src.trainers.data_adapters.is_tf_dataset`. Checked: Keras
    3.10.0-3.15.1."""
    from keras.src.trainers import data_adapters

    return data_adapters.is_tf_dataset(x)


def train_validation_split(arrays, validation_split):
    """`(train, validation)`: Keras's own `validation_split` of a structure
    of arrays (the last rows validate):
    `array_slicing.train_validation_split`. Checked: Keras 3.10.0-3.15.1."""
    from keras.src.trainers.data_adapters import array_slicing

    return array_slicing.train_validation_split(
        arrays, validation_split=validation_split
    )


def print_msg(message):
    """Prints `message` where Keras prints its own (stdout, or absl logging
    when `keras.config.disable_interactive_logging()`):
    `keras.src.utils.io_utils.print_msg`. Checked: Keras 3.10.0-3.15.1."""
    from keras.src.utils import io_utils

    io_utils.print_msg(message)


def random_seed_dtype():
    """The dtype of the backend's seeds (`keras.random` ops take seeds of
    this dtype): `keras.src.backend.random_seed_dtype()`. Checked: Keras
    3.10.0-3.15.1."""
    from keras.src import backend

    return backend.random_seed_dtype()
