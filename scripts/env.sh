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
# DeepSpeed JIT-builds its CPU ops into TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions,
# shared by every environment of the user): two venvs on one machine would rebuild the same op
# over each other's build while ranks of the other wait on its lock. One build dir per venv.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$ROOT/.venv/torch_extensions}"
STAMP=.venv/.dstrain-installed
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  LOG=.venv/install.log
  : > "$LOG"
  quiet() { "$@" >>"$LOG" 2>&1 || { tail -n 40 "$LOG"; echo "[env] failed: $* (full log: $LOG)"; exit 1; }; }
  quiet python -m pip install --upgrade pip
  if ! python -c "import torch" 2>/dev/null; then
    echo "[env] installing ${DSTRAIN_TORCH:-torch==2.13.0}"
    quiet python -m pip install "${DSTRAIN_TORCH:-torch==2.13.0}"
  fi
  echo "[env] installing dstrain, its dependencies and the trackers (log: $LOG)"
  quiet python -m pip install -e ".[dev,track]"
  echo "[env] building DeepSpeed's CPU ops (first time on a machine: about 2 minutes)"
  quiet python scripts/build_ops.py
  touch "$STAMP"
fi
export TOKENIZERS_PARALLELISM=false
