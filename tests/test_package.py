import ast
import sys

import keras_mixer
from conftest import ROOT

STDLIB = set(sys.stdlib_module_names)


def imported_roots(path):
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module)
    return names


def test_layers_and_model_import_only_keras_numpy_and_stdlib():
    """The dependency direction of STYLE.md: the model never imports data code."""
    allowed = {"keras", "numpy", "keras_mixer.layers"}
    for module in ("layers.py", "model.py", "weights.py"):
        for name in imported_roots(ROOT / "keras_mixer" / module):
            root = name.split(".")[0]
            if module == "weights.py" and name in {"safetensors.numpy", "torch", "keras_mixer.model"}:
                continue  # Optional file readers, imported where used; weights builds models.
            if module == "model.py" and name == "keras_mixer":
                continue  # `from keras_mixer import weights` inside from_checkpoint only.
            assert root in STDLIB or root in {"keras", "numpy"} or name in allowed, (module, name)


def test_optional_readers_are_imported_lazily():
    tree = ast.parse((ROOT / "keras_mixer" / "weights.py").read_text())
    top_level = {
        alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names
    } | {node.module for node in tree.body if isinstance(node, ast.ImportFrom)}
    assert not top_level & {"torch", "safetensors.numpy"}


def test_data_never_imports_the_model():
    for name in imported_roots(ROOT / "keras_mixer" / "data.py"):
        assert not name.startswith("keras_mixer"), name


def test_public_api():
    for name in ("MLPMixer", "MixerBlock", "MLPBlock", "StochasticDepth",
                 "VARIANTS", "variant_config", "load_official_params", "load_timm",
                 "load_official", "save_official", "reset_head", "adapt_resolution"):
        assert hasattr(keras_mixer, name), name


def test_readme_table_lists_exactly_the_released_checkpoints():
    # The README's table is how users pick a checkpoint; a name added to
    # RELEASED without a row (or a row for a name that does not load) is a bug.
    from keras_mixer import weights

    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Released checkpoints", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    names = [row.split("`")[1] for row in rows]
    assert names == list(weights.RELEASED)
    for name, row in zip(names, rows):
        assert f'from_checkpoint("{name}"' in row


def test_the_installed_package_is_the_one_tested():
    """In the Colab lane (KERAS_MIXER_TEST_INSTALLED=1) the wheel, not the
    checkout, is imported, and it holds what a user needs."""
    import importlib.metadata
    import pathlib
    import re

    from conftest import INSTALLED
    from keras_mixer import configs

    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)[1]
    assert importlib.metadata.version("keras-mixer") == version
    # Every config ships, and nothing under tests/ or notebooks/ does.
    shipped = {p.stem for p in (ROOT / "keras_mixer" / "configs").glob("*.py")} - {"__init__"}
    assert set(configs.available()) == shipped
    package = pathlib.Path(keras_mixer.__file__).resolve().parent
    if INSTALLED:
        assert package != ROOT / "keras_mixer", "the checkout was imported, not the installed wheel"
        assert "site-packages" in package.parts, package
        files = importlib.metadata.files("keras-mixer")
        assert not [f for f in files if str(f).startswith(("tests/", "notebooks/"))]
    else:
        assert package == ROOT / "keras_mixer"
