"""What XLA:CPU makes of a bfloat16 matmul, on JAX and TensorFlow: the evidence
behind `mixed_precision="auto"` staying float32 on CPUs there.

    python benchmarks/xla_bf16.py
    python benchmarks/xla_bf16.py --backends jax --show   # and print the optimised HLO

For each backend, compiles `gelu(x @ w)` on bfloat16 operands (the shape of
the small config's channel-mixing Dense, batch 32) and on float32 ones,
reads the optimised HLO XLA runs, and times both. It prints the dtype of
the dot XLA emits, how many `convert` instructions surround it, and the
bfloat16 / float32 time ratio. On the machines measured so far, XLA:CPU
converted both bfloat16 operands to float32, ran a float32 dot and
rounded each elementwise result back to bfloat16 (a convert pair per
operation), so bfloat16 costs the float32 matmul plus conversion passes.
`machine.py` says which CPU features the figures came from.
"""

import argparse
import os
import re
import subprocess
import sys

SHAPE = (32 * 64, 256, 1024)  # rows (batch x tokens), hidden, channels MLP width


def _hlo_and_timer(backend, dtype):
    import numpy as np

    m, k, n = SHAPE
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k)).astype("float32")
    b = rng.standard_normal((k, n)).astype("float32") / k ** 0.5
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        x, w = (jnp.asarray(v, dtype=jnp.dtype(dtype)) for v in (a, b))
        f = jax.jit(lambda x, w: jax.nn.gelu(x @ w))
        hlo = f.lower(x, w).compile().as_text()
        return hlo, lambda: f(x, w).block_until_ready()
    import tensorflow as tf

    x, w = (tf.cast(tf.constant(v), dtype) for v in (a, b))
    f = tf.function(lambda x, w: tf.nn.gelu(tf.matmul(x, w), approximate=True), jit_compile=True)
    hlo = f.experimental_get_compiler_ir(x, w)(stage="optimized_hlo")
    return hlo, lambda: f(x, w).numpy()


def _dot_dtypes(hlo):
    """The result dtypes of the dot instructions in an HLO text."""
    return sorted(set(re.findall(r"= (\w+)\[[\d,]*\]\S* dot\(", hlo)))


def worker(backend, show):
    import gemm_peak

    row = {}
    for dtype in ("float32", "bfloat16"):
        hlo, run = _hlo_and_timer(backend, dtype)
        row[dtype] = (_dot_dtypes(hlo), len(re.findall(r" convert\(", hlo)), gemm_peak._median_seconds(run, 7))
        if show:
            print(f"--- {backend} {dtype} optimised HLO ---\n{hlo}")
    (f32_dot, f32_converts, f32_s), (bf_dot, bf_converts, bf_s) = row["float32"], row["bfloat16"]
    print(f"RESULT {backend} {'/'.join(f32_dot) or '?'} {f32_converts} {f32_s} "
          f"{'/'.join(bf_dot) or '?'} {bf_converts} {bf_s}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", nargs="+", default=["jax", "tensorflow"])
    parser.add_argument("--show", action="store_true", help="print the optimised HLO too")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.show)
        return
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import machine

    print(machine.describe())
    m, k, n = SHAPE
    print(f"gelu(x @ w), x ({m}, {k}), w ({k}, {n}), XLA on the CPU")
    print(f"{'backend':<11} {'operands':<9} {'dot computes':<13} {'converts':>8} {'ms':>8} {'bf16/f32':>9}")
    for backend in args.backends:
        command = [sys.executable, __file__, "--worker", backend] + (["--show"] if args.show else [])
        env = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
        run = subprocess.run(command, env=env, capture_output=True, text=True)
        if args.show:
            print("\n".join(line for line in run.stdout.splitlines() if not line.startswith("RESULT ")))
        lines = [line.split()[1:] for line in run.stdout.splitlines() if line.startswith("RESULT ")]
        if run.returncode or not lines:
            print(f"{backend} failed:\n{run.stderr[-2000:]}", file=sys.stderr)
            continue
        name, f32_dot, f32_conv, f32_s, bf_dot, bf_conv, bf_s = lines[0]
        print(f"{name:<11} {'float32':<9} {f32_dot:<13} {f32_conv:>8} {1e3 * float(f32_s):>8.2f}")
        print(f"{name:<11} {'bfloat16':<9} {bf_dot:<13} {bf_conv:>8} {1e3 * float(bf_s):>8.2f} "
              f"{float(bf_s) / float(f32_s):>9.2f}")


if __name__ == "__main__":
    main()
