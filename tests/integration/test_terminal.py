"""`dstrain run` in a real terminal (tmux): one clean screen, log lines above a progress bar
that stays at the bottom, nothing from DeepSpeed's start-up, nothing printed by rank 1."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from tests.faults import runs
from tests.launch import venv_bin

pytestmark = pytest.mark.distributed
BAR = "━"


def have_tmux() -> str | None:
    """The reason tmux cannot be had, or None (installed here with apt-get when root)."""
    if shutil.which("tmux"):
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "tmux is not installed (and this is not root with apt-get to install it)"
    proc = subprocess.run(
        ["apt-get", "install", "-y", "--no-install-recommends", "tmux"],
        capture_output=True,
        text=True,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )
    return (
        None
        if proc.returncode == 0 and shutil.which("tmux")
        else f"apt-get install tmux failed: {proc.stderr[-300:]}"
    )


def test_the_live_display_in_a_terminal(tmp_path, tiny_tokenizer_dir):
    reason = have_tmux()
    if reason:
        pytest.skip(reason)
    recipe = runs.make_recipe(
        tmp_path,
        tiny_tokenizer_dir,
        "tty",
        train={"max_steps": 30, "log_every": 5, "save_every": 0},
        log={"doc_ids": False, "progress": True},
    )
    session = f"dstrain-{os.getpid()}"
    env = " ".join(
        f"{k}={v}"
        for k, v in {
            "CUDA_VISIBLE_DEVICES": "",
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }.items()
    )
    command = f"env {env} {venv_bin('dstrain')} run {recipe} --gpus 2; echo DSTRAIN-EXIT=$?"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "160", "-y", "50", command], check=True)
    subprocess.run(["tmux", "set-option", "-t", session, "remain-on-exit", "on"], check=True)
    try:
        deadline, screen = time.time() + 300, ""
        while time.time() < deadline:
            screen = subprocess.run(
                ["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True
            ).stdout
            if "DSTRAIN-EXIT=" in screen:
                break
            time.sleep(1)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    lines = [line.rstrip() for line in screen.splitlines() if line.strip()]
    assert "DSTRAIN-EXIT=0" in screen, screen
    bars = [i for i, line in enumerate(lines) if line.startswith("step ") and BAR in line]
    assert bars and lines[bars[-1]].startswith("step 30/30"), screen
    assert not [line for line in lines if BAR in line and "INFO" in line], "a log line was drawn into the bar"
    logs = [i for i, line in enumerate(lines) if "INFO step 30 |" in line]
    assert logs and logs[0] < bars[-1], "log lines print above the bar"
    assert not [line for line in lines if line.startswith("[rank1]")], "only rank 0 prints progress"
    assert not [line for line in lines if "real_accelerator" in line or "built successfully" in line], screen
