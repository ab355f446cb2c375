"""The fit loop: files written, options, resume after SIGTERM and SIGKILL, train.py."""

import csv
import json
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from keras_mixer import checkpoint
from keras_mixer import config as config_lib
from keras_mixer import sources
from keras_mixer import training
from keras_mixer.model import MLPMixer
from keras_mixer.weights import official_variables
from base import tiny_config
from base import to_numpy
from conftest import INSTALLED
from conftest import ROOT
from conftest import in_the_colab_lane
from conftest import once
from conftest import subprocess_env

# -P: the checkout is not put on sys.path, so in the Colab lane train.py
# runs the installed wheel.
PYTHON_FLAGS = ["-P"] if INSTALLED else []
TINY = ["model.num_blocks=1", "model.hidden_dim=16", "model.tokens_mlp_dim=8",
        "model.channels_mlp_dim=16"]
ARGS = ["--config", "digits", "--verbose", "0", "--set", "epochs=8", "batch_size=128",
        "checkpoint_every=4", *TINY]  # 88 steps
TOTAL = 88


def test_segments_split_resumed_runs_into_whole_keras_epochs():
    assert list(training._segments(0, 30, 10)) == [(0, 3, 10, 0)]
    assert list(training._segments(13, 30, 10)) == [(1, 1, 7, 13), (2, 1, 10, 20)]
    assert list(training._segments(13, 45, 10)) == [(1, 1, 7, 13), (2, 2, 10, 20), (4, 1, 5, 40)]
    assert list(training._segments(30, 30, 10)) == []


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
    assert config == config_lib.resolve(config)  # resolved, and round trips
    assert config["epochs"] == 2 and config["optimizer"] == "adamw"
    assert [p.name for p in checkpoint.list_states(tmp_path / "checkpoints")] == [
        "state-000000022.npz", "state-000000011.npz"]
    assert (tmp_path / "best.keras").exists() and list((tmp_path / "tensorboard").iterdir())
    model = keras.saving.load_model(tmp_path / "model.keras")
    _, (x_test, y_test) = sources.load_digits()
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
                         learning_rate=0.1, mixup=0.2, cutmix=1.0)  # mixed in the train step
    # The tests run on CPUs; as on one without bfloat16 matrix instructions,
    # the run says that bfloat16 will be slow, and goes on.
    monkeypatch.setenv(runtime.BF16_OVERRIDE, "0")
    with caplog.at_level("WARNING"):
        results = training.train(config, tmp_path, verbose=0)
    why = "PyTorch emulates bfloat16" if keras.backend.backend() == "torch" else "XLA on the CPU"
    assert "mixed_precision=True on this CPU, where bfloat16 ran slower" in caplog.text
    assert why in caplog.text
    # 2 epochs of 11 updates, each averaging 2 micro-batches of 64.
    assert results["steps"] == 2 * 11
    assert np.isfinite(results["test_loss"])
    assert keras.config.dtype_policy().name == "float32"  # restored
    model = keras.saving.load_model(tmp_path / "model.keras")
    assert model.get_layer("stem").kernel.dtype == "float32"


@pytest.mark.parametrize("cpu_bf16", ["0", "1"])
def test_mixed_precision_auto_on_both_kinds_of_cpu(tmp_path, monkeypatch, capsys, cpu_bf16):
    """The default (mixed_precision="auto") on a CPU without and with
    bfloat16 matrix instructions, whichever this machine is: only PyTorch
    on such a CPU trains in bfloat16, and that model is what a user gets:
    its float32 weights, bfloat16 compute, and predictions that agree with
    the same weights computing in float32 to bfloat16's rounding."""
    from keras_mixer import runtime

    monkeypatch.setenv(runtime.BF16_OVERRIDE, cpu_bf16)
    config = tiny_config()
    assert "mixed_precision" not in config  # the default: "auto"
    results = training.train(config, tmp_path, verbose=0)
    bf16 = cpu_bf16 == "1" and keras.backend.backend() == "torch"
    policy = "mixed_bfloat16" if bf16 else "float32"
    assert f"Precision: {policy} (mixed_precision=auto:" in capsys.readouterr().out
    assert json.loads((tmp_path / "plan.json").read_text())["mixed_precision"] is bf16
    model = keras.saving.load_model(tmp_path / "model.keras")
    assert model.dtype_policy.name == policy and model.get_layer("stem").kernel.dtype == "float32"
    _, (x_test, y_test) = sources.load_digits()
    logits = to_numpy(model.predict(x_test, verbose=0)).astype("float32")
    assert (logits.argmax(1) == y_test).mean() == pytest.approx(results["test_accuracy"], abs=1e-6)
    as_float32 = MLPMixer.from_config(dict(model.get_config(), dtype="float32"))
    as_float32.set_weights(model.get_weights())
    expected = to_numpy(as_float32.predict(x_test, verbose=0))
    difference = np.abs(logits - expected).max()
    # bfloat16 keeps 8 significant bits: relative rounding of 2^-8 per op.
    assert difference <= (5e-2 * np.abs(expected).max() if bf16 else 1e-5), difference


def test_nan_loss_stops_with_the_step_and_advice(tmp_path):
    config = tiny_config(optimizer="sgd", learning_rate=1e30, grad_clip_norm=None,
                         warmup_fraction=0.0, label_smoothing=0.0)
    with pytest.raises(FloatingPointError, match=r"became (nan|inf) at step \d+ .*Try a lower learning_rate"):
        training.train(config, tmp_path, verbose=0)


def test_cifar10_finetune_runs_on_mock_data_from_a_checkpoint(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    tiny = dict(patch_size=8, num_blocks=1, hidden_dim=8, tokens_mlp_dim=4, channels_mlp_dim=8)
    pretrained = MLPMixer(image_shape=(32, 32, 3), num_classes=1000, **tiny)
    params = {k: to_numpy(v) + 0.5 for k, v in official_variables(pretrained).items()}
    np.savez(tmp_path / "pretrained.npz", **params)
    config = config_lib.apply_overrides(config_lib.load("cifar10_finetune"), dict(
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
            training.train(config_lib.apply_overrides(config, {"variant": "B/16"}),
                           tmp_path / "run3", verbose=0)
    with tfds.testing.mock_data(num_examples=24):
        with pytest.raises(FileNotFoundError, match="neither an existing .npz file nor a released"):
            training.train(config_lib.apply_overrides(config, {"init_checkpoint": "nowhere.npz"}),
                           tmp_path / "run2", verbose=0)


@pytest.mark.slow
@once("on TensorFlow and PyTorch, train.py runs start to finish in "
      "test_sigterm_and_sigkill_then_resume_match_an_uninterrupted_run and a digits "
      "Mixer learns in test_a_digits_mixer_learns_on_every_backend; 60 epochs of PyTorch "
      "eager cost CI 5 minutes")
def test_train_py_reaches_98_percent_on_digits(tmp_path):
    result = run_train_py(["--workdir", str(tmp_path), "--verbose", "0", "--quantize", "int8"], timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    print(f"train.py on {results['backend']}: {results['test_accuracy']:.4f} in {results['seconds']} s")
    assert results["test_accuracy"] >= 0.98, results
    assert (tmp_path / "model.keras").exists() and (tmp_path / "log.csv").exists()
    # --quantize int8: the quantized copy, and how well it agrees with the float model.
    import re

    agreement = re.search(r"model_int8.keras: int8 weights, .* top-1 agreement with the float model "
                          r"(\d\.\d{4}) on 128 evaluation images", result.stdout)
    assert agreement and float(agreement.group(1)) >= 0.97, result.stdout[-2000:]
    assert (tmp_path / "model_int8.keras").stat().st_size < (tmp_path / "model.keras").stat().st_size


def test_a_digits_mixer_learns_on_every_backend(trained):
    """The export tests' shared model (conftest's `trained`: 10 epochs of
    the digits recipe, 2 blocks of width 32) against chance (0.1): the
    recipe trains on this backend, where the 60-epoch run to 98% runs on
    JAX only. Measured: 0.90 on JAX, 0.82 on PyTorch."""
    results = json.loads((trained.parent / "results.json").read_text())
    assert results["backend"] == keras.backend.backend()
    assert results["test_accuracy"] >= 0.7, results


def test_mixing_on_the_host_trains_with_either_implementation(tmp_path):
    """`mix_on="host"`: KerasCV's (or Keras') layers mix in tf.data instead; they
    compute in float32 under the mixed precision `auto` picks on PyTorch."""
    for implementation in ("keras_cv", "keras"):
        config = tiny_config(epochs=1, mixup=0.2, cutmix=1.0, mix_on="host", augment_impl=implementation)
        results = training.train(config, tmp_path / implementation, verbose=0)
        assert results["steps"] == 11 and np.isfinite(results["test_loss"])


def test_eval_only_reports_the_saved_models_accuracy(tmp_path):
    results = training.train(tiny_config(), tmp_path, verbose=0)
    output = run_train_py(["--eval_only", "--checkpoint", str(tmp_path / "model.keras"),
                           "--verbose", "0"], timeout=300)
    assert output.returncode == 0, output.stderr[-3000:]
    assert f"top-1 {results['test_accuracy']:.4f}" in output.stdout
    # A missing checkpoint: test_train_py_user_errors_are_one_line_and_debug_shows_the_traceback.


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


def final_weights(workdir):
    import keras_mixer  # noqa: F401  (registers MLPMixer for loading)

    return keras.saving.load_model(workdir / "model.keras").get_weights()


@in_the_colab_lane("a Colab runtime that disconnects is preempted; on this pass's versions "
                   "test_launch stops train.py with SIGKILL and SIGTERM and resumes it exactly")
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
    assert "Resuming from" in output and f"at step {stopped} of {TOTAL}" in output
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
    for a, b in zip(final_weights(tmp_path / "reference"), final_weights(run)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def run_train_py(args, timeout):
    return subprocess.run(
        [sys.executable, *PYTHON_FLAGS, str(ROOT / "train.py"), *args], cwd=ROOT,
        env=subprocess_env(keras.backend.backend()), capture_output=True,
        text=True, timeout=timeout,
    )


def test_train_py_help_documents_every_flag():
    result = run_train_py(["--help"], timeout=120)
    assert result.returncode == 0, result.stderr
    for flag in ("--config", "--set", "--workdir", "--eval_only", "--checkpoint", "--verbose",
                 "--distribution", "--export", "KERAS_BACKEND", "resumes"):
        assert flag in result.stdout
    # Every config key, model keys included, is listed from the schema.
    keys = [line.split()[0] for line in result.stdout.split("config keys (")[1].splitlines()[1:]
            if line.startswith("  ")]
    assert keys == list(config_lib.KEYS) + [f"model.{k}" for k in config_lib.MODEL_KEYS]


def test_train_py_without_its_extra_names_the_one_to_install():
    # As in an environment with the core package only: scikit-learn and
    # TensorBoard are not found.
    code = ("import importlib.util, runpy, sys\n"
            "find = importlib.util.find_spec\n"
            "importlib.util.find_spec = lambda name, *a: None if name in ('sklearn', 'tensorboard') "
            "else find(name, *a)\n"
            "sys.argv = ['train.py']\n"
            f"runpy.run_path({str(ROOT / 'train.py')!r}, run_name='__main__')\n")
    result = subprocess.run([sys.executable, *PYTHON_FLAGS, "-c", code], cwd=ROOT,
                            env=subprocess_env(keras.backend.backend()), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-2:] == [
        "error: training needs sklearn, tensorboard, which this environment lacks: "
        'pip install "keras-mixer[train]" (or pip install -e ".[train]" in a checkout).',
        "(run with --debug or KERAS_MIXER_DEBUG=1 for the traceback)"]


# --- Faults: a run killed at a named moment, then resumed ------------------------


class Killed(BaseException):
    """Stands in for SIGKILL inside the test process: nothing after it runs."""


def kill_after_state(monkeypatch, step):
    """The next `train` dies right after the state of `step` is written."""
    real = checkpoint.save_state

    def save_state(directory, model, at, **kwargs):
        path = real(directory, model, at, **kwargs)
        if at == step:
            raise Killed(f"killed after the state of step {at}")
        return path

    monkeypatch.setattr(checkpoint, "save_state", save_state)
    return lambda: monkeypatch.setattr(checkpoint, "save_state", real)


def final_arrays(workdir):
    import keras_mixer  # noqa: F401  (registers MLPMixer for loading)

    states = checkpoint.list_states(workdir / "checkpoints")
    arrays = dict(np.load(states[0]))
    header = json.loads(str(arrays.pop("header")))
    model = keras.saving.load_model(workdir / "model.keras").get_weights()
    return header, arrays, model


def test_a_kill_mid_epoch_then_resume_is_bit_identical_with_ema(tmp_path, monkeypatch):
    # 3 epochs of 11 steps; states every 4 steps. The kill comes right after
    # the mid-epoch state of step 16 (epoch 2, step 5 of 11). Without EMA the
    # same is shown with real signals by test_sigterm_and_sigkill_then_resume_...
    # MixUp and CutMix in the train step draw from the step, so they replay too.
    config = tiny_config(epochs=3, checkpoint_every=4, ema_momentum=0.9, mixup=0.5, cutmix=1.0)
    reference = training.train(config, tmp_path / "reference", verbose=0)
    restore = kill_after_state(monkeypatch, 16)
    with pytest.raises(Killed):
        training.train(config, tmp_path / "run", verbose=0)
    restore()
    resumed = training.train(config, tmp_path / "run", verbose=0)
    assert resumed["resumed_from"] == 16 and resumed["steps"] == reference["steps"] == 33
    header_a, state_a, model_a = final_arrays(tmp_path / "reference")
    header_b, state_b, model_b = final_arrays(tmp_path / "run")
    # (Variable paths carry per-process name counters: adam_w, adam_w_1, ...)
    assert {k: v for k, v in header_a.items() if k not in ("model", "optimizer")} == {
        k: v for k, v in header_b.items() if k not in ("model", "optimizer")}
    assert set(state_a) == set(state_b)
    for key in state_a:  # weights, optimizer moments, EMA averages, step counters
        np.testing.assert_array_equal(state_a[key], state_b[key], err_msg=key)
    for a, b in zip(model_a, model_b):
        np.testing.assert_array_equal(a, b)
    assert resumed["test_accuracy"] == reference["test_accuracy"]


def test_best_model_survives_a_resume_and_holds_what_was_measured(tmp_path, monkeypatch):
    config = tiny_config(epochs=3, checkpoint_every=0, ema_momentum=0.9)
    restore = kill_after_state(monkeypatch, 22)  # the state at the end of epoch 2
    with pytest.raises(Killed):
        training.train(config, tmp_path, verbose=0)
    restore()
    training.train(config, tmp_path, verbose=0)
    with open(tmp_path / "log.csv") as f:
        scores = [float(row["val_accuracy"]) for row in csv.DictReader(f)]
    header, _, _ = final_arrays(tmp_path)
    assert header["best_val_accuracy"] == pytest.approx(max(scores))
    # best.keras is the model that scored best: its own accuracy on the
    # evaluation set is that score (with EMA, of the averaged weights).
    best = keras.saving.load_model(tmp_path / "best.keras")
    _, (x_test, y_test) = sources.load_digits()
    accuracy = (to_numpy(best.predict(x_test, verbose=0)).argmax(1) == y_test).mean()
    assert accuracy == pytest.approx(max(scores), abs=1e-6)


@once("the failed write and its clean-up are file code; the exact resume on every backend is "
      "test_a_kill_mid_epoch_then_resume_is_bit_identical_with_ema's")
def test_a_full_disk_mid_run_keeps_the_last_state_and_the_resume_is_exact(tmp_path, monkeypatch):
    """The disk fills while the state of step 12 is being written: part of
    the file is on disk when the write fails, as with a real ENOSPC."""
    import errno

    config = tiny_config(epochs=3, checkpoint_every=4)  # states at steps 4, 8, 11, 12, ...
    reference = training.train(config, tmp_path / "reference", verbose=0)
    real, calls = np.savez, []

    def savez(file, **arrays):
        calls.append(json.loads(str(arrays["header"]))["step"])
        if calls[-1] == 12:
            file.write(b"PK\x03\x04" + bytes(4096))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(file, **arrays)

    monkeypatch.setattr(np, "savez", savez)
    with pytest.raises(OSError, match="No space left on device.*nothing was left behind.*Free disk space") as error:
        training.train(config, tmp_path / "run", verbose=0)
    assert error.value.errno == errno.ENOSPC
    monkeypatch.setattr(np, "savez", real)
    # The two newest (keep_checkpoints=2) and no partial file.
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "state-000000008.npz", "state-000000011.npz"]
    assert not (tmp_path / "run" / "model.keras").exists() and not (tmp_path / "run" / "results.json").exists()
    resumed = training.train(config, tmp_path / "run", verbose=0)  # space freed: the same command
    assert resumed["resumed_from"] == 11 and resumed["steps"] == 33
    for a, b in zip(final_arrays(tmp_path / "reference")[2], final_arrays(tmp_path / "run")[2]):
        np.testing.assert_array_equal(a, b)
    assert resumed["test_accuracy"] == reference["test_accuracy"]


def test_lora_fine_tuning_from_a_checkpoint_writes_the_adapters(tmp_path):
    """lora_rank: only the adapters and the head train; lora.npz on the
    pretrained base gives the run's final model (model.keras, merged)."""
    from keras_mixer import save_official

    # float32: the check below is one of exactness (a bfloat16 run's merged
    # kernels round differently from base + adapters).
    training.train(tiny_config(epochs=1, mixed_precision=False), tmp_path / "pretrain", verbose=0)
    base = keras.saving.load_model(tmp_path / "pretrain" / "model.keras")
    save_official(base, tmp_path / "base.npz")
    config = tiny_config(epochs=1, init_checkpoint=str(tmp_path / "base.npz"), lora_rank=4,
                         mixed_precision=False)
    results = training.train(config, tmp_path / "lora", verbose=0)
    assert results["steps"] == 11
    adapters = tmp_path / "lora" / "lora.npz"
    assert adapters.stat().st_size < (tmp_path / "lora" / "model.keras").stat().st_size / 2
    restored = MLPMixer.from_checkpoint(tmp_path / "base.npz")
    restored.load_lora_weights(adapters)
    merged = keras.saving.load_model(tmp_path / "lora" / "model.keras")
    _, (x_test, _) = sources.load_digits()
    np.testing.assert_allclose(to_numpy(restored.predict(x_test[:64], verbose=0)),
                               to_numpy(merged.predict(x_test[:64], verbose=0)), atol=1e-5)
    # The frozen base did not move: the stem is the pretrained one.
    np.testing.assert_array_equal(to_numpy(merged.get_layer("stem").kernel), to_numpy(base.get_layer("stem").kernel))


def test_ema_with_a_model_axis_over_hosts_is_refused_before_anything_is_written(tmp_path):
    from keras_mixer import distribute

    placement = distribute.Placement(backend=keras.backend.backend(), mode="model", num_replicas=1,
                                     model_parallel_size=8, num_devices=8, num_processes=2,
                                     description="ModelParallel over 8 CPU devices on 2 hosts")
    with pytest.raises(ValueError, match=r"ema_momentum=0.9 with model parallelism over 2 hosts: .* "
                                         r"--distribution data on several hosts"):
        training.train(tiny_config(ema_momentum=0.9), tmp_path / "run", verbose=0, distribution=placement)
    assert not (tmp_path / "run").exists()


def test_a_failed_start_leaves_the_work_directory_usable(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        training.train(tiny_config(dataset="image_folder", data_dir=str(tmp_path / "nowhere")),
                       tmp_path / "run", verbose=0)
    assert not (tmp_path / "run" / "config.json").exists()
    results = training.train(tiny_config(epochs=1), tmp_path / "run", verbose=0)  # the fixed command
    assert results["steps"] == 11 and json.loads((tmp_path / "run" / "config.json").read_text())["epochs"] == 1


def test_a_damaged_image_stops_a_run_naming_it_and_skip_trains_on_the_rest(tmp_path):
    from conftest import write_image_folder
    from test_sources import damage_body

    paths = write_image_folder(tmp_path / "images", per_class=4, corrupt=False)
    damage_body(paths[6])  # dog/img2.png (a JPEG with a damaged middle may still decode)
    config = tiny_config(dataset="image_folder", data_dir=str(tmp_path / "images"), image_size=16,
                         eval_split=None, batch_size=4, epochs=1)
    config["model"].update(patch_size=4)
    with pytest.raises(ValueError, match=f"damaged image.*{paths[6]}.*damaged_images='skip'"):
        training.train(config, tmp_path / "run", verbose=0)
    results = training.train({**config, "damaged_images": "skip"}, tmp_path / "run", verbose=0)
    assert results["steps"] == 1  # 7 images, batch 4


@once("log.csv's rows are written by the callbacks from the step counts, the same on every backend")
def test_log_rows_are_neither_lost_nor_repeated_across_a_kill(tmp_path, monkeypatch):
    # The kill comes after epoch 1's row is logged and its end-of-epoch state
    # (step 22) is written; the resume from step 22 repeats nothing. A second
    # kill right after the mid-epoch state of step 28 leaves epoch 2 to be
    # resumed part-way: its row says where it started.
    config = tiny_config(epochs=3, checkpoint_every=4)
    for step in (22, 28):
        restore = kill_after_state(monkeypatch, step)
        with pytest.raises(Killed):
            training.train(config, tmp_path, verbose=0)
        restore()
    training.train(config, tmp_path, verbose=0)
    with open(tmp_path / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert [(int(r["first_step"]), int(r["last_step"])) for r in rows] == [(0, 11), (11, 22), (28, 33)]


def test_a_second_run_on_a_busy_work_directory_is_refused(tmp_path):
    import fcntl

    (tmp_path / "run").mkdir()
    with open(tmp_path / "run" / ".lock", "a+") as held:  # as another process running there holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RuntimeError, match=r"Another run is using .*run.*Wait for it to finish"):
            training.train(tiny_config(epochs=1), tmp_path / "run", verbose=0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file, not a directory"):
        training.train(tiny_config(epochs=1), tmp_path / "file", verbose=0)
    (tmp_path / "run" / "config.json").write_text("{broken")
    with pytest.raises(ValueError, match=r"config.json is damaged .*Use a new --workdir"):
        training.train(tiny_config(epochs=1), tmp_path / "run", verbose=0)


def _assert_one_line_error(args, message):
    result = run_train_py(args, timeout=300)
    assert result.returncode == 1, (args, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, args
    assert message in result.stderr.strip().splitlines()[-2], (args, result.stderr[-1000:])


def test_train_py_user_error_is_one_line_on_every_backend():
    """The error is the last thing the user reads, after whatever the backend printed at start."""
    _assert_one_line_error(["--set", "learning_rate=-1"],
                           "error: `learning_rate` must be greater than 0, got -1.")


@once("the checks run before any backend work; test_train_py_user_error_is_one_line_on_every_backend "
      "shows each backend's start-up leaves the error last")
@in_the_colab_lane("train.py's errors as a Colab user reads them")
def test_train_py_user_errors_are_one_line_and_debug_shows_the_traceback(tmp_path):
    (tmp_path / "busy").write_text("a file")
    for args, message in (
        (["--set", "model.droput_rate=0.5"], "error: Unknown model key(s) ['model.droput_rate']."),
        (["--workdir", str(tmp_path / "busy")], f"error: --workdir {tmp_path / 'busy'} is a file"),
        (["--eval_only", "--checkpoint", str(tmp_path / "nope.keras")],
         f"error: No model at {tmp_path / 'nope.keras'}"),
    ):
        _assert_one_line_error(args, message)
    debug = run_train_py(["--set", "learning_rate=-1", "--debug"], timeout=300)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
