"""Training under TensorFlow's `tf.distribute` strategies of several
replicas: `MultiWorkerMirroredStrategy` (one replica per worker process)
and `MirroredStrategy` (the devices of one process).

Two workers of `tests/multiworker_worker.py` train together on this
machine, and `tests/mirrored_worker.py` trains on two CPU devices of one
process; the tests compare what they end with against the same training
in this one process without a strategy (the JAX multi-process test's
model, data and seeds): the update without noise, the noisy update (replica
0's noise is the one draw of the whole batch, the same as one process's),
and for the workers the ledger and epsilon and the shards each sampled.
"""

import types

import keras
import numpy as np
import pytest

import multiprocess_worker as worker
import multiworker_worker
from keras_dp import fit_data
from worker_processes import assert_ledgers_count_global_steps
from worker_processes import assert_noise_of_one_draw
from worker_processes import assert_shards_are_one_sample
from worker_processes import assert_update_without_noise_equals
from worker_processes import free_port
from worker_processes import run_workers
from worker_processes import updates

tensorflow_only = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="MultiWorkerMirroredStrategy; the workers run TensorFlow",
)


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    """What the two workers wrote: `(arrays, result)` of each."""
    out = tmp_path_factory.mktemp("multiworker")
    ports = f"{free_port()},{free_port()}"
    return run_workers("multiworker_worker.py", [ports], "tensorflow", out)


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory):
    """What the `MirroredStrategy` run wrote: its arrays."""
    out = tmp_path_factory.mktemp("mirrored")
    ((arrays, _),) = run_workers("mirrored_worker.py", [], "tensorflow", out, count=1)
    return arrays


@pytest.fixture(scope="module")
def references():
    """The same training in this process, without a strategy: `(quiet,
    noisy, mapped)`, each `(model, update, sampler)`."""
    runs = []
    for sigma, steps, loss, regularizer in (
        (0.0, 1, "mse", None),
        (worker.NOISE_MULTIPLIER, worker.NOISY_STEPS, "mse", None),
        (0.0, 1, multiworker_worker.mapped_loss(), multiworker_worker.regularizer()),
    ):
        model, initial, sampler = worker.train(
            sigma, steps, loss=loss, regularizer=regularizer
        )
        runs.append((model, worker.update_of(model, initial), sampler))
    return runs


@tensorflow_only
def test_update_without_noise_equals_one_process(workers, references):
    """sigma = 0: the workers' update of the global batch (each replica
    clipped its shard's examples, Keras summed the replicas' gradients)
    equals this process's update on the same Poisson batch; also for a
    loss that keras_dp evaluates example by example with Keras's
    `compute_loss`, which scales each replica's loss by 1/2 (without
    undoing that, every unclipped example's gradient would be halved, a
    difference far above the tolerance), with a weight regularizer whose
    gradient each replica adds half of (not the whole)."""
    for arrays, _ in workers:
        assert_updates_without_noise_equal(arrays, references)


@tensorflow_only
def test_mirrored_update_without_noise_equals_one_device(mirrored, references):
    """The same under `MirroredStrategy`: Keras splits each Poisson batch
    between the two replicas (a part may be empty), each clips its part,
    and the update equals one device's."""
    assert_updates_without_noise_equal(mirrored, references)


def assert_updates_without_noise_equal(arrays, references):
    """A run's `quiet` and `mapped` updates equal the references'."""
    for prefix, (_, reference, _) in zip(("quiet", "mapped"), references[::2]):
        assert_update_without_noise_equals(updates(arrays, prefix), reference)


@tensorflow_only
def test_noise_is_added_once(workers, references):
    """sigma > 0: both workers end with identical weights (also with the
    noise and sampling seeds left to keras_dp and `fit` called outside
    the scope), equal to one process's under the same seeds: replica 0's
    noise is the same single draw, and the probe moved by one draw of the
    noise (`assert_noise_of_one_draw`)."""
    (first, _), (second, _) = workers
    for prefix in ("noisy", "unseeded"):
        got = list(zip(updates(first, prefix), updates(second, prefix)))
        assert got
        for a, b in got:
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert_noise_of_one_draw(updates(first, "noisy"), references[1])


@tensorflow_only
def test_mirrored_noise_is_added_once(mirrored, references):
    """Under `MirroredStrategy` too: the update equals one device's under
    the same seeds, and the probe's noise has one draw's standard
    deviation."""
    assert_noise_of_one_draw(updates(mirrored, "noisy"), references[1])


@tensorflow_only
def test_ledger_counts_global_steps(workers, references):
    """Each worker's ledger holds the global steps at the global rate
    q = B / n, and its epsilon is one process's for the same q, sigma and
    steps."""
    assert_ledgers_count_global_steps(workers, references[1])


@tensorflow_only
def test_workers_sample_their_shards(workers):
    """The workers' first batches are the parts, in their own shards, of
    the one-process sampler's batch."""
    assert_shards_are_one_sample(workers)


@tensorflow_only
def test_other_strategies_are_refused():
    """A strategy of several replicas other than the mirrored ones is
    refused before training, with what to do; one replica trains as
    without a strategy."""
    two = types.SimpleNamespace(num_replicas_in_sync=2)
    with pytest.raises(ValueError, match="tf.distribute.MirroredStrategy"):
        fit_data.check_replicas(types.SimpleNamespace(distribute_strategy=two))
    one = types.SimpleNamespace(num_replicas_in_sync=1)
    fit_data.check_replicas(types.SimpleNamespace(distribute_strategy=one))
    fit_data.check_replicas(object())
