"""One of the processes of a JAX multi-process training run that
`tests/test_multiprocess.py` starts (two of them, on one machine).

    python tests/multiprocess_worker.py PROCESS_ID PORT OUTDIR

Each process has two virtual CPU devices; `keras.distribution.initialize`
joins the two processes (coordinator `localhost:PORT`) and a
`keras.distribution.DataParallel` spans the four devices. The process
trains the private model of `train` on its shard of each Poisson batch
(`fit` on in-memory arrays builds the sharded sampler) twice, without
noise and with noise, and writes the weights, its sampled indices and
its ledger to `OUTDIR/process_<k>.npz` and `.json`. It also checks that
the mistakes a user can make across processes raise errors that say
what to do.

The model has a probe: a Dense layer whose output is multiplied by 0
before it joins the prediction. Its gradient is exactly 0 for every
example, so an update moves it by the DP noise alone
(`-learning_rate * noise`): the noise of a step is observable.

The test imports `train` and the constants from here, so its
single-process reference trains the same thing.
"""

import json
import os
import sys

N = 96
FEATURES = 6
OUTPUTS = 3
PROBE = 1024  # the probe's units: FEATURES * PROBE noise draws to look at
BATCH_SIZE = 24  # q = 0.25
NOISY_STEPS = 3
NOISE_MULTIPLIER = 1.5
L2_NORM_CLIP = 0.5
LEARNING_RATE = 1.0
SAMPLING_SEED = 11
NOISE_SEED = 7
DELTA = 1e-5


def data():
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, FEATURES)).astype("float32")
    y = rng.normal(size=(N, OUTPUTS)).astype("float32")
    return x, y


def build(regularizer=None):
    import keras

    keras.utils.set_random_seed(1)
    inputs = keras.Input((FEATURES,))
    hidden = keras.layers.Dense(
        8, activation="tanh", kernel_regularizer=regularizer, name="body"
    )(inputs)
    out = keras.layers.Dense(OUTPUTS, name="head")(hidden)
    probe = keras.layers.Dense(PROBE, use_bias=False, name="probe")(inputs)
    probe = keras.layers.Dense(OUTPUTS, use_bias=False, name="probe_out")(probe)
    out = keras.layers.Add()([out, keras.layers.Lambda(lambda t: t * 0.0)(probe)])
    return keras.Model(inputs, out)


def private_model(noise_multiplier, seed=None, loss="mse", regularizer=None):
    """The private model, compiled with DPSGD, and its initial weights."""
    import keras_dp

    model = keras_dp.make_private(build(regularizer))
    initial = [w.copy() for w in model.get_weights()]
    model.compile(
        optimizer=keras_dp.DPSGD(
            learning_rate=LEARNING_RATE,
            noise_multiplier=noise_multiplier,
            l2_norm_clip=L2_NORM_CLIP,
            seed=seed,
        ),
        loss=loss,
    )
    return model, initial


def train(noise_multiplier, steps, sampler_args=None, loss="mse", regularizer=None):
    """The private model after `steps` updates on the Poisson batches of
    seed `SAMPLING_SEED`, with the weights before and the sampler used.
    `sampler_args` go to `keras_dp.data.PoissonSampler` (the process
    shard, read from `jax.distributed` by default)."""
    import keras_dp

    x, y = data()
    model, initial = private_model(
        noise_multiplier, seed=NOISE_SEED, loss=loss, regularizer=regularizer
    )
    sampler = keras_dp.data.PoissonSampler(
        x,
        y,
        batch_size=BATCH_SIZE,
        steps_per_epoch=steps,
        seed=SAMPLING_SEED,
        **(sampler_args or {}),
    )
    model.fit(sampler, epochs=1, verbose=0)
    return model, initial, sampler


def train_unseeded():
    """One noisy update with every seed left to keras_dp: `fit` on the
    arrays builds the sharded sampler, whose seed, like the noise key,
    each process must take from process 0. Returns the update."""
    x, y = data()
    model, initial = private_model(NOISE_MULTIPLIER)
    model.fit(x, y, batch_size=BATCH_SIZE, steps_per_epoch=1, verbose=0)
    return update_of(model, initial)


def epsilon(model):
    from keras_dp import ledger as ledger_lib

    steps = ledger_lib.optimizer_steps(model)
    return steps, model.optimizer.privacy_ledger.epsilon(steps, DELTA)


def update_of(model, initial):
    """Each weight's change since `initial`."""
    return [w - w0 for w, w0 in zip(model.get_weights(), initial)]


def named(prefix, update):
    """`update` as the arrays `prefix_0, prefix_1, ...` a worker writes."""
    return {f"{prefix}_{k}": u for k, u in enumerate(update)}


def write_results(out, index, arrays, result):
    """Process `index`'s arrays and result into `out`, then OK: what
    `tests/worker_processes.run_workers` reads."""
    import numpy as np

    np.savez(os.path.join(out, f"process_{index}.npz"), **arrays)
    with open(os.path.join(out, f"process_{index}.json"), "w") as f:
        json.dump(result, f)
    print("OK", flush=True)


def expect_error(fn, words):
    try:
        fn()
    except ValueError as error:
        for word in words:
            assert word in str(error), (word, str(error))
    else:
        raise AssertionError(f"no error mentioning {words}")


def main():
    process_id, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    )
    os.environ["KERAS_BACKEND"] = "jax"
    import warnings

    warnings.simplefilter("ignore")
    import jax
    import keras

    import keras_dp

    keras.distribution.initialize(
        job_addresses=f"localhost:{port}", num_processes=2, process_id=process_id
    )
    assert jax.process_count() == 2 and len(jax.devices()) == 4, jax.devices()
    keras.distribution.set_distribution(keras.distribution.DataParallel())

    quiet, quiet_initial, sampler = train(0.0, 1)
    assert (sampler.process_index, sampler.process_count) == (process_id, 2)
    noisy, noisy_initial, _ = train(NOISE_MULTIPLIER, NOISY_STEPS)
    steps, eps = epsilon(noisy)
    result = {
        "steps": steps,
        "epsilon": eps,
        "entries": noisy.optimizer.privacy_ledger.get_config()["entries"],
        "padded_rows": [len(sampler[k][2]) for k in range(len(sampler))],
        "sampled_epoch": sampler.epoch,
    }
    arrays = {
        "sampled": sampler.part_units(0),
        **named("quiet", update_of(quiet, quiet_initial)),
        **named("noisy", update_of(noisy, noisy_initial)),
        **named("unseeded", train_unseeded()),
    }

    # A sampler that does not shard, or one built differently on each
    # process, is refused (on every process: no process is left waiting).
    expect_error(
        lambda: train(0.0, 1, {"process_index": 0, "process_count": 1}),
        ["shard 0 of 1", "process_count=2"],
    )
    x, y = data()
    expect_error(
        lambda: keras_dp.data.PoissonSampler(
            x, y, batch_size=BATCH_SIZE + process_id, seed=SAMPLING_SEED
        ),
        ["differs between the 2 processes", "batch_size: 24, 25"],
    )
    write_results(out, process_id, arrays, result)


if __name__ == "__main__":
    main()
