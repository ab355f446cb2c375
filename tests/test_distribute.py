"""Devices: data and model parallelism on simulated devices, TPU detection, clear refusals."""

import json
import re
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from conftest import ROOT, subprocess_env
from keras_mixer import distribute

BACKEND = keras.backend.backend()
CHECK = str(ROOT / "tests" / "distributed_check.py")


def run_check(out, backend, args, devices=None):
    env = subprocess_env(backend)
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    done = subprocess.run(
        [sys.executable, CHECK, str(out), *args], env=env, capture_output=True, text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return {
        path.stem: json.loads(path.read_text()) for path in out.glob("*.json")
    }


def final_weights(out, name):
    model = keras.saving.load_model(out / name / "model.keras", compile=False)
    return [keras.ops.convert_to_numpy(w) for w in model.weights]


def assert_same_run(results, out, name, reference="none", padded_loss_atol=1e-5):
    run, ref = results[name], results[reference]
    np.testing.assert_allclose(run["losses"], ref["losses"], atol=1e-5)
    np.testing.assert_allclose(run["val_accuracy"], ref["val_accuracy"], atol=1e-6)
    np.testing.assert_allclose(run["val_loss"], ref["val_loss"], atol=1e-5)
    # 357 test images: the last batch of 5 does not split over the devices.
    # Each real image counts once in the accuracy; the loss is exact per
    # batch, but Keras weighs the padded last batch by its padded size.
    assert abs(run["odd_eval"]["accuracy"] - ref["odd_eval"]["accuracy"]) <= 1e-6
    assert abs(run["odd_eval"]["loss"] - ref["odd_eval"]["loss"]) <= padded_loss_atol
    for a, b in zip(final_weights(out, name), final_weights(out, reference)):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution runs on JAX")
def test_jax_data_and_model_parallel_match_one_device(tmp_path):
    results = run_check(tmp_path, "jax", ["none", "data", "model:2", "model:4"], devices=8)
    assert results["data"]["placement"]["num_replicas"] == 8
    assert results["model-2"]["placement"]["description"].endswith("mesh 4 (batch) x 2 (model)")
    assert results["model-4"]["placement"]["description"].endswith("mesh 2 (batch) x 4 (model)")
    for name in ("data", "model-2", "model-4"):
        # 3 padding examples weighted into the last of 12 batches: <= 1e-3.
        assert_same_run(results, tmp_path, name, padded_loss_atol=1e-3)

    # The layout really shards: first Dense kernels by output units, second
    # by input units, their optimizer moments alike; the rest is replicated.
    for name in ("model-2", "model-4"):
        shardings = results[name]["shardings"]
        for block in range(4):
            for mlp in ("token_mixing", "channel_mixing"):
                prefix = f"block_{block}/{mlp}"
                assert shardings[f"{prefix}/Dense_0/kernel"] == ["None", "model"]
                assert shardings[f"{prefix}/Dense_0/bias"] == ["model"]
                assert shardings[f"{prefix}/Dense_1/kernel"] == ["model", "None"]
                moment = f"{prefix}/Dense_0/kernel".replace("/", "_") + "_momentum"
                assert [v for k, v in shardings.items() if k.endswith(moment)] == [["None", "model"]]
        assert all(a == "None" for a in shardings["stem/kernel"])
    # 10 classes split over 2 devices, not over 4: replicated there.
    assert results["model-2"]["shardings"]["head/kernel"] == ["None", "model"]
    assert results["model-4"]["shardings"]["head/kernel"] == ["None", "None"]
    # Data parallel replicates every variable.
    assert all(
        v is None or all(a == "None" for a in v) for v in results["data"]["shardings"].values()
    )


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute runs on TensorFlow")
def test_tensorflow_mirrored_strategy_matches_one_device(tmp_path):
    results = run_check(tmp_path, "tensorflow", ["--tf-cpus", "2", "none", "data"])
    assert results["data"]["placement"]["description"] == "MirroredStrategy over 2 CPU devices"
    assert results["none"]["placement"]["mode"] == "none"
    assert_same_run(results, tmp_path, "data")


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TPU detection is TensorFlow's")
def test_tpu_detection_without_a_tpu_is_fast_and_quiet(monkeypatch):
    for name in ("TPU_NAME", "COLAB_TPU_ADDR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distribute.glob, "glob", lambda pattern: [])

    def no_resolver(tpu):
        raise AssertionError("the resolver must not run without a sign of a TPU")

    monkeypatch.setattr(distribute, "_tpu_resolver", no_resolver)
    begin = time.perf_counter()
    placement = distribute.setup("auto")
    assert time.perf_counter() - begin < 1.0
    assert placement.mode == "none" and placement.strategy is None


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TPU detection is TensorFlow's")
def test_a_named_unreachable_tpu_is_a_clear_error(monkeypatch):
    def unreachable(tpu):
        # What TPUClusterResolver raises for a name it cannot resolve.
        raise ValueError(f"Could not lookup TPU metadata from name '{tpu}'.")

    monkeypatch.setattr(distribute, "_tpu_resolver", unreachable)
    with pytest.raises(RuntimeError, match=r"Could not connect to TPU 'my-tpu'.*gcloud compute tpus list.*distribution 'none'"):
        distribute.setup("auto", tpu="my-tpu")
    monkeypatch.setenv("TPU_NAME", "env-tpu")
    with pytest.raises(RuntimeError, match="Could not connect to TPU 'env-tpu'"):
        distribute.setup("data")


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TPU detection is TensorFlow's")
def test_a_tpu_that_tensorflow_cannot_initialise_is_an_error(monkeypatch):
    """A TPU VM (Colab's TPU runtime) with the TensorFlow pip installs: say
    why and how to fix it; never train on the CPU without a word."""
    monkeypatch.delenv("TPU_NAME", raising=False)
    monkeypatch.setattr(distribute.glob, "glob",
                        lambda pattern: ["/dev/accel0"] if "accel" in pattern else [])
    asked = []

    def no_tpu_support(tpu):
        asked.append(tpu)
        raise ValueError("Please provide a TPU Name to connect to.")

    monkeypatch.setattr(distribute, "_tpu_resolver", no_tpu_support)
    with pytest.raises(RuntimeError, match=(
            r"This machine has a TPU \(/dev/accel0\), but TensorFlow .* cannot initialise it "
            r"\(ValueError: Please provide a TPU Name.*KERAS_BACKEND=jax.*tensorflow-tpu")):
        distribute.setup("auto")
    assert asked == ["local"]


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TPU detection is TensorFlow's")
def test_the_retired_colab_tpu_node_variable_is_not_followed(monkeypatch):
    monkeypatch.delenv("TPU_NAME", raising=False)
    monkeypatch.setenv("COLAB_TPU_ADDR", "10.0.0.2:8470")
    monkeypatch.setattr(distribute.glob, "glob", lambda pattern: [])

    def no_resolver(tpu):
        raise AssertionError("COLAB_TPU_ADDR alone must not start a TPU connection")

    monkeypatch.setattr(distribute, "_tpu_resolver", no_resolver)
    assert distribute.setup("auto").mode == "none"


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow's refusal")
def test_tensorflow_refuses_model_parallelism():
    with pytest.raises(ValueError, match="KERAS_BACKEND=jax"):
        distribute.setup("model")


@pytest.mark.skipif(BACKEND != "torch", reason="PyTorch's refusal")
@pytest.mark.parametrize("mode", ["data", "model"])
def test_torch_refuses_data_and_model_parallelism(mode):
    with pytest.raises(ValueError, match="not available on the torch backend.*tensorflow.*jax.*'none'"):
        distribute.setup(mode)
    assert distribute.setup("auto").mode == "none"


def test_arguments_and_batch_sizes_are_checked():
    with pytest.raises(ValueError, match="Unknown distribution mode 'tpu'. Valid: auto, data, model, none"):
        distribute.setup("tpu")
    with pytest.raises(ValueError, match="model_parallel_size=2 needs mode='model'"):
        distribute.setup("data", model_parallel_size=2)
    placement = distribute.Placement(
        backend=BACKEND, mode="data", num_replicas=8, num_devices=8, description="8 devices"
    )
    assert placement.host_batch_size(512) == 512
    with pytest.raises(ValueError, match=r"batch_size=100 \(the global batch\) does not split over the 8 replicas.*e\.g\. 96 or 104"):
        placement.check_batch_size(100)
    # Four hosts with two devices each: each host reads a quarter.
    hosts = distribute.Placement(
        backend=BACKEND, mode="data", num_replicas=8, num_devices=8, num_processes=4,
        process_index=3, description="8 devices on 4 hosts",
    )
    assert hosts.shard == (4, 3) and hosts.host_batch_size(512) == 128 and not hosts.is_chief
    # Model copies spanning two hosts: both hosts of a copy read the same shard.
    wide = distribute.Placement(
        backend=BACKEND, mode="model", num_replicas=2, model_parallel_size=8, num_devices=16,
        num_processes=4, process_index=3, description="16 devices on 4 hosts",
    )
    assert wide.shard == (2, 1) and wide.host_batch_size(512) == 256


def test_no_multi_host_start_without_its_environment(monkeypatch):
    for name in distribute.MULTI_HOST_ENV + ("KERAS_MIXER_MULTI_HOST",):
        monkeypatch.delenv(name, raising=False)
    assert distribute.initialize_multi_host() is False


def test_train_writes_the_resolved_distribution(tmp_path):
    from keras_mixer import configs, training

    config = configs.get("digits")
    config.update(train_steps=2, steps_per_epoch=2, eval_split=None)
    result = training.train(config, tmp_path, verbose=0, distribution="none")
    written = json.loads((tmp_path / "distribution.json").read_text())
    assert written["mode"] == "none" and written["backend"] == BACKEND
    assert result["distribution"] == written["description"]


def test_memory_estimate_counts_the_real_parameters():
    from keras_mixer import MLPMixer

    model = MLPMixer.from_variant("S/32", num_classes=1000)
    estimate = distribute.memory_per_device("S/32", batch_per_replica=8)
    assert estimate["params"] == model.count_params()
    assert estimate["state"] == 16 * model.count_params()
    # Over 4 devices, what the layout map shards counts a quarter.
    layouts = distribute.layout_map(None)
    split = sum(
        int(np.prod(v.shape)) for v in model.weights
        if any(re.fullmatch(pattern, v.path) for pattern in layouts)
    )
    sharded = distribute.memory_per_device("S/32", batch_per_replica=8, model_parallel_size=4)
    assert sharded["state"] == pytest.approx(16 * (model.count_params() - split + split / 4))
    assert sharded["activations"] < estimate["activations"]
    # remat keeps each block's input (tokens x channels) and one block's
    # activations; S/32 has 8 blocks, 49 tokens, 512 channels.
    remat = distribute.memory_per_device("S/32", batch_per_replica=8, remat=True)
    assert remat["state"] == estimate["state"]
    saved = estimate["activations"] - remat["activations"]
    per_block = (estimate["activations"] / 8 / 4 - 2 * 49 * 512) / 8
    assert saved == pytest.approx(8 * 4 * (7 * per_block - 8 * 49 * 512))


@pytest.mark.skipif(BACKEND == "tensorflow", reason="tpu= is TensorFlow's argument")
def test_tpu_argument_is_refused_off_tensorflow():
    with pytest.raises(ValueError, match=f"the {BACKEND} backend finds its devices itself"):
        distribute.setup("auto", tpu="my-tpu")


# --- Batch plans ----------------------------------------------------------------


def _chip(name, gib, kind="tpu"):
    return distribute.DeviceMemory(kind=kind, name=name, bytes=gib * distribute.GIB, source="test")


def _arch(variant, num_classes=10, image_size=224):
    from keras_mixer.model import variant_config

    return dict(variant_config(variant), image_shape=(image_size, image_size, 3),
                num_classes=num_classes)


def test_training_memory_of_a_model_equals_the_variant_arithmetic():
    from keras_mixer import MLPMixer

    model = MLPMixer.from_variant("S/32", image_shape=(64, 96, 3), num_classes=7,
                                  patch_size=(16, 32))
    estimate = distribute.training_memory(model, batch_per_replica=4)
    assert estimate["params"] == model.count_params()
    # A dict of the same arguments gives the same figures.
    assert distribute.training_memory(model.get_config(), 4) == estimate
    assert distribute.memory_per_device("S/32", 8) == distribute.training_memory(
        _arch("S/32", 1000), 8)


@pytest.mark.parametrize("chip, gib, variant, batch, accum, gib_used", [
    # Fine-tuning at 224 (recipe batch 512), bfloat16, SGD state: the
    # figures of docs/distributed.md.
    ("TPU v5 lite", 16, "B/16", 512, 4, 8.4),
    ("TPU v6 lite", 32, "B/16", 512, 2, 16.2),
    ("TPU v5 lite", 16, "S/16", 512, 2, 6.7),
    ("TPU v6 lite", 32, "S/16", 512, 1, 13.1),
])
def test_plan_keeps_the_global_batch_and_accumulates_until_it_fits(chip, gib, variant, batch, accum,
                                                                   gib_used):
    memory = _chip(chip, gib)
    plan = distribute.plan_batch(_arch(variant), batch, mixed_precision=True, memory=memory,
                                 state_bytes=12, steps_per_epoch=500, total_updates=10_000)
    assert (plan.grad_accum_steps, plan.global_batch) == (accum, batch)
    assert round(plan.estimated_bytes / distribute.GIB, 1) == gib_used
    assert plan.step_batch * plan.grad_accum_steps == batch
    assert plan.fits and plan.estimated_bytes <= 0.8 * memory.bytes
    # The fewest: one accumulation step less would not fit.
    if accum > 1:
        fewer = distribute.training_memory(_arch(variant), batch // (accum // 2), 1, 2, 12)
        assert fewer["total"] > plan.budget_bytes
    # Several steps per compiled call on a TPU, dividing the 500-update epoch.
    assert plan.steps_per_execution == 25
    assert (500 * accum) % plan.steps_per_execution == 0
    assert f"global batch {batch}" in plan.describe() and chip in plan.describe()


def test_plan_on_gpu_cpu_and_replicas():
    # float32 needs twice the activations of bfloat16: more accumulation.
    bf16 = distribute.plan_batch(_arch("B/16"), 512, mixed_precision=True, memory=_chip("A", 16))
    fp32 = distribute.plan_batch(_arch("B/16"), 512, mixed_precision=False, memory=_chip("A", 16))
    assert fp32.grad_accum_steps == 2 * bf16.grad_accum_steps
    gpu = distribute.plan_batch(_arch("B/16"), 512, mixed_precision=True,
                                memory=_chip("NVIDIA H200", 139, kind="gpu"),
                                steps_per_epoch=500, total_updates=10_000)
    assert gpu.grad_accum_steps == 1 and gpu.steps_per_execution == 1  # spe > 1 on TPUs only
    # Kaggle's v5e-8: eight replicas share each step's batch.
    eight = distribute.Placement(backend=BACKEND, mode="data", num_replicas=8, num_devices=8)
    plan = distribute.plan_batch(_arch("B/16"), 512, eight, mixed_precision=True,
                                 memory=_chip("TPU v5 lite", 16))
    assert plan.grad_accum_steps == 1 and plan.per_device_batch == 64
    # A global batch that cannot split gets the placement's own advice.
    with pytest.raises(ValueError, match=r"batch_size=100 \(the global batch\) does not split over the 8 replicas.*e\.g\. 96 or 104"):
        distribute.plan_batch(_arch("B/16"), 100, eight, memory=_chip("TPU v5 lite", 16))
    # Fixed settings are kept; too little memory is said.
    fixed = distribute.plan_batch(_arch("B/16"), 512, grad_accum_steps=2, steps_per_execution=4,
                                  memory=_chip("small", 1, kind="cpu"))
    assert (fixed.grad_accum_steps, fixed.steps_per_execution, fixed.fits) == (2, 4, False)
    tiny = distribute.plan_batch(_arch("S/32", image_size=32), 64, memory=_chip("CPU", 8, "cpu"))
    assert (tiny.grad_accum_steps, tiny.mixed_precision, tiny.steps_per_execution) == (1, False, 1)


def test_mixed_precision_auto_follows_the_device():
    assert distribute.choose_mixed_precision("auto", _chip("TPU v5 lite", 16))
    assert distribute.choose_mixed_precision("auto", _chip("H200", 139, kind="gpu"))
    assert not distribute.choose_mixed_precision("auto", _chip("CPU", 24, kind="cpu"))
    assert distribute.choose_mixed_precision(True, _chip("CPU", 24, kind="cpu"))


def test_device_memory_here_and_its_override(monkeypatch):
    memory = distribute.device_memory()
    if distribute.cpu_only():
        assert memory.kind == "cpu" and 0 < memory.bytes <= distribute._host_memory_bytes()
    monkeypatch.setenv("KERAS_MIXER_DEVICE_MEMORY_GB", "16")
    assert distribute.device_memory().bytes == 16 * 10 ** 9
    assert distribute._tpu_table_bytes("TPU v5 lite") == 16 * distribute.GIB
    assert distribute._tpu_table_bytes("TPU v6 lite") == 32 * distribute.GIB


def test_train_prints_and_keeps_its_plan(tmp_path, capsys, monkeypatch):
    from keras_mixer import configs, training

    config = configs.get("digits")
    config.update(train_steps=4, steps_per_epoch=2, eval_split=None, batch_size=64,
                  checkpoint_every=2)
    # As on a 16 GB accelerator that cannot hold 64 images: the run
    # accumulates, and a resume on roomier hardware keeps the first plan.
    model = training.make_model(training.resolve_config(config), (8, 8, 1), 10)
    per_image = distribute.training_memory(model, 1)
    small = distribute.DeviceMemory("cpu", "small", int((per_image["state"] + 40 * (
        per_image["activations"])) / 0.6), "test")
    monkeypatch.setattr(distribute, "device_memory", lambda placement=None: small)
    training.train(dict(config, train_steps=2), tmp_path, verbose=0, distribution="none")
    printed = capsys.readouterr().out
    assert "Batch plan: global batch 64 = 2 accumulated steps of 32" in printed
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["grad_accum_steps"] == 2 and plan["step_batch"] == 32
    monkeypatch.setattr(distribute, "device_memory",
                        lambda placement=None: _chip("big", 64, kind="cpu"))
    with pytest.raises(ValueError, match="different config"):
        training.train(config, tmp_path, verbose=0, distribution="none")  # train_steps differs
    result = training.train(dict(config, train_steps=2), tmp_path, verbose=0, distribution="none")
    assert "2 accumulated steps of 32" in result["batch_plan"]


@pytest.mark.parametrize("chip, gib, variant, accum, gib_used", [
    # Pretraining at 224 (recipe batch 4096), bfloat16, Adam state, 1000 classes.
    ("TPU v5 lite", 16, "S/16", 16, 6.7), ("TPU v6 lite", 32, "S/16", 8, 13.2),
    ("TPU v5 lite", 16, "B/16", 32, 8.7), ("TPU v6 lite", 32, "B/16", 16, 16.5),
])
def test_pretraining_plans_in_docs(chip, gib, variant, accum, gib_used):
    plan = distribute.plan_batch(_arch(variant, 1000), 4096, mixed_precision=True,
                                 memory=_chip(chip, gib), steps_per_epoch=312,
                                 total_updates=312 * 300)
    assert plan.grad_accum_steps == accum
    assert round(plan.estimated_bytes / distribute.GIB, 1) == gib_used
    assert plan.steps_per_execution == 32
