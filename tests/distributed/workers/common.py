"""Pieces shared by the distributed workers and the single-process reference in pytest."""

from __future__ import annotations

import torch

from trainer.config import JobConfig, build_config
from trainer.data.packing import IGNORE_INDEX

VOCAB = 128
SEQ = 24


def tiny_job(
    stage: int, micro: int, accum: int, steps: int = 10, zero: dict | None = None, **optim: object
) -> JobConfig:
    return build_config(
        base={
            "tokenizer": "unused",
            "optim": {"lr": 3e-3, "weight_decay": 0.1, "max_grad_norm": 1.0, **optim},
            "schedule": {"name": "cosine", "warmup_steps": 3, "min_lr_ratio": 0.1},
            "train": {"micro_batch_size": micro, "grad_accum": accum, "max_steps": steps},
            "zero": {"stage": stage, **(zero or {})},
        }
    )


def padded_batch(rows: list[list[int]]) -> dict[str, torch.Tensor]:
    """Right-pad variable-length rows; labels IGNORE_INDEX and attention_mask 0 on padding."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "position_ids": positions}


def global_rows(step: int, world: int, rows_per_rank: int) -> list[list[list[int]]]:
    """Variable-length token rows per rank for one optimizer step, deterministic in ``step``."""
    gen = torch.Generator().manual_seed(1000 + step)
    out = []
    for _ in range(world):
        rank_rows = []
        for _ in range(rows_per_rank):
            length = int(torch.randint(4, SEQ + 1, (1,), generator=gen))
            start = int(torch.randint(1, VOCAB, (1,), generator=gen))
            stride = int(torch.randint(1, 4, (1,), generator=gen))
            # Learnable rows (arithmetic sequences mod VOCAB), so a falling loss proves learning.
            rank_rows.append([1 + (start + k * stride) % (VOCAB - 1) for k in range(length)])
        out.append(rank_rows)
    return out


def micro_batches(rows: list[list[int]], micro: int) -> list[dict[str, torch.Tensor]]:
    return [padded_batch(rows[i : i + micro]) for i in range(0, len(rows), micro)]
