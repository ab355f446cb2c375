"""The fit loop's callbacks, each on its own: preemption, states, NaN, throughput, EMA, best model."""

import os
import signal

import keras
import numpy as np
import pytest

from keras_mixer import callbacks
from keras_mixer import checkpoint
from keras_mixer.model import MLPMixer


def tiny_model(optimizer="sgd"):
    model = MLPMixer(image_shape=(8, 8, 1), num_classes=3, patch_size=4, num_blocks=1,
                     hidden_dim=4, tokens_mlp_dim=2, channels_mlp_dim=4)
    model.compile(optimizer=optimizer, loss=keras.losses.CategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])
    return model


def data(n=16, value=1.0):
    x = np.random.default_rng(0).uniform(0, 255, (n, 8, 8, 1)).astype("float32")
    y = np.eye(3, dtype="float32")[np.arange(n) % 3] * value
    return x, y


def test_preemption_notes_sigterm_only_while_installed():
    before = signal.getsignal(signal.SIGTERM)
    with callbacks.Preemption() as preemption:
        assert not preemption.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert preemption.requested
    assert signal.getsignal(signal.SIGTERM) is before
    assert not preemption.requested  # cleared for the next run


def test_state_saver_writes_every_n_steps_and_at_epoch_end(tmp_path):
    model = tiny_model()
    saver = callbacks.StateSaver(tmp_path, every=3, keep=10)
    saver.begin_segment(0)
    x, y = data()
    model.fit(x, y, batch_size=2, epochs=1, callbacks=[saver], verbose=0)  # 8 steps
    steps = sorted(int(p.stem.split("-")[1]) for p in checkpoint.list_states(tmp_path))
    assert steps == [3, 6, 8] and saver.step == 8 and not saver.preempted


def test_state_saver_stops_on_preemption_with_a_state(tmp_path):
    model = tiny_model()
    preemption = callbacks.Preemption()
    preemption.request()
    saver = callbacks.StateSaver(tmp_path, every=0, keep=2, preemption=preemption)
    saver.begin_segment(10)
    x, y = data()
    logged = []

    class Epochs(keras.callbacks.Callback):
        def on_test_begin(self, logs=None):
            logged.append("validation")

        def on_epoch_end(self, epoch, logs=None):
            logged.append("epoch end")

    # fit ends at the first step: no validation spends the grace period and
    # no partial epoch reaches the logs.
    with pytest.raises(callbacks.Preempted):
        model.fit(x, y, batch_size=2, epochs=1, validation_data=(x, y), callbacks=[saver, Epochs()],
                  verbose=0)
    assert saver.preempted and saver.step == 11 and logged == []
    assert [p.name for p in checkpoint.list_states(tmp_path)] == ["state-000000011.npz"]


def test_stop_on_nan_raises_and_writes_nothing_diverged(tmp_path):
    model = tiny_model(keras.optimizers.SGD(learning_rate=1e30))
    saver = callbacks.StateSaver(tmp_path, every=1, keep=100)
    best = callbacks.BestModel(tmp_path / "best.keras")
    x, y = data(value=1e30)
    with pytest.raises(FloatingPointError, match="Try a lower learning_rate") as error:
        model.fit(x, y, batch_size=2, epochs=3, validation_data=(x, y),
                  callbacks=[callbacks.StopOnNaN(saver), best, saver], verbose=0)
    # Up to the bad step, every step whose weights were finite wrote its
    # state (every=1); no state holds non-finite weights, and best.keras
    # was never written from a diverged model.
    message = str(error.value)
    step = int(message.split(" at step ")[1].split()[0])
    written = sorted(int(p.stem.split("-")[1]) for p in checkpoint.list_states(tmp_path))
    assert written == list(range(1, len(written) + 1)) and len(written) < step
    newest = f"The states up to step {written[-1]} are kept." if written else "No state had been written yet."
    assert newest in message and "in a new --workdir" in message
    for path in checkpoint.list_states(tmp_path):
        arrays = np.load(path)
        assert all(np.isfinite(arrays[k]).all() for k in arrays.files if k.startswith("model/"))
    assert not (tmp_path / "best.keras").exists() or best.best > -np.inf


def test_throughput_logs_images_per_second_and_the_learning_rate():
    model = tiny_model(keras.optimizers.SGD(learning_rate=0.25))
    x, y = data()
    history = model.fit(x, y, batch_size=4, epochs=2, callbacks=[callbacks.Throughput(4)], verbose=0)
    assert len(history.history["images_per_second"]) == 2
    assert min(history.history["images_per_second"]) > 0
    assert history.history["learning_rate"] == [0.25, 0.25]


def test_keep_raw_weights_restores_them_when_the_next_fit_starts():
    model = tiny_model(keras.optimizers.SGD(learning_rate=0.1, use_ema=True, ema_momentum=0.5))
    keeper = callbacks.KeepRawWeights()
    x, y = data()
    model.fit(x, y, batch_size=4, epochs=1, callbacks=[keeper], verbose=0)
    averaged = [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]
    raw = keeper._stash
    assert any(not np.allclose(a, r) for a, r in zip(averaged, raw))  # fit ended on the EMA
    restored = []

    class Probe(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            restored.extend(keras.ops.convert_to_numpy(v) for v in self.model.trainable_variables)

    model.fit(x, y, batch_size=4, epochs=1, callbacks=[keeper, Probe()], verbose=0)
    for got, want in zip(restored, raw):
        np.testing.assert_array_equal(got, want)


def test_best_model_starts_from_the_recorded_score_and_saves_the_ema_weights(tmp_path):
    model = tiny_model(keras.optimizers.SGD(learning_rate=0.1, use_ema=True, ema_momentum=0.5))
    x, y = data()
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    for variable in model.trainable_variables:  # raw weights that differ from their averages
        variable.assign(variable + 1.0)
    best = callbacks.BestModel(tmp_path / "best.keras", best=0.6)  # as a resumed run's state says
    best.set_model(model)
    best.on_epoch_end(0, {"val_accuracy": 0.5})
    assert not (tmp_path / "best.keras").exists()
    raw = [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]
    averages = [keras.ops.convert_to_numpy(v) for v in model.optimizer._model_variables_moving_average]
    assert any(not np.allclose(r, a) for r, a in zip(raw, averages))
    best.on_epoch_end(1, {"val_accuracy": 0.7})
    saved = keras.saving.load_model(tmp_path / "best.keras")
    for got, want in zip(saved.trainable_variables, averages):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(got), want)
    for got, want in zip(model.trainable_variables, raw):  # training goes on from the raw ones
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(got), want)


def test_best_model_saves_only_on_improvement(tmp_path):
    model = tiny_model()
    best = callbacks.BestModel(tmp_path / "best.keras")
    best.set_model(model)
    best.on_epoch_end(0, {"val_accuracy": 0.5})
    first = (tmp_path / "best.keras").stat().st_mtime_ns
    best.on_epoch_end(1, {"val_accuracy": 0.4})
    assert (tmp_path / "best.keras").stat().st_mtime_ns == first and best.best == 0.5
    best.on_epoch_end(2, {"val_accuracy": 0.7})
    assert best.best == 0.7 and not list(tmp_path.glob(".*tmp*"))
    pytest.importorskip("keras").saving.load_model(tmp_path / "best.keras")
