"""Keras int8/int4 quantization of a Mixer: outputs kept, saved and reloaded identically, train.py --quantize."""

import keras
import numpy as np
import pytest

from keras_mixer import quantize
from keras_mixer.model import MLPMixer
from base import to_numpy


def tiny_model(**kwargs):
    model = MLPMixer(image_shape=(16, 16, 3), patch_size=4, num_blocks=2, hidden_dim=32, tokens_mlp_dim=16,
                     channels_mlp_dim=64, num_classes=5, **kwargs)
    head = model.get_layer("head")  # a zero head would hide any error
    head.kernel.assign(np.random.default_rng(1).normal(size=head.kernel.shape).astype(head.kernel.dtype))
    return model


IMAGES = np.random.default_rng(0).uniform(0, 255, (16, 16, 16, 3)).astype("float32")


@pytest.mark.parametrize("mode, tolerance", [("int8", 0.1), ("int4", 1.0)])
def test_a_quantized_model_saves_and_loads_with_identical_outputs(mode, tolerance, tmp_path):
    model = tiny_model()
    expected = to_numpy(model.predict(IMAGES, verbose=0))
    quantize.quantize(model, mode)
    got = to_numpy(model.predict(IMAGES, verbose=0))
    assert 0 < np.abs(got - expected).max() < tolerance  # quantized, and close
    assert quantize.quantized_modes(model) == [mode]
    dense = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.Dense)]
    assert len(dense) == 2 * 2 * 2 + 1 and all(layer.quantization_mode == mode for layer in dense)
    model.save(tmp_path / "q.keras")
    reloaded = keras.saving.load_model(tmp_path / "q.keras")
    np.testing.assert_array_equal(to_numpy(reloaded.predict(IMAGES, verbose=0)), got)
    # A reloaded quantized model saves and reloads again (Keras reads a
    # DTypePolicyMap's default when Dense saves; see model._concrete_policies).
    reloaded.save(tmp_path / "again.keras")
    again = keras.saving.load_model(tmp_path / "again.keras")
    np.testing.assert_array_equal(to_numpy(again.predict(IMAGES, verbose=0)), got)
    assert quantize.quantized_modes(again) == [mode]


def test_mixed_precision_quantized_keeps_its_policies(tmp_path):
    model = tiny_model(dtype="mixed_bfloat16")
    quantize.quantize(model, "int8")
    got = to_numpy(model.predict(IMAGES, verbose=0))
    model.save(tmp_path / "q.keras")
    reloaded = keras.saving.load_model(tmp_path / "q.keras")
    assert reloaded.dtype_policy.name == "mixed_bfloat16"
    assert reloaded.get_layer("head").dtype_policy.name == "int8_from_float32"  # float32 logits
    assert reloaded.output.dtype == "float32"
    np.testing.assert_array_equal(to_numpy(reloaded.predict(IMAGES, verbose=0)), got)


def test_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"Unknown quantization mode 'int2'. Valid: int8, int4"):
        quantize.quantize(model, "int2")
    quantize.quantize(model, "int8")
    with pytest.raises(ValueError, match=r"already quantized \(int8\); quantize its float version"):
        quantize.quantize(model, "int4")


def test_quantize_file_reports_size_and_agreement(trained, tmp_path):
    from keras_mixer import sources

    _, (x_test, _) = sources.load_digits()
    report = quantize.quantize_file(trained, "int8", x_test[:200], out_path=tmp_path / "model_int8.keras")
    assert report["file"] == str(tmp_path / "model_int8.keras") and report["images"] == 200
    assert report["top1_agreement"] >= 0.95, report
    assert report["size_bytes"] < report["float_size_bytes"]
    assert "int8 weights" in quantize.describe(report)
