"""Launch commands: a :class:`LaunchPlan` in, an argv list out, then run it and wait.

:func:`build_launch_command` is pure, so the exact command is unit-tested and printed before
it runs. Single node today: ``deepspeed --num_gpus N --master_port P trainer/main.py --config
run.yaml``. Multi-node (``deepspeed --no_ssh --node_rank``, one launcher per node) and SLURM
(``srun`` one task per rank, no launcher) add a ``LaunchPlan.launcher`` value and a builder
next to :func:`local_command`; :func:`trainer_args` is the part every launcher shares.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Literal

import trainer

# Signals a user or a scheduler sends to stop a run; each is passed on to the whole child group.
FORWARDED_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)


@dataclass(frozen=True)
class LaunchPlan:
    """Everything a launch command depends on, resolved by the CLI from config and machine.

    ``visible_devices`` is the ``CUDA_VISIBLE_DEVICES`` list when it was set: DeepSpeed's
    launcher ignores that variable once ``--num_gpus`` is given and would take GPUs 0..N-1,
    so the plan names the devices with ``--include`` instead.
    """

    run_yaml: Path
    gpus_per_node: int = 1
    resume: str | None = None
    master_port: int | None = None
    visible_devices: tuple[str, ...] | None = None
    launcher: Literal["local"] = "local"

    def __post_init__(self) -> None:
        assert self.gpus_per_node >= 1, self.gpus_per_node


def trainer_script() -> Path:
    """The installed ``trainer/main.py`` (not resolved against the working directory)."""
    return Path(trainer.__file__).resolve().parent / "main.py"


def deepspeed_command() -> list[str]:
    """How to call DeepSpeed's launcher: the ``deepspeed`` script of this interpreter's
    environment when present (it may not be on PATH), else PATH, else ``python -m``."""
    beside = Path(sys.executable).parent / "deepspeed"
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("deepspeed")
    if found:
        return [found]
    return [sys.executable, "-m", "deepspeed.launcher.runner"]


def trainer_args(plan: LaunchPlan, script: Path | None = None) -> list[str]:
    """The trainer entry point and its arguments, shared by every launcher."""
    args = [str(script or trainer_script()), "--config", str(plan.run_yaml)]
    if plan.resume is not None:
        args += ["--resume", plan.resume]
    return args


def local_command(plan: LaunchPlan, launcher_cmd: list[str], script: Path | None = None) -> list[str]:
    """``deepspeed`` on this machine, one rank per GPU (or gloo ranks on CPU)."""
    cmd = list(launcher_cmd)
    devices = plan.visible_devices
    if devices and all(d.isdigit() for d in devices) and plan.gpus_per_node <= len(devices):
        cmd += ["--include", "localhost:" + ",".join(devices[: plan.gpus_per_node])]
    else:
        cmd += ["--num_gpus", str(plan.gpus_per_node)]
    if plan.master_port is not None:
        cmd += ["--master_port", str(plan.master_port)]
    return cmd + trainer_args(plan, script)


def build_launch_command(
    plan: LaunchPlan, launcher_cmd: list[str] | None = None, script: Path | None = None
) -> list[str]:
    """The argv that starts the run described by ``plan`` (pure apart from locating defaults)."""
    if plan.launcher == "local":
        return local_command(plan, launcher_cmd or deepspeed_command(), script)
    raise AssertionError(f"unknown launcher {plan.launcher!r}")


def free_port() -> int:
    """A TCP port free on this machine now, so two runs on one host do not both take 29500."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def visible_cuda_devices() -> tuple[str, ...] | None:
    """``CUDA_VISIBLE_DEVICES`` as a tuple of ids, or None when unset or empty."""
    raw = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    return tuple(d.strip() for d in raw.split(",") if d.strip()) or None


@dataclass(frozen=True)
class Hardware:
    """What the launching machine offers: CUDA GPU count and bf16 support."""

    gpu_count: int
    bf16_supported: bool

    @property
    def on_gpu(self) -> bool:
        return self.gpu_count > 0


def detect_hardware() -> Hardware:
    """Count visible CUDA GPUs (imports torch, ~2 s, so only the commands that need it call this)."""
    import torch

    if not torch.cuda.is_available():
        return Hardware(gpu_count=0, bf16_supported=False)
    return Hardware(gpu_count=torch.cuda.device_count(), bf16_supported=torch.cuda.is_bf16_supported())


def run_and_wait(cmd: list[str]) -> int:
    """Run ``cmd``, pass SIGINT/SIGTERM on to it, and return its exit status.

    The child gets its own process group and signals go to the whole group: DeepSpeed's
    single-node runner does not handle SIGTERM itself, so a signal to its pid alone would kill
    the runner and orphan the ranks. A child killed by signal N gives 128 + N, as in a shell.
    """
    proc = subprocess.Popen(cmd, start_new_session=True)

    def forward(signum: int, frame: FrameType | None) -> None:
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass  # the group has already exited

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        returncode = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return returncode if returncode >= 0 else 128 - returncode
