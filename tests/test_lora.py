"""LoRA: adapters on the MLPs' Dense layers, everything else frozen but the head, a small file that restores them."""

import keras
import numpy as np
import pytest

from keras_mixer.model import MLPMixer
from base import to_numpy

IMAGES = np.random.default_rng(0).uniform(0, 255, (32, 16, 16, 3)).astype("float32")
LABELS = np.random.default_rng(1).integers(0, 5, 32)


def base_model():
    keras.utils.set_random_seed(3)
    return MLPMixer(image_shape=(16, 16, 3), patch_size=4, num_blocks=2, hidden_dim=32, tokens_mlp_dim=16,
                    channels_mlp_dim=64, num_classes=5)


def fit(model, steps=4):
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(IMAGES, LABELS, batch_size=8, epochs=1, steps_per_epoch=steps, verbose=0)


def test_enable_lora_adapts_the_mlps_and_freezes_all_but_the_head():
    model = base_model()
    before = to_numpy(model(IMAGES))
    paths = model.enable_lora(4)
    assert sorted(paths) == sorted(f"block_{b}/{m}/Dense_{d}" for b in range(2)
                                   for m in ("token_mixing", "channel_mixing") for d in (0, 1))
    trainable = sorted(v.path for v in model.trainable_variables)
    assert trainable == sorted([f"{p}/lora_kernel_{ab}" for p in paths for ab in "ab"] + ["head/kernel", "head/bias"])
    # B starts at zero: the adapted model is the base model.
    np.testing.assert_array_equal(to_numpy(model(IMAGES)), before)
    lora_params = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    assert lora_params < model.count_params() / 4


def test_fine_tune_save_and_restore_on_a_fresh_base(tmp_path):
    model = base_model()
    base = [np.copy(w) for w in model.get_weights()]
    frozen = {v.path: np.copy(to_numpy(v)) for v in model.weights if "head" not in v.path}
    model.enable_lora(4, alpha=8)
    fit(model)
    tuned = to_numpy(model(IMAGES))
    # Only the adapters and the head moved.
    for variable in model.weights:
        if variable.path in frozen:
            np.testing.assert_array_equal(to_numpy(variable), frozen[variable.path], err_msg=variable.path)
    assert np.abs(tuned - to_numpy(base_model()(IMAGES))).max() > 1e-3
    path = model.save_lora_weights(tmp_path / "adapters.lora.npz")
    model.save(tmp_path / "full.keras")
    assert path.stat().st_size < (tmp_path / "full.keras").stat().st_size / 3
    # A fresh model with the base weights, then the file: the fine-tuned outputs.
    fresh = base_model()
    fresh.set_weights(base)
    fresh.load_lora_weights(path)
    assert fresh.lora_rank == 4 and fresh.lora_alpha == 8
    np.testing.assert_allclose(to_numpy(fresh(IMAGES)), tuned, atol=1e-6)
    # The .keras file of a LoRA model is the merged model, a plain MLPMixer.
    merged = keras.saving.load_model(tmp_path / "full.keras", compile=False)
    np.testing.assert_allclose(to_numpy(merged(IMAGES)), tuned, atol=1e-5)
    assert not any("lora" in v.path for v in merged.weights)


def test_target_names_pick_layers_by_path_suffix():
    model = base_model()
    paths = model.enable_lora(2, ["block_1/channel_mixing/Dense_1", "token_mixing/Dense_0"])
    expected = ["block_0/token_mixing/Dense_0", "block_1/channel_mixing/Dense_1", "block_1/token_mixing/Dense_0"]
    assert sorted(paths) == expected
    assert sorted({v.path.rsplit("/", 1)[0] for v in model.trainable_variables if "lora" in v.path}) == expected


def test_clear_errors(tmp_path):
    model = base_model()
    with pytest.raises(ValueError, match="This model has no LoRA adapters: call model.enable_lora"):
        model.save_lora_weights(tmp_path / "x.npz")
    with pytest.raises(ValueError, match=r"`rank` must be a positive integer, got 0"):
        model.enable_lora(0)
    with pytest.raises(ValueError, match=r"LoRA target\(s\) \['mixing/Dense_7'\] match no Dense layer.*"
                                         r"block_\d/(token|channel)_mixing/Dense_\d"):
        model.enable_lora(4, ["mixing/Dense_7"])
    model.enable_lora(4)
    with pytest.raises(ValueError, match="LoRA is already enabled"):
        model.enable_lora(2)
    path = model.save_lora_weights(tmp_path / "rank4.npz")
    other = base_model()
    other.enable_lora(2)
    with pytest.raises(ValueError, match=r"holds rank-4 adapters on .*; this model has rank 2"):
        other.load_lora_weights(path)
    wider = MLPMixer(image_shape=(16, 16, 3), patch_size=4, num_blocks=2, hidden_dim=32, tokens_mlp_dim=16,
                     channels_mlp_dim=64, num_classes=7)
    with pytest.raises(ValueError, match=r"does not fit this model .*head/kernel: file \(32, 5\), model \(32, 7\)"):
        wider.load_lora_weights(path)
    np.savez(tmp_path / "plain.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="is not a LoRA file of save_lora_weights"):
        base_model().load_lora_weights(tmp_path / "plain.npz")
