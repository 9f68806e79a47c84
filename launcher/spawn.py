"""dstrain's per-node spawner: start this node's ranks, pass stop signals on, return their code.

    python -m launcher.spawn --nproc-per-node G [--nnodes N --node-rank K] \\
        --master-addr A --master-port P -- python -u trainer/main.py --config run.yaml

``dstrain run`` becomes this process on every node (one command per node, no ssh, no
DeepSpeed runner). Each rank gets torchrun's variables: RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, GROUP_RANK (the node rank), GROUP_WORLD_SIZE (the node count), MASTER_ADDR,
MASTER_PORT, and DSTRAIN_LAUNCHER=dstrain.

**Signals.** SIGTERM, SIGUSR1 and SIGINT that reach the spawner are passed on unchanged to
every live rank's main process. The ranks stay in the spawner's process group, so a signal to
the whole group reaches them directly as well; a second copy is harmless (the rank's handler
only sets a flag). The ranks agree on the flag at the next optimizer step, save that step and
exit 75. The spawner sets no deadline of its own after a stop signal: it waits for every rank
however long the save takes, and the only limit is the scheduler's own kill (SLURM's KillWait,
Kubernetes' terminationGracePeriodSeconds).

**Exit status.** 0 when every rank exits 0; 75 when the ranks stopped after a pre-emption save
(EX_TEMPFAIL: "saved, requeue me"); otherwise the first failing rank's code (128 + N for a rank
killed by signal N). When a rank fails, its peers would wait for it in their next collective,
so they get SIGTERM and, ``--kill-after-s`` (30) later, SIGKILL.

Only the standard library and :mod:`trainer.signals` are imported: this starts in ~50 ms.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import FrameType

from trainer.signals import PREEMPTED_EXIT_CODE, STOP_SIGNALS

POLL_S = 0.2  # how often the ranks are polled; a rank's exit is noticed this late at most


@dataclass(frozen=True)
class NodeLayout:
    """Where this node's ranks sit in the job (the spawner's options, by the same names)."""

    nproc_per_node: int  # ranks on this node
    master_port: int  # rendezvous port on node 0
    nnodes: int = 1  # nodes in the job
    node_rank: int = 0  # this node's index, 0..nnodes-1
    master_addr: str = "127.0.0.1"  # address of node 0 (the rendezvous)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> NodeLayout:
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})

    def global_rank(self, local_rank: int) -> int:
        return self.node_rank * self.nproc_per_node + local_rank

    def rank_env(self, base: Mapping[str, str], local_rank: int) -> dict[str, str]:
        """The environment of local rank ``local_rank`` on this node (torchrun's names)."""
        env = dict(base)
        env.update(
            RANK=str(self.global_rank(local_rank)),
            LOCAL_RANK=str(local_rank),
            WORLD_SIZE=str(self.nnodes * self.nproc_per_node),
            LOCAL_WORLD_SIZE=str(self.nproc_per_node),
            GROUP_RANK=str(self.node_rank),
            GROUP_WORLD_SIZE=str(self.nnodes),
            MASTER_ADDR=self.master_addr,
            MASTER_PORT=str(self.master_port),
            DSTRAIN_LAUNCHER="dstrain",
        )
        return env


def exit_status(returncode: int) -> int:
    """A ``Popen.returncode`` as a shell would report it: 128 + N for death by signal N."""
    return returncode if returncode >= 0 else 128 - returncode


@dataclass(eq=False)
class NodeSpawner:
    """The ranks of one node: start them, forward stop signals, wait, and say how they ended."""

    cmd: list[str]
    layout: NodeLayout
    kill_after_s: float = 30.0  # after a rank fails: seconds between SIGTERM and SIGKILL to the others
    procs: list[subprocess.Popen] = field(default_factory=list, init=False)
    forwarded: list[int] = field(default_factory=list, init=False)  # signals passed on, not yet reported
    stopping: bool = field(default=False, init=False)  # a stop signal came

    def say(self, message: str) -> None:
        print(f"[dstrain node {self.layout.node_rank}] {message}", file=sys.stderr, flush=True)

    def forward(self, signum: int, frame: FrameType | None = None) -> None:
        """Signal handler: pass a stop signal on to every rank's main process still running.

        No printing here: a handler that writes to stderr while the main loop is writing
        raises "reentrant call"; the loop reports the signal instead.
        """
        for proc in self.procs:
            proc.send_signal(signum)  # a no-op for a rank already reaped
        self.forwarded.append(signum)
        self.stopping = True

    def run(self) -> int:
        """Start the ranks, wait for all of them, return the node's exit status."""
        previous = {sig: signal.signal(sig, self.forward) for sig in STOP_SIGNALS}
        try:
            for local_rank in range(self.layout.nproc_per_node):
                env = self.layout.rank_env(os.environ, local_rank)
                self.procs.append(subprocess.Popen(self.cmd, env=env))
            pids = " ".join(f"{self.layout.global_rank(i)}:{p.pid}" for i, p in enumerate(self.procs))
            self.say(f"started {self.layout.nproc_per_node} rank(s) (rank:pid {pids})")
            return self._wait()
        finally:
            # After a stop signal this node is on its way out with 75: a late copy of the
            # signal must not turn that into death by signal (see Preemption.uninstall).
            for sig, handler in previous.items():
                signal.signal(sig, signal.SIG_IGN if self.stopping else handler)

    def _wait(self) -> int:
        codes: dict[int, int] = {}
        failure: int | None = None
        kill_at: float | None = None
        while len(codes) < len(self.procs):
            while self.forwarded:
                name = signal.Signals(self.forwarded.pop(0)).name
                # Ctrl-C also stops a rank still waiting to start (rendezvous): nothing to save.
                starting = "; one still waiting to start stops at once" if name == "SIGINT" else ""
                self.say(
                    f"got {name}: passed it to every running rank (they save at the next step, exit 75{starting})"
                )
            for i, proc in enumerate(self.procs):
                if i in codes or proc.poll() is None:
                    continue
                codes[i] = exit_status(proc.returncode)
                self.say(f"rank {self.layout.global_rank(i)} exited {codes[i]}")
                if codes[i] not in (0, PREEMPTED_EXIT_CODE) and failure is None:
                    failure = codes[i]
                    kill_at = time.monotonic() + self.kill_after_s
                    self._signal_live(signal.SIGTERM, f"SIGKILL in {self.kill_after_s:.0f} s")
            if kill_at is not None and time.monotonic() >= kill_at:
                self._signal_live(signal.SIGKILL, "a failed peer leaves them waiting in a collective")
                kill_at = None
            time.sleep(POLL_S)
        if failure is not None:
            return failure
        return PREEMPTED_EXIT_CODE if PREEMPTED_EXIT_CODE in codes.values() else 0

    def _signal_live(self, sig: signal.Signals, why: str) -> None:
        live = [(i, p) for i, p in enumerate(self.procs) if p.poll() is None]
        if not live:
            return
        self.say(
            f"sending {sig.name} to rank(s) {', '.join(str(self.layout.global_rank(i)) for i, _ in live)} ({why})"
        )
        for _, proc in live:
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m launcher.spawn",
        description="Start this node's ranks with torchrun-style variables, forward SIGTERM/SIGUSR1/"
        "SIGINT to them, and exit with their status (75 after a pre-emption save).",
        allow_abbrev=False,
    )
    parser.add_argument("--nproc-per-node", type=int, required=True, help="Ranks on this node.")
    parser.add_argument("--nnodes", type=int, default=1, help="Nodes in the job.")
    parser.add_argument("--node-rank", type=int, default=0, help="This node's index, 0..nnodes-1.")
    parser.add_argument("--master-addr", default="127.0.0.1", help="Address of node 0 (the rendezvous).")
    parser.add_argument("--master-port", type=int, required=True, help="Rendezvous port on node 0.")
    parser.add_argument(
        "--kill-after-s",
        type=float,
        default=30.0,
        help="After a rank fails: seconds between SIGTERM and SIGKILL to the others.",
    )
    parser.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then the command of every rank.")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("no rank command: add -- python -u trainer/main.py --config run.yaml")
    if args.nproc_per_node < 1 or not 0 <= args.node_rank < args.nnodes:
        parser.error(f"need --nproc-per-node >= 1 and 0 <= --node-rank < --nnodes ({args.nnodes})")
    return NodeSpawner(cmd, NodeLayout.from_args(args), args.kill_after_s).run()


if __name__ == "__main__":
    sys.exit(main())
