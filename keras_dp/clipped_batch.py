"""The value a private train step hands its DP optimizer."""

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class ClippedBatch:
    """One batch's clipped gradients and what the noise needs to know.

    The per-example engine (`keras_dp.per_example.private_gradients`)
    computes it; the train step passes it to
    `optimizer.privatize(batch)` (or `stateless_privatize` on JAX), which
    adds the noise and returns the gradients that Keras's update applies.

    Attributes:
        gradients: per trainable variable, `sum_i c_i g_i / B` plus the
            data-independent weight-regularization gradient.
        expected_batch_size: `B` (a scalar tensor): the divisor of the
            clipped sum, also the scale of the noise.
        static_expected_batch_size: `B` as a Python number when known while
            tracing (adaptive clipping's count noise), else None.
        clip_counts: adaptive clipping's `(K,)` centred counts of the
            batch, else None.
        noise_spaces: None, or per variable None or a function drawing
            that variable's noise in a smaller space (`LowRankSparse`).
    """

    gradients: Any
    expected_batch_size: Any
    static_expected_batch_size: Any = None
    clip_counts: Any = None
    noise_spaces: Any = None

    @classmethod
    def from_step(cls, step):
        """The batch from `private_gradients`'s result dict."""
        return cls(
            gradients=step["grads"],
            expected_batch_size=step["expected_batch_size"],
            static_expected_batch_size=step["static_expected_batch_size"],
            clip_counts=step["clip_counts"],
            noise_spaces=step["noise_spaces"],
        )


class NoisyGradients(list):
    """Gradients with the DP noise added: what `privatize` returns and the
    only gradients a DP optimizer's `apply` accepts."""
