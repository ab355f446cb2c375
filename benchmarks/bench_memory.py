"""Measured peak memory of a training step, per backend, variant, batch and setting.

    python benchmarks/bench_memory.py                                   # B/16, batches 8 16 32, every backend
    python benchmarks/bench_memory.py --variants L/16 H/14 --batches 4 \\
        --settings plain remat bf16 remat+bf16 --backends jax

One subprocess per measurement (so that no run inherits another's heap),
with the malloc settings `train.py` applies (`keras_mixer/runtime.py`). The
worker builds the variant at 224x224 with 1000 classes, compiles it as
`optim.compile_model` does (Adam, `distribute.jit_compile_setting()`),
and runs `model.train_on_batch` on random images twice. It reads the
kernel's resident-set counters (`/proc/self/status`):

- "model": resident memory after building and compiling, above the
  baseline of the interpreter with Keras, the backend and keras-mixer
  imported (weights; the optimizer's slots are created on the first step);
- "first step": the process's peak up to the end of the first step
  (tracing, XLA compilation, optimizer slots, the step itself);
- "step": the peak during the second, already-compiled step (the
  high-water mark is reset through `/proc/self/clear_refs` just before it).

All three are above the baseline, in GiB. Next to them the analytic
estimate of `keras_mixer.plan.memory_per_device` (what
`memory_estimate.py` prints). Settings: "plain" (float32), "remat" (each
Mixer block recomputed in the backward pass: `MLPMixer(remat=True)`,
through `keras.remat`), "bf16" (the "mixed_bfloat16" policy:
bfloat16 activations, float32 weights and optimizer state), and both.

RSS counts what the process touched, including memory that the
allocator keeps for reuse; it is what decides whether a run fits in a
machine's RAM, which is the question here.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
SETTINGS = ("plain", "remat", "bf16", "remat+bf16")
GIB = 1024**3


def _status_kib(field):
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak():
    # Writing 5 resets VmHWM (the peak resident set) to the current RSS.
    pathlib.Path("/proc/self/clear_refs").write_text("5")


def worker(variant, batch, setting, image_size):
    import keras
    import numpy as np

    from keras_mixer import MLPMixer
    from keras_mixer import distribute

    # The baseline: interpreter, frameworks and a first backend op.
    keras.ops.convert_to_numpy(keras.ops.ones((8, 8)) @ keras.ops.ones((8, 8)))
    baseline = _status_kib("VmRSS")

    bf16 = "bf16" in setting
    keras.config.set_dtype_policy("mixed_bfloat16" if bf16 else "float32")
    model = MLPMixer.from_variant(variant, image_shape=(image_size, image_size, 3),
                                  num_classes=1000, remat="remat" in setting)
    keras.config.set_dtype_policy("float32")
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=distribute.jit_compile_setting())
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (batch, image_size, image_size, 3)).astype("float32")
    labels = rng.integers(0, 1000, batch).astype("int32")
    built = _status_kib("VmRSS")
    start = time.perf_counter()
    model.train_on_batch(images, labels)
    first_seconds = time.perf_counter() - start
    first_peak = _status_kib("VmHWM")
    _reset_peak()
    start = time.perf_counter()
    model.train_on_batch(images, labels)
    step_seconds = time.perf_counter() - start
    step_peak = _status_kib("VmHWM")
    kib = 1024 / GIB
    print("RESULT " + json.dumps(dict(
        backend=keras.backend.backend(), variant=variant, batch=batch, setting=setting,
        model_gib=(built - baseline) * kib, first_step_gib=(first_peak - baseline) * kib,
        step_gib=(step_peak - baseline) * kib, first_step_s=first_seconds, step_s=step_seconds,
        params=model.count_params(),
    )), flush=True)


def estimate_gib(variant, batch, setting, image_size):
    from keras_mixer import plan as plan_lib

    est = plan_lib.memory_per_device(variant, batch, image_size=image_size,
                                       activation_bytes=2 if "bf16" in setting else 4,
                                       remat="remat" in setting)
    return est["total"] / GIB


def table(results):
    rows = ["| backend | variant | batch | setting | model GiB | first step GiB | step GiB "
            "| estimate GiB | step s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['backend']} | {r['variant']} | {r['batch']} | {r['setting']} "
                        f"| failed: {r['error']} | | | | |")
            continue
        rows.append(
            f"| {r['backend']} | {r['variant']} | {r['batch']} | {r['setting']} "
            f"| {r['model_gib']:.2f} | {r['first_step_gib']:.2f} | {r['step_gib']:.2f} "
            f"| {r['estimate_gib']:.2f} | {r['step_s']:.1f} |")
    return "\n".join(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", nargs="+", default=["jax", "tensorflow", "torch"])
    parser.add_argument("--variants", nargs="+", default=["B/16"])
    parser.add_argument("--batches", nargs="+", type=int, default=[8, 16, 32])
    parser.add_argument("--settings", nargs="+", default=["plain"], choices=SETTINGS)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        variant, batch, setting = args.worker
        worker(variant, int(batch), setting, args.image_size)
        return
    sys.path.insert(0, str(HERE))
    import machine

    from keras_mixer import runtime

    print(machine.describe(), flush=True)
    results = []
    for backend in args.backends:
        for variant in args.variants:
            for batch in args.batches:
                for setting in args.settings:
                    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2",
                               GLIBC_TUNABLES=runtime.MALLOC_TUNABLES)
                    run = subprocess.run(
                        [sys.executable, __file__, "--worker", variant, str(batch), setting,
                         "--image_size", str(args.image_size)],
                        env=env, capture_output=True, text=True)
                    lines = [line[7:] for line in run.stdout.splitlines()
                             if line.startswith("RESULT ")]
                    if run.returncode or not lines:
                        last = (run.stderr.strip().splitlines() or ["no output"])[-1]
                        result = dict(backend=backend, variant=variant, batch=batch,
                                      setting=setting, error=f"exit {run.returncode}: {last[:120]}")
                    else:
                        result = json.loads(lines[-1])
                        result["estimate_gib"] = estimate_gib(variant, batch, setting,
                                                              args.image_size)
                    results.append(result)
                    print(table([result]).splitlines()[-1], flush=True)
    print(table(results))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
