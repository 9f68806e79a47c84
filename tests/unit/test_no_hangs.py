"""Nothing waits forever: a killed process's JIT-build lock, a hung multi-process launch."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from tests.launch import run_group
from trainer.dist import clear_stale_build_locks


def make_lock(root: Path, op: str, age_s: float) -> Path:
    lock = root / "py311_cpu" / op / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()
    then = time.time() - age_s
    os.utime(lock, (then, then))
    return lock


def test_old_lock_is_removed_with_a_warning(tmp_path: Path, caplog) -> None:
    stale = make_lock(tmp_path, "deepspeed_shm_comm", age_s=3600)
    (tmp_path / "py311_cpu" / "fused_adam").mkdir()
    with caplog.at_level("WARNING", logger="dstrain"):
        removed = clear_stale_build_locks(tmp_path, stale_after_s=600)
    assert removed == [stale] and not stale.exists()
    assert str(stale) in caplog.text


def test_lock_of_a_live_build_is_waited_for_not_removed(tmp_path: Path) -> None:
    live = make_lock(tmp_path, "fused_adam", age_s=0)
    # The "build" finishes after 0.3 s and releases its lock, as torch's FileBaton does.
    threading.Timer(0.3, live.unlink).start()
    start = time.monotonic()
    removed = clear_stale_build_locks(tmp_path, stale_after_s=600, poll_s=0.05)
    assert removed == [] and 0.25 < time.monotonic() - start < 5


def test_young_lock_left_by_a_killed_process_is_removed_once_it_ages(tmp_path: Path) -> None:
    orphan = make_lock(tmp_path, "deepspeed_shm_comm", age_s=0)
    start = time.monotonic()
    removed = clear_stale_build_locks(tmp_path, stale_after_s=0.5, poll_s=0.05)
    assert removed == [orphan] and time.monotonic() - start >= 0.4


def test_missing_root_is_fine(tmp_path: Path) -> None:
    assert clear_stale_build_locks(tmp_path / "absent") == []


def test_a_hung_launch_fails_and_leaves_no_process_behind(tmp_path: Path) -> None:
    """The test harness kills a timed-out launch's whole process group (no orphaned ranks)."""
    pid_file = tmp_path / "child.pid"
    with pytest.raises(AssertionError, match="did not finish in 1s"):
        run_group(["bash", "-c", f"sleep 60 & echo $! > {pid_file}; wait"], timeout=1)
    child = int(pid_file.read_text())
    deadline = time.time() + 5
    while time.time() < deadline and Path(f"/proc/{child}").exists():
        time.sleep(0.05)  # SIGKILL is delivered asynchronously; the zombie is reaped by init
    state = Path(f"/proc/{child}/stat").read_text().split()[2] if Path(f"/proc/{child}").exists() else "gone"
    assert state in ("gone", "Z"), state


def test_a_bad_stale_lock_setting_is_a_one_line_error(tmp_path: Path, monkeypatch) -> None:
    from trainer.errors import ConfigError

    monkeypatch.setenv("DSTRAIN_STALE_LOCK_S", "ten minutes")
    with pytest.raises(ConfigError, match=r"\$DSTRAIN_STALE_LOCK_S='ten minutes' is not a number"):
        clear_stale_build_locks(tmp_path)


def test_torch_extensions_dir_is_where_the_locks_are_looked_for(tmp_path: Path, monkeypatch) -> None:
    """torch builds under $TORCH_EXTENSIONS_DIR/<op>/ when it is set; the lock wait must look
    there, not at the default root (another user's builds)."""
    from trainer.dist import extension_build_root

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert extension_build_root() == tmp_path
    stale = tmp_path / "deepspeed_shm_comm" / "lock"
    stale.parent.mkdir()
    stale.touch()
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    assert clear_stale_build_locks(stale_after_s=600) == [stale]
