"""One deepspeed launch, several engine checks; each rank writes rank<N>.json.

- ZeRO stages 0-3: the first 10 losses on the same model, data and seed;
- grad-accum invariance: micro 4 x accum 1 vs micro 1 x accum 4 (losses and final weights);
- export: a ZeRO-3 run exported to hf/, plus the engine's logits on a fixed input.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from tests.distributed.workers.common import global_rows, micro_batches, tiny_job
from tests.helpers import tiny_model
from tests.launch import worker_args
from trainer.dist import DistInfo, all_reduce_sum, init_distributed
from trainer.engine import build_engine
from trainer.export import consolidated_state_dict, export_hf
from trainer.train_module import TrainModule, target_count

STEPS = 10


def train(dist: DistInfo, stage: int, micro: int, accum: int, **optim) -> tuple[list[float], object]:
    job = tiny_job(stage, micro, accum, steps=STEPS, **optim)
    engine, _ = build_engine(job, tiny_model(seed=0), "fp32", on_gpu=False, total_steps=STEPS)
    module = TrainModule(engine, dist)
    losses = []
    for step in range(STEPS):
        rows = global_rows(step, dist.world_size, rows_per_rank=4)[dist.rank]
        batches = micro_batches(rows, micro)
        (targets,) = all_reduce_sum([sum(target_count(b) for b in batches)], dist)
        result = module.train_step(batches, int(targets))
        (loss_sum,) = all_reduce_sum([float(result.loss_sum)], dist)
        losses.append(loss_sum / targets)
    return losses, engine


def main() -> None:
    (arg,) = worker_args(sys.argv)
    out = Path(arg)
    out.mkdir(parents=True, exist_ok=True)
    dist = DistInfo.from_env()
    init_distributed(dist)
    result: dict = {"losses": {}}
    for stage in (0, 1, 2, 3):
        losses, engine = train(dist, stage, micro=2, accum=2)
        result["losses"][str(stage)] = losses
        if stage == 3:
            probe = torch.arange(1, 17).view(2, 8)
            engine.eval()
            with torch.no_grad():
                logits = engine(input_ids=probe).logits
            export_hf(engine, _Tok(), out / "hf", dist)
            if dist.is_main:
                torch.save(logits, out / "engine_logits.pt")
    weights = {}
    for name, (micro, accum) in {"m4a1": (4, 1), "m1a4": (1, 4)}.items():
        losses, engine = train(dist, 2, micro=micro, accum=accum)
        result["losses"][name] = losses
        state = consolidated_state_dict(engine)
        if dist.is_main:
            weights[name] = state
    losses, engine = train(dist, 2, micro=2, accum=2, name="muon")
    result["losses"]["muon"] = losses
    result["muon_optimizer"] = type(engine.optimizer.optimizer).__name__
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
