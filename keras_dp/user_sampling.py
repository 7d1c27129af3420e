"""User-level sampling: Poisson samples of users, each user one privacy unit.

When one person contributes many examples, example-level DP protects each
example but not the person: their examples together can move the model
much further than one. `UserSampler` makes the user the unit of privacy.
Each logical batch is a Poisson sample of the *users* at rate
`q = users_per_batch / num_users`; of each sampled user it takes up to
`max_examples_per_user = M` of their examples (a uniformly random subset,
drawn afresh every time the user is sampled) and lays them out as M
consecutive rows. A private model's `fit` recognises the sampler and clips
each user's M rows as one unit (`keras_dp.per_example.units`): the user's
gradient is the mean over their real rows, clipped, summed over users,
noised once and divided by the expected number of users, so the
sensitivity is that of one user and the accountant's `q` is the users'
rate. See docs/user-level-dp.md.

```python
sampler = keras_dp.data.UserSampler(
    x, y, user_ids, users_per_batch=64, max_examples_per_user=8, seed=0
)
model.fit(sampler, epochs=3, callbacks=[keras_dp.EpsilonLogger()])
```
"""

import secrets

import numpy as np

from keras_dp import arguments
from keras_dp.poisson_batches import PoissonBatches
from keras_dp.poisson_batches import check_rows
from keras_dp.poisson_batches import lists_as_tuples
from keras_dp.poisson_batches import num_examples
from keras_dp.poisson_batches import sample_weights
from keras_dp.poisson_batches import take_padded


class UserSampler(PoissonBatches):
    """Batches of Poisson-sampled users, `max_examples_per_user` rows each.

    Args:
        x: input arrays (array, or list/dict of arrays, all with `n` rows).
        y: targets, same structure rules (needed: padding rows are marked
            by sample weight 0, which Keras passes only with targets).
        user_ids: one user id per example (shape `(n,)`; integers or
            strings): the examples of one id are one user.
        users_per_batch: the *expected* number of users per batch `U`;
            users are sampled at rate `q = U / num_users`.
        max_examples_per_user: `M`, the most examples of one user in a
            batch. A user with more has a uniformly random M of them
            drawn each time they are sampled; one with fewer fills the
            rest of their M rows with padding. Each batch has
            `padded_users * M` rows.
        sample_weight: optional per-example weights (shape `(n,)`). A
            user's gradient is the mean of their rows' weighted losses'
            gradients over their rows of non-zero weight.
        steps_per_epoch: optimizer steps per epoch; defaults to
            `ceil(num_users / U)`, so an epoch sees each user once on
            average.
        accumulation_steps: as for `PoissonSampler`: one logical batch of
            users (rate `k * U / num_users`) per update of an optimizer
            with `gradient_accumulation_steps=k`, split into k parts.
        seed: seed of the sampling. None draws one from the OS entropy pool.
        secure_mode: as for `PoissonSampler`: every batch drawn with 128
            fresh bits of the OS's cryptographic entropy (then no seed).
        workers: as for `keras.utils.PyDataset`.
        use_multiprocessing: as for `keras.utils.PyDataset` (not with
            `secure_mode`).
        max_queue_size: as for `keras.utils.PyDataset`.
        process_index: as for `PoissonSampler`: training across
            processes, each reading the sampled users of its shard (a
            contiguous block of the users, in the order of their sorted
            ids).
        process_count: as for `PoissonSampler`.

    Each item is `(x, y, sample_weight)`: user j of the batch has rows
    `j * M` to `j * M + M - 1`, their real examples first, then padding;
    rows of padding (and whole padding users, up to one of the user counts
    of `padded_batch_sizes`, or the batch's own users where `fit`'s step is
    not compiled per batch shape: see `PoissonSampler`) are zeros with
    sample weight 0. A larger draw is padded further, never cut.

    Attributes:
        num_users: the number of distinct users (`n` of the accountant).
        max_examples_per_user: `M`, the rows of one user (`rows_per_unit`
            of the train step).
        padded_size: the most users of a padded batch but for rare draws
            (`padded_size * M` rows).
    """

    def __init__(
        self,
        x,
        y,
        user_ids,
        users_per_batch,
        max_examples_per_user,
        sample_weight=None,
        steps_per_epoch=None,
        accumulation_steps=1,
        seed=None,
        secure_mode=False,
        workers=1,
        use_multiprocessing=False,
        max_queue_size=10,
        process_index=None,
        process_count=None,
    ):
        super().__init__(
            seed=seed,
            secure_mode=secure_mode,
            workers=workers,
            use_multiprocessing=use_multiprocessing,
            max_queue_size=max_queue_size,
            process_index=process_index,
            process_count=process_count,
        )
        if x is None or y is None:
            raise ValueError(
                "UserSampler needs inputs `x` and targets `y`: padding rows "
                "are marked by sample weight 0, which Keras only passes "
                "along with targets. For a model whose loss ignores targets, "
                "pass any array with one row per example as `y`."
            )
        self.max_examples_per_user = arguments.positive_int(
            "max_examples_per_user",
            max_examples_per_user,
            hint="the most examples of one user in a batch, M >= 1",
        )
        check_rows("UserSampler", x=x, y=y)
        self.x, self.y = x, y
        n = num_examples(x)
        self.sample_weight = sample_weights(sample_weight, n)
        self._users = _UserIndex(user_ids, n)
        self.num_users = self._users.count
        self._set_rate(
            self.num_users,
            users_per_batch,
            steps_per_epoch,
            accumulation_steps,
            "users_per_batch",
            "num_users",
        )

    @property
    def users_per_batch(self):
        """The expected number of users per batch (`expected_batch_size`)."""
        return self.batch_size

    @property
    def rows_per_unit(self):
        """Rows of one user in a batch (`M`)."""
        return self.max_examples_per_user

    def __getitem__(self, index):
        users, padded_users = self.padded_part(index)
        if self.secure_mode:
            rng = np.random.Generator(np.random.Philox(key=secrets.randbits(128)))
        else:
            # A stream apart from the users' sampling (`[seed, epoch,
            # update]`): the examples taken of each user; across processes
            # one of each process's own, so their choices are independent.
            shard = [self.process_index] if self.process_count > 1 else []
            rng = np.random.default_rng([self.seed, self.epoch, index, 1, *shard])
        examples, positions = self.user_rows(users, rng)
        M = self.max_examples_per_user
        rows = padded_users * M
        bx, by, bw = (
            take_padded(a, examples, rows, positions)
            for a in (self.x, self.y, self.sample_weight)
        )
        return lists_as_tuples(bx), lists_as_tuples(by), bw

    def user_rows(self, users, rng):
        """`(examples, positions)`: the example indices taken of each of
        `users` (a random `min(M, count)` of theirs) and the batch rows
        they go to (user j's from row `j * M`)."""
        M = self.max_examples_per_user
        examples, positions = [], []
        for j, user in enumerate(users):
            own = self._users.examples(user)
            if len(own) > M:
                own = own[rng.choice(len(own), size=M, replace=False)]
            examples.append(own)
            positions.append(j * M + np.arange(len(own)))
        if not examples:
            return np.zeros((0,), "int64"), np.zeros((0,), "int64")
        return np.concatenate(examples), np.concatenate(positions)

    def first_examples(self, count):
        """`(x, y, sample_weight)` of the first `count` examples, for
        checks before training."""
        indices = np.arange(min(count, num_examples(self.x)))
        return (
            take_padded(self.x, indices, None),
            take_padded(self.y, indices, None),
            take_padded(self.sample_weight, indices, None),
        )


class _UserIndex:
    """The examples of each user: user `u` (0 to `count - 1`, in the order
    of the sorted ids) owns `order[starts[u]:starts[u + 1]]`."""

    def __init__(self, user_ids, n):
        ids = np.asarray(user_ids)
        if ids.ndim != 1 or ids.shape[0] != n:
            raise ValueError(
                "`user_ids` must hold one user id per example: an array of "
                f"shape ({n},) for the {n} examples of `x`. Received: "
                f"user_ids of shape {ids.shape}."
            )
        if ids.dtype.kind == "f" and not np.all(np.isfinite(ids)):
            raise ValueError(
                "`user_ids` must be integers or strings (a NaN id cannot "
                "name a user). Received a non-finite id."
            )
        _, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
        self.order = np.argsort(inverse.ravel(), kind="stable")
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        self.count = len(counts)
        self.counts = counts

    def examples(self, user):
        return self.order[self.starts[user] : self.starts[user + 1]]
