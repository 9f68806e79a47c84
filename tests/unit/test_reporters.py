"""``log.report_to``: the config, and a tracker that fails while logging (dropped with one
warning while the others keep reporting). The real trackers through the CLI, across a kill
and a resume: tests/integration/test_trackers.py."""

from __future__ import annotations

import importlib.util
import logging
from types import SimpleNamespace

import pytest

from trainer import reporters
from trainer.config import JobConfig, LogConfig
from trainer.errors import ConfigError


def test_report_to_names_are_checked_and_tensorboard_true_is_a_spelling_of_it():
    assert LogConfig(report_to=["WandB", "none", "wandb"]).trackers == ["wandb"]
    assert LogConfig(tensorboard=True).trackers == ["tensorboard"]
    assert LogConfig(report_to=["mlflow"], tensorboard=True).trackers == ["mlflow", "tensorboard"]
    with pytest.raises(ConfigError, match=r"--log.report_to: unknown tracker 'wandbb'.*did you mean wandb"):
        LogConfig(report_to=["wandbb"])


def test_scalars_keep_the_metrics_jsonl_keys():
    record = {"step": 3, "loss": 2.5, "lr": 1e-3, "lrs": [1e-3, 2e-3], "grad_norm": None, "doc_ids": [1, 2]}
    assert reporters.scalars(record) == {"loss": 2.5, "lr": 1e-3, "lrs/0": 1e-3, "lrs/1": 2e-3}


class Failing(reporters.Reporter):
    """A tracker whose logging breaks at step 2 (a server that went away)."""

    name = "wandb"
    calls: list[int] = []

    def start(self, run_id, step):
        return "r1"

    def log(self, values, step):
        Failing.calls.append(step)
        if step == 2:
            raise ConnectionError("server went away\nsecond line")


@pytest.mark.skipif(
    importlib.util.find_spec("tensorboard") is None, reason="needs the [track] extra: tensorboard"
)
def test_a_tracker_that_fails_mid_run_is_dropped_with_one_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(reporters.REPORTERS, "wandb", Failing)
    job = JobConfig(
        tokenizer="t", output_dir=str(tmp_path), log=LogConfig(report_to=["wandb", "tensorboard"])
    )
    callback = reporters.Reporters(job, SimpleNamespace(is_main=True))
    trainer = SimpleNamespace(state=SimpleNamespace(step=0))
    logger = logging.getLogger("dstrain")
    monkeypatch.setattr(logger, "propagate", True)
    with caplog.at_level(logging.WARNING, logger="dstrain"):
        callback.on_train_start(trainer)
        for step in (1, 2, 3):
            callback.on_log(trainer, {"step": step, "loss": 1.0 / step})
        callback.on_train_end(trainer)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [
        "report_to wandb: logging failed (ConnectionError: server went away); no more reports to it "
        "in this run, training goes on"
    ]
    assert Failing.calls == [1, 2]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([1.0, 0.5, 1 / 3])
