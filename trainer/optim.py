"""Optimizers and learning-rate schedules.

Schedules are pure functions of the optimizer step (``lr_factor``), so the LR after a resume
is a function of the restored step and the current config, nothing else.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from trainer.config import OptimConfig, ScheduleConfig


def lr_factor(step: int, total_steps: int, cfg: ScheduleConfig) -> float:
    """Multiplier of the peak LR for the update at ``step`` (0-based optimizer step).

    cosine/linear/constant/wsd: linear warmup from 1/warmup_steps to 1 over ``warmup_steps``;
    then cosine or linear decay to ``min_lr_ratio`` at ``total_steps``, flat, or
    warmup-stable-decay with a linear decay over the last ``decay_fraction`` of the steps.
    onecycle: cosine rise from 1/div_factor to 1 over ``warmup_steps`` (30% of the steps when
    0, as torch's OneCycleLR), then cosine fall to 1/(div_factor*final_div_factor).
    """
    total = max(total_steps, 1)
    warmup = cfg.warmup_steps
    if cfg.name == "onecycle":
        peak_at = warmup if warmup > 0 else max(1, int(0.3 * total))
        start, end = 1.0 / cfg.div_factor, 1.0 / (cfg.div_factor * cfg.final_div_factor)
        if step < peak_at:
            return _cos_interp(start, 1.0, step / peak_at)
        return _cos_interp(1.0, end, min(1.0, (step - peak_at) / max(1, total - peak_at)))
    if step < warmup:
        return (step + 1) / warmup
    floor = cfg.min_lr_ratio
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if cfg.name == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.name == "linear":
        return floor + (1.0 - floor) * (1.0 - progress)
    if cfg.name == "wsd":
        decay_steps = max(1, int(round(cfg.decay_fraction * total)))
        decay_start = max(warmup, total - decay_steps)
        if step < decay_start:
            return 1.0
        return 1.0 - (1.0 - floor) * min(1.0, (step - decay_start) / max(1, total - decay_start))
    return 1.0  # constant


def _cos_interp(start: float, end: float, fraction: float) -> float:
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * fraction))


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, cfg: ScheduleConfig) -> Any:
    """A LambdaLR over :func:`lr_factor`; DeepSpeed steps it once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))


def is_muon_param(name: str, param: torch.nn.Parameter) -> bool:
    """Muon updates 2-D hidden weight matrices; embeddings, the head, norms and biases use AdamW."""
    return param.ndim == 2 and "embed" not in name and "lm_head" not in name


DECAY, NO_DECAY = "decay", "no_decay"  # param group names (engine.apply_hyperparameters reads them)


def param_groups(model: torch.nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """Weight decay on matrices, none on biases and norm weights (1-D); trainable params only.

    Groups are named (``decay`` / ``no_decay``) so their role survives a checkpoint load, where
    the saved weight decay of both may be 0.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if cfg.name == "muon":
            param.use_muon = is_muon_param(name, param)  # read by DeepSpeed's Muon optimizer
        (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "name": DECAY}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": NO_DECAY})
    return groups


class FiniteAdamW(torch.optim.AdamW):
    """AdamW that skips a step whose gradients are not all finite, and says so in ``overflow``.

    DeepSpeed's ZeRO optimizers and its bf16 optimizer already skip a step with a non-finite
    gradient norm (and then leave the LR scheduler alone); at ZeRO-0 in fp32 it calls this
    optimizer directly, reading ``overflow`` the same way. Gradients are all-reduced before the
    step at ZeRO-0, so every rank takes the same decision.
    """

    overflow = False

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        self.overflow = bool(grads) and not torch.isfinite(torch.nn.utils.get_total_norm(grads))
        if self.overflow:
            return None
        return super().step(closure)


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, zero_stage: int = 0) -> torch.optim.Optimizer:
    """The torch AdamW the engine wraps when DeepSpeed does not build the optimizer itself:
    :class:`FiniteAdamW` at ZeRO-0 (DeepSpeed steps it directly), the plain class under ZeRO
    (whose optimizers check the gradient norm themselves and accept only known classes)."""
    cls = FiniteAdamW if zero_stage == 0 else torch.optim.AdamW
    return cls(param_groups(model, cfg), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, foreach=False)
