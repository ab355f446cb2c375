"""Process settings that must be in place before Python starts, applied by our entry points.

glibc's malloc returns large blocks (over `mmap_threshold`) to the kernel
when they are freed. XLA:CPU allocates a step's temporary buffer (hundreds
of MiB for a Mixer training step) and frees it again every step, so each
step maps fresh pages and takes a page fault per 4 KiB of them: on a
2-core machine this was ~200 ms of kernel time in a 350 ms JAX step of the
official Flax Mixer, and setting

    GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967295:glibc.malloc.arena_max=1

(serve large blocks from the heap, never give the heap back) made that
step 1.4x faster (1.2x on another 2-core machine, `benchmarks/bench_model.py
--malloc both`). glibc reads `GLIBC_TUNABLES` once, at process start, so
`train.py` calls `ensure_malloc_tunables()` before it imports Keras: when
the variable is unset it sets it and re-executes the same command (once;
the variable marks it done), which repeats only the interpreter start.
`keras-mixer train` does the same, but the package (and so Keras) is
imported before any of its code runs, so there the restart repeats a Keras
import (3 to 8 s on 2 cores), small beside a training run. The other
subcommands (export, predict, evaluate) run no training steps and are left
alone. In a notebook, set the variable before the kernel starts (it cannot
be changed from inside).

This module imports only the standard library, so `train.py` can load it
before the package.

Opt out with `KERAS_MIXER_MALLOC_TUNABLES=0`, or by setting
`GLIBC_TUNABLES` yourself (it is then left exactly as you set it). Only
Linux with glibc is affected; elsewhere this does nothing. Memory: the
heap keeps its peak size for the life of the process, which a training
process reaches anyway.
"""

import os
import platform
import sys

MALLOC_TUNABLES = (
    "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967295:glibc.malloc.arena_max=1"
)
OPT_OUT = "KERAS_MIXER_MALLOC_TUNABLES"


def wants_malloc_tunables(environ=None):
    """Whether `ensure_malloc_tunables` would set the variable and re-execute."""
    environ = os.environ if environ is None else environ
    return (
        sys.platform.startswith("linux")
        and platform.libc_ver()[0] == "glibc"
        and "GLIBC_TUNABLES" not in environ
        and environ.get(OPT_OUT, "1") != "0"
    )


def ensure_malloc_tunables(argv=None):
    """Re-executes this Python command with `MALLOC_TUNABLES` when they are not set.

    Call it first thing in a `__main__` block, before anything heavy is
    imported: the process is replaced, so work done before is lost.
    `argv` defaults to how this process was started (`sys.orig_argv`, which
    keeps `-m module` forms).
    """
    if not wants_malloc_tunables():
        return
    os.environ["GLIBC_TUNABLES"] = MALLOC_TUNABLES
    argv = list(argv if argv is not None else getattr(sys, "orig_argv", [sys.executable] + sys.argv))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable] + argv[1:])


def schedulable_cores():
    """CPU cores this process may run on (its affinity mask, which a container
    or `taskset` narrows; `os.cpu_count()` where there is no such mask)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# /proc/cpuinfo flags of matrix instructions that compute in bfloat16.
BF16_MATMUL_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_info(cpuinfo="/proc/cpuinfo"):
    """`(model name or None, set of flags or None)` of the first CPU in
    `/proc/cpuinfo`; `(None, None)` where there is no such file (not Linux)."""
    model = flags = None
    try:
        with open(cpuinfo) as handle:
            for line in handle:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model = value.strip()
                elif key == "flags":
                    flags = set(value.split())
                if model is not None and flags is not None:
                    break
    except OSError:
        pass
    return model, flags


# Overrides what `cpu_has_bf16_matmul` reads from the CPU: "1" answers yes,
# "0" no. It lets one machine run what `mixed_precision="auto"` does on the
# other kind of CPU (the tests run their PyTorch pass both ways), and lets a
# user whose container hides /proc/cpuinfo's flags say what the CPU has.
BF16_OVERRIDE = "KERAS_MIXER_CPU_BF16"


def cpu_has_bf16_matmul(cpuinfo="/proc/cpuinfo", environ=None):
    """Whether the CPU has bfloat16 matrix instructions (AVX512-BF16 or AMX).

    Without them bfloat16 matmuls are emulated: on a 2-core AVX2 machine a
    small Mixer under "mixed_bfloat16" ran at 0.84-1.0x its float32 speed
    on JAX, 0.82-0.87x on TensorFlow and 0.02x on PyTorch (docs/benchmarks.md). Unknown
    (no /proc/cpuinfo) counts as having them: no warning without evidence.
    `KERAS_MIXER_CPU_BF16=1` or `=0` (`BF16_OVERRIDE`) answers instead of the CPU.
    """
    environ = os.environ if environ is None else environ
    override = environ.get(BF16_OVERRIDE, "").strip()
    if override:
        if override not in ("0", "1"):
            raise ValueError(f"{BF16_OVERRIDE}={override!r}: use 1 (the CPU has bfloat16 matrix "
                             f"instructions), 0 (it has not), or leave it unset to read the CPU's flags.")
        return override == "1"
    _, flags = cpu_info(cpuinfo)
    return flags is None or any(flag in flags for flag in BF16_MATMUL_FLAGS)
