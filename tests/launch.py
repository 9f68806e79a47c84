"""The one way tests start processes: real multi-process DeepSpeed (or the CLI) on CPU, each
launch in its own process group, killed whole on timeout or failure.

Process start-up (imports, DeepSpeed init) costs 10-20 s here, so one launch runs several
checks; each rank writes ``rank<N>.json`` into the results dir for pytest to assert on.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(**extra: str) -> dict[str, str]:
    """Environment for CPU ranks: no CUDA, one thread per rank (2 ranks share 2 cores)."""
    env = dict(os.environ)
    env.update(
        CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONWARNINGS="ignore",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    env.update(extra)
    return env


def venv_bin(name: str) -> str:
    """A console script of this interpreter's environment (``deepspeed``, ``dstrain``, ``torchrun``)."""
    return str(Path(sys.executable).parent / name)


#: The `dstrain` command of this interpreter's environment, as users type it.
DSTRAIN = venv_bin("dstrain")


def spawn_cmd(nprocs: int, script: str | Path, args: list[str], port: int | None = None) -> list[str]:
    """dstrain's own per-node spawner (what `dstrain run` becomes): it starts in ~50 ms, where
    DeepSpeed's runner and per-node launcher each import deepspeed first (~10 s on this machine),
    so tests that are not about the `deepspeed` command use it."""
    return [
        sys.executable,
        "-m",
        "launcher.spawn",
        "--nproc-per-node",
        str(nprocs),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(port or free_port()),
        "--",
        sys.executable,
        "-u",
        str(script),
        *args,
    ]


def deepspeed_cmd(nprocs: int, script: str | Path, args: list[str], port: int | None = None) -> list[str]:
    return [
        venv_bin("deepspeed"),
        "--num_gpus",
        str(nprocs),
        "--master_port",
        str(port or free_port()),
        str(script),
        *args,
    ]


def start(cmd: list[str], cwd: Path = REPO, merge_stderr: bool = True, **env: str) -> subprocess.Popen:
    """Start ``cmd`` in its own process group (so :func:`kill_group` reaches every process it
    spawns) with the CPU-rank environment; output is captured as text."""
    return subprocess.Popen(
        [str(c) for c in cmd],
        cwd=cwd,
        env=cpu_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to ``proc``'s whole process group (no-op once it is gone)."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def communicate_or_kill(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """Wait for ``proc`` (started by :func:`start`); on timeout SIGKILL its whole process
    group, so no orphaned rank outlives the test, and fail with the output's tail."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        raise AssertionError(
            f"{' '.join(map(str, proc.args))} did not finish in {timeout:.0f}s\n"
            f"--- output\n{(out or '')[-6000:]}\n--- stderr\n{(err or '')[-3000:]}"
        ) from None
    finally:
        kill_group(proc)  # whatever it left behind (an orphaned rank) goes too
    return out or "", err or ""


def run_group(
    cmd: list[str], timeout: float = 600, cwd: Path = REPO, **env: str
) -> subprocess.CompletedProcess:
    """Run ``cmd`` to the end with separate stdout/stderr; see :func:`communicate_or_kill`."""
    proc = start(cmd, cwd=cwd, merge_stderr=False, **env)
    out, err = communicate_or_kill(proc, timeout)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_ranks(
    nprocs: int, script: str | Path, args: list[str], timeout: float = 600, check: bool = True, **env: str
) -> subprocess.CompletedProcess:
    """Run ``script args`` on ``nprocs`` ranks (the spawner) and return the finished process."""
    proc = run_group(spawn_cmd(nprocs, script, args), timeout=timeout, **env)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"ranks exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def worker_args(argv: list[str]) -> list[str]:
    """A worker's own arguments: what the launcher passed, minus DeepSpeed's --local_rank."""
    return [a for a in argv[1:] if not a.startswith("--local_rank")]


def read_results(results_dir: Path, nprocs: int) -> list[dict]:
    return [json.loads((results_dir / f"rank{r}.json").read_text()) for r in range(nprocs)]
