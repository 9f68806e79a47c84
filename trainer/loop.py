"""The Trainer decides *when*: steps, epochs, eval cadence, save cadence, stopping.

*What* a step does lives in :class:`trainer.train_module.TrainModule`; side effects live in
callbacks (:mod:`trainer.metrics`); saving lives in :mod:`trainer.checkpoint`.

One small all-reduce per optimizer step carries what the ranks must agree on before the
first forward: the step's target and token counts (the loss is normalised by the targets of
the whole step), how many ranks ran out of data (the epoch ends when all have; until then a
rank that ran out runs one-token filler micro-batches, so every rank runs the same number of
forwards), whether a rank failed to read its data (the others stop too instead of hanging),
and whether a pre-emption signal arrived (every rank then saves the same step). Losses stay on
the device and are reduced on log steps only, with the metrics the callbacks recorded.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch

from trainer.config import JobConfig
from trainer.data.packing import Batch, filler_batch
from trainer.dist import DistInfo, all_gather_objects, all_reduce_max, all_reduce_sum, collective
from trainer.errors import DataError, TrainingError
from trainer.faults import fault
from trainer.metrics import Callback, MetricRecorder, perplexity
from trainer.train_module import StepResult, TrainModule, target_count, token_count

#: Per-epoch document counts (``TrainData.end_epoch``) summed over ranks into the epoch record.
EPOCH_COUNTS = ("skipped_docs", "truncated_docs", "no_target_docs")

log = logging.getLogger("dstrain")


@dataclass
class TrainState:
    """The counters a checkpoint restores: optimizer steps, epoch, tokens trained on."""

    step: int = 0  # optimizer steps applied (a skipped step does not count)
    epoch: int = 0  # epochs finished
    tokens_seen: int = 0  # non-pad tokens trained on, all ranks
    target_tokens_seen: int = 0  # of those, the tokens with a loss (targets)
    best_eval_loss: float | None = None  # lowest eval loss so far (None: no eval yet)
    best_step: int | None = None  # the step of best_eval_loss
    last_eval_step: int | None = None  # the step the last eval ran at
    last_save_step: int | None = None  # the step the last save was of
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradient

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


@dataclass
class StepPlan:
    """One optimizer step's micro-batches and what the ranks agreed on about it."""

    micro_batches: list[Batch]  # this rank's real micro-batches (fillers are added to run it)
    targets: int  # target tokens of the step, all ranks
    tokens: int  # non-pad tokens of the step, all ranks
    epoch_done: bool  # every rank has run out of data: this is the epoch's last step
    preempt: bool  # some rank got a stop signal
    data_wait_s: float  # this rank's time spent waiting for its micro-batches


def total_steps_for(job: JobConfig, train_data: Any) -> int:
    """max_steps when set, else the optimizer steps of ``train.epochs`` epochs, counted exactly
    from the data (``TrainData.count_batches``, a collective: every rank calls this)."""
    if job.train.max_steps is not None:
        return job.train.max_steps
    counted = train_data.count_batches(job.train.epochs)
    return max(1, sum(epoch_steps(per_rank, job.train.grad_accum) for per_rank in counted))


def epoch_steps(micro_batches_per_rank: list[int], grad_accum: int) -> int:
    """Optimizer steps of an epoch: ranks that run out early run filler micro-batches until the
    rank with the most has run all of its own."""
    return -(-max(micro_batches_per_rank) // grad_accum)


@dataclass(eq=False)
class Trainer:
    """Runs the loop over the stateful data stream until max_steps or the last epoch."""

    job: JobConfig
    dist: DistInfo
    module: TrainModule
    train_data: Any  # TrainData, or any iterable of batches
    eval_batches: Iterable[Batch] | None
    total_steps: int  # the schedule's length in optimizer steps
    callbacks: list[Callback]
    checkpointer: Any = None
    preemption: Any = None

    def __post_init__(self) -> None:
        self.state = TrainState()
        self.stop_requested = False
        self.metrics = MetricRecorder(self.dist)
        self._stream: Iterator[Batch] | None = None
        self._plan: StepPlan | None = None
        self._window_loss: torch.Tensor | None = None
        self._window_targets = 0
        self._steps_in_epoch = 0
        self._bad_in_a_row = 0
        self._stopped_eval = False  # an eval was abandoned for a stop signal
        self._filler = filler_batch(attention_mask=not self.job.data.pack)

    # -- when ----------------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        """max_steps when set, else the epoch count. ``total_steps`` (epochs mode: counted from
        the data) sets the schedule's length, never where training stops."""
        if self.stop_requested:
            return True
        if self.job.train.max_steps is not None:
            return self.state.step >= self.job.train.max_steps
        return self.state.epoch >= self.job.train.epochs

    def is_log_step(self) -> bool:
        """Every ``log_every`` steps, and the last step (of max_steps, or of the last epoch)."""
        step = self.state.step
        return step % self.job.train.log_every == 0 or step == self.total_steps or self._last_epoch_step

    @property
    def _last_epoch_step(self) -> bool:
        plan = self._plan
        return (
            plan is not None
            and plan.epoch_done
            and self.job.train.max_steps is None
            and self.state.epoch + 1 >= self.job.train.epochs
        )

    def fit(self) -> TrainState:
        """Train until max_steps, the last epoch, or an agreed pre-emption signal."""
        self._emit("on_train_start")
        while not self.finished:
            plan = self._plan = self._plan_step()
            if plan.targets:
                self._train_step(plan)
            if plan.epoch_done:
                self._end_epoch()
            self._after_step(plan, stepped=bool(plan.targets))
        if not self.stop_requested and self.state.last_eval_step != self.state.step:
            self.evaluate()
            if self._stopped_eval:  # the final eval was abandoned: save (below) and exit 75
                log.warning("pre-emption signal received: saving step %d and stopping", self.state.step)
                self.stop_requested = True
        if self.checkpointer and self.state.last_save_step != self.state.step:
            self._save()
        self._emit("on_train_end")
        return self.state

    def _plan_step(self) -> StepPlan:
        """Pull this rank's micro-batches and agree with the other ranks (one all-reduce)."""
        accum = self.job.train.grad_accum
        fault("in_plan", self.state.step + 1, self.dist.rank)  # tests: a rank that stalls here
        started = time.perf_counter()
        micro: list[Batch] = []
        failed: Exception | None = None
        try:
            if self._stream is None:
                self._stream = iter(self.train_data)
            micro = list(itertools.islice(self._stream, accum))
        except Exception as exc:  # re-raised below, after telling the other ranks
            failed = exc
        data_wait_s = time.perf_counter() - started
        preempt = self.preemption is not None and self.preemption.requested
        local = [
            sum(target_count(b) for b in micro),
            sum(token_count(b) for b in micro),
            float(len(micro) < accum),
            float(preempt),
            float(failed is not None),
        ]
        targets, tokens, ran_out, preempted, errors = all_reduce_sum(
            local, self.dist, f"the start of step {self.state.step + 1}"
        )
        if failed is not None:
            raise failed
        if errors:
            raise DataError(
                f"rank {self.dist.rank}: another rank failed while reading its data; its log names the cause"
            )
        return StepPlan(
            micro_batches=micro,
            targets=int(targets),
            tokens=int(tokens),
            epoch_done=ran_out == self.dist.world_size,
            preempt=bool(preempted),
            data_wait_s=data_wait_s,
        )

    def _train_step(self, plan: StepPlan) -> None:
        fillers = [self._filler] * (self.job.train.grad_accum - len(plan.micro_batches))
        self._emit("pre_step")
        started = time.perf_counter()
        try:
            with collective(f"step {self.state.step + 1}", self.dist):  # DeepSpeed's own reductions
                result = self.module.train_step(
                    plan.micro_batches + fillers, plan.targets, self.state.step + 1
                )
        except torch.OutOfMemoryError:
            raise TrainingError(
                out_of_memory_message(self.job, self.dist, self.state.step + 1, plan)
            ) from None
        if not result.applied:
            self._skip_bad_step(result)
            return
        self._bad_in_a_row = 0
        self.state.step += 1
        self._steps_in_epoch += 1
        self.state.tokens_seen += plan.tokens
        self.state.target_tokens_seen += plan.targets
        loss_sum = result.loss_sum
        self._window_loss = loss_sum if self._window_loss is None else self._window_loss + loss_sum
        self._window_targets += plan.targets
        self._emit("post_step", plan, result, time.perf_counter() - started)
        if self.is_log_step():
            self._log_step(plan, result)

    def _skip_bad_step(self, result: StepResult) -> None:
        """A non-finite loss or gradient: the optimizer skipped the update and the schedule did
        not move, so neither does the step count; too many in a row stop the run."""
        self.state.skipped_steps += 1
        self._bad_in_a_row += 1
        step = self.state.step + 1
        log.warning(
            "step %d skipped: non-finite loss or gradient norm (%s); %d in a row, %d in all",
            step,
            result.grad_norm,
            self._bad_in_a_row,
            self.state.skipped_steps,
        )
        limit = self.job.train.max_bad_steps
        if limit and self._bad_in_a_row >= limit:
            good = self.state.last_save_step
            where = f"{self.job.output_dir}/checkpoints/step_{good}" if good else "none saved yet"
            raise TrainingError(
                f"{self._bad_in_a_row} non-finite steps in a row after step {self.state.step} (train.max_bad_steps "
                f"{limit}): the loss diverged; the last good checkpoint is {where}: resume from it with a "
                "lower --optim.lr or more warmup, or look at the data of these steps (log.doc_ids)"
            )

    def _log_step(self, plan: StepPlan, result: StepResult) -> None:
        """Reduce the window's loss and the callbacks' metrics (rank 0 writes the record)."""
        assert self._window_loss is not None
        self.metrics.record("loss_sum", float(self._window_loss), "sum")
        reduced = self.metrics.reduce()
        record: dict[str, Any] = {
            "step": self.state.step,
            "epoch": self.state.epoch,
            # The mean over the target tokens of the steps since the previous record.
            "loss": reduced.pop("loss_sum") / max(self._window_targets, 1),
            "lr": result.lrs[0],
            "lrs": result.lrs,
            "grad_norm": result.grad_norm,
            "skipped_steps": self.state.skipped_steps,
            "tokens": self.state.tokens_seen,
            **reduced,
        }
        self._window_loss, self._window_targets = None, 0
        if self.job.log.doc_ids:
            record["doc_ids"] = gather_doc_ids(plan.micro_batches, self.dist)
        self._emit("on_log", record)

    def _end_epoch(self) -> None:
        if self._steps_in_epoch == 0 and self.state.tokens_seen == 0:
            raise DataError(
                f"epoch {self.state.epoch} has no target tokens on any rank: every document was "
                "empty, skipped or fully masked; check data.train and the text column or format"
            )
        # Ranks hold equal rows, not equal tokens: how far apart they ended (once per epoch), and
        # what every rank skipped (empty documents) or cut (SFT samples past max_seq_len).
        stats = self.train_data.end_epoch()
        per_rank = all_gather_objects(dict(stats), self.dist, "the end of an epoch")
        self._check_epoch_count([s["batches"] for s in per_rank])
        self._emit(
            "on_epoch_end",
            {
                "step": self.state.step,
                "epoch_end": self.state.epoch,
                "micro_batches_per_rank": [s["batches"] for s in per_rank],
                **{key: sum(s[key] for s in per_rank) for key in EPOCH_COUNTS},
            },
        )
        self.state.epoch += 1
        self._stream = None
        self._steps_in_epoch = 0

    def _check_epoch_count(self, batches: list[int]) -> None:
        """Warn when an epoch ended off the count that sized the LR schedule (a resume on another
        world size re-deals the epoch's rest, which the count does not replay)."""
        counted = getattr(self.train_data, "counted_batches", None)
        epoch = self.state.epoch
        if not counted or epoch >= len(counted) or counted[epoch] == batches:
            return
        accum = self.job.train.grad_accum
        off = epoch_steps(batches, accum) - epoch_steps(counted[epoch], accum)
        log.warning(
            "epoch %d yielded %s micro-batches per rank where %s were counted: the LR schedule ends "
            "%d optimizer step(s) %s",
            epoch,
            batches,
            counted[epoch],
            abs(off),
            "too early" if off > 0 else "too late",
        )

    def _after_step(self, plan: StepPlan, stepped: bool) -> None:
        """Eval, save and pre-emption, in that order, at the optimizer-step boundary."""
        train, step = self.job.train, self.state.step
        if stepped:
            new_best = False
            if train.eval_every and step % train.eval_every == 0:
                new_best = self.evaluate() is not None and self.state.best_step == step
            save_due = bool(train.save_every and step % train.save_every == 0)
            if self.checkpointer and (save_due or (new_best and train.keep_best)):
                self._save()
        if plan.preempt or self._stopped_eval:
            log.warning("pre-emption signal received: saving step %d and stopping", step)
            if self.checkpointer and self.state.last_save_step != step:
                self._save()
            self.stop_requested = True

    def _save(self) -> None:
        self.state.last_save_step = self.state.step
        protect = [self.state.best_step] if self.job.train.keep_best and self.state.best_step else []
        self._emit("pre_save")
        self.checkpointer.save(self.state.step, protect=protect)
        self._emit("post_save")

    # -- eval ----------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, Any] | None:
        """Mean loss over this rank's part of the fixed validation set, all-reduced.

        A stop signal abandons the eval at the next batch (None is returned and ``_stopped_eval``
        set): a full hold-out can outlast a scheduler's lead before its kill, and the
        pre-emption save must come first. The flag rides on the all-reduce each batch does
        anyway, so every rank leaves at the same batch.
        """
        if self.eval_batches is None:
            return None
        self._emit("pre_eval")
        started = time.perf_counter()
        loss_sum, targets = 0.0, 0
        stream = iter(self.eval_batches)
        while True:
            # Ranks hold different numbers of eval batches; each forward is collective under ZeRO-3.
            batch = next(stream, None)
            stop = self.preemption is not None and self.preemption.requested
            any_left, any_stop = all_reduce_max(
                [float(batch is not None), float(stop)], self.dist, f"the eval at step {self.state.step}"
            )
            if any_stop:
                log.warning("stop signal during the eval at step %d: eval abandoned", self.state.step)
                self._stopped_eval = True
                self._emit("post_eval")
                return None
            if not any_left:
                break
            with collective(f"the eval at step {self.state.step}", self.dist):  # ZeRO-3 gathers
                s, n = self.module.eval_sums(batch if batch is not None else self._filler)
            loss_sum, targets = loss_sum + s, targets + n
            fault("in_eval", self.state.step, self.dist.rank)  # tests: a kill half-way through
        total_loss, total_targets = all_reduce_sum(
            [loss_sum, targets], self.dist, f"the eval at step {self.state.step}"
        )
        self.state.last_eval_step = self.state.step
        self._emit("post_eval")
        if total_targets == 0:
            log.warning("eval set has no target tokens; skipping eval")
            return None
        eval_loss = total_loss / total_targets
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

    def _emit(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)


def out_of_memory_message(job: JobConfig, dist: DistInfo, step: int, plan: StepPlan) -> str:
    """Rank, step, batch shape and the next thing to try, cheapest first."""
    train, zero = job.train, job.zero
    shapes = sorted({tuple(b["input_ids"].shape) for b in plan.micro_batches}) or [(0, 0)]
    tries = []
    if train.micro_batch_size > 1:
        tries.append(
            f"--train.micro_batch_size {train.micro_batch_size // 2} --train.grad_accum {train.grad_accum * 2} "
            "(the same global batch)"
        )
    if not job.model.gradient_checkpointing:
        tries.append("--model.gradient_checkpointing true")
    if zero.stage < 3:
        tries.append(f"--zero.stage {zero.stage + 1}")
    elif not zero.offload_optimizer:
        tries.append("--zero.offload_optimizer true")
    elif not zero.offload_params:
        tries.append("--zero.offload_params true")
    tries.append(f"a shorter --data.max_seq_len than {job.data.max_seq_len}")
    return (
        f"rank {dist.rank} ran out of memory at step {step}: micro-batch {shapes[-1][0]} x {shapes[-1][1]} "
        f"tokens (max_seq_len {job.data.max_seq_len}), ZeRO-{zero.stage}"
        f"{', optimizer offload' if zero.offload_optimizer else ''} on {dist.world_size} rank(s); "
        f"try {'; or '.join(tries)} (dstrain estimate shows what fits)"
    )


def gather_doc_ids(micro_batches: list[Batch], dist: DistInfo) -> list[int]:
    """Sorted ids of the documents this step trained on, over all ranks (an audit trail)."""
    local = sorted({int(i) for b in micro_batches for i in b["doc_ids"].unique().tolist() if i >= 0})
    return sorted({i for part in all_gather_objects(local, dist) for i in part})
