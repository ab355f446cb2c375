"""keras-mixer on a GPU next to the official Flax module (JAX) and timm (PyTorch).

    python benchmarks/bench_gpu.py                      # B/16 at 224, batch 256
    python benchmarks/bench_gpu.py --config small --batch 32 --steps 3   # a quick look, CPU too

`benchmarks/gpu.sh` runs it on a lent GPU machine (whose image has JAX,
PyTorch, flax and timm but no Keras and no TensorFlow) within about 8
minutes.

One worker process per (backend, implementation, dtype), so that each
process's peak memory is its own:
- JAX: keras-mixer (`KERAS_BACKEND=jax`, compiled as `train.py` compiles
  it: XLA) and the official module (`flax_reference.py`, checked against
  the official fixture first), optax Adam; tanh GELU on both.
- PyTorch: keras-mixer (`KERAS_BACKEND=torch`, eager, as `train.py`
  runs it) and timm's `MlpMixer`, `torch.optim.Adam`; timm's exact GELU
  on both (`gelu_approximate=False`).
- float32 and bfloat16: Keras' "mixed_bfloat16" policy, Flax
  `dtype=bfloat16`, `torch.autocast`. float32 matmuls run at each
  library's default precision (XLA: TF32 on GPUs that have it; PyTorch:
  full float32 unless `torch.backends.cuda.matmul.allow_tf32`), the same
  on both sides of a pair.

Each worker times inference (a forward pass; keras-mixer's
`predict_on_batch`) and then a training step (forward, backward, Adam;
`train_on_batch`), `--steps` steps after two warm-ups, with the inputs
already on the GPU (`bench_model.py`'s runners), and reports the peak GPU
memory of the process (PyTorch: `torch.cuda.max_memory_allocated`; JAX:
the device's `peak_bytes_in_use`), which the training step sets.

The table gives img/s, its ratio to the reference, TFLOP/s (the analytic
counts of `shapes.py`; a training step is 3x the forward) and the
fraction of the GPU's bfloat16 matmul peak, measured in the same run (an
8192^3 bfloat16 product through PyTorch, median of 10).
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
FIXTURE = HERE.parents[1] / "shared" / "fixtures" / "official_flax_mixer_tiny.npz"

from shapes import CONFIGS  # noqa: E402
from shapes import forward_flops  # noqa: E402

WORKERS = [  # (backend, implementation), the reference second
    ("jax", "keras"), ("jax", "flax"),
    ("torch", "keras"), ("torch", "timm"),
]
REFERENCES = {"jax": "flax", "torch": "timm"}


def _peak_bytes(backend):
    if backend == "torch":
        import torch

        return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def worker(backend, impl, dtype, cfg, steps, fixture):
    import bench_model

    if impl == "flax":
        import flax_reference

        diff = max(flax_reference.check_fixture(fixture))
        if diff > 1e-5:
            raise SystemExit(f"The Flax reference differs from the official fixture by {diff}.")
    if impl == "keras":
        runner = bench_model.keras_runner(cfg, dtype, gelu_approximate=backend != "torch")
    else:
        runner = bench_model.RUNNERS[impl](cfg, dtype)
    result = dict(backend=backend, impl=impl, dtype=dtype)
    for mode in ("infer", "train"):
        result[mode] = cfg["batch"] / bench_model._time(runner[mode], steps)
    result["peak_bytes"] = _peak_bytes(backend)
    print("RESULT " + json.dumps(result), flush=True)


def bf16_peak_tflops(n=8192, repeats=10):
    """Median TFLOP/s of an n^3 bfloat16 matmul through PyTorch on the GPU."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n ** 3 / statistics.median(times) / 1e12


def describe_gpu():
    try:
        import torch

        if torch.cuda.is_available():
            return f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    except ImportError:
        pass
    return "GPU: none found (the figures are the CPU's)"


def table(results, cfg, peak):
    flops = forward_flops(cfg) / 1e12
    rows = [f"{'backend':<7} {'dtype':<9} {'impl':<6} {'infer img/s':>11} {'x ref':>6} {'TFLOP/s':>8} "
            f"{'% bf16':>7} {'train img/s':>11} {'x ref':>6} {'TFLOP/s':>8} {'% bf16':>7} {'peak GiB':>9}"]
    for r in results:
        ref = next((x for x in results if x["backend"] == r["backend"] and x["dtype"] == r["dtype"]
                    and x["impl"] == REFERENCES[r["backend"]]), None)
        cells = []
        for mode, factor in (("infer", 1), ("train", 3)):
            tflops = r[mode] * flops * factor
            ratio = f"{r[mode] / ref[mode]:.2f}" if ref and ref is not r else ""
            share = f"{100 * tflops / peak:.0f}%" if peak else ""
            cells.append(f"{r[mode]:>11.1f} {ratio:>6} {tflops:>8.1f} {share:>7}")
        memory = f"{r['peak_bytes'] / 2 ** 30:>9.2f}" if r["peak_bytes"] else f"{'':>9}"
        rows.append(f"{r['backend']:<7} {r['dtype']:<9} {r['impl']:<6} {cells[0]} {cells[1]} {memory}")
    return "\n".join(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="b16", choices=sorted(CONFIGS))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--backends", nargs="+", default=["jax", "torch"], choices=["jax", "torch"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--timeout", type=int, default=150, help="seconds per worker")
    parser.add_argument("--fixture", default=None,
                        help="the official fixture (default: ../shared/fixtures/ beside the repo)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cfg = dict(CONFIGS[args.config], batch=args.batch)
    if args.worker:
        backend, impl, dtype = args.worker
        worker(backend, impl, dtype, cfg, args.steps, args.fixture or FIXTURE)
        return
    print(describe_gpu(), flush=True)
    try:
        peak = bf16_peak_tflops()
        print(f"bfloat16 matmul peak (8192^3, PyTorch): {peak:.0f} TFLOP/s", flush=True)
    except Exception as error:  # no GPU: the table leaves the column empty
        print(f"bfloat16 matmul peak not measured ({type(error).__name__}: {error})", flush=True)
        peak = None
    results = []
    for dtype in args.dtypes:
        for backend, impl in WORKERS:
            if backend not in args.backends:
                continue
            command = [sys.executable, __file__, "--worker", backend, impl, dtype,
                       "--config", args.config, "--batch", str(args.batch), "--steps", str(args.steps)]
            if args.fixture:
                command += ["--fixture", args.fixture]
            env = dict(os.environ, KERAS_BACKEND=backend, XLA_PYTHON_CLIENT_PREALLOCATE="false")
            begin = time.perf_counter()
            try:
                run = subprocess.run(command, env=env, capture_output=True, text=True,
                                     timeout=args.timeout)
            except subprocess.TimeoutExpired:
                print(f"{backend} {impl} {dtype}: over {args.timeout} s, left out", flush=True)
                continue
            lines = [line[7:] for line in run.stdout.splitlines() if line.startswith("RESULT ")]
            if run.returncode or not lines:
                print(f"{backend} {impl} {dtype} failed:\n{run.stderr[-3000:]}", flush=True)
                continue
            results.append(json.loads(lines[0]))
            print(f"{backend} {impl} {dtype}: {time.perf_counter() - begin:.0f} s", flush=True)
    print(f"{args.config} at {cfg['image_shape'][0]}, batch {args.batch}, {args.steps} steps per timing")
    print(table(results, cfg, peak))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(dict(peak_tflops=peak, results=results), indent=2))


if __name__ == "__main__":
    main()
