"""How each example's gradient is bounded: the clipping half of the DP
mechanism, as one object that a DP optimizer holds.

A `ClippingPolicy` holds the settings (mode, threshold, clipping groups,
their thresholds, adaptive updates). When the optimizer is built for a
model it resolves the groups of the model's variables (`resolve`); from
then on `for_thresholds(thresholds)` gives the `StepClipping` of one step:
the object that turns the per-example squared norms that the per-example
engine (`keras_dp.per_example`) computes into clip factors, and counts the
examples below each threshold for adaptive clipping. The thresholds are
passed in explicitly: fixed floats, or the values of the adaptive
thresholds' optimizer variable in the step being traced.

Example:

```python
policy = keras_dp.ClippingPolicy(l2_norm_clip=1.0, clipping="auto")
policy.get_config()   # {"l2_norm_clip": 1.0, "clipping": "auto", ...}
```

A DP optimizer builds its policy from its own arguments
(`keras_dp.DPAdam(l2_norm_clip=..., clipping=..., clip_groups=...)`) and
exposes it as `optimizer.clipping_policy`.
"""

import math

import keras
import numpy as np
from keras import ops

from keras_dp import arguments
from keras_dp import clipping as clipping_lib
from keras_dp import groups as groups_lib


class ClippingPolicy:
    """Per-example clipping: mode, thresholds, groups, adaptive updates.

    Args:
        l2_norm_clip: `C` (flat clipping) or the scale `R` (auto and global
            clipping): every example's clipped gradient has L2 norm at
            most this value. Defaults to 1.0.
        clipping: `"flat"` (Abadi et al. 2016), `"auto"` (AUTO-S, Bu et
            al. 2023) or `"global"` (Bu et al. 2023); see
            `keras_dp.clipping.clip_factors`.
        global_clip_threshold: `Z` of global clipping (defaults to
            `l2_norm_clip`).
        clip_groups: None, `"flat"`, `"layers"`, `"per_layer"`,
            `"per_variable"` or `"per_device"` (see `keras_dp.groups`).
        clip_thresholds: optional `{group name: C_k}`.
        adaptive_clipping: None, True or a `keras_dp.AdaptiveClipping`
            (flat clipping only).
    """

    def __init__(
        self,
        l2_norm_clip=1.0,
        clipping="flat",
        global_clip_threshold=None,
        clip_groups=None,
        clip_thresholds=None,
        adaptive_clipping=None,
    ):
        clipping, l2_norm_clip, global_clip_threshold = clipping_lib.validate_clipping(
            clipping, l2_norm_clip, global_clip_threshold
        )
        clip_groups = arguments.one_of(
            "clip_groups",
            clip_groups,
            groups_lib.CLIP_GROUP_MODES,
            allow_none=True,
            what="clip_groups",
        )
        clip_thresholds = _thresholds(clip_thresholds)
        adaptive_clipping = _adaptive(adaptive_clipping)
        if adaptive_clipping is not None and clipping != "flat":
            raise ValueError(
                "Adaptive clipping thresholds need clipping='flat' (with "
                f"clipping={clipping!r} the threshold is only a scale). Use "
                "clipping='flat'."
            )
        self.l2_norm_clip = l2_norm_clip
        self.clipping = clipping
        self.global_clip_threshold = global_clip_threshold
        self.clip_groups = clip_groups
        self.clip_thresholds = clip_thresholds
        self.adaptive_clipping = adaptive_clipping
        # Set by `resolve`.
        self.assignment = None
        self.initial_thresholds = None

    @property
    def resolved(self):
        return self.assignment is not None

    def resolve(self, variables, model=None):
        """Assigns each of `variables` to a group and fixes the group
        thresholds: the ones given (on layers, then in `clip_thresholds`),
        else `l2_norm_clip / sqrt(K)`."""
        assignment = groups_lib.resolve_groups(
            self.clip_groups, variables, model, keras.distribution.distribution()
        )
        given = dict(self.clip_thresholds or {})
        unknown = set(given) - set(assignment.names)
        if unknown:
            raise ValueError(
                f"clip_thresholds names groups {sorted(unknown)} that this "
                f"model does not have. Its groups: {assignment.names}."
            )
        given.update(assignment.thresholds)
        split = self.l2_norm_clip / math.sqrt(assignment.num_groups)
        self.initial_thresholds = [given.get(name, split) for name in assignment.names]
        self.assignment = assignment

    @property
    def num_groups(self):
        self._check_resolved()
        return self.assignment.num_groups

    def sensitivity(self, thresholds=None):
        """L2 sensitivity of the clipped sum: `l2_norm_clip` with one
        group, `sqrt(sum_k C_k^2)` with groups (`thresholds`: the current
        ones, as floats; default the initial ones)."""
        if not self.resolved:
            return clipping_lib.sensitivity(self.l2_norm_clip)
        if thresholds is None:
            thresholds = self.initial_thresholds
        return clipping_lib.group_sensitivity(thresholds)

    def partitions(self):
        """Per variable, None or `(axis, shards)`; None if nothing is split
        (per-device groups of sharded variables need per-shard norms)."""
        if not self.resolved:
            return None
        partitions = self.assignment.partitions()
        return partitions if any(partitions) else None

    def for_thresholds(self, thresholds=None):
        """The `StepClipping` of one step with group thresholds
        `thresholds` (floats or scalar tensors; default the initial
        ones)."""
        self._check_resolved(allow_flat=True)
        if thresholds is None and self.resolved:
            thresholds = list(self.initial_thresholds)
        return StepClipping(self, thresholds)

    def _check_resolved(self, allow_flat=False):
        if self.resolved:
            return
        if (
            allow_flat
            and self.clip_groups in (None, "flat")
            and (self.adaptive_clipping is None)
        ):
            return
        raise RuntimeError(
            f"The clipping groups (clip_groups={self.clip_groups!r}, "
            f"adaptive_clipping={self.adaptive_clipping!r}) are not "
            "resolved yet: they are resolved when the optimizer is built "
            "for a model (model.fit does this). In a custom loop call "
            "optimizer.bind_clip_groups(model) before "
            "optimizer.build(model.trainable_variables)."
        )

    def get_config(self):
        """The settings; group settings only when used, so that the
        configs of optimizers without groups stay as they were."""
        config = {
            "l2_norm_clip": self.l2_norm_clip,
            "clipping": self.clipping,
            "global_clip_threshold": self.global_clip_threshold,
        }
        if self.clip_groups is not None:
            config["clip_groups"] = self.clip_groups
        if self.clip_thresholds:
            config["clip_thresholds"] = dict(self.clip_thresholds)
        if self.adaptive_clipping is not None:
            config["adaptive_clipping"] = self.adaptive_clipping.get_config()
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"ClippingPolicy({args})"


def _thresholds(clip_thresholds):
    """`{group name: C_k}` with non-empty string names and positive finite
    float thresholds, or None."""
    if clip_thresholds is None:
        return None
    if not isinstance(clip_thresholds, dict):
        raise arguments.ArgumentTypeError(
            "`clip_thresholds` must be a dict {group name: threshold}, or "
            f"None. Received: clip_thresholds={clip_thresholds!r}."
        )
    result = {}
    for name, threshold in clip_thresholds.items():
        if not isinstance(name, str) or not name:
            error = ValueError if isinstance(name, str) else arguments.ArgumentTypeError
            raise error(
                "`clip_thresholds` must map group names, non-empty strings, "
                f"to thresholds. Received the key {name!r} in "
                f"clip_thresholds={clip_thresholds!r}."
            )
        result[name] = groups_lib.check_threshold(
            f"clip_thresholds[{name!r}]", threshold
        )
    return result


def _adaptive(adaptive_clipping):
    if adaptive_clipping is None or isinstance(adaptive_clipping, (bool, np.bool_)):
        return clipping_lib.AdaptiveClipping() if adaptive_clipping else None
    if isinstance(adaptive_clipping, dict):
        try:
            return clipping_lib.AdaptiveClipping.from_config(adaptive_clipping)
        except TypeError as error:  # an unknown key
            raise arguments.ArgumentTypeError(
                "`adaptive_clipping` as a dict must be the config of a "
                f"keras_dp.AdaptiveClipping ({error}). Received: "
                f"adaptive_clipping={adaptive_clipping!r}."
            ) from None
    if not isinstance(adaptive_clipping, clipping_lib.AdaptiveClipping):
        raise arguments.ArgumentTypeError(
            "`adaptive_clipping` must be True, False, None or a "
            "keras_dp.AdaptiveClipping (or its config). Received: "
            f"adaptive_clipping={adaptive_clipping!r}."
        )
    return adaptive_clipping


class StepClipping:
    """A `ClippingPolicy` with the thresholds of one step: what the
    per-example engine calls to turn squared norms into clip factors.

    Members used by the engine: `variable_clip_factors`, `clip_counts`,
    `num_count_groups`, `variable_partitions`.
    """

    def __init__(self, policy, thresholds):
        self.policy = policy
        self.thresholds = thresholds

    def clip_factors(self, norms):
        """Per-example clip factors `c_i` for gradient norms `norms` (one
        group)."""
        policy = self.policy
        return clipping_lib.clip_factors(
            norms,
            policy.clipping,
            policy.l2_norm_clip,
            policy.global_clip_threshold,
        )

    def variable_clip_factors(self, squared_norms):
        """Clip factors of each example for each trainable variable.

        Args:
            squared_norms: one `(batch,)` tensor per trainable variable (in
                the model's `trainable_variables` order): each example's
                squared gradient norm restricted to that variable.

        Returns:
            One `(batch,)` tensor of factors per variable. With one
            clipping group every variable gets the factors of the total
            norm; with groups, each variable gets the factors of its
            group's norm. With per-device groups of sharded variables, a
            sharded variable's entry is `(batch, shards)` (one squared norm
            per shard) and so are its factors.
        """
        if not self._is_grouped():
            factors = self.clip_factors(clipping_lib.total_norms(squared_norms))
            return [factors] * len(squared_norms)
        policy = self.policy
        group_norms = self.group_norms(squared_norms)
        global_ratio = (
            policy.global_clip_threshold or policy.l2_norm_clip
        ) / policy.l2_norm_clip
        group_factors = clipping_lib.group_clip_factors(
            group_norms, policy.clipping, self.thresholds, global_ratio
        )
        factors = []
        for spec in policy.assignment.variable_groups:
            if isinstance(spec, int):
                factors.append(group_factors[spec])
            else:
                first, _, shards = spec
                factors.append(
                    ops.stack([group_factors[first + j] for j in range(shards)], axis=1)
                )
        return factors

    def clip_counts(self, squared_norms, mask=None):
        """Centred counts of adaptive clipping for one (micro)batch: the
        `(K,)` tensor `sum_i mask_i (1{||g_i^(k)|| <= C_k} - 1/2)` (one
        example moves each entry by exactly 1/2), or None without adaptive
        clipping. `mask` marks real rows (padding: 0)."""
        if self.policy.adaptive_clipping is None:
            return None
        return clipping_lib.centred_counts(
            self.group_norms(squared_norms), self.thresholds, mask
        )

    @property
    def num_count_groups(self):
        """`K` when adaptive clipping needs counts from the step, else 0."""
        policy = self.policy
        if policy.adaptive_clipping is None or not policy.resolved:
            return 0
        return policy.num_groups

    def variable_partitions(self):
        return self.policy.partitions()

    def _is_grouped(self):
        policy = self.policy
        if not policy.resolved:
            policy._check_resolved(allow_flat=True)
            return False
        first = self.thresholds[0]
        return (
            policy.assignment.num_groups > 1
            or policy.adaptive_clipping is not None
            or policy.partitions() is not None
            or not isinstance(first, (int, float))
            or first != policy.l2_norm_clip
        )

    def group_norms(self, squared_norms):
        """Each group's per-example norm, `(batch,)` per group."""
        assignment = self.policy.assignment
        sums = [None] * assignment.num_groups

        def add(k, value):
            sums[k] = value if sums[k] is None else sums[k] + value

        for sq, spec in zip(squared_norms, assignment.variable_groups):
            if isinstance(spec, int):
                if len(sq.shape) != 1:
                    sq = ops.sum(sq, axis=1)
                add(spec, sq)
            else:
                first, _, shards = spec
                if len(sq.shape) != 2:
                    raise ValueError(
                        "clip_groups='per_device' needs per-shard squared "
                        "norms of sharded variables (batch, shards); this "
                        "per-example method gave one norm per variable."
                    )
                for j in range(shards):
                    add(first + j, sq[:, j])
        return [ops.sqrt(s) for s in sums]
