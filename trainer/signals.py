"""Pre-emption signals: SIGTERM, SIGUSR1 and SIGINT belong to each rank's main process.

A scheduler (SLURM, Kubernetes, a user's Ctrl-C) asks a job to stop by signalling it; the
job should save and exit :data:`PREEMPTED_EXIT_CODE` (75, EX_TEMPFAIL: "saved, requeue me").
The handler only sets a flag (no I/O, no collective, never ``input()``); the ranks agree on it
at the next optimizer-step boundary, so a signal seen by one rank only still makes every rank
save the same step. Dataloader workers ignore these signals (:func:`ignore_stop_signals` is
their ``worker_init_fn``): a worker killed by a signal sent to the whole process group would
otherwise take the rank down before it could save.

One exception: Ctrl-C while a rank *waits to start* (the rendezvous, the start-up checks, a
stale build lock) stops it at once. Such waits block inside C++ for up to
``train.collective_timeout_s``, where a flag would only be read after the wait; there is nothing
to save yet. :func:`wait_interruptibly` runs them in a helper thread so the main thread can
take the signal, and raises :class:`Interrupted` (exit 130, one line).
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import multiprocessing.util  # registers its exit hook now, so that ours (below) runs before it
import signal
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from trainer.errors import DstrainError

T = TypeVar("T")

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "saved, please requeue"; the SLURM template keys on it
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def ignore_stop_signals(*_: Any) -> None:
    """Ignore the stop signals in this process (a dataloader worker's ``worker_init_fn``)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def kill_daemonic_children() -> None:
    """At exit, SIGKILL the daemonic children (dataloader workers) that are still running.

    multiprocessing ends them at exit with SIGTERM and then waits for them; a worker ignores
    SIGTERM (:func:`ignore_stop_signals`), so that wait would never end and the process would
    hang instead of exiting (seen with a dataloader iterator still alive at exit). atexit runs
    hooks last-in first-out, and this one is registered after multiprocessing's.
    """
    children = [c for c in multiprocessing.active_children() if c.daemon]
    if not children:
        return
    # The DataLoader's SIGCHLD handler raises (a traceback at exit) when a worker dies; here
    # they die on purpose.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        child.kill()
        with contextlib.suppress(Exception):
            child.join(timeout=10)


atexit.register(kill_daemonic_children)


class Preemption:
    """Stop signals set :attr:`requested`; the Trainer reduces it over ranks at the step boundary."""

    SIGNALS = STOP_SIGNALS

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        """Restore the previous handlers; after a stop request, ignore the stop signals instead.

        A rank that saved is on its way out with exit 75, and late copies of the signal still
        arrive (a launcher forwards what the process group already got, a scheduler repeats
        it). A Python handler is reset to the default action when the interpreter shuts down,
        and the default would turn exit 75 into death by signal; SIG_IGN survives shutdown.
        """
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if self.requested else handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        # Only set a flag: no I/O, no collectives, no input() in a handler. A second signal
        # during the save lands here too and changes nothing.
        self.requested = True
        self.signum = signum


class Interrupted(DstrainError):
    """Ctrl-C while a rank waited to start (nothing trained, nothing to save)."""


def wait_interruptibly(wait: Callable[[], T], what: str, poll_s: float = 0.1) -> T:
    """Run ``wait`` (a rendezvous or a start-up collective that blocks inside C++, where a
    Python signal handler cannot run) in a helper thread; SIGINT meanwhile raises
    :class:`Interrupted` ("Ctrl-C while <what>") in this, the main thread.

    The helper thread is a daemon left blocked behind: the caller exits the process at once
    (see ``trainer.main``), without touching the half-built process group. An exception of
    ``wait`` is re-raised here; called outside the main thread, ``wait`` simply runs.
    """
    if threading.current_thread() is not threading.main_thread():
        return wait()
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = wait()
        except BaseException as exc:  # re-raised in the main thread below
            outcome["error"] = exc

    def on_sigint(signum: int, frame: Any) -> None:
        raise Interrupted(f"Ctrl-C while {what}; nothing was trained")

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        thread = threading.Thread(target=run, name="dstrain-start-wait", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(poll_s)  # the main thread runs signal handlers between these joins
    finally:
        signal.signal(signal.SIGINT, previous)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
