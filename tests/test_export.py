"""Export: every format and quantization checked against Keras, from a model trained on this backend."""

import json
import subprocess
import sys

import keras
import numpy as np
import pytest

from base import keras_logits
from conftest import once
from conftest import subprocess_env
from keras_mixer import export
from keras_mixer import sources

BACKEND = keras.backend.backend()


def test_every_format_and_quantization_passes_its_check(trained, exported):
    out, report = exported
    assert json.loads((out / export.REPORT).read_text()) == report
    entries = {(e["format"], e["quantization"]): e for e in report["files"]}
    assert set(entries) == {("saved_model", "float32"), ("onnx", "float32")} | {
        ("tflite", q) for q in export.QUANTIZATIONS
    }
    for entry in report["files"]:
        assert entry["passed"], entry
        assert entry["size_bytes"] > 0 and entry["latency_ms_per_image"] > 0
    assert entries[("tflite", "float32")]["max_abs_difference"] <= 1e-4
    assert entries[("tflite", "float16")]["max_abs_difference"] <= 1e-2
    assert entries[("tflite", "int8")]["top1_agreement"] >= 0.95
    # Quantized files are smaller than the float32 one.
    assert entries[("tflite", "int8")]["size_bytes"] < entries[("tflite", "float32")]["size_bytes"]

    # Recompute one check here: this backend's Keras against LiteRT and ONNX Runtime.
    images = sources.load_digits()[1][0][:32]
    expected = keras_logits(trained, images)
    got = export.load_tflite(out / "model_float32.tflite")(images)
    assert np.abs(got - expected).max() <= 1e-4
    got = export.load_onnx(out / "model.onnx")(images)
    assert np.abs(got - expected).max() <= 1e-4


def test_saved_model_loads_without_keras_mixer(trained, exported, tmp_path):
    out, _ = exported
    images = sources.load_digits()[1][0][:5]
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "expected.npy", keras_logits(trained, images))
    script = f"""
import sys
sys.modules["keras_mixer"] = None  # importing it now fails
import numpy as np, tensorflow as tf
try:
    import keras_mixer
    raise SystemExit("keras_mixer is importable")
except ImportError:
    pass
loaded = tf.saved_model.load({str(out / "saved_model")!r})
images = np.load({str(tmp_path / "images.npy")!r})
expected = np.load({str(tmp_path / "expected.npy")!r})
for n in (1, 5):
    got = loaded.serve(tf.constant(images[:n])).numpy()
    assert got.shape == (n, 10), got.shape
    assert np.abs(got - expected[:n]).max() <= 1e-4
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], env=subprocess_env("tensorflow"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_a_broken_export_is_caught(trained, exported):
    out, _ = exported
    images = sources.load_digits()[1][0][:32]
    model = keras.saving.load_model(trained, compile=False)
    head = model.get_layer("head")
    head.bias.assign(keras.ops.convert_to_numpy(head.bias) + np.arange(10, dtype="float32"))
    changed = keras.ops.convert_to_numpy(model.predict(images, verbose=0))
    for kind, quantization, name in (("saved_model", "float32", "saved_model"),
                                     ("tflite", "float32", "model_float32.tflite"),
                                     ("tflite", "int8", "model_int8.tflite")):
        entry = export.verify(kind, quantization, out / name, changed, images)
        assert not entry["passed"], entry


@pytest.mark.skipif(BACKEND != "tensorflow", reason="patches the exporter in this process")
def test_a_failed_check_raises_and_marks_the_file(trained, tmp_path, monkeypatch):
    monkeypatch.setitem(export.TOLERANCES, "float32", 0.0)  # nothing exact passes
    with pytest.raises(export.ExportError, match=r"model_float32.failed.tflite: max abs difference"):
        export.export(trained, tmp_path, ["tflite"])
    report = json.loads((tmp_path / export.REPORT).read_text())
    assert report["files"][0]["passed"] is False
    assert (tmp_path / "model_float32.failed.tflite").exists()
    assert not (tmp_path / "model_float32.tflite").exists()


def test_clear_errors(trained, tmp_path):
    with pytest.raises(ValueError, match=r"Unknown export format\(s\) \['pt'\]. Valid: saved_model, tflite, onnx"):
        export.export(trained, tmp_path, ["pt"])
    with pytest.raises(ValueError, match=r"Unknown quantization\(s\) \['int4'\]"):
        export.export(trained, tmp_path, ["tflite"], "int4")
    with pytest.raises(ValueError, match="applies to TFLite: add 'tflite'"):
        export.export(trained, tmp_path, ["onnx"], "int8")
    with pytest.raises(ValueError,
                       match=r"representative_data has shape \(4, 16, 16, 3\); the model takes \(N, 8, 8, 1\)"):
        export._check_data(np.zeros((4, 16, 16, 3)), (8, 8, 1))
    weights = tmp_path / "m.weights.h5"
    keras.saving.load_model(trained, compile=False).save_weights(weights)
    with pytest.raises(ValueError, match="holds weights only: pass the MLPMixer arguments as model_config"):
        export.load_model(weights)
    with pytest.raises(ValueError, match=r"int8 TFLite is calibrated on images of the model's data: "
                       r"pass representative_data .*representative_images\(config\)"):
        export.export(trained, tmp_path, ["tflite"], ["float32", "int8"])
    assert not list(tmp_path.glob("*.tflite"))


def test_a_missing_or_corrupt_model_fails_before_any_export_starts(trained, tmp_path, monkeypatch):
    """On JAX and PyTorch export runs in a TensorFlow process: a bad path
    must fail here first, and nothing is written."""
    def started(*args):
        raise AssertionError("an export started")

    monkeypatch.setattr(export, "_export_in_subprocess", started)
    monkeypatch.setattr(export, "_export_here", started)
    (tmp_path / "cut.keras").write_bytes(trained.read_bytes()[:500])
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match=r"No model at .*missing.keras"):
        export.export(tmp_path / "missing.keras", out)
    with pytest.raises(FileNotFoundError, match=r"No model at .*missing.weights.h5"):
        export.export(tmp_path / "missing.weights.h5", out)
    with pytest.raises(ValueError, match=r"cut.keras is not a readable .keras file"):
        export.export(tmp_path / "cut.keras", out)
    with pytest.raises(ValueError, match=r"Cannot export .*model.pt: expected a .keras file or a .weights.h5"):
        export.export(tmp_path / "model.pt", out)
    assert not out.exists()


def test_a_keras_quantized_model_exports_to_saved_model_and_tflite_is_refused(trained, tmp_path):
    from keras_mixer import quantize

    model = keras.saving.load_model(trained, compile=False)
    quantize.quantize(model, "int8")
    model.save(tmp_path / "int8.keras")
    report = export.export(tmp_path / "int8.keras", tmp_path / "out", ["saved_model"])
    assert [e["passed"] for e in report["files"]] == [True]
    with pytest.raises((ValueError, RuntimeError), match=r"quantized by Keras \(int8\), which the TFLite "
                       r"converter cannot convert. Export the float model with --quantization int8"):
        export.export(tmp_path / "int8.keras", tmp_path / "out", ["tflite"])


def test_missing_optional_dependency_names_the_extra(trained, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tf2onnx", None)
    with pytest.raises(ImportError, match=r"pip install 'keras-mixer\[export\]'"):
        export.export(trained, tmp_path, ["onnx"])


def test_weights_file_with_config_exports(trained, tmp_path):
    model = keras.saving.load_model(trained, compile=False)
    model.save_weights(tmp_path / "m.weights.h5")
    report = export.export(tmp_path / "m.weights.h5", tmp_path / "out", ["tflite"],
                           model_config=model.get_config())
    assert report["files"][0]["passed"]


@once("the export runs in TensorFlow whatever this process's backend")
def test_a_mixed_bfloat16_model_exports_computing_in_float32(tmp_path):
    """A model trained under "mixed_bfloat16" (which mixed_precision="auto"
    picks on TPUs and GPUs) exports: the TFLite converter refuses bfloat16
    ops, so the files compute in float32 with the model's float32 weights."""
    import keras

    from keras_mixer import MLPMixer

    model = MLPMixer(image_shape=(8, 8, 1), patch_size=2, num_blocks=1, hidden_dim=16,
                     tokens_mlp_dim=8, channels_mlp_dim=16, num_classes=10, dtype="mixed_bfloat16")
    head = model.get_layer("head")  # zero-initialised: give it weights, so the logits differ
    head.kernel.assign(np.random.default_rng(0).normal(size=head.kernel.shape).astype("float32"))
    model.save(tmp_path / "model.keras")
    images = np.random.default_rng(1).uniform(0, 255, (16, 8, 8, 1)).astype("float32")
    report = export.export(tmp_path / "model.keras", tmp_path / "out", ("saved_model", "tflite"),
                           ("float32",), representative_data=images)
    assert [(f["format"], f["passed"]) for f in report["files"]] == [("saved_model", True), ("tflite", True)]
    reloaded = keras.saving.load_model(tmp_path / "model.keras")
    assert reloaded.dtype_policy.name == "mixed_bfloat16"  # the saved model itself is unchanged
