"""Offline tools on saved checkpoints: ``dstrain export`` and ``dstrain ckpt``.

    dstrain export CKPT OUT [--dtype bf16|fp16|fp32]    consolidate ZeRO shards into an HF dir
    dstrain ckpt list OUTPUT_DIR                         steps, completeness, sizes
    dstrain ckpt to-universal CKPT [--out DIR]           DeepSpeed universal checkpoint (other world sizes)

These run in one plain process (no ranks): ZeRO-1/2/3 shards are merged by DeepSpeed's
zero_to_fp32 reader, so even ZeRO-3 checkpoints export with every tensor filled.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from trainer.checkpoint import (
    COMPLETE,
    dir_size,
    is_complete,
    list_checkpoints,
    newest_complete,
    save_hf,
    to_universal,
)
from trainer.errors import CheckpointError, DstrainError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def checkpoint_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights from a DeepSpeed checkpoint dir (ZeRO 1-3 shards or a stage-0 file)."""
    if list(ckpt.glob("*optim_states.pt")) and list(ckpt.glob("zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    model_file = ckpt / "mp_rank_00_model_states.pt"
    if not model_file.is_file():
        raise CheckpointError(f"{ckpt} holds no DeepSpeed model states (expected {model_file.name})")
    return torch.load(model_file, map_location="cpu", weights_only=False)["module"]


def export_checkpoint(ckpt: str | Path, out: str | Path, dtype: str = "bf16") -> Path:
    """Rebuild the HF model from ``ckpt``'s config, load the consolidated weights, write ``out``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    ckpt = Path(ckpt)
    if ckpt.is_dir() and not ckpt.name.startswith("step_"):  # an output_dir or checkpoints/ dir
        root = ckpt / "checkpoints" if (ckpt / "checkpoints").is_dir() else ckpt
        ckpt = newest_complete(root) or ckpt
    if not is_complete(ckpt):
        raise CheckpointError(f"{ckpt} is not a complete checkpoint (no {COMPLETE} marker)")
    config = AutoConfig.from_pretrained(ckpt / "hf_config")
    state = {k.removeprefix("module."): v for k, v in checkpoint_state_dict(ckpt).items()}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise CheckpointError(
            f"{ckpt}: weights do not fit the saved architecture (missing {sorted(set(missing) - tied)[:3]}, "
            f"unexpected {unexpected[:3]})"
        )
    if tied:
        model.tie_weights()
    model = model.to(DTYPES[dtype])
    expected = sum(p.numel() for p in model.parameters())
    got = sum(v.numel() for k, v in state.items() if k not in tied)  # a tied head is the embedding
    if got != expected:
        raise CheckpointError(f"{ckpt}: {got} weights in the checkpoint, the model has {expected}")
    tokenizer = AutoTokenizer.from_pretrained(ckpt / "tokenizer")
    return save_hf(model, model.state_dict(), tokenizer, out)


def export_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dstrain export", description="Export a checkpoint to an HF directory."
    )
    parser.add_argument(
        "checkpoint", help="a checkpoints/step_N dir, or an output_dir (its newest complete save)"
    )
    parser.add_argument("out", help="directory to write (safetensors, config, tokenizer, generation config)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out, args.dtype)
    except DstrainError as exc:
        print(f"dstrain: error: {exc}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {out}")
    return 0


def ckpt_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dstrain ckpt", description="List and convert checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", help="steps, completeness and sizes under OUTPUT_DIR/checkpoints")
    ls.add_argument("output_dir")
    uni = sub.add_parser("to-universal", help="convert CKPT for a resume on another world size")
    uni.add_argument("checkpoint")
    uni.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            root = Path(args.output_dir) / "checkpoints"
            rows = [
                {"checkpoint": p.name, "complete": is_complete(p), "mb": round(dir_size(p) / 1e6, 1)}
                for p in list_checkpoints(root)
            ]
            print(
                json.dumps(
                    {
                        "latest": (root / "latest").read_text() if (root / "latest").is_file() else None,
                        "checkpoints": rows,
                    },
                    indent=2,
                )
            )
        else:
            ckpt = Path(args.checkpoint)
            print(to_universal(ckpt, Path(args.out) if args.out else ckpt / "universal"))
    except DstrainError as exc:
        print(f"dstrain: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(export_main())
