"""Peak memory of the chunked loss (``trainer.loss``) against the plain full-logits loss, on CPU.

One forward + backward of the loss alone (the head's matmul and cross-entropy over ``--tokens``
target tokens, vocabulary ``--vocab``), at the head widths of real models (896: Qwen2.5-0.5B,
3584: Qwen2.5-7B), each case in a fresh process. The figure is the growth of the process's peak
RSS (VmHWM, reset after a warm-up that loads the kernels and allocates the weight's gradient),
with glibc's mmap threshold pinned at 64 KiB so RSS follows live tensors.

    plain    ``F.linear`` -> logits -> ``.float()`` -> ``cross_entropy(reduction="sum")`` against the
             shifted labels: dstrain's ``model.loss: plain`` (``trainer.loss.summed_loss``'s formula)
    chunked  ``trainer.loss.linear_cross_entropy_sum``: logits of one chunk of tokens at a time,
             recomputed in backward, an fp32 accumulator for the head's weight gradient

Precisions (``--dtypes``): ``fp32``; ``bf16`` (weight and hidden states in bf16, as DeepSpeed's
``bf16.enabled`` makes them); ``autocast`` (fp32 weight, bf16 autocast: how a bare loop, HF Trainer
and DeepSpeed's ``torch_autocast`` run bf16).

    python scripts/bench_loss_memory.py                      # 896 and 3584, fp32/bf16/autocast
    python scripts/bench_loss_memory.py --widths 896 --dtypes bf16 --json loss_mem.json

Slow on 2 CPU cores (the 3584 cases are several TFLOP each): 20 minutes or more of CPU time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the tree this script lives in, with or without an install
    sys.path.insert(0, str(REPO))

DTYPES = ("fp32", "bf16", "autocast")


def rss(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def child(path: str, dtype: str, vocab: int, tokens: int, width: int) -> dict[str, Any]:
    """One forward + backward in this (fresh) process: its peak RSS growth."""
    import torch
    import torch.nn.functional as F

    from trainer.loss import IGNORE_INDEX, chunk_rows_for, linear_cross_entropy_sum, shift_labels

    torch.manual_seed(0)
    storage = torch.bfloat16 if dtype == "bf16" else torch.float32
    weight = (torch.randn(vocab, width) * 0.02).to(storage).requires_grad_()
    hidden = torch.randn(1, tokens, width).to(storage).requires_grad_()
    labels = torch.randint(0, vocab, (1, tokens))

    def run(h: torch.Tensor, lab: torch.Tensor) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "autocast"):
            targets = shift_labels(lab)
            if path == "plain":
                logits = F.linear(h, weight)
                loss = F.cross_entropy(
                    logits.flatten(0, 1).float(),
                    targets.flatten(),
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                )
            else:
                loss = linear_cross_entropy_sum(h, weight, targets)
        loss.backward()
        return float(loss)

    run(hidden[:, :8], labels[:, :8])  # load the kernels, allocate weight.grad
    hidden.grad = None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    base = rss("VmRSS:")
    started = time.perf_counter()
    loss = run(hidden, labels)
    return {
        "loss_per_token": loss / (tokens - 1),
        "peak_bytes": rss("VmHWM:") - base,
        "seconds": time.perf_counter() - started,
        "chunk_rows": chunk_rows_for(vocab),
    }


def measure(path: str, dtype: str, args: argparse.Namespace) -> dict[str, Any]:
    env = dict(
        os.environ,
        MALLOC_MMAP_THRESHOLD_="65536",
        OMP_NUM_THREADS=str(args.threads),
        PYTHONPATH=str(REPO),
        CUDA_VISIBLE_DEVICES="",
    )
    cmd = [
        sys.executable,
        __file__,
        "--child",
        path,
        dtype,
        str(args.vocab),
        str(args.tokens),
        str(args.width),
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if out.returncode != 0:
        raise SystemExit(f"{path}/{dtype} at width {args.width} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--child", nargs=5, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--widths", default="896,3584", help="Head widths (hidden sizes), comma-separated.")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help=f"From {', '.join(DTYPES)}.")
    parser.add_argument("--vocab", type=int, default=151_936, help="Vocabulary (Qwen2.5: 151,936).")
    parser.add_argument("--tokens", type=int, default=2048, help="Target tokens in the batch.")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per case.")
    parser.add_argument("--timeout", type=float, default=1800, help="Seconds per case.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the figures here.")
    args = parser.parse_args(argv)
    if args.child:
        path, dtype, vocab, tokens, width = args.child
        print(json.dumps(child(path, dtype, int(vocab), int(tokens), int(width))))
        return 0
    dtypes = [d.strip() for d in args.dtypes.split(",")]
    if any(d not in DTYPES for d in dtypes):
        parser.error(f"--dtypes: choose from {', '.join(DTYPES)}")
    rows = []
    print(
        f"vocab {args.vocab:,}, {args.tokens} tokens; peak RSS growth of one forward + backward of the loss"
    )
    print(
        f"{'width':>6s} {'dtype':9s} {'plain MiB':>10s} {'chunked MiB':>12s} {'plain/chunked':>14s} {'|dloss|/tok':>12s}"
    )
    for width in (int(w) for w in args.widths.split(",")):
        args.width = width
        for dtype in dtypes:
            plain, chunked = measure("plain", dtype, args), measure("chunked", dtype, args)
            row = {
                "width": width,
                "dtype": dtype,
                "plain": plain,
                "chunked": chunked,
                "ratio": plain["peak_bytes"] / chunked["peak_bytes"],
            }
            rows.append(row)
            diff = abs(plain["loss_per_token"] - chunked["loss_per_token"])
            print(
                f"{width:6d} {dtype:9s} {plain['peak_bytes'] / 2**20:10,.0f} {chunked['peak_bytes'] / 2**20:12,.0f} "
                f"{row['ratio']:13.2f}x {diff:12.1e}",
                flush=True,
            )
    if args.json:
        args.json.write_text(
            json.dumps({"vocab": args.vocab, "tokens": args.tokens, "rows": rows}, indent=1) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
