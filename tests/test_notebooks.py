"""The Colab notebooks: clean in the repository, and every cell runs.

Each notebook runs top to bottom in a fresh Jupyter kernel (nbclient) with
`KERAS_MIXER_SMOKE_TEST=1`, which the notebooks read to switch to tiny
models, a few steps, bundled or mock data and a local official-format
checkpoint (the parameters of `../shared/fixtures/official_flax_mixer_tiny.npz`)
instead of downloads. The kernel inherits this process's `KERAS_BACKEND`, so the
suite runs them once per backend. Any cell error fails the test with the
cell's traceback.
"""

import json
import os
import pathlib
import re

import numpy as np
import pytest

from conftest import FIXTURES
from conftest import ROOT

nbformat = pytest.importorskip("nbformat")

NOTEBOOKS = ROOT / "notebooks"
# Each notebook and the files it must leave in its working directory.
EXPECTED = {
    "01_quickstart.ipynb": ["quickstart/log.csv", "quickstart/curves.png", "quickstart/model.keras"],
    "02_finetune_pretrained.ipynb": ["finetune/cifar10_2x.keras", "finetune/cifar10_2x.npz"],
    "03_pretrain_tpu.ipynb": [
        "runs/pretrain_s16_imagenette/model.keras",
        "runs/pretrain_s16_imagenette/results.json",
        "runs/pretrain_s16_imagenette/curves.png",
    ],
    "04_inspect.ipynb": [
        "inspect/digits_curves.png", "inspect/digits_confusion.png", "inspect/digits_stem.png",
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


def _repository_url():
    text = (ROOT / "pyproject.toml").read_text()
    return re.search(r'Repository = "https://github.com/([^"]+)"', text).group(1)


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
    assert 'find_spec("keras_mixer") is None' in install and f"git+https://github.com/{repo}" in install
    source = "\n".join(c.source for c in code)
    assert 'os.environ.get("KERAS_MIXER_SMOKE_TEST")' in source
    assert "from keras_mixer import" in source
    # The notebooks drive the package; they never redefine its code.
    assert not re.search(r"^\s*(class|def) ", source, re.MULTILINE)
    # The backend is chosen before anything imports Keras.
    assert source.index("KERAS_BACKEND") < source.index("import keras")
    # Every code cell is explained.
    kinds = [c.cell_type for c in notebook.cells]
    assert "markdown" in kinds[2:] and sum(k == "markdown" for k in kinds) >= 4


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
    """What CI's kernels see: smoke settings, no downloads, files in tmp_path."""
    # The fixture's parameters, keyed as in a released checkpoint file.
    with np.load(FIXTURES / "official_flax_mixer_tiny.npz") as fixture:
        params = {k[len("params/"):]: fixture[k] for k in fixture.files if k.startswith("params/")}
    checkpoint = tmp_path / "checkpoint" / "Mixer-tiny.npz"
    checkpoint.parent.mkdir()
    np.savez(checkpoint, **params)
    monkeypatch.setenv("KERAS_MIXER_SMOKE_TEST", "1")
    monkeypatch.setenv("KERAS_MIXER_SMOKE_CHECKPOINT", str(checkpoint))
    monkeypatch.setenv("KERAS_MIXER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    # Jupyter's connection files, IPython's profile and matplotlib's cache
    # go to tmp_path: CI's home directory may be read-only.
    for variable in ("JUPYTER_RUNTIME_DIR", "IPYTHONDIR", "MPLCONFIGDIR"):
        directory = tmp_path / "home" / variable.lower()
        directory.mkdir(parents=True)
        monkeypatch.setenv(variable, str(directory))
    # The kernel imports the checkout, not some other installed copy.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    return tmp_path


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_runs(name, notebook_env):
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
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
    import keras

    if name == "03_pretrain_tpu.ipynb":
        results = json.loads((notebook_env / EXPECTED[name][1]).read_text())
        assert results["steps"] == 4 and results["backend"] == keras.backend.backend()
    if name == "04_inspect.ipynb":
        # The few-shot table has a row per shot count.
        assert re.search(r"^\s+25\s+\d\.\d{3} ± \d\.\d{3}\s+\d\.\d{3} ± ", text, re.MULTILINE), text
    if name == "05_export.ipynb":
        report = json.loads((notebook_env / "exported/export_report.json").read_text())
        assert [e["passed"] for e in report["files"]] == [True] * 4
