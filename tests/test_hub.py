"""timm weights by Hugging Face Hub id, local timm folder or file, normalised as each file says."""

import json
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_mixer import MLPMixer
from keras_mixer import hub
from keras_mixer import load_timm
from base import fixture_model
from base import to_numpy
from conftest import load_fixture
from conftest import subprocess_env

GOOGLE = ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def _timm_checkpoint(folder, mean, std, weights="model.safetensors"):
    """The timm fixture as timm publishes a checkpoint: weights and config.json."""
    from safetensors.numpy import save_file

    config, arrays = load_fixture("timm_mixer_tiny.npz")
    state = {k[len("state_dict/"):]: v for k, v in arrays.items() if k.startswith("state_dict/")}
    folder.mkdir(parents=True, exist_ok=True)
    if weights == "model.safetensors":
        save_file(state, str(folder / weights))
    else:
        import torch

        torch.save({k: torch.from_numpy(v) for k, v in state.items()}, folder / weights)
    (folder / "config.json").write_text(json.dumps({
        "architecture": "mixer_tiny", "num_classes": config["num_classes"],
        "pretrained_cfg": {"input_size": [3, *config["image"]], "mean": mean, "std": std,
                           "interpolation": "bicubic", "crop_pct": 0.875}}))
    return arrays


def _raw_pixels(arrays, mean, std):
    """The [0, 255] pixels that timm's transforms turn into the fixture's inputs."""
    return ((arrays["inputs"] * np.array(std) + np.array(mean)) * 255.0).astype("float32")


def _hub_cache(home, repo, mean, std, revision="0123456789abcdef0123456789abcdef01234567"):
    """A Hugging Face cache under `home` as huggingface_hub lays it out."""
    root = home / "hub" / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(revision)
    return _timm_checkpoint(root / "snapshots" / revision, mean, std)


@pytest.mark.parametrize("mean, std", [GOOGLE, IMAGENET])
def test_a_timm_folder_loads_with_its_own_normalisation(mean, std, tmp_path):
    arrays = _timm_checkpoint(tmp_path / "ckpt", mean, std)
    model = MLPMixer.from_timm(tmp_path / "ckpt")
    assert model.image_shape == (32, 32, 3) and not model.gelu_approximate
    assert model.pixel_mean == pytest.approx(mean) and model.pixel_std == pytest.approx(std)
    np.testing.assert_allclose(to_numpy(model(_raw_pixels(arrays, mean, std))), arrays["logits"], atol=1e-5)
    # The normalisation survives saving.
    model.save(tmp_path / "m.keras")
    reloaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(to_numpy(reloaded(_raw_pixels(arrays, mean, std))), arrays["logits"], atol=1e-5)


def test_pth_folders_files_and_overrides(tmp_path):
    pytest.importorskip("torch")  # pytorch_model.bin (the Colab lane has no torch)
    arrays = _timm_checkpoint(tmp_path / "bin", *IMAGENET, weights="pytorch_model.bin")
    model = MLPMixer.from_timm(tmp_path / "bin", num_classes=3)
    assert model.num_classes == 3 and not to_numpy(model.get_layer("head").kernel).any()  # a zero head
    # A bare weights file: the size from the caller, the official normalisation.
    bare = MLPMixer.from_timm(tmp_path / "bin" / "pytorch_model.bin", image_shape=(32, 32, 3))
    assert bare.pixel_mean is None
    np.testing.assert_allclose(to_numpy(bare(_raw_pixels(arrays, *GOOGLE))), arrays["logits"], atol=1e-5)
    # load_timm takes the same sources.
    config, _ = load_fixture("timm_mixer_tiny.npz")
    target = fixture_model(config, num_classes=config["num_classes"], gelu_approximate=False)
    load_timm(target, tmp_path / "bin")
    np.testing.assert_allclose(to_numpy(target(arrays["inputs"])), arrays["logits"], atol=1e-6)
    # Twice the pretrained size adapts the token-mixing MLPs (Appendix C); the normalisation stays.
    big = MLPMixer.from_timm(tmp_path / "bin", image_shape=(64, 64, 3))
    assert big.num_tokens == 256 and big.pixel_std == pytest.approx(IMAGENET[1])
    with pytest.raises(FileNotFoundError, match="holds neither model.safetensors nor pytorch_model.bin"):
        MLPMixer.from_timm(tmp_path)


def test_hub_ids_through_the_default_cache_offline(tmp_path):
    """A fresh process as a user runs it: HF_HOME is the only setting, two
    repositories with different normalisations, then a missing one."""
    home = tmp_path / "hf"
    raw = {}
    for repo, (mean, std) in (("timm/mixer_tiny.goog", GOOGLE), ("timm/mixer_tiny.imnet", IMAGENET)):
        arrays = _hub_cache(home, repo, mean, std)
        raw[repo] = _raw_pixels(arrays, mean, std)
        np.save(tmp_path / f"{repo.split('.')[-1]}.npy", raw[repo])
    code = (
        "import sys, time\nimport numpy as np\nfrom keras_mixer import MLPMixer\n"
        "import keras\n"
        "for name in ('goog', 'imnet'):\n"
        "    model = MLPMixer.from_timm(f'hf://timm/mixer_tiny.{name}')\n"
        "    logits = model(np.load(sys.argv[1] + f'/{name}.npy'))\n"
        "    np.save(sys.argv[1] + f'/{name}_logits.npy', keras.ops.convert_to_numpy(logits))\n"
        "start = time.perf_counter()\n"
        "try:\n"
        "    MLPMixer.from_timm('hf://timm/mixer_b16_224.goog_in21k')\n"
        "except FileNotFoundError as error:\n"
        "    print('ERROR', error, f'{time.perf_counter() - start:.1f}')\n"
    )
    env = {k: v for k, v in subprocess_env(keras.backend.backend()).items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    _, arrays = load_fixture("timm_mixer_tiny.npz")
    for name in ("goog", "imnet"):
        np.testing.assert_allclose(np.load(tmp_path / f"{name}_logits.npy"), arrays["logits"], atol=1e-5)
    line = [x for x in result.stdout.splitlines() if x.startswith("ERROR")][0]
    assert "hf://timm/mixer_b16_224.goog_in21k: its files are not in the Hugging Face cache" in line
    assert str(home / "hub") in line and "hf download timm/mixer_b16_224.goog_in21k" in line
    assert float(line.split()[-1]) < 5  # fast: no network wait


def test_hub_needs_its_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ImportError, match=r'hf://timm/x needs huggingface_hub: pip install "keras-mixer\[timm\]"'):
        hub.timm_files("hf://timm/x")


def test_hub_imports_only_the_standard_library_at_the_top():
    import ast

    tree = ast.parse(open(hub.__file__).read())
    top = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    top |= {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom)}
    assert top <= set(sys.stdlib_module_names), top
