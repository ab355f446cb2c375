#!/usr/bin/env bash
# The Colab lane: the built wheel of this project, installed the way a
# Colab user gets it, on the software of Colab's TPU runtime (Python 3.13,
# tests/colab-constraints.txt), on the JAX backend. Runs the notebooks
# (smoke mode, default cache) and the model, weights and training tests.
#   bash tests/colab_lane.sh [junit.xml] [pytest args...]
# Python 3.13 is $COLAB_PYTHON, else python3.13 on PATH, else pyenv's.
# The environment is kept in .venv-colab between runs (the wheel is always
# reinstalled). Called by tests/run_all_backends.sh, which sets it up
# (COLAB_LANE_STEP=setup) while the tests of its other passes run, then
# runs the tests (COLAB_LANE_STEP=test); unset, both steps run.
# pip compiles every module to bytecode at install (52 of the lane's 118 s
# here): without it (--no-compile), a machine with PYTHONDONTWRITEBYTECODE
# set, as this one, recompiles TensorFlow's and JAX's modules in every
# process that imports them, and the tensorflow pass took 1.5x as long.
set -uo pipefail
cd "$(dirname "$0")/.."
report=${1:-}
shift || true
start=$(date +%s)

is_313() { [ -n "$1" ] && "$1" -c 'import sys; assert sys.version_info[:2] == (3, 13)' 2>/dev/null; }
find_python() {
  # pyenv's shim for python3.13 exists even where it refuses to run, so
  # each candidate is run, not just found.
  local root candidate
  root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
  for candidate in "${COLAB_PYTHON:-}" "$(command -v python3.13)" \
      $(ls -d "$root"/versions/3.13*/bin/python 2>/dev/null | sort -rV); do
    if is_313 "$candidate"; then echo "$candidate"; return; fi
  done
}
step=${COLAB_LANE_STEP:-all}
venv=.venv-colab
if [ "$step" != test ]; then
  py313=$(find_python)
  if [ -z "$py313" ]; then
    echo "colab lane: no Python 3.13 found (set COLAB_PYTHON, or SKIP_COLAB=1 to leave the lane out)" >&2
    exit 1
  fi

  PYTHON=${PYTHON:-python}
  dist=$(mktemp -d)
  "$PYTHON" -m build --wheel --outdir "$dist" . >"$dist/build.log" 2>&1 || { cat "$dist/build.log"; exit 1; }
  wheel=$(ls "$dist"/keras_mixer-*.whl)

  if ! is_313 "$venv/bin/python"; then
    rm -rf "$venv"
    "$py313" -m venv "$venv" || exit 1
  fi
  pip=("$venv/bin/python" -m pip install -q -c tests/colab-constraints.txt)
  "${pip[@]}" --upgrade pip || exit 1
  # The extras a Colab user has: tf.data and the rest of `train` (Colab's TPU
  # runtime has no TensorFlow), JAX (preinstalled there), safetensors (`timm`,
  # preinstalled there too), gcsfs for runs in a bucket (`gcs`), and what the
  # tests and notebooks use.
  "${pip[@]}" "$wheel[train,jax,test,viz,litert,timm,gcs]" || exit 1
  "${pip[@]}" --force-reinstall --no-deps "$wheel" || exit 1
  "$venv/bin/python" -c 'import keras, jax, numpy, tensorflow, sys; print(f"colab lane: Python {sys.version.split()[0]}, keras {keras.__version__}, jax {jax.__version__}, numpy {numpy.__version__}, tensorflow {tensorflow.__version__}")' 2>/dev/null
  rm -rf "$dist"
  echo "colab lane: set up in $(( $(date +%s) - start )) s"
  [ "$step" = setup ] && exit 0
fi
if ! is_313 "$venv/bin/python" || [ ! -x "$venv/bin/pytest" ]; then
  echo "colab lane: $venv is not set up (run with COLAB_LANE_STEP=setup first)" >&2
  exit 1
fi

# The venv's pytest, not `python -m pytest`: the checkout must not be on
# sys.path, so every import of keras_mixer is the installed wheel's.
KERAS_BACKEND=jax KERAS_MIXER_TEST_INSTALLED=1 TF_CPP_MIN_LOG_LEVEL=2 \
  "$venv/bin/pytest" -q -p no:cacheprovider -m "not slow" \
  ${report:+--junitxml="$report"} \
  tests/test_package.py tests/test_model.py tests/test_layers.py tests/test_weights.py \
  tests/test_released.py tests/test_config.py tests/test_training.py tests/test_notebooks.py \
  tests/test_features.py tests/test_quantize.py tests/test_lora.py tests/test_hub.py \
  tests/test_storage.py tests/test_commands.py "$@"
status=$?
echo "colab lane: $(( $(date +%s) - start )) s in all"
exit $status
