#!/usr/bin/env bash
# Installs what the tests need, then runs the whole suite once per Keras
# backend (jax, tensorflow, torch) after ruff, then the Colab lane (tests/colab_lane.sh:
# the built wheel on Colab's TPU-runtime versions, JAX), and prints one total.
#   bash tests/run_all_backends.sh            # everything, slow tests included
#   bash tests/run_all_backends.sh -m "not slow"   # extra args go to pytest
# Set SKIP_INSTALL=1 to use the environment as it is, SKIP_COLAB=1 to leave
# the Colab lane out (it needs Python 3.13).
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
reports=$(mktemp -d)
status=0
for backend in jax tensorflow torch; do
  echo "=== KERAS_BACKEND=$backend ==="
  begin=$(date +%s)
  KERAS_BACKEND=$backend "$PYTHON" -m pytest -q -p no:cacheprovider \
    --junitxml="$reports/$backend.xml" "$@" || status=1
  echo "=== $backend: $(( $(date +%s) - begin )) s ==="
done
if [ "${SKIP_COLAB:-0}" != 1 ]; then
  echo "=== Colab lane: Python 3.13, Colab's TPU-runtime versions, the built wheel, JAX ==="
  PYTHON="$PYTHON" bash tests/colab_lane.sh "$reports/colab.xml" || status=1
fi
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
rm -rf "$reports"
exit $status
