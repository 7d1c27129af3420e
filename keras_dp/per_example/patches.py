"""Conv layers' input patches: the `A_i` of a convolution as a linear layer.

A convolution's kernel gradient per example is `P_i^T B_i`, with `P_i`
(T x K*C) the input values each of its T output positions reads through
its K taps. The patches are gathered with static indices (any stride,
dilation, padding), or, with one input channel, as strided slices stacked
tap-major.
"""

import itertools

import numpy as np
from keras import ops

from keras_dp.per_example.rows import static_prod


def conv_pads(in_spatial, kernel_size, strides, dilation, padding, out_spatial):
    """(before, after) zeros per spatial axis that a conv reads."""
    pads = []
    for i in range(len(kernel_size)):
        k, s, dl = kernel_size[i], strides[i], dilation[i]
        total = max((out_spatial[i] - 1) * s + (k - 1) * dl + 1 - in_spatial[i], 0)
        if padding == "causal":
            pads.append((total, 0))
        elif padding == "same":
            pads.append((total // 2, total - total // 2))
        else:
            pads.append((0, 0))
    return pads


def pad_for_conv(x, kernel_size, strides, dilation, padding, out_spatial):
    """Channels-last `x` with the zeros a "same"/"causal" conv reads."""
    pads = conv_pads(
        x.shape[1:-1], kernel_size, strides, dilation, padding, out_spatial
    )
    if all(p == (0, 0) for p in pads):
        return x
    return ops.pad(x, [(0, 0)] + pads + [(0, 0)])


def conv_patches(x, kernel_size, strides, dilation, padding, out_spatial, backend_ops):
    """(n, T, K, C) patches of channels-last `x`: T output positions, K taps.

    One gather with static indices into the (padded, spatially flattened)
    input, for any stride and dilation: on TensorFlow, stacking K strided
    slices or `tf.image.extract_patches` are slower. A backend's
    `gather_patches` reads the zeros from the index instead of a padded
    copy of the input.
    """
    in_spatial = tuple(x.shape[1:-1])
    pads = conv_pads(in_spatial, kernel_size, strides, dilation, padding, out_spatial)
    padded = tuple(s + before + after for s, (before, after) in zip(in_spatial, pads))
    index = patch_indices(padded, kernel_size, strides, dilation, out_spatial)
    patches = backend_ops.gather_patches(
        ops.reshape(x, (-1, static_prod(in_spatial), x.shape[-1])),
        unpadded_positions(index, in_spatial, pads),
    )
    if patches is not None:
        return patches
    x = pad_for_conv(x, kernel_size, strides, dilation, padding, out_spatial)
    flat = ops.reshape(x, (-1, static_prod(padded), x.shape[-1]))
    return ops.take(flat, index, axis=1)


def unpadded_positions(index, in_spatial, pads):
    """`index`'s flat positions in the padded input as flat positions in
    the unpadded one, -1 where they read the padding."""
    padded = [size + before + after for size, (before, after) in zip(in_spatial, pads)]
    coords = np.unravel_index(index, padded)
    flat = np.zeros(index.shape, "int64")
    inside = np.ones(index.shape, bool)
    for c, size, (before, _) in zip(coords, in_spatial, pads):
        c = c - before
        inside &= (c >= 0) & (c < size)
        flat = flat * size + c
    return np.where(inside, flat, -1).astype("int32")


def single_channel_patches(x, kernel_size, strides, dilation, padding, out_spatial):
    """(n, K, T) patches of channels-last `x` with one channel, tap-major.

    With one channel a gather moves single floats, and patches in (T, K)
    order interleave the taps float by float; K strided slices stacked
    tap-major copy whole rows instead.
    """
    x = pad_for_conv(x, kernel_size, strides, dilation, padding, out_spatial)
    x = x[..., 0]
    taps = []
    for tap in itertools.product(*(range(k) for k in kernel_size)):
        window = tuple(
            slice(t * dl, t * dl + (o - 1) * s + 1, s)
            for t, dl, o, s in zip(tap, dilation, out_spatial, strides)
        )
        taps.append(x[(slice(None),) + window])
    T = static_prod(out_spatial)
    return ops.reshape(ops.stack(taps, axis=1), (-1, len(taps), T))


def patch_indices(in_spatial, kernel_size, strides, dilation, out_spatial):
    """`(T, K)` flat input positions read by each output position's taps."""
    rank = len(kernel_size)
    index = np.zeros(tuple(out_spatial) + tuple(kernel_size), dtype="int64")
    row_stride = 1
    for i in reversed(range(rank)):
        start = np.arange(out_spatial[i]) * strides[i]
        tap = np.arange(kernel_size[i]) * dilation[i]
        shape = [1] * (2 * rank)
        shape[i] = out_spatial[i]
        index += row_stride * start.reshape(shape)
        shape = [1] * (2 * rank)
        shape[rank + i] = kernel_size[i]
        index += row_stride * tap.reshape(shape)
        row_stride *= in_spatial[i]
    return index.reshape(static_prod(out_spatial), static_prod(kernel_size)).astype(
        "int32"
    )


def as_2d_conv(x, dy, conv_args):
    """`(x, dy, conv_args)` of a 1-D conv as a 2-D one of height 1 (what
    the backends' compiled kernels take); others unchanged. `conv_args`:
    (kernel_size, strides, dilation, pads)."""
    kernel_size, strides, dilation, pads = conv_args
    if len(kernel_size) != 1:
        return x, dy, conv_args
    return (
        ops.expand_dims(x, 1),
        ops.expand_dims(dy, 1),
        ((1,) + kernel_size, (1,) + strides, (1,) + dilation, [(0, 0)] + list(pads)),
    )
