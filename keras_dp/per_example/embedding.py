"""Rules for Embedding, ReversibleEmbedding (as a lookup) and keras-hub's
PositionEmbedding.

Embedding: with ids `x_t` and output gradients `b_t` of one example, its
table gradient has row `v` equal to `sum_{t: x_t = v} b_t`, so
`||G_i||^2 = sum_{t,s} 1{x_t = x_s} b_t . b_s` (no table-sized tensor), and
the clipped sum is a segment sum of the scaled output gradients.
ReversibleEmbedding is handled as a lookup; a `reverse=True` call (tied
output logits) is refused. keras-hub's PositionEmbedding adds the first T
rows of its table: each example's gradient is its output gradient.
"""

import keras
from keras import ops

from keras_dp.per_example.registry import Unsupported
from keras_dp.per_example.registry import builtin_registrations
from keras_dp.per_example.registry import register_per_example_rule
from keras_dp.per_example.registry import register_when_imported
from keras_dp.per_example.registry import uses_plain_weights
from keras_dp.per_example.rows import InstantiatedTerms
from keras_dp.per_example.rows import f32
from keras_dp.per_example.rows import factor_rows
from keras_dp.per_example.rows import kept_rows
from keras_dp.per_example.rows import scaled_rows
from keras_dp.per_example.rows import squared_norms
from keras_dp.per_example.rows import static_prod


def embedding_rule(layer, call, grads, context):
    ids = ops.cast(call.inputs, "int32")
    B = f32(grads)
    D = B.shape[-1]
    T = static_prod(ids.shape[1:])
    ids = ops.reshape(ids, (-1, T if T is not None else -1))
    B = ops.reshape(B, (-1, T if T is not None else -1, D))
    if T == 1:
        sq = squared_norms(B)
    else:
        same = ops.equal(ids[:, :, None], ids[:, None, :])
        bb = ops.einsum("ntd,nsd->nts", B, B)
        sq = ops.sum(ops.where(same, bb, ops.zeros_like(bb)), axis=(1, 2))
        sq = ops.maximum(sq, 0.0)
    vocab = layer.embeddings.shape[0]

    def clipped(c, safe):
        weighted = ops.reshape(scaled_rows(B, c, safe), (-1, D))
        return ops.segment_sum(weighted, ops.reshape(ids, (-1,)), num_segments=vocab)

    partition = context.partition_of(layer.embeddings)
    if partition is not None:
        sq, clipped = _sharded_table_terms(ids, B, vocab, partition)
    terms = [(layer.embeddings, sq, clipped)]
    reverse = getattr(layer, "reverse_embeddings", None)
    if reverse is not None and reverse is not layer.embeddings:
        # Untied output kernel of a ReversibleEmbedding, only used by
        # `reverse=True` calls (refused): no gradient.
        terms.append(
            (reverse, ops.zeros_like(sq), lambda c, safe: ops.zeros(reverse.shape))
        )
    return terms


def _sharded_table_terms(ids, B, vocab, partition):
    """The lookup's terms with the table split into `shards` pieces along
    `axis` (per-device clipping groups): `(n, shards)` norms and factors.

    Split by rows (axis 0), position `t` falls in shard `x_t // (V /
    shards)`, and `||G_i^(j)||^2` sums `b_t . b_s` over the pairs with
    `x_t = x_s` in shard `j`; split by columns, each shard has the
    lookup's formula on its columns of `b`.
    """
    axis, shards = partition
    D = B.shape[-1]
    same = ops.equal(ids[:, :, None], ids[:, None, :])
    if axis == 0:
        shard = ops.one_hot(ids // (vocab // shards), shards)  # (n, T, shards)
        bb = ops.einsum("ntd,nsd->nts", B, B)
        pairs = ops.where(same, bb, ops.zeros_like(bb))
        sq = ops.einsum("nts,ntj->nj", pairs, shard)

        def position_factors(c):
            return ops.einsum("ntj,nj->nt", shard, c)[:, :, None]

    else:
        columns = ops.reshape(B, (-1, ops.shape(B)[1], shards, D // shards))
        bb = ops.einsum("ntjd,nsjd->njts", columns, columns)
        sq = ops.sum(ops.where(same[:, None], bb, ops.zeros_like(bb)), axis=(2, 3))

        def position_factors(c):
            return ops.repeat(c, D // shards, axis=1)[:, None, :]

    sq = ops.maximum(sq, 0.0)

    def clipped(c, safe):
        weighted = kept_rows(B, factor_rows(c), safe) * position_factors(c)
        return ops.segment_sum(
            ops.reshape(weighted, (-1, D)), ops.reshape(ids, (-1,)), num_segments=vocab
        )

    return sq, clipped


def refuse_reverse_call(layer, args, kwargs):
    if kwargs.get("reverse") or args[1:2] == (True,):
        raise Unsupported(f"embedding {layer.name!r} is called with reverse=True")


def position_embedding_rule(layer, call, grads, context):
    """keras-hub `PositionEmbedding`: the first T rows of the table,
    broadcast to the input. Each example's gradient is its output
    gradient `dy_i` (summed over any leading broadcast axes) in rows
    `[0, T)` of the table."""
    table = layer.position_embeddings
    dy = f32(grads)
    T, D = dy.shape[-2], dy.shape[-1]
    if T is None:
        raise Unsupported(f"position embedding {layer.name!r}: unknown length")
    g = ops.reshape(dy, (ops.shape(dy)[0], -1, T, D))
    # The first T rows of the table, instantiated.
    terms = InstantiatedTerms(table, ops.sum(g, axis=1))
    _, sq, rows_sum = terms
    partition = context.partition_of(table)
    if partition is not None:
        if partition[0] != 1:
            raise Unsupported(
                f"clip_groups='per_device': position embedding "
                f"{layer.name!r} is sharded by rows; shard it by columns"
            )
        sq, rows_sum = terms.per_shard(partition)
    rows = table.shape[0]

    def clipped(c, safe):
        return ops.pad(rows_sum(c, safe), [(0, rows - T), (0, 0)])

    return [(table, sq, clipped)]


def refuse_offset_positions(layer, args, kwargs):
    start = kwargs.get("start_index", args[1] if len(args) > 1 else 0)
    positions = kwargs.get("positions", args[2] if len(args) > 2 else None)
    if not (isinstance(start, int) and start == 0) or positions is not None:
        raise Unsupported(
            f"position embedding {layer.name!r} is called with an offset or "
            "explicit positions"
        )


def _register_keras_hub_rules():
    import keras_hub

    cls = getattr(getattr(keras_hub, "layers", None), "PositionEmbedding", None)
    if cls is not None:
        register_per_example_rule(
            cls,
            position_embedding_rule,
            name="position_embedding",
            applies=uses_plain_weights,
            check_call=refuse_offset_positions,
            units="positions",
        )


with builtin_registrations():
    register_per_example_rule(
        keras.layers.Embedding,
        embedding_rule,
        name="embedding",
        applies=uses_plain_weights,
        units="positions",
    )
    _reversible = getattr(keras.layers, "ReversibleEmbedding", None)
    if _reversible is not None:
        # Used as a lookup.
        register_per_example_rule(
            _reversible,
            embedding_rule,
            name="embedding",
            applies=uses_plain_weights,
            check_call=refuse_reverse_call,
            units="positions",
        )
    register_when_imported("keras_hub", _register_keras_hub_rules)
