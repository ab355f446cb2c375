"""Batch plans: the memory estimate against Keras' parameter counts, and the plans it gives
on TPUs, GPUs and CPUs, in the docs and in a run."""

import json
import re

import keras
import numpy as np
import pytest

from keras_mixer import distribute
from keras_mixer import plan as plan_lib
from conftest import once

BACKEND = keras.backend.backend()


def test_memory_estimate_counts_the_real_parameters():
    from keras_mixer import MLPMixer

    model = MLPMixer.from_variant("S/32", num_classes=1000)
    estimate = plan_lib.memory_per_device("S/32", batch_per_replica=8)
    assert estimate["params"] == model.count_params()
    assert estimate["state"] == 16 * model.count_params()
    # Over 4 devices, what the layout map shards counts a quarter.
    layouts = distribute.layout_map(None)
    split = sum(
        int(np.prod(v.shape)) for v in model.weights
        if any(re.fullmatch(pattern, v.path) for pattern in layouts)
    )
    sharded = plan_lib.memory_per_device("S/32", batch_per_replica=8, model_parallel_size=4)
    assert sharded["state"] == pytest.approx(16 * (model.count_params() - split + split / 4))
    assert sharded["activations"] < estimate["activations"]
    # remat keeps each block's input (tokens x channels) and one block's
    # activations; S/32 has 8 blocks, 49 tokens, 512 channels.
    remat = plan_lib.memory_per_device("S/32", batch_per_replica=8, remat=True)
    assert remat["state"] == estimate["state"]
    saved = estimate["activations"] - remat["activations"]
    per_block = (estimate["activations"] / 8 / 4 - 2 * 49 * 512) / 8
    assert saved == pytest.approx(8 * 4 * (7 * per_block - 8 * 49 * 512))


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
    estimate = plan_lib.training_memory(model, batch_per_replica=4)
    assert estimate["params"] == model.count_params()
    # A dict of the same arguments gives the same figures.
    assert plan_lib.training_memory(model.get_config(), 4) == estimate
    assert plan_lib.memory_per_device("S/32", 8) == plan_lib.training_memory(
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
    plan = plan_lib.plan_batch(_arch(variant), batch, mixed_precision=True, memory=memory,
                                 state_bytes=12, steps_per_epoch=500, total_updates=10_000)
    assert (plan.grad_accum_steps, plan.global_batch) == (accum, batch)
    assert round(plan.estimated_bytes / distribute.GIB, 1) == gib_used
    assert plan.step_batch * plan.grad_accum_steps == batch
    assert plan.fits and plan.estimated_bytes <= 0.8 * memory.bytes
    # The fewest: one accumulation step less would not fit.
    if accum > 1:
        fewer = plan_lib.training_memory(_arch(variant), batch // (accum // 2), 1, 2, 12)
        assert fewer["total"] > plan.budget_bytes
    # Several steps per compiled call on a TPU, dividing the 500-update epoch.
    assert plan.steps_per_execution == 25
    assert (500 * accum) % plan.steps_per_execution == 0
    assert f"global batch {batch}" in plan.describe() and chip in plan.describe()


def test_plan_on_gpu_cpu_and_replicas():
    # float32 needs twice the activations of bfloat16: more accumulation.
    bf16 = plan_lib.plan_batch(_arch("B/16"), 512, mixed_precision=True, memory=_chip("A", 16))
    fp32 = plan_lib.plan_batch(_arch("B/16"), 512, mixed_precision=False, memory=_chip("A", 16))
    assert fp32.grad_accum_steps == 2 * bf16.grad_accum_steps
    gpu = plan_lib.plan_batch(_arch("B/16"), 512, mixed_precision=True,
                                memory=_chip("NVIDIA H200", 139, kind="gpu"),
                                steps_per_epoch=500, total_updates=10_000)
    assert gpu.grad_accum_steps == 1 and gpu.steps_per_execution == 1  # spe > 1 on TPUs only
    # Kaggle's v5e-8: eight replicas share each step's batch.
    eight = distribute.Placement(backend=BACKEND, mode="data", num_replicas=8, num_devices=8)
    plan = plan_lib.plan_batch(_arch("B/16"), 512, eight, mixed_precision=True,
                                 memory=_chip("TPU v5 lite", 16))
    assert plan.grad_accum_steps == 1 and plan.per_device_batch == 64
    # A global batch that cannot split gets the placement's own advice.
    with pytest.raises(ValueError, match=r"batch_size=100 \(the global batch\) does not split over the 8 "
                       r"replicas.*e\.g\. 96 or 104"):
        plan_lib.plan_batch(_arch("B/16"), 100, eight, memory=_chip("TPU v5 lite", 16))
    # Fixed settings are kept; too little memory is said.
    fixed = plan_lib.plan_batch(_arch("B/16"), 512, grad_accum_steps=2, steps_per_execution=4,
                                  memory=_chip("small", 1, kind="cpu"))
    assert (fixed.grad_accum_steps, fixed.steps_per_execution, fixed.fits) == (2, 4, False)
    tiny = plan_lib.plan_batch(_arch("S/32", image_size=32), 64, memory=_chip("CPU", 8, "cpu"))
    assert (tiny.grad_accum_steps, tiny.mixed_precision, tiny.steps_per_execution) == (1, False, 1)


def test_mixed_precision_auto_follows_the_device_and_the_backend():
    cpu = _chip("CPU", 24, kind="cpu")
    for backend in ("jax", "tensorflow", "torch"):
        assert plan_lib.choose_mixed_precision("auto", _chip("TPU v5 lite", 16), backend)
        assert plan_lib.choose_mixed_precision("auto", _chip("H200", 139, kind="gpu"), backend)
        assert plan_lib.choose_mixed_precision(True, cpu, backend, cpu_bf16=False)
        assert not plan_lib.choose_mixed_precision(False, _chip("H200", 139, kind="gpu"), backend)
        assert not plan_lib.choose_mixed_precision("auto", cpu, backend, cpu_bf16=False)
    # bfloat16 paid on a CPU only on PyTorch with AVX512-BF16 or AMX: XLA:CPU
    # computes bfloat16 dots in float32.
    assert plan_lib.choose_mixed_precision("auto", cpu, "torch", cpu_bf16=True)
    for backend in ("jax", "tensorflow"):
        use, why = plan_lib.mixed_precision_choice("auto", cpu, backend, cpu_bf16=True)
        assert not use and "XLA on the CPU" in why and backend in why
    assert "emulates" in plan_lib.mixed_precision_choice("auto", cpu, "torch", cpu_bf16=False)[1]
    # Without a backend, Keras' own.
    assert plan_lib.choose_mixed_precision("auto", cpu, cpu_bf16=True) == (keras.backend.backend() == "torch")


@once("the plan comes from the device's memory and the config, not the backend; "
      "training and resuming are tested on every backend in test_training")
def test_train_prints_and_keeps_its_plan(tmp_path, capsys, monkeypatch):
    from keras_mixer import config as config_lib
    from keras_mixer import training

    config = config_lib.load("digits")
    config.update(train_steps=4, steps_per_epoch=2, eval_split=None, batch_size=64,
                  checkpoint_every=2)
    # As on a 16 GB accelerator that cannot hold 64 images: the run
    # accumulates, and a resume on roomier hardware keeps the first plan.
    model = training.make_model(config_lib.resolve(config), (8, 8, 1), 10)
    per_image = plan_lib.training_memory(model, 1)
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
    plan = plan_lib.plan_batch(_arch(variant, 1000), 4096, mixed_precision=True,
                                 memory=_chip(chip, gib), steps_per_epoch=312,
                                 total_updates=312 * 300)
    assert plan.grad_accum_steps == accum
    assert round(plan.estimated_bytes / distribute.GIB, 1) == gib_used
    assert plan.steps_per_execution == 32
