"""The coordinates in which per-example gradients are clipped and noised."""


class GradientSpace:
    """The coordinates in which per-example gradients are clipped and noised.

    This default is the identity: every coordinate of every trainable
    variable. A model may define `private_gradient_space(non_trainable)`
    returning another space (`keras_dp.LowRankSparse` does: low-rank
    carriers). A space maps each variable's per-example gradient to a list
    of parts (`project`), maps summed parts back (`reconstruct`, linear), and
    tells the optimizer how to draw noise in the parts (`noise_spaces`). The
    fast path computes a kernel's parts from its layer's activations
    instead, where the space gives the kernel a carrier
    (`kernel_carriers`).
    """

    def __init__(self, trainable_variables):
        self.shapes = [tuple(v.shape) for v in trainable_variables]

    def part_shapes(self):
        return [[shape] for shape in self.shapes]

    def project(self, per_example_grads):
        return [[g] for g in per_example_grads]

    def reconstruct(self, summed_parts):
        return [parts[0] for parts in summed_parts]

    def noise_spaces(self):
        return None

    def kernel_carriers(self):
        """`{id(kernel variable): carrier}` of the kernels whose gradients
        the fast path projects onto low-rank carriers (see
        `keras_dp.per_example.carriers`); none in this space."""
        return {}


def gradient_space(model, non_trainable):
    """The model's own space (`private_gradient_space`), else the identity."""
    make_space = getattr(model, "private_gradient_space", None)
    if make_space is None:
        return GradientSpace(model.trainable_variables)
    return make_space(non_trainable)
