"""Launch commands: a :class:`LaunchPlan` in, an argv list out, then the launcher becomes it.

:func:`build_launch_command` is pure, so the exact command is unit-tested and printed before
it runs. Two launchers:

- ``local`` (the default, one node or many): dstrain's own per-node spawner,
  ``python -m launcher.spawn --nproc-per-node G --nnodes N --node-rank K --master-addr A
  --master-port P -- python -u trainer/main.py --config run.yaml``, one command per node and
  no ssh. It passes SIGTERM/SIGUSR1/SIGINT to the ranks and exits with their status, so a
  pre-empted run exits 75 (see :mod:`launcher.spawn`).
- ``pdsh``: DeepSpeed's runner with a hostfile (``deepspeed --hostfile F``), which reaches the
  other nodes over pdsh/ssh; its signal handling is DeepSpeed's (README: "Pre-emption").

SLURM's sbatch script (``srun`` one task per rank, no launcher) is rendered by
:mod:`launcher.slurm`; :func:`trainer_args` is what every launcher shares.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NoReturn

import trainer


@dataclass(frozen=True)
class LaunchPlan:
    """Everything a launch command depends on, resolved by the CLI from config and machine.

    ``run_yaml`` is the config the ranks of *this* node read. ``master_addr`` / ``master_port``
    None leave the choice to DeepSpeed's runner (pdsh: the first host, port 29500).
    """

    run_yaml: Path
    gpus_per_node: int = 1
    nodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    resume: str | None = None
    launcher: Literal["local", "pdsh"] = "local"
    hostfile: Path | None = None

    def __post_init__(self) -> None:
        assert self.gpus_per_node >= 1 and 0 <= self.node_rank < self.nodes, self
        assert (self.launcher == "pdsh") == (self.hostfile is not None), self


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


def trainer_args(plan: LaunchPlan, script: Path | None = None, run_yaml: Path | None = None) -> list[str]:
    """The trainer entry point and its arguments, shared by every launcher."""
    args = [str(script or trainer_script()), "--config", str(run_yaml or plan.run_yaml)]
    if plan.resume is not None:
        args += ["--resume", plan.resume]
    return args


def spawn_command(
    plan: LaunchPlan,
    node_rank: int | None = None,
    run_yaml: Path | None = None,
    python: str | None = None,
    script: Path | None = None,
) -> list[str]:
    """dstrain's spawner on node ``node_rank`` (default: the plan's), one rank per GPU."""
    assert plan.launcher == "local" and plan.master_port is not None, plan
    python = python or sys.executable
    return [
        python,
        "-m",
        "launcher.spawn",
        "--nproc-per-node",
        str(plan.gpus_per_node),
        "--nnodes",
        str(plan.nodes),
        "--node-rank",
        str(plan.node_rank if node_rank is None else node_rank),
        "--master-addr",
        plan.master_addr or "127.0.0.1",
        "--master-port",
        str(plan.master_port),
        "--",
        python,
        "-u",
        *trainer_args(plan, script, run_yaml),
    ]


def pdsh_command(plan: LaunchPlan, launcher_cmd: list[str], script: Path | None = None) -> list[str]:
    """DeepSpeed's runner over pdsh: run once, on the first node of the hostfile."""
    cmd = [*launcher_cmd, "--hostfile", str(plan.hostfile), "--launcher", "pdsh"]
    cmd += ["--num_nodes", str(plan.nodes), "--num_gpus", str(plan.gpus_per_node)]
    if plan.master_addr is not None:
        cmd += ["--master_addr", plan.master_addr]
    if plan.master_port is not None:
        cmd += ["--master_port", str(plan.master_port)]
    return cmd + trainer_args(plan, script)


def build_launch_command(
    plan: LaunchPlan, launcher_cmd: list[str] | None = None, script: Path | None = None
) -> list[str]:
    """The argv that starts this node's part of the run (pure apart from locating defaults)."""
    if plan.launcher == "local":
        return spawn_command(plan, script=script)
    if plan.launcher == "pdsh":
        return pdsh_command(plan, launcher_cmd or deepspeed_command(), script)
    raise AssertionError(f"unknown launcher {plan.launcher!r}")


def node_local_config(run_yaml_text: str) -> Path:
    """Where a node other than node 0 keeps its copy of run.yaml: a node-local temp dir named
    by the content, so every node computes the same path and no node but node 0 writes into
    the shared output dir (two nodes replacing one file on NFS can leave a reader a torn one)."""
    import hashlib  # here, not at the top: `dstrain --help` imports this module
    import tempfile

    digest = hashlib.sha256(run_yaml_text.encode("utf-8")).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"dstrain-{os.getuid()}-{digest}" / "run.yaml"


def write_node_local_config(run_yaml_text: str) -> Path:
    """Write :func:`node_local_config` (atomically) and return its path."""
    path = node_local_config(run_yaml_text)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"run.yaml.{os.getpid()}.tmp")
    tmp.write_text(run_yaml_text, encoding="utf-8")
    tmp.replace(path)
    return path


def exec_command(cmd: list[str], env: Mapping[str, str] | None = None) -> NoReturn:
    """Become ``cmd`` (same pid): a signal sent to ``dstrain run`` then reaches the launcher
    itself, and nothing of this process (torch, a CUDA context) outlives the launch."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(cmd[0], cmd, dict(os.environ if env is None else env))


def free_port() -> int:
    """A TCP port free on this machine now, so two runs on one host do not both take 29500."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
