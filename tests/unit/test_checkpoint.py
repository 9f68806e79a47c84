from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.checkpoint import (
    COMPLETE,
    MANIFEST,
    Checkpointer,
    RNGState,
    check_resume_config,
    file_records,
    newest_complete,
    resolve_resume,
)
from trainer.config import build_config
from trainer.dist import DistInfo
from trainer.errors import CheckpointError
from trainer.signals import Preemption


def make_ckpts(
    root: Path, complete: list[int], incomplete: list[int] = (), latest: int | None = None
) -> Path:
    ckpts = root / "checkpoints"
    for step in complete:
        path = ckpts / f"step_{step}"
        path.mkdir(parents=True)
        (path / "model.bin").write_bytes(bytes(range(256)) * (step + 1))
        (path / MANIFEST).write_text(json.dumps(file_records(path, DistInfo())))
        (path / COMPLETE).write_text("{}")
    for step in incomplete:
        (ckpts / f"step_{step}").mkdir(parents=True)
    if latest is not None:
        (ckpts / "latest").write_text(f"step_{latest}")
    return ckpts


def test_resume_takes_the_newest_complete_and_skips_partial_saves(tmp_path):
    ckpts = make_ckpts(tmp_path, complete=[5, 10], incomplete=[15], latest=10)
    assert resolve_resume("latest", tmp_path) == ckpts / "step_10"
    assert resolve_resume("auto", tmp_path) == ckpts / "step_10"
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume(str(ckpts / "step_5"), tmp_path) == ckpts / "step_5"
    with pytest.raises(CheckpointError, match="incomplete"):
        resolve_resume(str(ckpts / "step_15"), tmp_path)


def test_a_stale_latest_pointer_never_wins_over_a_newer_complete_save(tmp_path):
    ckpts = make_ckpts(tmp_path, complete=[5, 10], latest=5)
    assert newest_complete(ckpts) == ckpts / "step_10"
    (ckpts / "latest").write_text("step_99")  # points at nothing
    assert newest_complete(ckpts) == ckpts / "step_10"


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_a_damaged_newest_checkpoint_is_named_and_the_previous_one_is_taken(tmp_path, caplog, damage):
    """A missing or truncated file is found by its size on every resume; a flipped bit (the same
    size) by the crc32 check of --verify-checkpoint full."""
    full = damage == "flip"
    ckpts = make_ckpts(tmp_path, complete=[5, 10], latest=10)
    victim = ckpts / "step_10" / "model.bin"
    data = bytearray(victim.read_bytes())
    if damage == "truncate":
        victim.write_bytes(data[:-7])
    elif damage == "flip":
        data[100] ^= 0xFF
        victim.write_bytes(data)
    else:
        victim.unlink()
    with caplog.at_level(logging.WARNING, logger="dstrain"):
        assert resolve_resume("latest", tmp_path, full_verify=full) == ckpts / "step_5"
    assert any(str(victim) in r.message and "falling back" in r.message for r in caplog.records)
    with pytest.raises(CheckpointError, match=r"step_10: the checkpoint is damaged: .*model\.bin") as info:
        resolve_resume(str(ckpts / "step_10"), tmp_path, full_verify=full)
    assert "\n" not in str(info.value)
    (ckpts / "step_5" / "model.bin").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="every checkpoint under .* is damaged"):
        resolve_resume("auto", tmp_path, full_verify=full)


def test_bare_resume_without_checkpoints_is_an_error_and_auto_starts_fresh(tmp_path):
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_resume("latest", tmp_path)
    assert resolve_resume("auto", tmp_path) is None


def test_prune_keeps_the_last_n_and_the_protected(tmp_path):
    ckpts = make_ckpts(tmp_path, complete=[5, 10, 15, 20, 25], incomplete=[3])
    checkpointer = Checkpointer(tmp_path, DistInfo(), engine=None, shared={}, per_rank={}, keep_last=2)
    checkpointer.prune(protect=[10])
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_10", "step_20", "step_25"]
    checkpointer.prune()
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_20", "step_25"]


@pytest.mark.parametrize("keep_best", [False, True])
def test_the_best_checkpoint_is_protected_only_with_keep_best(keep_best):
    from trainer.loop import Trainer

    class Saves:
        def __init__(self):
            self.calls = []

        def save(self, step, protect=()):
            self.calls.append((step, list(protect)))

    job = build_config(base={"tokenizer": "t", "train": {"keep_best": keep_best}})
    trainer = Trainer(job, DistInfo(), None, [], None, total_steps=1, callbacks=[], checkpointer=Saves())
    trainer.state.step, trainer.state.best_step = 20, 10
    trainer._save()
    assert trainer.checkpointer.calls == [(20, [10] if keep_best else [])]


def test_config_changes_on_resume():
    saved = build_config(base={"tokenizer": "t"})
    lr_changed = build_config(base={"tokenizer": "t", "optim": {"lr": 1e-3}})
    assert check_resume_config(saved, lr_changed) == {"optim.lr": (2e-5, 1e-3)}
    arch = build_config(base={"tokenizer": "t", "model": {"overrides": {"hidden_size": 64}}})
    with pytest.raises(CheckpointError, match=r"model\.overrides changed") as info:
        check_resume_config(saved, arch)
    assert "\n" not in str(info.value)


def test_signals_only_set_a_flag():
    before = {sig: signal.getsignal(sig) for sig in Preemption.SIGNALS}
    pre = Preemption()
    pre.install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal changes nothing
    finally:
        pre.uninstall()
        # After a stop request they stay ignored until exit (a late copy must not kill a rank
        # that saved); give pytest its handlers back.
        after = {sig: signal.getsignal(sig) for sig in Preemption.SIGNALS}
        for sig, handler in before.items():
            signal.signal(sig, handler)
    assert pre.requested and pre.signum == signal.SIGTERM
    assert set(after.values()) == {signal.SIG_IGN}


def test_rng_state_round_trip_through_a_weights_only_load(tmp_path):
    rng = RNGState()
    torch.save(rng.state_dict(), tmp_path / "rng.pt")
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    rng.load_state_dict(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


@pytest.mark.parametrize(
    "change",
    [
        {"r": 8},
        {"target_modules": "all-linear"},
        {"enabled": False},
        {"alpha": 64.0},
        {"modules_to_save": ["lm_head"]},
    ],
    ids=lambda c: next(iter(c)),
)
def test_a_changed_lora_setup_is_an_error_and_dropout_is_not(change):
    lora = {"enabled": True, "r": 16, "alpha": 32.0}
    saved = build_config(base={"tokenizer": "t", "lora": lora})
    changed = build_config(base={"tokenizer": "t", "lora": {**lora, **change}})
    key = f"lora.{next(iter(change))}"
    with pytest.raises(
        CheckpointError, match=rf"cannot resume: {key} changed from .* LoRA setup must match"
    ) as info:
        check_resume_config(saved, changed)
    assert "\n" not in str(info.value)
    dropout = build_config(base={"tokenizer": "t", "lora": {**lora, "dropout": 0.1}})
    assert check_resume_config(saved, dropout) == {"lora.dropout": (0.05, 0.1)}
    # Without LoRA on either side the lora section is unused: changing it changes nothing.
    off = build_config(base={"tokenizer": "t"})
    assert check_resume_config(off, build_config(base={"tokenizer": "t", "lora": {"r": 8}})) == {
        "lora.r": (16, 8)
    }


def test_the_base_fingerprint_tells_another_checkpoint_of_the_same_shape_apart(tmp_path):
    import shutil

    from tests.helpers import tiny_model
    from trainer.checkpoint import base_fingerprint

    tiny_model(seed=0).save_pretrained(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    tiny_model(seed=1).save_pretrained(tmp_path / "b")  # same config, same file sizes
    sizes = {p.name: p.stat().st_size for p in (tmp_path / "a").iterdir()}
    assert sizes == {p.name: p.stat().st_size for p in (tmp_path / "b").iterdir()}
    a, b = base_fingerprint(str(tmp_path / "a")), base_fingerprint(str(tmp_path / "b"))
    assert a == base_fingerprint(str(tmp_path / "copy")) and a != b
    assert base_fingerprint(None) is None and base_fingerprint("no-such-org/no-such-model") is None
    # A weight file too big to hash whole is sampled: a changed stretch longer than the gap
    # between two samples (a fifteenth of the file) shows.
    big = tmp_path / "big"
    big.mkdir()
    (big / "config.json").write_text("{}")
    weights = bytearray(random.Random(0).randbytes(5 << 20))
    (big / "model.safetensors").write_bytes(weights)
    before = base_fingerprint(str(big))
    weights[(3 << 20) : (3 << 20) + (256 << 10)] = random.Random(1).randbytes(256 << 10)
    (big / "model.safetensors").write_bytes(weights)
    assert base_fingerprint(str(big)) != before


def test_the_manifest_takes_checksums_made_while_writing_and_reads_only_the_rest(tmp_path):
    import zlib

    from trainer.checkpoint import save_with_crc, verify

    path = tmp_path / "step_1"
    path.mkdir()
    big = path / "mp_rank_00_model_states.pt"
    size, crc = save_with_crc({"w": torch.arange(1000.0)}, big)
    data = big.read_bytes()
    assert (size, crc) == (len(data), zlib.crc32(data))
    (path / "run.yaml").write_text("stage: pretrain\n")
    # A checksum recorded at write time is taken as it is: the file is not read again.
    records = file_records(path, DistInfo(), {str(big): (size, 12345)})
    assert records == {
        big.name: [size, 12345],
        "run.yaml": [16, zlib.crc32(b"stage: pretrain\n")],
    }
    (path / MANIFEST).write_text(json.dumps(file_records(path, DistInfo(), {str(big): (size, crc)})))
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0x01
    big.write_bytes(flipped)
    assert verify(path) is None  # sizes only: what every resume checks
    assert "does not match its checksum" in verify(path, full=True)
    big.write_bytes(data[:-1])
    assert "truncated" in verify(path)


def test_a_save_failure_is_a_full_disk_only_when_the_disk_is_full(tmp_path):
    import errno

    from trainer.errors import DistError

    ckpts = make_ckpts(tmp_path, complete=[5])
    checkpointer = Checkpointer(tmp_path, DistInfo(), engine=None, shared={}, per_rank={}, keep_last=2)
    path = ckpts / "step_10"
    full = checkpointer._save_error(10, path, OSError(errno.ENOSPC, "No space left on device", "x.pt"))
    assert "No space left on device (x.pt; " in str(full) and "MB free under" in str(full)
    assert "step_5 is intact" in str(full)
    cases = {
        "denied": OSError(errno.EACCES, "Permission denied", "x.pt"),
        "peer": DistError(
            "rank 0 lost contact with the other ranks in the save of step 10: Connection closed"
        ),
        "bug": RuntimeError("PytorchStreamWriter failed\nmore"),
    }
    for name, exc in cases.items():
        text = str(checkpointer._save_error(10, path, exc))
        assert "free" not in text and "step_5 is intact" in text and "\n" not in text, (name, text)
    assert "lost contact with the other ranks" in str(checkpointer._save_error(10, path, cases["peer"]))


@pytest.mark.parametrize("saved, now", [(3, 1), (2, 3), (0, 3), (1, 0)])
def test_a_zero_stage_change_deepspeed_cannot_load_is_one_line(tmp_path, saved, now):
    from trainer.checkpoint import STATE_VERSION, check_zero_stage, needs_universal

    (tmp_path / "trainer_state.json").write_text(
        json.dumps({"version": STATE_VERSION, "world_size": 2, "zero_stage": saved})
    )
    with pytest.raises(
        CheckpointError, match=f"saved with zero.stage {saved} and this run uses {now}"
    ) as info:
        check_zero_stage(tmp_path, now)
    assert f"resume with --zero.stage {saved}" in str(info.value) and "\n" not in str(info.value)
    if saved in (1, 2):
        assert needs_universal(tmp_path, world_size=2, zero_stage=3 - saved) is True  # 1 <-> 2
    assert needs_universal(tmp_path, world_size=2, zero_stage=saved) is False
    assert needs_universal(tmp_path, world_size=3, zero_stage=saved) is (saved != 0)
    if saved == 0:  # a ZeRO-0 save loads sharded into ZeRO-1/2 (trainer/zero0_universal.py)
        assert needs_universal(tmp_path, world_size=2, zero_stage=1) is True
        assert needs_universal(tmp_path, world_size=2, zero_stage=2) is True


def test_a_full_disk_in_the_middle_of_a_save_is_an_enospc_oserror(tmp_path, monkeypatch):
    """torch.save turns a failed write after the first one into a RuntimeError without errno;
    the checksumming writer keeps the OSError, so the save can say "full disk" only then."""
    import errno

    from trainer.checkpoint import save_with_crc

    class FillsUp:
        """A file that takes 100 bytes, then reports a full disk (as a small tmpfs does)."""

        def __init__(self):
            self.room = 100

        def write(self, data):
            if self.room <= 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            n = min(self.room, len(data))
            self.room -= n
            return n

        def fileno(self):
            raise AssertionError("never reached: the save fails first")

    import builtins

    monkeypatch.setattr(builtins, "open", lambda *a, **k: contextlib.nullcontext(FillsUp()))
    with pytest.raises(OSError) as info:
        save_with_crc({"w": torch.zeros(1000)}, tmp_path / "x.pt")
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC


def test_a_zero0_save_converts_for_zero12_only_when_its_state_is_adamws_and_its_groups_match(tmp_path):
    """trainer/zero0_universal.py writes DeepSpeed's universal layout from a ZeRO-0 save (the
    resume through it is tests/faults/test_zero_stage_change.py); what it cannot carry is one
    line, not a silently dropped optimizer state."""
    from trainer.zero0_universal import MODEL_STATES, zero0_to_universal

    w, b = torch.randn(3, 2), torch.randn(3)
    adam = {"step": torch.tensor(4.0), "exp_avg": torch.randn(3, 2), "exp_avg_sq": torch.rand(3, 2)}
    states = {
        "module": {"w": w, "b": b},
        "ds_version": "0.19.8",
        "optimizer": {
            "state": {0: adam, 1: {"step": torch.tensor(4.0)}},
            "param_groups": [{"params": [0], "lr": 1e-3, "fused": True}, {"params": [1], "lr": 1e-3}],
        },
    }
    torch.save(states, tmp_path / MODEL_STATES)
    out = zero0_to_universal(tmp_path, tmp_path / "universal", [["w"], ["b"]])
    assert torch.equal(torch.load(out / "zero" / "w" / "exp_avg.pt")["param"], adam["exp_avg"])
    assert torch.equal(torch.load(out / "zero" / "w" / "fp32.pt")["param"], w)
    assert (
        not (out / "zero" / "b" / "exp_avg.pt").exists() and torch.load(out / "zero" / "b" / "step.pt") == 4
    )
    groups = torch.load(out / "zero" / "optimizer_state.pt")["param_groups"]
    assert groups == [{"lr": 1e-3}, {"lr": 1e-3}], "torch's own switches (fused) stay this run's"
    assert torch.load(out / MODEL_STATES, weights_only=False)["optimizer"] is None

    with pytest.raises(CheckpointError, match=r"groups hold \[1, 1\] parameters, this model's \[2\]"):
        zero0_to_universal(tmp_path, tmp_path / "u2", [["w", "b"]])
    states["optimizer"]["state"][0] = {"momentum_buffer": torch.randn(3, 2)}
    torch.save(states, tmp_path / MODEL_STATES)
    with pytest.raises(CheckpointError, match=r"holds \['momentum_buffer'\].*--zero.stage 0"):
        zero0_to_universal(tmp_path, tmp_path / "u3", [["w"], ["b"]])
