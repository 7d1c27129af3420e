"""Augmentation multiplicity: K augmented copies of each example, one unit.

De et al. 2022 ("Unlocking high-accuracy differentially private image
classification through scale") average each example's gradient over K
augmented copies before clipping. The copies are made here, inside the
train step, as consecutive rows (`augmented_rows`); the engine then
clips units of K rows (`keras_dp.per_example.units`), so an example's
gradient is the mean of its copies' and the sensitivity stays that of one
example.

Each copy's `augment(x, seed)` call gets a `keras.random.SeedGenerator`
whose state is, for that call only, a seed of its own: the private
model's augmentation seed (drawn when `make_private` was called) with the
step number and the copy number folded in. So the copies differ from each
other and from step to step, on every backend (JAX's stateless step
included: the generator's variable is never assigned, the seed is handed
in through a `keras.StatelessScope`).
"""

import keras
from keras import ops
from keras import tree

from keras_dp.per_example.rows import mappable
from keras_dp.per_example.units import rows_of_units


def copy_seed(generator, step_number, copies, copy):
    """The seed state of copy `copy` of `copies` at step `step_number`:
    the generator's own state plus `step_number * copies + copy` in its
    counter word, different for every (step, copy). (The PyTorch backend
    seeds its generator with the sum of the two words, so both vary only
    in the second.)"""
    dtype = generator.state.dtype
    base = ops.convert_to_tensor(generator.state.value)
    counter = ops.cast(step_number, dtype) * copies + copy
    return base + ops.stack([ops.zeros((), dtype), ops.cast(counter, dtype)])


def augmented_rows(settings, x, y, sample_weight, step_number):
    """`(x, y, sample_weight)` of the batch with each example's
    `settings.augmentations` copies as consecutive rows (`(n * K, ...)`):
    `x` through `settings.augment` once per copy, `y` and `sample_weight`
    repeated.

    `step_number`: an integer scalar that differs from step to step (the
    optimizer's iteration count), folded into the copies' seeds.
    """
    copies = settings.augmentations
    generator = settings.augment_seed
    x = mappable(x)
    augmented = []
    for copy in range(copies):
        seed = copy_seed(generator, step_number, copies, copy)
        with keras.StatelessScope(state_mapping=[(generator.state, seed)]):
            augmented.append(_checked(x, settings.augment(x, generator)))
    rows = tree.map_structure(
        lambda *c: rows_of_units(ops.stack(c, axis=1)), *augmented
    )

    def repeated(structure):
        if structure is None:
            return None
        return tree.map_structure(
            lambda t: ops.repeat(ops.convert_to_tensor(t), copies, axis=0),
            structure,
        )

    return rows, repeated(y), repeated(sample_weight)


def _checked(x, copy):
    """`copy`, checked to have `x`'s structure and shapes, in `x`'s
    dtypes."""
    problem = None
    try:
        tree.assert_same_structure(x, copy)
    except (TypeError, ValueError) as error:
        problem = f"its structure differs: {error}"
    if problem is None:
        for a, b in zip(tree.flatten(x), tree.flatten(copy)):
            if not ops.is_tensor(b) and not hasattr(b, "shape"):
                problem = f"it returned {type(b).__name__}, not a tensor"
            elif len(a.shape) != len(b.shape) or any(
                p is not None and q is not None and p != q
                for p, q in zip(a.shape, b.shape)
            ):
                problem = f"an input of shape {a.shape} came back as {b.shape}"
            if problem:
                break
    if problem:
        raise ValueError(
            "make_private(augment=...): `augment(x, seed)` must return "
            "tensors of the structure and shapes of the batch inputs `x` "
            f"(one augmented copy of the batch), but {problem}. An "
            "augmentation that changes the size (a crop) must pad or "
            "resize back to the input's shape."
        )
    return tree.map_structure(
        lambda a, b: ops.cast(b, keras.backend.standardize_dtype(a.dtype)), x, copy
    )
