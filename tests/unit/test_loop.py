"""The Trainer's *when* logic with plain stand-ins for data and step (one rank, no engine)."""

from __future__ import annotations

import torch

from trainer.config import build_config
from trainer.data.packing import IGNORE_INDEX
from trainer.dist import DistInfo
from trainer.loop import Trainer
from trainer.train_module import StepResult, target_count


def batch(doc_id: int, targets: int = 3) -> dict[str, torch.Tensor]:
    """One row of ``targets + 1`` tokens of one document (labels shift: targets = len - 1)."""
    ids = torch.full((1, targets + 1), doc_id)
    return {
        "input_ids": ids,
        "labels": ids.clone(),
        "position_ids": torch.arange(targets + 1)[None],
        "doc_ids": ids,
    }


class Data:
    """``per_epoch`` micro-batches per epoch, doc ids ``epoch * 100 + i``; ends like TrainData."""

    def __init__(self, per_epoch: int) -> None:
        self.per_epoch, self.epoch, self.pos = per_epoch, 0, 0

    def __iter__(self):
        while self.pos < self.per_epoch:
            self.pos += 1
            yield batch(self.epoch * 100 + self.pos - 1)

    def end_epoch(self) -> dict:
        stats = {
            "epoch": self.epoch,
            "batches": self.pos,
            "skipped_docs": 0,
            "truncated_docs": 0,
            "no_target_docs": 0,
        }
        self.epoch, self.pos = self.epoch + 1, 0
        return stats


class Module:
    """Records every step's micro-batches; the loss sum is ``loss_per_target * targets``."""

    def __init__(self, loss_per_target=None, bad_calls=()) -> None:
        self.steps: list[list[dict]] = []
        self.loss_per_target = iter(loss_per_target or [])
        self.bad_calls = set(bad_calls)

    def train_step(self, micro, total_targets, step=0):
        self.steps.append(micro)
        assert total_targets == sum(target_count(b) for b in micro)
        per = next(self.loss_per_target, 1.0)
        bad = len(self.steps) in self.bad_calls  # the optimizer skipped a non-finite update
        loss = torch.tensor(float("nan") if bad else per * total_targets)
        return StepResult(loss_sum=loss, raw_grad_norm=float("inf") if bad else 1.0, lrs=[1e-3], applied=not bad)


class Recorder:
    def __init__(self):
        self.records = []

    def __getattr__(self, hook):
        return lambda trainer, *args: None

    def on_log(self, trainer, record):
        self.records.append(record)


def trained_doc_ids(module: Module) -> list[int]:
    return [
        int(b["doc_ids"][0, 0])
        for micro in module.steps
        for b in micro
        if (b["labels"] != IGNORE_INDEX).any()
    ]


def test_epochs_mode_stops_on_epochs_and_trains_the_leftover_micro_batches():
    """3 micro-batches per epoch with grad_accum 2: the third is trained in a step padded with a
    filler (nothing is dropped at the epoch end), and training stops after 2 epochs whatever
    the step estimate says."""
    job = build_config(base={"tokenizer": "t", "train": {"epochs": 2, "grad_accum": 2, "eval_every": 0}})
    module = Module()
    trainer = Trainer(job, DistInfo(), module, Data(3), None, total_steps=2, callbacks=[])
    state = trainer.fit()
    assert state.epoch == 2 and state.step == 4
    assert all(len(micro) == 2 for micro in module.steps), "every step runs grad_accum forwards"
    assert trained_doc_ids(module) == [0, 1, 2, 100, 101, 102]
    fillers = [b for micro in module.steps for b in micro if (b["labels"] == IGNORE_INDEX).all()]
    assert len(fillers) == 2 and all(f["input_ids"].shape == (1, 1) for f in fillers)


def test_logged_loss_is_the_token_mean_over_the_steps_since_the_previous_record():
    job = build_config(
        base={"tokenizer": "t", "train": {"max_steps": 5, "grad_accum": 1, "log_every": 2, "eval_every": 0}}
    )
    recorder = Recorder()
    data = [batch(i, targets=t) for i, t in enumerate([1, 3, 2, 2, 5])]
    module = Module(loss_per_target=[1.0, 2.0, 3.0, 5.0, 8.0])
    Trainer(job, DistInfo(), module, data, None, total_steps=5, callbacks=[recorder]).fit()
    got = [(r["step"], round(r["loss"], 6)) for r in recorder.records]
    # Steps 1-2: (1*1 + 2*3) / 4; steps 3-4: (3*2 + 5*2) / 4; then the last step alone.
    assert got == [(2, 1.75), (4, 4.0), (5, 8.0)]
    assert all(r["lr"] == 1e-3 and r["lrs"] == [1e-3] for r in recorder.records)


def test_a_step_without_target_tokens_is_not_taken():
    """A micro-batch with every label masked (an SFT row truncated to its prompt) is consumed but
    no optimizer step runs for a step that has no target token at all."""
    masked = batch(7)
    masked["labels"][:] = IGNORE_INDEX
    data = [masked, batch(8)]
    job = build_config(base={"tokenizer": "t", "train": {"max_steps": 1, "grad_accum": 1, "eval_every": 0}})
    module = Module()
    state = Trainer(job, DistInfo(), module, data, None, total_steps=1, callbacks=[]).fit()
    assert state.step == 1 and trained_doc_ids(module) == [8]


def test_non_finite_steps_are_skipped_counted_and_stop_the_run_after_max_bad_steps():
    import pytest

    from trainer.errors import TrainingError

    job = build_config(
        base={
            "tokenizer": "t",
            "train": {"max_steps": 4, "grad_accum": 1, "log_every": 1, "eval_every": 0, "max_bad_steps": 2},
        }
    )
    recorder = Recorder()
    module = Module(bad_calls={2})
    state = Trainer(
        job, DistInfo(), module, [batch(i) for i in range(10)], None, 4, callbacks=[recorder]
    ).fit()
    # 5 calls for 4 steps: the 2nd was skipped (no step, no loss in the record), nothing else changed.
    assert len(module.steps) == 5 and state.step == 4 and state.skipped_steps == 1
    assert [r["step"] for r in recorder.records] == [1, 2, 3, 4]
    assert all(r["loss"] == 1.0 for r in recorder.records) and recorder.records[-1]["skipped_steps"] == 1

    module = Module(bad_calls={2, 3})
    with pytest.raises(
        TrainingError, match=r"2 non-finite steps in a row after step 1 .*max_bad_steps 2.*none saved yet"
    ):
        Trainer(job, DistInfo(), module, [batch(i) for i in range(10)], None, 4, callbacks=[]).fit()


class Flag:
    """A Preemption stand-in: ``requested`` as the signal handler would set it."""

    requested = False


class Saves:
    def __init__(self):
        self.steps = []

    def save(self, step, protect=()):
        self.steps.append(step)


class SlowEvalModule(Module):
    """A stop signal arrives while the eval runs its second batch."""

    def __init__(self, flag: Flag) -> None:
        super().__init__()
        self.flag, self.eval_calls = flag, 0

    def eval_sums(self, batch):
        self.eval_calls += 1
        if self.eval_calls == 2:
            self.flag.requested = True
        return 1.0, target_count(batch)


def test_a_stop_signal_during_an_eval_abandons_it_and_saves_that_step():
    """Before: the eval ran all 20 batches, and the save came a step later (the next plan)."""
    job = build_config(
        base={
            "tokenizer": "t",
            "train": {"max_steps": 10, "grad_accum": 1, "eval_every": 2, "save_every": 0, "log_every": 1},
        }
    )
    flag, saves, recorder = Flag(), Saves(), Recorder()
    module = SlowEvalModule(flag)
    evals = [batch(900 + i) for i in range(20)]
    trainer = Trainer(
        job, DistInfo(), module, [batch(i) for i in range(10)], evals, 10, [recorder], saves, flag
    )
    state = trainer.fit()
    assert module.eval_calls == 2, "the eval went on after the stop signal"
    assert saves.steps == [2] and state.step == 2 and trainer.stop_requested
    assert state.last_eval_step is None and state.best_eval_loss is None  # nothing half-measured kept
