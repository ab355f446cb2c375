"""Where a PyTorch training step spends its time, float32 against mixed bfloat16.

    KERAS_BACKEND=torch python benchmarks/torch_bf16_profile.py
    KERAS_BACKEND=torch python benchmarks/torch_bf16_profile.py --config small --batch 64 --steps 5

Profiles `model.train_on_batch` of a `shapes.CONFIGS` config with
`torch.profiler`, once under the float32 policy and once under
"mixed_bfloat16" (what `mixed_precision="auto"` picks on a CPU with
AVX512-BF16 or AMX), and sums the self CPU time of PyTorch's ops in
groups: the matrix multiplies (`addmm`, `mm`, `bmm`, convolution), the
copies (`copy_`: dtype conversions and the transposes made contiguous,
which PyTorch's profiler does not tell apart), and everything else
(LayerNorm, GELU, adds, the optimizer). The matmuls are what bfloat16 speeds
up; the rest, and the Python around the ops (the step's unprofiled wall
time less its ops' time), bounds the step's bf16/f32 ratio, as Amdahl's
law has it.
Prints the CPU's matrix instructions first (`machine.py`), so that a
figure is never read on the wrong machine.
"""

import argparse
import collections
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

GROUPS = (
    ("matmul", ("addmm", "mm", "bmm", "matmul", "linear", "convolution", "conv2d", "mkldnn")),
    ("copy", ("copy_", "to", "_to_copy", "contiguous", "clone")),
)


def group_of(name):
    op = name.split("::")[-1]
    for group, names in GROUPS:
        if any(op == n or op.startswith(n + "_") for n in names):
            return group
    return "other"


def profile(cfg, batch, steps, policy):
    import keras
    import numpy as np
    import torch

    from keras_mixer import MLPMixer
    from shapes import arch

    keras.config.set_dtype_policy(policy)
    try:
        model = MLPMixer(**arch(cfg))
    finally:
        keras.config.set_dtype_policy("float32")
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (batch, *cfg["image_shape"])).astype("float32")
    y = np.eye(cfg["num_classes"], dtype="float32")[rng.integers(0, cfg["num_classes"], batch)]
    for _ in range(2):
        model.train_on_batch(x, y)
    import time

    begin = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    wall = (time.perf_counter() - begin) * 1e3 / steps
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            model.train_on_batch(x, y)
    times = collections.Counter()
    for event in prof.key_averages():
        if event.key.startswith("aten::"):
            times[group_of(event.key)] += event.self_cpu_time_total / 1e3 / steps
    return times, wall


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="small")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras

    import machine
    from shapes import CONFIGS

    if keras.backend.backend() != "torch":
        raise SystemExit("Run with KERAS_BACKEND=torch.")
    print(machine.describe())
    cfg = CONFIGS[args.config]
    f32, wall32 = profile(cfg, args.batch, args.steps, "float32")
    bf16, wall16 = profile(cfg, args.batch, args.steps, "mixed_bfloat16")
    print(f"{args.config} config, batch {args.batch}, one training step (ms of PyTorch ops' self CPU time)")
    print(f"{'ops':<10} {'float32':>9} {'bfloat16':>9} {'f32/bf16':>9}")
    for group in ("matmul", "copy", "other"):
        print(f"{group:<10} {f32[group]:>9.1f} {bf16[group]:>9.1f} "
              f"{f32[group] / bf16[group] if bf16[group] else float('nan'):>9.2f}")
    total32, total16 = sum(f32.values()), sum(bf16.values())
    print(f"{'all ops':<10} {total32:>9.1f} {total16:>9.1f} {total32 / total16:>9.2f}")
    print(f"{'outside':<10} {wall32 - total32:>9.1f} {wall16 - total16:>9.1f}   (the step's wall time "
          "less its ops': Python, Keras, the profiler's own)")
    print(f"{'step':<10} {wall32:>9.1f} {wall16:>9.1f} {wall32 / wall16:>9.2f}   (wall time, unprofiled)")
    print(f"non-matmul share of the bfloat16 step's wall time: {(wall16 - bf16['matmul']) / wall16:.0%}")
    # Amdahl: the step if everything but the matmuls took no time at all.
    print(f"bf16/f32 if only the matmuls took time: {f32['matmul'] / bf16['matmul']:.2f}x; "
          f"if the rest ran as in float32: {wall32 / (wall32 - f32['matmul'] + bf16['matmul']):.2f}x")


if __name__ == "__main__":
    main()
