"""The Trainer's *when* logic with plain stand-ins for data and step (no engine needed)."""

from __future__ import annotations

from types import SimpleNamespace


def test_epochs_mode_stops_on_epochs_not_on_the_step_estimate():
    from trainer.config import build_config
    from trainer.dist import DistInfo
    from trainer.loop import Trainer

    class Data:
        """Three micro-batches per epoch; the loop must run both epochs whatever total_steps says."""

        def __iter__(self):
            return iter([{"n": i} for i in range(3)])

    class Module:
        steps = 0

        def train_step(self, micro):
            Module.steps += 1
            return SimpleNamespace(loss=1.0, grad_norm=None, target_tokens=1, tokens=1)

    job = build_config(base={"tokenizer": "t", "train": {"epochs": 2, "grad_accum": 1, "eval_every": 0}})
    trainer = Trainer(job, DistInfo(), Module(), Data(), None, total_steps=2, callbacks=[])
    state = trainer.fit()
    assert Module.steps == 6 and state.epoch == 2


def test_logged_loss_is_the_mean_over_the_steps_since_the_previous_record():
    from trainer.config import build_config
    from trainer.dist import DistInfo
    from trainer.loop import Trainer

    losses = iter([1.0, 2.0, 3.0, 5.0, 8.0])

    class Module:
        def train_step(self, micro):
            return SimpleNamespace(loss=next(losses), grad_norm=None, target_tokens=1, tokens=1)

    class Recorder:
        def __init__(self):
            self.records = []

        def __getattr__(self, hook):
            return lambda trainer, *args: None

        def on_step(self, trainer, record):
            self.records.append((record["step"], record["loss"]))

    job = build_config(
        base={"tokenizer": "t", "train": {"max_steps": 5, "grad_accum": 1, "log_every": 2, "eval_every": 0}}
    )
    recorder = Recorder()
    data = [{"n": i} for i in range(5)]
    Trainer(job, DistInfo(), Module(), data, None, total_steps=5, callbacks=[recorder]).fit()
    # Steps 1-2, 3-4, then the last step (always logged) alone.
    assert recorder.records == [(2, 1.5), (4, 4.0), (5, 8.0)]
