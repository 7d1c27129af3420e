"""Per-example gradients: their norms and clipped sum, for a DP step.

Two paths compute `sum_i c_i g_i`, the clipped sum of per-example
gradients `g_i`:

- the fast path: one batched forward/backward pass, each layer's
  per-example norms and clipped sum from a rule for its class (ghost norms,
  book-keeping, closed forms; `register_per_example_rule` adds rules for
  other layers);
- the vmap path: each example's gradient of the whole model under
  `vectorized_map`, for every model.

Both clip privacy units of several rows where the batch's rows come in
units (`units`: augmentation multiplicity's copies of an example, made by
`augmentation`).

Modules, lowest first (each imports only modules of lower layers):

- `registry` (rules and their registration), `rows` (row-wise helpers),
  `clip_factors`, `gradient_space`;
- `units` (units of several rows: their folds);
- `linear`, `patches` (shared by rules);
- `carriers` (linear kernels through LowRankSparse's low-rank carriers);
- rules: `dense`, `conv`, `embedding`, `normalization`, `generic`;
- `plan` (which layer gets which rule), `recording`, `losses`,
  `microbatches`, `metrics`, `augmentation` (the copies of augmentation
  multiplicity);
- `batched_pass`;
- `fast_path`, `vmap_path`;
- `engine` (`clipped_gradient_sum`, `private_gradients`).
"""

from keras_dp.per_example.batched_pass import per_example_norms_and_sums
from keras_dp.per_example.clip_factors import scaled_factors
from keras_dp.per_example.engine import NONFINITE_LOG
from keras_dp.per_example.engine import clipped_gradient_sum
from keras_dp.per_example.engine import private_gradients
from keras_dp.per_example.fast_path import fast_clipped_gradient_sum
from keras_dp.per_example.gradient_space import GradientSpace
from keras_dp.per_example.gradient_space import gradient_space
from keras_dp.per_example.linear import choose_method
from keras_dp.per_example.losses import example_loss_fn
from keras_dp.per_example.losses import loss_trackers_paused
from keras_dp.per_example.losses import num_regularized_weights
from keras_dp.per_example.losses import regularization_loss
from keras_dp.per_example.metrics import step_metrics
from keras_dp.per_example.plan import build_plan
from keras_dp.per_example.registry import RecordedCall
from keras_dp.per_example.registry import RuleContext
from keras_dp.per_example.registry import Unsupported
from keras_dp.per_example.registry import register_per_example_rule
from keras_dp.per_example.registry import remove_per_example_rule
from keras_dp.per_example.rows import instantiated_terms
from keras_dp.per_example.rows import kept_rows
from keras_dp.per_example.rows import rows_dot
from keras_dp.per_example.rows import scaled_rows
from keras_dp.per_example.rows import seed_state_ids
from keras_dp.per_example.rows import squared_norms
from keras_dp.per_example.units import unit_positions
from keras_dp.per_example.units import unit_rows
from keras_dp.per_example.units import unit_sums
from keras_dp.per_example.vmap_path import vmap_clipped_gradient_sum

__all__ = [
    "build_plan",
    "choose_method",
    "clipped_gradient_sum",
    "example_loss_fn",
    "fast_clipped_gradient_sum",
    "gradient_space",
    "GradientSpace",
    "instantiated_terms",
    "kept_rows",
    "loss_trackers_paused",
    "NONFINITE_LOG",
    "num_regularized_weights",
    "per_example_norms_and_sums",
    "private_gradients",
    "RecordedCall",
    "register_per_example_rule",
    "regularization_loss",
    "remove_per_example_rule",
    "rows_dot",
    "RuleContext",
    "scaled_factors",
    "scaled_rows",
    "seed_state_ids",
    "squared_norms",
    "step_metrics",
    "unit_positions",
    "unit_rows",
    "unit_sums",
    "Unsupported",
    "vmap_clipped_gradient_sum",
]
