"""The `keras-mixer` command as the wheel installs it: subcommands, help, errors, a run
from a folder outside the checkout (the Colab lane runs this file on the installed wheel)."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from keras_mixer import commands
from keras_mixer import runtime
from conftest import in_the_colab_lane
from conftest import once
from conftest import subprocess_env

# The console script pip wrote beside this interpreter (`[project.scripts]`).
COMMAND = pathlib.Path(sys.executable).parent / "keras-mixer"


def keras_mixer(*args, cwd, timeout=300, **env):
    return subprocess.run([str(COMMAND), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**subprocess_env("jax"), **env})


def test_the_command_is_installed_with_the_package():
    assert COMMAND.exists(), f"{COMMAND} is missing: pip install the package (it has [project.scripts])"


def test_help_lists_the_subcommands_and_a_wrong_one_is_one_line_with_the_closest(capsys):
    assert commands.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in commands.SUBCOMMANDS:
        assert f"\n  {name} " in out
    assert commands.main(["trian"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: unknown subcommand 'trian'. Did you mean `train`? Subcommands: train, evaluate, "
        "predict, export (keras-mixer --help).")
    assert commands.main([]) == 2 and capsys.readouterr().err.startswith("usage: keras-mixer")
    assert commands.main(["--version"]) == 0 and capsys.readouterr().out.strip() == "keras-mixer 0.1.0"
    # --debug before the subcommand is the same as after it.
    assert commands.main(["--debug", "trian"]) == 2 and "'trian'" in capsys.readouterr().err


@pytest.mark.parametrize("name, flags", [
    ("train", ("--config", "--set", "--workdir", "--eval_only", "--export", "config keys (")),
    ("evaluate", ("--model", "--few_shot", "--out_dir")),
    ("predict", ("--model", "--class_names", "--top")),
    ("export", ("--model", "--formats", "--quantization", "kerashub")),
])
def test_each_subcommand_has_its_own_help(name, flags, capsys, monkeypatch):
    monkeypatch.setenv(runtime.OPT_OUT, "0")  # no re-execution of this test process
    with pytest.raises(SystemExit) as exit_info:
        commands.main([name, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: keras-mixer {name} ")
    for flag in flags:
        assert flag in out


@once("the installed script and python -m start the same code; the subprocesses run JAX")
@in_the_colab_lane("the installed command, which the lane has from the built wheel")
def test_the_installed_command_and_python_m_are_the_same_command(tmp_path):
    result = keras_mixer("predict", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    module = subprocess.run([sys.executable, "-m", "keras_mixer", "predict", "--help"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env=subprocess_env("jax"))
    assert result.stdout.startswith("usage: keras-mixer predict ") and module.stdout == result.stdout


@once("one training run through the installed command; train.py's runs cover each backend")
@in_the_colab_lane("the command as the built wheel installs it")
def test_train_evaluate_predict_export_from_a_folder_outside_the_checkout(tmp_path):
    import tensorflow as tf

    # Default work directory (runs/<config>-<time> under the current folder).
    result = keras_mixer("train", "--set", "epochs=2", "--verbose", "0", cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (workdir,) = (tmp_path / "runs").iterdir()
    assert f"saved {pathlib.Path('runs') / workdir.name / 'model.keras'}" in result.stdout
    model = workdir / "model.keras"
    accuracy = json.loads((workdir / "results.json").read_text())["test_accuracy"]

    evaluated = keras_mixer("evaluate", "--model", str(model), "--out_dir", "eval", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads((tmp_path / "eval" / "evaluation.json").read_text())["accuracy"] == pytest.approx(
        accuracy, abs=1e-6)

    image = np.zeros((8, 8, 1), np.uint8)
    image[1:7, 3:5] = 255  # a bar, as the digits' 1 is drawn
    (tmp_path / "one.png").write_bytes(tf.io.encode_png(image).numpy())
    predicted = keras_mixer("predict", "--model", str(model), "--top", "3", "one.png", cwd=tmp_path)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    line = predicted.stdout.strip().splitlines()[-1]
    assert line.startswith("one.png: ") and len(line.split(", ")) == 3

    exported = keras_mixer("export", "--model", str(model), "--formats", "saved_model",
                           "--out_dir", "export", cwd=tmp_path, timeout=600)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert (tmp_path / "export" / "saved_model" / "saved_model.pb").exists()


@once("the error printer runs before any backend work; the subprocess runs JAX")
@in_the_colab_lane("the installed command's errors, as a Colab user reads them")
def test_a_user_error_is_one_line(tmp_path):
    # (--debug's traceback: test_training's train.py test, the same cli.run.)
    result = keras_mixer("train", "--set", "learning_rate=-1", cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-2].startswith("error: ") and "learning_rate" in lines[-2]
    assert lines[-1] == "(run with --debug or KERAS_MIXER_DEBUG=1 for the traceback)"


@pytest.mark.skipif(not runtime.wants_malloc_tunables({}), reason="glibc malloc settings: Linux with glibc only")
@once("the re-execution happens before any backend work; the subprocess runs JAX")
@in_the_colab_lane("the installed command's start, as a Colab user runs it")
def test_train_re_executes_once_with_the_malloc_settings_and_the_others_do_not(tmp_path):
    env = {k: v for k, v in subprocess_env("jax").items() if k != "GLIBC_TUNABLES"}
    for name, processes in (("train", 2), ("predict", 1)):
        # Python's -X importtime, through the environment: each process
        # lists its imports under one header.
        result = subprocess.run([str(COMMAND), name, "--help"], cwd=tmp_path, capture_output=True,
                                text=True, timeout=300, env={**env, "PYTHONPROFILEIMPORTTIME": "1"})
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stderr.count("import time: self [us]") == processes, (name, result.stderr[-2000:])
