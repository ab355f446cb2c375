"""Several real JAX processes on localhost (keras_mixer.launch): one model, the
same numbers as one process, disjoint data, one writer, a lost process.

Each run is `python -m keras_mixer.launch --processes P --devices-per-process D
-- train.py ...`, as a user would try a multi-host config: real processes,
JAX's coordination service on a localhost port, gloo collectives between
them. One step per Keras epoch, so log.csv holds every step's loss.
"""

import csv
import io
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

from base import to_numpy
from conftest import ROOT
from conftest import once
from conftest import subprocess_env
from conftest import INSTALLED
from conftest import gcs_files
from keras_mixer import storage

pytestmark = once("the processes run JAX whatever this process's backend")

STEPS = 12
ARGS = ["--verbose", "2", "--set", f"train_steps={STEPS}", "steps_per_epoch=1", "batch_size=128",
        "model.num_blocks=1", "model.hidden_dim=16", "model.tokens_mlp_dim=8", "model.channels_mlp_dim=16"]
TRAIN = [str(ROOT / "train.py")] if not INSTALLED else ["-P", str(ROOT / "train.py")]


def launch_command(workdir, processes, devices, *extra):
    return [sys.executable, "-m", "keras_mixer.launch", "--processes", str(processes),
            "--devices-per-process", str(devices), "--", *TRAIN, "--workdir", str(workdir), *ARGS, *extra]


def env():
    environment = subprocess_env("jax")
    environment.pop("XLA_FLAGS", None)
    return environment


def launch(workdir, processes, devices, *extra):
    cwd = workdir.parent if isinstance(workdir, pathlib.Path) else ROOT
    done = subprocess.run(launch_command(workdir, processes, devices, *extra), env=env(), cwd=cwd,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    return done.stdout


def losses(workdir):
    rows = list(csv.DictReader(io.StringIO((storage.path(workdir) / "log.csv").read_text())))
    assert [int(r["last_step"]) for r in rows] == list(range(1, STEPS + 1))
    return np.array([float(r["loss"]) for r in rows]), np.array([float(r["val_accuracy"]) for r in rows])


def weights(path):
    from keras_mixer import checkpoint

    return [to_numpy(w) for w in checkpoint.load_model(path).weights]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, gcs_emulator):
    """workdir of 1 process x 8 devices (local), and of 2 processes x 4
    devices (in a bucket of the GCS emulator, as a pod keeps its runs), data parallel."""
    import fsspec

    root = tmp_path_factory.mktemp("multiprocess")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator)
        patch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        fsspec.filesystem("gs", skip_instance_cache=True).mkdir("multiprocess")
        one, two = root / "one", storage.path("gs://multiprocess/two")
        out_one = launch(one, 1, 8)
        out_two = launch(two, 2, 4)
        yield one, two, out_one, out_two


def test_each_process_gets_a_cluster_environment():
    from keras_mixer import launch as launch_lib

    env = launch_lib.process_env(1, 2, "localhost:1234", 4, environ={"XLA_FLAGS": "--xla_dump_to=x"})
    assert (env["KERAS_DISTRIBUTION_JOB_ADDRESSES"], env["KERAS_DISTRIBUTION_NUM_PROCESSES"],
            env["KERAS_DISTRIBUTION_PROCESS_ID"], env["KERAS_BACKEND"]) == ("localhost:1234", "2", "1", "jax")
    assert env["XLA_FLAGS"] == "--xla_dump_to=x --xla_force_host_platform_device_count=4"
    assert launch_lib.command_line(["train.py", "--x"]) == [sys.executable, "train.py", "--x"]
    assert launch_lib.command_line(["-m", "keras_mixer.evaluation"])[0] == sys.executable
    assert launch_lib.command_line(["keras-mixer", "train"]) == ["keras-mixer", "train"]


def test_the_launcher_names_the_process_that_failed(tmp_path):
    script = tmp_path / "work.py"
    script.write_text("import os, sys, time\n"
                      "if os.environ['KERAS_DISTRIBUTION_PROCESS_ID'] == '1':\n"
                      "    print('bad input'); sys.exit(3)\n"
                      "time.sleep(60)\n")
    begin = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "keras_mixer.launch", "--processes", "3", "--grace", "1",
                           "--", str(script)], env=env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 3 and time.monotonic() - begin < 30
    lines = done.stdout.splitlines()
    assert "[process 1] bad input" in lines
    assert lines[-2].startswith("keras_mixer.launch: process 1 of 3 failed (exit status 3); the others "
                                "stopped (process 0: killed by SIGKILL; process 2: killed by SIGKILL)")
    done = subprocess.run([sys.executable, "-m", "keras_mixer.launch", "--processes", "2", "--", str(tmp_path)],
                          env=env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.startswith(f"error: cannot start {tmp_path}: Permission denied")


def test_two_processes_train_the_model_of_one(runs):
    one, two, _, out_two = runs
    loss_one, val_one = losses(one)
    loss_two, val_two = losses(two)
    np.testing.assert_allclose(loss_two, loss_one, atol=1e-5)
    # Every test image counted exactly once on each layout.
    np.testing.assert_allclose(val_two, val_one, atol=1e-6)
    for a, b in zip(weights(two / "model.keras"), weights(one / "model.keras")):
        np.testing.assert_allclose(a, b, atol=1e-5)
    import json

    placement = json.loads((two / "distribution.json").read_text())
    assert f"[process 0] saved {two}/model.keras and {two}/log.csv" in out_two
    assert (placement["num_processes"], placement["num_devices"]) == (2, 8), placement
    assert placement["description"] == "DataParallel over 8 CPU devices on 2 hosts"
    # Process 0 reports; process 1 says it is done and who writes.
    assert "[process 0] test accuracy" in out_two and "[process 1] test accuracy" not in out_two
    assert "[process 1] process 1 of 2: done after 12 steps (process 0 writes" in out_two
    assert out_two.count("saved ") == 1


def test_only_process_0_writes(runs):
    _, two, _, _ = runs
    # One writer, into the bucket: no temporary object of a second writer
    # left, every file once, the newest two states.
    names = sorted({name.split("/")[0] for name in gcs_files(str(two))})
    assert names == ["best.keras", "checkpoints", "config.json", "distribution.json", "log.csv",
                     "model.keras", "plan.json", "results.json", "tensorboard"], names
    assert [n for n in gcs_files(str(two)) if n.startswith("checkpoints/")] == [
        f"checkpoints/state-{STEPS - 1:09d}.npz", f"checkpoints/state-{STEPS:09d}.npz"]


def test_model_parallel_across_both_processes(runs, tmp_path):
    one, _, _, _ = runs
    out = launch(tmp_path / "model", 2, 4, "--distribution", "model", "--model_parallel_size", "8")
    assert "ModelParallel over 8 CPU devices on 2 hosts: mesh 1 (batch) x 8 (model)" in out
    loss_model, _ = losses(tmp_path / "model")
    np.testing.assert_allclose(loss_model, losses(one)[0], atol=1e-5)
    for a, b in zip(weights(tmp_path / "model" / "model.keras"), weights(one / "model.keras")):
        np.testing.assert_allclose(a, b, atol=1e-5)


def _pid_of(line):
    # "keras_mixer.launch: process 1 of 2 is pid 1234 (coordinator ...)"
    return int(line.split(" is pid ")[1].split()[0])


def _run_until(command, tmp_path, epoch_line):
    """Starts `command`; returns (child, pids by process index, lines read) once `epoch_line` is printed."""
    child = subprocess.Popen(command, env=env(), cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    lines, pids = [], {}
    for line in child.stdout:
        lines.append(line)
        if line.startswith("keras_mixer.launch: process ") and " is pid " in line:
            pids[int(line.split()[2])] = _pid_of(line)
        if line.startswith(epoch_line):
            return child, pids, lines
    raise AssertionError("".join(lines[-50:]))


def test_a_lost_process_and_sigterm_to_one_host_or_all_then_the_same_command_resumes(runs, tmp_path):
    """One run, stopped three ways, each time started again with the same
    command: a lost process (SIGKILL to process 1: its partner stops within
    a minute and the launcher names the lost one), a preempted VM (SIGTERM
    to one host) and a stopped job (SIGTERM to all, through the launcher):
    there every process writes its part of one state at the same step and
    exits 143. The run ends with the weights of an uninterrupted run."""
    from keras_mixer import checkpoint

    _, two, _, _ = runs
    workdir = tmp_path / "stopped"
    child, pids, lines = _run_until(launch_command(workdir, 2, 4), tmp_path, "[process 0] Epoch 4/")
    killed = time.monotonic()
    os.kill(pids[1], 9)
    rest = child.stdout.read()
    status = child.wait(timeout=120)
    seconds = time.monotonic() - killed
    lines = ("".join(lines) + rest).splitlines()
    assert status != 0 and seconds < 60, (status, seconds)
    # The last thing the user reads: which process was lost, and what to do.
    assert "process 1 of 2 was lost (killed by SIGKILL)" in lines[-2], lines[-5:]
    assert "start all of them again with the same command" in lines[-1]
    print(f"partner stopped {seconds:.1f} s after the kill")

    for target, epoch in (("one", 7), ("all", 10)):
        child, pids, lines = _run_until(launch_command(workdir, 2, 4), tmp_path, f"[process 0] Epoch {epoch}/")
        os.kill(pids[1] if target == "one" else child.pid, 15)
        out = "".join(lines) + child.stdout.read()
        assert child.wait(timeout=120) == 143, out[-3000:]
        assert "[process 0] Resuming from" in out and "[process 1] Resuming from" in out
        assert out.count("Stopped by SIGTERM at step") == 1  # process 0 reports it
        assert "keras_mixer.launch: stopped by SIGTERM (exit status 143)" in out
        states = checkpoint.list_states(workdir / "checkpoints")
        step = int(out.split("Stopped by SIGTERM at step ")[1].split(";")[0])
        assert states and states[0] == checkpoint.state_path(workdir / "checkpoints", step), (states, step)
        assert step < STEPS
    out = launch(workdir, 2, 4)
    assert f"[process 0] Resuming from {checkpoint.state_path(workdir / 'checkpoints', step)}" in out
    for a, b in zip(weights(workdir / "model.keras"), weights(two / "model.keras")):
        np.testing.assert_allclose(a, b, atol=1e-6)
