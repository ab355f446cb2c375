import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import keras

from keras_mixer import checkpoint
from keras_mixer import configs
from keras_mixer import training
from keras_mixer.model import MLPMixer
from keras_mixer.weights import official_variables
from keras_mixer.data import digits_datasets
from keras_mixer.data import load_digits
from base import to_numpy
from conftest import INSTALLED
from conftest import ROOT
from conftest import subprocess_env

# -P: the checkout is not put on sys.path, so in the Colab lane train.py
# runs the installed wheel.
PYTHON_FLAGS = ["-P"] if INSTALLED else []


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
    model = MLPMixer(image_shape=(8, 8, 1), num_classes=3, patch_size=4, num_blocks=1,
                     hidden_dim=4, tokens_mlp_dim=2, channels_mlp_dim=4)
    for optimizer in ("adamw", "sgd"):
        opt = training.make_optimizer(1.0, total_steps=10, warmup_steps=0, weight_decay=0.5,
                                      grad_clip_norm=1.0, optimizer=optimizer)
        for w in model.weights:
            w.assign(np.ones(w.shape, "float32"))
        opt.apply_gradients([(keras.ops.zeros(w.shape), w) for w in model.trainable_weights])
        for w in model.trainable_weights:
            name = w.path.split("/")[-1]
            changed = not np.all(to_numpy(w) == 1.0)
            assert changed == (name == "kernel"), (optimizer, w.path)  # head/bias too


def test_segments_split_resumed_runs_into_whole_keras_epochs():
    assert list(training._segments(0, 30, 10)) == [(0, 3, 10, 0)]
    assert list(training._segments(13, 30, 10)) == [(1, 1, 7, 13), (2, 1, 10, 20)]
    assert list(training._segments(13, 45, 10)) == [(1, 1, 7, 13), (2, 2, 10, 20), (4, 1, 5, 40)]
    assert list(training._segments(30, 30, 10)) == []


def test_linear_schedule_values_and_serialization():
    schedule = training.WarmupLinearDecay(1e-3, warmup_steps=100, total_steps=1100)
    values = [float(to_numpy(schedule(s))) for s in (0, 50, 100, 600, 1100, 1200)]
    np.testing.assert_allclose(values, [0, 5e-4, 1e-3, 5e-4, 0, 0], atol=1e-9)
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(schedule))
    assert float(to_numpy(again(600))) == pytest.approx(5e-4)
    cosine = training.make_schedule("cosine", 0.03, total_steps=1000, warmup_steps=100)
    np.testing.assert_allclose(
        [float(to_numpy(cosine(s))) for s in (0, 100, 550, 1000)], [0, 0.03, 0.015, 0], atol=1e-7
    )
    with pytest.raises(ValueError, match="warmup_steps < total_steps"):
        training.WarmupLinearDecay(1e-3, warmup_steps=10, total_steps=10)


def test_train_writes_log_checkpoints_and_results(tmp_path):
    results = training.train(tiny_config(), tmp_path, verbose=0)
    assert results["backend"] == keras.backend.backend() and results["steps"] == 22
    assert 0.0 <= results["test_accuracy"] <= results["test_top5"] <= 1.0
    assert results["images_per_second"] > 0
    with open(tmp_path / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    assert {"loss", "accuracy", "top5", "val_accuracy", "images_per_second", "learning_rate"} <= set(rows[0])
    assert json.loads((tmp_path / "results.json").read_text()) == results
    config = json.loads((tmp_path / "config.json").read_text())
    assert config == training.resolve_config(config)  # resolved, and round trips
    assert config["epochs"] == 2 and config["optimizer"] == "adamw"
    assert [p.name for p in checkpoint.list_states(tmp_path / "checkpoints")] == [
        "state-000000022.npz", "state-000000011.npz"]
    assert (tmp_path / "best.keras").exists() and list((tmp_path / "tensorboard").iterdir())
    model = keras.saving.load_model(tmp_path / "model.keras")
    _, (x_test, y_test) = load_digits()
    accuracy = (to_numpy(model.predict(x_test, verbose=0)).argmax(1) == y_test).mean()
    assert accuracy == pytest.approx(results["test_accuracy"], abs=1e-6)
    assert not list(tmp_path.glob(".*tmp*"))
    # The same call again finds the run finished: no step is repeated.
    again = training.train(tiny_config(crop_area=(0.05, 1.0)), tmp_path, verbose=0)  # tuple == list
    assert again["resumed_from"] == 22 and again["steps"] == 22
    with pytest.raises(ValueError, match="holds a run with a different config"):
        training.train(tiny_config(seed=1), tmp_path, verbose=0)


def test_options_mixed_precision_ema_accumulation_sigmoid(tmp_path, monkeypatch, caplog):
    from keras_mixer import runtime

    config = tiny_config(mixed_precision=True, ema_momentum=0.9, grad_accum_steps=2,
                         loss="sigmoid_xent", label_smoothing=0.0, optimizer="sgd",
                         learning_rate=0.1)
    # The tests run on CPUs; as on one without bfloat16 matrix instructions,
    # the run says that bfloat16 will be slow, and goes on.
    monkeypatch.setattr(runtime, "cpu_has_bf16_matmul", lambda: False)
    with caplog.at_level("WARNING"):
        results = training.train(config, tmp_path, verbose=0)
    assert "mixed_precision=True on a CPU without bfloat16 matrix instructions" in caplog.text
    # 2 epochs of 11 updates, each averaging 2 micro-batches of 64.
    assert results["steps"] == 2 * 11
    assert np.isfinite(results["test_loss"])
    assert keras.config.dtype_policy().name == "float32"  # restored
    model = keras.saving.load_model(tmp_path / "model.keras")
    assert model.get_layer("stem").kernel.dtype == "float32"


def test_nan_loss_stops_with_the_step_and_advice(tmp_path):
    config = tiny_config(optimizer="sgd", learning_rate=1e30, grad_clip_norm=None,
                         warmup_fraction=0.0, label_smoothing=0.0)
    with pytest.raises(FloatingPointError, match=r"became (nan|inf) at step \d+ .*Try a lower learning_rate"):
        training.train(config, tmp_path, verbose=0)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"epoch": 3}, r"Unknown config key\(s\) \['epoch'\]. Valid keys: .*batch_size"),
        ({"dataset": "mnist_typo"}, r"Unknown tensorflow-datasets name 'mnist_typo'"),
        ({"batch_size": 0}, r"`batch_size` must be a positive integer"),
        ({"batch_size": "64"}, r"`batch_size` must be int, got '64'"),
        ({"optimizer": "lamb"}, r"`optimizer` must be one of adamw, sgd"),
        ({"recipe": "distill"}, r"Unknown recipe 'distill'. Valid: pretrain, finetune"),
    ],
)
def test_bad_config_is_rejected(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        training.train(tiny_config(**overrides), tmp_path, verbose=0)


def test_overrides_parse_literals_and_model_keys():
    got = training.parse_overrides(
        ["epochs=3", "learning_rate=3e-4", "variant=B/16", "crop_area=[0.08, 1.0]",
         "ema_momentum=None", "flip=False", "model.dropout_rate=0.1"]
    )
    assert got == {"epochs": 3, "learning_rate": 3e-4, "variant": "B/16",
                   "crop_area": [0.08, 1.0], "ema_momentum": None, "flip": False,
                   "model": {"dropout_rate": 0.1}}
    config = training.apply_overrides(configs.get("digits"), got)
    assert config["model"]["dropout_rate"] == 0.1 and config["model"]["num_blocks"] == 4
    with pytest.raises(ValueError, match=r"Unknown config key\(s\) \['epoc'\]"):
        training.parse_overrides(["epoc=3"])
    with pytest.raises(ValueError, match="expects key=value"):
        training.parse_overrides(["epochs"])


def test_recipes_resolve_under_config_values():
    config = training.resolve_config(configs.get("imagenet1k_pretrain"))
    assert (config["optimizer"], config["schedule"], config["warmup_steps"]) == ("adamw", "linear", 10_000)
    assert (config["beta_2"], config["grad_clip_norm"], config["weight_decay"]) == (0.999, 1.0, 0.1)
    finetune = training.resolve_config(configs.get("cifar10_finetune"))
    assert (finetune["optimizer"], finetune["momentum"], finetune["weight_decay"]) == ("sgd", 0.9, 0.0)
    assert finetune["reset_head"] and finetune["schedule"] == "cosine"


def test_unknown_config_name_lists_available():
    with pytest.raises(ValueError, match=r"Unknown config 'imagenet'. Available configs: cifar10_finetune, digits"):
        configs.get("imagenet")


def test_cifar10_finetune_runs_on_mock_data_from_a_checkpoint(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    tiny = dict(patch_size=8, num_blocks=1, hidden_dim=8, tokens_mlp_dim=4, channels_mlp_dim=8)
    pretrained = MLPMixer(image_shape=(32, 32, 3), num_classes=1000, **tiny)
    params = {k: to_numpy(v) + 0.5 for k, v in official_variables(pretrained).items()}
    np.savez(tmp_path / "pretrained.npz", **params)
    config = training.apply_overrides(configs.get("cifar10_finetune"), dict(
        variant=None, model={}, image_size=64, batch_size=8, train_steps=3,
        steps_per_epoch=3, warmup_steps=1, init_checkpoint=str(tmp_path / "pretrained.npz"),
    ))
    with tfds.testing.mock_data(num_examples=24):
        results = training.train(config, tmp_path / "run", verbose=0)
    assert results["steps"] == 3 and 0 <= results["test_accuracy"] <= 1
    model = keras.saving.load_model(tmp_path / "run" / "model.keras")
    # The LayerNorm scale starts at the checkpoint's 1.5 (a fresh one is 1.0)
    # and moves little in 3 small steps.
    np.testing.assert_allclose(
        to_numpy(model.get_layer("pre_head_layer_norm").gamma),
        params["pre_head_layer_norm/scale"], atol=0.1)
    assert model.output_shape == (None, 10)  # a fresh 10-class head
    # 64 px from a 32-px checkpoint: Appendix C, 4x the tokens and token-MLP width.
    assert model.num_tokens == 64 and model.tokens_mlp_dim == 16
    with tfds.testing.mock_data(num_examples=24):
        with pytest.raises(ValueError, match=r"is not a B/16 .*Set `variant` to the checkpoint's"):
            training.train(training.apply_overrides(config, {"variant": "B/16"}),
                           tmp_path / "run3", verbose=0)
    with tfds.testing.mock_data(num_examples=24):
        with pytest.raises(FileNotFoundError, match="neither an existing .npz file nor a released"):
            training.train(training.apply_overrides(config, {"init_checkpoint": "nowhere.npz"}),
                           tmp_path / "run2", verbose=0)


def run_train_py(args, timeout):
    return subprocess.run(
        [sys.executable, *PYTHON_FLAGS, str(ROOT / "train.py"), *args], cwd=ROOT,
        env=subprocess_env(keras.backend.backend()), capture_output=True,
        text=True, timeout=timeout,
    )


def test_train_py_help_documents_every_flag():
    result = run_train_py(["--help"], timeout=120)
    assert result.returncode == 0, result.stderr
    for flag in ("--config", "--set", "--workdir", "--epochs", "--batch_size", "--learning_rate",
                 "--weight_decay", "--seed", "--eval_only", "--checkpoint", "--verbose",
                 "KERAS_BACKEND", "resumes"):
        assert flag in result.stdout


@pytest.mark.slow
def test_train_py_reaches_98_percent_on_digits(tmp_path):
    result = run_train_py(["--workdir", str(tmp_path), "--verbose", "0"], timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    print(f"train.py on {results['backend']}: {results['test_accuracy']:.4f} in {results['seconds']} s")
    assert results["test_accuracy"] >= 0.98, results
    assert (tmp_path / "model.keras").exists() and (tmp_path / "log.csv").exists()


def test_eval_only_reports_the_saved_models_accuracy(tmp_path):
    results = training.train(tiny_config(), tmp_path, verbose=0)
    output = run_train_py(["--eval_only", "--checkpoint", str(tmp_path / "model.keras"),
                           "--verbose", "0"], timeout=300)
    assert output.returncode == 0, output.stderr[-3000:]
    assert f"accuracy {results['test_accuracy']:.4f}" in output.stdout
    missing = run_train_py(["--eval_only", "--checkpoint", str(tmp_path / "nope.keras")], timeout=300)
    assert missing.returncode != 0 and "nope.keras' does not exist" in missing.stderr
