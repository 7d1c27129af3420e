"""What the fine-tuning benchmarks share: a method's model and its DP run.

`finetune_comparison.py` (an MLP on digits) and `finetune_transformer.py`
(a keras-hub transformer) compare full DP fine-tuning, DP-LoRA, LSG and
RGP at equal epsilon. Each builds its own model and data; both then wrap
the model for the method and train it privately the same way:

```python
model = for_method(model, "lsg", lora_layers=[...], rank=8, sparsity=0.5,
                   refresh_every=20, exclude=("head",), seed=0)
run = fit_private(model, train, learning_rate=2e-3, noise_multiplier=1.0,
                  loss=loss, batch_size=64, epochs=12, seed=0)
run.epsilon, run.steps, run.step_time, run.dimension
```
"""

import os
import sys
from dataclasses import dataclass

import keras
import numpy as np

import keras_dp

# The examples' step timer (examples/step_timer.py).
sys.path.insert(
    0,
    os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"
    ),
)
from step_timer import StepTimer  # noqa: E402

DELTA = 1e-5
METHODS = ("full", "lora", "lsg", "rgp")


def for_method(
    model, method, lora_layers, rank, sparsity, refresh_every, exclude, seed, **options
):
    """`model` ready for `method`: LoRA of rank `rank` enabled on
    `lora_layers` ("lora"), or wrapped in `keras_dp.LowRankSparse` with
    `sparsity` ("lsg") or none ("rgp"), the layers named in `exclude`
    privatised in full; as it is for "full". `options`: more arguments of
    `LowRankSparse` (its carriers)."""
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}: choose from {METHODS}.")
    if method == "lora":
        for layer in lora_layers:
            layer.enable_lora(rank)
    if method in ("lsg", "rgp"):
        model = keras_dp.LowRankSparse(
            model,
            rank=rank,
            sparsity=sparsity if method == "lsg" else 0.0,
            refresh_every=refresh_every,
            exclude=exclude,
            seed=seed,
            **options,
        )
    return model


@dataclass
class PrivateRun:
    """A finished DP run: the trained model, its epsilon at `DELTA`, the
    optimizer steps taken, the seconds per step (median over the epochs
    after the first), the number of noised coordinates per step and the
    per-example path the step took."""

    model: keras.Model
    epsilon: float
    steps: int
    step_time: float
    dimension: int
    path: str


def fit_private(
    model, train, learning_rate, noise_multiplier, loss, batch_size, epochs, seed
):
    """Trains `model` (from `for_method`) on `train` (`(x, y)`) with
    DP-Adam (clip 1) and keras_dp's defaults (Poisson sampling)."""
    dimension = getattr(model, "noise_dimension", None)
    if dimension is None:
        dimension = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    model = keras_dp.make_private(model)
    model.compile(
        optimizer=keras_dp.DPAdam(
            learning_rate=learning_rate,
            noise_multiplier=noise_multiplier,
            l2_norm_clip=1.0,
            seed=seed,
        ),
        loss=loss,
        metrics=["accuracy"],
    )
    timer, logger = StepTimer(), keras_dp.EpsilonLogger(delta=DELTA)
    model.fit(
        *train,
        batch_size=batch_size,
        epochs=epochs,
        verbose=0,
        callbacks=[timer, logger],
    )
    path = model._keras_dp.per_example_path
    return PrivateRun(
        model=model,
        epsilon=logger.epsilon(),
        steps=int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
        step_time=timer.seconds_per_step(),
        dimension=dimension,
        path="vmap" if path is None else path[0],
    )
