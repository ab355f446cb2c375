"""Single-purpose callbacks that `training.train` composes around `model.fit`.

- `Preemption`: notes SIGTERM (preemptible VMs and Colab send it before
  killing) on the instance, while installed.
- `StateSaver`: counts the global step; writes a training state every N
  steps, at every epoch end, and on preemption (then stops the run).
- `StopOnNaN`: stops the run when the loss stops being finite, with a
  message that names the fixes and the last good state.
- `Throughput`: images per second and the learning rate, per epoch, into
  the logs (so `CSVLogger` and TensorBoard record them).
- `KeepRawWeights`: with EMA, `fit` ends on the averaged weights; this
  puts the raw ones back when the next `fit` call of the run starts.
- `BestModel`: `best.keras` whenever validation accuracy improves.

Order matters where one reads what another writes: `StopOnNaN` before
`StateSaver` (no state is written from a diverged step), `Throughput`
before `CSVLogger`, `KeepRawWeights` before `keras.callbacks.SwapEMAWeights`.
"""

import logging
import math
import signal
import threading
import time

import keras
import numpy as np

from keras_mixer import checkpoint


class Preemption:
    """SIGTERM handling for one run: `with Preemption() as p:`, then `p.requested`.

    The handler only sets an event; `StateSaver` writes a state at the next
    step boundary. Off the main thread (where Python allows no signal
    handlers) it installs nothing and is never requested.
    """

    def __init__(self):
        self._event = threading.Event()
        self._previous = None

    @property
    def requested(self):
        return self._event.is_set()

    def request(self):
        self._event.set()

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda signum, frame: self.request())
        return self

    def __exit__(self, *exc_info):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
        self._event.clear()


class StateSaver(keras.callbacks.Callback):
    """Tracks the global step and writes `state-<step>.npz` files.

    States are written every `every` steps (0: only at epoch ends), at each
    epoch end, and when `preemption` is requested; then the run stops and
    `preempted` is set. A step on which another callback stopped the run
    (`StopOnNaN`) writes nothing.

    Args:
        directory: where the states go.
        every: int, steps between states.
        keep: int, states kept.
        preemption: a `Preemption`, or None.
        chief: whether this host writes the files (every host takes part in
            gathering sharded arrays).
    """

    def __init__(self, directory, every, keep, preemption=None, chief=True):
        super().__init__()
        self.directory = directory
        self.every = every
        self.keep = keep
        self.preemption = preemption
        self.chief = chief
        self.step = self.last_saved = self._epoch_start = 0
        self.preempted = False

    def begin_segment(self, first_step):
        """Called before each `fit` call with the global step it starts at."""
        self.step = self.last_saved = self._epoch_start = first_step

    def save(self):
        checkpoint.save_state(self.directory, self.model, self.step, keep=self.keep, write=self.chief)
        self.last_saved = self.step

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = self.step

    def on_train_batch_end(self, batch, logs=None):
        self.step = self._epoch_start + batch + 1
        if self.model.stop_training:
            return
        if self.preemption is not None and self.preemption.requested:
            self.save()
            self.preempted = True
            self.model.stop_training = True
        elif self.every and self.step // self.every > self.last_saved // self.every:
            self.save()

    def on_epoch_end(self, epoch, logs=None):
        if not self.model.stop_training:
            self.save()


class StopOnNaN(keras.callbacks.Callback):
    """Stops the run at the first non-finite training loss; `message` says why.

    Args:
        saver: the run's `StateSaver`, for the step and the last good state.
    """

    def __init__(self, saver):
        super().__init__()
        self.saver = saver
        self.message = None

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is None or math.isfinite(float(loss)):
            return
        step = self.saver.step + 1  # The saver, after this callback, counts this step.
        lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        self.message = (
            f"The training loss became {float(loss)} at step {step} "
            f"(learning rate {lr:.3g}). Try a lower learning_rate, a longer "
            "warmup, grad_clip_norm=1.0, or mixed_precision=False. The last "
            f"good state (step {self.saver.last_saved}) is kept: rerunning the "
            "same command with changed settings resumes from it."
        )
        logging.error(self.message)
        self.model.stop_training = True


class Throughput(keras.callbacks.Callback):
    """Adds `images_per_second` (training steps only) and `learning_rate` to each epoch's logs.

    Args:
        batch_size: images per step.
    """

    def __init__(self, batch_size):
        super().__init__()
        self.batch_size = batch_size

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()
        self._steps = 0
        self._seconds = None

    def on_train_batch_end(self, batch, logs=None):
        self._steps = batch + 1
        self._seconds = time.perf_counter() - self._start

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self._seconds:
            logs["images_per_second"] = self._steps * self.batch_size / self._seconds
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))


class KeepRawWeights(keras.callbacks.Callback):
    """With an EMA optimizer: keeps training on the raw weights across `fit` calls.

    `fit` replaces the weights by their average when it returns. A run made
    of several `fit` calls (`training._segments`) stashes the raw weights
    at each epoch end and puts them back when the next call begins; after
    the last call the model keeps the averages (what `model.keras` holds).
    """

    def __init__(self):
        super().__init__()
        self._stash = None

    def on_train_begin(self, logs=None):
        if self._stash is not None:
            for variable, value in zip(self.model.trainable_variables, self._stash):
                variable.assign(value)
            self._stash = None

    def on_epoch_end(self, epoch, logs=None):
        if self.model.optimizer.use_ema and not self.model.stop_training:
            self._stash = [keras.ops.convert_to_numpy(v) for v in self.model.trainable_variables]


class BestModel(keras.callbacks.Callback):
    """Saves `best.keras` (atomically) whenever `monitor` improves."""

    def __init__(self, path, monitor="val_accuracy", best=-np.inf):
        super().__init__()
        self.path = path
        self.monitor = monitor
        self.best = best

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is not None and value > self.best:
            self.best = float(value)
            checkpoint.save_model(self.model, self.path)
