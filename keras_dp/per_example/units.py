"""Privacy units of several rows: one clipped gradient per unit of R rows.

Usually each row of a batch is one example and one privacy unit. With
`rows_per_unit = R > 1` the batch's rows come in units of R consecutive
rows (`U * R` rows for `U` units), and each unit is what is clipped: its
gradient is the gradient of its loss, the mean of its real rows' losses
(rows with a non-zero sample weight; a unit of padding rows has loss and
gradient exactly 0). Then it is clipped, summed and noised like an
example's, so the sensitivity is that of one unit.

Augmentation multiplicity (`make_private(augment=..., augmentations=K)`)
makes each example's K augmented copies one unit (R = K); user-level
privacy (`fit` on a `keras_dp.data.UserSampler`) makes the up to M rows
of one user one unit (R = M).

The vmap path maps over units and runs the model on each unit's R rows as
a batch. The fast path runs the batched pass on all rows and folds each
unit's rows into the position axis of the rules' tensors: a unit's kernel
gradient `sum_{r, t} a_rt b_rt^T` is a linear layer's with `R * T`
positions, so ghost norms and book-keeping apply unchanged; per-row
gradients that a rule instantiates are summed over the unit's rows. These
helpers do the folds, for keras_dp's rules and a user's (see
`register_per_example_rule(units=...)`).

```python
from keras import ops
from keras_dp.per_example import units

x = ops.ones((6, 3, 4))  # 2 units of 3 rows, 3 positions, 4 features
units.unit_rows(x, 3).shape  # (2, 3, 3, 4)
units.unit_positions(x, 3).shape  # (2, 9, 4)
units.unit_sums(x, 3).shape  # (2, 3, 4)
```
"""

from keras import ops
from keras import tree

from keras_dp.per_example.rows import row_mask


def _dims(t, start):
    """`t`'s dimensions from `start` on: static where known."""
    dynamic = ops.shape(t)
    return tuple(
        d if d is not None else dynamic[k] for k, d in enumerate(t.shape) if k >= start
    )


def unit_rows(t, rows_per_unit):
    """`(U * R, ...)` as `(U, R, ...)`: each unit's rows on a new axis
    after the units' axis."""
    if rows_per_unit == 1:
        return ops.expand_dims(t, 1)
    return ops.reshape(t, (-1, rows_per_unit) + _dims(t, 1))


def rows_of_units(t):
    """The inverse of `unit_rows`: `(U, R, ...)` as `(U * R, ...)`."""
    return ops.reshape(t, (-1,) + _dims(t, 2))


def unit_positions(t, rows_per_unit):
    """`(U * R, T, d)` as `(U, R * T, d)`: a unit's rows folded into the
    position axis (a linear layer's `A` or `B`)."""
    if rows_per_unit == 1:
        return t
    T = t.shape[1]
    positions = rows_per_unit * T if T is not None else -1
    return ops.reshape(t, (-1, positions) + _dims(t, 2))


def unit_sums(t, rows_per_unit):
    """Per-row tensors `(U * R, ...)` summed over each unit's rows:
    `(U, ...)` (per-row gradients into the unit's)."""
    if rows_per_unit == 1:
        return t
    return ops.sum(unit_rows(t, rows_per_unit), axis=1)


def unit_losses(row_losses, sample_weight, rows_per_unit):
    """Each unit's loss `(U,)` from the rows' `(U * R,)`: the mean over
    the unit's real rows (non-zero sample weight; all rows without
    sample weights), 0 for a unit of padding rows (whose rows' losses are
    0)."""
    if rows_per_unit == 1:
        return row_losses
    total = ops.sum(unit_rows(row_losses, rows_per_unit), axis=1)
    if sample_weight is None:
        return total / rows_per_unit
    real = ops.sum(unit_rows(row_mask(sample_weight), rows_per_unit), axis=1)
    return total / ops.maximum(real, 1.0)


def unit_mask(sample_weight, rows_per_unit):
    """1.0 for units with a real row (non-zero sample weight), else 0.0."""
    if rows_per_unit == 1:
        return row_mask(sample_weight)
    return row_mask(
        tree.map_structure(lambda w: unit_rows(w, rows_per_unit), sample_weight)
    )


def grouped(structure, rows_per_unit):
    """Every tensor of `structure` as `unit_rows` (None leaves kept)."""
    return tree.map_structure(
        lambda t: t if t is None else unit_rows(t, rows_per_unit), structure
    )
