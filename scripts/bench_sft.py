"""Benchmark SFT data: supervised ("useful") tokens per second packed vs padded, and slot efficiency.

Datasets (../shared/data, Qwen2.5 tokenizer and its chat template):

  alpaca-zh   1,000 rows, ``data.format: alpaca``
  medical-o1  198 rows, ``data.format: template``, prompt ``{Question}``, response
              ``<think>\\n{Complex_CoT}\\n</think>\\n\\n{Response}``

Modes, each at every ``--max-seq-len``, micro-batch ``--micro-batch-size``, 1 rank, 0 workers:

  packed      ``data.pack: true``: whole samples, a row topped up from a window of
              ``SFT_PACK_WINDOW`` set-aside samples (the pipeline's policy)
  packed-w0   the same with window 0: a sample that does not fit closes its row
  padded      ``data.pack: false``: one sample per row, each batch padded to its longest row

Figures per case, over ``--epochs`` epochs of the pipeline:

  slot efficiency   real tokens / slots of the rows that hold samples (row width x rows): what
                    packing or padding wastes. The filler rows that complete a shard's last batch
                    are left out: they come from the epoch's end, whatever the policy, and weigh
                    a lot on a 198-row file (the "incl. filler" figure keeps them)
  supervised share  supervised tokens / the same slots (supervised: labels[:, 1:] !=
                    IGNORE_INDEX, what the loss is taken on)
  data sup tok/s    supervised tokens / seconds iterating the pipeline (formatting, chat template,
                    tokenizer, shuffle, pack)
  step sup tok/s    (``--model-steps N``) supervised tokens / seconds of forward + backward of a
                    small Qwen2 (hidden 128, 2 layers, sdpa, fp32, 1 thread) on the first N
                    micro-batches, each timed ``--repeats`` times and the fastest kept (the machine
                    is shared); token ids are folded into an 8k vocabulary so the LM head does not
                    dominate.
                    On CPU a step costs about its slots, so this tracks the supervised share; on
                    a GPU with flash-attention varlen the packed figure is what to look at.

    python scripts/bench_sft.py                                  # all cases, data side only
    python scripts/bench_sft.py --model-steps 6 --json sft.json  # with training steps

Run it with the project installed (``scripts/env.sh``) or ``PYTHONPATH=.``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
DATASETS: dict[str, dict[str, Any]] = {
    "alpaca-zh": {
        "path": SHARED_DATA / "llamafactory-alpaca-zh-demo" / "alpaca_zh_demo.json",
        "config": {"format": "alpaca"},
    },
    "medical-o1": {
        "path": SHARED_DATA / "medical-o1-huatuogpt-demo" / "demo_data.json",
        "config": {
            "format": "template",
            "prompt_template": "{Question}",
            "response_template": "<think>\n{Complex_CoT}\n</think>\n\n{Response}",
        },
    },
}
MODES = ("packed", "packed-w0", "padded")
FOLDED_VOCAB = 8192


def run_case(dataset: str, mode: str, max_seq_len: int, args: argparse.Namespace, tokenizer: Any) -> dict:
    import trainer.data.stream as stream
    from trainer.data import build_train_data
    from trainer.data.config import DataConfig
    from trainer.data.packing import IGNORE_INDEX, SFT_PACK_WINDOW
    from trainer.dist import DistInfo

    spec = DATASETS[dataset]
    cfg = DataConfig(
        train=[str(spec["path"])],
        max_seq_len=max_seq_len,
        pack=mode != "padded",
        num_workers=0,
        validation_fraction=0.0,
        buffer_size=args.buffer_size,
        **spec["config"],
    )
    # packed-w0: the stream builds its packer with stream.SFT_PACK_WINDOW when an epoch starts.
    stream.SFT_PACK_WINDOW = 0 if mode == "packed-w0" else SFT_PACK_WINDOW
    try:
        data = build_train_data(cfg, tokenizer, DistInfo(), seed=0, micro_batch_size=args.micro_batch_size)
        batches, started = [], time.perf_counter()
        for _ in range(args.epochs):
            batches.extend(data)
        seconds = time.perf_counter() - started
    finally:
        stream.SFT_PACK_WINDOW = SFT_PACK_WINDOW
    all_slots = sum(b["input_ids"].numel() for b in batches)
    slots = sum(int((b["doc_ids"] >= 0).any(dim=1).sum()) * b["input_ids"].shape[1] for b in batches)
    real = sum(int((b["doc_ids"] >= 0).sum()) for b in batches)
    supervised = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    stats = data.last_epoch or {}
    result = {
        "dataset": dataset,
        "mode": mode,
        "max_seq_len": max_seq_len,
        "micro_batch_size": args.micro_batch_size,
        "epochs": args.epochs,
        "batches": len(batches),
        "slots": slots,
        "real_tokens": real,
        "supervised_tokens": supervised,
        "slot_efficiency": round(real / slots, 4),
        "slot_efficiency_incl_filler": round(real / all_slots, 4),
        "supervised_share": round(supervised / slots, 4),
        "data_seconds": round(seconds, 3),
        "data_supervised_tokens_per_s": round(supervised / seconds, 1),
        "data_tokens_per_s": round(real / seconds, 1),
        "truncated_per_epoch": stats.get("truncated_docs"),
        "dropped_per_epoch": stats.get("no_target_docs"),
    }
    if args.model_steps:
        result.update(time_steps(batches[: args.model_steps], args.repeats))
    return result


def time_steps(batches: list[dict], repeats: int) -> dict:
    """Forward + backward of a small Qwen2 on these micro-batches: the fastest of ``repeats`` each."""
    import torch
    import torch.nn.functional as F
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from trainer.data.packing import IGNORE_INDEX

    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = Qwen2Config(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=352,
        vocab_size=FOLDED_VOCAB,
        max_position_embeddings=8192,
        use_cache=False,
    )
    model = Qwen2ForCausalLM._from_config(config, attn_implementation="sdpa", torch_dtype=torch.float32)

    def step(batch: dict) -> None:
        ids = batch["input_ids"] % FOLDED_VOCAB
        labels = torch.where(batch["labels"] == IGNORE_INDEX, IGNORE_INDEX, batch["labels"] % FOLDED_VOCAB)
        kwargs = {"position_ids": batch["position_ids"]}
        if "attention_mask" in batch:
            kwargs["attention_mask"] = batch["attention_mask"]
        logits = model(input_ids=ids, use_cache=False, **kwargs).logits
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, FOLDED_VOCAB), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
        )
        loss.backward()
        model.zero_grad(set_to_none=True)

    seconds = 0.0
    for batch in batches:
        fastest = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            step(batch)
            fastest = min(fastest, time.perf_counter() - started)
        seconds += fastest
    supervised = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    return {
        "model_steps": len(batches),
        "step_seconds": round(seconds / len(batches), 4),
        "step_supervised_tokens_per_s": round(supervised / seconds, 1),
    }


def print_table(results: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="SFT data: packed vs padded (1 rank, 0 workers)")
    columns = [
        "dataset",
        "T",
        "mode",
        "batches",
        "slot eff.",
        "incl. filler",
        "sup. share",
        "data sup tok/s",
        "step sup tok/s",
    ]
    for col in columns:
        table.add_column(col, justify="left" if col in ("dataset", "mode") else "right")
    for r in results:
        table.add_row(
            r["dataset"],
            str(r["max_seq_len"]),
            r["mode"],
            str(r["batches"]),
            f"{r['slot_efficiency']:.3f}",
            f"{r['slot_efficiency_incl_filler']:.3f}",
            f"{r['supervised_share']:.3f}",
            f"{r['data_supervised_tokens_per_s']:,.0f}",
            f"{r['step_supervised_tokens_per_s']:,.0f}" if "step_supervised_tokens_per_s" in r else "",
        )
    Console(width=None if sys.stdout.isatty() else 160).print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokenizer", type=Path, default=SHARED_DATA / "qwen2.5-0.5b")
    parser.add_argument(
        "--datasets", default=",".join(DATASETS), help="Comma-separated: alpaca-zh, medical-o1."
    )
    parser.add_argument(
        "--modes", default=",".join(MODES), help="Comma-separated: packed, packed-w0, padded."
    )
    parser.add_argument("--max-seq-len", default="512,1024,2048", help="Comma-separated sequence lengths.")
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--buffer-size", type=int, default=1000, help="data.buffer_size (samples).")
    parser.add_argument("--epochs", type=int, default=1, help="Pipeline epochs per case (timed together).")
    parser.add_argument("--model-steps", type=int, default=0, help="Also time N training steps per case.")
    parser.add_argument(
        "--repeats", type=int, default=3, help="Timings per training step (the fastest counts)."
    )
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    missing = [str(DATASETS[d]["path"]) for d in args.datasets.split(",") if not DATASETS[d]["path"].exists()]
    if missing or not args.tokenizer.exists():
        parser.error(f"missing {', '.join(missing + [str(args.tokenizer)])} (../shared/data)")

    from trainer.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(args.tokenizer))
    results = []
    for dataset in args.datasets.split(","):
        for max_seq_len in (int(t) for t in args.max_seq_len.split(",")):
            for mode in args.modes.split(","):
                result = run_case(dataset, mode, max_seq_len, args, tokenizer)
                results.append(result)
                print(json.dumps(result), flush=True)
    print_table(results)
    if args.json:
        payload = {
            "config": {k: str(v) for k, v in vars(args).items()},
            "cpu_count": os.cpu_count(),
            "results": results,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
