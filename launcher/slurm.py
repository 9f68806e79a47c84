"""``dstrain slurm``: an sbatch script rendered from ``scripts/slurm/template.sbatch.in``.

The template is a plain bash script with ``{{name}}`` fields; a user can edit it, or the
rendered script, by hand. :func:`render_sbatch` fills the fields from a :class:`SlurmJob`
and refuses to leave one unfilled. The script holds no training logic: srun one task per
rank, a trap that passes SIGUSR1 on, and a requeue on exit 75 (the template says why).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from launcher.hosts import is_secret
from trainer.dist import SLURM_PORT_BASE, SLURM_PORT_SPAN
from trainer.errors import ConfigError

TEMPLATE = Path(__file__).resolve().parents[1] / "scripts" / "slurm" / "template.sbatch.in"
_FIELD = re.compile(r"\{\{(\w+)\}\}")
# Values that go into #SBATCH lines as they are: no spaces, quotes or newlines.
_DIRECTIVE_VALUE = re.compile(r"[^\s'\"\\]+")
#: Where the job queues and for how long: ``dstrain slurm --NAME value`` becomes the SlurmJob field
#: NAME and the line ``#SBATCH --NAME=value``, as it is (in this order); the help of each flag.
QUEUE_OPTIONS = {
    "time": "#SBATCH --time, e.g. 48:00:00.",
    "partition": "#SBATCH --partition.",
    "account": "#SBATCH --account.",
    "qos": "#SBATCH --qos.",
}


@dataclass(frozen=True)
class SlurmJob:
    """One sbatch script's worth of choices (``dstrain slurm`` fills it from its options)."""

    title: str
    run_yaml: Path
    workdir: Path
    python: str
    trainer_script: Path
    nodes: int
    tasks_per_node: int
    gpus_per_node: int
    job_name: str
    output: str
    signal_lead_s: int = 300
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    cpus_per_task: int | None = None
    extra_sbatch: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.tasks_per_node < 1:
            raise ConfigError(f"--nodes {self.nodes} and --gpus-per-node {self.tasks_per_node} must be >= 1")
        if self.signal_lead_s < 1:
            raise ConfigError(
                f"--signal-lead-s {self.signal_lead_s} must be >= 1 (seconds before the time limit)"
            )
        for flag, value in (
            ("--job-name", self.job_name),
            ("--log", self.output),
            *((f"--{name}", getattr(self, name)) for name in QUEUE_OPTIONS),
        ):
            if value is not None and not _DIRECTIVE_VALUE.fullmatch(value):
                raise ConfigError(f"{flag} {value!r}: an #SBATCH value cannot hold spaces or quotes")
        for option in self.extra_sbatch:
            if not re.fullmatch(r"--?[A-Za-z][\w-]*(=\S+)?", option):
                raise ConfigError(
                    f"--sbatch {option!r}: expected one option such as --mem=64G or --exclusive"
                )


def sbatch_options(job: SlurmJob) -> list[str]:
    """The optional ``#SBATCH`` lines: GPUs, CPUs, limits, the queue, and the user's extras."""
    options = []
    if job.gpus_per_node:
        options.append(f"--gpus-per-node={job.gpus_per_node}")
    if job.cpus_per_task is not None:
        options.append(f"--cpus-per-task={job.cpus_per_task}")
    for name in QUEUE_OPTIONS:
        value = getattr(job, name)
        if value is not None:
            options.append(f"--{name}={value}")
    return [f"#SBATCH {option}" for option in (*options, *job.extra_sbatch)]


def export_lines(env: Mapping[str, str]) -> str:
    """``export NAME=value`` lines (shell-quoted) for the variables every rank must see."""
    if not env:
        return "# (no NCCL_*, GLOO_*, CUDA_*, HF_HOME, PYTHONPATH or --env variables were set when this was rendered)"
    return "\n".join(
        f"export {name}  # a secret: taken from the environment you submit from, never written here"
        if is_secret(name)
        else f"export {name}={shlex.quote(value)}"
        for name, value in env.items()
    )


def render_sbatch(job: SlurmJob, template: Path = TEMPLATE) -> str:
    """The sbatch script for ``job`` from ``template``; every ``{{field}}`` must be filled."""
    try:
        text = template.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--template {template}: cannot read it ({exc.strerror})") from None
    train_cmd = [job.python, "-u", str(job.trainer_script), "--config", str(job.run_yaml)]
    srun_options = f" --cpus-per-task={job.cpus_per_task}" if job.cpus_per_task is not None else ""
    values = {
        "title": job.title,
        "nodes": str(job.nodes),
        "tasks_per_node": str(job.tasks_per_node),
        "job_name": job.job_name,
        "output": job.output,
        "signal_lead_s": str(job.signal_lead_s),
        "more_sbatch": "\n".join(sbatch_options(job)),
        "port_base": str(SLURM_PORT_BASE),
        "port_span": str(SLURM_PORT_SPAN),
        "exports": export_lines(job.env),
        "workdir": shlex.quote(str(job.workdir)),
        "train_cmd": shlex.join(train_cmd),
        # srun no longer inherits sbatch's --cpus-per-task (SLURM 22.05+), so it is repeated.
        "srun_options": srun_options,
    }
    unknown = sorted(set(_FIELD.findall(text)) - set(values))
    if unknown:
        raise ConfigError(
            f"--template {template}: unknown field(s) {', '.join(unknown)}; known: {', '.join(values)}"
        )
    return _FIELD.sub(lambda m: values[m.group(1)], text)
