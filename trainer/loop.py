"""The Trainer decides *when*: steps, epochs, eval cadence, save cadence, stopping.

*What* a step does lives in :class:`trainer.train_module.TrainModule`; side effects live in
callbacks (:mod:`trainer.metrics`); saving lives in :mod:`trainer.checkpoint`.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from trainer.config import JobConfig
from trainer.dist import DistInfo, all_reduce_max, all_reduce_sum
from trainer.metrics import Callback, Throughput, perplexity
from trainer.optim import lr_factor
from trainer.train_module import Batch, TrainModule

log = logging.getLogger("dstrain")


@dataclass
class TrainState:
    """The counters a checkpoint restores: optimizer steps, epoch, tokens trained on."""

    step: int = 0
    epoch: int = 0
    tokens_seen: int = 0
    target_tokens_seen: int = 0
    best_eval_loss: float | None = None
    best_step: int | None = None

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def total_steps_for(job: JobConfig, batches_per_epoch: int) -> int:
    """max_steps when set, else epochs x optimizer steps per epoch (from the data estimate)."""
    if job.train.max_steps is not None:
        return job.train.max_steps
    return max(1, job.train.epochs * (batches_per_epoch // job.train.grad_accum))


class Trainer:
    """Runs the loop over the stateful data stream until max_steps or the last epoch."""

    def __init__(
        self,
        job: JobConfig,
        dist: DistInfo,
        module: TrainModule,
        train_data: Any,
        eval_batches: Iterable[Batch] | None,
        total_steps: int,
        callbacks: list[Callback],
        checkpointer: Any = None,
        preemption: Any = None,
    ) -> None:
        self.job = job
        self.dist = dist
        self.module = module
        self.train_data = train_data
        self.eval_batches = eval_batches
        self.total_steps = total_steps
        self.callbacks = callbacks
        self.checkpointer = checkpointer
        self.preemption = preemption
        self.state = TrainState()
        self.stop_requested = False
        self.last_eval_step: int | None = None
        self.last_save_step: int | None = None
        self.throughput = Throughput()

    def fit(self) -> TrainState:
        """Train until max_steps, the last epoch, or an agreed pre-emption signal."""
        self.throughput = Throughput()
        self.window_losses: list[float] = []
        self._emit("on_train_start")
        while not self._finished():
            for micro_batches in self._steps_of_epoch():
                self._train_step(micro_batches)
                self._after_step()
                if self._finished():
                    break
            else:
                self.state.epoch += 1
        if not self.stop_requested and self.last_eval_step != self.state.step:
            self.evaluate()
        if self.checkpointer and self.last_save_step != self.state.step:
            self._save()
        self._emit("on_train_end")
        return self.state

    def _train_step(self, micro_batches: list[Batch]) -> None:
        result = self.module.train_step(micro_batches)
        lr = self.job.optim.lr * lr_factor(self.state.step, self.total_steps, self.job.schedule)
        self.state.step += 1
        self.state.tokens_seen += result.tokens
        self.state.target_tokens_seen += result.target_tokens
        self.throughput.add(result.tokens)
        self.window_losses.append(result.loss)
        if self.state.step % self.job.train.log_every and self.state.step != self.total_steps:
            return
        # The mean over the steps since the last log (each step's loss is already token-averaged).
        loss = sum(self.window_losses) / len(self.window_losses)
        self.window_losses = []
        record = {
            "step": self.state.step,
            "epoch": self.state.epoch,
            "loss": loss,
            "lr": lr,
            "grad_norm": result.grad_norm,
            "tokens": self.state.tokens_seen,
            "tokens_per_s": self.throughput.rate(),
            "time": round(self.throughput.elapsed(), 3),
        }
        if self.job.log.doc_ids:
            record["doc_ids"] = gather_doc_ids(micro_batches, self.dist)
        self._emit("on_step", record)

    def _after_step(self) -> None:
        """Eval, save and pre-emption, in that order, at the optimizer-step boundary."""
        train, step = self.job.train, self.state.step
        new_best = False
        if train.eval_every and step % train.eval_every == 0:
            new_best = self.evaluate() is not None and self.state.best_step == step
        save_due = bool(train.save_every and step % train.save_every == 0) or (new_best and train.keep_best)
        if self.checkpointer and save_due:
            self._save()
        if self.preemption is not None and all_reduce_max([float(self.preemption.requested)], self.dist)[0]:
            log.warning("pre-emption signal received: saving step %d and stopping", step)
            if self.checkpointer and self.last_save_step != step:
                self._save()
            self.stop_requested = True

    def _save(self) -> None:
        self.checkpointer.save(self)
        self.last_save_step = self.state.step

    def _finished(self) -> bool:
        """max_steps when set, else the epoch count. ``total_steps`` may be an estimate from the
        data (epochs mode): it sets the schedule's length, never where training stops."""
        if self.stop_requested:
            return True
        if self.job.train.max_steps is not None:
            return self.state.step >= self.job.train.max_steps
        return self.state.epoch >= self.job.train.epochs

    def _steps_of_epoch(self) -> Iterator[list[Batch]]:
        """grad_accum micro-batches at a time; the epoch ends on every rank together.

        The data pipeline already yields equal batch counts per rank; the one-flag all-reduce
        per step is the guard that turns any disagreement into a clean epoch end instead of a
        collective that hangs until the timeout.
        """
        stream = iter(self.train_data)
        while True:
            micro = list(itertools.islice(stream, self.job.train.grad_accum))
            (any_short,) = all_reduce_max([float(len(micro) < self.job.train.grad_accum)], self.dist)
            if any_short:
                if micro:
                    log.info(
                        "epoch %d: %d leftover micro-batches dropped at the epoch end",
                        self.state.epoch,
                        len(micro),
                    )
                for _ in stream:  # finish the epoch so the stream moves on to the next one
                    pass
                return
            yield micro

    def evaluate(self) -> dict[str, Any] | None:
        """Mean loss over this rank's part of the fixed validation set, all-reduced."""
        if self.eval_batches is None:
            return None
        started = time.perf_counter()
        loss_sum, targets, template = 0.0, 0, None
        stream = iter(self.eval_batches)
        while True:
            batch = next(stream, None)
            (any_left,) = all_reduce_max([float(batch is not None)], self.dist)
            if not any_left:
                break
            if batch is not None:
                template = batch
            if template is None:  # this rank had no eval data at all: borrow a shape
                template = self._first_train_like_batch()
            s, n = self.module.eval_sums(batch, template)
            loss_sum, targets = loss_sum + s, targets + n
        total_loss, total_targets = all_reduce_sum([loss_sum, targets], self.dist)
        if total_targets == 0:
            log.warning("eval set has no target tokens; skipping eval")
            return None
        eval_loss = total_loss / total_targets
        self.last_eval_step = self.state.step
        if self.state.best_eval_loss is None or eval_loss < self.state.best_eval_loss:
            self.state.best_eval_loss, self.state.best_step = eval_loss, self.state.step
        record = {
            "step": self.state.step,
            "eval_loss": eval_loss,
            "eval_ppl": perplexity(eval_loss),
            "eval_tokens": int(total_targets),
            "eval_seconds": round(time.perf_counter() - started, 3),
        }
        self._emit("on_eval", record)
        return record

    def _first_train_like_batch(self) -> Batch:
        import torch

        from trainer.data.packing import IGNORE_INDEX

        size = (self.job.train.micro_batch_size, 8)
        zeros = torch.zeros(size, dtype=torch.long)
        return {"input_ids": zeros, "labels": torch.full_like(zeros, IGNORE_INDEX), "position_ids": zeros}

    def _emit(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)


def gather_doc_ids(micro_batches: list[Batch], dist: DistInfo) -> list[int]:
    """Sorted ids of the documents this step trained on, over all ranks (an audit trail)."""
    import torch

    local = sorted({int(i) for b in micro_batches for i in b["doc_ids"].unique().tolist() if i >= 0})
    if dist.world_size == 1 or not torch.distributed.is_initialized():
        return local
    gathered: list[list[int]] = [[] for _ in range(dist.world_size)]
    torch.distributed.all_gather_object(gathered, local)
    return sorted({i for part in gathered for i in part})
