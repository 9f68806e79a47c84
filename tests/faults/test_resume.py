"""A resumed run is the same run: ten kill -9 points over steps, saves and evals, a damaged
checkpoint, kill -9 on ZeRO-3 and with Muon, SIGTERM to one rank, a changed config, all on
real 2-rank DeepSpeed (CPU, gloo, fp32)."""

from __future__ import annotations

import json
import random
import signal

import pytest

from tests.faults import runs
from tests.helpers import alpaca_records, save_chat_base, write_json_records
from trainer.checkpoint import verify
from trainer.signals import PREEMPTED_EXIT_CODE

pytestmark = pytest.mark.distributed
STEPS = range(1, 41)
SHORT = range(1, 16)  # the ZeRO-3 and Muon kill tests: one kill after a save, 15 steps suffice


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("faults")


def run_reference(
    root, tokenizer_dir, stage: int, name: str | None = None, steps: range = STEPS, **sections
) -> dict[int, dict]:
    """The uninterrupted run for a ZeRO stage (and other recipe sections)."""
    name = name or f"ref_z{stage}"
    sections["train"] = {"max_steps": steps.stop - 1, **sections.get("train", {})}
    recipe = runs.make_recipe(root, tokenizer_dir, name, zero={"stage": stage}, **sections)
    code, out = runs.run(recipe)
    assert code == 0, out[-4000:]
    got = runs.metrics(root / name)
    assert sorted(got) == list(steps)
    return got


@pytest.fixture(scope="module")
def ref_z2(root, tiny_tokenizer_dir):
    return run_reference(root, tiny_tokenizer_dir, 2)


@pytest.fixture(scope="module")
def ref_z3(root, tiny_tokenizer_dir):
    return run_reference(root, tiny_tokenizer_dir, 3, steps=SHORT)


@pytest.fixture(scope="module")
def ref_muon(root, tiny_tokenizer_dir):
    return run_reference(root, tiny_tokenizer_dir, 2, optim={"name": "muon"}, name="ref_muon", steps=SHORT)


@pytest.mark.parametrize("case", ["z3", "muon"], ids=["zero3", "muon-zero2"])
def test_kill9_after_a_save_then_resume_is_exact(case, request, root, tiny_tokenizer_dir):
    """ZeRO-2 with AdamW is the kill chain's; here ZeRO-3 (through `deepspeed`) and Muon."""
    want = request.getfixturevalue(f"ref_{case}")
    kill_at = random.Random(case).randint(7, 13)  # after the save at step 5 or 10
    name = f"kill_{case}"
    sections = {"optim": {"name": "muon"}} if case == "muon" else {"zero": {"stage": int(case[1])}}
    recipe = runs.make_recipe(root, tiny_tokenizer_dir, name, train={"max_steps": SHORT.stop - 1}, **sections)
    # The README's command for ZeRO-3 (`deepspeed --num_gpus N trainer/main.py`), the spawner for Muon.
    launcher = "deepspeed" if case == "z3" else "spawn"
    proc = runs.start(recipe, launcher=launcher)
    runs.wait_for_step(proc, root / name, kill_at)
    runs.kill_all(proc)
    code, out = runs.run(recipe, "--resume", launcher=launcher)
    assert code == 0, out[-4000:]
    assert "resumed from" in out
    runs.assert_same_run(runs.metrics(root / name), want, SHORT)


SFT_STEPS = range(1, 17)


def lora_sft_recipe(root, tokenizer_dir, name: str):
    """LoRA SFT (ZeRO-2, gradient checkpointing) on generated alpaca rows through a ChatML
    template, from a tiny stand-in for pretrained chat weights: 16 steps over 2+ epochs."""
    base = root / "chat_base"
    if not base.exists():
        save_chat_base(base, tokenizer_dir)
        write_json_records(root / "alpaca.jsonl", alpaca_records(120, seed=5), lines=True)
    return runs.pretrained_recipe(
        root,
        base,
        name,
        "sft",
        data={
            "train": [str(root / "alpaca.jsonl")],
            "format": "alpaca",
            "max_seq_len": 64,
            "validation_fraction": 0.0,
        },
        lora={"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"},
        optim={"lr": 1e-2},
        train={"max_steps": SFT_STEPS.stop - 1},
    )


def test_kill9_of_a_lora_sft_run_after_a_save_then_resume_is_exact(root, tiny_tokenizer_dir):
    """Per-step loss, lr and doc ids of a killed and resumed LoRA SFT run equal the uninterrupted
    run's: the adapter, its optimizer state and the SFT data position (masks in the packer's
    carry) come back exactly from a checkpoint that leaves the frozen base out."""
    shm_before = runs.shm_buffers()
    code, out = runs.run(lora_sft_recipe(root, tiny_tokenizer_dir, "sft_ref"))
    assert code == 0, out[-4000:]
    want = runs.metrics(root / "sft_ref")
    assert sorted(want) == list(SFT_STEPS)
    records = [json.loads(x) for x in (root / "sft_ref" / "metrics.jsonl").read_text().splitlines()]
    ends = [r for r in records if "epoch_end" in r]
    assert ends, "the run must cross an epoch boundary"
    # Each epoch record counts, over both ranks, the samples cut to max_seq_len 64 and those
    # left with no response token: the formatter's own lengths and masks say how many.
    from transformers import AutoTokenizer

    from trainer.data.config import DataConfig
    from trainer.data.formatting import Formatter

    formatter = Formatter(
        DataConfig(train=["x"], format="alpaca"), AutoTokenizer.from_pretrained(root / "chat_base")
    )
    samples = formatter.format_batch(alpaca_records(120, seed=5), str)
    long = [s for s in samples if len(s.ids) > 64]
    no_target = sum(not s.mask[:64].any() for s in long)
    assert long and (ends[0]["truncated_docs"], ends[0]["no_target_docs"]) == (
        len(long) - no_target,
        no_target,
    )
    recipe = lora_sft_recipe(root, tiny_tokenizer_dir, "sft_kill")
    proc = runs.start(recipe)
    kill_at = random.Random("lora").randint(7, 14)
    runs.wait_for_step(proc, root / "sft_kill", kill_at)
    runs.kill_all(proc)
    assert runs.shm_buffers() <= shm_before, "a killed run leaves no shared-memory buffer behind"
    code, out = runs.run(recipe, "--resume")
    assert code == 0, out[-4000:]
    assert "resumed from" in out
    runs.assert_same_run(runs.metrics(root / "sft_kill"), want, SFT_STEPS)
    assert runs.shm_buffers() <= shm_before
    assert (root / "sft_kill" / "adapter" / "adapter_config.json").is_file()


def kill_points(seed: int, count: int = 10) -> list[tuple[str, int]]:
    """``count`` kill points drawn by a seeded RNG, in the order a run reaches them: SIGKILL to
    every process once a step is logged, or one rank SIGKILLed inside a save or half-way
    through an eval (both every 5 steps). A run killed at step N resumes from the save before
    N, so two points can share a step."""
    rng = random.Random(seed)
    candidates = [("step", s) for s in range(3, 39)]
    candidates += [(kind, s) for s in range(5, 40, 5) for kind in ("eval", "save")]
    order = {"step": 0, "eval": 1, "save": 2}  # a step is logged, then evaluated, then saved
    return sorted(rng.sample(candidates, count), key=lambda p: (p[1], order[p[0]]))


def drop_records_after(out, step: int) -> None:
    """What the resumed run does to metrics.jsonl first, done before it starts, so that waiting
    for step N never sees the killed segment's record of it."""
    path = out / "metrics.jsonl"
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))


def test_ten_seeded_kill_points_over_steps_saves_and_evals(ref_z2, root, tiny_tokenizer_dir, capsys):
    """10 kill -9 points in one run (ZeRO-2, a dataloader worker per rank): after each, `latest`
    names a complete checkpoint that verifies against its manifest and never moves back, and
    the last `--resume` reaches the uninterrupted run's per-step losses, lrs and documents. Then
    a file of the newest checkpoint is truncated: `--resume` names it, falls back to the
    previous checkpoint and again ends on the same losses."""
    name = "chain"
    out = root / name
    recipe = runs.make_recipe(root, tiny_tokenizer_dir, name, train={"eval_every": 5})
    points = kill_points(seed=40)
    assert len(points) == 10 and {kind for kind, _ in points} == {"step", "save", "eval"}, points
    ckpts = out / "checkpoints"
    survived, corrupt_latest, previous = 0, 0, 0
    for i, (kind, step) in enumerate(points):
        args = ["--resume", "auto"]
        drop_records_after(out, previous)
        fault = {"save": f"kill_rank{i % 2}_in_save:{step}", "eval": f"kill_rank{i % 2}_in_eval:{step}"}.get(
            kind
        )
        proc = runs.start(recipe, *args, env={"DSTRAIN_FAULT": fault} if fault else None)
        if kind == "step":
            runs.wait_for_step(proc, out, step)
            runs.kill_all(proc)
            code, log = proc.returncode, ""
        else:
            code, log = runs.finish(proc)
            assert "fault injection: kill" in log, log[-3000:]
        assert code != 0
        latest = ckpts / (ckpts / "latest").read_text().strip() if (ckpts / "latest").is_file() else None
        intact = latest is not None and (latest / "COMPLETE").is_file() and verify(latest) is None
        corrupt_latest += latest is not None and not intact
        now = int(latest.name.split("_")[1]) if latest is not None else 0
        assert now >= previous, f"latest moved back from step_{previous} to {latest}"
        survived += intact or (latest is None and previous == 0)  # nothing was saved yet
        previous = now
    code, log = runs.run(recipe, "--resume")
    assert code == 0, log[-4000:]
    runs.assert_same_run(runs.metrics(out), ref_z2, STEPS)
    assert corrupt_latest == 0 and survived == len(points)

    victim = sorted((ckpts / "step_40").glob("*optim_states.pt"))[0]
    victim.write_bytes(victim.read_bytes()[:-1000])
    drop_records_after(out, 35)
    code, log = runs.run(recipe, "--resume")
    assert code == 0, log[-4000:]
    assert f"checkpoint {ckpts / 'step_40'} is damaged: {victim}" in log and "falling back" in log
    assert "resumed from" in log and "step_35" in log
    runs.assert_same_run(runs.metrics(out), ref_z2, STEPS)
    with capsys.disabled():
        print(f"\nkill points {points}: survived {survived}/{len(points)}, corrupt latest {corrupt_latest}")


def test_sigterm_to_one_rank_saves_the_same_step_everywhere(ref_z2, root, tiny_tokenizer_dir):
    """SIGTERM to rank 1 only, and a second SIGTERM to rank 0 inside the save: exit 75, a
    complete checkpoint, and a resume that is the same run."""
    want = ref_z2
    name = "sigterm"
    recipe = runs.make_recipe(root, tiny_tokenizer_dir, name, train={"save_every": 100})
    # The only save is the pre-emption one; inside it rank 0 gets a second SIGTERM.
    proc = runs.start(recipe, env={"DSTRAIN_FAULT": "signal_rank0_in_save"})
    runs.wait_for_step(proc, root / name, 12)
    runs.rank_processes(proc.pid)[1].send_signal(signal.SIGTERM)
    code, out = runs.finish(proc)
    assert code == PREEMPTED_EXIT_CODE, out[-4000:]
    assert "fault injection: signal at in_save" in out, "the second signal was sent during the save"
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
    assert export_main([str(root / "ref_z3" / "checkpoints" / "step_15"), str(out), "--dtype", "fp32"]) == 0
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    live = AutoModelForCausalLM.from_pretrained(root / "ref_z3" / "hf", dtype=torch.float32).eval()
    assert all(p.numel() > 0 for p in exported.parameters())
    assert sum(p.numel() for p in exported.parameters()) == sum(p.numel() for p in live.parameters())
    probe = torch.arange(1, 40).view(3, 13)
    with torch.no_grad():
        assert torch.allclose(exported(input_ids=probe).logits, live(input_ids=probe).logits, atol=1e-5)
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
