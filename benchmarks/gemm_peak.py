"""The machine's measured matrix-multiply peak per backend and dtype (GFLOP/s).

    python benchmarks/gemm_peak.py
    python benchmarks/gemm_peak.py --size 4096 --backends torch
    python benchmarks/gemm_peak.py --config b16 --dtypes float32

Times an n x n by n x n matmul (2 n^3 FLOPs) in each backend's own library
(XLA:CPU for JAX, TensorFlow's Eigen/oneDNN, PyTorch's BLAS/oneDNN), one
subprocess per backend, after a warm-up; the median of `--repeats`. This is
the peak `bench_model.py` reports the models' FLOP/s against.

With `--config` (one of `shapes.CONFIGS`), it times instead the matmuls
of that config's training step at their real shapes, alone: for each of the
model's GEMMs (stem, token-mixing and channel-mixing Dense layers, head),
the forward product and the two of its backward pass (gradients of the
input and of the kernel), each counted as often as the model runs it. The
total FLOPs over the total time is the most a training step could reach
if everything but its matmuls were free: the ceiling to read a model's
"% of peak" against (shapes such as 196 tokens run below the square peak).
"""

import argparse
import os
import statistics
import subprocess
import sys
import time


def _matmul(backend, dtype, m, k=None, n=None):
    """A zero-argument function running one (m, k) @ (k, n) matmul to completion."""
    import numpy as np

    k, n = k or m, n or m
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k)).astype("float32")
    b = rng.standard_normal((k, n)).astype("float32")
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        x, y = (jnp.asarray(v, dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
                for v in (a, b))
        f = jax.jit(lambda x, y: x @ y)
        return lambda: f(x, y).block_until_ready()
    if backend == "tensorflow":
        import tensorflow as tf

        x, y = (tf.cast(tf.constant(v), tf.bfloat16 if dtype == "bfloat16" else tf.float32)
                for v in (a, b))
        f = tf.function(lambda x, y: tf.matmul(x, y), jit_compile=True)
        return lambda: f(x, y).numpy()
    if backend == "torch":
        import torch

        x, y = (torch.from_numpy(v).to(torch.bfloat16 if dtype == "bfloat16" else torch.float32)
                for v in (a, b))
        return lambda: torch.matmul(x, y)
    raise ValueError(f"Unknown backend {backend!r}.")


def _median_seconds(run, repeats):
    run()
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        run()
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def measure(backend, dtype, n=2048, repeats=5):
    """Median GFLOP/s of an n x n matmul in this process."""
    return 2 * n ** 3 / _median_seconds(_matmul(backend, dtype, n), repeats) / 1e9


def measure_training_gemms(backend, dtype, cfg, repeats=3):
    """GFLOP/s of a training step's matmuls alone: their FLOPs over their summed time."""
    flops = seconds = 0.0
    import shapes

    for m, k, n, count in shapes.training_gemms(cfg):
        seconds += count * _median_seconds(_matmul(backend, dtype, m, k, n), repeats)
        flops += count * 2 * m * k * n
    return flops / seconds / 1e9


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", nargs="+", default=["jax", "tensorflow", "torch"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--config", help="time this shapes.CONFIGS config's training matmuls instead")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    if args.worker:
        for dtype in args.dtypes:
            if args.config:
                import shapes

                value = measure_training_gemms(args.worker, dtype, shapes.CONFIGS[args.config])
            else:
                value = measure(args.worker, dtype, args.size, args.repeats)
            print(f"RESULT {args.worker} {dtype} {value:.1f}")
        return
    import machine

    print(machine.describe())
    what = (f"{args.config}'s training-step matmuls at their shapes" if args.config
            else f"{args.size}x{args.size} matmul")
    print(f"{'backend':<12} {'dtype':<10} {'GFLOP/s':>8}   ({what})")
    for backend in args.backends:
        extra = ["--config", args.config] if args.config else []
        run = subprocess.run(
            [sys.executable, __file__, "--worker", backend, "--dtypes", *args.dtypes,
             "--size", str(args.size), "--repeats", str(args.repeats), *extra],
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), capture_output=True, text=True,
        )
        for line in run.stdout.splitlines():
            if line.startswith("RESULT "):
                _, name, dtype, value = line.split()
                print(f"{name:<12} {dtype:<10} {float(value):>8.1f}")
        if run.returncode:
            print(f"{backend} failed: {run.stderr[-2000:]}", file=sys.stderr)


if __name__ == "__main__":
    main()
