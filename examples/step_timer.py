"""Steps per second of a `fit`, for the examples' and benchmarks' reports."""

import statistics
import time

import keras


class StepTimer(keras.callbacks.Callback):
    """Train steps per second, leaving out the first epoch (it compiles)
    when there are several."""

    def __init__(self):
        super().__init__()
        self.epochs = []

    def on_epoch_begin(self, epoch, logs=None):
        self.start, self.steps = time.perf_counter(), 0

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append((self.steps, time.perf_counter() - self.start))

    def steps_per_second(self):
        timed = self.epochs[1:] or self.epochs
        steps = sum(s for s, _ in timed)
        seconds = sum(t for _, t in timed)
        return steps / seconds if seconds else float("nan")

    def seconds_per_step(self):
        """The median over epochs (after the first, when there are several)
        of each epoch's seconds per step."""
        timed = [(s, t) for s, t in (self.epochs[1:] or self.epochs) if s]
        return statistics.median(t / s for s, t in timed) if timed else float("nan")
