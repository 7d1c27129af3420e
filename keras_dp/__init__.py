"""keras_dp: differentially private training for Keras 3.

```python
model = keras_dp.make_private(model)
model.compile(optimizer=keras_dp.DPAdam(auto_clip=True), loss=..., metrics=[...])
model.fit(x, y, epochs=3)
```
"""

import importlib.metadata

from keras_dp import accounting
from keras_dp import audit
from keras_dp import data
from keras_dp import individual_accounting
from keras_dp import plotting
from keras_dp.accounting import calibrate_noise_multiplier
from keras_dp.accounting import compute_epsilon
from keras_dp.callbacks import EpsilonLogger
from keras_dp.callbacks import PrivacyBudget
from keras_dp.clipped_batch import ClippedBatch
from keras_dp.clipping import AdaptiveClipping
from keras_dp.clipping_policy import ClippingPolicy
from keras_dp.clipping_policy import StepClipping
from keras_dp.groups import clear_clip_group
from keras_dp.groups import get_clip_group
from keras_dp.groups import set_clip_group
from keras_dp.individual_privacy import IndividualPrivacy
from keras_dp.ledger import PrivacyLedger
from keras_dp.low_rank import LowRankSparse
from keras_dp.noise import GaussianNoise
from keras_dp.normalization import replace_batch_normalization
from keras_dp.optimizers import DPAdam
from keras_dp.optimizers import DPAdamW
from keras_dp.optimizers import DPLamb
from keras_dp.optimizers import DPOptimizerMixin
from keras_dp.optimizers import DPSGD
from keras_dp.optimizers import make_dp_optimizer
from keras_dp.per_example import register_per_example_rule
from keras_dp.private_model import is_private
from keras_dp.private_model import make_private
from keras_dp.summary import privacy_summary

DPLAMB = DPLamb

try:
    __version__ = importlib.metadata.version("keras-dp")
except importlib.metadata.PackageNotFoundError:  # a source tree not installed
    __version__ = "0+unknown"

__all__ = [
    "accounting",
    "AdaptiveClipping",
    "audit",
    "calibrate_noise_multiplier",
    "clear_clip_group",
    "ClippedBatch",
    "ClippingPolicy",
    "compute_epsilon",
    "data",
    "DPAdam",
    "DPAdamW",
    "DPLAMB",
    "DPLamb",
    "DPOptimizerMixin",
    "DPSGD",
    "EpsilonLogger",
    "GaussianNoise",
    "get_clip_group",
    "individual_accounting",
    "IndividualPrivacy",
    "is_private",
    "LowRankSparse",
    "make_dp_optimizer",
    "make_private",
    "plotting",
    "privacy_summary",
    "PrivacyBudget",
    "PrivacyLedger",
    "register_per_example_rule",
    "replace_batch_normalization",
    "set_clip_group",
    "StepClipping",
]
