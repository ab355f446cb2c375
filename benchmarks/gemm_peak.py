"""The machine's measured matrix-multiply peak per backend and dtype (GFLOP/s).

    python benchmarks/gemm_peak.py
    python benchmarks/gemm_peak.py --size 4096 --backends torch

Times an n x n by n x n matmul (2 n^3 FLOPs) in each backend's own library
(XLA:CPU for JAX, TensorFlow's Eigen/oneDNN, PyTorch's BLAS/oneDNN), one
subprocess per backend, after a warm-up; the median of `--repeats`. This is
the peak `bench_model.py` reports the models' FLOP/s against.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time


def _matmul(backend, dtype, n):
    """A zero-argument function running one n x n matmul to completion."""
    import numpy as np

    a = np.random.default_rng(0).standard_normal((n, n)).astype("float32")
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        x = jnp.asarray(a, dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
        f = jax.jit(lambda x: x @ x)
        return lambda: f(x).block_until_ready()
    if backend == "tensorflow":
        import tensorflow as tf

        x = tf.cast(tf.constant(a), tf.bfloat16 if dtype == "bfloat16" else tf.float32)
        f = tf.function(lambda x: tf.matmul(x, x), jit_compile=True)
        return lambda: f(x).numpy()
    if backend == "torch":
        import torch

        x = torch.from_numpy(a).to(torch.bfloat16 if dtype == "bfloat16" else torch.float32)
        return lambda: torch.matmul(x, x)
    raise ValueError(f"Unknown backend {backend!r}.")


def measure(backend, dtype, n=2048, repeats=5):
    """Median GFLOP/s of an n x n matmul in this process."""
    run = _matmul(backend, dtype, n)
    run()
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        run()
        times.append(time.perf_counter() - begin)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", nargs="+", default=["jax", "tensorflow", "torch"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        for dtype in args.dtypes:
            print(f"RESULT {args.worker} {dtype} {measure(args.worker, dtype, args.size, args.repeats):.1f}")
        return
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import machine

    print(machine.describe())
    print(f"{'backend':<12} {'dtype':<10} {'GFLOP/s':>8}   ({args.size}x{args.size} matmul)")
    for backend in args.backends:
        run = subprocess.run(
            [sys.executable, __file__, "--worker", backend, "--dtypes", *args.dtypes,
             "--size", str(args.size), "--repeats", str(args.repeats)],
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
