"""Devices: data and model parallelism on simulated devices, TPU detection, clear refusals."""

import json
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
        for block in range(2):
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
    with pytest.raises(RuntimeError,
                       match=r"Could not connect to TPU 'my-tpu'.*gcloud compute tpus list.*distribution 'none'"):
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
    with pytest.raises(ValueError, match=r"batch_size=100 \(the global batch\) does not split over the 8 "
                       r"replicas.*e\.g\. 96 or 104"):
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
    for name in distribute.MULTI_HOST_ENV:
        monkeypatch.delenv(name, raising=False)
    assert distribute.initialize_multi_host() is False


def test_train_writes_the_resolved_distribution(tmp_path):
    from keras_mixer import config as config_lib
    from keras_mixer import training

    config = config_lib.load("digits")
    config.update(train_steps=2, steps_per_epoch=2, eval_split=None)
    result = training.train(config, tmp_path, verbose=0, distribution="none")
    written = json.loads((tmp_path / "distribution.json").read_text())
    assert written["mode"] == "none" and written["backend"] == BACKEND
    assert result["distribution"] == written["description"]


@pytest.mark.skipif(BACKEND == "tensorflow", reason="tpu= is TensorFlow's argument")
def test_tpu_argument_is_refused_off_tensorflow():
    with pytest.raises(ValueError, match=f"the {BACKEND} backend finds its devices itself"):
        distribute.setup("auto", tpu="my-tpu")


# --- Batch plans ----------------------------------------------------------------


def test_device_memory_here_and_its_override(monkeypatch):
    # MemAvailable moves while other processes run (CI's other stream): one
    # reading, held fixed, is what device_memory must stay within.
    available = distribute._host_memory_bytes()
    monkeypatch.setattr(distribute, "_host_memory_bytes", lambda: available)
    memory = distribute.device_memory()
    if distribute.cpu_only():
        assert memory.kind == "cpu" and 0 < memory.bytes <= available
    monkeypatch.setenv("KERAS_MIXER_DEVICE_MEMORY_GB", "16")
    assert distribute.device_memory().bytes == 16 * 10 ** 9
    assert distribute._tpu_table_bytes("TPU v5 lite") == 16 * distribute.GIB
    assert distribute._tpu_table_bytes("TPU v6 lite") == 32 * distribute.GIB


# --- The private Keras attributes distribute.py reaches for --------------------
# Each test fails when Keras (or tf.distribute, or JAX) changes under the
# reach, rather than letting training silently lose a batch or a state.


def _tiny_compiled():
    from keras_mixer import MLPMixer

    model = MLPMixer(image_shape=(8, 8, 1), num_classes=3, patch_size=4, num_blocks=1,
                     hidden_dim=4, tokens_mlp_dim=2, channels_mlp_dim=4)
    model.compile(optimizer="sgd", loss="categorical_crossentropy")
    return model


def test_variable_to_numpy_reads_every_variable_kind():
    model = _tiny_compiled()
    kernel = model.get_layer("stem").kernel
    np.testing.assert_array_equal(distribute.variable_to_numpy(kernel), keras.ops.convert_to_numpy(kernel))
    if BACKEND == "jax":
        from jax.experimental import multihost_utils

        assert callable(multihost_utils.process_allgather)
        assert kernel.value.is_fully_addressable


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute's mirrored variables")
def test_mirrored_variables_have_the_primary_copy_read_for_states():
    import tensorflow as tf

    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        model = _tiny_compiled()
    value = model.get_layer("stem").kernel.value
    assert hasattr(value, "values") and hasattr(value, "_primary")
    np.testing.assert_array_equal(distribute.variable_to_numpy(model.get_layer("stem").kernel),
                                  value._primary.numpy())
    # A model built under a strategy keeps it in `_distribute_strategy`,
    # which release_strategy drops once everything is built.
    assert model._distribute_strategy is strategy
    distribute.release_strategy(model)
    assert model._distribute_strategy is None


@pytest.mark.skipif(BACKEND != "jax", reason="Keras' JAX trainer state")
def test_jax_models_sync_their_trainer_state_for_states():
    model = _tiny_compiled()
    assert callable(model.jax_state_sync)
    x = np.zeros((4, 8, 8, 1), "float32")
    model.train_on_batch(x, np.eye(3, dtype="float32")[[0, 1, 2, 0]])
    distribute.sync_state(model)


def test_jit_compile_setting_is_xla_on_tensorflow_only():
    expected = True if BACKEND == "tensorflow" else "auto"
    assert distribute.jit_compile_setting() == expected
    if BACKEND == "tensorflow":
        # Under a tf.distribute strategy, XLA cannot reach other replicas'
        # variables: Keras decides (MLPMixer.compile asks the same).
        import tensorflow as tf

        with tf.distribute.OneDeviceStrategy("/cpu:0").scope():
            assert distribute.jit_compile_setting() == "auto"


@pytest.mark.parametrize("backend, environ, what", [
    ("torch", {"KERAS_DISTRIBUTION_JOB_ADDRESSES": "localhost:1234", "KERAS_DISTRIBUTION_NUM_PROCESSES": "2"},
     "the environment describes a multi-process run"),
    ("tensorflow", {"TF_CONFIG": '{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 0}}'},
     "TF_CONFIG names 2 workers"),
])
def test_a_multi_process_start_off_jax_names_jax(backend, environ, what):
    with pytest.raises(ValueError, match=rf"{what}.*JAX backend only.*KERAS_BACKEND=jax"):
        distribute._refuse_multi_process(backend, environ)
    distribute._refuse_multi_process(backend, {"TF_CONFIG": '{"cluster": {"worker": ["a:1"]}}'})  # one: fine


def test_multi_host_needs_matching_addresses_and_count():
    environ = {"KERAS_DISTRIBUTION_JOB_ADDRESSES": "a:1,b:2,c:3", "KERAS_DISTRIBUTION_NUM_PROCESSES": "2"}
    if keras.backend.backend() != "jax":
        pytest.skip("initialize_multi_host is JAX's")
    import jax

    if jax.distributed.is_initialized():
        pytest.skip("this process is in a multi-host run")
    with pytest.raises(ValueError, match="lists 3 addresses but KERAS_DISTRIBUTION_NUM_PROCESSES=2"):
        distribute.initialize_multi_host(environ)
    assert distribute.initialize_multi_host({}) is False
