"""Checks that stop a model from training silently without privacy."""

import keras

from keras_dp import keras_compat
from keras_dp.optimizers import DPOptimizerMixin

# Layers whose training-mode output for one example depends on the others,
# so per-example gradients (and the privacy analysis) would be wrong.
EXAMPLE_MIXING_LAYERS = (keras.layers.BatchNormalization,)


def check_no_example_mixing_layers(model):
    """Refuses trainable batch normalization (frozen layers run in inference
    mode, with their stored statistics, and are accepted)."""
    for layer in keras_compat.flatten_layers(model, include_self=False):
        if isinstance(layer, EXAMPLE_MIXING_LAYERS) and layer.trainable:
            raise ValueError(
                f"Layer {layer.name!r} ({type(layer).__name__}) normalizes "
                "with statistics of the whole batch, so one example's output "
                "depends on the others and per-example clipping cannot bound "
                "its influence. Freeze it (`layer.trainable = False`: it "
                "then uses its stored statistics, as when fine-tuning a "
                "pretrained network), or replace it: "
                "`model = keras_dp.replace_batch_normalization(model)` "
                "swaps every trainable BatchNormalization for a "
                "GroupNormalization, which normalizes each example on its "
                "own."
            )


def check_dp_optimizer(model):
    optimizer = getattr(model, "optimizer", None)
    if not isinstance(optimizer, DPOptimizerMixin):
        raise TypeError(
            "A model passed through keras_dp.make_private must be compiled "
            "with a keras_dp DP optimizer (e.g. keras_dp.DPAdam, "
            "keras_dp.DPSGD, or keras_dp.make_dp_optimizer(cls)(...)). "
            f"Received: {type(optimizer).__name__}."
        )
