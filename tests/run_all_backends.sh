#!/usr/bin/env bash
# Installs what the tests need, then runs the whole suite once per Keras
# backend (jax, tensorflow, torch) after ruff, then the Colab lane (tests/colab_lane.sh:
# the built wheel on Colab's TPU-runtime versions, JAX), and prints one total.
#   bash tests/run_all_backends.sh            # everything, slow tests included
#   bash tests/run_all_backends.sh -m "not slow"   # extra args go to pytest
# Set SKIP_INSTALL=1 to use the environment as it is, SKIP_COLAB=1 to leave
# the Colab lane out (it needs Python 3.13), JOBS=1 to run the passes one
# after another, REPORTS_DIR to a new folder to keep each pass's junit file
# and log there (benchmarks/ci_times.py tabulates where the time went).
#
# Two streams run side by side (JOBS=2, the default on 2 or more cores):
# jax then torch, and tensorflow then the Colab lane (whose set-up runs
# beside the tensorflow pass). A pass spends much
# of its time in one thread (Python, XLA compiling small programs, the
# lane's pip install), so two of them share 2 cores at about 1.3x the
# throughput of one. Each pass writes its own log, printed when it ends,
# and its own pytest temporary folder.
#
# XLA's persistent compilation caches are on, in a folder new for each run
# (entries are keyed by the program and the library version, so nothing
# stale is reused): JAX's, and TensorFlow's (TF_XLA_FLAGS'
# --tf_xla_persistent_cache_directory). The tests compile the same small
# training steps many times, in-process and in the train.py and notebook
# processes they start, and a hit skips XLA: a JAX training-test subset
# took 102 s without, 81 s from an empty cache; a TensorFlow one 162 s from
# an empty cache and 70 s from a full one. It changes no result: a hit is a
# program this run compiled.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  # Install the torch CPU build first where you can (see README): the extra's
  # range then installs nothing more.
  "$PYTHON" -m pip install -q -e ".[all,test]" || exit 1
fi
# The linter first: its configuration is pyproject.toml's [tool.ruff].
echo "=== ruff ==="
"$PYTHON" -m ruff check . || exit 1
if [ -n "${REPORTS_DIR:-}" ]; then
  # New or empty: the compilation caches below must start empty.
  if [ -n "$(ls -A "$REPORTS_DIR" 2>/dev/null)" ]; then
    echo "error: REPORTS_DIR=$REPORTS_DIR is not empty: name a new folder" >&2
    exit 1
  fi
  mkdir -p "$REPORTS_DIR" || exit 1
  reports=$(cd "$REPORTS_DIR" && pwd)
else
  reports=$(mktemp -d)
fi
export JAX_COMPILATION_CACHE_DIR="$reports/jax-cache"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=-1
mkdir -p "$reports/tf-xla-cache"
export TF_XLA_FLAGS="${TF_XLA_FLAGS:+$TF_XLA_FLAGS }--tf_xla_persistent_cache_directory=$reports/tf-xla-cache"
# PyTorch's OpenMP threads wait for work by spinning: where the other
# stream keeps a core busy, they burn it instead of yielding it. With one
# core kept busy by another process, the quickstart notebook's PyTorch run
# took 160 s spinning and 26 s waiting passively; alone, 17 s either way.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
# The JAX pass leaves the Colab lane's tests of the Colab user's path (the
# notebooks, the installed command, a run in a bucket, train.py's errors and
# preemption) to the lane, which runs them on JAX too (tests/conftest.py's
# `in_the_colab_lane`).
[ "${SKIP_COLAB:-0}" != 1 ] && export KERAS_MIXER_COLAB_LANE_RUNS=1
jobs=${JOBS:-$( [ "$(nproc 2>/dev/null || echo 1)" -ge 2 ] && echo 2 || echo 1 )}
begin_all=$(date +%s)

run_pass() {  # backend [pytest args...]: one pass, its log and status in $reports
  local backend=$1 begin
  shift
  begin=$(date +%s)
  KERAS_BACKEND=$backend "$PYTHON" -m pytest -q -p no:cacheprovider --durations=15 \
    --basetemp="$reports/tmp-$backend" --junitxml="$reports/$backend.xml" "$@" \
    > "$reports/$backend.log" 2>&1
  echo $? > "$reports/$backend.status"
  echo "=== $backend: $(( $(date +%s) - begin )) s ===" >> "$reports/$backend.log"
}

setup_colab() {  # the lane's wheel and environment
  if [ "${SKIP_COLAB:-0}" != 1 ]; then
    COLAB_LANE_STEP=setup PYTHON="$PYTHON" bash tests/colab_lane.sh > "$reports/colab-setup.log" 2>&1
    echo $? > "$reports/colab-setup.status"
  fi
}

run_colab() {
  local begin
  begin=$(date +%s)
  if [ "${SKIP_COLAB:-0}" != 1 ]; then
    echo "=== Colab lane: Python 3.13, Colab's TPU-runtime versions, the built wheel, JAX ===" \
      > "$reports/colab.log"
    if [ ! -f "$reports/colab-setup.status" ]; then setup_colab; fi
    cat "$reports/colab-setup.log" >> "$reports/colab.log"
    if [ "$(cat "$reports/colab-setup.status")" = 0 ]; then
      COLAB_LANE_STEP=test PYTHON="$PYTHON" bash tests/colab_lane.sh "$reports/colab.xml" \
        --basetemp="$reports/tmp-colab" >> "$reports/colab.log" 2>&1
      echo $? > "$reports/colab.status"
    else
      cp "$reports/colab-setup.status" "$reports/colab.status"
    fi
    echo "=== Colab lane: $(( $(date +%s) - begin )) s (its set-up: the line above) ===" >> "$reports/colab.log"
  fi
}

show() {  # name: the pass's log, once it has ended (one stream prints at a time)
  (
    flock 9
    echo "=== KERAS_BACKEND=$1 ===" | sed 's/KERAS_BACKEND=colab/Colab lane/'
    cat "$reports/$1.log" 2>/dev/null
  ) 9> "$reports/.show.lock"
}

if [ "$jobs" -ge 2 ]; then
  echo "=== two streams: jax then torch, and tensorflow then the Colab lane ==="
  ( run_pass jax "$@"; show jax; run_pass torch "$@"; show torch ) &
  first=$!
  # The lane's set-up (a pip install: 102 s, 68 s of it on a CPU, alone)
  # overlaps the tensorflow pass; after the pass it was 118 s of this
  # stream's time.
  ( setup_colab & setup=$!
    run_pass tensorflow "$@"; show tensorflow
    wait $setup; run_colab; [ -f "$reports/colab.log" ] && show colab ) &
  second=$!
  wait $first $second
else
  for backend in jax tensorflow torch; do
    run_pass "$backend" "$@"
    show "$backend"
  done
  run_colab
  [ -f "$reports/colab.log" ] && show colab
fi

status=0
for name in jax tensorflow torch colab; do
  if [ -f "$reports/$name.status" ] && [ "$(cat "$reports/$name.status")" != 0 ]; then
    echo "FAILED: $name (exit status $(cat "$reports/$name.status"))"
    status=1
  fi
done
for backend in jax tensorflow torch; do
  [ -f "$reports/$backend.status" ] || { echo "FAILED: $backend did not run"; status=1; }
done
"$PYTHON" - "$reports" <<'PY'
import pathlib, sys, xml.etree.ElementTree as ET
totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
for report in sorted(pathlib.Path(sys.argv[1]).glob("*.xml")):
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in totals}
    print(f"{report.stem}: {counts}")
    for k in totals:
        totals[k] += counts[k]
failed = totals["failures"] + totals["errors"]
passed = totals["tests"] - failed - totals["skipped"]
print(f"total: {passed} passed, {failed} failed, {totals['skipped']} skipped")
PY
echo "=== all passes: $(( $(date +%s) - begin_all )) s (JOBS=$jobs) ==="
if [ -n "${REPORTS_DIR:-}" ]; then
  rm -rf "$reports"/*-cache "$reports"/tmp-* "$reports"/.show.lock
  echo "junit files and logs kept in $reports: python benchmarks/ci_times.py $reports"
else
  rm -rf "$reports"
fi
exit $status
