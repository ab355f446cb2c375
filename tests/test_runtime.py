"""Process settings applied by the entry points (keras_mixer.runtime)."""

import glob
import os
import platform
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT
from conftest import subprocess_env
from conftest import once
from keras_mixer import runtime

GLIBC_LINUX = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def test_malloc_tunables_are_wanted_only_when_unset_and_not_opted_out():
    assert runtime.wants_malloc_tunables({}) is GLIBC_LINUX
    assert not runtime.wants_malloc_tunables({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})
    assert not runtime.wants_malloc_tunables({runtime.OPT_OUT: "0"})


def _run(code, **env):
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**{k: v for k, v in subprocess_env("jax").items() if k != "GLIBC_TUNABLES"}, **env},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


# runtime.py loaded by path, as train.py does: no package, no Keras.
PROBE = (
    "import importlib.util, os, sys; "
    "spec = importlib.util.spec_from_file_location('r', 'keras_mixer/runtime.py'); "
    "r = importlib.util.module_from_spec(spec); spec.loader.exec_module(r); "
    "r.ensure_malloc_tunables(); "
    "print(os.environ.get('GLIBC_TUNABLES', '-'), 'keras' in sys.modules)"
)


@pytest.mark.skipif(not GLIBC_LINUX, reason="glibc malloc settings apply to Linux with glibc only")
def test_entry_point_re_executes_itself_once_with_the_tunables():
    # The re-executed process sees the settings; nothing before it imported
    # Keras, so the restart costs only the interpreter start.
    assert _run(PROBE) == [runtime.MALLOC_TUNABLES, "False"]
    assert _run(PROBE, **{runtime.OPT_OUT: "0"}) == ["-", "False"]
    assert _run(PROBE, GLIBC_TUNABLES="glibc.malloc.hugetlb=1") == ["glibc.malloc.hugetlb=1", "False"]


@pytest.mark.skipif(not GLIBC_LINUX, reason="glibc malloc settings apply to Linux with glibc only")
@once("train.py re-executes before it imports Keras; the subprocess runs JAX")
@pytest.mark.parametrize("opt_out, processes", [(None, 2), ("0", 1)])
def test_train_py_re_executes_once(tmp_path, opt_out, processes):
    env = {k: v for k, v in subprocess_env("jax").items() if k != "GLIBC_TUNABLES"}
    if opt_out is not None:
        env[runtime.OPT_OUT] = opt_out
    result = subprocess.run(
        [sys.executable, "-X", "importtime", str(ROOT / "train.py"), "--help"], cwd=tmp_path,
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "--config" in result.stdout
    # -X importtime lists each process's imports under one header.
    assert result.stderr.count("import time: self [us]") == processes, result.stderr[-2000:]


@pytest.mark.parametrize("flags, expected", [
    ("fpu sse avx2 avx512f", False),
    ("fpu avx2 avx512f avx512_bf16", True),
    ("fpu amx_tile amx_bf16", True),
])
def test_bf16_matrix_instructions_are_read_from_the_cpu_flags(tmp_path, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n")
    assert runtime.cpu_has_bf16_matmul(cpuinfo, environ={}) is expected
    assert runtime.cpu_info(cpuinfo) == ("Some CPU", set(flags.split()))
    # No evidence, no warning.
    assert runtime.cpu_has_bf16_matmul(tmp_path / "missing", environ={}) is True
    # KERAS_MIXER_CPU_BF16 answers instead of the CPU, either way.
    for answer in (False, True):
        environ = {runtime.BF16_OVERRIDE: str(int(answer))}
        assert runtime.cpu_has_bf16_matmul(cpuinfo, environ=environ) is answer
        assert runtime.cpu_has_bf16_matmul(tmp_path / "missing", environ=environ) is answer


def test_a_bad_bf16_override_names_its_values():
    with pytest.raises(ValueError, match=r"KERAS_MIXER_CPU_BF16='yes': use 1 .* 0 .* unset"):
        runtime.cpu_has_bf16_matmul(environ={runtime.BF16_OVERRIDE: "yes"})


def test_schedulable_cores_follow_the_affinity_mask_then_the_cpu_count(monkeypatch):
    """tf.data's parallelism (keras_mixer.data.without_autotuning) follows the
    cores a container or taskset leaves this process, not the machine's."""
    if hasattr(os, "sched_getaffinity"):
        assert runtime.schedulable_cores() == len(os.sched_getaffinity(0))
        monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(os, "cpu_count", lambda: 12)
    assert runtime.schedulable_cores() == 12
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # "undetermined"
    assert runtime.schedulable_cores() == 1


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None or bool(glob.glob("/dev/accel*")),
                    reason="this machine has a GPU or TPU")
def test_cpu_only_on_a_machine_without_accelerators():
    from keras_mixer import distribute

    assert distribute.cpu_only() is True
