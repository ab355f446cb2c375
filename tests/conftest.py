import json
import os
import pathlib

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"
# The Colab lane (tests/colab_lane.sh) tests the installed wheel: then
# neither this process nor its subprocesses may import the checkout.
INSTALLED = os.environ.get("KERAS_MIXER_TEST_INSTALLED") == "1"


def checkout_pythonpath(env):
    """`env`'s PYTHONPATH with the checkout first, unless the installed package is tested."""
    if INSTALLED:
        return env.get("PYTHONPATH", "")
    return os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))


# Set by tests/run_all_backends.sh for its JAX pass when the Colab lane runs
# in the same CI run (see `in_the_colab_lane`).
COLAB_LANE_RUNS = os.environ.get("KERAS_MIXER_COLAB_LANE_RUNS") == "1"


def in_the_colab_lane(reason):
    """Marks a test that the JAX pass leaves to the Colab lane when the lane
    runs in the same CI run: a test of what a Colab user runs (the
    notebooks, the installed command, train.py with its run in a bucket,
    its errors, its preemption), which the lane runs on JAX too, on
    Colab's versions and from the built wheel, the closer copy of that
    user's path. Run alone, or with SKIP_COLAB=1, the JAX pass runs it."""
    import keras

    return pytest.mark.skipif(
        COLAB_LANE_RUNS and not INSTALLED and keras.backend.backend() == "jax",
        reason=f"runs in the Colab lane of this CI run: {reason}")


def once(reason):
    """Marks a test to run in the JAX pass of `tests/run_all_backends.sh`
    only (and in the Colab lane, which is JAX): its work does not depend on
    this process's Keras backend, or the other backends are covered by
    faster tests, which `reason` names. The suite runs once per backend on
    2 CPU cores, so a test run three times for one answer costs CI three."""
    import keras

    return pytest.mark.skipif(keras.backend.backend() != "jax", reason=f"runs in the JAX pass: {reason}")


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


@pytest.fixture
def official_npz(official_fixture, tmp_path):
    """The official fixture's parameters as a released-style file (no `params/` prefix)."""
    config, arrays = official_fixture
    params = {k[len("params/"):]: v for k, v in arrays.items() if k.startswith("params/")}
    path = tmp_path / "Mixer-tiny.npz"
    np.savez(path, **params)
    return path, params, config, arrays


TINY_RELEASE = "tests/Mixer-tiny"


@pytest.fixture
def tiny_release(official_npz, monkeypatch):
    """`official_npz` registered as the checkpoint name `TINY_RELEASE`, with the
    shapes it must have, for the rest of the test. Returns (name, path, arrays)."""
    from keras_mixer import released

    path, _, config, arrays = official_npz
    release = released.Release(
        patch=config["patch"][0], hidden_dim=config["hidden_dim"], num_blocks=config["num_blocks"],
        tokens_mlp_dim=config["tokens_mlp_dim"], channels_mlp_dim=config["channels_mlp_dim"],
        num_tokens=(config["image"][0] // config["patch"][0]) * (config["image"][1] // config["patch"][1]),
        num_classes=config["num_classes"])
    monkeypatch.setitem(released.RELEASES, TINY_RELEASE, release)
    return TINY_RELEASE, path, arrays


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A small digits Mixer trained for 10 epochs on this backend in float32: decisive enough
    that int8 rounding rarely flips its top-1 class. Shared by the export and
    predict tests."""
    from keras_mixer import config as config_lib
    from keras_mixer import training

    workdir = tmp_path_factory.mktemp("digits")
    config = config_lib.load("digits")
    # float32 whatever the CPU: the export and predict tests check files
    # against this model's logits to 1e-4, which a model computing in
    # bfloat16 (mixed_precision="auto" on PyTorch with AVX512-BF16 or AMX)
    # does not meet by design; test_export.py checks that case on its own.
    config.update(epochs=10, mixed_precision=False,
                  model=dict(config["model"], num_blocks=2, hidden_dim=32,
                             tokens_mlp_dim=32, channels_mlp_dim=64))
    training.train(config, workdir, verbose=0, distribution="none")
    return workdir / "model.keras"


@pytest.fixture(scope="session")
def exported(trained, tmp_path_factory):
    """`trained` in every format and quantization, int8 calibrated on digits test images."""
    from keras_mixer import config as config_lib
    from keras_mixer import data
    from keras_mixer import export

    out = tmp_path_factory.mktemp("export")
    images = data.representative_images(config_lib.resolve(config_lib.load("digits")))
    report = export.export(
        trained, out, export.FORMATS, export.QUANTIZATIONS, representative_data=images,
        class_names=[f"digit {i}" for i in range(10)],
    )
    return out, report


def subprocess_env(backend):
    """Environment for running Python under another Keras backend."""
    env = dict(os.environ)
    env["KERAS_BACKEND"] = backend
    env["PYTHONPATH"] = checkout_pythonpath(env)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def write_image_folder(root, classes=("cat", "dog"), per_class=3, corrupt=True):
    """Writes root/<class>/img<i>.{png,jpg} of mixed sizes; returns the paths.

    Each class's images are filled with one grey level (class index * 100
    + 20), so labels can be read back from pixels. With `corrupt`, adds a
    `.jpg` that holds text, not an image.
    """
    import tensorflow as tf

    root = pathlib.Path(root)
    paths = []
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            height, width = 20 + 7 * i, 28 + 5 * i
            image = np.full((height, width, 3), 20 + 100 * label, np.uint8)
            if i % 2:
                encoded, suffix = tf.io.encode_jpeg(image, quality=100), ".jpg"
            else:
                encoded, suffix = tf.io.encode_png(image), ".png"
            path = root / name / f"img{i}{suffix}"
            path.write_bytes(encoded.numpy())
            paths.append(path)
    if corrupt:
        (root / classes[0] / "broken.jpg").write_text("not an image")
    return paths


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    """A real GCS-protocol server on a free localhost port: the registry's
    gcp-storage-emulator in its own process, in memory, for the session.
    Yields its address for STORAGE_EMULATOR_HOST (what gcsfs and Google's
    clients read); stopped at the end."""
    import socket
    import subprocess
    import sys
    import time

    from keras_mixer.launch import free_port

    pytest.importorskip("gcp_storage_emulator", reason="the test extra installs gcp-storage-emulator")
    port = free_port()
    log = tmp_path_factory.mktemp("gcs") / "emulator.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1",
             "--port", str(port), "--in-memory"], stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"the GCS emulator did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture
def gcs_bucket(gcs_emulator, monkeypatch, request):
    """A new, empty bucket on the emulator, as "gs://<name>"; this process and
    the subprocesses it starts (subprocess_env copies os.environ) reach it."""
    import re

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator)
    monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    import fsspec

    fs = fsspec.filesystem("gs", skip_instance_cache=True)
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:50]
    fs.mkdir(name)
    yield f"gs://{name}"
    fsspec.filesystem("gs").invalidate_cache()


def gcs_files(url):
    """Every object under `url` (gs://bucket/prefix), relative names, fresh from the server."""
    import fsspec

    fs = fsspec.filesystem("gs", skip_instance_cache=True)
    root = url[len("gs://"):].rstrip("/")
    return sorted(p[len(root) + 1:] for p in fs.find(root))
