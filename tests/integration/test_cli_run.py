"""`dstrain run` end to end on 2 CPU ranks: the files people use, with numbers that make sense."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from tests.faults import runs as runs_lib
from tests.helpers import TINY_OVERRIDES, make_docs, write_parquet
from tests.launch import DSTRAIN, run_group

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def short_docs(tmp_path_factory) -> tuple[Path, dict[int, str]]:
    """3000 numbered documents short enough (under 64 tokens) that none is cut into chunks: a
    document named in a step's doc_ids was fed whole, unless it is a packer's carry at the end.
    Enough of them that 24 steps stay inside the first epoch (no document is fed twice)."""
    docs = make_docs(3000, seed=2, min_words=3, max_words=16)
    path = write_parquet(tmp_path_factory.mktemp("short_docs") / "train.parquet", docs)
    return path, dict(enumerate(docs))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_tokenizer_dir, short_docs):
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
            "train": [str(short_docs[0])],
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
            "log_every": 1,
            "eval_every": 12,
            "save_every": 12,
        },
        "log": {"sample_prompts": ["doc 1:", "the river"], "sample_tokens": 8, "doc_ids": True},
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
    assert [r["step"] for r in train] == list(range(1, 25))
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
    assert train[-1]["loss"] < train[0]["loss"] - 0.5
    assert [r["step"] for r in evals] == [12, 24]
    for r in evals:
        assert r["eval_ppl"] == pytest.approx(2.718281828 ** r["eval_loss"], rel=1e-6)


def test_tokens_count_every_ranks_documents(run_dir, short_docs, tiny_tokenizer_dir):
    """The logged token count against the documents fed (doc_ids of every step, both ranks),
    tokenized here as the pipeline does (no special tokens, EOS appended): never more than
    those documents hold, and short of it by at most one carried document per rank. Rows are
    packed full, so each step adds micro 4 x accum 2 x 2 ranks x 64 tokens."""
    from transformers import AutoTokenizer

    out, _ = run_dir
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    train = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if "loss" in r]
    assert {r["epoch"] for r in train} == {0}, "the run must stay inside one epoch"
    fed = sorted({i for r in train for i in r["doc_ids"]})
    lengths = {i: len(tokenizer(short_docs[1][i], add_special_tokens=False)["input_ids"]) + 1 for i in fed}
    assert max(lengths.values()) <= 64, "every document fits one row uncut"
    total = sum(lengths.values())
    assert total - 2 * 64 <= train[-1]["tokens"] <= total, (train[-1]["tokens"], total)
    steps = [b["tokens"] - a["tokens"] for a, b in zip([{"tokens": 0}, *train], train, strict=False)]
    assert steps == [4 * 2 * 2 * 64] * 24


def test_tokens_per_s_is_the_time_in_steps_only(run_dir):
    """Step time implied by the records (tokens of each step over its tokens/s) stays below the
    run's elapsed time minus the pause of the eval at step 12 (rank 0 sleeps SLEEP_S in it,
    after each eval batch): a slow eval never drags tokens/s down. And it is the real step time:
    over the steps with no eval or save before them, at least 60% of the wall time between
    their records (the rest is logging)."""
    from trainer.faults import SLEEP_S

    out, _ = run_dir
    train = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if "loss" in r]
    windows = [b["tokens"] - a["tokens"] for a, b in zip([{"tokens": 0}, *train], train, strict=False)]
    implied = [n / r["tokens_per_s"] for n, r in zip(windows, train, strict=True)]
    assert sum(implied) <= train[-1]["time"] - SLEEP_S + 0.5, (sum(implied), train[-1]["time"])
    plain = [k for k in range(1, 24) if train[k - 1]["step"] != 12]  # not step 1, not after the eval
    wall = sum(train[k]["time"] - train[k - 1]["time"] for k in plain)
    assert sum(implied[k] for k in plain) >= 0.6 * wall, (sum(implied[k] for k in plain), wall)


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


# ---------------------------------------------------------------- keep_best, parameter offload

BEST_STEPS = 12


@pytest.fixture(scope="module")
def best_runs(tmp_path_factory, tiny_tokenizer_dir, short_docs):
    """ZeRO-3 through `dstrain run`, keeping the last checkpoint and the best: 6 steps that
    learn (evals at 3 and 6), then a `--resume` to step 12 at an lr of 2.0, which wrecks the
    model (evals at 9 and 12 are worse), so the best checkpoint is an early one that keep_last
    1 would prune. The first 6 steps again with the parameters offloaded to the CPU."""
    root = tmp_path_factory.mktemp("best")
    sections = {
        "data": {"train": [str(short_docs[0])], "validation_fraction": 0.1, "eval_max_batches": 4},
        "schedule": {"name": "constant", "warmup_steps": 0},
        "train": {
            "max_steps": BEST_STEPS // 2,
            "eval_every": 3,
            "save_every": 3,
            "keep_last": 1,
            "keep_best": True,
        },
        "zero": {"stage": 3},
    }
    wreck = ["--resume", "latest", "--train.max_steps", str(BEST_STEPS), "--optim.lr", "2.0"]
    runs = {}
    for name, extra in (("plain", []), ("offload", ["--zero.offload_params", "true"])):
        path = runs_lib.make_recipe(root, tiny_tokenizer_dir, name, **sections)
        proc = run_group([str(DSTRAIN), "run", str(path), "--gpus", "2", *extra], cwd=root)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        runs[name] = (root / name, path)
    first_half = records(root / "plain")
    proc = run_group([str(DSTRAIN), "run", str(runs["plain"][1]), "--gpus", "2", *wreck], cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return runs, first_half, wreck


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_zero3_with_offloaded_parameters_trains_the_same_losses(best_runs):
    runs, plain, _ = best_runs
    offload = records(runs["offload"][0])
    ds = json.loads((runs["offload"][0] / "ds_config.json").read_text())
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert (
        "offload_param"
        not in json.loads((runs["plain"][0] / "ds_config.json").read_text())["zero_optimization"]
    )
    want = {r["step"]: r["loss"] for r in plain if "loss" in r}
    got = {r["step"]: r["loss"] for r in offload if "loss" in r}
    assert sorted(got) == sorted(want) == list(range(1, BEST_STEPS // 2 + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-6), step
    assert want[BEST_STEPS // 2] < want[1], "the run learned"


def test_keep_best_keeps_the_lowest_eval_loss_through_pruning_and_a_resume(best_runs):
    runs, _, _ = best_runs
    out = runs["plain"][0]
    evals = {r["step"]: r["eval_loss"] for r in records(out) if "eval_loss" in r}
    assert sorted(evals) == [3, 6, 9, 12]
    best = min(evals, key=evals.get)
    assert best in (3, 6) and evals[12] > evals[best], f"the scenario needs an early best: {evals}"
    ckpts = out / "checkpoints"
    kept = sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step_"))
    assert kept == sorted([f"step_{best}", f"step_{BEST_STEPS}"]), (kept, evals)
    assert (ckpts / f"step_{best}" / "COMPLETE").is_file()
    assert (ckpts / "latest").read_text() == f"step_{BEST_STEPS}"


def test_a_torn_last_metrics_line_does_not_stop_a_resume(best_runs):
    """A full disk cut the last line of metrics.jsonl short. `dstrain run --resume` from the
    best checkpoint warns once, drops the torn line with the records past the checkpoint, and
    trains those steps again."""
    runs, _, wreck = best_runs
    out, recipe = runs["plain"]
    before = {r["step"]: r["loss"] for r in records(out) if "loss" in r}
    evals = {r["step"]: r["eval_loss"] for r in records(out) if "eval_loss" in r}
    best = min(evals, key=evals.get)
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 13, "loss": 4.1')
    torn_line = len((out / "metrics.jsonl").read_text().splitlines())
    ckpt = out / "checkpoints" / f"step_{best}"
    args = [*wreck[2:], "--resume", str(ckpt)]
    proc = run_group([str(DSTRAIN), "run", str(recipe), "--gpus", "2", *args], cwd=out.parent)
    both = proc.stdout + proc.stderr
    assert proc.returncode == 0, both[-5000:]
    assert "Traceback" not in both
    assert f"metrics.jsonl line {torn_line} is cut short" in both, both[-3000:]
    after = records(out)  # every line parses again
    losses = [(r["step"], r["loss"]) for r in after if "loss" in r]
    assert [s for s, _ in losses] == list(range(1, BEST_STEPS + 1))
    # Steps up to the checkpoint are the records kept; after it, the same steps trained again
    # (the same lr as the second half when the best is step 6, where that half resumed from).
    again = [s for s, _ in losses if s <= best or best == BEST_STEPS // 2]
    for step, loss in losses:
        if step in again:
            assert loss == pytest.approx(before[step], rel=1e-6, abs=1e-6), step
