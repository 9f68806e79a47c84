"""What one optimizer step does: forward/backward over the step's micro-batches, then step.

Loss contract: the loss is the mean over the *target tokens of the whole optimizer step*
(all micro-batches, all ranks), so grad-accum splits, padding and masking do not change it.
The step's target-token count N is all-reduced before the first backward. Each micro-batch
then contributes ``sum_token_loss * world_size / N``: DeepSpeed averages gradients over ranks
(divides by world_size) and we pass ``scale_wrt_gas=False`` so it does not also divide by the
accumulation steps. The result is d(sum of all token losses / N).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from trainer.data.packing import IGNORE_INDEX
from trainer.dist import DistInfo, all_reduce_sum

Batch = dict[str, torch.Tensor]
MODEL_INPUTS = ("input_ids", "position_ids", "attention_mask")


@dataclass
class StepResult:
    """What one optimizer step measured, already reduced over ranks."""

    loss: float
    grad_norm: float | None
    target_tokens: int
    tokens: int


def target_count(batch: Batch) -> int:
    """Tokens that carry a loss: labels are shifted inside the model, so count labels[:, 1:]."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def token_count(batch: Batch) -> int:
    """Non-pad tokens (what tokens/s counts): doc_ids are -1 on padding."""
    if "doc_ids" in batch:
        return int((batch["doc_ids"] >= 0).sum())
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return batch["input_ids"].numel()


def summed_loss(model: Any, batch: Batch, device: str) -> torch.Tensor:
    """Sum of next-token cross-entropy over the batch's target tokens (fp32 logits)."""
    inputs = {k: batch[k].to(device, non_blocking=True) for k in MODEL_INPUTS if k in batch}
    logits = model(**inputs, use_cache=False).logits
    labels = batch["labels"].to(device, non_blocking=True)
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)).float(),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


class TrainModule:
    """Wraps the DeepSpeed engine: a step's forward/backward and the optimizer step."""

    def __init__(self, engine: Any, dist: DistInfo) -> None:
        self.engine = engine
        self.dist = dist

    def train_step(self, micro_batches: list[Batch]) -> StepResult:
        local_targets = sum(target_count(b) for b in micro_batches)
        local_tokens = sum(token_count(b) for b in micro_batches)
        total_targets, total_tokens = all_reduce_sum([local_targets, local_tokens], self.dist)
        scale = self.dist.world_size / max(total_targets, 1.0)
        self.engine.train()
        local_loss = 0.0
        for batch in micro_batches:
            loss_sum = summed_loss(self.engine, batch, self.dist.device)
            self.engine.backward(loss_sum * scale, scale_wrt_gas=False)
            self.engine.step()
            local_loss += loss_sum.item()
        (loss_total,) = all_reduce_sum([local_loss], self.dist)
        norm = self.engine.get_global_grad_norm()
        return StepResult(
            loss=loss_total / max(total_targets, 1.0),
            grad_norm=float(norm) if norm is not None else None,
            target_tokens=int(total_targets),
            tokens=int(total_tokens),
        )

    @torch.no_grad()
    def eval_sums(self, batch: Batch | None, template: Batch) -> tuple[float, int]:
        """(summed loss, target tokens) of one batch; ``None`` runs a fully masked stand-in.

        Every rank must run the same number of forwards (ZeRO-3 gathers parameters in a
        collective), so a rank whose eval shard is exhausted forwards ``template`` with all
        labels masked and contributes nothing.
        """
        if batch is None:
            batch = dict(template)
            batch["labels"] = torch.full_like(template["labels"], IGNORE_INDEX)
        self.engine.eval()
        return float(summed_loss(self.engine, batch, self.dist.device)), target_count(batch)
