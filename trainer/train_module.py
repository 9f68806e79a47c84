"""What one optimizer step does: forward/backward over the step's micro-batches, then step.

Loss contract: the loss is the mean over the *target tokens of the whole optimizer step*
(all micro-batches, all ranks), so grad-accum splits, padding and masking do not change it.
The caller passes the step's all-reduced target count N (the Trainer gets it from the one
all-reduce it does per step, before the first forward). Each micro-batch then contributes
``sum_token_loss * world_size / N``: DeepSpeed averages gradients over ranks (divides by
world_size) and we pass ``scale_wrt_gas=False`` so it does not also divide by the accumulation
steps. The result is d(sum of all token losses / N).

Syncs: none of its own. Everything the loss needs that depends on the labels (which positions
are targets, the packed documents' lengths) is computed from the CPU batch before it is copied
to the device, so nothing is read back inside a micro-batch. The summed loss and the gradient
norm stay on the device; the Trainer reads them on log steps only (``StepResult.grad_norm``
converts on first access). What remains per optimizer step is the optimizer's own decision to
skip a non-finite step (DeepSpeed's ZeRO optimizers read their norm; at ZeRO-0
``trainer.optim.FiniteAdamW`` does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from trainer.data.packing import Batch
from trainer.dist import DistInfo
from trainer.faults import fault
from trainer.labels import IGNORE_INDEX
from trainer.loss import summed_loss


@dataclass
class StepResult:
    """What one optimizer step measured on this rank."""

    loss_sum: torch.Tensor  # summed token loss of this rank's micro-batches (detached, on the device)
    raw_grad_norm: torch.Tensor | float | None  # global gradient norm before clipping, maybe on the device
    lrs: list[float]  # the optimizer's lr per param group, as used by this update
    applied: bool = True  # False: a non-finite gradient made the optimizer skip the update

    @property
    def grad_norm(self) -> float | None:
        """The norm as a number (a host sync when it is a device tensor: read it on log steps)."""
        return None if self.raw_grad_norm is None else float(self.raw_grad_norm)


def target_count(batch: Batch) -> int:
    """Tokens that carry a loss: labels are shifted inside the loss, so count labels[:, 1:]."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def token_count(batch: Batch) -> int:
    """Non-pad tokens (what tokens/s counts): doc_ids are -1 on padding."""
    if "doc_ids" in batch:
        return int((batch["doc_ids"] >= 0).sum())
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return batch["input_ids"].numel()


class TrainModule:
    """Wraps the DeepSpeed engine: a step's forward/backward and the optimizer step."""

    def __init__(self, engine: Any, dist: DistInfo) -> None:
        self.engine = engine
        self.dist = dist

    def train_step(self, micro_batches: list[Batch], total_targets: int, step: int = 0) -> StepResult:
        """Forward/backward every micro-batch and step; ``total_targets`` is the step's target
        count over all ranks (every rank must pass the same number of micro-batches).

        A non-finite loss or gradient makes the optimizer skip the update (DeepSpeed's ZeRO and
        bf16 optimizers, or ``FiniteAdamW`` at ZeRO-0), and the LR scheduler is not stepped:
        ``applied`` is False. ``step`` (the step this becomes) only feeds fault injection.
        """
        engine = self.engine
        lrs = [float(lr) for lr in engine.get_lr()]  # read before the scheduler steps
        scale = self.dist.world_size / max(total_targets, 1)
        if not engine.module.training:  # train() walks every module: only after an eval
            engine.train()
        loss_sum = torch.zeros((), device=self.dist.device)
        poison = fault("in_step", step, self.dist.rank)  # "nan"; an "oom" fires inside the forward
        for i, batch in enumerate(micro_batches):
            loss = summed_loss(engine, batch, self.dist.device)
            if poison == "nan" and i == 0:
                loss = loss * float("nan")
            engine.backward(loss * scale, scale_wrt_gas=False)
            engine.step()
            loss_sum += loss.detach()
        return StepResult(
            loss_sum=loss_sum,
            raw_grad_norm=engine.get_global_grad_norm(),
            lrs=lrs,
            applied=engine.was_step_applied(),
        )

    @torch.no_grad()
    def eval_sums(self, batch: Batch) -> tuple[float, int]:
        """(summed loss, target tokens) of one eval batch (a filler batch gives (0.0, 0))."""
        self.engine.eval()
        return float(summed_loss(self.engine, batch, self.dist.device)), target_count(batch)
