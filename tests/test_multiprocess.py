"""Training across processes (JAX multi-process, `jax.distributed`).

Two processes of `tests/multiprocess_worker.py` train together on this
machine (two virtual CPU devices each, a `DataParallel` over the four);
the tests compare what they end with against the same training in this
one process: the update without noise, the noisy update (the noise is
one draw for the global batch, the same as one process's), the ledger
and epsilon, and the shards each process sampled. The sampler's sharding
itself is checked without processes.
"""

import keras
import numpy as np
import pytest

import keras_dp
import multiprocess_worker as worker
from keras_dp import fit_data
from worker_processes import assert_ledgers_count_global_steps
from worker_processes import assert_noise_of_one_draw
from worker_processes import assert_shards_are_one_sample
from worker_processes import assert_update_without_noise_equals
from worker_processes import free_port
from worker_processes import run_workers
from worker_processes import updates

jax_only = pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="JAX multi-process training; the processes run JAX",
)


@pytest.fixture(scope="module")
def processes(tmp_path_factory):
    """What the two processes wrote: `(arrays, result)` of each."""
    out = tmp_path_factory.mktemp("multiprocess")
    return run_workers("multiprocess_worker.py", [str(free_port())], "jax", out)


@pytest.fixture(scope="module")
def references():
    """The same training in this process: `(quiet, noisy)`, each
    `(model, update, sampler)`. The noisy one runs under a one-device
    DataParallel: the noise of a distributed step is drawn per variable,
    a stream that is the same for any number of devices (without a
    distribution it is one flat draw, another stream)."""
    model, initial, sampler = worker.train(0.0, 1)
    quiet = (model, worker.update_of(model, initial), sampler)
    devices = keras.distribution.list_devices()[:1]
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=devices)
    )
    try:
        model, initial, sampler = worker.train(
            worker.NOISE_MULTIPLIER, worker.NOISY_STEPS
        )
    finally:
        keras.distribution.set_distribution(None)
    return quiet, (model, worker.update_of(model, initial), sampler)


@jax_only
def test_update_without_noise_equals_one_process(processes, references):
    """sigma = 0: the two processes' update of the global batch (each
    clipped its shard's examples) equals this process's update on the
    same Poisson batch, and both processes end with the same weights."""
    for arrays, _ in processes:
        assert_update_without_noise_equals(updates(arrays, "quiet"), references[0][1])


@jax_only
def test_noise_is_added_once(processes, references):
    """sigma > 0: both processes end with identical weights (also with
    the noise and sampling seeds left to keras_dp: process 0's are
    shared), equal to one process's under the same seeds (its noise is
    the same single draw), and the probe moved by one draw of the noise
    (`assert_noise_of_one_draw`)."""
    (first, _), (second, _) = processes
    for a, b in zip(updates(first, "noisy"), updates(second, "noisy")):
        np.testing.assert_array_equal(a, b)

    for a, b in zip(updates(first, "unseeded"), updates(second, "unseeded")):
        np.testing.assert_array_equal(a, b)
    assert_noise_of_one_draw(updates(first, "noisy"), references[1])


@jax_only
def test_ledger_counts_global_steps(processes, references):
    """Each process's ledger holds the global steps at the global rate
    q = B / n, and its epsilon is one process's for the same q, sigma and
    steps."""
    assert_ledgers_count_global_steps(processes, references[1])


@jax_only
def test_processes_sample_their_shards(processes):
    """The processes' first batches are the parts, in their own shards,
    of the one-process sampler's batch; all their batches have the same
    number of rows."""
    assert_shards_are_one_sample(processes)
    (_, r0), (_, r1) = processes
    assert r0["padded_rows"] == r1["padded_rows"]


def sharded(process_count, **kwargs):
    n = kwargs.pop("n", 1000)
    x = np.arange(n, dtype="float32")[:, None]
    return [
        keras_dp.data.PoissonSampler(
            x, x, process_index=k, process_count=process_count, **kwargs
        )
        for k in range(process_count)
    ]


def test_shards_union_is_one_poisson_sample():
    """Three shards: at every step, their parts are disjoint, each in its
    own block of rows, their union is the one-process sample of the same
    seed, and they have one number of rows, also where a draw outgrows
    the padding (forced here by a small padded size). Over 600 updates
    each shard's inclusion rate is q = 0.05: the count of a shard is
    Binomial(600 * 333, 0.05), standard deviation 1% of its mean;
    tolerance 4% (four standard deviations)."""
    n, q, updates_count = 1000, 0.05, 600
    samplers = sharded(
        3, n=n, batch_size=int(q * n), steps_per_epoch=updates_count, seed=5
    )
    (whole,) = sharded(
        1, n=n, batch_size=int(q * n), steps_per_epoch=updates_count, seed=5
    )
    for sampler in samplers:
        sampler.padded_sizes = (8,)  # most draws exceed it
    counts = np.zeros(3)
    grew = 0
    for step in range(updates_count):
        parts = [s.part_units(step) for s in samplers]
        for k, part in enumerate(parts):
            low, high = k * n // 3, (k + 1) * n // 3
            assert np.all((part >= low) & (part < high)), (k, part)
            counts[k] += len(part)
        union = np.concatenate(parts)
        assert len(np.unique(union)) == len(union)
        np.testing.assert_array_equal(np.sort(union), np.sort(whole.part_units(step)))
        rows = {s.padded_units(step) for s in samplers}
        assert len(rows) == 1, rows
        grew += rows.pop() > 8
        if step < 3:
            shapes = {len(s[step][2]) for s in samplers}
            assert len(shapes) == 1, shapes
    assert grew > updates_count // 2
    sizes = np.diff([k * n // 3 for k in range(4)])
    rates = counts / (updates_count * sizes)
    np.testing.assert_allclose(rates, q, rtol=0.04)


def test_sharded_gradient_accumulation_parts_agree():
    """With accumulation, each process splits its shard of the logical
    batch into parts; the padded rows of part j agree across processes."""
    samplers = sharded(
        2, n=400, batch_size=10, accumulation_steps=3, steps_per_epoch=20, seed=2
    )
    for sampler in samplers:
        sampler.padded_sizes = (1,)
    for index in range(60):
        assert samplers[0].padded_units(index) == samplers[1].padded_units(index)
        sizes = [len(s.part_units(index)) for s in samplers]
        assert samplers[0].padded_units(index) >= max(sizes)


def test_sharding_errors_say_what_to_do():
    x = np.zeros((100, 2), "float32")
    with pytest.raises(ValueError, match="Pass both"):
        keras_dp.data.PoissonSampler(x, x, batch_size=10, process_index=0)
    with pytest.raises(ValueError, match="same seed"):
        keras_dp.data.PoissonSampler(
            x, x, batch_size=10, process_index=0, process_count=2
        )
    with pytest.raises(ValueError, match="process_count - 1"):
        keras_dp.data.PoissonSampler(
            x, x, batch_size=10, process_index=2, process_count=2, seed=1
        )
    with pytest.raises(ValueError, match="secure_mode=False"):
        keras_dp.data.PoissonSampler(
            x, x, batch_size=10, process_index=0, process_count=2, secure_mode=True
        )
    (sampler, _) = sharded(2, n=100, batch_size=10, seed=1)
    optimizer = keras_dp.DPSGD(learning_rate=0.1, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="keras.distribution.initialize"):
        fit_data.check_processes(optimizer, sampler)


def test_user_sampler_shards_users():
    """UserSampler: each process takes the sampled users of its block of
    users, whole (all their rows on one process); the union is the
    one-process sample, and the padded rows agree."""
    rng = np.random.default_rng(0)
    user_ids = rng.integers(0, 60, size=300)
    x = np.arange(300, dtype="float32")[:, None]

    def sampler(**kwargs):
        return keras_dp.data.UserSampler(
            x,
            x,
            user_ids,
            users_per_batch=6,
            max_examples_per_user=4,
            steps_per_epoch=20,
            seed=3,
            **kwargs,
        )

    whole = sampler()
    shards = [sampler(process_index=k, process_count=2) for k in range(2)]
    for step in range(20):
        parts = [s.part_units(step) for s in shards]
        assert np.all(parts[0] < 30) and np.all(parts[1] >= 30)
        np.testing.assert_array_equal(
            np.sort(np.concatenate(parts)), np.sort(whole.part_units(step))
        )
        batches = [s[step] for s in shards]
        assert batches[0][0].shape == batches[1][0].shape
        for (bx, _, bw), part in zip(batches, parts):
            users = {int(user_ids[int(v)]) for v in bx[bw > 0, 0]}
            assert users <= {int(u) for u in np.unique(user_ids)[part]}
