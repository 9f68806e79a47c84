"""One deepspeed launch, the pretrained-model checks; each rank writes rank<N>.json.

Argument: a work dir holding ``base/`` (a tiny Qwen2 saved with save_pretrained, with its
tokenizer). For ZeRO-3: the model built by ``build_model`` for cpt is partitioned as it loads.
For LoRA (r 4, all linear layers, gradient checkpointing) on ZeRO-2 and ZeRO-3: a few steps,
then the gathered weights (base unchanged? adapters moved?), the engine's logits on a probe,
the live adapter export, a LoRA checkpoint and a full one (sizes).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from tests.distributed.workers.common import global_rows, micro_batches
from tests.launch import worker_args
from trainer.checkpoint import Checkpointer, dir_size
from trainer.config import build_config
from trainer.dist import DistInfo, all_reduce_sum, init_distributed
from trainer.ds_config import build_ds_config
from trainer.engine import build_engine
from trainer.export import consolidated_state_dict, export_live
from trainer.model import build_model
from trainer.tokenizer import load_tokenizer
from trainer.train_module import TrainModule, target_count

STEPS = 4
PROBE = torch.arange(1, 25).view(2, 12)


def job_for(work: Path, stage: int, lora: bool):
    return build_config(
        base={
            "stage": "cpt",
            "output_dir": str(work / f"run_z{stage}_{'lora' if lora else 'full'}"),
            "model": {"name_or_path": str(work / "base"), "gradient_checkpointing": True},
            "optim": {"lr": 1e-2, "weight_decay": 0.0},
            "schedule": {"name": "constant", "warmup_steps": 0},
            "train": {"micro_batch_size": 2, "grad_accum": 2, "max_steps": STEPS},
            "zero": {"stage": stage},
            "lora": {"enabled": lora, "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"},
        }
    )


def build(work: Path, dist: DistInfo, stage: int, lora: bool):
    job = job_for(work, stage, lora)
    tokenizer = load_tokenizer(str(work / "base"))
    ds_config = build_ds_config(job, "fp32", on_gpu=False)
    torch.manual_seed(0)
    model = build_model(job, tokenizer, "fp32", False, ds_config)
    params = [p for n, p in model.named_parameters() if "lora_" not in n]
    partitioned = [hasattr(p, "ds_id") and p.numel() == 0 for p in params]
    return job, tokenizer, ds_config, model, partitioned


def train(dist: DistInfo, engine, steps: int) -> list[float]:
    module, losses = TrainModule(engine, dist), []
    for step in range(steps):
        batches = micro_batches(global_rows(step, dist.world_size, rows_per_rank=4)[dist.rank], 2)
        (targets,) = all_reduce_sum([sum(target_count(b) for b in batches)], dist)
        result = module.train_step(batches, int(targets))
        (loss_sum,) = all_reduce_sum([float(result.loss_sum)], dist)
        losses.append(loss_sum / targets)
    return losses


def main() -> None:
    (arg,) = worker_args(sys.argv)
    work = Path(arg)
    dist = DistInfo.from_env()
    init_distributed(dist)
    result: dict = {}

    # cpt on ZeRO-3: partitioned as it loads, before deepspeed.initialize; a full checkpoint.
    job, tokenizer, ds_config, model, partitioned = build(work, dist, 3, lora=False)
    result["cpt_z3_partitioned"] = [sum(partitioned), len(partitioned)]
    engine = build_engine(job, model, ds_config, STEPS)
    result["cpt_z3_first_loss"] = train(dist, engine, 1)[0]
    full = Checkpointer(job.output_dir, dist, engine, shared={}, per_rank={}, keep_last=0).save(1)
    result["full_ckpt_bytes"] = dir_size(full)

    for stage in (2, 3):
        job, tokenizer, ds_config, model, partitioned = build(work, dist, stage, lora=True)
        result[f"lora_z{stage}_partitioned"] = [sum(partitioned), len(partitioned)]
        engine = build_engine(job, model, ds_config, STEPS)
        losses = train(dist, engine, STEPS)
        state = consolidated_state_dict(engine)
        engine.eval()
        with torch.no_grad():
            logits = engine(input_ids=PROBE).logits
        export_live(engine, tokenizer, work / f"adapter_z{stage}", dist, adapter=True)
        saved = Checkpointer(
            job.output_dir, dist, engine, shared={}, per_rank={}, keep_last=0, exclude_frozen=True
        ).save(STEPS)
        if dist.is_main:
            torch.save({"state": state, "logits": logits}, work / f"lora_z{stage}.pt")
            result[f"lora_z{stage}"] = {"losses": losses, "ckpt_bytes": dir_size(saved)}
    (work / f"rank{dist.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
