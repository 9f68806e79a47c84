"""metrics.jsonl / samples.jsonl with a torn last line (a crash or a full disk mid-write): every
reader skips it with one warning, a resume cuts it away, damage before the last line is an error."""

from __future__ import annotations

import json
import logging

import pytest

from trainer.errors import DataError
from trainer.jsonl import keep_through_step, read_jsonl

ROWS = [
    {"step": 1, "loss": 5.0, "lr": 1e-3, "tokens_per_s": 100.0},
    {"step": 2, "loss": 4.5, "lr": 1e-3, "tokens_per_s": 110.0},
    {"step": 2, "eval_loss": 4.7, "eval_ppl": 110.0},
    {"step": 3, "loss": 4.0, "lr": 1e-3, "tokens_per_s": 120.0},
]
TORN = '{"step": 4, "loss": 3.9, "lr": 0.00'


@pytest.fixture
def torn(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS) + TORN)
    return path


def test_a_torn_last_line_is_skipped_with_one_warning(torn, caplog):
    with caplog.at_level(logging.WARNING, logger="dstrain"):
        read = read_jsonl(torn)
    assert read.records == ROWS and read.torn_line == 5
    assert [r.getMessage() for r in caplog.records] == [
        f"{torn} line 5 is cut short (a crash or a full disk while it was written); it is left out"
    ]


def test_damage_before_the_last_line_is_an_error_naming_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + TORN + "\n" + json.dumps(ROWS[1]) + "\n")
    with pytest.raises(DataError, match="metrics.jsonl line 2: not JSON"):
        read_jsonl(path)


def test_resume_cuts_the_torn_line_and_the_records_past_the_step_keeping_lines_as_written(torn):
    keep_through_step(torn, 2)
    assert torn.read_text() == "".join(json.dumps(r) + "\n" for r in ROWS[:3])


def test_dstrain_plot_and_estimate_read_a_torn_file(torn):
    from launcher.estimate import measured_tokens_per_s
    from trainer.plots import read_metrics

    metrics = read_metrics(torn.parent)
    assert metrics.train == [(1, 5.0), (2, 4.5), (3, 4.0)] and metrics.evals == [(2, 4.7)]
    assert measured_tokens_per_s(torn.parent) == 115.0  # median of 110, 120 (the first left out)
