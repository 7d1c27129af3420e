"""A TensorFlow `MirroredStrategy` training run over two CPU devices of
one process, which `tests/test_multiworker.py` starts (the devices must be
configured before TensorFlow starts, so not in the test's process).

    python tests/mirrored_worker.py 0 OUTDIR

The process trains the model of `multiprocess_worker.train` (Keras splits
each Poisson batch between the two replicas) without noise, with noise,
and without noise for a loss keras_dp evaluates example by example and a
weight regularizer, and writes the updates to `OUTDIR/process_0.npz`. It
also checks that what cannot train under the strategy (fixed-size
batches, gradient accumulation, `train_on_batch`) is refused with what to
do.
"""

import os
import sys

import multiprocess_worker as common
import multiworker_worker


def main():
    out = sys.argv[2]
    os.environ["KERAS_BACKEND"] = "tensorflow"
    import warnings

    warnings.simplefilter("ignore")
    import tensorflow as tf

    (cpu,) = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )
    import keras_dp

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    arrays = {}
    runs = {
        "quiet": dict(noise_multiplier=0.0, steps=1),
        "noisy": dict(
            noise_multiplier=common.NOISE_MULTIPLIER, steps=common.NOISY_STEPS
        ),
        "mapped": dict(
            noise_multiplier=0.0,
            steps=1,
            loss=multiworker_worker.mapped_loss(),
            regularizer=multiworker_worker.regularizer(),
        ),
    }
    for prefix, arguments in runs.items():
        with strategy.scope():
            model, initial, _ = common.train(**arguments)
        arrays.update(common.named(prefix, common.update_of(model, initial)))

    x, y = common.data()
    with strategy.scope():
        fixed = keras_dp.make_private(common.build(), poisson_sampling=False)
        fixed.compile(
            optimizer=keras_dp.DPSGD(learning_rate=0.1, noise_multiplier=1.0),
            loss="mse",
        )
    common.expect_error(
        lambda: fixed.fit(x, y, batch_size=common.BATCH_SIZE, verbose=0),
        ["needs Poisson-sampled data", "PoissonSampler"],
    )
    with strategy.scope():
        accumulating = keras_dp.make_private(common.build())
        accumulating.compile(
            optimizer=keras_dp.DPSGD(
                learning_rate=0.1, noise_multiplier=1.0, gradient_accumulation_steps=2
            ),
            loss="mse",
        )
    common.expect_error(
        lambda: accumulating.fit(x, y, batch_size=common.BATCH_SIZE, verbose=0),
        ["does not support gradient_accumulation_steps", "also without keras_dp"],
    )
    common.expect_error(
        lambda: model.train_on_batch(x[:4], y[:4]),
        ["train_on_batch is not supported", "model.fit"],
    )
    common.write_results(out, 0, arrays, {})


if __name__ == "__main__":
    main()
