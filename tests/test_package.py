"""The package's structure, read from its source: one concept per module, imports that
flow config -> data and model -> training -> export with no cycle, and the public API."""

import ast
import sys

import pytest

import keras_mixer
from conftest import ROOT

STDLIB = set(sys.stdlib_module_names)
PACKAGE = ROOT / "keras_mixer"
# (`__main__` is the command's two lines, tested in test_commands.)
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__"))
# The test file of each module (the notebooks', the package's and the
# distributed runner's live beside them).
TESTS = {p.stem[len("test_"):] for p in (ROOT / "tests").glob("test_*.py")}


def imports(path, top_level_only=False):
    """The modules `path` imports, as dotted names (`from keras_mixer import data`
    gives `keras_mixer.data`); with `top_level_only`, only those imported when
    the module itself is imported."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module)
            if node.module == "keras_mixer":
                names.update(f"keras_mixer.{alias.name}" for alias in node.names)
    return names


def package_imports(module, top_level_only=False):
    """The keras_mixer modules `module` imports (`keras_mixer.x` -> "x")."""
    found = set()
    for name in imports(PACKAGE / f"{module}.py", top_level_only):
        parts = name.split(".")
        if parts[0] == "keras_mixer" and len(parts) > 1:
            found.add(parts[1])
    return found - {module}


def test_no_module_level_import_cycle():
    graph = {m: package_imports(m, top_level_only=True) & set(MODULES) for m in MODULES}
    done, path = set(), []

    def visit(module):
        if module in path:
            pytest.fail("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        path.append(module)
        for other in sorted(graph[module]):
            visit(other)
        path.pop()
        done.add(module)

    for module in MODULES:
        visit(module)


def test_layers_and_model_import_only_keras_numpy_and_stdlib():
    """The model may reach `weights` lazily, inside MLPMixer.from_checkpoint only,
    `lora` inside the three LoRA methods, and `distribute` in `compile` (the
    jit_compile choice); the layers reach `torch_eager` on PyTorch only; the model's
    train step mixes batches with `mixing`, which is `keras.ops` only."""
    for module, allowed in (("layers", set()), ("model", {"layers", "mixing"}), ("torch_eager", set()),
                            ("mixing", set())):
        for name in imports(PACKAGE / f"{module}.py", top_level_only=True):
            root = name.split(".")[0]
            assert root in STDLIB or root in {"keras", "numpy"} or name in {
                f"keras_mixer.{a}" for a in allowed} or name == "keras_mixer.layers", (module, name)
    lazy = package_imports("model") - package_imports("model", top_level_only=True)
    assert lazy == {"weights", "lora", "distribute"}  # distribute: compile's XLA choice, predict's path
    # PyTorch's kernels, inside the PyTorch branches only; PyTorch itself is
    # imported inside torch_eager's functions.
    assert package_imports("layers") == {"torch_eager"}
    assert "torch" not in imports(PACKAGE / "torch_eager.py", top_level_only=True)
    tree = ast.parse((PACKAGE / "model.py").read_text())
    functions = [node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
                 and any(isinstance(n, ast.ImportFrom) for n in ast.walk(node))]
    assert functions == ["compile", "predict", "evaluate", "from_checkpoint", "from_timm", "enable_lora",
                         "save_lora_weights", "load_lora_weights"]


@pytest.mark.parametrize("module, forbidden", [
    # Data code never imports model or training code.
    ("sources", {"model", "layers", "weights", "training", "optim", "callbacks", "evaluation", "export"}),
    ("data", {"model", "layers", "weights", "training", "optim", "callbacks", "evaluation", "export"}),
    ("augment", {"model", "layers", "weights", "training", "optim", "callbacks", "evaluation", "export"}),
    # Weights never import training; export never imports data.
    ("weights", {"training", "optim", "callbacks", "data", "sources", "evaluation"}),
    ("released", {"training", "model", "weights", "data"}),
    # The on-disk format and where files live stand below everything else.
    ("npz", set(MODULES) - {"npz", "storage"}),
    ("storage", set(MODULES) - {"storage"}),
    ("export", {"data", "sources", "training", "evaluation"}),
    ("checkpoint", {"training", "data", "model"}),
])
def test_dependency_direction(module, forbidden):
    assert not package_imports(module) & forbidden, (module, package_imports(module) & forbidden)


def test_the_config_and_the_configs_are_standard_library_only():
    """Configs are plain data and never import the trainer (or anything else);
    the launcher and cli.py start before any backend."""
    paths = [PACKAGE / "config.py", *sorted((PACKAGE / "configs").glob("*.py")),
             PACKAGE / "launch.py", PACKAGE / "cli.py"]  # and the launcher, the error printer
    for path in paths:
        for name in imports(path):
            assert name.split(".")[0] in STDLIB, (path.name, name)


def test_the_optional_readers_are_imported_lazily():
    top = imports(PACKAGE / "weights.py", top_level_only=True)
    assert not top & {"torch", "safetensors.numpy"}


def test_backend_branches_live_in_distribute():
    """Per-backend branches: distribute.py; export.py's choice of a TensorFlow
    process; layers.py's LayerNorm kernel, which is faster on JAX written out, and
    its calls into `torch_eager` (PyTorch's kernels without Keras' per-call Python)."""
    for module in MODULES:
        text = (PACKAGE / f"{module}.py").read_text()
        if "backend.backend() ==" in text or "backend.backend() !=" in text:
            assert module in {"distribute", "export", "layers"}, module
        for private in ("_distribute_strategy", "._primary", "jax_state_sync", "multihost_utils"):
            if private in text:
                assert module == "distribute", (module, private)


def test_every_module_has_its_test_file():
    assert set(MODULES) - TESTS == set()


def test_no_function_is_longer_than_60_lines():
    """Past ~60 lines a function does several jobs. The exception is
    MLPMixer.__init__: a subclassed functional model builds its whole graph
    in its constructor (KerasHub's pattern)."""
    long = []
    for module in MODULES:
        tree = ast.parse((PACKAGE / f"{module}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef):
                body = node.body[1:] if ast.get_docstring(node) else node.body
                length = body[-1].end_lineno - body[0].lineno + 1
                if length > 60 and (module, node.name) != ("model", "__init__"):
                    long.append(f"{module}.{node.name}: {length} lines")
    assert not long, long


def test_public_api():
    for name in ("MLPMixer", "MixerBlock", "MLPBlock", "StochasticDepth",
                 "VARIANTS", "variant_config", "load_official", "load_timm",
                 "save_official", "reset_head", "adapt_resolution"):
        assert hasattr(keras_mixer, name), name


def test_readme_table_lists_exactly_the_released_checkpoints():
    # The README's table is how users pick a checkpoint; a name added to
    # released.NAMES without a row (or a row for a name that does not load) is a bug.
    from keras_mixer import released

    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Released checkpoints", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    names = [row.split("`")[1] for row in rows]
    assert names == list(released.NAMES)
    for name, row in zip(names, rows):
        assert f'from_checkpoint("{name}"' in row


def test_the_installed_package_is_the_one_tested():
    """In the Colab lane (KERAS_MIXER_TEST_INSTALLED=1) the wheel, not the
    checkout, is imported, and it holds what a user needs."""
    import importlib.metadata
    import pathlib
    import re

    from conftest import INSTALLED
    from keras_mixer import config as config_lib

    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)[1]
    assert importlib.metadata.version("keras-mixer") == version
    # Every config ships, and nothing under tests/ or notebooks/ does.
    shipped = {p.stem for p in (ROOT / "keras_mixer" / "configs").glob("*.py")} - {"__init__"}
    assert set(config_lib.available()) == shipped
    package = pathlib.Path(keras_mixer.__file__).resolve().parent
    if INSTALLED:
        assert package != ROOT / "keras_mixer", "the checkout was imported, not the installed wheel"
        assert "site-packages" in package.parts, package
        files = importlib.metadata.files("keras-mixer")
        assert not [f for f in files if str(f).startswith(("tests/", "notebooks/"))]
    else:
        assert package == ROOT / "keras_mixer"


def test_the_model_needs_no_extra():
    """The core install (keras, numpy, h5py) is enough for the model and the
    official weights: with the train, export and viz packages unimportable,
    a fresh process on JAX or PyTorch builds an MLPMixer, loads the official
    fixture and matches its logits."""
    import subprocess

    from conftest import FIXTURES, subprocess_env

    backend = "torch" if _importable("torch") else "jax"
    code = f"""
import sys
BLOCKED = {{"tensorflow", "tensorflow_datasets", "sklearn", "keras_cv", "tensorboard", "matplotlib",
            "tf2onnx", "onnxruntime", "ai_edge_litert", "safetensors"}}
for name in BLOCKED:
    sys.modules[name] = None  # As if not installed: import fails, find_spec gives None.
import json, numpy as np
from keras_mixer import MLPMixer, load_official
data = np.load({str(FIXTURES / "official_flax_mixer_tiny.npz")!r})
config = json.loads(str(data["config"]))
model = MLPMixer(image_shape=(*config["image"], 3), patch_size=config["patch"],
                 num_blocks=config["num_blocks"], hidden_dim=config["hidden_dim"],
                 tokens_mlp_dim=config["tokens_mlp_dim"], channels_mlp_dim=config["channels_mlp_dim"],
                 num_classes=config["num_classes"], include_preprocessing=False)
load_official(model, {{k: data[k] for k in data.files if k.startswith("params/")}})
import keras
print(float(np.abs(keras.ops.convert_to_numpy(model(data["inputs"])) - data["logits"]).max()))
print(sorted(m for m, module in sys.modules.items() if m.split(".")[0] in BLOCKED and module is not None))
"""
    done = subprocess.run([sys.executable, "-c", code], env=subprocess_env(backend),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    difference, imported = done.stdout.strip().splitlines()[-2:]
    assert float(difference) <= 1e-5 and imported == "[]"


def _importable(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_the_recovery_table_names_tests_that_exist():
    """docs/recovery.md says which test holds each promise; a renamed or
    removed test must not leave the table pointing at nothing."""
    import re

    text = (ROOT / "docs" / "recovery.md").read_text()
    named = re.findall(r"`(test_\w+\.py)::(test_\w+)`", text)
    assert len(named) >= 6
    for filename, test in named:
        assert f"def {test}(" in (ROOT / "tests" / filename).read_text(), (filename, test)
