#!/usr/bin/env bash
# Runs the test suite; pytest's exit code 5 ("no tests collected") is not a failure of the code.
set -uo pipefail
cd "$(dirname "$0")/.."
.venv/bin/pytest "$@"
rc=$?
if [ $rc -eq 5 ]; then echo "pytest: no tests collected"; exit 0; fi
exit $rc
