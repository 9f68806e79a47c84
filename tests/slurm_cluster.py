"""A real local SLURM cluster for tests (``scripts/slurm/local-cluster.sh``), and the system
tools the SLURM tests need (shellcheck, slurm-wlm, munge), installed with apt-get when they are
missing. Everything that cannot be had here is a skip with the reason, never a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import REPO
from tests.launch import free_port

CLUSTER_SCRIPT = REPO / "scripts" / "slurm" / "local-cluster.sh"
CANNOT_INSTALL = 3  # local-cluster.sh's exit status when apt-get cannot install SLURM


def why_no_apt() -> str | None:
    """Why packages cannot be installed here, or None when they can (root and apt-get)."""
    if os.geteuid() != 0:
        return "needs root to install system packages"
    if shutil.which("apt-get") is None:
        return "needs apt-get to install system packages"
    return None


def require_tool(tool: str, package: str) -> str:
    """The path of ``tool``, installing ``package`` with apt-get first if needed; else skip."""
    found = shutil.which(tool)
    if found:
        return found
    reason = why_no_apt()
    if reason:
        pytest.skip(f"{tool} is not installed and the test {reason}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", package]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)
        proc = subprocess.run(install, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"apt-get could not install {package}: {proc.stderr.strip()[-300:]}")
    found = shutil.which(tool)
    if not found:
        pytest.skip(f"{package} installed but {tool} is not on PATH")
    return found


class LocalCluster:
    """A SLURM cluster of ``nodes`` slurmd processes on this machine (all at 127.0.0.1)."""

    def __init__(self, directory: Path, nodes: int = 2) -> None:
        self.dir = directory
        self.nodes = nodes
        self.env = {**os.environ, "SLURM_CONF": str(directory / "slurm.conf")}

    def up(self) -> None:
        """Start it on free ports, or skip with the reason it cannot run here."""
        reason = why_no_apt()
        if reason and not shutil.which("slurmctld"):
            pytest.skip(f"SLURM is not installed and the test {reason}")
        ports = {"SLURM_LOCAL_CTLD_PORT": str(free_port()), "SLURM_LOCAL_NODE_PORT": str(free_port())}
        proc = subprocess.run(
            ["bash", str(CLUSTER_SCRIPT), "up", str(self.dir), str(self.nodes)],
            env={**os.environ, **ports},
            capture_output=True,
            text=True,
            timeout=600,
        )
        if proc.returncode == CANNOT_INSTALL:
            pytest.skip(f"SLURM could not be installed: {proc.stderr.strip()[-300:]}")
        assert proc.returncode == 0, f"the local SLURM cluster did not start:\n{proc.stderr[-3000:]}"

    def down(self) -> None:
        subprocess.run(["scancel", "--user", "root"], env=self.env, capture_output=True)
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "down", str(self.dir)], capture_output=True)

    def run(self, *cmd: str, check: bool = True, **env: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, env={**self.env, **env}, capture_output=True, text=True, timeout=120)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr}")
        return proc

    def submit(self, script: Path, **env: str) -> int:
        """``sbatch`` the script with this environment; returns the job id."""
        return int(self.run("sbatch", "--parsable", str(script), **env).stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job``'s fields (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_for(self, job_id: int, states: set[str], timeout: float) -> dict[str, str]:
        """Poll until the job is in one of ``states``; fail with the cluster's logs otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            fields = self.job(job_id)
            if fields.get("JobState") in states:
                return fields
            time.sleep(1)
        raise AssertionError(
            f"job {job_id} not {states} in {timeout:.0f}s: {self.job(job_id)}\n{self.logs()}"
        )

    def logs(self) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')[-2000:]}"
            for path in sorted(self.dir.glob("log/*"))
        )
