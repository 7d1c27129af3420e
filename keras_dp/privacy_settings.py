"""The per-model state of keras_dp: what `make_private` attaches to a model."""


class PrivacySettings:
    """Per-model settings of the private train step.

    Attributes:
        microbatch_size: examples whose per-example gradients are
            materialised at once (None: the whole batch).
        poisson_sampling: whether `fit` on in-memory arrays draws Poisson
            batches.
        sample_rate: the sampling rate for data whose size `fit` cannot
            see (generators), or None.
        expected_batch_size: the `B` that clipped sums are divided by.
            None means each batch's own size (fixed-size batches); Poisson
            sampling sets it to the expected size `q * n`.
        per_example: "auto", "fast" or "vmap" (see `make_private`).
        per_example_path: set when a train step is traced: `("fast", None)`
            or `("vmap", reason the fast path was not used)`.
        examples_checked: whether the checks on real examples
            (`keras_dp.example_independence`) have passed.
        augment: the `augment(x, seed)` function of augmentation
            multiplicity, or None.
        augmentations: augmented copies per example (K, 1 without).
        augment_seed: the `keras.random.SeedGenerator` that seeds the
            copies (None without `augment`).
        rows_per_user: during a `fit` on a `keras_dp.data.UserSampler`,
            its `max_examples_per_user` M: each user's M rows are one
            privacy unit; None otherwise.
        saved_augmentations: the `augmentations` a loaded model was saved
            with (its `augment` function is not saved), until `make_private`
            is called again; None otherwise.
    """

    def __init__(
        self,
        microbatch_size=None,
        poisson_sampling=True,
        sample_rate=None,
        per_example="auto",
    ):
        self.augment = None
        self.augmentations = 1
        self.augment_seed = None
        self.saved_augmentations = None
        self.rows_per_user = None
        self.microbatch_size = microbatch_size
        self.per_example = per_example
        self.per_example_path = None
        self.poisson_sampling = poisson_sampling
        self.sample_rate = sample_rate
        self.expected_batch_size = None
        # Rows per batch of the current `fit`, when known: TensorFlow traces
        # the step with an unknown batch size, and the fast path sizes its
        # memory-bounded chunks by this.
        self.batch_size_hint = None
        self.sampling_seed = None
        self.warned_fixed_batches = False
        # What the current train function was traced with.
        self.traced_with = None
        self.examples_checked = False


def is_private(model):
    """Whether `make_private` was applied to `model`."""
    return getattr(model, "_keras_dp", None) is not None
