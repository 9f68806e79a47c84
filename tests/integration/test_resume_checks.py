"""What `--resume` and `dstrain export` check before they load a checkpoint, through the
commands a user types (`dstrain run`, `dstrain export`), on a real 1-rank LoRA run (its
`zero.stage: 2` runs as ZeRO-0 on one rank; CPU):

- a pickle that would run code is refused with one line naming the file and the global, and
  never runs; `--trust-checkpoint` loads a foreign but harmless global;
- a changed LoRA setup, or another base behind the same `model.name_or_path`, is one line
  before anything is built;
- a real checkpoint resumes with the pickle check on, and `--verify-checkpoint full` finds a
  flipped bit that the size check (every resume) cannot see.
"""

from __future__ import annotations

import fractions
import json
import shutil
import zlib
from pathlib import Path

import pytest
import torch

from tests.faults import runs
from tests.helpers import save_chat_base, tiny_model
from tests.launch import DSTRAIN, run_group
from tests.unit.test_security import RunsAShellCommand
from trainer.ckpt_layout import MANIFEST

pytestmark = pytest.mark.distributed
MODEL_STATES = "mp_rank_00_model_states.pt"


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_tokenizer_dir):
    """A finished 2-step LoRA cpt run on one rank: (root, recipe, its step_2 checkpoint)."""
    root = tmp_path_factory.mktemp("resume_checks")
    base = save_chat_base(root / "base", tiny_tokenizer_dir)
    recipe = runs.pretrained_recipe(
        root,
        base,
        "lora",
        "cpt",
        lora={"enabled": True, "r": 4},
        train={"max_steps": 2, "save_every": 2, "micro_batch_size": 1, "grad_accum": 1},
        data={"num_workers": 0},
    )
    proc = dstrain("run", recipe, "--gpus-per-node", "1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root, recipe, root / "lora" / "checkpoints" / "step_2"


def dstrain(*args: object, timeout: float = 400) -> object:
    return run_group([DSTRAIN, *map(str, args)], timeout=timeout)


def error_lines(proc) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if "dstrain: error:" in line]


def tampered_copy(ckpt: Path, dest: Path, extra: object) -> Path:
    """``ckpt`` copied to ``dest`` with ``extra`` added to its model states, the manifest
    rewritten to match (as whoever hands over a crafted checkpoint would)."""
    shutil.copytree(ckpt, dest)
    states = torch.load(dest / MODEL_STATES, weights_only=False)  # our own file
    states["extra"] = extra
    torch.save(states, dest / MODEL_STATES)
    manifest = json.loads((dest / MANIFEST).read_text())
    data = (dest / MODEL_STATES).read_bytes()
    manifest[MODEL_STATES] = [len(data), zlib.crc32(data)]
    (dest / MANIFEST).write_text(json.dumps(manifest))
    return dest


def test_a_crafted_pickle_is_refused_by_resume_and_export_without_running(lora_run):
    root, recipe, ckpt = lora_run
    marker = root / "payload_ran"
    evil = tampered_copy(ckpt, root / "evil" / "step_2", RunsAShellCommand(marker))
    resume = dstrain("run", recipe, "--gpus-per-node", "1", "--resume", evil)
    export = dstrain("export", evil, root / "evil_hf")
    for proc in (resume, export):
        assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
        errors = error_lines(proc)
        assert len(errors) == 1, errors
        assert f"refusing to load {evil / MODEL_STATES}: its " in errors[0]
        assert "imports posix.system" in errors[0] and "--trust-checkpoint" in errors[0]
        assert "Traceback" not in proc.stdout + proc.stderr
    assert not marker.exists() and not (root / "evil_hf").exists()


def test_trust_checkpoint_loads_a_foreign_harmless_global(lora_run):
    root, _, ckpt = lora_run
    foreign = tampered_copy(ckpt, root / "foreign" / "step_2", fractions.Fraction(1, 3))
    refused = dstrain("export", foreign, root / "foreign_out")
    assert refused.returncode == 2 and "imports fractions.Fraction" in error_lines(refused)[0]
    trusted = dstrain("export", foreign, root / "foreign_out", "--trust-checkpoint")
    assert trusted.returncode == 0, trusted.stderr[-3000:]
    assert (root / "foreign_out" / "adapter_model.safetensors").is_file()


def test_a_changed_lora_setup_is_one_line_before_anything_is_built(lora_run):
    """Every LoRA key is checked the same way (tests/unit/test_checkpoint.py); one through the CLI."""
    _, recipe, _ = lora_run
    proc = dstrain("run", recipe, "--gpus-per-node", "1", "--resume", "--lora.r", "8")
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    errors = error_lines(proc)
    assert len(errors) == 1 and "cannot resume: lora.r changed from 4 to 8" in errors[0], errors
    assert "LoRA r=" not in proc.stdout + proc.stderr  # apply_lora logs this: nothing was built


def test_a_real_checkpoint_resumes_and_a_full_check_finds_a_flipped_bit(lora_run):
    root, recipe, ckpt = lora_run
    flipped = root / "flipped" / "step_2"
    shutil.copytree(ckpt, flipped)
    victim = max((p for p in flipped.glob("*.pt")), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(data)
    proc = dstrain("run", recipe, "--gpus-per-node", "1", "--resume", flipped, "--verify-checkpoint", "full")
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"{victim} does not match its checksum (corrupted)" in error_lines(proc)[0]
    # The real checkpoint passes the pickle check and the full check, and trains on.
    proc = dstrain(
        "run",
        recipe,
        "--gpus-per-node",
        "1",
        "--resume",
        "--verify-checkpoint",
        "full",
        "--train.max_steps",
        "3",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert 3 in runs.metrics(root / "lora")


def test_another_base_behind_the_same_path_is_one_line(lora_run):
    root, recipe, _ = lora_run
    base = root / "base"
    original = root / "base_original"
    shutil.copytree(base, original)
    try:
        # Another checkpoint of the same architecture: the same files, the same sizes.
        tiny_model(
            seed=11, vocab_size=json.loads((base / "config.json").read_text())["vocab_size"]
        ).save_pretrained(base)
        assert {p.name: p.stat().st_size for p in base.iterdir()} == {
            p.name: p.stat().st_size for p in original.iterdir()
        }
        proc = dstrain("run", recipe, "--gpus-per-node", "1", "--resume")
        assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
        errors = error_lines(proc)
        assert (
            len(errors) == 1 and f"the weights behind model.name_or_path {base} are not the base" in errors[0]
        )
        assert "LoRA r=" not in proc.stdout + proc.stderr
    finally:
        shutil.rmtree(base)
        original.rename(base)
