"""trainer.ds_config: the JobConfig -> DeepSpeed JSON mapping, its golden templates, and DeepSpeed's
own parser accepting every template."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from trainer.config import JobConfig, build_config
from trainer.ds_config import (
    TEMPLATES_DIR,
    build_ds_config,
    resolve_precision,
    stale_templates,
)
from trainer.errors import ConfigError


def job(**sections: dict[str, Any]) -> JobConfig:
    return build_config(base={"tokenizer": "some/dir"}, overrides=sections)


def test_batch_accum_and_clipping_come_from_train_and_optim() -> None:
    ds = build_ds_config(
        job(train={"micro_batch_size": 3, "grad_accum": 5}, optim={"max_grad_norm": 0.5}), "fp32", False
    )
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 5
    assert ds["gradient_clipping"] == 0.5
    assert "train_batch_size" not in ds  # DeepSpeed derives it, so any world size fits
    assert "scheduler" not in ds and "optimizer" not in ds  # the trainer passes its own
    assert ds["steps_per_print"] >= 10**9 and ds["wall_clock_breakdown"] is False


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_mixed_precision_is_torch_autocast_over_fp32_parameters(precision: str, stage: int) -> None:
    """16-bit parameters would make DeepSpeed sum micro-batch gradients in 16-bit at ZeRO-2/3
    (tests/distributed/test_precision.py measures it), so neither bf16 nor fp16 is enabled."""
    ds = build_ds_config(job(zero={"stage": stage}), precision, True)  # type: ignore[arg-type]
    assert ds["bf16"] == {"enabled": False} and ds["fp16"] == {"enabled": False}
    if precision == "fp32":
        assert "torch_autocast" not in ds
    else:
        dtype = {"bf16": "bfloat16", "fp16": "float16"}[precision]
        # No module reduces its gradients in 16-bit (DeepSpeed's default would for nn.Linear).
        assert ds["torch_autocast"] == {"enabled": True, "dtype": dtype, "lower_precision_safe_modules": []}
    # ZeRO-0 with dstrain's AdamW clips in the optimizer (one fused norm), except fp16, whose
    # GradScaler must unscale before DeepSpeed clips.
    own_clip = stage == 0 and precision != "fp16"
    assert ds["gradient_clipping"] == (0.0 if own_clip else 1.0)


def test_resolve_precision() -> None:
    assert resolve_precision("auto", on_gpu=True, bf16_supported=True) == "bf16"
    assert resolve_precision("auto", on_gpu=True, bf16_supported=False) == "fp32"
    assert resolve_precision("auto", on_gpu=False) == "fp32"
    assert resolve_precision("fp16", on_gpu=True, bf16_supported=False) == "fp16"
    assert resolve_precision("bf16", on_gpu=False) == "bf16"
    with pytest.raises(ConfigError, match="--model.dtype bf16"):
        resolve_precision("bf16", on_gpu=True, bf16_supported=False)
    with pytest.raises(ConfigError, match="--model.dtype fp16 needs a GPU"):
        resolve_precision("fp16", on_gpu=False)


def test_offloaded_optimizer_is_deepspeeds_adamw_with_job_hparams() -> None:
    cfg = job(
        zero={"stage": 2, "offload_optimizer": True},
        optim={"lr": 3e-4, "betas": [0.8, 0.9], "eps": 1e-6, "weight_decay": 0.05},
    )
    ds = build_ds_config(cfg, "bf16", on_gpu=False)
    assert ds["optimizer"] == {
        "type": "AdamW",
        "params": {"lr": 3e-4, "betas": [0.8, 0.9], "eps": 1e-6, "weight_decay": 0.05},
    }
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert "offload_param" not in ds["zero_optimization"]


def test_zero3_gathers_16bit_weights_and_offloads_params() -> None:
    ds = build_ds_config(job(zero={"stage": 3, "offload_params": True}), "bf16", on_gpu=True)
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert "offload_optimizer" not in zero and "optimizer" not in ds


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_gather_flag_only_on_zero3(stage: int) -> None:
    zero = build_ds_config(job(zero={"stage": stage}), "bf16", True)["zero_optimization"]
    assert zero["stage"] == stage
    assert "stage3_gather_16bit_weights_on_model_save" not in zero


def test_overlap_comm_only_on_gpu_for_zero2_and_3() -> None:
    def overlap(stage: int, on_gpu: bool) -> bool:
        return build_ds_config(job(zero={"stage": stage}), "fp32", on_gpu)["zero_optimization"][
            "overlap_comm"
        ]

    assert overlap(2, True) and overlap(3, True)
    assert not overlap(1, True) and not overlap(2, False) and not overlap(3, False)


def test_muon_with_offload_is_an_error_naming_both_flags() -> None:
    cfg = job(optim={"name": "muon"}, zero={"stage": 2, "offload_optimizer": True})
    with pytest.raises(ConfigError) as err:
        build_ds_config(cfg, "bf16", True)
    assert "--optim.name" in str(err.value) and "--zero.offload_optimizer" in str(err.value)


def test_muon_is_deepspeeds_muon_with_both_learning_rates() -> None:
    cfg = job(optim={"name": "muon", "lr": 1e-3, "muon_lr": 0.03, "muon_momentum": 0.9}, zero={"stage": 2})
    ds = build_ds_config(cfg, "bf16", True)
    assert ds["optimizer"]["type"] == "Muon"
    assert ds["optimizer"]["params"] == {
        "lr": 1e-3,
        "muon_lr": 0.03,
        "momentum": 0.9,
        "betas": [0.9, 0.95],
        "eps": 1e-8,
        "weight_decay": 0.1,
    }
    assert ds["zero_optimization"]["reduce_scatter"] is True


def test_muon_on_zero3_turns_reduce_scatter_off() -> None:
    # DeepSpeed's ZeRO-3 raises "Muon and reduce scatter cannot be used together".
    ds = build_ds_config(job(optim={"name": "muon"}, zero={"stage": 3}), "bf16", True)
    assert ds["zero_optimization"]["reduce_scatter"] is False
    adamw = build_ds_config(job(zero={"stage": 3}), "bf16", True)
    assert adamw["zero_optimization"]["reduce_scatter"] is True


def test_offload_params_needs_zero3() -> None:
    with pytest.raises(ConfigError, match="--zero.offload_params needs --zero.stage 3"):
        job(zero={"stage": 2, "offload_params": True})


# What each committed template must hold, written out by hand from ds_configs/README.md's table
# and its reference job (micro 16 x accum 8, clipping 1.0, on a GPU): (zero stage, optimizer
# offloaded, parameters offloaded). Checked on the files as DeepSpeed's own parser reads them.
EXPECTED_TEMPLATES = {
    "zero0.json": (0, False, False),
    "zero1.json": (1, False, False),
    "zero2.json": (2, False, False),
    "zero3.json": (3, False, False),
    "zero2_offload.json": (2, True, False),
    "zero3_offload.json": (3, True, True),
}


def test_the_committed_templates_are_what_their_table_says_as_deepspeed_reads_them() -> None:
    """Each file in ds_configs/ (not a fresh generation) parsed by DeepSpeed's DeepSpeedConfig:
    the stage, the offload devices and pinning, the ZeRO-3 16-bit gather on save, overlap_comm
    on a GPU at ZeRO-2/3, DeepSpeed's CPU AdamW (with the reference job's hyper-parameters) only
    when the optimizer is offloaded, and the batch DeepSpeed derives for one rank."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    assert sorted(p.name for p in TEMPLATES_DIR.glob("*.json")) == sorted(EXPECTED_TEMPLATES)
    for name, (stage, offload_optimizer, offload_params) in EXPECTED_TEMPLATES.items():
        parsed = DeepSpeedConfig(json.loads((TEMPLATES_DIR / name).read_text()))
        zero = parsed.zero_config
        assert parsed.zero_optimization_stage == stage, name
        assert parsed.train_micro_batch_size_per_gpu == 16 and parsed.gradient_accumulation_steps == 8, name
        # ZeRO-0 clips in dstrain's optimizer (one fused norm), the ZeRO optimizers in DeepSpeed.
        assert parsed.train_batch_size == 128 and parsed.gradient_clipping == (0.0 if stage == 0 else 1.0), (
            name
        )
        # bf16 is autocast over fp32 parameters, gradients reduced in fp32.
        assert parsed.torch_autocast_enabled and parsed.torch_autocast_dtype == torch.bfloat16, name
        assert parsed.torch_autocast_lower_precision_safe_modules == [], name
        assert not parsed.bfloat16_config.enabled and not parsed.float16_config.enabled, name
        assert zero.gather_16bit_weights_on_model_save is (stage == 3), name
        if stage >= 2:
            assert zero.overlap_comm is True, name
        # the per-parameter copy into a bucket buffer only where it is needed (ds_config.zero_block)
        if stage in (1, 2):
            assert zero.contiguous_gradients is offload_optimizer, name
        for section, offloaded in (
            (zero.offload_optimizer, offload_optimizer),
            (zero.offload_param, offload_params),
        ):
            if offloaded:
                assert (
                    section is not None
                    and getattr(section.device, "value", section.device) == "cpu"
                    and section.pin_memory
                ), name
            else:
                assert section is None or getattr(section.device, "value", section.device) == "none", name
        if offload_optimizer:
            assert parsed.optimizer_name == "adamw", name
            assert parsed.optimizer_params == {
                "lr": 2e-5,
                "betas": [0.9, 0.95],
                "eps": 1e-8,
                "weight_decay": 0.1,
            }
        else:
            assert parsed.optimizer_name is None, f"{name}: the trainer passes its own optimizer"
        assert parsed.scheduler_name is None, name


def test_the_committed_templates_are_not_stale() -> None:
    """ds_configs/ is what build_ds_config writes today (a drift check; what the files must hold
    is the test above)."""
    assert stale_templates() == [], "run python -m trainer.ds_config --regenerate and review the diff"


def test_deepspeed_reads_every_top_level_key() -> None:
    """DeepSpeed ignores unknown top-level keys silently, so each one must be a name it reads."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime import constants
    from deepspeed.runtime.zero.config import ZERO_OPTIMIZATION

    known_top_level = {v for v in vars(constants).values() if isinstance(v, str)} | {ZERO_OPTIMIZATION}
    assert "zero_allow_untested_optimizer" in known_top_level
    for name in EXPECTED_TEMPLATES:
        ds = json.loads((TEMPLATES_DIR / name).read_text())
        assert set(ds) <= known_top_level, (name, set(ds) - known_top_level)


@pytest.mark.parametrize(
    ("sections", "precision", "on_gpu"),
    [
        ({"zero": {"stage": 2, "offload_optimizer": True}}, "fp16", False),
        ({"zero": {"stage": 3}, "optim": {"name": "muon"}}, "fp32", False),
        ({"zero": {"stage": 1}, "optim": {"max_grad_norm": 0.0}}, "bf16", True),
    ],
)
def test_deepspeed_parses_cpu_and_fp16_variants(
    sections: dict[str, Any], precision: str, on_gpu: bool
) -> None:
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    ds = build_ds_config(job(**sections), precision, on_gpu)  # type: ignore[arg-type]
    parsed = DeepSpeedConfig(ds)
    assert parsed.zero_optimization_stage == sections["zero"]["stage"]
    assert not parsed.float16_config.enabled  # fp16 is autocast + DeepSpeed's GradScaler
    if precision == "fp16":
        assert parsed.torch_autocast_enabled and parsed.torch_autocast_dtype == torch.float16
    if sections.get("optim", {}).get("name") == "muon":
        assert parsed.optimizer_name == "muon"  # one of DeepSpeed's built-in optimizers
        assert parsed.zero_config.reduce_scatter is False
