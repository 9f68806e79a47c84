"""trainer.signals in processes of their own: a saved rank outlives late copies of the stop
signal, and a process exits even while a worker that ignores SIGTERM is still running."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from tests.helpers import REPO

SCRIPT = textwrap.dedent(
    """
    import multiprocessing, os, signal, sys, time
    from trainer.signals import Preemption, ignore_stop_signals

    def worker():
        ignore_stop_signals()  # as a dataloader worker does
        os.close(1), os.close(2)  # not holding the test's pipes open
        time.sleep(60)

    pre = Preemption()
    pre.install()
    child = multiprocessing.get_context("fork").Process(target=worker, daemon=True)
    child.start()
    os.kill(os.getpid(), signal.SIGTERM)  # the stop signal: a flag
    pre.uninstall()  # as main.py does once the save is done
    os.kill(os.getpid(), signal.SIGUSR1)  # a late copy (a launcher passing on what the group got)
    os.kill(os.getpid(), signal.SIGTERM)
    print("requested", pre.requested, "worker alive", child.is_alive(), flush=True)
    sys.exit(75)
    """
)


def test_a_saved_rank_exits_75_despite_late_signals_and_a_live_worker() -> None:
    """Without the SIG_IGN after uninstall the late signals kill it (138/143); without the exit
    hook, multiprocessing's SIGTERM to the worker is ignored and its join never returns."""
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 75, proc.stderr
    assert proc.stdout.strip() == "requested True worker alive True"


WAIT_SCRIPT = textwrap.dedent(
    """
    import socket, sys, time
    from trainer.signals import Interrupted, Preemption, wait_interruptibly

    def blocked_in_c():
        # A wait that holds no Python frame to interrupt: accept() on a socket nobody connects
        # to (as a rendezvous blocks inside C++), for up to 60 s.
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(60)
        server.accept()

    Preemption().install()  # as main.py does: stop signals are flags from the first moment
    print("waiting", flush=True)
    started = time.monotonic()
    try:
        wait_interruptibly(blocked_in_c, "waiting at the rendezvous")
    except Interrupted as exc:
        print(f"interrupted after {time.monotonic() - started:.1f}s: {exc}", flush=True)
        sys.exit(130)
    """
)


def test_ctrl_c_stops_a_wait_blocked_outside_python() -> None:
    """A Preemption flag alone would wait the full 60 s (the handler runs after the C call)."""
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, "-c", WAIT_SCRIPT],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "waiting"
        time.sleep(0.5)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        assert time.monotonic() - sent < 5
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Ctrl-C while waiting at the rendezvous; nothing was trained" in out and "Traceback" not in err
