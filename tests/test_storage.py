"""Local paths and URLs behind one API (keras_mixer.storage), against a real
GCS-protocol server on localhost (conftest's gcs_emulator), and train.py
with a gs:// work directory, as a user runs it."""

import json
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from base import compiled_tiny_model
from conftest import INSTALLED
from conftest import ROOT
from conftest import gcs_files
from conftest import in_the_colab_lane
from conftest import once
from conftest import subprocess_env
from keras_mixer import checkpoint
from keras_mixer import storage

pytestmark = once("storage is plain file and network code; the training runs are JAX subprocesses")

PYTHON_FLAGS = ["-P"] if INSTALLED else []
ARGS = ["--config", "digits", "--verbose", "2", "--set", "epochs=4", "batch_size=128", "checkpoint_every=4",
        "model.num_blocks=1", "model.hidden_dim=16", "model.tokens_mlp_dim=8", "model.channels_mlp_dim=16"]
TOTAL = 44
RUN_FILES = ["best.keras", "config.json", "distribution.json", "log.csv", "model.keras", "plan.json",
             "results.json"]


def test_paths_are_pathlib_for_files_and_upath_for_urls(tmp_path):
    assert storage.path(tmp_path / "a") == tmp_path / "a" and not storage.is_remote(tmp_path)
    assert storage.path("file:///tmp/x") == pathlib.Path("/tmp/x")
    assert storage.scheme("gs://bucket/run") == "gs" and storage.is_remote("gs://bucket/run")
    with pytest.raises(ValueError, match=r"no storage backend is known for ftp://"):
        storage.path("ftp://host/run")


def test_a_scheme_without_its_backend_names_the_extra(monkeypatch):
    import builtins

    real = builtins.__import__

    def without_gcsfs(name, *args, **kwargs):
        if name == "gcsfs":
            raise ImportError("No module named 'gcsfs'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_gcsfs)
    with pytest.raises(ImportError, match=r'gs://b/run is a gs:// URL, .* pip install "keras-mixer\[gcs\]"'):
        storage.path("gs://b/run")


def test_writing_is_all_or_nothing_locally_and_on_the_store(tmp_path, gcs_bucket):
    for root in (tmp_path, storage.path(gcs_bucket)):
        target = root / "dir" / "value.json"
        storage.write_text(target, "first")
        with pytest.raises(RuntimeError):
            with storage.writing(target) as tmp:
                tmp.write_text("half")
                raise RuntimeError("crash mid-write")
        assert target.read_text() == "first"
        with storage.reading(target) as local:
            assert pathlib.Path(local).read_text() == "first"
        moved = storage.move(target, root / "dir" / "value.json.damaged")
        assert moved.read_text() == "first" and not target.exists()
    assert gcs_files(gcs_bucket) == ["dir/value.json.damaged"]  # no temporary object left
    assert [p.name for p in (tmp_path / "dir").iterdir()] == ["value.json.damaged"]


def test_a_missing_bucket_is_one_line_before_anything_is_written(gcs_bucket):
    with pytest.raises(FileNotFoundError, match=r"the bucket gs://no-such-bucket-\w+ does not exist"):
        storage.check_directory("gs://no-such-bucket-x1/runs/a")
    assert storage.check_directory(gcs_bucket + "/runs/a") == storage.path(gcs_bucket + "/runs/a")


def test_an_unreachable_store_is_one_line_within_seconds(monkeypatch):
    from keras_mixer.launch import free_port

    port = free_port()  # a port nothing listens on
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    begin = time.monotonic()
    with pytest.raises(ValueError, match=rf"--workdir gs://b/run: cannot reach 127.0.0.1:{port} \(.*\)\. "
                                         r"Check the network"):
        storage.check_directory("gs://b/run")
    assert time.monotonic() - begin < 10


def test_states_and_models_round_trip_through_the_store(gcs_bucket):
    model = compiled_tiny_model()
    directory = storage.path(gcs_bucket) / "run" / "checkpoints"
    for step in (4, 8, 12):
        checkpoint.save_state(directory, model, step, keep=2)
    assert [p.name for p in checkpoint.list_states(directory)] == ["state-000000012.npz", "state-000000008.npz"]
    # The newest damaged: moved aside, the previous one restored.
    newest = checkpoint.list_states(directory)[0]
    newest.write_bytes(newest.read_bytes()[:100])
    assert checkpoint.restore_latest(directory, model)["step"] == 8
    assert gcs_files(gcs_bucket) == ["run/checkpoints/state-000000008.npz",
                                     "run/checkpoints/state-000000012.npz.damaged"]
    checkpoint.save_model(model, storage.path(gcs_bucket) / "m.keras")
    loaded = checkpoint.load_model(gcs_bucket + "/m.keras")
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(FileNotFoundError, match=r"No model at gs://.*/nothing.keras"):
        checkpoint.load_model(gcs_bucket + "/nothing.keras")


def test_an_image_folder_in_a_bucket_reads_as_a_local_one(gcs_bucket, tmp_path):
    import numpy as np

    from conftest import write_image_folder
    from keras_mixer import data
    from keras_mixer import sources

    write_image_folder(tmp_path / "images")
    storage.upload_folder(tmp_path / "images", gcs_bucket + "/images")
    local = sources.image_folder_source(tmp_path / "images")
    remote = sources.image_folder_source(gcs_bucket + "/images")
    assert (remote.num_examples, remote.num_classes) == (local.num_examples, local.num_classes) == (6, 2)
    assert remote.skipped == (f"{gcs_bucket}/images/cat/broken.jpg (not a JPEG or PNG)",)
    got = [data.eval_pipeline(source, 6, (16, 16, 3)) for source in (local, remote)]
    (x_local, y_local), = got[0]
    (x_remote, y_remote), = got[1]
    np.testing.assert_array_equal(x_remote.numpy(), x_local.numpy())
    np.testing.assert_array_equal(y_remote.numpy(), y_local.numpy())


def start(workdir, cwd, *extra):
    return subprocess.Popen(
        [sys.executable, *PYTHON_FLAGS, str(ROOT / "train.py"), "--workdir", workdir, *ARGS, *extra],
        cwd=cwd, env=subprocess_env("jax"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def newest_step(url):
    steps = [int(name.split("-")[1].split(".")[0]) for name in gcs_files(url)
             if name.startswith("checkpoints/state-") and name.endswith(".npz")]
    return max(steps, default=0)


@in_the_colab_lane("a Colab user keeps runs in a bucket; the lane's gcsfs is unpinned, as "
                   "here, and test_launch's runs train into the bucket on this pass's versions")
def test_train_py_with_a_gs_work_directory(gcs_bucket, tmp_path):
    """Every file in the bucket, nothing on the local disk; kill -9 mid-run and
    the same command resumes from the bucket's state to the weights of an
    uninterrupted (local) run; evaluation and export from and to gs://."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    reference = start(str(tmp_path / "reference"), cwd)
    output = reference.communicate(timeout=600)[0]
    assert reference.returncode == 0, output[-3000:]

    url = gcs_bucket + "/runs/digits"
    run = start(url, cwd)
    while run.poll() is None and newest_step(url) < 16:
        time.sleep(0.05)
    assert run.poll() is None, "the run ended before it could be killed:\n" + run.stdout.read()
    run.send_signal(signal.SIGKILL)
    run.communicate(timeout=120)
    killed = newest_step(url)
    assert 16 <= killed < TOTAL

    final = start(url, cwd)
    output = final.communicate(timeout=600)[0]
    assert final.returncode == 0, output[-3000:]
    assert f"Resuming from {url}/checkpoints/state-{killed:09d}.npz at step {killed} of {TOTAL}" in output
    assert f"saved {url}/model.keras and {url}/log.csv" in output
    files = gcs_files(url)
    assert [f for f in files if "/" not in f] == RUN_FILES, files
    assert any(f.startswith("tensorboard/train/events.out.tfevents") for f in files), files
    assert list(cwd.iterdir()) == []  # nothing written locally: no ./gs:/ folder
    results = json.loads(storage.path(url + "/results.json").read_text())
    assert results["steps"] == TOTAL and results["resumed_from"] == killed
    rows = storage.path(url + "/log.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:]] == list(range(4))  # no row lost or repeated
    for a, b in zip(checkpoint.load_model(tmp_path / "reference" / "model.keras").get_weights(),
                    checkpoint.load_model(url + "/model.keras").get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-5)

    evaluated = subprocess.run(
        [sys.executable, *PYTHON_FLAGS, str(ROOT / "train.py"), "--eval_only", "--checkpoint",
         url + "/model.keras", "--verbose", "0"], cwd=cwd, env=subprocess_env("jax"),
        capture_output=True, text=True, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert f"top-1 {results['test_accuracy']:.4f}" in evaluated.stdout
    assert list(cwd.iterdir()) == []
    _export_and_predict_in_the_bucket(url, cwd, tmp_path)


def _export_and_predict_in_the_bucket(url, cwd, tmp_path):
    """python -m keras_mixer.export from and to gs://, then keras_mixer.predict
    from the bucket's .keras and .tflite files."""
    import tensorflow as tf

    from keras_mixer import sources

    exported = subprocess.run(
        [sys.executable, *PYTHON_FLAGS, "-m", "keras_mixer.export", "--model", url + "/model.keras",
         "--out_dir", url + "/export", "--formats", "tflite"], cwd=cwd, env=subprocess_env("jax"),
        capture_output=True, text=True, timeout=300)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert f"wrote {url}/export/export_report.json" in exported.stdout
    assert gcs_files(url + "/export") == ["export_report.json", "model_float32.tflite"]
    report = json.loads(storage.path(url + "/export/export_report.json").read_text())
    assert [(e["file"], e["passed"]) for e in report["files"]] == [("model_float32.tflite", True)]
    (x_test, _), = [sources.load_digits()[1]]
    png = tmp_path / "digit.png"
    tf.io.write_file(str(png), tf.io.encode_png(tf.cast(tf.round(x_test[0]), tf.uint8)))
    printed = []
    for model in (url + "/model.keras", url + "/export/model_float32.tflite"):
        done = subprocess.run([sys.executable, *PYTHON_FLAGS, "-m", "keras_mixer.predict", "--model", model,
                               "--top", "1", str(png)], cwd=cwd, env=subprocess_env("jax"),
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        printed.append(done.stdout.strip().split(": ")[1].split()[0])
    assert printed[0] == printed[1]  # the same class from the .keras and the .tflite file
    assert list(cwd.iterdir()) == []


def test_train_py_says_what_is_wrong_with_a_gs_work_directory(gcs_bucket, tmp_path):
    for workdir, message in (
        ("gs://no-such-bucket-y2/run", "error: --workdir gs://no-such-bucket-y2/run: the bucket "
                                       "gs://no-such-bucket-y2 does not exist"),
        ("ftp://host/run", "error: ftp://host/run: no storage backend is known for ftp://"),
    ):
        done = subprocess.run([sys.executable, *PYTHON_FLAGS, str(ROOT / "train.py"), "--workdir", workdir,
                               *ARGS], cwd=tmp_path, env=subprocess_env("jax"), capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 1, done.stderr[-2000:]
        assert done.stderr.splitlines()[-2].startswith(message), done.stderr[-2000:]
        assert "saved" not in done.stdout and list(tmp_path.iterdir()) == []
