"""Hour-40 failures on real 2-rank DeepSpeed (CPU, gloo, fp32): a full disk during a save, a NaN
loss, a diverged run, an out-of-memory error. Each must end in a clear, one-line outcome and
leave every good checkpoint as it was."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.faults import runs
from trainer.checkpoint import COMPLETE, verify

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("hardening")


def error_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if "dstrain: error:" in line]


def test_a_nan_step_is_skipped_and_counted_at_zero0(root, tiny_tokenizer_dir):
    """ZeRO-0 in fp32 (our FiniteAdamW decides): rank 1's loss is NaN once at step 5; that
    update and its schedule step are skipped, the run finishes with finite weights."""
    import torch

    from tests.integration.test_paths import logits

    name = "nan"
    recipe = runs.make_recipe(
        root, tiny_tokenizer_dir, name, zero={"stage": 0}, train={"max_steps": 8, "save_every": 0}
    )
    code, out = runs.run(recipe, env={"DSTRAIN_FAULT": "nan_rank1_in_step:5"})
    assert code == 0, out[-4000:]
    assert "step 5 skipped: non-finite loss" in out
    got = runs.metrics(root / name)
    assert sorted(got) == list(range(1, 9))
    assert [got[s]["skipped_steps"] for s in (4, 5, 8)] == [0, 1, 1]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in got.values())
    # Inside the linear warmup (10 steps) the optimizer's lr grows by lr/10 per applied step: the
    # skipped attempt did not move the schedule, so step 5 runs at 5/4 of step 4's lr, not 6/4.
    assert got[5]["lr"] == pytest.approx(got[4]["lr"] * 5 / 4, rel=1e-9)
    assert torch.isfinite(logits(root / name / "hf")).all()


def test_too_many_nan_steps_stop_the_run_naming_the_last_good_checkpoint(root, tiny_tokenizer_dir):
    """ZeRO-2 (DeepSpeed's optimizer skips the step): three NaN steps in a row with
    train.max_bad_steps 3 stop the run with one line that names the step and the checkpoint."""
    name = "diverge"
    recipe = runs.make_recipe(
        root, tiny_tokenizer_dir, name, train={"max_steps": 10, "save_every": 3, "max_bad_steps": 3}
    )
    code, out = runs.run(recipe, env={"DSTRAIN_FAULT": "nan_rank0_in_step:5x3"})
    assert code == 2, out[-4000:]
    errors = error_lines(out)
    assert errors and "3 non-finite steps in a row after step 4" in errors[0], errors
    assert f"{root / name}/checkpoints/step_3" in errors[0]
    assert (root / name / "checkpoints" / "step_3" / COMPLETE).is_file()


def test_out_of_memory_is_one_line_with_what_to_try(root, tiny_tokenizer_dir):
    """Rank 1 runs out of memory inside step 3's real forward, as the model returns its logits
    (rank 0 goes on into the backward and its reductions): one line with what to try, no
    traceback, exit 2."""
    name = "oom"
    recipe = runs.make_recipe(root, tiny_tokenizer_dir, name, train={"max_steps": 10, "save_every": 0})
    code, out = runs.run(recipe, env={"DSTRAIN_FAULT": "oom_rank1_in_step:3"})
    assert code == 2, out[-4000:]
    errors = error_lines(out)
    assert "[rank1]" in out and "out of memory after the forward of step 3" in out, out[-4000:]
    assert errors and "rank 1 ran out of memory at step 3: micro-batch 2 x 64 tokens" in errors[0], errors
    assert "--train.micro_batch_size 1 --train.grad_accum 4" in errors[0] and "--zero.stage 3" in errors[0]
    assert "Traceback" not in out


def test_a_stuck_rank_is_named_with_the_phase_not_a_hang(root, tiny_tokenizer_dir):
    """Rank 1 stalls 12 s before step 3 while rank 0 waits in the step's agreement with
    train.collective_timeout_s 5: rank 0 stops with one line naming itself and the phase."""
    name = "stuck"
    recipe = runs.make_recipe(
        root, tiny_tokenizer_dir, name, train={"max_steps": 10, "save_every": 0, "collective_timeout_s": 5}
    )
    code, out = runs.run(recipe, env={"DSTRAIN_FAULT": "hang_rank1_in_plan:3"})
    assert code != 0, out[-4000:]
    errors = [e for e in error_lines(out) if "[rank0]" in e]
    assert errors and "rank 0 timed out waiting for the other ranks in the start of step 3" in errors[0], out[
        -4000:
    ]
    assert "[rank0]: Traceback" not in out


def test_different_library_versions_across_ranks_stop_the_run_at_start(root, tiny_tokenizer_dir):
    name = "versions"
    recipe = runs.make_recipe(root, tiny_tokenizer_dir, name, train={"max_steps": 2})
    code, out = runs.run(recipe, env={"DSTRAIN_FAULT": "oldtorch_rank1_at_start"})
    assert code == 2, out[-4000:]
    errors = error_lines(out)
    assert errors and "the ranks run different library versions (rank 0: torch 2" in errors[0], errors
    assert "rank 1: torch 0.0.0" in errors[0] and not (root / name / "metrics.jsonl").exists()


def mount_tmpfs(path, size_bytes: int) -> str | None:
    """Mount a tmpfs of ``size_bytes`` at ``path``; the reason it could not be done, or None."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return "needs root and mount(8) for a small tmpfs"
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    return None if proc.returncode == 0 else f"mount -t tmpfs failed: {proc.stderr.strip()}"


def test_a_full_disk_during_a_save_keeps_every_good_checkpoint(root, tiny_tokenizer_dir, tmp_path):
    """The output dir is a tmpfs with room for two checkpoints and the logs: the third save fails
    with one line naming the rank and the intact previous checkpoint; the two complete saves and
    ``latest`` are untouched and verify against their manifests."""
    probe = runs.make_recipe(root, tiny_tokenizer_dir, "size_probe", train={"max_steps": 1, "save_every": 1})
    code, out = runs.run(probe)
    assert code == 0, out[-4000:]
    ckpt_bytes = sum(
        f.stat().st_size for f in (root / "size_probe" / "checkpoints" / "step_1").rglob("*") if f.is_file()
    )
    disk = tmp_path / "disk"
    reason = mount_tmpfs(disk, int(2.6 * ckpt_bytes) + 2_000_000)
    if reason:
        pytest.skip(reason)
    try:
        recipe = runs.make_recipe(
            root, tiny_tokenizer_dir, "full", train={"max_steps": 20, "save_every": 5, "keep_last": 0}
        )
        text = recipe.read_text().replace(str(root / "full"), str(disk / "full"))
        recipe.write_text(text)
        code, out = runs.run(recipe)
        assert code != 0, out[-4000:]
        errors = error_lines(out)
        failed = [e for e in errors if "saving step" in e and "MB free under" in e]
        assert failed, out[-4000:]
        step = int(failed[0].split("saving step ")[1].split()[0])
        assert step >= 15, "the tmpfs holds two checkpoints at least"
        assert f"the previous checkpoint step_{step - 5} is intact and nothing was pruned" in failed[0]
        ckpts = disk / "full" / "checkpoints"
        assert (ckpts / "latest").read_text() == f"step_{step - 5}"
        for saved in range(5, step, 5):
            assert (ckpts / f"step_{saved}" / COMPLETE).is_file() and verify(ckpts / f"step_{saved}") is None
        assert not (ckpts / f"step_{step}" / COMPLETE).exists()
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
