"""Low-rank and sparse private updates: RGP and LSG as a model wrapper.

For large models the noise grows with the number of noised coordinates.
`LowRankSparse` privatises, for every matrix-like kernel (Dense, EinsumDense
and convolution kernels, through their matrix view `W` of shape `(p, d)`),
only the per-example *carrier gradients* of a rank-`r` reparametrisation
`W = L R + W~` (RGP: Yu et al., "Large scale private learning via low-rank
reparametrization", ICML 2021):

    dL_i = G_i R^T   (p x r),        dR_i = L^T G_i   (r x d)

optionally restricted to a sparse support (LSG, Ito et al. 2022). The clipped
vector of an example is the concatenation of its carrier gradients and the
gradients of all other trainable variables (biases, norms, excluded heads);
noise is drawn in that space only, and each kernel's update is reconstructed
with the projection

    dW = dL R + L dR - L L^T dL R  =  P_L G + G P_R - P_L G P_R.

(The released RGP language-model code adds the last term; only the minus
gives the projection.) Everything the carriers and the support depend on is
public: the weights already released by earlier private steps and public
randomness, never the current batch. So the accounting is exactly that of
plain DP-SGD with the same noise multiplier, sampling rate and steps.

Example:

```python
model = keras_dp.LowRankSparse(model, rank=8, sparsity=0.9, refresh_every=100)
model = keras_dp.make_private(model)
model.compile(optimizer=keras_dp.DPAdam(auto_clip=True, noise_multiplier=0.8),
              loss="sparse_categorical_crossentropy")
model.fit(x, y, epochs=3)
print(model.noise_dimension, "noised coordinates")
```

Decisions the papers leave open (LSG has no public code; see
docs/algorithms.md, "Low-rank and sparse gradients"):
- Carriers (`carriers=`), refreshed every `refresh_every` updates, come
  from one power iteration with fresh public Gaussian randomness on a
  public matrix `M`: the current kernel (`"weights"`, the default), or the
  kernel's released change since the previous refresh (`"history"`, RGP's
  historical update; the weights until there is one). Random orthonormal
  carriers were measured too and lost on the fine-tuning benchmarks
  (`benchmarks/FINETUNE_RESULTS.md`), so they are not offered.
- The support keeps, in each carrier matrix, the `ceil((1 - sparsity) * size)`
  coordinates where the projection of `M` (`M R^T` for `dL`, `L^T M` for
  `dR`) is largest in magnitude, chosen when the carriers are refreshed.
  Coordinates outside the support are exactly zero and get no noise.
- The matrix view of a kernel is the one its layer computes with: `(inputs,
  units)` for Dense, `(taps * channels, filters)` for a convolution (RGP's
  view), the contracted letters against the output letters for an
  EinsumDense kernel that lists them in that order, else the most square
  split (`matrix_split`). The fast per-example path computes carrier
  gradients from the layer's activations in that view
  (`keras_dp.per_example.carriers`).
"""

import math

import keras
from keras import ops

from keras_dp import arguments
from keras_dp import keras_compat
from keras_dp.einsum_equations import equation_parts
from keras_dp.einsum_equations import kernel_sides

CARRIERS = ("weights", "history")

_MATRIX_LAYERS = (
    keras.layers.Dense,
    keras.layers.EinsumDense,
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
)


def matrix_split(shape):
    """Axis before which a kernel is flattened into its `(p, d)` view.

    The split that makes the smaller side largest, so that a rank-`r`
    carrier is a real restriction on both sides: `(d_model, heads * dim)`
    for attention projections; for a conv kernel `(kh, kw, c_in, c_out)`
    whichever of `(kh, kw * c_in * c_out)`, `(kh * kw, c_in * c_out)` and
    `(kh * kw * c_in, c_out)` is most square (`(9, 24)` for `(3, 3, 6, 4)`,
    `(288, 64)` for `(3, 3, 32, 64)`). Any split is a valid matrix view:
    the projection stays linear, so privacy does not depend on it.
    """
    best, best_side = 1, -1
    for k in range(1, len(shape)):
        p, d = math.prod(shape[:k]), math.prod(shape[k:])
        if min(p, d) > best_side:
            best, best_side = k, min(p, d)
    return best


def kernel_split(layer, kernel_shape):
    """Axis before which `layer`'s kernel is flattened into the matrix view
    its layer computes with (see the module docstring): the fast path's
    carrier gradients need it."""
    if isinstance(layer, keras.layers.Dense):
        return 1
    if isinstance(
        layer, (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
    ):
        return len(kernel_shape) - 1
    if isinstance(layer, keras.layers.EinsumDense):
        split = _einsum_contracted_letters(layer.equation)
        if split is not None:
            return split
    return matrix_split(kernel_shape)


def _einsum_contracted_letters(equation):
    """How many kernel letters come first and are contracted with the
    input, if the kernel's letters are those, then the output's; else
    None."""
    parts = equation_parts(equation)
    if parts is None:
        return None
    contracted, produced = kernel_sides(*parts)
    if parts[1] != contracted + produced or not contracted or not produced:
        return None
    return len(contracted)


class _FixedSeed(keras.random.SeedGenerator):
    """A seed given as a tensor (Keras random ops accept only generators)."""

    def __init__(self, seed):
        self._seed = seed

    def next(self, ordered=True):
        return self._seed


def _support_mask(scores, keep):
    flat = ops.reshape(ops.abs(scores), (-1,))
    _, indices = ops.top_k(flat, keep)
    mask = ops.scatter(
        ops.expand_dims(indices, 1),
        ops.ones((keep,), dtype=flat.dtype),
        (flat.shape[0],),
    )
    return ops.reshape(mask, scores.shape)


def _layer_names(name, names):
    """`names` as a tuple of non-empty strings: a list or tuple of layer
    names (one string alone is refused: it would be read letter by
    letter)."""
    if isinstance(names, str) or not isinstance(names, (list, tuple, set, frozenset)):
        raise arguments.ArgumentTypeError(
            f"`{name}` must be a list, tuple or set of layer names, e.g. "
            f"('head',). Received: {name}={names!r}."
        )
    return tuple(
        arguments.non_empty_string(f"{name}[{k}]", item, hint="a layer name")
        for k, item in enumerate(names)
    )


class _Carrier:
    """Carriers of one kernel: its position and the carrier variables."""

    def __init__(self, kernel, split, rank, variables):
        self.kernel = kernel
        self.shape = tuple(kernel.shape)
        self.p = math.prod(self.shape[:split])
        self.d = math.prod(self.shape[split:])
        self.rank = rank
        # L, R, mask_L, mask_R, and with carriers="history" the kernel at
        # the last refresh.
        self.variables = variables


class KernelCarrier:
    """One kernel's carriers in one step: the projection of its gradients.

    `left` (p, r), `right` (r, d); `mask_left`, `mask_right` the supports,
    None where they are dense (RGP). `project` maps per-example kernel
    gradients to carrier gradients (the vmap path), `reconstruct` maps
    summed carrier gradients back to the `(p, d)` kernel matrix, and the
    fast path gets the carrier gradients from activations
    (`keras_dp.per_example.carriers`).
    """

    def __init__(self, shape, left, right, mask_left=None, mask_right=None):
        self.shape = tuple(shape)
        self.p, self.rank = left.shape
        self.d = right.shape[1]
        self.left, self.right = left, right
        self.mask_left, self.mask_right = mask_left, mask_right

    def _masked(self, d_left, d_right):
        if self.mask_left is None:
            return d_left, d_right
        return d_left * self.mask_left, d_right * self.mask_right

    def project(self, per_example_grads):
        """Carrier gradients `(n, p, r)`, `(n, r, d)` of kernel gradients
        `(n,) + shape`."""
        g = ops.reshape(per_example_grads, (-1, self.p, self.d))
        return self._masked(
            ops.einsum("bpd,rd->bpr", g, self.right),
            ops.einsum("pr,bpd->brd", self.left, g),
        )

    def reconstruct(self, d_left, d_right):
        """The `(p, d)` update `dL R + L dR - L L^T dL R` (the projection
        `P_L G + G P_R - P_L G P_R` of a gradient `G`)."""
        left, right = self.left, self.right
        return (
            ops.matmul(d_left, right)
            + ops.matmul(left, d_right)
            - ops.matmul(
                left, ops.matmul(ops.matmul(ops.transpose(left), d_left), right)
            )
        )

    def noise(self, standard_normal):
        """Standard normal noise on the support, mapped to the kernel."""
        d_left, d_right = self._masked(
            standard_normal((self.p, self.rank), "float32"),
            standard_normal((self.rank, self.d), "float32"),
        )
        return ops.reshape(self.reconstruct(d_left, d_right), self.shape)


@keras.saving.register_keras_serializable(package="keras_dp")
class LowRankSparse(keras.Model):
    """Wraps a model so DP training privatises low-rank (sparse) carriers.

    Args:
        model: the model to train (any Keras model, built).
        rank: carrier rank `r` (capped at each kernel's smaller side).
        sparsity: fraction of carrier coordinates left out (0 gives RGP).
        refresh_every: train steps between carrier refreshes.
        exclude: names of layers whose kernels are privatised in full
            (e.g. a classification head).
        seed: seed of the public randomness of the power iteration.
        carriers: where the carriers come from: "weights" (a power
            iteration on each released kernel), "history" (on the kernel's
            released change since the previous refresh, RGP's choice;
            keeps a copy of each covered kernel). Both use public
            information only.

    The wrapper calls `model` unchanged; only `make_private`'s train step
    sees the difference. `noise_dimension` is the number of noised
    coordinates.
    """

    def __init__(
        self,
        model,
        rank=8,
        sparsity=0.0,
        refresh_every=100,
        exclude=(),
        seed=0,
        carriers="weights",
        **kwargs,
    ):
        super().__init__(**kwargs)
        arguments.instance_of("model", model, keras.Model, "a keras.Model")
        rank = arguments.positive_int("rank", rank)
        sparsity = arguments.probability(
            "sparsity",
            sparsity,
            high_open=True,
            hint="the fraction of carrier coordinates left out",
        )
        refresh_every = arguments.positive_int("refresh_every", refresh_every)
        exclude = _layer_names("exclude", exclude)
        seed = arguments.seed("seed", seed, allow_none=False)
        carriers = arguments.one_of("carriers", carriers, CARRIERS)
        if not model.built:
            raise ValueError(
                "LowRankSparse needs a built model (its kernels must exist). "
                "Build it first, e.g. with keras.Input or model.build(shape)."
            )
        self.inner = model
        self.rank = rank
        self.sparsity = sparsity
        self.refresh_every = refresh_every
        self.exclude = exclude
        self.seed = seed
        self.carriers = carriers
        self._carriers = self._create_carriers()
        self._refresh_count = self.add_weight(
            shape=(),
            initializer="zeros",
            dtype="int32",
            trainable=False,
            name="carrier_steps",
        )
        self.built = True
        self._initialize_carriers()

    def call(self, inputs, training=None):
        return self.inner(inputs, training=training)

    def _create_carriers(self):
        known = set(self.exclude)
        carriers = []
        for layer in keras_compat.flatten_layers(self.inner, include_self=False):
            if not isinstance(layer, _MATRIX_LAYERS) or not layer.trainable:
                continue
            known.discard(layer.name)
            if layer.name in self.exclude or getattr(layer, "lora_enabled", False):
                continue
            for kernel in layer.trainable_weights:
                if not kernel.path.endswith("kernel") or len(kernel.shape) < 2:
                    continue
                split = kernel_split(layer, tuple(kernel.shape))
                p = math.prod(kernel.shape[:split])
                d = math.prod(kernel.shape[split:])
                r = min(self.rank, p, d)
                name = kernel.path.replace("/", "_")
                variables = [
                    self.add_weight(
                        shape=shape,
                        initializer="zeros",
                        trainable=False,
                        name=f"{name}_{suffix}",
                    )
                    for shape, suffix in (
                        ((p, r), "carrier_l"),
                        ((r, d), "carrier_r"),
                        ((p, r), "support_l"),
                        ((r, d), "support_r"),
                    )
                ]
                if self.carriers == "history":
                    variables.append(
                        self.add_weight(
                            shape=(p, d),
                            initializer="zeros",
                            trainable=False,
                            name=f"{name}_last_refresh",
                        )
                    )
                carriers.append(_Carrier(kernel, split, r, variables))
        if known:
            raise ValueError(
                f"`exclude` names layers that have no matrix kernel: {sorted(known)}."
            )
        return carriers

    def _initialize_carriers(self):
        values = self._carrier_values(
            [v.value for v in self.trainable_variables],
            ops.convert_to_tensor(0),
            initial=True,
        )
        for carrier, new in zip(self._carriers, values):
            for variable, value in zip(carrier.variables, new):
                variable.assign(value)

    def _carrier_values(self, trainable_values, refresh_index, old=None, initial=False):
        """New values of each kernel's carrier variables (`L`, `R`,
        `mask_L`, `mask_R`, and the kernel at this refresh with
        carriers="history"), from public state: the released weights,
        `old` (the current carrier variables' values) and the seed."""
        position = {id(v): k for k, v in enumerate(self.trainable_variables)}
        seed_dtype = keras_compat.random_seed_dtype()
        values = []
        for k, carrier in enumerate(self._carriers):
            w = ops.reshape(
                ops.cast(trainable_values[position[id(carrier.kernel)]], "float32"),
                (carrier.p, carrier.d),
            )
            source = w
            if self.carriers == "history" and not initial:
                source = w - old[k][4]
            seed = ops.cast(
                ops.stack(
                    [
                        (self.seed + 7919 * k) % (arguments.MAX_SEED + 1),
                        ops.cast(refresh_index, "int32"),
                    ]
                ),
                seed_dtype,
            )
            r0 = keras.random.normal((carrier.d, carrier.rank), seed=_FixedSeed(seed))
            left, _ = ops.linalg.qr(ops.matmul(source, r0))
            q, _ = ops.linalg.qr(ops.matmul(ops.transpose(source), left))
            right = ops.transpose(q)
            masks = [
                _support_mask(scores, self._support_size(scores.shape))
                for scores in (
                    ops.matmul(source, ops.transpose(right)),
                    ops.matmul(ops.transpose(left), source),
                )
            ]
            # A copy: the variable must not share the kernel's buffer (JAX
            # donates both to the train step).
            history = [ops.copy(w)] if self.carriers == "history" else []
            values.append([left, right] + masks + history)
        return values

    def _support_size(self, shape):
        return int(math.ceil((1.0 - self.sparsity) * math.prod(shape)))

    @property
    def noise_dimension(self):
        """Number of coordinates that receive noise in each private step."""
        covered = {id(c.kernel) for c in self._carriers}
        total = sum(
            math.prod(v.shape) for v in self.trainable_variables if id(v) not in covered
        )
        for c in self._carriers:
            total += self._support_size((c.p, c.rank))
            total += self._support_size((c.rank, c.d))
        return total

    # Hooks used by keras_dp's private train step.

    def private_gradient_space(self, non_trainable):
        position = {id(v): k for k, v in enumerate(self.non_trainable_variables)}
        carrier_values = [
            [non_trainable[position[id(v)]] for v in c.variables]
            for c in self._carriers
        ]
        return _LowRankSpace(
            self.trainable_variables,
            self._carriers,
            carrier_values,
            sparse=self.sparsity > 0,
        )

    def after_private_update(self, trainable_values, non_trainable, took_update):
        """Counts updates and refreshes the carriers every `refresh_every`.

        Uses only the weights just released, so no privacy is spent. Counts
        optimizer updates, not train steps: under gradient accumulation the
        carriers stay fixed for the whole window, since the accumulated
        gradient and its noise must live in one space.
        """
        position = {id(v): k for k, v in enumerate(self.non_trainable_variables)}
        non_trainable = list(non_trainable)
        count_position = position[id(self._refresh_count)]
        count = non_trainable[count_position] + ops.cast(
            took_update, non_trainable[count_position].dtype
        )
        non_trainable[count_position] = count
        if not self._carriers:
            return non_trainable
        refresh_index = count // self.refresh_every
        old = [
            [non_trainable[position[id(v)]] for v in c.variables]
            for c in self._carriers
        ]
        new = ops.cond(
            ops.logical_and(took_update, ops.equal(count % self.refresh_every, 0)),
            lambda: self._carrier_values(trainable_values, refresh_index, old),
            lambda: old,
        )
        for c, values in zip(self._carriers, new):
            for variable, value in zip(c.variables, values):
                non_trainable[position[id(variable)]] = value
        return non_trainable

    def get_config(self):
        config = super().get_config()
        config.update(
            model=keras.saving.serialize_keras_object(self.inner),
            rank=self.rank,
            sparsity=self.sparsity,
            refresh_every=self.refresh_every,
            exclude=list(self.exclude),
            seed=self.seed,
            carriers=self.carriers,
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["model"] = keras.saving.deserialize_keras_object(config["model"])
        return cls(**config)


class _LowRankSpace:
    """Gradient space of `LowRankSparse` (see `per_example.GradientSpace`)."""

    def __init__(self, trainable_variables, carriers, carrier_values, sparse):
        by_kernel = {
            id(c.kernel): KernelCarrier(c.shape, *(v[:4] if sparse else v[:2]))
            for c, v in zip(carriers, carrier_values)
        }
        self.entries = [
            (tuple(var.shape), by_kernel.get(id(var))) for var in trainable_variables
        ]
        self._by_kernel = by_kernel

    def kernel_carriers(self):
        return dict(self._by_kernel)

    def part_shapes(self):
        return [
            [shape]
            if carrier is None
            else [(carrier.p, carrier.rank), (carrier.rank, carrier.d)]
            for shape, carrier in self.entries
        ]

    def project(self, per_example_grads):
        return [
            [g] if carrier is None else list(carrier.project(g))
            for g, (shape, carrier) in zip(per_example_grads, self.entries)
        ]

    def reconstruct(self, summed_parts):
        return [
            parts[0]
            if carrier is None
            else ops.reshape(carrier.reconstruct(*parts), shape)
            for parts, (shape, carrier) in zip(summed_parts, self.entries)
        ]

    def noise_spaces(self):
        return [
            None if carrier is None else carrier.noise
            for shape, carrier in self.entries
        ]
