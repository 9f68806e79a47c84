"""`dstrain run --model.compile true` end to end on one CPU rank (the recipe's `zero.stage: 2`,
which one rank runs as ZeRO-0): the run finishes, says compilation is on, and the layers
compiled without falling back to eager."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import TINY_OVERRIDES
from tests.launch import run_group

pytestmark = pytest.mark.distributed


def test_a_compiled_run_finishes_and_logs_it(tmp_path, tiny_tokenizer_dir, tiny_corpus):
    recipe = {
        "stage": "pretrain",
        "output_dir": str(tmp_path / "run"),
        "tokenizer": str(tiny_tokenizer_dir),
        "model": {"overrides": dict(TINY_OVERRIDES)},
        "data": {"train": [str(tiny_corpus)], "max_seq_len": 64, "buffer_size": 64},
        "optim": {"lr": 3.0e-3},
        "schedule": {"name": "cosine", "warmup_steps": 2},
        "train": {"micro_batch_size": 4, "max_steps": 4, "log_every": 2},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    dstrain = Path(sys.executable).parent / "dstrain"
    proc = run_group(
        [str(dstrain), "run", str(path), "--gpus", "1", "--model.compile", "true"],
        cwd=tmp_path,
        TORCH_LOGS="recompiles,graph_breaks",
    )
    both = proc.stdout + proc.stderr
    assert proc.returncode == 0, both[-5000:]
    assert "model.compile: torch.compile on each of the 2 decoder layers (Qwen2DecoderLayer)" in both
    # Eval (no grad) compiles its own graph once; a recompile loop or a graph break would show here.
    assert "recompile_limit" not in both and "Graph break" not in both, both[-5000:]
    losses = [
        json.loads(line)["loss"]
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    assert len(losses) == 2 and losses[-1] < losses[0]
