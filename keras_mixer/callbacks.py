"""Single-purpose callbacks that `training.train` composes around `model.fit`.

- `Preemption`: notes SIGTERM (preemptible VMs and Colab send it before
  killing) on the instance, while installed.
- `StateSaver`: counts the global step; writes a training state every N
  steps, at every epoch end, and on preemption: then it raises `Preempted`,
  which ends `fit` at once (no validation spends the grace period, no
  partial epoch is logged).
- `StopOnNaN`: raises `FloatingPointError` at the first non-finite loss,
  with a message that names the fixes and the newest state.
- `Throughput`: images per second and the learning rate, per epoch, into
  the logs (so `CSVLogger` and TensorBoard record them).
- `EpochSpan`: the updates each log row covers (a resumed partial epoch
  starts late).
- `KeepRawWeights`: with EMA, `fit` ends on the averaged weights; this
  puts the raw ones back when the next `fit` call of the run starts.
- `BestModel`: `best.keras` whenever validation accuracy improves (the
  EMA weights when there are, which is what validation measured); its
  best score goes into every state, so a resumed run keeps it.

Order matters where one reads what another writes: `StopOnNaN` first (no
state or model is written from a diverged step), `BestModel` and
`CSVLogger` before `StateSaver` (best.keras and the epoch's log row are
written before the state that records them: a crash between the two
repeats the epoch, and `training` drops the rows a resume repeats),
`Throughput` and `EpochSpan` before `CSVLogger`, `KeepRawWeights` before
`keras.callbacks.SwapEMAWeights`, which needs a fresh instance for every
`fit` call: it keeps whether the EMA weights are in the model.
"""

import math
import signal
import threading
import time

import keras
import numpy as np

from keras_mixer import checkpoint
from keras_mixer import distribute
from keras_mixer import storage


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

    def agreed(self):
        """Whether any process of the run was sent SIGTERM. Every process must
        ask at the same step: in a multi-host run the answer is gathered from
        all of them (one small collective), so all stop at the same step and
        write one consistent state, whichever host was preempted."""
        return distribute.any_process(self.requested)

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


class Preempted(Exception):
    """Raised by `StateSaver` once the state of a preempted run is written."""


class StateSaver(keras.callbacks.Callback):
    """Tracks the global step and writes `state-<step>.npz` files.

    States are written every `every` steps (0: only at epoch ends), at each
    epoch end, and when `preemption` is requested; then `preempted` is set
    and `Preempted` raised. `header()` (optional) gives more fields for each
    state's header (the best score so far).

    Args:
        directory: where the states go.
        every: int, steps between states.
        keep: int, states kept.
        preemption: a `Preemption`, or None.
        chief: whether this host writes the files (every host takes part in
            gathering sharded arrays).
    """

    def __init__(self, directory, every, keep, preemption=None, chief=True, header=None):
        super().__init__()
        self.directory = directory
        self.every = every
        self.keep = keep
        self.preemption = preemption
        self.chief = chief
        self.header = header
        self.step = self.last_saved = self._epoch_start = 0
        self.preempted = False

    def begin_segment(self, first_step):
        """Called before each `fit` call with the global step it starts at."""
        self.step = self.last_saved = self._epoch_start = first_step

    def save(self):
        extra = self.header() if self.header else None
        try:
            checkpoint.save_state(self.directory, self.model, self.step, keep=self.keep, extra=extra,
                                  write=self.chief)
        except FloatingPointError as error:  # Non-finite weights: no state of them.
            lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            raise FloatingPointError(diverged_message(str(error), self.step, lr, self.last_saved)) from None
        self.last_saved = self.step

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = self.step

    def on_train_batch_end(self, batch, logs=None):
        self.step = self._epoch_start + batch + 1
        if self.model.stop_training:
            return
        if self.preemption is not None and self.preemption.agreed():
            self.save()
            self.preempted = True
            raise Preempted(f"preempted at step {self.step}")
        if self.every and self.step // self.every > self.last_saved // self.every:
            self.save()

    def on_epoch_end(self, epoch, logs=None):
        if not self.model.stop_training:
            self.save()


class StopOnNaN(keras.callbacks.Callback):
    """Raises `FloatingPointError` at the first non-finite training loss.

    It runs before anything writes at that step, so neither a state nor
    best.keras holds the diverged weights. The message names the fixes and
    the newest state (states are written only of finite weights).

    Args:
        saver: the run's `StateSaver`, for the step and the newest state.
    """

    def __init__(self, saver):
        super().__init__()
        self.saver = saver

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is None or math.isfinite(float(loss)):
            return
        step = self.saver.step + 1  # The saver, after this callback, counts this step.
        lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        raise FloatingPointError(diverged_message(f"The training loss became {float(loss)}", step, lr,
                                                  self.saver.last_saved))


def diverged_message(what, step, learning_rate, newest_state):
    """What to say when training diverges at `step`."""
    kept = (f"The states up to step {newest_state} are kept." if newest_state
            else "No state had been written yet.")
    return (
        f"{what} at step {step} (learning rate {learning_rate:.3g}). Try a lower "
        "learning_rate, a longer warmup, grad_clip_norm=1.0, or mixed_precision=False, "
        f"in a new --workdir (a work directory resumes only its own config). {kept}"
    )


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


class EpochSpan(keras.callbacks.Callback):
    """Adds `first_step` and `last_step` (optimizer updates) to each epoch's logs.

    A log row then says which updates it measured: a resumed partial epoch
    shows where it started. Reads the steps from the run's `StateSaver`.
    """

    def __init__(self, saver, accum_steps=1):
        super().__init__()
        self.saver = saver
        self.accum_steps = accum_steps

    def on_epoch_begin(self, epoch, logs=None):
        self._first = self.saver.step

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["first_step"] = self._first // self.accum_steps
            logs["last_step"] = self.saver.step // self.accum_steps


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
            self._stash = [distribute.variable_to_numpy(v) for v in self.model.trainable_variables]


class Upload(keras.callbacks.Callback):
    """Copies a local file or folder to its place in a remote work directory
    at every epoch end and when training ends (`storage`: an object is
    replaced whole)."""

    def __init__(self, local, remote):
        super().__init__()
        self.local, self.remote = local, remote

    def on_epoch_end(self, epoch, logs=None):
        storage.upload_folder(self.local, self.remote)

    def on_train_end(self, logs=None):
        storage.upload_folder(self.local, self.remote)


class BestModel(keras.callbacks.Callback):
    """Saves `best.keras` (atomically) whenever `monitor` improves.

    With an EMA optimizer, validation measured the averaged weights
    (`SwapEMAWeights`), so those are what best.keras holds. `best` is the
    score to beat: a resumed run passes the one its state recorded.
    """

    def __init__(self, path, monitor="val_accuracy", best=-np.inf, chief=True):
        super().__init__()
        self.path = path
        self.monitor = monitor
        self.best = best
        self.chief = chief  # every host saves (see checkpoint.save_model); the chief writes

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None or not math.isfinite(value) or value <= self.best or self.model.stop_training:
            return
        self.best = float(value)
        if not self.model.optimizer.use_ema:
            checkpoint.save_model(self.model, self.path, write=self.chief)
            return
        raw = [distribute.variable_to_numpy(v) for v in self.model.trainable_variables]
        self.model.optimizer.finalize_variable_values(self.model.trainable_variables)
        try:
            checkpoint.save_model(self.model, self.path, write=self.chief)
        finally:
            for variable, value in zip(self.model.trainable_variables, raw):
                variable.assign(value)
