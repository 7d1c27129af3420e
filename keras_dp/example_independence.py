"""Refuses models in which examples are not independent.

Per-example clipping bounds one example's influence on an update only if no
other example's output depends on it, and the released model must hold
nothing computed from the data outside the noisy update. Layers that mix
examples in training mode (a normalization over axis 0, a `Lambda` that
centres over the batch, attention across the batch...) break the first;
layers that write data-dependent non-trainable state in `call` (running
statistics, `stateful=True` RNNs) break the second.

`check_examples_independent` probes the user's real layers once, before the
first private step: two training-mode `stateless_call`s (no variable or
seed state changes; jitted on JAX) on batches A and B of up to 4 rows that
share row 0 and differ in all other rows. If row 0 of the output changes,
the two passes are re-run eagerly with every layer's and functional-graph
operation's `call` recorded; the culprit is the first call to complete whose
inputs agree in row 0 while its output does not (a leaf layer, or a
container whose own code mixes), else the model's own `call`. A
non-trainable variable (seed states excepted) whose new value differs
between A and B, or between A and a batch differing in every row (a third
pass, only when a variable was written), holds training data; writes that
do not depend on the data (a call counter) are allowed.

```python
from keras_dp.example_independence import check_examples_independent

check_examples_independent(model, x_train[:4])  # raises ValueError
```
"""

import warnings

import keras
import numpy as np
from keras import ops
from keras import tree

from keras_dp import backend as backend_lib
from keras_dp import checks
from keras_dp import keras_compat

# Rows the check looks at.
CHECK_ROWS = 4
_PER_EXAMPLE = "per example (over feature axes, never over axis 0, the batch axis)"


def check_examples_independent(model, x, y=None, sample_weight=None):
    """Raises ValueError if `model` mixes examples or stores their data.

    Args:
        model: a `keras.Model`; built here (inference call) if it is not.
        x: a few real examples (arrays, backend tensors, or lists/dicts of
            them; first axis = examples; one row is enough). Only the first
            4 rows are used.
        y, sample_weight: accepted so that a training batch can be passed
            as is; keras_dp evaluates the loss per example, so only the
            model's `call` is probed.
    """
    del y, sample_weight
    checks.check_no_example_mixing_layers(model)
    for layer in keras_compat.flatten_layers(model, include_self=True):
        if getattr(layer, "stateful", False) is True:
            raise ValueError(
                f"Layer {layer.name!r} ({type(layer).__name__}) is stateful "
                "(stateful=True): it carries states computed from one "
                "batch's examples into the next batch and into the saved "
                "model, without noise. Use stateful=False (the default) for "
                "private training."
            )
    n = CHECK_ROWS
    try:
        for tensor in tree.flatten(model.inputs or []):
            if tensor.shape and isinstance(tensor.shape[0], int):
                n = tensor.shape[0]  # the model has a fixed batch size
    except Exception:  # subclassed or unbuilt: no symbolic inputs
        pass
    rows = tree.map_structure(lambda a: np.atleast_1d(_numpy(a))[:CHECK_ROWS], x)
    if n < 2 or any(len(a) == 0 for a in tree.flatten(rows)):
        return
    rng = np.random.default_rng(0)
    batch_a = _batch(rows, n)
    batch_b = _changed(batch_a, rng, first=1)
    if not model.built:
        model(_tensors(batch_a), training=False)

    trainable = [ops.convert_to_tensor(v.value) for v in model.trainable_variables]
    before = [ops.convert_to_tensor(v.value) for v in model.non_trainable_variables]
    kwargs = {"training": True} if keras_compat.call_has_training_arg(model) else {}

    def forward(trainable, non_trainable, batch):
        return model.stateless_call(trainable, non_trainable, batch, **kwargs)

    compiled = forward
    if keras.backend.backend() == "jax":  # eager JAX compiles op by op
        import jax

        compiled = jax.jit(forward)

    def run(batch, call=compiled):
        # Random layers must draw from their seed states to make the two
        # calls comparable (not so for PyTorch's unseeded dropout).
        with backend_lib.get_backend_module().seeded_random_ops():
            outputs, after = call(trainable, before, _tensors(batch))
        return _snapshot(outputs, n), [_numpy(v) for v in after]

    out_a, state_a = run(batch_a)
    out_b, state_b = run(batch_b)
    if _differs(out_a, out_b):
        if _differs(out_a, run(batch_a)[0]):
            warnings.warn(
                "keras_dp could not check that examples are independent: the "
                f"training-mode output of model {model.name!r} is not "
                "reproducible (random ops not driven by a keras.random."
                "SeedGenerator?).",
                stacklevel=2,
            )
            return
        recorders = [_Recorder(_callables(model), n) for _ in range(2)]
        for recorder, batch in zip(recorders, (batch_a, batch_b)):
            with recorder:
                run(batch, call=forward)
        raise ValueError(_mixing_message(model, _culprit(*recorders)))

    seed_ids = {id(s) for s in keras_compat.seed_generator_states(model)}
    variables = model.non_trainable_variables
    written = [
        k
        for k, v in enumerate(variables)
        if id(v) not in seed_ids and not _same(_numpy(before[k]), state_a[k])
    ]
    suspects = [k for k in written if not _same(state_a[k], state_b[k])]
    if written and not suspects:
        _, state_c = run(_changed(batch_b, rng, first=0))
        suspects = [k for k in written if not _same(state_a[k], state_c[k])]
    if suspects:
        variable = variables[suspects[0]]
        layer = _owner(model, variable)
        raise ValueError(
            f"Layer {layer.name!r} ({type(layer).__name__}) writes the "
            f"non-trainable variable {variable.path!r} in its `call` during "
            "training, from the training examples (running statistics or "
            "the like). It is saved with the model without noise, so it "
            "would release training data that differential privacy does not "
            "cover. Compute such statistics outside private training (on "
            "public data, or with a separate private mechanism) or make them "
            "non-persistent (a local tensor, not a layer variable)."
        )


def _numpy(a):
    """`a` as a numpy array (raises for symbolic tensors)."""
    if hasattr(a, "numpy"):
        return np.asarray(keras.ops.convert_to_numpy(a))
    return np.asarray(a)


def _tensors(batch):
    return tree.map_structure(
        lambda a: ops.convert_to_tensor(a) if a.dtype.kind in "fiub" else a,
        batch,
    )


def _integral(a):
    return bool(np.all(np.isfinite(a)) and np.all(a == np.round(a)))


def _batch(rows, n):
    """`n` rows from the real ones, tiled (tiled float copies perturbed)."""

    def tile(a):
        m = len(a)
        out = np.concatenate([a] * (-(-n // m)))[:n].copy()
        if a.dtype.kind == "f":
            if a.dtype == "float64":
                out = out.astype(keras.backend.floatx())
            if not _integral(a):
                for k in range(m, n):
                    out[k] = out[k] * (1 + 0.5 * (k // m)) - 0.1 * (k // m)
        return out

    return tree.map_structure(tile, rows)


def _changed(batch, rng, first):
    """`batch` with rows `first:` replaced: rows rolled, floats moved,
    integer-valued inputs (token ids, masks) re-drawn from the values
    present where rolling left them unchanged."""

    def change(a):
        out = a.copy()
        rest = a[first:]
        out[first:] = np.roll(rest, -1, axis=0)
        floats = a.dtype.kind == "f"
        categorical = a.dtype.kind in "iub" or (floats and _integral(a))
        for k in range(first, len(a)):
            if categorical and np.array_equal(out[k], a[k]):
                out[k] = rng.choice(np.unique(a), size=a[k].shape)
            elif floats and not categorical:
                out[k] = out[k] * 1.7 + 0.3
        return out

    return tree.map_structure(change, batch)


def _callables(model):
    """Every layer and every functional-graph operation inside `model`."""
    targets = keras_compat.flatten_layers(model, include_self=False)
    seen = {id(t) for t in targets}
    for owner in [model] + targets:
        for op in getattr(owner, "operations", None) or []:
            if id(op) not in seen and hasattr(op, "call"):
                seen.add(id(op))
                targets.append(op)
    return targets


class _Recorder:
    """Wraps `call` of each target on the instance and records, per call in
    completion order, its key `(target index, k-th call)` and row 0 of its
    inputs and outputs (calls on symbolic tensors are not recorded)."""

    def __init__(self, targets, n):
        self.targets = targets
        self.n = n
        self.records = []
        self._saved = []

    def __enter__(self):
        try:
            for index, target in enumerate(self.targets):
                wrapped = self._wrap(index, target.call)
                saved = keras_compat.override_attribute(target, "call", wrapped)
                self._saved.append((target, saved))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        for target, saved in reversed(self._saved):
            keras_compat.restore_attribute(target, "call", saved)
        self._saved = []
        return False

    def _wrap(self, index, call):
        counts = [0]

        def wrapped(*args, **kwargs):
            outputs = call(*args, **kwargs)
            try:
                record = (
                    _snapshot((args, kwargs), self.n),
                    _snapshot(outputs, self.n),
                )
            except Exception:  # symbolic (shape inference): not recorded
                return outputs
            self.records.append(((index, counts[0]), record))
            counts[0] += 1
            return outputs

        return wrapped


def _snapshot(structure, n):
    """Row 0 of every array leaf with `n` rows, the whole leaf otherwise."""
    leaves = []
    for leaf in tree.flatten(structure):
        if isinstance(leaf, keras.KerasTensor):
            raise TypeError("symbolic")
        if isinstance(leaf, np.ndarray) or ops.is_tensor(leaf):
            leaves.append(_numpy(leaf))
    return [a[0] if a.ndim and len(a) == n else a for a in leaves]


def _is_float(dtype):
    return dtype.kind == "f" or "float" in dtype.name  # bfloat16 too


def _same(a, b):
    if a.shape != b.shape or _is_float(a.dtype) != _is_float(b.dtype):
        return False
    if _is_float(a.dtype):
        return np.array_equal(a.astype("float64"), b.astype("float64"), True)
    return np.array_equal(a, b)


def _differs(a, b):
    """Whether two arrays or lists of arrays differ beyond float rounding."""
    if isinstance(a, list):
        return len(a) != len(b) or any(_differs(u, v) for u, v in zip(a, b))
    if a.shape != b.shape or a.dtype != b.dtype or not _is_float(a.dtype):
        return not _same(a, b)
    rtol = 3e-2 if a.dtype.itemsize <= 2 else 1e-3
    a, b = a.astype("float64"), b.astype("float64")
    finite = np.isfinite(a) & np.isfinite(b)
    if not np.array_equal(a[~finite], b[~finite], equal_nan=True):
        return True  # a NaN or infinity in one only
    if not finite.any():
        return False
    a, b = a[finite], b[finite]
    scale = max(np.abs(a).max(), np.abs(b).max())
    return bool(np.abs(a - b).max() > rtol * scale + 1e-6)


def _culprit(recorder_a, recorder_b):
    calls_a = dict(recorder_a.records)
    for key, (inputs_b, outputs_b) in recorder_b.records:
        if key in calls_a:
            inputs_a, outputs_a = calls_a[key]
            if not _differs(inputs_a, inputs_b) and _differs(outputs_a, outputs_b):
                return recorder_a.targets[key[0]]
    return None


def _mixing_message(model, culprit):
    if culprit is None:
        what = f"The `call` of model {model.name!r} ({type(model).__name__})"
        hint = (
            "Compute every normalization, reduction, softmax or attention "
            f"in it {_PER_EXAMPLE}."
        )
    elif not isinstance(culprit, keras.layers.Layer):
        what = f"Operation {culprit.name!r} ({type(culprit).__name__})"
        hint = (
            f"It is a keras.ops call in the graph of model {model.name!r}; "
            f"make it compute {_PER_EXAMPLE}."
        )
    else:
        what = f"Layer {culprit.name!r} ({type(culprit).__name__})"
        hint = (
            "Rewrite its `call` so that every normalization, reduction, "
            f"softmax or attention is {_PER_EXAMPLE}, or remove it."
        )
        if isinstance(
            culprit,
            (
                keras.layers.LayerNormalization,
                keras.layers.GroupNormalization,
                keras.layers.UnitNormalization,
            ),
        ):
            hint = (
                "Normalize over the feature axis instead (e.g. axis=-1, the "
                "default of LayerNormalization), never over axis 0."
            )
        elif isinstance(culprit, keras.layers.Lambda):
            hint = (
                "Its function combines rows of the batch (e.g. a mean over "
                f"axis 0); make it compute {_PER_EXAMPLE}."
            )
    return (
        f"{what} mixes examples: in training mode, the output for example 0 "
        "changed when only the other examples of the batch changed, so one "
        "example's data moves the others' gradients and per-example "
        f"clipping cannot bound its influence on the update. {hint}"
    )


def _owner(model, variable):
    owner = model
    for layer in keras_compat.flatten_layers(model, include_self=True):
        if any(v is variable for v in layer.non_trainable_variables):
            owner = layer  # children come after their parents: deepest wins
    return owner
