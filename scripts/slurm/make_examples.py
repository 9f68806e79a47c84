"""Write the example sbatch scripts of scripts/slurm/ (one per stage) from template.sbatch.in.

    python scripts/slurm/make_examples.py     # after editing template.sbatch.in; a test checks they match

The examples use paths relative to a checkout at /shared/dstrain with its .venv; `dstrain slurm`
writes one with your own paths (and the run.yaml it points at).
"""

from __future__ import annotations

from pathlib import Path

from launcher.slurm import SlurmJob, render_sbatch

HERE = Path(__file__).resolve().parent
# stage: (nodes, GPUs per node, time limit, CPUs per rank)
STAGES: dict[str, tuple[int, int, str, int]] = {
    "pretrain": (4, 8, "48:00:00", 12),
    "cpt": (2, 8, "24:00:00", 12),
    "sft": (1, 8, "12:00:00", 8),
}


def example(stage: str) -> SlurmJob:
    nodes, gpus, time, cpus = STAGES[stage]
    command = (
        f"dstrain slurm RECIPE --nodes {nodes} --gpus-per-node {gpus} --partition gpu --time {time} "
        f"--cpus-per-task {cpus}"
    )
    return SlurmJob(
        title=f"Example, {stage} stage: `{command}` writes yours (and its run.yaml); or edit this by hand.",
        run_yaml=Path(f"runs/{stage}/run.yaml"),
        workdir=Path("/shared/dstrain"),
        python=".venv/bin/python",
        trainer_script=Path("trainer/main.py"),
        nodes=nodes,
        tasks_per_node=gpus,
        gpus_per_node=gpus,
        job_name=f"dstrain-{stage}",
        output=f"runs/{stage}/slurm-%j.out",
        time=time,
        partition="gpu",
        cpus_per_task=cpus,
    )


def main() -> None:
    for stage in STAGES:
        path = HERE / f"{stage}.sbatch"
        path.write_text(render_sbatch(example(stage)), encoding="utf-8")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
