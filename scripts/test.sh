#!/usr/bin/env bash
# Run the test suite in the project's .venv (created and installed on first use).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/unit -k config`.
set -euo pipefail
. "$(dirname "$0")/env.sh"
python -m pytest -q --durations=15 "${@:-tests}"
