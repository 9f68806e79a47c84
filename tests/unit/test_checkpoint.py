from __future__ import annotations

import os
import random
import signal
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from trainer.checkpoint import (
    COMPLETE,
    Checkpointer,
    check_resume_config,
    newest_complete,
    resolve_resume,
    rng_state,
    set_rng_state,
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
        (ckpts / f"step_{step}").mkdir(parents=True)
        (ckpts / f"step_{step}" / COMPLETE).write_text("{}")
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


def test_bare_resume_without_checkpoints_is_an_error_and_auto_starts_fresh(tmp_path):
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_resume("latest", tmp_path)
    assert resolve_resume("auto", tmp_path) is None


def test_prune_keeps_the_last_n_and_the_best(tmp_path):
    ckpts = make_ckpts(tmp_path, complete=[5, 10, 15, 20, 25], incomplete=[3])
    job = build_config(base={"tokenizer": "t", "output_dir": str(tmp_path), "train": {"keep_last": 2}})
    trainer = SimpleNamespace(state=SimpleNamespace(best_step=10))
    Checkpointer(job, DistInfo(), tokenizer=None).prune(trainer)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_10", "step_20", "step_25"]


def test_config_changes_on_resume():
    saved = build_config(base={"tokenizer": "t"})
    lr_changed = build_config(base={"tokenizer": "t", "optim": {"lr": 1e-3}})
    diff, reset = check_resume_config(saved, lr_changed)
    assert diff == {"optim.lr": (2e-5, 1e-3)} and reset is False
    _, reset = check_resume_config(saved, build_config(base={"tokenizer": "t", "data": {"max_seq_len": 256}}))
    assert reset is True
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


def test_rng_state_round_trip():
    state = rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first
