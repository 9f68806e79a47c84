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


def param_group_names(model: torch.nn.Module, cfg: OptimConfig) -> list[list[str]]:
    """The parameter names of each of :func:`param_groups`' groups, in the optimizer's order (a
    torch optimizer's state is keyed by that position)."""
    names = {id(param): name for name, param in model.named_parameters()}
    return [[names[id(p)] for p in group["params"]] for group in param_groups(model, cfg)]


class FiniteAdamW(torch.optim.AdamW):
    """The ZeRO-0 AdamW: clips, skips a step whose gradients are not all finite, and says so.

    At ZeRO-0 DeepSpeed steps the client optimizer directly; its own clipping
    (``deepspeed.runtime.utils.clip_grad_norm_``) walks every parameter in Python and the norm it
    computes is not kept, so :func:`trainer.ds_config.build_ds_config` turns DeepSpeed's clipping
    off there and this optimizer does it: one fused norm over all gradients (``foreach``), one
    in-place scale on the device (no host read of the coefficient), then torch's fused or foreach
    AdamW kernel. The norm stays a device tensor in ``_global_grad_norm`` (DeepSpeed's engine
    copies that attribute, so ``engine.get_global_grad_norm()`` returns it without a sync).

    The one host read per step is ``overflow``: DeepSpeed reads it after ``step`` to skip the LR
    scheduler on a non-finite step, the same decision its ZeRO optimizers take from their norm.
    Gradients are all-reduced before the step at ZeRO-0, so every rank decides the same.
    """

    overflow = False

    def __init__(self, params: Any, max_grad_norm: float = 0.0, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.max_grad_norm = max_grad_norm
        self._global_grad_norm: torch.Tensor | None = None

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            self.overflow = False
            return None
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        self._global_grad_norm = norm
        self.overflow = not bool(torch.isfinite(norm))  # the step's one host sync (see above)
        if self.overflow:
            return None
        if self.max_grad_norm > 0:  # takes the parameters (it scales their .grad)
            torch.nn.utils.clip_grads_with_norm_(params, self.max_grad_norm, norm, foreach=True)
        return super().step(closure)


def fused_kernel_kwargs(params: list[torch.nn.Parameter]) -> dict[str, bool]:
    """torch's fused AdamW (one kernel for every tensor) where it supports the parameters'
    device and dtype (CUDA, CPU), else the multi-tensor ``foreach`` one; never the single-tensor
    loop (a Python iteration and several small kernels per parameter)."""
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        supported = set(_get_fused_kernels_supported_devices())
    except ImportError:  # older torch: CUDA only
        supported = {"cuda"}
    devices = {p.device.type for p in params}
    if devices and devices <= supported and all(p.is_floating_point() for p in params):
        return {"fused": True}
    return {"foreach": True}


def build_optimizer(
    model: torch.nn.Module, cfg: OptimConfig, zero_stage: int = 0, clip_in_optimizer: bool = False
) -> torch.optim.Optimizer:
    """The torch AdamW the engine wraps when DeepSpeed does not build the optimizer itself:
    :class:`FiniteAdamW` at ZeRO-0 (DeepSpeed steps it directly; it clips when
    ``clip_in_optimizer``), the plain class under ZeRO (whose optimizers check the gradient norm
    themselves and accept only known classes). Both run torch's fused (or foreach) kernel."""
    groups = param_groups(model, cfg)
    kwargs: dict[str, Any] = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    kwargs.update(fused_kernel_kwargs([p for g in groups for p in g["params"]]))
    if zero_stage == 0:
        return FiniteAdamW(groups, max_grad_norm=cfg.max_grad_norm if clip_in_optimizer else 0.0, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)
