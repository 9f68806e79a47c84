# Sourced by demo.sh and test.sh: create .venv if missing and install the project into it.
# torch: kept if already importable; otherwise DSTRAIN_TORCH (default torch==2.13.0) is installed
# first, so `pip install -e .` never swaps it for another build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[env] creating .venv"
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
STAMP=.venv/.dstrain-installed
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  python -m pip install -q --upgrade pip
  if ! python -c "import torch" 2>/dev/null; then
    echo "[env] installing ${DSTRAIN_TORCH:-torch==2.13.0}"
    python -m pip install -q "${DSTRAIN_TORCH:-torch==2.13.0}"
  fi
  echo "[env] installing dstrain and its dependencies"
  python -m pip install -q -e ".[dev]"
  touch "$STAMP"
fi
export TOKENIZERS_PARALLELISM=false
