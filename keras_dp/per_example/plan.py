"""Which layers the fast path handles, and by which rule.

The model must satisfy (checked; otherwise `Unsupported` is raised and the
caller falls back to the general vmap path):
- every trainable variable belongs to exactly one leaf layer (a layer with
  no weighted sublayers) or to one layer handled whole (recurrent layers,
  TimeDistributed), and the model itself owns none;
- each such layer is called at most once per step (no shared layers);
- no activity regularizers or `add_loss` inside `call` (per-example losses
  that a batched pass cannot separate);
- layers handled by the generic rule (a per-example vector-Jacobian
  product) have no random state of their own;
- no call form that a layer's rule refuses (a ReversibleEmbedding called
  with `reverse=True`, a keras-hub PositionEmbedding with an offset or
  explicit positions).
Assumed, not checkable: a layer's weights are only used inside its own
`call` (a layer reading another layer's kernel would get a wrong norm).
"""

# keras_dp's own rules register themselves when imported.
from keras_dp import keras_compat
from keras_dp.per_example import conv  # noqa: F401
from keras_dp.per_example import dense  # noqa: F401
from keras_dp.per_example import embedding  # noqa: F401
from keras_dp.per_example import generic  # noqa: F401
from keras_dp.per_example import normalization  # noqa: F401
from keras_dp.per_example.registry import Unsupported
from keras_dp.per_example.registry import rule_for


class PlanEntry:
    """A layer of the plan and its rule."""

    def __init__(self, index, layer, rule, variables, positions):
        self.index = index
        self.layer = layer
        self.rule = rule
        # The layer's trainable variables that the model trains, in
        # `layer.trainable_variables` order, and their positions in the
        # model's `trainable_variables`.
        self.variables = variables
        self.positions = positions

    @property
    def kind(self):
        """The rule's name ("dense", "conv", "generic", ...)."""
        return self.rule.name

    @property
    def tap_pre_activation(self):
        return self.rule.taps == "pre_activation"

    def __repr__(self):
        return f"PlanEntry({self.layer.name!r}, {self.kind!r})"


def own_trainable(layer):
    """The trainable variables that `layer` itself creates (not its
    sublayers'), in `layer.trainable_variables` order."""
    own = {id(v) for v in keras_compat.own_variables(layer)}
    return [v for v in layer.trainable_variables if id(v) in own]


def build_plan(model):
    """Layers that own the model's trainable variables, with their rules.

    Raises `Unsupported` when the model breaks an assumption of the fast
    path (see the module docstring).
    """
    variables = model.trainable_variables
    positions = {id(v): k for k, v in enumerate(variables)}
    if own_trainable(model):
        raise Unsupported("the model itself owns trainable variables")
    covered = set()
    entries = []
    inside_whole = set()
    for layer in keras_compat.flatten_layers(model, include_self=False):
        if id(layer) in inside_whole:
            continue
        if getattr(layer, "activity_regularizer", None) is not None:
            raise Unsupported(f"layer {layer.name!r} has an activity regularizer")
        rule = rule_for(layer)
        if rule is not None and rule.whole:
            for sub in keras_compat.flatten_layers(layer, include_self=False):
                inside_whole.add(id(sub))
            own = [v for v in layer.trainable_variables if id(v) in positions]
        else:
            own = [v for v in own_trainable(layer) if id(v) in positions]
        if not own:
            continue
        if rule is None:
            raise Unsupported(
                f"layer {layer.name!r} ({type(layer).__name__}) has no per-example rule"
            )
        if not rule.whole:
            for sub in keras_compat.flatten_layers(layer, include_self=False):
                if sub.trainable_variables:
                    raise Unsupported(
                        f"layer {layer.name!r} owns weights and has "
                        "sublayers with weights"
                    )
        if rule.taps == "pre_activation" and not hasattr(layer, "activation"):
            raise Unsupported(
                f"layer {layer.name!r}: its rule {rule.name!r} taps the "
                "output before the activation, but the layer has no "
                "`activation` attribute"
            )
        if rule.check_layer is not None:
            rule.check_layer(layer)
        for v in own:
            if id(v) in covered:
                raise Unsupported(f"variable {v.path!r} is shared by layers")
            covered.add(id(v))
        entries.append(
            PlanEntry(len(entries), layer, rule, own, [positions[id(v)] for v in own])
        )
    if covered != set(positions):
        missing = [v.path for v in variables if id(v) not in covered]
        raise Unsupported(f"trainable variables not owned by a leaf layer: {missing}")
    return entries
