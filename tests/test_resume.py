"""Preemption: states written atomically, damaged ones skipped, runs resumed exactly."""

import json
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from keras_mixer import checkpoint
from keras_mixer.model import MLPMixer
from conftest import INSTALLED
from conftest import ROOT
from conftest import subprocess_env

TINY = ["model.num_blocks=1", "model.hidden_dim=16", "model.tokens_mlp_dim=8",
        "model.channels_mlp_dim=16"]
ARGS = ["--config", "digits", "--verbose", "0", "--set", "epochs=8", "batch_size=128",
        "checkpoint_every=4", *TINY]  # 88 steps
TOTAL = 88

# -P: the checkout is not put on sys.path, so in the Colab lane train.py
# runs the installed wheel.
PYTHON_FLAGS = ["-P"] if INSTALLED else []


def start(workdir):
    return subprocess.Popen(
        [sys.executable, *PYTHON_FLAGS, str(ROOT / "train.py"), "--workdir", str(workdir), *ARGS],
        cwd=ROOT, env=subprocess_env(keras.backend.backend()),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def newest_step(workdir):
    states = checkpoint.list_states(workdir / "checkpoints")
    return int(states[0].stem.split("-")[1]) if states else 0


def interrupt(workdir, sig, after_step):
    process = start(workdir)
    while process.poll() is None and newest_step(workdir) < after_step:
        time.sleep(0.01)
    assert process.poll() is None, "the run ended before it could be interrupted:\n" + process.stdout.read()
    process.send_signal(sig)
    output = process.communicate(timeout=300)[0]
    return process.returncode, output


def weights(workdir):
    import keras_mixer  # noqa: F401  (registers MLPMixer for loading)

    return keras.saving.load_model(workdir / "model.keras").get_weights()


def test_sigterm_and_sigkill_then_resume_match_an_uninterrupted_run(tmp_path):
    reference = start(tmp_path / "reference")
    output = reference.communicate(timeout=600)[0]
    assert reference.returncode == 0, output[-3000:]

    run = tmp_path / "interrupted"
    code, output = interrupt(run, signal.SIGTERM, after_step=8)
    assert code == 143, output[-3000:]
    assert "Stopped by SIGTERM at step" in output
    stopped = newest_step(run)
    assert 8 <= stopped < TOTAL

    code, output = interrupt(run, signal.SIGKILL, after_step=stopped + 8)
    assert code == -signal.SIGKILL
    assert f"Resuming from" in output and f"at step {stopped} of {TOTAL}" in output
    killed = newest_step(run)
    assert stopped < killed < TOTAL

    final = start(run)
    output = final.communicate(timeout=600)[0]
    assert final.returncode == 0, output[-3000:]
    assert f"at step {killed} of {TOTAL}" in output
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == TOTAL and results["resumed_from"] == killed
    expected = json.loads((tmp_path / "reference" / "results.json").read_text())
    assert results["test_accuracy"] == pytest.approx(expected["test_accuracy"], abs=1e-6)
    for a, b in zip(weights(tmp_path / "reference"), weights(run)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def tiny_model():
    model = MLPMixer(image_shape=(8, 8, 1), num_classes=3, patch_size=4, num_blocks=1,
                     hidden_dim=4, tokens_mlp_dim=2, channels_mlp_dim=4)
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    return model


def test_a_truncated_state_is_detected_and_the_previous_one_used(tmp_path, caplog):
    model = tiny_model()
    kernel = model.get_layer("stem").kernel
    for step in (5, 10):
        kernel.assign(np.full(kernel.shape, step, "float32"))
        checkpoint.save_state(tmp_path, model, step)
    newest = checkpoint.state_path(tmp_path, 10)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # cut mid-write

    restored = tiny_model()
    header = checkpoint.restore_latest(tmp_path, restored)
    assert header["step"] == 5
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(restored.get_layer("stem").kernel), 5)
    assert "state-000000010.npz is damaged" in caplog.text
    assert not list(tmp_path.glob(".*tmp"))


def test_states_keep_the_newest_and_refuse_another_model(tmp_path):
    model = tiny_model()
    for step in (1, 2, 3):
        checkpoint.save_state(tmp_path, model, step, keep=2)
    assert [p.name for p in checkpoint.list_states(tmp_path)] == [
        "state-000000003.npz", "state-000000002.npz"]
    other = MLPMixer(image_shape=(8, 8, 1), num_classes=3, patch_size=4, num_blocks=1,
                     hidden_dim=8, tokens_mlp_dim=2, channels_mlp_dim=4)
    other.compile(optimizer="adam", loss="categorical_crossentropy")
    with pytest.raises(ValueError, match="has shape .* a different config. Use a new work directory"):
        checkpoint.restore_latest(tmp_path, other)
