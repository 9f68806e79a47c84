#!/usr/bin/env bash
# Fill .wheels/ (git-ignored) on a machine WITH network, for scripts/gpu_check.sh on an air-gapped
# GPU node that has Python 3.12, a CUDA torch and transformers but not deepspeed, datasets or
# torchdata. Copy the repo with .wheels/ to the node afterwards.
#
#   bash scripts/gpu_wheels.sh [--python-version 3.12] [--platform manylinux_2_17_x86_64] [--dry-run]
#
# - deepspeed publishes no binary wheel: its sdist is built into a pure-Python wheel with
#   `pip wheel --no-deps` (DS_BUILD_OPS=0; its ops JIT-compile on the node when first used);
# - what depends on torch (deepspeed, torchdata, peft, accelerate) is fetched without dependencies,
#   and their other requirements, read from the wheels' metadata, are fetched with theirs: torch,
#   triton, the nvidia-* wheels and transformers (the node has them) are never downloaded;
# - the rest (datasets, pyarrow, rich, matplotlib and their dependencies) as binary wheels for the
#   target Python and platform;
# - .wheels/requirements.txt lists what gpu_check.sh installs (versions pinned to this machine's
#   environment when it has them, the tested ones);
# - ../shared/data's Qwen tokenizer and zh-wiki sample, when present, go to .wheels/data/.
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
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "gpu_wheels: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

TORCH_DEPENDENT=(deepspeed torchdata peft accelerate)
STANDALONE=(datasets pyarrow rich matplotlib)
# The node brings these; a dependency on them is never downloaded.
NODE_HAS='^(torch|triton|transformers|nvidia-.*)$'

pinned() {  # "name==version" when this environment has the package, else "name"
  "$PYTHON" - "$@" <<'EOF'
import importlib.metadata as md, sys
for name in sys.argv[1:]:
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        print(name)
EOF
}

TARGET=(--only-binary=:all: --python-version "$PY_VERSION" --implementation cp)
for platform in "${PLATFORMS[@]}"; do TARGET+=(--platform "$platform"); done

run() {
  echo "+ $*"
  [ "$DRY_RUN" = 1 ] || "$@"
}

mapfile -t TOP < <(pinned "${TORCH_DEPENDENT[@]}" "${STANDALONE[@]}")
DEEPSPEED="${TOP[0]}"
run mkdir -p "$OUT"
run env DS_BUILD_OPS=0 "$PYTHON" -m pip wheel --no-deps --no-binary deepspeed -w "$OUT" "$DEEPSPEED"
run "$PYTHON" -m pip download "${TARGET[@]}" --no-deps -d "$OUT" "${TOP[@]:1:3}"
run "$PYTHON" -m pip download "${TARGET[@]}" -d "$OUT" "${TOP[@]:4}"

# The torch-dependent wheels' own requirements, for the target, minus what the node has.
requirements() {
  "$PYTHON" - "$PY_VERSION" "$NODE_HAS" "$OUT" "${TORCH_DEPENDENT[@]}" <<'EOF'
import re, sys, zipfile
from pathlib import Path
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

py, node_has, out, names = sys.argv[1], re.compile(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:]
target = {"python_version": py, "python_full_version": f"{py}.0", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
          "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
for wheel in sorted(out.glob("*.whl")):
    if canonicalize_name(wheel.name.split("-")[0]) not in {canonicalize_name(n) for n in names}:
        continue
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        for line in z.read(meta).decode().splitlines():
            if not line.startswith("Requires-Dist:"):
                continue
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is not None and not req.marker.evaluate(target):
                continue
            if node_has.match(canonicalize_name(req.name)) or canonicalize_name(req.name) in map(canonicalize_name, names):
                continue
            req.marker = None
            print(req)
EOF
}

if [ "$DRY_RUN" = 1 ]; then
  echo "+ pip download ${TARGET[*]} -d $OUT <the requirements of ${TORCH_DEPENDENT[*]}, from their wheels' metadata>"
else
  mapfile -t DEPS < <(requirements | sort -u)
  echo "requirements of ${TORCH_DEPENDENT[*]}: ${DEPS[*]}"
  [ ${#DEPS[@]} -eq 0 ] || run "$PYTHON" -m pip download "${TARGET[@]}" -d "$OUT" "${DEPS[@]}"
  printf '%s\n' "${TOP[@]}" > "$OUT/requirements.txt"
fi

SHARED="$ROOT/../shared/data"
if [ -d "$SHARED/qwen2.5-0.5b" ] && [ -d "$SHARED/zhwiki-sample" ]; then
  run mkdir -p "$OUT/data"
  run cp -r "$SHARED/qwen2.5-0.5b" "$SHARED/zhwiki-sample" "$OUT/data/"
fi
[ "$DRY_RUN" = 1 ] || { echo "wrote $OUT:"; ls -1 "$OUT"; du -sh "$OUT"; }
