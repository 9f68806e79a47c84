"""One deepspeed launch, several engine checks; each rank writes rank<N>.json.

- ZeRO stages 0-3 and ZeRO-2 with CPU-offloaded Adam: the first 10 losses and gradient norms
  on the same model, data and seed;
- grad-accum invariance: micro 4 x accum 1 vs micro 1 x accum 4 (losses and final weights);
- export: a ZeRO-3 run exported to hf/, plus the engine's logits on a fixed input;
- Muon: which parameters it updates, and the lr each param group steps with;
- resume: a checkpoint saved with one set of hyper-parameters and loaded with another (AdamW and
  Muon): the optimizer's groups after ``apply_hyperparameters``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from tests.distributed.workers.common import global_rows, micro_batches, tiny_job
from tests.helpers import tiny_model
from tests.launch import worker_args
from trainer.checkpoint import Checkpointer
from trainer.dist import DistInfo, all_reduce_sum, init_distributed
from trainer.ds_config import build_ds_config
from trainer.engine import apply_hyperparameters, build_engine, optimizer_groups
from trainer.export import consolidated_state_dict, export_live
from trainer.train_module import TrainModule, target_count

STEPS = 10


def train(
    dist: DistInfo, stage: int, micro: int, accum: int, steps: int = STEPS, job=None, **optim
) -> tuple[list[float], object, list[float | None]]:
    """``steps`` optimizer steps on the deterministic rows; returns losses, engine, grad norms."""
    job = job or tiny_job(stage, micro, accum, steps=STEPS, **optim)
    engine = build_engine(job, tiny_model(seed=0), build_ds_config(job, "fp32", on_gpu=False), STEPS)
    losses, norms = [], []
    run_steps(dist, TrainModule(engine, dist), micro, range(steps), losses, norms)
    return losses, engine, norms


def run_steps(dist, module, micro, steps, losses, norms) -> None:
    for step in steps:
        rows = global_rows(step, dist.world_size, rows_per_rank=4)[dist.rank]
        batches = micro_batches(rows, micro)
        (targets,) = all_reduce_sum([sum(target_count(b) for b in batches)], dist)
        result = module.train_step(batches, int(targets))
        (loss_sum,) = all_reduce_sum([float(result.loss_sum)], dist)
        losses.append(loss_sum / targets)
        norms.append(result.grad_norm)


def group_settings(engine) -> list[dict]:
    """The optimizer's param groups as the step reads them (the values, not the schedule)."""
    keys = ("name", "lr", "weight_decay", "betas", "eps", "momentum", "use_muon")
    return [{k: g[k] for k in keys if k in g} for g in optimizer_groups(engine)]


def resume_with_new_hyperparameters(dist: DistInfo, out: Path, name: str, before: dict, after: dict) -> dict:
    """Train 2 steps with ``before`` optim settings, save, rebuild with ``after``, load."""
    engine = train(dist, 2, 2, 2, steps=2, job=tiny_job(2, 2, 2, **before))[1]
    saver = Checkpointer(out / name, dist, engine, shared={}, per_rank={}, keep_last=0)
    path = saver.save(2)
    job = tiny_job(2, 2, 2, **after)
    engine = build_engine(job, tiny_model(seed=1), build_ds_config(job, "fp32", on_gpu=False), STEPS)
    Checkpointer(out / name, dist, engine, shared={}, per_rank={}, keep_last=0).load(path)
    saved_groups = group_settings(engine)
    apply_hyperparameters(engine, job)
    return {
        "loaded": saved_groups,
        "applied": group_settings(engine),
    }


def main() -> None:
    (arg,) = worker_args(sys.argv)
    out = Path(arg)
    out.mkdir(parents=True, exist_ok=True)
    dist = DistInfo.from_env()
    init_distributed(dist)
    result: dict = {"losses": {}, "norms": {}, "patches": {}}
    for stage in (0, 1, 2, 3):
        losses, engine, norms = train(dist, stage, micro=2, accum=2)
        result["losses"][str(stage)] = losses
        result["norms"][str(stage)] = norms
        result["patches"][str(stage)] = engine.dstrain_step_patches
        if stage == 3:
            probe = torch.arange(1, 17).view(2, 8)
            engine.eval()
            with torch.no_grad():
                logits = engine(input_ids=probe).logits
            export_live(engine, _Tok(), out / "hf", dist, adapter=False)
            if dist.is_main:
                torch.save(logits, out / "engine_logits.pt")
    weights = {}
    for name, (micro, accum) in {"m4a1": (4, 1), "m1a4": (1, 4)}.items():
        losses, engine, _ = train(dist, 2, micro=micro, accum=accum)
        result["losses"][name] = losses
        state = consolidated_state_dict(engine)
        if dist.is_main:
            weights[name] = state
    job = tiny_job(2, 2, 2, zero={"offload_optimizer": True})
    losses, engine, norms = train(dist, 2, micro=2, accum=2, job=job)
    result["losses"]["offload"], result["norms"]["offload"] = losses, norms
    result["offload_optimizer"] = type(engine.optimizer.optimizer).__name__
    losses, engine, _ = train(dist, 2, micro=2, accum=2, name="muon")
    result["losses"]["muon"] = losses
    result["muon_optimizer"] = type(engine.optimizer.optimizer).__name__
    names = {id(p): n for n, p in engine.module.named_parameters()}
    # ZeRO-2 steps on flat partitions; bit16_groups holds each group's original parameters.
    result["muon_groups"] = [
        {**settings, "params": sorted(names[id(p)] for p in params)}
        for settings, params in zip(group_settings(engine), engine.optimizer.bit16_groups, strict=True)
    ]
    result["resume"] = {
        "adamw": resume_with_new_hyperparameters(
            dist,
            out,
            "adamw",
            {"weight_decay": 0.0, "betas": [0.9, 0.95], "eps": 1e-8, "lr": 3e-3},
            {"weight_decay": 0.1, "betas": [0.8, 0.99], "eps": 1e-6, "lr": 1e-3},
        ),
        "muon": resume_with_new_hyperparameters(
            dist,
            out,
            "muon",
            {"name": "muon", "muon_momentum": 0.95, "muon_lr": 0.02, "lr": 3e-3, "weight_decay": 0.0},
            {
                "name": "muon",
                "muon_momentum": 0.8,
                "muon_lr": 0.01,
                "lr": 1e-3,
                "weight_decay": 0.1,
                "betas": [0.8, 0.99],
                "eps": 1e-6,
            },
        ),
    }
    if dist.is_main:
        diff = max((weights["m4a1"][k] - weights["m1a4"][k]).abs().max().item() for k in weights["m4a1"])
        result["accum_weight_maxdiff"] = diff
    (out / f"rank{dist.rank}.json").write_text(json.dumps(result))


class _Tok:
    """Stands in for a tokenizer in export: these checks use raw token ids."""

    def save_pretrained(self, path: Path) -> None:
        pass


if __name__ == "__main__":
    main()
