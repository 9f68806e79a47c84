"""A resume with another ``zero.stage``, through ``trainer/main.py --resume --zero.stage N`` on
2 real CPU ranks (fp32), as the README says: 2 -> 1 is converted to DeepSpeed's universal
format and continues the uninterrupted run; 2 -> 3 (across ZeRO-3's per-rank files, which
DeepSpeed 0.19.8 cannot load that way) is one line naming the remedy, before anything is built.

The reference is one uninterrupted ZeRO-2 run that saves every 3 steps; a resume starts from a
copy of its output dir cut back to a saved step, so it has the same schedule, data position and
RNG. ZeRO stages differ only in how the same fp32 sums are partitioned (the README: the same
losses within 1e-5), so each resumed step's loss must match the reference's within that, on the
same documents.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.faults import runs
from tests.launch import run_group, spawn_cmd

pytestmark = pytest.mark.distributed
MAX_STEPS = 12


def cut_back(src: Path, dest: Path, step: int) -> None:
    """``src``'s output dir copied to ``dest`` as it was right after the save of ``step``."""
    shutil.copytree(src, dest)
    for ckpt in (dest / "checkpoints").glob("step_*"):
        if int(ckpt.name.split("_")[1]) > step:
            shutil.rmtree(ckpt)
    (dest / "checkpoints" / "latest").write_text(f"step_{step}")
    lines = (dest / "metrics.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    (dest / "metrics.jsonl").write_text("".join(f"{line}\n" for line in kept))


def assert_continues(got: dict[int, dict], want: dict[int, dict], steps: range) -> None:
    for step in steps:
        assert step in got, f"step {step} missing from the resumed run"
        assert got[step]["doc_ids"] == want[step]["doc_ids"], f"step {step}: different documents"
        assert abs(got[step]["lr"] - want[step]["lr"]) <= 1e-12, step
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], abs=1e-5), step


def test_a_zero_stage_change_on_resume_continues_or_is_one_line(tmp_path, tiny_tokenizer_dir):
    train = {"max_steps": MAX_STEPS, "save_every": 3, "keep_last": 0}
    ref = runs.make_recipe(tmp_path, tiny_tokenizer_dir, "ref", zero={"stage": 2}, train=train)
    code, out = runs.run(ref)
    assert code == 0, out[-4000:]
    want = runs.metrics(tmp_path / "ref")
    assert sorted(want) == list(range(1, MAX_STEPS + 1))

    to1 = runs.make_recipe(tmp_path, tiny_tokenizer_dir, "to1", zero={"stage": 2}, train=train)
    cut_back(tmp_path / "ref", tmp_path / "to1", 6)
    code, out = runs.run(to1, "--resume", "--zero.stage", "3")
    assert code == 2, out[-4000:]
    errors = [line for line in out.splitlines() if "dstrain: error: [rank0]" in line]
    assert len(errors) == 1, out[-4000:]
    assert (
        "saved with zero.stage 2 and this run uses 3" in errors[0]
        and "dstrain ckpt to-universal" in errors[0]
    )
    assert "resume with --zero.stage 2" in errors[0] and "Traceback" not in out
    assert "model Qwen2ForCausalLM" not in out  # refused before the model was built

    code, out = runs.run(to1, "--resume", "--zero.stage", "1")
    assert code == 0, out[-4000:]
    assert "to a universal checkpoint" in out, out[-4000:]
    assert_continues(runs.metrics(tmp_path / "to1"), want, range(7, MAX_STEPS + 1))


def test_one_rank_zero2_trains_zero0_and_resumes_on_two_ranks_as_zero0_would(tmp_path, tiny_tokenizer_dir):
    """``zero.stage 2`` on one rank trains DeepSpeed's ZeRO-0 engine (one partition saves
    nothing) and says so; its ZeRO-0 checkpoint resumes on two ranks at ZeRO-2, converted to
    the universal format, exactly as a ZeRO-0 resume that loads the same file natively: the
    same losses within 1e-5 only if the weights, Adam's moments and its step all crossed over."""
    train = {"max_steps": 8, "save_every": 4, "keep_last": 0}
    one = runs.make_recipe(tmp_path, tiny_tokenizer_dir, "one", zero={"stage": 2}, train=train)
    proc = run_group(spawn_cmd(1, runs.MAIN, ["--config", str(one), "--train.max_steps", "4"]))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "zero.stage 2 on one rank runs as zero.stage 0" in out, out[-4000:]
    saved = tmp_path / "one" / "checkpoints" / "step_4"
    assert json.loads((saved / "trainer_state.json").read_text())["zero_stage"] == 0
    assert not list(saved.glob("*optim_states.pt")), "a ZeRO-0 save keeps the optimizer in the model states"

    resumed = {}
    for stage in (0, 2):
        name = f"as{stage}"
        recipe = runs.make_recipe(tmp_path, tiny_tokenizer_dir, name, zero={"stage": stage}, train=train)
        cut_back(tmp_path / "one", tmp_path / name, 4)
        code, out = runs.run(recipe, "--resume")
        assert code == 0, out[-4000:]
        resumed[stage] = runs.metrics(tmp_path / name)
    assert "to a universal checkpoint" in out, out[-4000:]
    assert_continues(resumed[2], resumed[0], range(5, 9))
