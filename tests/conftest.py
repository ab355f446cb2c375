import json
import os
import pathlib

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"


def pytest_report_header(config):
    import keras

    return f"keras {keras.__version__}, backend {keras.backend.backend()}"


@pytest.fixture(autouse=True)
def _seed():
    import keras

    keras.utils.set_random_seed(0)


def load_fixture(name):
    """Returns (config dict, {key: array}) of a reference fixture."""
    path = FIXTURES / name
    if not path.exists():
        pytest.fail(f"missing reference fixture {path}; ../shared must sit beside the repo")
    data = np.load(path, allow_pickle=False)
    arrays = {k: data[k] for k in data.files if k != "config"}
    return json.loads(str(data["config"])), arrays


@pytest.fixture
def official_fixture():
    return load_fixture("official_flax_mixer_tiny.npz")


def subprocess_env(backend):
    """Environment for running Python under another Keras backend."""
    env = dict(os.environ)
    env["KERAS_BACKEND"] = backend
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env
