"""The planner behind ``zero.stage: auto`` and ``train.micro_batch_size: auto``: a table of
(model, GPUs, memory) cases, a resume that keeps its choice, and the worker default."""

from __future__ import annotations

import pytest

from trainer.config import JobConfig
from trainer.planner import USABLE_FRACTION, Hardware, default_num_workers, fits_for, plan_auto

GB = 1e9


def job(preset: str, seq: int, global_batch: int, lora: bool = False, **train) -> JobConfig:
    data = {
        "tokenizer": "unused",
        "model": {"config": preset, "gradient_checkpointing": "auto", "attn_implementation": "sdpa"},
        "data": {"max_seq_len": seq, "num_workers": "auto"},
        "train": {"micro_batch_size": "auto", "global_batch_size": global_batch, **train},
        "zero": {"stage": "auto"},
    }
    if lora:
        data["lora"] = {"enabled": True, "r": 16, "target_modules": ["q_proj", "v_proj"]}
    return JobConfig.from_dict(data)


# (model, rows of, global batch, LoRA, GPUs, GB each) -> (stage, offload optimizer, offload
# params, micro-batch, grad accum, checkpointing). Why each is right:
CASES = [
    # 0.5B on one 80 GB GPU: 8 GB of states; ZeRO-0 (no collectives) fits without recomputation.
    (("qwen2.5-0.5b", 2048, 64, False, 1, 80), (0, False, False, 16, 4, False)),
    # the same on 8 GPUs: ZeRO-1 is the fewest collectives that shard anything; 8 rows per rank.
    (("qwen2.5-0.5b", 2048, 64, False, 8, 80), (1, False, False, 8, 1, False)),
    # 7B on 8 x 80 GB: ZeRO-1's 9.5 B/param (72 GB) leaves nothing; without checkpointing no
    # stage holds 2 rows of 4096 (14 GB of autocast copies + activations), so it is needed, and
    # ZeRO-2 is then the first that fits.
    (("qwen2.5-7b", 4096, 256, False, 8, 80), (2, False, False, 8, 4, True)),
    # 7B on 8 x 141 GB: ZeRO-3 holds 2 rows without recomputation: no checkpointing.
    (("qwen2.5-7b", 4096, 256, False, 8, 141), (3, False, False, 2, 16, False)),
    # 7B on 8 x 24 GB: even ZeRO-3's 2 B/param + checkpointing is too much; the optimizer goes to the host.
    (("qwen2.5-7b", 4096, 256, False, 8, 24), (3, True, False, 4, 8, True)),
    # 7B full training on one 80 GB GPU: 16 B/param cannot stay; offload the optimizer.
    (("qwen2.5-7b", 2048, 16, False, 1, 80), (3, True, False, 4, 4, True)),
    # 7B LoRA on one 24 GB GPU: the 16-bit base (15 GB) fits at ZeRO-0 with checkpointing.
    (("qwen2.5-7b", 2048, 16, True, 1, 24), (0, False, False, 4, 4, True)),
    # 7B LoRA on one 80 GB GPU: ZeRO-0 with checkpointing, before any offload.
    (("qwen2.5-7b", 2048, 16, True, 1, 80), (0, False, False, 16, 1, True)),
]


@pytest.mark.parametrize(
    "case, expected", CASES, ids=[f"{c[0]}-{c[4]}x{c[5]}GB{'-lora' if c[3] else ''}" for c, _ in CASES]
)
def test_the_planner_takes_the_fastest_layout_that_fits(case, expected):
    preset, seq, global_batch, lora, gpus, mem = case
    planned, lines = plan_auto(
        job(preset, seq, global_batch, lora), Hardware(gpus, gpus, mem * GB, 16), "bf16"
    )
    got = (
        planned.zero.stage,
        planned.zero.offload_optimizer,
        planned.zero.offload_params,
        planned.train.micro_batch_size,
        planned.train.grad_accum,
        planned.model.gradient_checkpointing,
    )
    assert got == expected, lines
    assert got[3] * got[4] * gpus == global_batch, "the global batch is kept"
    assert any(line.startswith("planner: zero.stage") for line in lines)


def test_a_fixed_micro_batch_moves_the_stage_up_until_it_fits():
    fixed = job("qwen2.5-0.5b", 2048, 64, micro_batch_size=64, grad_accum=1)
    hardware = Hardware(8, 8, 24 * GB, 16)
    planned, _ = plan_auto(fixed, hardware, "bf16")
    assert planned.train.micro_batch_size == 64 and planned.train.grad_accum == 1
    from trainer.planner import Layout, planned_architecture

    config, _ = planned_architecture(planned)
    usable = USABLE_FRACTION * hardware.gpu_mem_bytes
    ckpt = planned.model.gradient_checkpointing
    for stage in range(1, planned.zero.stage):  # every faster stage fails the fixed micro-batch
        fit = fits_for(planned, config, 8, usable, "bf16", "sdpa", "chunked", 64, [Layout(stage)], (ckpt,))[
            ckpt
        ][0]
        assert fit.max_micro_batch < 64


def test_cpu_ranks_take_a_fixed_choice():
    planned, lines = plan_auto(job("qwen2.5-0.5b", 256, 32), Hardware(2, 2, None, 2), "fp32")
    assert (planned.zero.stage, planned.train.micro_batch_size, planned.train.grad_accum) == (1, 8, 2)
    assert planned.model.gradient_checkpointing is False and planned.data.num_workers == 1
    single, _ = plan_auto(job("qwen2.5-0.5b", 256, 32), Hardware(1, 1, None, 2), "fp32")
    assert single.zero.stage == 0


def test_a_resume_keeps_the_checkpoints_choice_while_it_fits():
    auto = job("qwen2.5-7b", 4096, 256)
    first, _ = plan_auto(auto, Hardware(8, 8, 141 * GB, 16), "bf16")
    # resumed on the same GPUs: kept, even though the planner alone might now choose otherwise
    saved = JobConfig.from_dict(
        {
            **first.to_dict(),
            "zero": {"stage": 2},
            "model": {**first.to_dict()["model"], "gradient_checkpointing": True},
        }
    )
    again, lines = plan_auto(auto, Hardware(8, 8, 141 * GB, 16), "bf16", saved=saved)
    assert (again.zero.stage, again.model.gradient_checkpointing) == (2, True)
    assert "kept the checkpoint's choice" in lines[-1]
    # resumed on 8 GPUs of 24 GB: ZeRO-2 no longer fits; planned again, and said so
    smaller, lines = plan_auto(auto, Hardware(8, 8, 24 * GB, 16), "bf16", saved=saved)
    assert smaller.zero.stage == 3 and smaller.zero.offload_optimizer
    assert any("does not fit" in line for line in lines)


@pytest.mark.parametrize(
    "cpus, ranks, workers",
    [(2, 2, 1), (2, 1, 1), (16, 8, 1), (32, 8, 3), (64, 8, 4), (128, 1, 4), (8, 16, 1)],
)
def test_default_workers_follow_the_cores_per_rank(cpus, ranks, workers):
    assert default_num_workers(cpus, ranks) == workers


def test_a_resume_on_another_world_size_keeps_the_stage_and_replans_the_micro_batch():
    """A ZeRO-0 checkpoint from one rank, resumed on two: ZeRO-0 stays (its state cannot be
    re-sharded to another stage), the micro-batch is planned again for 12 rows per rank."""
    auto = job("qwen2.5-0.5b", 256, 24)
    first, _ = plan_auto(auto, Hardware(1, 1, None, 2), "fp32")
    assert (first.zero.stage, first.train.micro_batch_size, first.train.grad_accum) == (0, 8, 3)
    resumed, lines = plan_auto(auto, Hardware(2, 2, None, 2), "fp32", saved=first)
    assert (resumed.zero.stage, resumed.train.micro_batch_size, resumed.train.grad_accum) == (0, 6, 2)
    assert any("kept the checkpoint's zero.stage 0" in line for line in lines)


def test_zero_1_and_2_on_one_rank_run_as_zero_0_unless_something_needs_their_engine():
    """One partition saves nothing, and DeepSpeed's ZeRO-1/2 engine keeps a second fp32 copy
    of the weights (tests/distributed/test_precision.py measures 16 against 20 bytes a
    parameter): a fixed stage 1 or 2 on one rank becomes 0, and the log says why."""
    for stage in (1, 2):
        fixed = JobConfig.from_dict({"tokenizer": "unused", "zero": {"stage": stage}})
        planned, lines = plan_auto(fixed, Hardware(1, 1, 80 * GB, 16), "bf16")
        assert planned.zero.stage == 0
        assert any(f"zero.stage {stage} on one rank runs as zero.stage 0" in line for line in lines)
        several, lines = plan_auto(fixed, Hardware(2, 2, 80 * GB, 16), "bf16")
        assert several.zero.stage == stage and not any("one rank" in line for line in lines)
        # a resume of a checkpoint the ZeRO-1/2 engine wrote: only that engine loads its files
        kept, _ = plan_auto(fixed, Hardware(1, 1, 80 * GB, 16), "bf16", saved=fixed)
        assert kept.zero.stage == stage
    offload = JobConfig.from_dict({"tokenizer": "unused", "zero": {"stage": 2, "offload_optimizer": True}})
    assert plan_auto(offload, Hardware(1, 1, 80 * GB, 16), "bf16")[0].zero.stage == 2
    muon = JobConfig.from_dict({"tokenizer": "unused", "zero": {"stage": 1}, "optim": {"name": "muon"}})
    assert plan_auto(muon, Hardware(1, 1, 80 * GB, 16), "bf16")[0].zero.stage == 1
