"""The Colab notebooks: clean in the repository, and every cell runs.

Each notebook runs top to bottom in a fresh Jupyter kernel (nbclient) with
`KERAS_MIXER_SMOKE_TEST=1`, which the notebooks read to switch to tiny
models, a few steps, bundled or mock data. The checkpoint name they
register and load (`RELEASED_NAME`) is served by a local mirror holding the
parameters of `../shared/fixtures/official_flax_mixer_tiny.npz`, and lands
checked, with its SHA-256 record, in the default cache under a temporary
HOME, as a user's download would. The notebooks
choose the JAX backend themselves; `KERAS_MIXER_NOTEBOOK_BACKEND` (set to
this process's backend) runs the quickstart on every backend
(`NOTEBOOK_BACKENDS`). Any cell error fails the test with the cell's
traceback.
"""

import json
import os
import re

import numpy as np
import pytest

from conftest import FIXTURES
from conftest import ROOT
from conftest import checkout_pythonpath
from conftest import in_the_colab_lane
from conftest import once

nbformat = pytest.importorskip("nbformat")

NOTEBOOKS = ROOT / "notebooks"
# Each notebook and the files it must leave in its working directory.
EXPECTED = {
    "01_quickstart.ipynb": ["quickstart/log.csv", "quickstart/curves.png", "quickstart/model.keras"],
    "02_finetune_pretrained.ipynb": [
        "finetune/cifar10_2x.keras", "finetune/cifar10_2x.npz", "finetune/cifar10.keras",
        "finetune/cifar10.lora.npz", "finetune/cifar10_int8.keras", "finetune/export_int8/saved_model",
    ],
    "03_pretrain_tpu.ipynb": [
        "runs/pretrain_s16_imagenette/model.keras",
        "runs/pretrain_s16_imagenette/results.json",
        "runs/pretrain_s16_imagenette/curves.png",
    ],
    "04_inspect.ipynb": [
        "inspect/digits_curves.png", "inspect/digits_confusion.png", "inspect/digits_stem.png",
        "inspect/digits_feature_maps.png",
        *[f"inspect/digits_token_mixing_block{b}.png" for b in range(4)],
        "inspect/pretrained_token_mixing_block0.png", "inspect/pretrained_token_mixing_block1.png",
        "inspect/pretrained_stem.png",
    ],
    "05_export.ipynb": [
        "exported/saved_model", "exported/model_float32.tflite", "exported/model_float16.tflite",
        "exported/model_int8.tflite", "exported/export_report.json", "exported/class_names.json",
        "digit.png",
    ],
}


# The extras each notebook installs: only what it uses. Every one feeds
# tf.data (`train`); Colab's TPU runtime ships JAX.
EXTRAS = {
    "01_quickstart.ipynb": "[train,viz]", "02_finetune_pretrained.ipynb": "[train,timm]",
    "03_pretrain_tpu.ipynb": "[train,viz]", "04_inspect.ipynb": "[train,viz]",
    "05_export.ipynb": "[train,litert]",
}
RELEASED_NAME = "smoke/Mixer-tiny"  # registered by the notebooks under SMOKE_TEST
TIMM_ID = "timm/mixer_tiny.smoke"  # 02's hf:// id under SMOKE_TEST
# The backends each notebook runs on here. They are Colab TPU notebooks
# and choose JAX themselves, so each runs on JAX: in the Colab lane
# (Colab's versions, the built wheel), or in the JAX pass where no lane runs
# beside it (`in_the_colab_lane`). The quickstart says it runs on JAX,
# TensorFlow or PyTorch, so it also runs on those (through
# KERAS_MIXER_NOTEBOOK_BACKEND). What the others drive on TensorFlow and
# PyTorch, fine-tuning, pretraining, inspection and export, is tested on
# every backend by test_training, test_weights, test_visualize and
# test_export.
NOTEBOOK_BACKENDS = {"01_quickstart.ipynb": ("jax", "tensorflow", "torch")}


def _repository_url():
    text = (ROOT / "pyproject.toml").read_text()
    return re.search(r'Repository = "https://github.com/([^"]+)"', text).group(1)


def _version():
    text = (ROOT / "pyproject.toml").read_text()
    return re.search(r'^version = "([^"]+)"', text, re.MULTILINE).group(1)


def _read(name):
    return nbformat.read(NOTEBOOKS / name, as_version=4)


def test_every_notebook_is_tested():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_is_clean(name):
    notebook = _read(name)
    nbformat.validate(notebook)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    # No stored outputs: diffs stay readable and nothing stale is shown.
    assert all(not c.outputs and c.execution_count is None for c in code)
    first = notebook.cells[0]
    repo = _repository_url()
    assert first.cell_type == "markdown"
    assert (f"https://colab.research.google.com/github/{repo}/blob/main/notebooks/{name}"
            in first.source), "Open-in-Colab badge missing or pointing elsewhere"
    install = code[0].source
    assert 'find_spec("keras_mixer") is None' in install
    # One pinned specification: the release whose version pyproject.toml
    # states, so that a notebook opened from a release tag installs that
    # release. Bump the tag here when the version changes.
    spec = f"keras-mixer{EXTRAS[name]} @ git+https://github.com/{repo}@v{_version()}"
    assert f'KERAS_MIXER = "{spec}"' in install, f"{name}: install cell must pin {spec!r}"
    source = "\n".join(c.source for c in code)
    # Only the extras it uses: tf.data (train), matplotlib (viz), the LiteRT interpreter (litert).
    assert "train" in EXTRAS[name] and re.search(r"\b(data|training)\.", source), name
    uses_viz = bool(re.search(r"matplotlib|visualize", source))
    assert uses_viz == ("viz" in EXTRAS[name]), name
    assert ("ai_edge_litert" in source) == ("litert" in EXTRAS[name]), name
    # Colab's TPU runtime: a v5e chip.
    assert notebook.metadata["accelerator"] == "TPU"
    assert notebook.metadata["colab"]["gpuType"] == "V5E1"
    # JAX is assigned, not defaulted: a KERAS_BACKEND left over from
    # elsewhere must not silently win.
    assert 'os.environ["KERAS_BACKEND"] = BACKEND' in source and "setdefault" not in source
    assert 'os.environ.get("KERAS_MIXER_NOTEBOOK_BACKEND", "jax")' in source
    assert 'os.environ.get("KERAS_MIXER_SMOKE_TEST")' in source
    assert "from keras_mixer import" in source
    # The notebooks drive the package; they never redefine its code.
    assert not re.search(r"^\s*(class|def) ", source, re.MULTILINE)
    # The backend is chosen before anything imports Keras.
    assert source.index("KERAS_BACKEND") < source.index("import keras")
    # Every code cell is explained.
    kinds = [c.cell_type for c in notebook.cells]
    assert "markdown" in kinds[2:] and sum(k == "markdown" for k in kinds) >= 4


def _backend_cell(name):
    cells = [c.source for c in _read(name).cells
             if c.cell_type == "code" and "KERAS_MIXER_NOTEBOOK_BACKEND" in c.source]
    assert len(cells) == 1, name
    return cells[0]


def test_every_notebook_sets_the_backend_the_same_way():
    assert len({_backend_cell(name) for name in EXPECTED}) == 1


@once("the subprocesses choose their own backends")
@pytest.mark.parametrize("imported", ["torch", "jax"])
def test_backend_cell_refuses_a_keras_imported_with_another_backend(imported, tmp_path):
    """A user who imported Keras (on Colab's default backend) before the
    notebook's backend cell is told to restart, instead of getting a run on
    the wrong backend."""
    import importlib.util
    import subprocess
    import sys

    from conftest import subprocess_env

    if importlib.util.find_spec(imported) is None:
        pytest.skip(f"{imported} is not installed in this environment")
    cell = _backend_cell("01_quickstart.ipynb")
    env = subprocess_env(imported)
    env.pop("KERAS_MIXER_NOTEBOOK_BACKEND", None)
    wanted = "tensorflow" if imported == "jax" else "jax"
    code = (f"import keras\nimport os\nos.environ['KERAS_MIXER_NOTEBOOK_BACKEND'] = {wanted!r}\n"
            + cell)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode != 0
    assert (f"Keras was already imported with the {imported} backend, and this notebook "
            f"runs on {wanted}. Restart the session") in result.stderr
    # Without an earlier import the cell sets the backend.
    code = f"import os\nos.environ['KERAS_MIXER_NOTEBOOK_BACKEND'] = {imported!r}\n" + cell
    code += "\nimport keras\nprint(keras.backend.backend())"
    result = subprocess.run([sys.executable, "-c", code], env=dict(env, KERAS_BACKEND="tensorflow"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == imported


def _execute(name, workdir, timeout=900):
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    notebook = _read(name)
    client = NotebookClient(
        notebook, timeout=timeout, kernel_name="python3",
        resources={"metadata": {"path": str(workdir)}},
    )
    try:
        client.execute()
    except CellExecutionError as error:
        # Tracebacks come with terminal colours; keep the text.
        message = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
        pytest.fail(f"{name}: a cell failed:\n{message}", pytrace=False)
    return notebook


@pytest.fixture
def notebook_env(tmp_path, monkeypatch):
    """What a user's kernel sees, in tmp_path: smoke settings, no cache
    variables (released checkpoints go to the default cache under HOME),
    and a local mirror instead of the network."""
    import keras

    # The fixture's parameters, keyed as in a released checkpoint file.
    with np.load(FIXTURES / "official_flax_mixer_tiny.npz") as fixture:
        params = {k[len("params/"):]: fixture[k] for k in fixture.files if k.startswith("params/")}
    checkpoint = tmp_path / "mirror" / f"{RELEASED_NAME}.npz"
    checkpoint.parent.mkdir(parents=True)
    np.savez(checkpoint, **params)
    (tmp_path / "home").mkdir()
    for variable in ("KERAS_MIXER_CACHE", "KERAS_HOME", "KERAS_MIXER_SMOKE_CHECKPOINT"):
        monkeypatch.delenv(variable, raising=False)
    # timm's tiny fixture as a Hub download leaves it in the default
    # Hugging Face cache (~/.cache/huggingface), for 02's TIMM_ID; offline.
    from test_hub import GOOGLE
    from test_hub import _hub_cache

    _hub_cache(tmp_path / "home" / ".cache" / "huggingface", TIMM_ID, *GOOGLE)
    for variable in [v for v in os.environ if v.startswith("HF_")]:
        monkeypatch.delenv(variable)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KERAS_MIXER_MIRROR", str(tmp_path / "mirror"))
    monkeypatch.setenv("KERAS_MIXER_SMOKE_TEST", "1")
    monkeypatch.setenv("KERAS_MIXER_NOTEBOOK_BACKEND", keras.backend.backend())
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    # Jupyter's connection files, IPython's profile and matplotlib's cache
    # go to tmp_path: CI's home directory may be read-only.
    for variable in ("JUPYTER_RUNTIME_DIR", "IPYTHONDIR", "MPLCONFIGDIR"):
        directory = tmp_path / "home" / variable.lower()
        directory.mkdir(parents=True)
        monkeypatch.setenv(variable, str(directory))
    # The kernel imports the checkout (or, in the Colab lane, the installed wheel).
    monkeypatch.setenv("PYTHONPATH", checkout_pythonpath(os.environ))
    return tmp_path


@in_the_colab_lane("Colab notebooks, on Colab's versions")
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_runs(name, notebook_env):
    import keras

    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    backends = NOTEBOOK_BACKENDS.get(name, ("jax",))
    if keras.backend.backend() not in backends:
        pytest.skip(f"{name} runs on {', '.join(backends)} (see NOTEBOOK_BACKENDS)")
    notebook = _execute(name, notebook_env)
    for relative in EXPECTED[name]:
        path = notebook_env / relative
        assert path.exists(), f"{name} did not write {relative}"
        if path.is_file():
            assert path.stat().st_size > 0, relative
    text = "".join(
        output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
        for output in cell.outputs
    )
    if name in ("02_finetune_pretrained.ipynb", "04_inspect.ipynb"):
        # The released name went through the default cache: ~/.keras/mixer_models.
        cached = notebook_env / "home" / ".keras" / "mixer_models" / f"{RELEASED_NAME}.npz"
        assert cached.is_file() and cached.with_name(cached.name + ".sha256").is_file()
    if name in ("02_finetune_pretrained.ipynb", "03_pretrain_tpu.ipynb"):
        assert re.search(r"Batch plan: global batch 8, 8 per device on 1 x ", text), text[-3000:]
    if name == "03_pretrain_tpu.ipynb":
        results = json.loads((notebook_env / EXPECTED[name][1]).read_text())
        assert results["steps"] == 4 and results["backend"] == keras.backend.backend()
    if name == "04_inspect.ipynb":
        # The few-shot table has a row per shot count.
        assert re.search(r"^\s+25\s+\d\.\d{3} ± \d\.\d{3}\s+\d\.\d{3} ± ", text, re.MULTILINE), text
    if name == "05_export.ipynb":
        report = json.loads((notebook_env / "exported/export_report.json").read_text())
        assert [e["passed"] for e in report["files"]] == [True] * 4
        if _kerashub_installed():  # the kerashub extra (not in the Colab lane: keras 3.13)
            assert (notebook_env / "exported/kerashub/config.json").is_file()
            difference = re.search(r"MixerImageClassifier from exported/kerashub: max \|logit - Keras\| "
                                   r"(\S+), top-1 agreement 1\.0000", text)
            assert difference and float(difference.group(1)) <= 1e-5, text[-3000:]
        else:
            assert 'No KerasHub preset: keras_mixer.kerashub needs KerasHub: pip install' in text
    if name == "02_finetune_pretrained.ipynb":
        assert re.search(r"LoRA rank 8 on \d+ Dense layers", text) and "finetune/cifar10.lora.npz" in text
        assert "hf://timm/mixer_tiny.smoke: image (32, 32, 3)" in text and "exact GELU: True" in text
        lora, full = (notebook_env / "finetune/cifar10.lora.npz"), (notebook_env / "finetune/cifar10.keras")
        assert lora.stat().st_size < full.stat().st_size


def _kerashub_installed():
    try:
        from keras_mixer import kerashub  # noqa: F401
    except ImportError:
        return False
    return True
