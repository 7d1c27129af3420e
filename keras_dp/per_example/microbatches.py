"""Microbatches: a batch processed in chunks of rows under a scan.

With `make_private(microbatch_size=...)` both paths process the batch in
chunks of `microbatch_size` rows, one after the other, so that only one
chunk's per-example tensors exist at a time. The last chunk is padded with
rows of zeros whose sample weight is 0, which contribute nothing.
"""

from keras import ops
from keras import tree

from keras_dp.per_example.rows import pad_rows


def microbatch_examples(x, y, sample_weight, rows, microbatch_size):
    """The batch as a dict of `x`, `y` (when given) and `sample_weight`
    (ones when None), padded with rows of zeros (sample weight 0) to a
    multiple of `microbatch_size` rows."""
    examples = {"x": x}
    if y is not None:
        examples["y"] = y
    examples["sample_weight"] = (
        sample_weight
        if sample_weight is not None
        else ops.ones((rows,), dtype="float32")
    )
    return pad_rows(examples, (-rows) % microbatch_size)


def scan_microbatches(step, init, examples, microbatch_size, backend_ops):
    """Runs `step(number, chunk) -> (sums, outputs)` on the consecutive
    chunks of `microbatch_size` rows of `examples` (a structure of tensors
    whose row count is a multiple of it), one after the other.

    `number` is the chunk's int32 index. Returns `(sums, outputs)`: the
    `sums` (a list of tensors) added up over the chunks, starting from
    `init`, and the `outputs` stacked, `(chunks, ...)` (see `unchunked`).
    """
    chunks = tree.map_structure(
        lambda t: ops.reshape(t, (-1, microbatch_size) + tuple(t.shape[1:])),
        examples,
    )
    num_chunks = ops.shape(tree.flatten(chunks)[0])[0]
    numbers = ops.arange(num_chunks, dtype="int32")

    def scan_fn(total, numbered_chunk):
        number, chunk = numbered_chunk
        sums, outputs = step(number, chunk)
        return [a + b for a, b in zip(total, sums)], outputs

    return backend_ops.scan(scan_fn, list(init), (numbers, chunks))


def unchunked(structure, rows):
    """Per-row tensors stacked per chunk, `(chunks, microbatch, ...)`, as
    the first `rows` rows `(rows, ...)` (the padding dropped)."""
    return tree.map_structure(
        lambda t: ops.reshape(t, (-1,) + tuple(t.shape[2:]))[:rows], structure
    )
