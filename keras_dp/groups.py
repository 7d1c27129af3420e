"""Clipping groups as layer metadata (He et al., group-wise clipping).

Group-wise clipping splits the trainable variables into `K` groups and clips
each example's gradient restricted to group `k` to its own threshold `C_k`.
The sensitivity of the clipped sum is `sqrt(sum_k C_k^2)` and the noise is one
isotropic Gaussian over all coordinates, so the accounting is flat DP-SGD's.

```python
keras_dp.set_clip_group(model.get_layer("encoder"), "body", threshold=1.0)
keras_dp.set_clip_group(model.get_layer("head"), "head", threshold=0.5)
model = keras_dp.make_private(model)
model.compile(optimizer=keras_dp.DPAdam(noise_multiplier=1.0,
                                        clip_groups="layers"), loss=...)
```

Modes (`clip_groups=` of every DP optimizer):

- `"flat"`: one group (the default when no layer carries a group).
- `"layers"`: the groups named on layers with `set_clip_group` (the default
  when some layer carries one). A group set on a layer covers every variable
  of the layer and of its sublayers, unless a sublayer names its own group
  (the innermost setting wins). Variables of layers without a group go to
  the group `"default"`.
- `"per_layer"`: one group per layer that owns trainable variables, named by
  the layer's path (`"encoder/dense_1"`).
- `"per_variable"`: one group per trainable variable, named by its path.
- `"per_device"`: one group per device shard of the variables (see below).

Thresholds: a group's threshold comes from `set_clip_group(..., threshold=)`,
else from the optimizer's `clip_thresholds={group: C_k}`, else the equal split
`l2_norm_clip / sqrt(K)` (fastDP's default), so that with no explicit
thresholds the total sensitivity is `l2_norm_clip`. With `clipping="auto"`
group `k` uses `R_k / (||g_i^(k)|| + 0.01)` with the same `R_k`, and with
`clipping="global"` group `k` keeps examples with `||g_i^(k)|| <= Z_k`, where
`Z_k = R_k * Z / R`.

How the mapping reaches the optimizer: groups are resolved once, when Keras
builds the optimizer for a model (`fit`, `train_on_batch`, `load_model`):
the optimizer is attached to its model (`make_private` and the private
model's `compile` attach it) and its build maps each trainable variable of
that model to a group.
Call `set_clip_group` before the first `fit`; in a custom loop call
`optimizer.bind_clip_groups(model)` before `optimizer.build(...)`.

Persistence (`model.save`/`load_model`, `keras.models.clone_model`): Keras
layers serialise only their constructor arguments, and a layer's
`from_config` rejects unknown keys, so metadata cannot ride in an arbitrary
layer's config. keras_dp therefore keeps it in two places:

- On the layer (`layer._keras_dp_clip_group`), which is what training reads.
- In the DP optimizer's config, as `layer_clip_groups = {layer path: [group,
  threshold]}`, collected from the model when the optimizer is saved. The
  optimizer is part of a compiled model's saved compile config, and
  `load_model` builds it for the loaded model, which puts the groups back on
  the layers. A model saved *without* a compiled DP optimizer does not carry
  its groups; a subclassed model can call `set_clip_group` in `__init__`,
  which survives any reload.
- `keras.models.clone_model` (Sequential and Functional) copies the metadata
  from each layer to its clone: keras_dp wraps Keras's per-layer clone
  function (through `keras_compat.add_clone_hook`) when this
  module is imported. Subclassed models are cloned by re-running `__init__`,
  so groups set there come back; others are lost (as are weights).

Per-device groups (`clip_groups="per_device"`, JAX `keras.distribution`):
each device's piece of the variables is a group, clipped where it lives.

- Without a distribution, or under `DataParallel`, every device holds a whole
  replica of the variables, so there is one group (the whole model); each
  example's gradient lives on the device that holds the example and is
  clipped there. The clipped sums are all-reduced by GSPMD and the noise is
  drawn once, from one seed, for the logical batch: the update equals the
  single-device update.
- Under `ModelParallel` with a `LayoutMap` that shards variables along one
  mesh axis of size `M` (the "model" axis; any axis but the batch axis),
  group `j` is shard `j` of every sharded variable: each example's squared
  norm is reduced per shard, which needs no communication across the model
  axis, and the factor of shard `j` scales only that shard. Variables that
  are not sharded (replicated on every device of the model axis) form one
  more group, `"replicated"`, whose norm every device computes locally.
  So `K = M` (+1). Variables sharded along two mesh axes are not supported.

Memory and passes, per backend. Group factors need only per-variable
squared norms, which both paths produce:

- Fast path (`make_private(per_example="auto")`, the default, on both
  backends): ghost norms / book-keeping for Dense, EinsumDense, Conv and
  Embedding, closed forms for normalization layers, and a layer-local
  per-example vjp for other layers. Per-example gradients are only formed
  for layers where that costs no more than ghost norms (small kernels,
  long sequences: Conv kernels from gathered patches, in chunks of
  examples), for normalization layers (small) and for the other layers;
  there is one backward pass, and the clipped sum is assembled layer by
  layer from the group factors (book-keeping). Used for every mode, also
  with adaptive thresholds; for `"per_device"`, the Dense, EinsumDense and
  Embedding rules give per-shard ghost norms and the rules that
  instantiate gradients split them (a sharded conv kernel or LoRA adapter
  takes the vmap path).
- Vmap path (`per_example="vmap"`, or models the fast path does not
  support): each microbatch's per-example gradient of the whole
  model exists at once (`make_private(microbatch_size=...)` bounds it);
  group clipping then costs one reduction per variable and still no second
  backward pass.
"""

import keras

from keras_dp import arguments
from keras_dp import keras_compat

GROUP_ATTR = "_keras_dp_clip_group"
DEFAULT_GROUP = "default"
REPLICATED_GROUP = "replicated"
CLIP_GROUP_MODES = ("flat", "layers", "per_layer", "per_variable", "per_device")


def set_clip_group(layer, group, threshold=None):
    """Puts `layer` (and its sublayers) in clipping group `group`.

    Args:
        layer: a `keras.layers.Layer` (a nested model is a layer too).
        group: the group's name, a non-empty string.
        threshold: optional clipping threshold `C_k` of the group. Layers of
            one group must not give it different thresholds. Without one,
            the group gets the equal split `l2_norm_clip / sqrt(K)`.

    Returns:
        `layer`.
    """
    arguments.instance_of("layer", layer, keras.layers.Layer, "a keras Layer")
    group = arguments.non_empty_string(
        "group", group, hint="the name of the clipping group"
    )
    if threshold is not None:
        threshold = check_threshold("threshold", threshold)
    object.__setattr__(layer, GROUP_ATTR, (group, threshold))
    return layer


def get_clip_group(layer):
    """`(group, threshold)` set on `layer` itself, or None."""
    return getattr(layer, GROUP_ATTR, None)


def clear_clip_group(layer):
    """Removes the group set on `layer`."""
    if GROUP_ATTR in layer.__dict__:
        object.__delattr__(layer, GROUP_ATTR)


def check_threshold(name, threshold):
    """`threshold` (argument `name`) as a float if it is a positive finite
    number: a group's clipping threshold `C_k`."""
    return arguments.positive_number(
        name, threshold, hint="the clipping threshold C_k of the group"
    )


def _children(layer):
    return keras_compat.flatten_layers(layer, include_self=False, recursive=False)


def layer_paths(model):
    """`[(path, layer)]` for every layer of `model` (the model itself: "")."""
    result = [("", model)]

    def visit(layer, prefix, seen):
        names = {}
        for child in _children(layer):
            if id(child) in seen:
                continue
            seen.add(id(child))
            name = child.name
            count = names.get(name, 0)
            names[name] = count + 1
            if count:
                name = f"{name}#{count}"
            path = f"{prefix}/{name}" if prefix else name
            result.append((path, child))
            visit(child, path, seen)

    visit(model, "", {id(model)})
    return result


def collect_layer_groups(model):
    """`{layer path: [group, threshold]}` of the layers of `model`."""
    mapping = {}
    for path, layer in layer_paths(model):
        meta = get_clip_group(layer)
        if meta is not None:
            mapping[path] = [meta[0], meta[1]]
    return mapping


def apply_layer_groups(model, mapping):
    """Sets saved groups on the layers of `model` that carry none."""
    if not mapping:
        return
    for path, layer in layer_paths(model):
        if path in mapping and get_clip_group(layer) is None:
            group, threshold = mapping[path]
            set_clip_group(layer, group, threshold)


def _walk(model):
    """`(path, layer, group meta in effect)` for each layer, parents first."""
    path_of = dict((id(layer), path) for path, layer in layer_paths(model))
    result = []
    seen = set()

    def visit(layer, meta):
        if id(layer) in seen:
            return
        seen.add(id(layer))
        own = get_clip_group(layer)
        if own is not None:
            meta = own
        result.append((path_of.get(id(layer), layer.name), layer, meta))
        for child in _children(layer):
            visit(child, meta)

    visit(model, None)
    return result


class GroupAssignment:
    """Which group each trainable variable belongs to.

    Attributes:
        names: the `K` group names.
        variable_groups: per variable, an int (the group of the whole
            variable) or `(first, axis, shards)`: shard `j` of the
            variable along `axis` (of `shards` equal pieces) belongs to
            group `first + j`.
        thresholds: `{group: threshold}` given on layers.
    """

    def __init__(self, names, variable_groups, thresholds=None):
        self.names = list(names)
        self.variable_groups = list(variable_groups)
        self.thresholds = dict(thresholds or {})

    @property
    def num_groups(self):
        return len(self.names)

    def partitions(self):
        """Per variable: None or `(axis, shards)`."""
        return [
            None if isinstance(g, int) else (g[1], g[2]) for g in self.variable_groups
        ]


def has_layer_groups(model):
    return any(get_clip_group(layer) for _, layer in layer_paths(model))


def resolve_groups(mode, variables, model=None, distribution=None):
    """Maps each of `variables` to a group.

    Args:
        mode: one of `CLIP_GROUP_MODES`, or None (`"layers"` when a layer of
            `model` carries a group, else `"flat"`).
        variables: the trainable variables, in the order in which the
            optimizer receives their norms.
        model: the model owning them (needed by `"layers"`, `"per_layer"`).
        distribution: the `keras.distribution` in effect (`"per_device"`).

    Returns:
        A `GroupAssignment`.
    """
    variables = list(variables)
    if mode is None:
        mode = "layers" if model is not None and has_layer_groups(model) else "flat"
    if mode == "flat":
        return GroupAssignment(["all"], [0] * len(variables))
    if mode == "per_variable":
        names = _unique([v.path for v in variables])
        return GroupAssignment(names, list(range(len(variables))))
    if mode == "per_device":
        return _device_groups(variables, distribution)
    if model is None:
        raise ValueError(
            f"clip_groups={mode!r} needs the model whose layers define the "
            "groups. Train with model.fit (it gives the model to the "
            "optimizer), or call optimizer.bind_clip_groups(model) first."
        )
    owners = {}  # id(variable) -> (layer path, inherited group meta)
    for path, layer, meta in _walk(model):
        for v in keras_compat.own_variables(layer):
            owners.setdefault(id(v), (path, meta))
    missing = [v.path for v in variables if id(v) not in owners]
    if missing:
        raise ValueError(
            "keras_dp could not find the layers that own these trainable "
            f"variables: {missing}. Use clip_groups='per_variable' or "
            "'flat' for this model."
        )
    names, index, groups, thresholds = [], {}, [], {}
    for v in variables:
        path, meta = owners[id(v)]
        if mode == "per_layer":
            name = path or model.name
        elif mode == "layers":
            name = meta[0] if meta else DEFAULT_GROUP
            threshold = meta[1] if meta else None
            if threshold is not None:
                if thresholds.get(name, threshold) != threshold:
                    raise ValueError(
                        f"Clipping group {name!r} was given two thresholds: "
                        f"{thresholds[name]} and {threshold}. Give each "
                        "group one threshold."
                    )
                thresholds[name] = threshold
        else:
            raise ValueError(
                f"Unknown clip_groups mode {mode!r}. Use one of "
                f"{', '.join(repr(m) for m in CLIP_GROUP_MODES)}."
            )
        if name not in index:
            index[name] = len(names)
            names.append(name)
        groups.append(index[name])
    return GroupAssignment(names, groups, thresholds)


def _unique(names):
    seen, result = {}, []
    for name in names:
        count = seen.get(name, 0)
        seen[name] = count + 1
        result.append(f"{name}#{count}" if count else name)
    return result


def _device_groups(variables, distribution):
    """Per-device groups: one per shard of the model axis (+ replicated)."""
    from keras.distribution import ModelParallel

    if distribution is None or not isinstance(distribution, ModelParallel):
        # No distribution or data parallelism: each device holds a replica.
        return GroupAssignment(["device"], [0] * len(variables))
    mesh = distribution.device_mesh
    sizes = dict(zip(mesh.axis_names, mesh.shape))
    batch_axis = distribution.batch_dim_name
    specs = []
    model_axes = set()
    for v in variables:
        layout = distribution.get_variable_layout(v)
        axes = getattr(layout, "axes", None) or ()
        sharded = []
        for axis, names in enumerate(axes):
            if names is None:
                continue
            names = names if isinstance(names, (tuple, list)) else (names,)
            for name in names:
                if name != batch_axis and sizes.get(name, 1) > 1:
                    sharded.append((axis, name))
        if len(sharded) > 1:
            raise NotImplementedError(
                f"Variable {v.path} is sharded along several mesh axes "
                f"({sharded}); clip_groups='per_device' supports variables "
                "sharded along one axis of one mesh dimension."
            )
        specs.append(sharded[0] if sharded else None)
        if sharded:
            model_axes.add(sharded[0][1])
    if len(model_axes) > 1:
        raise NotImplementedError(
            "clip_groups='per_device' supports variables sharded along one "
            f"mesh axis; this layout uses {sorted(model_axes)}."
        )
    if not model_axes:
        return GroupAssignment(["device"], [0] * len(variables))
    (axis_name,) = model_axes
    shards = sizes[axis_name]
    names = [f"{axis_name}:{j}" for j in range(shards)]
    groups = []
    replicated = None
    for v, spec in zip(variables, specs):
        if spec is None:
            if replicated is None:
                replicated = len(names)
                names.append(REPLICATED_GROUP)
            groups.append(replicated)
        else:
            axis, _ = spec
            if v.shape[axis] % shards:
                raise ValueError(
                    f"Variable {v.path} of shape {v.shape} cannot be split "
                    f"in {shards} equal shards along axis {axis}."
                )
            groups.append((0, axis, shards))
    return GroupAssignment(names, groups)


def _copy_groups(source, target):
    if target is source or not isinstance(target, keras.layers.Layer):
        return
    meta = get_clip_group(source)
    if meta is not None and get_clip_group(target) is None:
        set_clip_group(target, *meta)
    if isinstance(source, keras.Model) and isinstance(target, keras.Model):
        # A nested model cloned as one layer: copy its layers' groups by path.
        apply_layer_groups(target, collect_layer_groups(source))


keras_compat.add_clone_hook(_copy_groups)
