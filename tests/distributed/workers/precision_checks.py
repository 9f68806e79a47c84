"""Does the engine dstrain configures sum the micro-batches' gradients in fp32 under bf16?

For each ZeRO stage, one optimizer step of plain SGD (lr 1, no clipping, no momentum) through
``deepspeed.initialize`` with the config ``dstrain ds-config --precision bf16 --zero N`` printed
(``<configs>/zero<N>.json``, micro-batch 1 x accumulation 4): the update of each
parameter is minus the gradient DeepSpeed accumulated over the step's micro-batches. The reference
is plain torch: the same model under ``torch.autocast(bf16)``, each micro-batch's gradient taken
alone, summed in fp64. Each micro-batch's gradient is the same computation in both (same shapes,
same kernels), so what differs is only how the engine adds them up. The same is run with
DeepSpeed's own ``bf16.enabled`` (16-bit parameters; what dstrain emitted before), which must miss.

Also micro 4 x accum 1 vs micro 1 x accum 4 (the README's claim): their updates differ only by the
16-bit rounding of the matmuls, the same for both configurations.
Writes rank<N>.json: {case: {stage: {"accum_err": ..., "split_err": ...}}}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import deepspeed
import torch
from deepspeed.utils import safe_get_full_fp32_param

from tests.distributed.workers.common import global_rows, micro_batches, tiny_job
from tests.helpers import tiny_model
from tests.launch import worker_args
from trainer.dist import DistInfo, init_distributed
from trainer.engine import build_engine
from trainer.loss import summed_loss

SCALE = 1.0  # loss multiplier, the same in the engine and the reference


def ds_config_for(configs: Path, case: str, stage: int, micro: int, accum: int) -> dict:
    ds = json.loads((configs / f"zero{stage}.json").read_text())
    ds.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum)
    if case == "deepspeed_bf16":  # 16-bit parameters, as dstrain configured bf16 before
        ds.pop("torch_autocast", None)
        ds["bf16"] = {"enabled": True}
    ds["zero_allow_untested_optimizer"] = True  # plain SGD, so the update is the gradient
    return ds


def engine_update(ds_config: dict, micro: int, rows) -> dict[str, torch.Tensor]:
    model = tiny_model(seed=0)
    before = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    for batch in micro_batches(rows, micro):
        loss = summed_loss(engine, batch, "cpu")
        engine.backward(loss * SCALE, scale_wrt_gas=False)
        engine.step()
    update = {}
    for name, param in engine.module.named_parameters():
        master = safe_get_full_fp32_param(param)
        after = (master if master is not None else param).detach().double()
        update[name] = before[name] - after
    return update


def reference_sum(rows, micro: int) -> dict[str, torch.Tensor]:
    """Plain torch: fp32 weights, bf16 autocast, one micro-batch at a time, summed in fp64."""
    model = tiny_model(seed=0)
    total = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
    for batch in micro_batches(rows, micro):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = summed_loss(model, batch, "cpu")
        (loss * SCALE).backward()
        for n, p in model.named_parameters():
            total[n] += p.grad.double()
    return total


def worst_relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max over parameters of max|a - b| / max|b|."""
    return max(float((a[n] - b[n]).abs().max() / b[n].abs().max().clamp_min(1e-30)) for n in b)


def main() -> None:
    out, configs = map(Path, worker_args(sys.argv))
    dist = DistInfo.from_env()
    init_distributed(dist)
    rows = global_rows(0, 1, rows_per_rank=4)[0]
    reference = reference_sum(rows, micro=1)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for case in ("dstrain", "deepspeed_bf16"):
        results[case] = {}
        for stage in (0, 1, 2, 3):
            accumulated = engine_update(ds_config_for(configs, case, stage, 1, 4), 1, rows)
            whole = engine_update(ds_config_for(configs, case, stage, 4, 1), 4, rows)
            results[case][str(stage)] = {
                "accum_err": worst_relative(accumulated, reference),
                "split_err": worst_relative(accumulated, whole),
            }
    results["zero0_optimizer"] = zero0_optimizer(configs)
    (out / f"rank{dist.rank}.json").write_text(json.dumps(results, indent=1))


def zero0_optimizer(configs: Path) -> dict:
    """What steps the parameters at ZeRO-0 in bf16, built the way the trainer builds it."""
    job = tiny_job(0, 1, 4, steps=1)
    ds = json.loads((configs / "zero0.json").read_text())
    engine = build_engine(job, tiny_model(seed=0), ds, total_steps=1)
    optimizer = engine.optimizer
    return {
        "class": type(optimizer).__name__,
        "fused": [bool(g.get("fused")) for g in optimizer.param_groups],
        "param_dtypes": sorted({str(p.dtype) for p in engine.module.parameters()}),
    }


if __name__ == "__main__":
    main()
