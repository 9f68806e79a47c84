"""What a multi-node launch needs from the machine: the hostfile, and the environment that
must reach every node.

A hostfile is DeepSpeed's format, one host per line: ``worker-1 slots=8`` (``#`` starts a
comment). The environment that travels is :data:`FORWARDED_PREFIXES` and
:data:`FORWARDED_NAMES` as set here, plus the user's ``--env NAME`` / ``--env NAME=VALUE``:
with pdsh it goes into a ``.deepspeed_env`` file that DeepSpeed's runner exports on every
node, with SLURM into ``export`` lines of the sbatch script.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from trainer.errors import ConfigError

# NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME pick the network interface; a wrong default (docker0,
# a management NIC) is the classic multi-node hang. CUDA_VISIBLE_DEVICES is never forwarded:
# each node's launcher or SLURM sets it for that node.
FORWARDED_PREFIXES: tuple[str, ...] = ("NCCL_", "GLOO_", "TORCH_NCCL_", "CUDA_")
FORWARDED_NAMES: tuple[str, ...] = ("HF_HOME", "PYTHONPATH")
NEVER_FORWARDED: frozenset[str] = frozenset({"CUDA_VISIBLE_DEVICES"})
# Names that hold credentials (HF_TOKEN, WANDB_API_KEY, AWS_SECRET_ACCESS_KEY...): they travel by
# reference (the script re-exports what the submitting shell has) and are never printed.
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)


def is_secret(name: str) -> bool:
    return bool(SECRET_NAME.search(name))


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Host:
    """One hostfile line: a host name and its slot (GPU) count."""

    name: str
    slots: int


def read_hostfile(path: Path) -> list[Host]:
    """Hosts of a DeepSpeed hostfile, in order; errors name the file and line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--hostfile {path}: cannot read it ({exc.strerror})") from None
    hosts: list[Host] = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"(\S+)\s+slots\s*=\s*(\d+)", line)
        if match is None or int(match.group(2)) < 1:
            raise ConfigError(f"--hostfile {path} line {number}: {line!r} is not 'HOST slots=N' (N >= 1)")
        if any(h.name == match.group(1) for h in hosts):
            raise ConfigError(f"--hostfile {path} line {number}: host {match.group(1)} is listed twice")
        hosts.append(Host(match.group(1), int(match.group(2))))
    if not hosts:
        raise ConfigError(f"--hostfile {path} lists no host (expected lines like 'worker-1 slots=8')")
    return hosts


def forwarded_env(environ: Mapping[str, str], user: Iterable[str] = ()) -> dict[str, str]:
    """The variables every node must see: the forwarded prefixes and names that are set here,
    then each ``--env NAME`` (its value here) or ``--env NAME=VALUE``."""
    env = {
        name: value
        for name, value in sorted(environ.items())
        if name not in NEVER_FORWARDED and (name in FORWARDED_NAMES or name.startswith(FORWARDED_PREFIXES))
    }
    for item in user:
        name, has_value, value = item.partition("=")
        if not _ENV_NAME.fullmatch(name):
            raise ConfigError(f"--env {item}: {name!r} is not a variable name (use --env NAME or NAME=VALUE)")
        if not has_value:
            if name not in environ:
                raise ConfigError(f"--env {name}: ${name} is not set here; set it or pass --env {name}=VALUE")
            value = environ[name]
        env[name] = value
    return env


def write_deepspeed_env(env: Mapping[str, str], path: Path) -> Path:
    """``NAME=VALUE`` lines for DeepSpeed's multi-node runner (found through ``$DS_ENV_FILE``).

    The runner reads one variable per line and wraps a value with spaces or shell characters in
    double quotes itself, so values are written as they are; one holding a newline cannot travel.
    """
    for name, value in env.items():
        if "\n" in value:
            raise ConfigError(f"${name} holds a newline and cannot be forwarded through {path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    # Only its owner may read it: a forwarded secret (--env HF_TOKEN) is in it as a value.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("".join(f"{name}={value}\n" for name, value in env.items()))
    os.replace(tmp, path)
    return path
