import importlib.util
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import keras

from keras_mixer import MLPMixer
from keras_mixer import load_official_params
from keras_mixer.weights import load_timm
from keras_mixer.weights import official_variables
from base import to_numpy
from conftest import load_fixture
from conftest import subprocess_env
from test_model import fixture_model
from test_model import fixture_params

OTHER_BACKENDS = [b for b in ("jax", "tensorflow", "torch") if b != keras.backend.backend()]


def test_official_keys_cover_every_weight(official_fixture):
    config, arrays = official_fixture
    model = fixture_model(config, num_classes=config["num_classes"])
    variables = official_variables(model)
    assert sorted(variables) == sorted(k[len("params/"):] for k in fixture_params(arrays))
    assert len(variables) == len(model.weights)


def test_unprefixed_keys_load(official_fixture):
    config, arrays = official_fixture
    model = fixture_model(config, num_classes=config["num_classes"])
    load_official_params(model, {k[len("params/"):]: v for k, v in fixture_params(arrays).items()})
    assert np.abs(to_numpy(model(arrays["inputs"])) - arrays["logits"]).max() <= 1e-6


def test_bad_params_list_every_problem_and_assign_nothing(official_fixture):
    config, arrays = official_fixture
    model = fixture_model(config, num_classes=config["num_classes"])
    before = [to_numpy(w) for w in model.weights]
    params = {k[len("params/"):]: v for k, v in fixture_params(arrays).items()}
    del params["MixerBlock_2/LayerNorm_1/scale"]
    params["MixerBlock_9/LayerNorm_0/scale"] = np.ones(48, "float32")
    params["head/kernel"] = np.zeros((48, 1000), "float32")
    with pytest.raises(ValueError) as info:
        load_official_params(model, params)
    message = str(info.value)
    assert "1 missing keys:\n  MixerBlock_2/LayerNorm_1/scale" in message
    assert "1 unexpected keys:\n  MixerBlock_9/LayerNorm_0/scale" in message
    assert "head/kernel: checkpoint (48, 1000) vs model (48, 10)" in message
    assert "Build the model with the checkpoint's variant" in message
    for old, new in zip(before, model.weights):
        np.testing.assert_array_equal(old, to_numpy(new))


def test_wrong_variant_is_reported_as_shape_mismatch(official_fixture):
    _, arrays = official_fixture
    model = MLPMixer(image_shape=(32, 32, 3), patch_size=8, num_blocks=3, hidden_dim=48,
                     tokens_mlp_dim=24, channels_mlp_dim=96, num_classes=10)
    with pytest.raises(ValueError, match=r"token_mixing/Dense_0/kernel: checkpoint \(64, 24\) vs model \(16, 24\)"):
        load_official_params(model, fixture_params(arrays))


@pytest.mark.parametrize("target", OTHER_BACKENDS)
def test_weights_file_gives_same_logits_on_other_backend(official_fixture, tmp_path, target):
    """Weights saved here load under `target` (a subprocess) to the same logits."""
    package = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}[target]
    if importlib.util.find_spec(package) is None:
        # The Colab lane has Colab's TPU software: JAX and TensorFlow, no PyTorch.
        pytest.skip(f"{package} is not installed in this environment")
    config, arrays = official_fixture
    model = fixture_model(config, num_classes=config["num_classes"])
    load_official_params(model, fixture_params(arrays))
    weights = tmp_path / "tiny.weights.h5"
    model.save_weights(weights)
    np.save(tmp_path / "inputs.npy", arrays["inputs"])
    np.save(tmp_path / "expected.npy", to_numpy(model(arrays["inputs"])))
    script = textwrap.dedent(f"""
        import json, numpy as np, keras
        from keras_mixer import MLPMixer
        assert keras.backend.backend() == {target!r}
        model = MLPMixer.from_config(json.loads({repr(__import__('json').dumps(model.get_config()))}))
        model.load_weights({str(weights)!r})
        out = keras.ops.convert_to_numpy(model(np.load({str(tmp_path / 'inputs.npy')!r})))
        print(float(np.abs(out - np.load({str(tmp_path / 'expected.npy')!r})).max()))
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], env=subprocess_env(target),
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.strip().splitlines()[-1]) <= 1e-5


# --- timm --------------------------------------------------------------------


def timm_state_dict(arrays):
    return {k: v for k, v in arrays.items() if k.startswith("state_dict/")}


def test_load_timm_matches_timm_logits_and_pre_logits():
    config, arrays = load_fixture("timm_mixer_tiny.npz")
    model = fixture_model(config, num_classes=config["num_classes"], gelu_approximate=False)
    load_timm(model, timm_state_dict(arrays))
    assert np.abs(to_numpy(model(arrays["inputs"])) - arrays["logits"]).max() <= 1e-6
    features = fixture_model(config, num_classes=None, gelu_approximate=False)
    load_timm(features, timm_state_dict(arrays))
    assert np.abs(to_numpy(features(arrays["inputs"])) - arrays["pre_logits"]).max() <= 1e-6


def test_load_timm_refuses_tanh_gelu_model():
    config, arrays = load_fixture("timm_mixer_tiny.npz")
    model = fixture_model(config, num_classes=config["num_classes"])
    with pytest.raises(ValueError, match="exact.*GELU.*gelu_approximate=False"):
        load_timm(model, timm_state_dict(arrays))


def test_load_timm_reads_pth_files_safely(tmp_path):
    torch = pytest.importorskip("torch")
    config, arrays = load_fixture("timm_mixer_tiny.npz")
    state = {k[len("state_dict/"):]: torch.from_numpy(v) for k, v in timm_state_dict(arrays).items()}
    torch.save(state, tmp_path / "mixer.pth")
    model = fixture_model(config, num_classes=config["num_classes"], gelu_approximate=False)
    load_timm(model, tmp_path / "mixer.pth")
    assert np.abs(to_numpy(model(arrays["inputs"])) - arrays["logits"]).max() <= 1e-6


def test_load_timm_reports_foreign_keys_and_unknown_formats(tmp_path):
    config, arrays = load_fixture("timm_mixer_tiny.npz")
    model = fixture_model(config, num_classes=config["num_classes"], gelu_approximate=False)
    state = {k[len("state_dict/"):]: v for k, v in timm_state_dict(arrays).items()}
    state["blocks.0.gamma"] = np.ones(48, "float32")
    del state["blocks.2.norm2.bias"]
    with pytest.raises(ValueError) as info:
        load_timm(model, state)
    assert "unexpected keys:\n  blocks.0.gamma" in str(info.value)
    assert "missing keys:\n  MixerBlock_2/LayerNorm_1/bias" in str(info.value)
    with pytest.raises(ValueError, match=r"Unknown timm weights format.*\.safetensors.*\.pth"):
        load_timm(model, tmp_path / "mixer.ckpt")


def test_load_timm_reads_safetensors(tmp_path):
    from safetensors.numpy import save_file

    config, arrays = load_fixture("timm_mixer_tiny.npz")
    save_file({k[len("state_dict/"):]: v for k, v in timm_state_dict(arrays).items()},
              str(tmp_path / "mixer.safetensors"))
    model = fixture_model(config, num_classes=config["num_classes"], gelu_approximate=False)
    load_timm(model, tmp_path / "mixer.safetensors")
    assert np.abs(to_numpy(model(arrays["inputs"])) - arrays["logits"]).max() <= 1e-6
