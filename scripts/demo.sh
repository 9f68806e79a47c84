#!/usr/bin/env bash
# Quick start: build a corpus + tokenizer from the Python stdlib, pretrain a tiny Qwen2 model
# with ZeRO-2 (2 CPU ranks, or every GPU), evaluate, export to runs/demo/hf and show what the
# model writes when given a prompt.
set -euo pipefail
. "$(dirname "$0")/env.sh"
if [ ! -f runs/demo/data/train.parquet ] || [ ! -f runs/demo/data/tokenizer/tokenizer.json ]; then
  python scripts/make_demo_data.py --out runs/demo/data
fi
if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
else
  GPUS=2
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # one thread per CPU rank
fi
rm -f runs/demo/metrics.jsonl runs/demo/samples.jsonl runs/demo/train.log
dstrain run demo --gpus "$GPUS" "$@"
echo
python -m trainer.generate runs/demo
echo
echo "demo done: runs/demo/hf (model), runs/demo/metrics.jsonl, runs/demo/loss_curve.png, runs/demo/samples.jsonl"
