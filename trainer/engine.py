"""Build the DeepSpeed engine from the job: ZeRO config, optimizer, LR schedule."""

from __future__ import annotations

from typing import Any

import deepspeed
import torch

from trainer.config import JobConfig
from trainer.ds_config import Precision, build_ds_config
from trainer.optim import build_optimizer, make_scheduler, param_groups


def build_engine(
    job: JobConfig,
    model: torch.nn.Module,
    precision: Precision,
    on_gpu: bool,
    total_steps: int,
    load_universal: bool = False,
) -> tuple[Any, dict[str, Any]]:
    """deepspeed.initialize with the generated ZeRO config; returns (engine, ds_config).

    When the config has an ``optimizer`` block (CPU-offloaded Adam, or DeepSpeed's Muon)
    DeepSpeed builds the optimizer from our param groups; otherwise we pass a torch AdamW.
    Either way the LR schedule is ours (a LambdaLR over ``trainer.optim.lr_factor``).
    ``load_universal`` prepares the engine to load a universal checkpoint (another world size).
    """
    ds_config = build_ds_config(job, precision=precision, on_gpu=on_gpu)
    if load_universal:  # resuming a checkpoint saved by another world size
        ds_config["checkpoint"] = {"load_universal": True}
    if "optimizer" in ds_config:
        optimizer, parameters = None, param_groups(model, job.optim)
    else:
        optimizer, parameters = build_optimizer(model, job.optim), None
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=parameters,
        optimizer=optimizer,
        lr_scheduler=lambda opt: make_scheduler(opt, total_steps, job.schedule),
        config=ds_config,
    )
    return engine, ds_config
