"""The paths users take, through the CLI they type: pre-tokenized data, every ``--resume`` form,
a finished run, changed batch settings on resume, a larger world size, the checkpoint tools and
the offline exports (fp32 and bf16 runs, ZeRO 0/1/2 checkpoints and an output dir)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from tests.faults import runs
from tests.launch import DSTRAIN, run_group

pytestmark = pytest.mark.distributed
PROBE = torch.arange(1, 40).view(3, 13)


def dstrain(*args, cwd) -> tuple[int, str]:
    proc = run_group([DSTRAIN, *map(str, args)], cwd=cwd)
    return proc.returncode, proc.stdout + proc.stderr


def logits(model_dir, dtype=torch.float32) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    with torch.no_grad():
        return model(input_ids=PROBE).logits.float()


def weights_dtypes(model_dir) -> set[str]:
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return {str(f.get_slice(k).get_dtype()) for k in f.keys()}


def tree_mtimes(path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in sorted(path.rglob("*"))}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("paths")


def test_pretokenized_data_every_resume_form_and_the_offline_tools(root, tiny_tokenizer_dir):
    """One rank, ZeRO-0, fp32, on shards from `dstrain data tokenize`, with the default held-out
    split: a fresh `--resume auto`, `--resume PATH`, a bare `--resume` of the finished run, a
    resume with another micro-batch size and shuffle buffer, then `dstrain ckpt list`,
    `dstrain ckpt to-universal` (nothing to convert for ZeRO-0) and `dstrain export OUTPUT_DIR`
    (default dtype)."""
    name = "tok"
    out = root / name
    recipe = runs.make_recipe(root, tiny_tokenizer_dir, name)  # writes root/data/*.parquet
    code, log = dstrain(
        "data", "tokenize", *sorted((root / "data").glob("*.parquet")), "--tokenizer", tiny_tokenizer_dir,
        "--out-dir", root / "tokenized", cwd=root,
    )  # fmt: skip
    assert code == 0, log[-3000:]
    recipe = runs.make_recipe(
        root,
        tiny_tokenizer_dir,
        name,
        data={"train": [str(root / "tokenized")], "validation_fraction": 0.1, "num_workers": 1},
        zero={"stage": 0},
        train={"max_steps": 6, "save_every": 3, "keep_last": 0, "eval_every": 3},
        log={"doc_ids": False},
    )
    code, log = dstrain("run", recipe, "--gpus", 1, "--resume", "auto", cwd=root)
    assert code == 0, log[-4000:]
    assert "resumed from" not in log, "--resume auto without a checkpoint starts fresh"
    first = runs.metrics(out)
    assert sorted(first) == list(range(1, 7))
    assert all(r["grad_norm"] is not None and 0 < r["grad_norm"] < 1e3 for r in first.values()), first
    assert any("eval_loss" in json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())

    code, log = dstrain("run", recipe, "--gpus", 1, "--resume", out / "checkpoints" / "step_3", cwd=root)
    assert code == 0, log[-4000:]
    assert "resumed from" in log and "step_3" in log
    again = runs.metrics(out)
    assert sorted(again) == list(range(1, 7))
    for step in (4, 5, 6):
        assert abs(again[step]["loss"] - first[step]["loss"]) <= 1e-6, step

    before = tree_mtimes(out / "checkpoints")
    records = (out / "metrics.jsonl").read_text()
    code, log = dstrain("run", recipe, "--gpus", 1, "--resume", cwd=root)
    assert code == 0, log[-4000:]
    assert "already finished at step 6" in log
    assert tree_mtimes(out / "checkpoints") == before, (
        "a finished run's resume must not touch its checkpoints"
    )
    assert (out / "metrics.jsonl").read_text() == records

    code, log = dstrain(
        "run", recipe, "--gpus", 1, "--resume",
        "--train.max_steps", 9, "--train.micro_batch_size", 3, "--data.buffer_size", 5, cwd=root,
    )  # fmt: skip
    assert code == 0, log[-4000:]
    assert "re-sharded" in log and "restarting epoch" not in log, "the data position is re-dealt, not reset"
    assert sorted(runs.metrics(out)) == list(range(1, 10))

    code, listing = dstrain("ckpt", "list", out, cwd=root)
    assert code == 0, listing
    listed = json.loads(listing[listing.index("{") :])
    assert listed["latest"] == "step_9"
    assert [c["checkpoint"] for c in listed["checkpoints"]] == ["step_3", "step_6", "step_9"]
    assert all(c["complete"] for c in listed["checkpoints"])

    code, log = dstrain("ckpt", "to-universal", out / "checkpoints" / "step_9", cwd=root)
    assert code == 2 and "ZeRO-0 checkpoint: a zero.stage 0 run of any world size loads it as it is" in log, (
        log[-3000:]
    )

    code, log = dstrain("export", out, root / "tok_export", cwd=root)
    assert code == 0, log[-3000:]
    assert weights_dtypes(root / "tok_export") == {"F32"}, "an fp32 run exports fp32 by default"
    assert (logits(root / "tok_export") - logits(out / "hf")).abs().max() <= 1e-6


def test_a_one_rank_zero1_run_grows_to_two_ranks(root, tiny_tokenizer_dir):
    """Saved by 1 rank, resumed on 2 (universal checkpoint, data re-dealt); the 2-rank ZeRO-1
    checkpoint then converts with `dstrain ckpt to-universal` and exports offline to the same
    weights as the run's hf/."""
    name = "grow"
    out = root / name
    recipe = runs.make_recipe(
        root, tiny_tokenizer_dir, name, zero={"stage": 1}, train={"max_steps": 8, "save_every": 4}
    )
    code, log = dstrain("run", recipe, "--gpus", 1, "--train.max_steps", 4, cwd=root)
    assert code == 0, log[-4000:]
    code, log = dstrain("run", recipe, "--gpus", 2, "--resume", cwd=root)
    assert code == 0, log[-4000:]
    assert "universal checkpoint for 2 rank(s)" in log and "re-sharded from 1 ranks" in log
    got = runs.metrics(out)
    assert sorted(got) == list(range(1, 9))
    # The loss goes on from the saved step: a lost optimizer or weight state would jump back up.
    assert got[5]["loss"] < got[4]["loss"] + 0.15 * (got[1]["loss"] - got[4]["loss"])
    code, log = dstrain(
        "ckpt", "to-universal", out / "checkpoints" / "step_8", "--out", root / "u8", cwd=root
    )
    assert code == 0, log[-3000:]
    assert (root / "u8" / "zero").is_dir() and (root / "u8" / "mp_rank_00_model_states.pt").is_file()
    code, log = dstrain("export", out / "checkpoints" / "step_8", root / "grow_export", cwd=root)
    assert code == 0, log[-3000:]
    assert (logits(root / "grow_export") - logits(out / "hf")).abs().max() <= 1e-6


def test_a_bf16_run_exports_bf16_by_default(root, tiny_tokenizer_dir):
    """bf16 (DeepSpeed's autocast runs on the CPU), one rank (its `zero.stage: 2` runs as ZeRO-0):
    `dstrain export CKPT OUT` writes bf16, as the run's own hf/ does, and both give the same
    logits."""
    name = "bf16"
    out = root / name
    recipe = runs.make_recipe(
        root,
        tiny_tokenizer_dir,
        name,
        model={"dtype": "bf16"},
        train={"max_steps": 3, "save_every": 3},
        log={"doc_ids": False},
    )
    code, log = dstrain("run", recipe, "--gpus", 1, cwd=root)
    assert code == 0, log[-4000:]
    code, log = dstrain("export", out / "checkpoints" / "step_3", root / "bf16_export", cwd=root)
    assert code == 0, log[-3000:]
    assert weights_dtypes(root / "bf16_export") == weights_dtypes(out / "hf") == {"BF16"}
    want = logits(out / "hf", torch.bfloat16)
    assert torch.equal(logits(root / "bf16_export", torch.bfloat16), want)


def test_uneven_ranks_end_the_epoch_together_and_train_every_document(root, tiny_tokenizer_dir):
    """Two ranks, one epoch, grad_accum 3, nothing held out, and one rank's shard far smaller
    than the other's (two files of equal rows, one of short documents, one of long ones: each
    rank reads one). The run exits 0, the shorter rank ran one-token fillers until the other was
    done (the epoch record shows both ranks' micro-batch counts), and the union of the documents
    of all steps is every document, the epoch's last, partial optimizer step included."""
    from tests.helpers import make_docs, write_parquet

    name = "uneven"
    out = root / name
    short = write_parquet(
        root / "uneven" / "data" / "a.parquet", make_docs(60, seed=3, min_words=2, max_words=5), 0, 60
    )
    long = write_parquet(
        root / "uneven" / "data" / "b.parquet", make_docs(60, seed=4, min_words=30, max_words=50), 100, 60
    )
    recipe = runs.make_recipe(
        root,
        tiny_tokenizer_dir,
        name,
        data={"train": [str(short), str(long)], "validation_fraction": 0.0},
        train={"max_steps": None, "epochs": 1, "grad_accum": 3, "save_every": 0, "eval_every": 0},
    )
    code, log = runs.run(recipe)
    assert code == 0, log[-4000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    (ended,) = [r for r in records if "epoch_end" in r]
    small, large = sorted(ended["micro_batches_per_rank"])
    assert small <= 0.7 * large, f"the ranks' shards should differ by 30% or more: {ended}"
    got = runs.metrics(out)
    assert max(got) == ended["step"] == len(got), "the epoch ended at one step on every rank, all logged"
    trained = {d for record in got.values() for d in record["doc_ids"]}
    assert trained == set(range(60)) | set(range(100, 160)), "every document is trained"
