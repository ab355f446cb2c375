#!/usr/bin/env bash
# keras-mixer on a lent GPU (the `device` tool's machine): bench_gpu.py,
# B/16 at 224, batch 256, float32 and bfloat16, JAX (against the official
# Flax module) and PyTorch (against timm), within about 8 minutes.
#
#   bash benchmarks/gpu.sh prepare    # here: fill .gpu/ (git-ignored)
#   bash benchmarks/gpu.sh [args]     # there, with .gpu carried: run it
#                                     # (args go to bench_gpu.py)
#
# That machine's image has Python 3.12, JAX, PyTorch, flax, optax and timm,
# but neither Keras nor TensorFlow, and no network: `prepare` downloads
# Keras and the two packages it needs that the image lacks as Python 3.12
# wheels, and copies the official fixture (../shared does not travel).
# keras-mixer runs from the checkout, without TensorFlow.
set -euo pipefail
cd "$(dirname "$0")/.."
KERAS_VERSION=${KERAS_VERSION:-3.15.1}
if [ "${1:-}" = prepare ]; then
  mkdir -p .gpu
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .gpu "keras==$KERAS_VERSION" namex optree
  cp ../shared/fixtures/official_flax_mixer_tiny.npz .gpu/
  ls -l .gpu
  exit 0
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .gpu/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c 'import keras, jax, torch, flax, timm; print("keras", keras.__version__, "jax", jax.__version__, "torch", torch.__version__, "flax", flax.__version__, "timm", timm.__version__)'
out=${OUT:-.}
python3 benchmarks/bench_gpu.py --fixture .gpu/official_flax_mixer_tiny.npz \
  --json "$out/gpu.json" "$@" 2>&1 | tee "$out/gpu.log"
