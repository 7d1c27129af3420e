"""A small private training run that `tests/test_fault_tolerance.py` kills
and resumes.

    python tests/fault_tolerance_worker.py WORKDIR [--stall-at UPDATE]

It trains a tiny private MLP on generated data for `EPOCHS` epochs, with
Poisson sampling through `fit`, `keras.callbacks.BackupAndRestore`
(`WORKDIR/backup`, every `SAVE_FREQ` batches) and an `EpsilonLogger`. The
`Recorder` callback appends one JSON line per event to `WORKDIR/log.jsonl`:
after the backup is restored (`begin`) and after every batch (`batch`),
the optimizer's update count, a checksum of the model's weights and the
weights of the probe layer. Processes take turns on `WORKDIR/lock`, so a
second one can start (and import) while the first trains. The first process that reaches update
`--stall-at` writes a `stalled` line and waits there to be killed; a later
run of the same command runs through and writes `WORKDIR/result.json`
(what keras_dp reports about the privacy spent).

The model has a probe: a Dense layer whose output is multiplied by 0
before it joins the prediction. Its gradient is exactly 0 for every
example, so its clipped sum is 0 and each update moves it by the DP noise
alone (`-learning_rate * noise`): the noise of every step is observable.

The tests import the model, the data and the recorder from here, so the
in-process runs train the same thing. The backend comes from
`KERAS_BACKEND`.
"""

import argparse
import hashlib
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_dp  # noqa: E402
from keras_dp import ledger as ledger_lib  # noqa: E402

N = 200
FEATURES = 8
BATCH_SIZE = 20  # q = 0.1, 10 updates per epoch
EPOCHS = 3
SAVE_FREQ = 4
NOISE_MULTIPLIER = 1.0
L2_NORM_CLIP = 1.0
LEARNING_RATE = 0.1
DELTA = 1e-5


def make_data(seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, FEATURES)).astype("float32")
    w = rng.normal(size=(FEATURES, 1)).astype("float32")
    y = (np.tanh(x @ w) + 0.1 * rng.normal(size=(N, 1))).astype("float32")
    return x, y


def build_model(seed=None, secure_mode=False):
    """The private MLP with its probe, compiled with DP-SGD (no momentum:
    an update is `-learning_rate` times the noisy gradient)."""
    inputs = keras.Input((FEATURES,))
    hidden = keras.layers.Dense(8, activation="tanh")(inputs)
    head = keras.layers.Dense(1)(hidden)
    probe = keras.layers.Rescaling(0.0)(keras.layers.Dense(1, name="probe")(inputs))
    model = keras.Model(inputs, keras.layers.Add()([head, probe]))
    model = keras_dp.make_private(model)
    model.compile(
        optimizer=keras_dp.DPSGD(
            learning_rate=LEARNING_RATE,
            l2_norm_clip=L2_NORM_CLIP,
            noise_multiplier=NOISE_MULTIPLIER,
            seed=seed,
            secure_mode=secure_mode,
        ),
        loss="mse",
    )
    return model


def checksum(model):
    digest = hashlib.sha256()
    for value in model.get_weights():
        digest.update(np.ascontiguousarray(value, dtype="float32").tobytes())
    return digest.hexdigest()


def probe_weights(model):
    return np.concatenate(
        [np.ravel(w) for w in model.get_layer("probe").get_weights()]
    ).tolist()


class Recorder(keras.callbacks.Callback):
    """Records the update count, the weights' checksum and the probe's
    weights after the restore and after every batch, in `self.rows` and,
    when given a `path`, as JSON lines in that file (flushed at once, so
    a killed process leaves every finished step behind).

    `stall_at`: after that update, the first process (no `marker` file
    yet) creates `marker`, writes a `stalled` line and sleeps until it is
    killed. `raise_at`: raises `Interrupted` after that update instead
    (the in-process runs)."""

    def __init__(self, path=None, stall_at=None, marker=None, raise_at=None):
        super().__init__()
        self.path = path
        self.stall_at = stall_at
        self.marker = marker
        self.raise_at = raise_at
        self.rows = []
        self.epoch = None

    def _write(self, event, **fields):
        # `self.model` syncs JAX's in-flight state into the variables.
        model = self.model
        row = {
            "event": event,
            "epoch": self.epoch,
            "updates": ledger_lib.optimizer_updates(model.optimizer),
            "checksum": checksum(model),
            "probe": probe_weights(model),
            **fields,
        }
        self.rows.append(row)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
        return row

    def on_train_begin(self, logs=None):
        self._write("begin", pid=os.getpid())

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        row = self._write("batch", batch=batch)
        if row["updates"] == self.raise_at:
            raise Interrupted(f"interrupted after update {self.raise_at}")
        if row["updates"] == self.stall_at and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            self._write("stalled", pid=os.getpid())
            time.sleep(3600)


class Interrupted(RuntimeError):
    pass


def main(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("--stall-at", type=int, default=None)
    args = parser.parse_args(argv)
    workdir = args.workdir
    # One process trains at a time: a second one started beside the first
    # (its imports done) waits here until the first one exits or is killed.
    import fcntl  # POSIX only; the tests that run this skip elsewhere

    lock = open(os.path.join(workdir, "lock"), "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    keras.utils.set_random_seed(0)  # the initial weights; not the DP noise
    x, y = make_data()
    model = build_model()
    logger = keras_dp.EpsilonLogger(delta=DELTA)
    history = model.fit(
        x,
        y,
        batch_size=BATCH_SIZE,
        epochs=EPOCHS,
        verbose=0,
        callbacks=[
            keras.callbacks.BackupAndRestore(
                os.path.join(workdir, "backup"), save_freq=SAVE_FREQ
            ),
            Recorder(
                os.path.join(workdir, "log.jsonl"),
                stall_at=args.stall_at,
                marker=os.path.join(workdir, "stalled"),
            ),
            logger,
        ],
    )
    optimizer = model.optimizer
    steps = ledger_lib.optimizer_steps(model)
    result = {
        "backend": keras.backend.backend(),
        "updates": ledger_lib.optimizer_updates(optimizer),
        "steps": steps,
        "ledger": optimizer.privacy_ledger.get_config(),
        "ledger_epsilon": optimizer.privacy_ledger.epsilon(steps, DELTA),
        "logged_epsilon": history.history["epsilon"],
        "logger_epsilon": logger.epsilon(),
        "summary": keras_dp.privacy_summary(model, delta=DELTA),
        "checksum": checksum(model),
    }
    with open(os.path.join(workdir, "result.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1:])
