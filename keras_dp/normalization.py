"""Batch normalization, which mixes examples, made fit for private training.

A trainable `BatchNormalization` normalizes each example with statistics
of the whole batch, so one example's data moves every other example's
gradient and per-example clipping cannot bound its influence; its moving
statistics are also written from the data without noise. A *frozen* one
(`trainable=False`, how pretrained CNNs are usually fine-tuned) runs in
inference mode with its stored statistics and treats each example on its
own: keras_dp accepts it. For the trainable kind,
`replace_batch_normalization` returns the model with each one replaced by a
`GroupNormalization` over the same axis (what Opacus's
`ModuleValidator.fix` does for PyTorch models):

```python
model = keras_dp.replace_batch_normalization(model)
model = keras_dp.make_private(model)
```
"""

import keras

from keras_dp import keras_compat


def group_count(channels, max_groups=32):
    """The most groups, at most `max_groups`, that divide `channels`."""
    for groups in range(min(max_groups, channels), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


def replace_batch_normalization(model, max_groups=32):
    """A copy of `model` with every trainable `BatchNormalization` replaced
    by a `GroupNormalization`.

    Each replacement normalizes over the same channel axis, with the most
    groups (at most `max_groups`) that divide the channel count, the same
    `epsilon`, `center` and `scale`, and the batch normalization's `gamma`
    and `beta` as its initial scale and offset. Frozen batch normalization
    layers (`trainable=False`) are kept: they do not mix examples. Every
    other layer keeps its weights.

    Args:
        model: a Sequential or Functional `keras.Model` (a subclassed model
            builds its layers in its own code: replace them there).
        max_groups: the largest number of groups to use.

    Returns:
        A new model; `model` is left unchanged.
    """
    if not (isinstance(model, keras.Sequential) or keras_compat.is_functional(model)):
        raise ValueError(
            f"replace_batch_normalization needs a Sequential or Functional "
            f"model; {type(model).__name__} creates its layers in its own "
            "code. Replace keras.layers.BatchNormalization there by "
            "keras.layers.GroupNormalization(groups=..., axis=...)."
        )
    replaced = {}

    def clone(layer):
        if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable:
            norm = _group_normalization(layer, max_groups)
            replaced[norm.name] = layer
            return norm
        return layer.__class__.from_config(layer.get_config())

    def call(layer, *args, **kwargs):
        if layer.name in replaced:
            # BatchNormalization's call takes a mask; GroupNormalization's
            # does not (and normalizes masked positions like the others).
            kwargs.pop("mask", None)
        return layer(*args, **kwargs)

    copy = keras.models.clone_model(model, clone_function=clone, call_function=call)
    for original, new in zip(
        keras_compat.flatten_layers(model, include_self=False),
        keras_compat.flatten_layers(copy, include_self=False),
    ):
        source = replaced.get(new.name)
        if source is not None:
            _copy_affine(source, new)
        elif original.weights:
            new.set_weights(original.get_weights())
    return copy


def _group_normalization(layer, max_groups):
    axis = layer.axis if isinstance(layer.axis, int) else layer.axis[0]
    channels = layer.gamma.shape[0] if layer.scale else layer.beta.shape[0]
    return keras.layers.GroupNormalization(
        groups=group_count(int(channels), max_groups),
        axis=axis,
        epsilon=max(layer.epsilon, 1e-5),
        center=layer.center,
        scale=layer.scale,
        name=layer.name + "_group_norm",
        dtype=layer.dtype_policy,
    )


def _copy_affine(batch_norm, group_norm):
    if batch_norm.scale:
        group_norm.gamma.assign(batch_norm.gamma)
    if batch_norm.center:
        group_norm.beta.assign(batch_norm.beta)
