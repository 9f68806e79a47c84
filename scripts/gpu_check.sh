#!/usr/bin/env bash
# The GPU check for an air-gapped node: Python 3.12, a CUDA torch and transformers, no network,
# no deepspeed/torchdata/liger-kernel. Fill .wheels/ first on a networked machine
# (bash scripts/gpu_wheels.sh, about 6 MB of wheels), copy the repo over, then run this once.
# Everything fits in 8 minutes of GPU time: each step's timeout is also cut to what is left of
# --budget (470 s), keeping 15 s for the summary.
#
#   env      device, driver and versions                                 -> env.txt
#   install  the missing packages from .wheels/, offline (a venv that     -> install.log
#            sees the node's torch: --system-site-packages)
#   parity   bf16 loss of packed rows (8 x 4 documents) under eager, sdpa,  -> parity.json
#            flex_attention, flash-attn: each document vs run alone
#   syncs    one train_step under torch.cuda.set_sync_debug_mode, listed  -> syncs.json
#   nccl     a stuck rank under NCCL stops its peer with dstrain's one line -> nccl.log
#   bench    bare loop, HF Trainer, dstrain defaults and best: tokens/s,  -> bench.json
#            MFU, peak memory vs estimate, ratios
#   resume   a bf16 run killed with SIGKILL and resumed                   -> resume.json
#   attn     sdpa vs flex_attention vs flash varlen on packed rows        -> attn.json
#   summary  every figure with the device and the date                    -> summary.md
#   data     (only with --only data) bench_data.py with 0/1/2/4 workers   -> bench_data.json
#
# Usage: bash scripts/gpu_check.sh [--out DIR] [--only STEP,...] [--budget S] [--dry-run] [--cpu-fallback]
#   --dry-run       list the steps and their commands, run nothing
#   --cpu-fallback  the same steps on CPU with a tiny model (no install), to test this script
# A failed step is recorded and the others still run; the exit status is 1 if any failed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/runs/gpu_check/$(date +%Y%m%d-%H%M%S)"
ONLY=""
DRY_RUN=0
CPU=0
BUDGET=470
PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv-gpu"

while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --only) ONLY="$2"; shift 2 ;;
    --budget) BUDGET="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --cpu-fallback) CPU=1; shift ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

STEPS=(env install parity syncs nccl bench resume attn summary data)
declare -A TIMEOUT=([env]=30 [install]=90 [parity]=90 [syncs]=75 [nccl]=45 [bench]=230 [resume]=150 [attn]=90 [summary]=15 [data]=300)
if [ "$CPU" = 1 ]; then
  for step in "${!TIMEOUT[@]}"; do TIMEOUT[$step]=600; done
  BUDGET=3600
fi

wanted() {  # is step $1 to run? --only lists them; by default all but data (and install on --cpu-fallback)
  if [ -n "$ONLY" ]; then
    [[ ",$ONLY," == *",$1,"* ]]
  elif [ "$1" = install ]; then
    [ "$CPU" = 0 ]
  else
    [ "$1" != data ]
  fi
}

# Data: ../shared/data, or a copy that gpu_wheels.sh put in .wheels/data; else bench_gpu.py
# builds the stdlib demo corpus (and bench_data.py uses it too).
DATA_ARGS=()
for dir in "$ROOT/../shared/data" "$ROOT/.wheels/data"; do
  if [ -f "$dir/zhwiki-sample/wikipedia-cn-sample.json" ] && [ -d "$dir/qwen2.5-0.5b" ]; then
    DATA_ARGS=(--input "$dir/zhwiki-sample/wikipedia-cn-sample.json" --tokenizer "$dir/qwen2.5-0.5b" --text-column completion)
    break
  fi
done

FALLBACK=()
[ "$CPU" = 1 ] && FALLBACK=(--cpu-fallback)

quoted() { printf '%q ' "$@"; }

command_for() {  # the shell command of step $2, run with python $1
  local py="$1" data_in
  case "$2" in
    env) quoted "$py" scripts/bench_gpu.py env --out "$OUT"; echo "&& { nvidia-smi || true; echo cores: \$(nproc); free -g; }" ;;
    install)
      quoted "$PYTHON" -m venv --system-site-packages "$VENV"
      echo -n "&& "
      quoted "$VENV/bin/python" -m pip install --no-index --find-links "$ROOT/.wheels" -r "$ROOT/.wheels/requirements.txt" ;;
    parity|syncs|resume|bench|attn) quoted "$py" scripts/bench_gpu.py "$2" --out "$OUT" "${FALLBACK[@]}" "${DATA_ARGS[@]}" ;;
    data)
      data_in=("${DATA_ARGS[@]}")
      [ ${#data_in[@]} -eq 0 ] && data_in=(--input "$OUT/demo-data/train.parquet" --tokenizer "$OUT/demo-data/tokenizer")
      if [ "$CPU" = 1 ]; then
        quoted "$py" scripts/bench_data.py "${data_in[@]}" --cases a,b --workers 0,1 --max-tokens 200000 --json "$OUT/bench_data.json"
      else
        quoted "$py" scripts/bench_data.py "${data_in[@]}" --cases a,b,c,d --workers 0,1,2,4 --epochs 5 --json "$OUT/bench_data.json"
      fi ;;
    nccl) quoted "$py" scripts/check_nccl_stuck_rank.py ;;
    summary) quoted "$py" scripts/bench_gpu.py summary --out "$OUT" ;;
  esac
}

python_for_steps() {
  if [ "$CPU" = 0 ] && [ -x "$VENV/bin/python" ]; then echo "$VENV/bin/python"; else echo "$PYTHON"; fi
}

if [ "$DRY_RUN" = 1 ]; then
  echo "gpu_check: output in $OUT"
  for step in "${STEPS[@]}"; do
    wanted "$step" || continue
    echo "[$step] (timeout ${TIMEOUT[$step]}s) $(command_for "$(python_for_steps)" "$step")"
  done
  exit 0
fi

mkdir -p "$OUT"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
[ "$CPU" = 1 ] && export CUDA_VISIBLE_DEVICES=""
: > "$OUT/steps.tsv"
FAILED=0
CHECK_START=$(date +%s)
for step in "${STEPS[@]}"; do
  wanted "$step" || continue
  if [ "$step" = install ] && [ ! -f "$ROOT/.wheels/requirements.txt" ]; then
    echo "install: $ROOT/.wheels/requirements.txt missing: run scripts/gpu_wheels.sh on a networked machine" | tee "$OUT/install.log"
    printf '%s\t%s\t%s\n' install FAIL 0 >> "$OUT/steps.tsv"
    FAILED=1
    continue
  fi
  cmd="$(command_for "$(python_for_steps)" "$step")"
  log="$OUT/$step.log"
  [ "$step" = env ] && log="$OUT/env.txt"
  # The step's own timeout, cut to what is left of the budget (the summary keeps 15 s).
  left=$(( CHECK_START + BUDGET - $(date +%s) ))
  [ "$step" = summary ] || left=$(( left - 15 ))
  limit=${TIMEOUT[$step]}
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 5 ]; then
    echo "[$step] skipped: the ${BUDGET}s budget is spent" | tee "$log"
    printf '%s\t%s\t%s\n' "$step" "SKIPPED" 0 >> "$OUT/steps.tsv"
    FAILED=1
    continue
  fi
  echo "[$step] (limit ${limit}s) $cmd" | tee "$log"
  start=$(date +%s)
  if timeout --kill-after=10 "$limit" bash -c "$cmd" >> "$log" 2>&1; then status=ok; else status="FAIL($?)"; FAILED=1; fi
  seconds=$(( $(date +%s) - start ))
  printf '%s\t%s\t%s\n' "$step" "$status" "$seconds" >> "$OUT/steps.tsv"
  echo "[$step] $status in ${seconds}s (log: $log)"
done
[ -f "$OUT/summary.md" ] && cat "$OUT/summary.md"
exit "$FAILED"
