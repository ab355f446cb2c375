"""Training states: written atomically, damaged ones skipped, other models refused."""

import keras
import numpy as np
import pytest

from keras_mixer import checkpoint
from keras_mixer.model import MLPMixer
from base import assert_errors
from base import compiled_tiny_model


def test_a_truncated_state_is_detected_and_the_previous_one_used(tmp_path, caplog):
    model = compiled_tiny_model()
    kernel = model.get_layer("stem").kernel
    for step in (5, 10):
        kernel.assign(np.full(kernel.shape, step, "float32"))
        checkpoint.save_state(tmp_path, model, step)
    newest = checkpoint.state_path(tmp_path, 10)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # cut mid-write

    restored = compiled_tiny_model()
    header = checkpoint.restore_latest(tmp_path, restored)
    assert header["step"] == 5
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(restored.get_layer("stem").kernel), 5)
    assert "state-000000010.npz is damaged" in caplog.text
    assert not list(tmp_path.glob(".*tmp"))


def test_states_keep_the_newest_and_refuse_another_model(tmp_path):
    model = compiled_tiny_model()
    for step in (1, 2, 3):
        checkpoint.save_state(tmp_path, model, step, keep=2)
    assert [p.name for p in checkpoint.list_states(tmp_path)] == [
        "state-000000003.npz", "state-000000002.npz"]
    other = MLPMixer(image_shape=(8, 8, 1), num_classes=3, patch_size=4, num_blocks=1,
                     hidden_dim=8, tokens_mlp_dim=2, channels_mlp_dim=4)
    other.compile(optimizer="adam", loss="categorical_crossentropy")
    with pytest.raises(ValueError, match="has shape .* a different config. Use a new work directory"):
        checkpoint.restore_latest(tmp_path, other)


def test_a_damaged_state_is_moved_aside_and_takes_no_retention_slot(tmp_path):
    model = compiled_tiny_model()
    for step in (5, 10):
        checkpoint.save_state(tmp_path, model, step, keep=2)
    newest = checkpoint.state_path(tmp_path, 10)
    newest.write_bytes(newest.read_bytes()[:100])
    restored = compiled_tiny_model()
    assert checkpoint.restore_latest(tmp_path, restored)["step"] == 5
    assert (tmp_path / "state-000000010.npz.damaged").exists()
    # keep=1: the state written after the resume is the one kept.
    checkpoint.save_state(tmp_path, restored, 6, keep=1)
    assert [p.name for p in checkpoint.list_states(tmp_path)] == ["state-000000006.npz"]


def test_no_state_of_non_finite_weights_is_written(tmp_path):
    model = compiled_tiny_model()
    kernel = model.get_layer("stem").kernel
    kernel.assign(np.full(kernel.shape, np.inf, "float32"))
    with pytest.raises(FloatingPointError, match=r"The weights are no longer finite \(stem/kernel\)"):
        checkpoint.save_state(tmp_path, model, 3)
    assert not list(tmp_path.iterdir())


def test_json_and_model_files_are_written_atomically(tmp_path, monkeypatch):
    checkpoint.save_json(tmp_path / "results.json", {"a": 1})
    model = compiled_tiny_model()
    checkpoint.save_model(model, tmp_path / "model.keras")
    before = (tmp_path / "model.keras").read_bytes()

    def crash(self, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError("No space left on device")

    monkeypatch.setattr(type(model), "save", crash)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save_model(model, tmp_path / "model.keras")
    assert (tmp_path / "model.keras").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.keras", "results.json"]


def test_load_model_names_what_is_wrong_with_the_file(tmp_path):
    import zipfile

    model = compiled_tiny_model()
    good = checkpoint.save_model(model, tmp_path / "good.keras")
    np.testing.assert_array_equal(checkpoint.load_model(good).get_weights()[0], model.get_weights()[0])
    whole = good.read_bytes()
    (tmp_path / "cut.keras").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "text.keras").write_text("not a model")
    with zipfile.ZipFile(tmp_path / "other.keras", "w") as archive:
        archive.writestr("notes.txt", "a zip, but not of a model")
    inputs = keras.Input((4,))
    keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs)).save(tmp_path / "code.keras")
    cases = {
        "missing.keras": (FileNotFoundError, r"No model at .*missing.keras"),
        "cut.keras": (ValueError, r"cut.keras is not a readable .keras file: it is not a zip archive"),
        "text.keras": (ValueError, r"text.keras is not a readable .keras file"),
        "other.keras": (ValueError, r"other.keras is not a model this package can load \(KeyError: "),
        "code.keras": (ValueError, r"holds Python code \(a Lambda layer\), which is never loaded"),
    }
    assert_errors(checkpoint.load_model, tmp_path, cases, never=("safe_mode=False", "File not found"))
