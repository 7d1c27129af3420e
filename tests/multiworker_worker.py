"""One of the worker processes of a TensorFlow `MultiWorkerMirroredStrategy`
training run that `tests/test_multiworker.py` starts (two of them, on this
machine).

    python tests/multiworker_worker.py WORKER_ID PORT0,PORT1 OUTDIR

Each worker is one replica (one CPU device); `TF_CONFIG` names the two
workers at `localhost:PORT0` and `localhost:PORT1`. The worker trains the
private model of `multiprocess_worker.train` (the JAX multi-process test's
model, data and seeds) on its shard of each Poisson batch, without noise
and with noise (and without noise for a loss that keras_dp evaluates
example by example and a weight regularizer), then with every seed left to keras_dp and `fit` called
outside the strategy's scope on in-memory arrays, and writes the updates,
its sampled indices and its ledger to `OUTDIR/process_<k>.npz` and
`.json`. It also checks that the mistakes a user can make across workers
raise errors that say what to do.
"""

import json
import os
import sys

import multiprocess_worker as common


def mapped_loss():
    """A loss keras_dp evaluates example by example with Keras's
    `compute_loss` (not on the batch at once: its reduction is not
    Keras's default), with the values of "mse"."""
    import keras

    return keras.losses.MeanSquaredError(reduction="mean")


def regularizer():
    """A weight regularizer, whose gradient each replica adds: one over
    the number of replicas of it (Keras scales the regularization loss)."""
    import keras

    return keras.regularizers.L2(0.05)


def main():
    worker_id, ports, out = int(sys.argv[1]), sys.argv[2].split(","), sys.argv[3]
    os.environ["TF_CONFIG"] = json.dumps(
        {
            "cluster": {"worker": [f"localhost:{port}" for port in ports]},
            "task": {"type": "worker", "index": worker_id},
        }
    )
    os.environ["KERAS_BACKEND"] = "tensorflow"
    import warnings

    warnings.simplefilter("ignore")
    import tensorflow as tf

    import keras_dp

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    assert strategy.num_replicas_in_sync == 2, strategy.num_replicas_in_sync

    with strategy.scope():
        quiet, quiet_initial, sampler = common.train(0.0, 1)
        assert (sampler.process_index, sampler.process_count) == (worker_id, 2)
        noisy, noisy_initial, _ = common.train(
            common.NOISE_MULTIPLIER, common.NOISY_STEPS
        )
        # Keras's `compute_loss` scales it by one over the replicas.
        mapped, mapped_initial, _ = common.train(
            0.0, 1, loss=mapped_loss(), regularizer=regularizer()
        )
    steps, eps = common.epsilon(noisy)
    result = {
        "steps": steps,
        "epsilon": eps,
        "entries": noisy.optimizer.privacy_ledger.get_config()["entries"],
        "sampled_epoch": sampler.epoch,
    }
    arrays = {
        "sampled": sampler.part_units(0),
        **common.named("quiet", common.update_of(quiet, quiet_initial)),
        **common.named("noisy", common.update_of(noisy, noisy_initial)),
        **common.named("mapped", common.update_of(mapped, mapped_initial)),
    }

    # Built in the scope, trained outside it (as TensorFlow's tutorials
    # do): `fit` enters the strategy, and on the arrays builds the sharded
    # sampler, whose seed every worker takes from worker 0.
    x, y = common.data()
    with strategy.scope():
        model, initial = common.private_model(common.NOISE_MULTIPLIER)
    model.fit(x, y, batch_size=common.BATCH_SIZE, steps_per_epoch=1, verbose=0)
    arrays.update(common.named("unseeded", common.update_of(model, initial)))

    # A sampler that does not shard, or one built differently on each
    # worker, is refused (on every worker: none is left waiting).
    with strategy.scope():
        common.expect_error(
            lambda: common.train(0.0, 1, {"process_index": 0, "process_count": 1}),
            ["shard 0 of 1", "process_count=2", "MultiWorkerMirroredStrategy"],
        )
        common.expect_error(
            lambda: keras_dp.data.PoissonSampler(
                x,
                y,
                batch_size=common.BATCH_SIZE + worker_id,
                seed=common.SAMPLING_SEED,
            ),
            ["differs between the 2 processes", "batch_size: 24, 25"],
        )
    with strategy.scope():
        adaptive = keras_dp.make_private(common.build())
        adaptive.compile(
            optimizer=keras_dp.DPSGD(
                learning_rate=0.1, noise_multiplier=1.0, adaptive_clipping=True
            ),
            loss="mse",
        )
    common.expect_error(
        lambda: adaptive.fit(x, y, batch_size=common.BATCH_SIZE, verbose=0),
        ["does not support adaptive clipping", "JAX backend"],
    )
    common.expect_error(
        lambda: model.train_on_batch(x[:4], y[:4]),
        ["train_on_batch is not supported", "model.fit"],
    )
    common.write_results(out, worker_id, arrays, result)


if __name__ == "__main__":
    main()
