"""Checkpoints and exports.

This module owns the on-disk layout under ``<output_dir>``: ``hf/`` (the Hugging Face
export). Full engine checkpoints and ``--resume`` plug in here.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from trainer.dist import DistInfo

log = logging.getLogger("dstrain")


def consolidated_state_dict(engine: Any) -> dict[str, torch.Tensor] | None:
    """The full model weights on rank 0 (None elsewhere); every rank must call this.

    Under ZeRO-3 the parameters are partitioned, so they are gathered layer by layer through
    DeepSpeed (needs ``stage3_gather_16bit_weights_on_model_save``); a rank-0-only gather hangs.
    """
    if engine.zero_optimization_partition_weights():
        return engine._zero3_consolidated_16bit_state_dict()
    if engine.global_rank != 0:
        return None
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}


def export_hf(engine: Any, tokenizer: Any, out_dir: str | Path, dist: DistInfo) -> Path:
    """Write safetensors, config, generation config and tokenizer to ``out_dir``.

    Collective: every rank calls it. Rank 0 writes into ``<out_dir>.tmp`` and renames, so a
    crash never leaves a half-written export under the final name.
    """
    out = Path(out_dir)
    state = consolidated_state_dict(engine)
    if dist.is_main:
        assert state is not None
        empty = [k for k, v in state.items() if v.numel() == 0]
        assert not empty, f"export would write empty tensors: {empty[:3]}"
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model = engine.module
        use_cache = model.config.use_cache
        model.config.use_cache = True  # exported for inference
        try:
            model.save_pretrained(tmp, state_dict=state)
        finally:
            model.config.use_cache = use_cache
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.replace(out)
        log.info("exported Hugging Face model to %s", out)
    if dist.world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return out
