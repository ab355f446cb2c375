import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import keras

from keras_mixer import configs
from keras_mixer import training
from keras_mixer.data import digits_datasets
from keras_mixer.data import load_digits
from base import to_numpy
from conftest import ROOT
from conftest import subprocess_env


def tiny_config(**overrides):
    config = configs.get("digits")
    config.update(epochs=2, batch_size=128)
    config["model"].update(num_blocks=1, hidden_dim=16, tokens_mlp_dim=8, channels_mlp_dim=16)
    config.update(overrides)
    return config


def test_digits_split_is_fixed_and_scaled():
    (x_train, y_train), (x_test, y_test) = load_digits()
    assert x_train.shape == (1437, 8, 8, 1) and x_test.shape == (360, 8, 8, 1)
    assert x_train.min() == 0 and x_train.max() == 255
    assert np.bincount(y_test).min() >= 35  # stratified: every class present
    (again, _), _ = load_digits()
    np.testing.assert_array_equal(x_train, again)


def test_digits_pipeline_batches_shifts_and_is_deterministic():
    def first_batch(seed):
        train, _, steps = digits_datasets(32, seed=seed, shift_pixels=1)
        return steps, next(iter(train))

    steps, (images, labels) = first_batch(3)
    assert steps == 1437 // 32
    assert images.shape == (32, 8, 8, 1) and labels.shape == (32, 10)
    np.testing.assert_array_equal(labels.numpy().sum(1), 1)
    _, (images_again, _) = first_batch(3)
    np.testing.assert_array_equal(images.numpy(), images_again.numpy())
    _, (other, _) = first_batch(4)
    assert not np.array_equal(images.numpy(), other.numpy())


@pytest.mark.parametrize("shift", [0, 1])
def test_digits_pipeline_shifts_by_at_most_shift_pixels(shift):
    (x_train, y_train), _ = load_digits()
    padded = np.pad(x_train, ((0, 0), (1, 1), (1, 1), (0, 0)))
    allowed = [(dy, dx) for dy in range(1 - shift, 2 + shift) for dx in range(1 - shift, 2 + shift)]
    candidates = {
        (dy, dx): padded[:, dy:dy + 8, dx:dx + 8].reshape(len(x_train), -1) for dy, dx in allowed
    }
    train, _, _ = digits_datasets(64, seed=0, shift_pixels=shift)
    images, labels = next(iter(train))
    used = set()
    for image, label in zip(images.numpy().reshape(64, -1), labels.numpy().argmax(1)):
        matches = [
            key for key, flat in candidates.items()
            if np.any(np.all(flat[y_train == label] == image, axis=1))
        ]
        assert matches, "an image that is no allowed shift of a training image of its class"
        used.update(matches)
    if shift:
        assert len(used) > 1  # shifts do happen


def test_weight_decay_applies_to_kernels_only():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.LayerNormalization()])
    optimizer = training.make_optimizer(1.0, total_steps=10, warmup_steps=0, weight_decay=0.5, grad_clip_norm=1.0)
    for w in model.weights:
        w.assign(np.ones(w.shape, "float32"))
    optimizer.apply_gradients([(keras.ops.zeros(w.shape), w) for w in model.trainable_weights])
    after = {w.path.split("/")[-1]: to_numpy(w) for w in model.weights}
    assert np.all(after["kernel"] < 1.0)  # decayed
    for name in ("bias", "gamma", "beta"):
        np.testing.assert_array_equal(after[name], 1.0)


def test_train_writes_log_model_and_results(tmp_path):
    results = training.train(tiny_config(), tmp_path, verbose=0)
    assert results["backend"] == keras.backend.backend()
    assert 0.0 <= results["test_accuracy"] <= 1.0
    with open(tmp_path / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and {"loss", "accuracy", "val_accuracy"} <= set(rows[0])
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert json.loads((tmp_path / "config.json").read_text())["epochs"] == 2
    model = keras.saving.load_model(tmp_path / "model.keras")
    _, (x_test, y_test) = load_digits()
    accuracy = (to_numpy(model.predict(x_test, verbose=0)).argmax(1) == y_test).mean()
    assert accuracy == pytest.approx(results["test_accuracy"], abs=1e-6)
    assert not list(tmp_path.glob(".*tmp*"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"epoch": 3}, r"Unknown config key\(s\) \['epoch'\]"),
        ({"dataset": "mnist"}, r"Unknown dataset 'mnist'. Supported: digits"),
        ({"batch_size": 0}, r"`batch_size` must be a positive integer"),
    ],
)
def test_bad_config_is_rejected(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        training.train(tiny_config(**overrides), tmp_path, verbose=0)


def test_unknown_config_name_lists_available():
    with pytest.raises(ValueError, match=r"Unknown config 'imagenet'. Available configs: digits"):
        configs.get("imagenet")


def run_train_py(args, timeout):
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT,
        env=subprocess_env(keras.backend.backend()), capture_output=True,
        text=True, timeout=timeout,
    )


def test_train_py_help_documents_every_flag():
    result = run_train_py(["--help"], timeout=120)
    assert result.returncode == 0, result.stderr
    for flag in ("--config", "--workdir", "--epochs", "--batch_size", "--learning_rate",
                 "--weight_decay", "--seed", "--verbose", "KERAS_BACKEND"):
        assert flag in result.stdout


@pytest.mark.slow
def test_train_py_reaches_98_percent_on_digits(tmp_path):
    result = run_train_py(["--workdir", str(tmp_path), "--verbose", "0"], timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    print(f"train.py on {results['backend']}: {results['test_accuracy']:.4f} in {results['seconds']} s")
    assert results["test_accuracy"] >= 0.98, results
    assert (tmp_path / "model.keras").exists() and (tmp_path / "log.csv").exists()
