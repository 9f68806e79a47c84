"""A resumed run is the same run: kill -9, a kill inside a save, SIGTERM to one rank, a
changed config, all on real 2-rank DeepSpeed (CPU, gloo, fp32)."""

from __future__ import annotations

import os
import random
import signal

import pytest

from tests.faults import runs
from trainer.signals import PREEMPTED_EXIT_CODE

pytestmark = pytest.mark.distributed
STEPS = range(1, 41)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("faults")


def run_reference(root, tokenizer_dir, stage: int, name: str | None = None, **sections) -> dict[int, dict]:
    """The uninterrupted 40-step run for a ZeRO stage (and other recipe sections)."""
    name = name or f"ref_z{stage}"
    recipe = runs.make_recipe(root, tokenizer_dir, name, zero={"stage": stage}, **sections)
    code, out = runs.run(recipe)
    assert code == 0, out[-4000:]
    got = runs.metrics(root / name)
    assert sorted(got) == list(STEPS)
    return got


@pytest.fixture(scope="module")
def ref_z2(root, tiny_tokenizer_dir):
    return run_reference(root, tiny_tokenizer_dir, 2)


@pytest.fixture(scope="module")
def ref_z3(root, tiny_tokenizer_dir):
    return run_reference(root, tiny_tokenizer_dir, 3)


@pytest.fixture(scope="module")
def ref_muon(root, tiny_tokenizer_dir):
    return run_reference(root, tiny_tokenizer_dir, 2, optim={"name": "muon"}, name="ref_muon")


@pytest.mark.parametrize("case", ["z2", "z3", "muon"], ids=["zero2", "zero3", "muon-zero2"])
def test_kill9_after_a_save_then_resume_is_exact(case, request, root, tiny_tokenizer_dir):
    want = request.getfixturevalue(f"ref_{case}")
    # ZeRO-2 dies inside warmup (save at 5, warmup 10); the others at a random later step.
    kill_at = 7 if case == "z2" else random.Random(case).randint(11, 19)
    name = f"kill_{case}"
    sections = {"optim": {"name": "muon"}} if case == "muon" else {"zero": {"stage": int(case[1])}}
    recipe = runs.make_recipe(root, tiny_tokenizer_dir, name, **sections)
    proc = runs.start(recipe)
    runs.wait_for_step(proc, root / name, kill_at)
    runs.kill_all(proc)
    code, out = runs.run(recipe, "--resume")
    assert code == 0, out[-4000:]
    assert "resumed from" in out
    runs.assert_same_run(runs.metrics(root / name), want, STEPS)


def test_kill_inside_a_save_keeps_latest_on_the_previous_checkpoint(ref_z2, root, tiny_tokenizer_dir):
    want = ref_z2
    name = "killsave"
    recipe = runs.make_recipe(root, tiny_tokenizer_dir, name)
    code, out = runs.run(recipe, env={"DSTRAIN_FAULT": "kill_rank1_in_save:10"})
    assert code != 0
    ckpts = root / name / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_5"
    assert (ckpts / "step_10").is_dir() and not (ckpts / "step_10" / "COMPLETE").exists()
    code, out = runs.run(recipe, "--resume")
    assert code == 0, out[-4000:]
    assert "skipping incomplete checkpoint" in out and "resumed from" in out and "step_5" in out
    runs.assert_same_run(runs.metrics(root / name), want, STEPS)


def test_sigterm_to_one_rank_saves_the_same_step_everywhere(ref_z2, root, tiny_tokenizer_dir):
    """SIGTERM to rank 1 only, and a second SIGTERM to rank 0 inside the save: exit 75, a
    complete checkpoint, and a resume that is the same run."""
    want = ref_z2
    name = "sigterm"
    recipe = runs.make_recipe(root, tiny_tokenizer_dir, name, train={"save_every": 100})
    # The only save is the pre-emption one; inside it rank 0 gets a second SIGTERM.
    proc = runs.start(recipe, env={"DSTRAIN_FAULT": "signal_rank0_in_save"})
    runs.wait_for_step(proc, root / name, 12)
    os.kill(runs.rank_pid(1), signal.SIGTERM)
    code, out = runs.finish(proc)
    assert code == PREEMPTED_EXIT_CODE, out[-4000:]
    assert "fault injection: SIGTERM at in_save" in out, "the second signal was sent during the save"
    ckpts = root / name / "checkpoints"
    saved = (ckpts / "latest").read_text()
    step = int(saved.split("_")[1])
    assert step >= 12 and (ckpts / saved / "COMPLETE").is_file()
    assert (ckpts / saved / "dstrain_rank0.pt").is_file() and (ckpts / saved / "dstrain_rank1.pt").is_file()
    code, out = runs.run(recipe, "--resume")
    assert code == 0, out[-4000:]
    runs.assert_same_run(runs.metrics(root / name), want, STEPS)


def test_config_change_on_resume(ref_z2, root, tiny_tokenizer_dir):
    name = "ref_z2"  # continue the reference run (its step-40 checkpoint) with a changed config
    changed = runs.make_recipe(root, tiny_tokenizer_dir, name, optim={"lr": 1.0e-3}, train={"max_steps": 44})
    code, out = runs.run(changed, "--resume")
    assert code == 0, out[-4000:]
    assert "optim.lr: 0.003 -> 0.001" in out
    got = runs.metrics(root / name)
    assert sorted(got)[-1] == 44
    # cosine over 44 steps, warmup 10, evaluated at step index 40..43 with the new peak lr
    from trainer.config import ScheduleConfig
    from trainer.optim import lr_factor

    for step in range(41, 45):
        assert got[step]["lr"] == pytest.approx(
            1.0e-3 * lr_factor(step - 1, 44, ScheduleConfig(warmup_steps=10))
        )
    wrong = runs.make_recipe(
        root,
        tiny_tokenizer_dir,
        name,
        model={
            "overrides": {
                "hidden_size": 96,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "intermediate_size": 128,
            }
        },
    )
    code, out = runs.run(wrong, "--resume")
    assert code == 2
    errors = [line for line in out.splitlines() if "dstrain: error:" in line]
    assert errors and "model.overrides changed" in errors[0]


def test_export_of_a_zero3_checkpoint_matches_the_engine_export(ref_z3, root):
    """ZeRO-3 shards are the case that comes out empty elsewhere."""
    import torch
    from transformers import AutoModelForCausalLM

    from trainer.export import export_main

    out = root / "z3_export"
    assert export_main([str(root / "ref_z3" / "checkpoints" / "step_40"), str(out), "--dtype", "fp32"]) == 0
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    live = AutoModelForCausalLM.from_pretrained(root / "ref_z3" / "hf", dtype=torch.float32).eval()
    assert all(p.numel() > 0 for p in exported.parameters())
    assert sum(p.numel() for p in exported.parameters()) == sum(p.numel() for p in live.parameters())
    probe = torch.arange(1, 40).view(3, 13)
    with torch.no_grad():
        assert torch.allclose(exported(input_ids=probe).logits, live(input_ids=probe).logits, atol=1e-5)
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
