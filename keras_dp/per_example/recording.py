"""Recording the layers' calls in the batched pass.

Every layer of the plan is intercepted for the duration of the pass: its
`call` is wrapped on the instance to record its arguments, and a "tap"
marks the tensor whose gradient the layer's rule needs (the output before
the activation for rules registered with `taps="pre_activation"`, Dense,
EinsumDense and Conv; the output of any other layer).
"""

from keras import tree

from keras_dp import keras_compat
from keras_dp.per_example.registry import Unsupported
from keras_dp.per_example.rows import is_float_tensor


class Record:
    """What the pass recorded of one layer's call."""

    def __init__(self):
        self.count = 0
        self.order = None  # position among the layers' calls in the pass
        self.args = None  # (args, kwargs) as given to `call`
        self.tapped = False
        # (output leaf index, tap key) of each tapped tensor.
        self.tap_keys = []
        # The output's structure, its leaves numbered (output taps only).
        self.output_structure = None
        # Intermediates the rule's `forward` kept (normalized inputs).
        self.saved = {}


class Recorder:
    """Wraps `call` (and `activation`) of each entry's layer on the instance.

    `tap(index, key, z)` returns the tensor to use in place of `z`, the
    output of the entry with that index (JAX adds a zero probe,
    TensorFlow watches `z`, PyTorch keeps `z`: see `batched_pass`).
    """

    def __init__(self, entries, tap):
        self.entries = entries
        self.tap = tap
        self.records = [Record() for _ in entries]
        self.calls = 0
        self._saved = []

    def __enter__(self):
        try:
            for entry in self.entries:
                self._install(entry)
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc):
        self._restore()
        return False

    def _install(self, entry):
        layer = entry.layer
        rule = entry.rule
        record = self.records[entry.index]
        original_call = layer.call
        tap = self.tap
        recorder = self

        def wrapped_call(*args, **kwargs):
            record.count += 1
            if record.count > 1:
                raise Unsupported(
                    f"layer {layer.name!r} is called more than once per step "
                    "(shared weights)"
                )
            if rule.check_call is not None:
                rule.check_call(layer, args, kwargs)
            record.args = (args, kwargs)
            record.order = recorder.calls
            recorder.calls += 1
            if rule.forward is not None:
                outputs = rule.forward(layer, original_call, args, kwargs, record.saved)
            else:
                outputs = original_call(*args, **kwargs)
            if entry.tap_pre_activation:
                if not record.tapped:
                    raise Unsupported(
                        f"layer {layer.name!r} did not apply its activation"
                    )
                return outputs
            leaves = tree.flatten(outputs)
            record.output_structure = tree.pack_sequence_as(
                outputs, list(range(len(leaves)))
            )
            new_leaves = []
            for j, leaf in enumerate(leaves):
                if is_float_tensor(leaf):
                    key = f"{entry.index}_{j}"
                    record.tap_keys.append((j, key))
                    mask = keras_compat.keras_mask(leaf)
                    leaf = tap(entry.index, key, leaf)
                    if mask is not None:
                        keras_compat.set_keras_mask(leaf, mask)
                new_leaves.append(leaf)
            return tree.pack_sequence_as(outputs, new_leaves)

        self._saved.append(
            (
                layer,
                "call",
                keras_compat.override_attribute(layer, "call", wrapped_call),
            )
        )
        if entry.tap_pre_activation:
            original_activation = layer.activation

            def activation(z):
                if record.tapped:
                    raise Unsupported(
                        f"layer {layer.name!r} applied its activation twice"
                    )
                record.tapped = True
                key = f"{entry.index}_z"
                record.tap_keys.append((0, key))
                z = tap(entry.index, key, z)
                if original_activation is None:
                    return z
                return original_activation(z)

            self._saved.append(
                (
                    layer,
                    "activation",
                    keras_compat.override_attribute(layer, "activation", activation),
                )
            )

    def _restore(self):
        while self._saved:
            layer, name, saved = self._saved.pop()
            keras_compat.restore_attribute(layer, name, saved)


def rule_grads(entry, record, own_grads):
    """The `grads` argument of the entry's rule from the gradients at its
    taps (keyed like `record.tap_keys`): the one tensor before the
    activation, or the output's structure with the gradients at its
    float leaves and None elsewhere."""
    if entry.tap_pre_activation:
        return own_grads[f"{entry.index}_z"]
    leaves = [None] * len(tree.flatten(record.output_structure))
    for j, key in record.tap_keys:
        leaves[j] = own_grads[key]
    return tree.pack_sequence_as(record.output_structure, leaves)
