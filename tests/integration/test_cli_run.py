"""`dstrain run` end to end on 2 CPU ranks: the files people use, with numbers that make sense."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import TINY_OVERRIDES
from tests.launch import run_group

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_tokenizer_dir, tiny_corpus):
    root = tmp_path_factory.mktemp("cli")
    recipe = {
        "stage": "pretrain",
        "output_dir": str(root / "run"),
        "tokenizer": str(tiny_tokenizer_dir),
        "model": {
            "overrides": dict(TINY_OVERRIDES),
            "gradient_checkpointing": True,
        },
        "data": {
            "train": [str(tiny_corpus)],
            "max_seq_len": 64,
            "buffer_size": 64,
            "validation_fraction": 0.1,
        },
        "optim": {"lr": 3.0e-3},
        "schedule": {"name": "cosine", "warmup_steps": 4},
        "train": {
            "micro_batch_size": 4,
            "grad_accum": 2,
            "max_steps": 24,
            "log_every": 4,
            "eval_every": 12,
            "save_every": 12,
        },
        "log": {"sample_prompts": ["doc 1:", "the river"], "sample_tokens": 8},
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    dstrain = Path(sys.executable).parent / "dstrain"
    # Rank 0 pauses SLEEP_S inside each eval: tokens/s must not count it (test below).
    proc = run_group(
        [str(dstrain), "run", str(path), "--gpus", "2", "--zero.stage", "3"],
        cwd=root,
        DSTRAIN_FAULT="sleep_rank0_in_eval",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return root / "run", proc


def test_prints_the_command_and_writes_the_resolved_config(run_dir):
    out, proc = run_dir
    assert "launcher.spawn" in proc.stdout and "trainer/main.py" in proc.stdout
    assert "--nproc-per-node 2" in proc.stdout
    run_yaml = yaml.safe_load((out / "run.yaml").read_text())
    assert run_yaml["zero"]["stage"] == 3, "the CLI override reached the resolved config"
    ds = json.loads((out / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 2


def test_metrics_jsonl_has_the_documented_fields_and_the_loss_falls(run_dir):
    out, _ = run_dir
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train] == [4, 8, 12, 16, 20, 24]
    for r in train:
        assert {
            "step",
            "loss",
            "lr",
            "grad_norm",
            "tokens",
            "tokens_per_s",
            "time",
            "mfu",
            "mem_gb",
            "data_wait_s",
        } <= set(r)
        assert r["mfu"] is None, "no MFU on a CPU (no dense peak to divide by), never a made-up number"
        assert r["mem_gb"] > 0 and r["data_wait_s"] >= 0 and r["tokens_per_s"] > 0
    tokens = [r["tokens"] for r in train]
    assert tokens == sorted(tokens) and tokens[0] > 0
    # Non-pad tokens of all ranks: at most micro x seq x accum x ranks per step.
    assert tokens[-1] <= 24 * 4 * 64 * 2 * 2
    assert train[-1]["loss"] < train[0]["loss"] - 0.5
    assert [r["step"] for r in evals] == [12, 24]
    for r in evals:
        assert r["eval_ppl"] == pytest.approx(2.718281828 ** r["eval_loss"], rel=1e-6)


def test_tokens_per_s_leaves_out_the_time_spent_in_evals(run_dir):
    """Step time implied by the records (tokens of each window over its tokens/s) stays below the
    run's elapsed time minus the pause of the eval at step 12 (rank 0 sleeps SLEEP_S in it, after
    each eval batch): a slow eval never drags tokens/s down."""
    from trainer.faults import SLEEP_S

    out, _ = run_dir
    train = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if "loss" in r]
    windows = [b["tokens"] - a["tokens"] for a, b in zip([{"tokens": 0}] + train, train, strict=False)]
    step_seconds = sum(n / r["tokens_per_s"] for n, r in zip(windows, train, strict=True))
    assert step_seconds <= train[-1]["time"] - SLEEP_S + 0.5, (step_seconds, train[-1]["time"])


def test_only_rank0_reports_progress(run_dir):
    out, proc = run_dir
    log = (out / "train.log").read_text()
    assert "[rank0]" in log and "step 24" in log
    assert not [line for line in log.splitlines() if line.startswith("[rank1]") and " INFO " in line]
    both = proc.stdout + proc.stderr
    assert not [line for line in both.splitlines() if line.startswith("[rank1]") and " INFO " in line]
    assert "sample at step 24: 'doc 1:' ->" in log
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["prompt"]) for r in samples] == [
        (12, "doc 1:"),
        (12, "the river"),
        (24, "doc 1:"),
        (24, "the river"),
    ]
    # A 24-step model may continue one prompt with blank lines; it writes text for the others.
    assert any(r["text"].strip() for r in samples), "the model wrote something"


def test_outputs_people_use(run_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = run_dir
    png = (out / "loss_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    model = AutoModelForCausalLM.from_pretrained(out / "hf")
    tokenizer = AutoTokenizer.from_pretrained(out / "hf")
    assert (out / "hf" / "generation_config.json").is_file()
    assert all(p.numel() > 0 for p in model.parameters())
    ids = tokenizer("doc 3: the of and", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(input_ids=ids).logits).all()
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_24" and (ckpts / "step_24" / "COMPLETE").is_file()


def test_auto_settings_are_chosen_logged_and_recorded_on_cpu(tmp_path, tiny_tokenizer_dir, tiny_corpus):
    """`dstrain run` with zero.stage, micro-batch, checkpointing and workers all auto, on one CPU
    rank: the ranks take the CPU's fixed choice, log it with its reason and write it to run.yaml;
    a resume keeps it."""
    recipe = {
        "stage": "pretrain",
        "output_dir": str(tmp_path / "run"),
        "tokenizer": str(tiny_tokenizer_dir),
        "model": {"overrides": dict(TINY_OVERRIDES), "gradient_checkpointing": "auto"},
        "data": {"train": [str(tiny_corpus)], "max_seq_len": 64, "buffer_size": 64, "num_workers": "auto"},
        "train": {"micro_batch_size": "auto", "global_batch_size": 4, "max_steps": 2, "eval_every": 0},
        "zero": {"stage": "auto"},
        "log": {"plot": False},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    dstrain = Path(sys.executable).parent / "dstrain"
    proc = run_group([str(dstrain), "run", str(path), "--gpus", "1"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    text = proc.stdout + proc.stderr + (tmp_path / "run" / "train.log").read_text()
    assert "planner: zero.stage 0" in text and "CPU ranks take a fixed choice" in text, text[-3000:]
    assert "data.num_workers auto -> 1" in text
    saved = yaml.safe_load((tmp_path / "run" / "run.yaml").read_text())
    assert saved["zero"]["stage"] == 0
    assert (saved["train"]["micro_batch_size"], saved["train"]["grad_accum"]) == (4, 1)
    assert saved["model"]["gradient_checkpointing"] is False and saved["data"]["num_workers"] == 1
    assert json.loads((tmp_path / "run" / "ds_config.json").read_text())["zero_optimization"]["stage"] == 0
    # a resume keeps the checkpoint's choice (and says so) rather than planning anew
    proc = run_group(
        [str(dstrain), "run", str(path), "--gpus", "1", "--resume", "--train.max_steps", "3"], cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    text = proc.stdout + proc.stderr + (tmp_path / "run" / "train.log").read_text()
    assert "planner: kept the checkpoint's choice (zero.stage 0, micro-batch 4 x accum 1" in text, text[
        -3000:
    ]
