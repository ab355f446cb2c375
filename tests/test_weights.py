"""Official checkpoints and timm weights onto `MLPMixer`: strict loads, files written
back, head surgery, and the paper's Appendix C resolution adaptation."""

import importlib.util
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import keras

from keras_mixer import MLPMixer
from keras_mixer import load_official
from keras_mixer import npz
from keras_mixer import weights
from keras_mixer.weights import load_timm
from keras_mixer.weights import official_variables
from base import assert_errors
from base import to_numpy
from conftest import load_fixture
from conftest import subprocess_env
from base import fixture_model
from base import fixture_params

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
    load_official(model, {k[len("params/"):]: v for k, v in fixture_params(arrays).items()})
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
        load_official(model, params)
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
        load_official(model, fixture_params(arrays))


@pytest.mark.parametrize("target", OTHER_BACKENDS)
def test_weights_file_gives_same_logits_on_other_backend(official_fixture, tmp_path, target):
    """Weights saved here load under `target` (a subprocess) to the same logits."""
    package = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}[target]
    if importlib.util.find_spec(package) is None:
        # The Colab lane has Colab's TPU software: JAX and TensorFlow, no PyTorch.
        pytest.skip(f"{package} is not installed in this environment")
    config, arrays = official_fixture
    model = fixture_model(config, num_classes=config["num_classes"])
    load_official(model, fixture_params(arrays))
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


class _RunsCode:
    """A pickle payload that would create `marker` if it were ever unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_load_timm_names_what_is_wrong_with_a_file(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.numpy import save_file

    config, arrays = load_fixture("timm_mixer_tiny.npz")
    model = fixture_model(config, num_classes=config["num_classes"], gelu_approximate=False)
    marker = tmp_path / "code_ran"
    torch.save([torch.zeros(3)], tmp_path / "list.pth")
    torch.save({"stem.proj.weight": _RunsCode(marker)}, tmp_path / "payload.pth")
    data = (tmp_path / "list.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    save_file({"stem.proj.bias": np.zeros(48, "float32")}, str(tmp_path / "whole.safetensors"))
    data = (tmp_path / "whole.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    cases = {
        "list.pth": (ValueError, r"holds a list, not a state_dict"),
        "payload.pth": (ValueError, r"holds Python objects besides tensors, which are never loaded"),
        "cut.pth": (ValueError, r"cut.pth' is not a readable PyTorch file .*truncated or corrupted"),
        "cut.safetensors": (ValueError, r"cut.safetensors' is not a readable .safetensors file"),
        "absent.pth": (FileNotFoundError, r"timm weights file .*absent.pth' does not exist"),
    }
    assert_errors(lambda path: load_timm(model, path), tmp_path, cases, never=("weights_only=False",))
    assert not marker.exists()


def test_load_timm_reads_safetensors(tmp_path):
    from safetensors.numpy import save_file

    config, arrays = load_fixture("timm_mixer_tiny.npz")
    save_file({k[len("state_dict/"):]: v for k, v in timm_state_dict(arrays).items()},
              str(tmp_path / "mixer.safetensors"))
    model = fixture_model(config, num_classes=config["num_classes"], gelu_approximate=False)
    load_timm(model, tmp_path / "mixer.safetensors")
    assert np.abs(to_numpy(model(arrays["inputs"])) - arrays["logits"]).max() <= 1e-6


def test_from_checkpoint_infers_the_fixture_config_and_matches_its_logits(official_npz):
    path, params, config, arrays = official_npz
    model = MLPMixer.from_checkpoint(path, include_preprocessing=False)
    inferred = weights.official_config(params)
    assert inferred == dict(
        image_shape=(*config["image"], 3), patch_size=tuple(config["patch"]),
        num_blocks=config["num_blocks"], hidden_dim=config["hidden_dim"],
        tokens_mlp_dim=config["tokens_mlp_dim"], channels_mlp_dim=config["channels_mlp_dim"],
        num_classes=config["num_classes"],
    )
    assert np.abs(to_numpy(model(arrays["inputs"])) - arrays["logits"]).max() <= 1e-6


def test_save_official_round_trip_is_bit_exact(official_npz, tmp_path):
    path, params, _, arrays = official_npz
    model = MLPMixer.from_checkpoint(path, include_preprocessing=False)
    out = weights.save_official(model, tmp_path / "out" / "saved.npz")
    saved = npz.read(out)
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in params.items()}
    for key in params:
        np.testing.assert_array_equal(saved[key], params[key])
    again = MLPMixer.from_checkpoint(out, include_preprocessing=False)
    for a, b in zip(model.weights, again.weights):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))
    assert not list((tmp_path / "out").glob(".*tmp"))


def test_head_surgery(official_npz, caplog):
    path, _, config, arrays = official_npz
    base = MLPMixer.from_checkpoint(path, include_preprocessing=False)
    same = weights.reset_head(base, config["num_classes"])
    np.testing.assert_array_equal(to_numpy(same(arrays["inputs"])), to_numpy(base(arrays["inputs"])))
    new = weights.reset_head(base, 7)
    assert "fresh zero head of 7 classes" in caplog.text
    np.testing.assert_array_equal(to_numpy(new(arrays["inputs"])), 0.0)  # zero head
    headless = weights.reset_head(base, None)
    features = to_numpy(headless(arrays["inputs"]))
    assert np.abs(features - arrays["pre_logits"]).max() <= 1e-6  # backbone unchanged
    assert [layer.name for layer in headless.layers] == [layer.name for layer in base.layers][:-1]
    # The original keeps working and shares no arrays with the copies.
    base.get_layer("stem").kernel.assign(np.zeros(base.get_layer("stem").kernel.shape))
    assert np.abs(to_numpy(headless(arrays["inputs"])) - arrays["pre_logits"]).max() <= 1e-6
    from_file = MLPMixer.from_checkpoint(path, num_classes=5, include_preprocessing=False)
    assert from_file.output_shape == (None, 5)


def windows_mean(model, images, factors):
    kh, kw = factors
    h, w = model.image_shape[:2]
    outs = [
        to_numpy(model(images[:, i * h:(i + 1) * h, j * w:(j + 1) * w]))
        for i in range(kh) for j in range(kw)
    ]
    return np.mean(outs, axis=0)


@pytest.mark.parametrize("factors", [(2, 2), (3, 3), (1, 2), (3, 2)])
def test_appendix_c_equals_the_mean_over_windows(factors, official_npz):
    path, _, _, _ = official_npz
    base = MLPMixer.from_checkpoint(path, include_preprocessing=False)
    headless = weights.reset_head(base, None)
    kh, kw = factors
    shape = (32 * kh, 32 * kw, 3)
    images = np.random.default_rng(0).normal(size=(2, *shape)).astype("float32")
    adapted = weights.adapt_resolution(base, shape)
    assert adapted.num_tokens == base.num_tokens * kh * kw
    assert adapted.tokens_mlp_dim == base.tokens_mlp_dim * kh * kw
    logits_error = np.abs(to_numpy(adapted(images)) - windows_mean(base, images, factors)).max()
    adapted_features = weights.reset_head(adapted, None)
    features_error = np.abs(
        to_numpy(adapted_features(images)) - windows_mean(headless, images, factors)).max()
    print(f"Appendix C {factors}: logits {logits_error:.2e}, pre-logits {features_error:.2e}")
    assert logits_error <= 1e-5 and features_error <= 1e-5
    # The same through from_checkpoint.
    direct = MLPMixer.from_checkpoint(path, image_shape=shape, include_preprocessing=False)
    np.testing.assert_allclose(to_numpy(direct(images)), to_numpy(adapted(images)), atol=1e-6)


def test_non_integer_multiples_explain_the_rule(official_npz):
    path, _, _, _ = official_npz
    with pytest.raises(ValueError, match=r"height 48 is not an integer multiple of the pretraining height 32"
                       r".*nearest valid heights are 32 and 64"):
        MLPMixer.from_checkpoint(path, image_shape=(48, 64, 3))
    base = MLPMixer.from_checkpoint(path)
    with pytest.raises(ValueError, match=r"width 70 is not an integer multiple"):
        weights.adapt_resolution(base, (64, 70, 3))


def test_bad_files_give_clear_errors(official_npz, tmp_path):
    path, params, _, _ = official_npz
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="not a readable .npz file.*truncated or corrupted"):
        MLPMixer.from_checkpoint(truncated)
    text = tmp_path / "text.npz"
    text.write_text("hello")
    with pytest.raises(ValueError, match="not a readable .npz"):
        weights.read_official(text)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, obj=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="not a readable .npz"):
        weights.read_official(pickled)
    other = tmp_path / "other.npz"
    np.savez(other, weights=np.zeros(3))
    with pytest.raises(ValueError, match="Not an official MLP-Mixer checkpoint: no stem/kernel"):
        MLPMixer.from_checkpoint(other)
    with pytest.raises(FileNotFoundError, match="neither an existing .npz file nor a released"):
        MLPMixer.from_checkpoint(tmp_path / "missing.npz")
    model = MLPMixer.from_checkpoint(path)
    before = [to_numpy(w) for w in model.weights]
    broken = dict(params, **{"head/kernel": np.zeros((3, 3), "float32")})
    broken.pop("stem/bias")
    with pytest.raises(ValueError, match=r"1 missing keys:\n  stem/bias"):
        weights.load_official(model, broken)
    for w, b in zip(model.weights, before):
        np.testing.assert_array_equal(to_numpy(w), b)  # nothing half-loaded


def _non_square_model():
    # 40x24 images, 8x4 patches: a 5x6 grid of 30 tokens.
    return MLPMixer(image_shape=(40, 24, 3), patch_size=(8, 4), num_blocks=2, hidden_dim=16,
                    tokens_mlp_dim=12, channels_mlp_dim=24, num_classes=4,
                    include_preprocessing=False, seed=3)


def _randomise(model):
    rng = np.random.default_rng(1)
    for variable in model.weights:  # the zero head would hide mistakes
        variable.assign(rng.normal(scale=0.3, size=variable.shape).astype("float32"))


def test_non_square_checkpoint_round_trips_at_its_size(tmp_path):
    model = _non_square_model()
    _randomise(model)
    path = weights.save_official(model, tmp_path / "non_square.npz")
    images = np.random.default_rng(0).normal(size=(2, 40, 24, 3)).astype("float32")
    # Built at its own size, the grid is the image's.
    again = MLPMixer.from_checkpoint(path, image_shape=(40, 24, 3), include_preprocessing=False)
    np.testing.assert_array_equal(to_numpy(again(images)), to_numpy(model(images)))
    named = MLPMixer.from_checkpoint(path, pretrained_image_shape=(40, 24, 3),
                                     include_preprocessing=False)
    assert named.image_shape == (40, 24, 3)
    np.testing.assert_array_equal(to_numpy(named(images)), to_numpy(model(images)))
    # Without either, the error names the argument that fixes it.
    with pytest.raises(ValueError, match=r"30 tokens .*not a square grid.*pretrained_image_shape"):
        MLPMixer.from_checkpoint(path)
    with pytest.raises(ValueError, match=r"image_shape \(80, 48, 3\) gives 120 tokens.*pretrained_image_shape"):
        MLPMixer.from_checkpoint(path, image_shape=(80, 48, 3))
    with pytest.raises(ValueError,
                       match=r"pretrained_image_shape \(40, 40, 3\).*gives 50 tokens; the checkpoint has 30"):
        MLPMixer.from_checkpoint(path, pretrained_image_shape=(40, 40, 3))


def test_non_square_checkpoint_at_twice_its_size_is_the_window_mean(tmp_path):
    model = _non_square_model()
    _randomise(model)
    path = weights.save_official(model, tmp_path / "non_square.npz")
    images = np.random.default_rng(0).normal(size=(2, 80, 48, 3)).astype("float32")
    expected = windows_mean(model, images, (2, 2))
    direct = MLPMixer.from_checkpoint(path, image_shape=(80, 48, 3),
                                      pretrained_image_shape=(40, 24, 3),
                                      include_preprocessing=False)
    assert direct.num_tokens == 4 * model.num_tokens
    assert np.abs(to_numpy(direct(images)) - expected).max() <= 1e-5
    adapted = weights.adapt_resolution(model, (80, 48, 3))
    np.testing.assert_allclose(to_numpy(adapted(images)), to_numpy(direct(images)), atol=1e-6)
    config = weights.official_config(npz.read(path), (80, 48, 3), (40, 24, 3))
    assert config["image_shape"] == (40, 24, 3) and config["patch_size"] == (8, 4)
