"""Per-example rules: how the fast path gets one layer's per-example gradients.

The fast path (`keras_dp.per_example.batched_pass`) runs the model once on
the whole batch and hands every layer that owns trainable variables to a
*rule*: a function that, from the layer's recorded call arguments and the
gradients of the per-example losses at its output, gives each trainable
variable's per-example squared gradient norms `(n,)` and a function for the
clipped sum `sum_i c_i g_i` of its per-example gradients `g_i`. keras_dp
registers its own rules (Dense, EinsumDense, Dense with LoRA, Conv1D/2D/3D,
Embedding, ReversibleEmbedding, keras-hub's PositionEmbedding,
Layer/Group/RMS normalization, recurrent layers and TimeDistributed as a
whole, and a generic rule for every other layer) through the same function
as a user's rule: `keras_dp.register_per_example_rule`.

Writing a rule
--------------

A rule is called as `rule(layer, call, grads, context)`:

- `call`: the layer's call in the batched pass (`call.args`,
  `call.kwargs`, `call.inputs` the first argument), leading axis the
  examples;
- `grads`: the gradient of `sum_i L_i` at the layer's output (same
  structure as the output, None at non-float leaves), or, for a rule
  registered with `taps="pre_activation"`, at the output before the
  layer's `activation`. Rows are examples: row `i` holds example `i`'s
  own output gradient, because examples do not interact in the forward
  pass.
- `context`: a `RuleContext` (`context.variables`, the trainable variables
  the rule must cover; `context.value_of(variable)`, a variable's value in
  this step; `context.backend_ops`, `context.rows_hint`, `context.saved`).

It returns one `(variable, squared_norms, clipped_sum)` triple for each
variable of `context.variables`: `squared_norms` a float32 `(n,)` tensor
(each example's squared gradient norm), `clipped_sum(factors, safe)` a
function giving `sum_i factors_i g_i` in the variable's shape from float32
factors `(n,)`. With `safe=True` the sum must leave out, exactly, the rows
whose factor is 0 even where their tensors are infinite or NaN (select,
never multiply by 0: `0 * inf` is NaN); `instantiated_terms`, `rows_dot`,
`scaled_rows` and `kept_rows` (in `keras_dp.per_example`) do this.

A layer computing `w * x + b` elementwise (per-example gradients `dy * x`
and `dy`):

```python
import keras
from keras import ops
import keras_dp
from keras_dp.per_example import instantiated_terms


class Scale(keras.layers.Layer):
    def build(self, input_shape):
        self.w = self.add_weight(shape=input_shape[-1:], initializer="ones")
        self.b = self.add_weight(shape=input_shape[-1:], initializer="zeros")

    def call(self, x):
        return x * self.w + self.b


def scale_rule(layer, call, grads, context):
    # Inputs (n, d): each example's gradients are its rows.
    x = ops.cast(call.inputs, "float32")
    dy = ops.cast(grads, "float32")
    return [
        instantiated_terms(layer.w, dy * x),
        instantiated_terms(layer.b, dy),
    ]


keras_dp.register_per_example_rule(Scale, scale_rule)
```

A rule that needs more than the layer's inputs (LayerNormalization keeps
its normalized input) may pass `forward=`, a function that runs in place of
the layer's `call` in the batched pass and stores tensors in
`context.saved`. A rule may raise `keras_dp.per_example.Unsupported` (e.g.
for a call form it does not model): the step then takes the general vmap
path, with a warning that gives the message.

Where a batch's rows come in privacy units of several rows (augmentation
multiplicity: `make_private(augment=..., augmentations=K)`), a rule must
give each unit's squared norms and take each unit's factors. A rule
registered with `units="positions"` gets each unit's rows as one more
position axis, which suits rules that sum their per-example products
over every axis between the first and the last (keras_dp's Dense and
Embedding rules; `scale_rule` above would need that sum); see
`register_per_example_rule(units=...)` and `keras_dp.per_example.units`.
Without `units`, such steps take the vmap path.

Which rule a layer gets: the classes of `type(layer).__mro__` are tried in
order, most specific first, and for each class its rules (a user's before
keras_dp's; among a user's, the latest first); the first whose `match` and
`applies` accept the layer is taken. keras_dp's generic rule is registered
for `keras.layers.Layer`, so a layer with weights that no other rule
accepts gets it. With the default `match="same_call"`, a rule for `Dense`
is not used for a subclass of `Dense` that overrides `call` (it may compute
something else with the same kernel); register a rule for the subclass, or
pass `match="subclasses"` when every subclass keeps the computation.
"""

import contextlib
import inspect
import re
import sys

import keras

MATCHES = ("same_call", "subclasses", "exact")
TAPS = ("output", "pre_activation")
UNITS = (None, "positions", "context")


class Unsupported(Exception):
    """The fast path does not handle this model; use the vmap path.

    Raised by keras_dp's plan and rules, and by a user's rule that does not
    model a layer's call: the step then takes the vmap path, with this
    message as the reason.
    """

    @property
    def reason(self):
        """The message alone: raised inside a layer's call, Keras adds the
        layer's arguments and terminal bold codes around it."""
        text = str(self)
        match = re.search(r"\x1b\[1m(.*?)\x1b\[0m", text, re.DOTALL)
        return (match.group(1) if match else text).strip()


class PerExampleRule:
    """One registration of `register_per_example_rule` (see there)."""

    def __init__(
        self,
        layer_class,
        fn,
        name,
        match,
        taps,
        whole,
        applies,
        check_layer,
        check_call,
        forward,
        builtin,
        units=None,
    ):
        self.layer_class = layer_class
        self.fn = fn
        self.name = name
        self.match = match
        self.taps = taps
        self.whole = whole
        self.applies = applies
        self.check_layer = check_layer
        self.check_call = check_call
        self.forward = forward
        self.builtin = builtin
        self.units = units

    def accepts(self, layer):
        """Whether this rule handles `layer` (an instance of its class)."""
        layer_type = type(layer)
        if self.match == "exact" and layer_type is not self.layer_class:
            return False
        if self.match == "same_call" and (layer_type.call is not self.layer_class.call):
            return False
        return self.applies is None or bool(self.applies(layer))

    def __repr__(self):
        return (
            f"PerExampleRule({self.name!r} for {self.layer_class.__name__}, "
            f"match={self.match!r}, taps={self.taps!r}, whole={self.whole}, "
            f"units={self.units!r})"
        )


class RecordedCall:
    """A layer's call in the batched pass: `args`, `kwargs` as given to its
    `call`, each tensor with the examples as its leading axis."""

    def __init__(self, args, kwargs):
        self.args = tuple(args)
        self.kwargs = dict(kwargs)

    @property
    def inputs(self):
        """The first argument of the call (`inputs=` when passed by name)."""
        return self.args[0] if self.args else self.kwargs["inputs"]


class RuleContext:
    """What a rule gets besides the layer's call and output gradients.

    Attributes:
        layer: the layer.
        variables: the layer's trainable variables that the model trains,
            in `layer.trainable_variables` order: the rule returns one
            triple for each.
        backend_ops: the backend module (`keras_dp.backend`), for rules
            that use a backend's own kernels (`after`, conv kernels).
        rows_hint: the batch size expected where the tensors' leading axis
            is not static (TensorFlow traces with an unknown one), or None;
            only to bound the memory of work done in chunks of examples.
        saved: the tensors the rule's `forward` stored in the pass ({}
            without one).
        rows_per_unit: rows of the batch per privacy unit (1 unless the
            rows come in units, `keras_dp.per_example.units`). A rule
            registered with `units="context"` returns each unit's squared
            norms `(U,)` and clipped sums for factors `(U,)` from the rows'
            tensors `(U * R, ...)` (`unit_positions`, `unit_sums`).
        carriers: the step's low-rank carriers (`keras_dp.LowRankSparse`;
            a `keras_dp.per_example.carriers.KernelCarriers`), or None. A
            rule for a linear layer gets its kernel's terms through
            `keras_dp.per_example.carriers.kernel_terms`, which projects
            where the kernel has carriers (`carrier_of`).
        partitions: `{id(variable): (axis, shards)}` for the variables
            that per-device clipping groups (`clip_groups="per_device"`)
            clip shard by shard (`partition_of`). For such a variable the
            rule returns squared norms `(n, shards)` and a clipped sum for
            factors `(n, shards)`; the triples of `instantiated_terms` are
            split by the batched pass itself, and a rule that gives one
            norm per variable sends the step to the vmap path.
    """

    def __init__(
        self,
        layer,
        variables,
        backend_ops,
        rows_hint,
        saved,
        values,
        rows_per_unit=1,
        carriers=None,
        partitions=None,
    ):
        self.layer = layer
        self.variables = list(variables)
        self.backend_ops = backend_ops
        self.rows_hint = rows_hint
        self.saved = saved
        self.rows_per_unit = rows_per_unit
        self.carriers = carriers
        self.partitions = partitions or {}
        self._values = values

    def carrier_of(self, variable):
        """The low-rank carrier of `variable` in this step, or None."""
        return None if self.carriers is None else self.carriers.of(variable)

    def partition_of(self, variable):
        """`(axis, shards)` where `variable` is clipped per device shard in
        this step, else None."""
        return self.partitions.get(id(variable))

    def value_of(self, variable, *default):
        """The value of the model's `variable` (trainable or not) in this
        step: what the layer's call read in the batched pass. Raises
        `KeyError` for a variable that is not the model's, unless a
        default is given."""
        value = self._values.get(id(variable), _MISSING)
        if value is not _MISSING:
            return value
        if default:
            return default[0]
        raise KeyError(
            f"variable {getattr(variable, 'path', variable)!r} is not a "
            "variable of the model being trained"
        )


_MISSING = object()

# Layer class -> its rules, in the order they are tried.
_RULES = {}
# (module name, function registering rules for that module's classes) for
# libraries imported only when the user imports them (keras_hub).
_PENDING = []
_BUILTIN = [False]


@contextlib.contextmanager
def builtin_registrations():
    """Registrations inside are keras_dp's own: tried after a user's rules
    for the same class, whatever the order of registration."""
    previous = _BUILTIN[0]
    _BUILTIN[0] = True
    try:
        yield
    finally:
        _BUILTIN[0] = previous


def register_when_imported(module_name, register):
    """Calls `register()` once `module_name` has been imported by someone
    (keras_dp does not import optional libraries such as keras_hub)."""
    _PENDING.append((module_name, register, _BUILTIN[0]))


def _register_pending():
    for item in list(_PENDING):
        module_name, register, builtin = item
        if module_name in sys.modules:
            _PENDING.remove(item)
            previous = _BUILTIN[0]
            _BUILTIN[0] = builtin
            try:
                register()
            finally:
                _BUILTIN[0] = previous


def register_per_example_rule(
    layer_class,
    rule,
    *,
    name=None,
    match="same_call",
    taps="output",
    applies=None,
    forward=None,
    check_call=None,
    whole=False,
    check_layer=None,
    units=None,
):
    """Registers how the fast per-example path handles a layer class.

    See the docstring of `keras_dp.per_example.registry` for what a rule
    computes and an example.

    Args:
        layer_class: a Keras layer class (a subclass of
            `keras.layers.Layer`).
        rule: `rule(layer, call, grads, context)` returning one
            `(variable, squared_norms, clipped_sum)` triple per variable
            of `context.variables`.
        name: the rule's name in plans and messages (default: the
            function's name).
        match: which layers of `layer_class` the rule is for:
            "same_call" (default): the class and its subclasses that do
            not override `call`; "subclasses": every subclass; "exact": the
            class itself only.
        taps: "output" (default): `grads` are the gradients at the layer's
            output; "pre_activation": at the output before the layer's
            `activation` attribute (which the layer's call must apply
            exactly once), a single tensor.
        applies: optional `applies(layer) -> bool`; where it is False the
            rule is skipped and the next one tried (base classes' rules,
            ending at the generic rule).
        forward: optional `forward(layer, call, args, kwargs, saved)`
            run in the batched pass instead of `call(*args, **kwargs)` (the
            layer's own bound call) and returning the same outputs; it may
            store tensors the rule needs in the dict `saved`
            (`context.saved` in the rule).
        check_call: optional `check_call(layer, args, kwargs)`, run at
            each call in the batched pass; raises `Unsupported` for call
            forms the rule does not model.
        whole: True for a layer handled as a whole with its sublayers (the
            rule covers their variables too; they get no rule of their
            own), such as recurrent layers, whose cell runs once per time
            step.
        check_layer: optional `check_layer(layer)`, run once a layer is
            known to get this rule; raises `Unsupported` for layers the
            rule cannot handle at all (the step then takes the vmap path).
        units: how the rule handles privacy units of several rows
            (`rows_per_unit > 1`, e.g. augmentation multiplicity; see
            `keras_dp.per_example.units`). None (default): it does not, and
            such steps take the vmap path. "positions": the pass hands the
            rule each unit's rows on a new axis after the units' axis,
            `(U, R, ...)`, in the call's tensors and in `grads`; for rules
            that treat every axis between the first and the last as
            positions (Dense, Embedding). "context": the rule gets the
            rows' tensors and folds them itself by
            `context.rows_per_unit`.

    Returns:
        `rule`, unchanged.

    A rule registered by a user for a class is tried before keras_dp's rules
    for the same class, so it replaces them.
    """
    if not isinstance(layer_class, type):
        raise TypeError(
            "register_per_example_rule: `layer_class` must be a Keras layer "
            "class (pass `MyLayer`, not an instance `MyLayer()` or a name). "
            f"Received: {layer_class!r}."
        )
    if not issubclass(layer_class, keras.layers.Layer):
        raise TypeError(
            "register_per_example_rule: `layer_class` must be a subclass of "
            f"`keras.layers.Layer`. Received: {layer_class.__name__}."
        )
    if not callable(rule):
        raise TypeError(
            "register_per_example_rule: `rule` must be a function "
            "`rule(layer, call, grads, context)` returning one (variable, "
            "squared_norms, clipped_sum) triple per variable. Received: "
            f"{rule!r}."
        )
    _check_signature(rule)
    if match not in MATCHES:
        raise ValueError(
            f"register_per_example_rule: `match` must be one of {MATCHES}. "
            f"Received: {match!r}."
        )
    if taps not in TAPS:
        raise ValueError(
            f"register_per_example_rule: `taps` must be one of {TAPS}. "
            f"Received: {taps!r}."
        )
    if units not in UNITS:
        raise ValueError(
            f"register_per_example_rule: `units` must be one of {UNITS}. "
            f"Received: {units!r}."
        )
    if whole and taps != "output":
        raise ValueError(
            "register_per_example_rule: a rule with `whole=True` gets the "
            "gradients at the layer's output; pass taps='output'."
        )
    for option, value in (
        ("applies", applies),
        ("forward", forward),
        ("check_call", check_call),
        ("check_layer", check_layer),
    ):
        if value is not None and not callable(value):
            raise TypeError(
                f"register_per_example_rule: `{option}` must be a function "
                f"or None. Received: {value!r}."
            )
    if name is None:
        name = getattr(rule, "__name__", type(rule).__name__)
    entry = PerExampleRule(
        layer_class,
        rule,
        str(name),
        match,
        taps,
        bool(whole),
        applies,
        check_layer,
        check_call,
        forward,
        builtin=_BUILTIN[0],
        units=units,
    )
    rules = _RULES.setdefault(layer_class, [])
    if entry.builtin:
        rules.append(entry)
    else:
        rules.insert(0, entry)
    return rule


def _check_signature(rule):
    try:
        signature = inspect.signature(rule)
    except (TypeError, ValueError):
        return  # builtins and the like: nothing to check
    try:
        signature.bind(None, None, None, None)
    except TypeError:
        raise TypeError(
            "register_per_example_rule: `rule` must accept four arguments, "
            f"`rule(layer, call, grads, context)`. {rule!r} has the "
            f"signature {signature}."
        ) from None


def remove_per_example_rule(layer_class, rule):
    """Removes the registrations of `rule` for `layer_class` (e.g. a test's
    temporary rule). Raises `ValueError` if there is none."""
    rules = _RULES.get(layer_class, [])
    kept = [r for r in rules if r.fn is not rule]
    if len(kept) == len(rules):
        raise ValueError(
            f"remove_per_example_rule: {rule!r} is not registered for "
            f"{getattr(layer_class, '__name__', layer_class)!r}."
        )
    _RULES[layer_class] = kept


def rule_for(layer):
    """The rule that handles `layer`, or None (not a Keras layer)."""
    _register_pending()
    for cls in type(layer).__mro__:
        for rule in _RULES.get(cls, ()):
            if rule.accepts(layer):
                return rule
    return None


def not_quantized(layer):
    """Whether `layer` is not quantized (int8, float8, ...): a quantized
    layer computes with other weights than its float variables."""
    try:
        return layer.quantization_mode is None
    except AttributeError:
        return True


def uses_plain_weights(layer):
    """Whether `layer` computes with its float variables as they are: not
    quantized and without LoRA adapters (`enable_lora`). keras_dp's rules
    for stock layers apply only then (an `applies` predicate)."""
    return not_quantized(layer) and not getattr(layer, "lora_enabled", False)


def rules_for_class(layer_class):
    """The rules registered for exactly `layer_class`, in the order they
    are tried."""
    _register_pending()
    return list(_RULES.get(layer_class, ()))
