#!/usr/bin/env bash
# Fill .wheels/ (git-ignored) on a machine WITH network, for scripts/gpu_check.sh on an air-gapped
# GPU node. The node (Python 3.12, torch 2.11 cu130, transformers, peft, accelerate, pyarrow, rich,
# matplotlib, einops, ninja, psutil) lacks only what is fetched here, about 6 MB:
#
#   bash scripts/gpu_wheels.sh [--python-version 3.12] [--platform manylinux_2_17_x86_64] [--dry-run]
#
# - deepspeed publishes no binary wheel: its sdist is built into a pure-Python wheel with
#   `pip wheel --no-deps --no-build-isolation` (DS_BUILD_OPS=0; its ops JIT-compile on the node
#   when first used, and dstrain's GPU path uses none of them);
# - the rest are fetched without their dependencies, as binary wheels for the target Python and
#   platform: deepspeed's hjson, msgpack, py-cpuinfo and pydantic (with pydantic-core,
#   annotated-types, typing-inspection, typing-extensions), torchdata (the stateful dataloader)
#   and liger-kernel (the fused linear cross-entropy); pip skips any the node already has;
# - .wheels/requirements.txt lists the top-level packages gpu_check.sh installs, pinned to this
#   machine's versions where it has them (the tested ones);
# - ../shared/data's Qwen tokenizer and zh-wiki sample, when present, go to .wheels/data/ (12 MB).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/.wheels"
PY_VERSION=3.12
PLATFORMS=(manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_28_x86_64)
PYTHON="${PYTHON:-python3}"
DRY_RUN=0
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) PY_VERSION="$2"; shift 2 ;;
    --platform) PLATFORMS=("$2"); shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "gpu_wheels: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

TOP=(deepspeed torchdata liger-kernel)
# Their dependencies the node lacks (torch, triton, numpy, requests... it has).
DEPS=(hjson msgpack py-cpuinfo pydantic pydantic-core annotated-types typing-inspection typing-extensions)

pinned() {  # "name==version" when this environment has the package, else "name"
  "$PYTHON" - "$@" <<'PY'
import importlib.metadata as md, sys
for name in sys.argv[1:]:
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        print(name)
PY
}

TARGET=(--only-binary=:all: --python-version "$PY_VERSION" --implementation cp)
for platform in "${PLATFORMS[@]}"; do TARGET+=(--platform "$platform"); done

run() {
  echo "+ $*"
  [ "$DRY_RUN" = 1 ] || "$@"
}

mapfile -t PINNED_TOP < <(pinned "${TOP[@]}")
mapfile -t PINNED_DEPS < <(pinned "${DEPS[@]}")
run mkdir -p "$OUT"
run env DS_BUILD_OPS=0 "$PYTHON" -m pip wheel --no-deps --no-build-isolation --no-binary deepspeed -w "$OUT" "${PINNED_TOP[0]}"
run "$PYTHON" -m pip download "${TARGET[@]}" --no-deps -d "$OUT" "${PINNED_TOP[@]:1}" "${PINNED_DEPS[@]}"
if [ "$DRY_RUN" = 0 ]; then
  printf '%s\n' "${PINNED_TOP[@]}" > "$OUT/requirements.txt"
fi

SHARED="$ROOT/../shared/data"
if [ -d "$SHARED/qwen2.5-0.5b" ] && [ -d "$SHARED/zhwiki-sample" ]; then
  run mkdir -p "$OUT/data"
  run cp -r "$SHARED/qwen2.5-0.5b" "$SHARED/zhwiki-sample" "$OUT/data/"
fi
[ "$DRY_RUN" = 1 ] || { echo "wrote $OUT:"; ls -1 "$OUT"; du -sh "$OUT"; }
