"""The sbatch script of `dstrain slurm` on a real SLURM cluster: two slurmd nodes on this
machine (scripts/slurm/local-cluster.sh; needs root and apt-get, else skips with the reason).

A tiny pretrain runs as 2 nodes x 1 CPU rank, srun one task per rank. Mid-run the test sends
``scancel -s USR1 -b`` (what ``--signal=B:USR1@lead`` does before a time limit): the ranks save,
exit 75, the script requeues the job, the restart resumes (``--resume auto``) and finishes. An
uninterrupted job of the same recipe runs beside it; both must log the same per-step losses,
and the output file must hold both runs of the requeued job, each line tagged with its restart.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.faults import runs
from tests.launch import DSTRAIN, cpu_env
from tests.slurm_cluster import LocalCluster, require_tool
from trainer.dist import expand_hostlist

pytestmark = pytest.mark.distributed
MAX_STEPS = 30
STEPS = range(1, MAX_STEPS + 1)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = LocalCluster(tmp_path_factory.mktemp("slurm"), nodes=2)
    cluster.up()
    yield cluster
    cluster.down()


def render(cluster: LocalCluster, recipe: Path, root: Path, name: str) -> Path:
    """`dstrain slurm RECIPE --nodes 2 --gpus-per-node 1 --device cpu` into NAME.sbatch."""
    proc = subprocess.run(
        [
            DSTRAIN,
            "slurm",
            recipe,
            "--nodes",
            "2",
            "--gpus-per-node",
            "1",
            "--device",
            "cpu",
            "--job-name",
            name,
        ],
        cwd=root,
        env=cpu_env(**cluster.env),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    script = root / f"{name}.sbatch"
    script.write_text(proc.stdout)
    return script


def test_scontrol_and_python_expand_node_lists_alike(cluster):
    for spec in ("a[1-3]", "gpu[01-03,07],cpu5", "n[8-10]", "r[1-2]-n[1-2]"):
        out = cluster.run("scontrol", "show", "hostnames", spec).stdout.split()
        assert out == expand_hostlist(spec), spec


def test_preempted_job_saves_requeues_itself_and_resumes_exactly(cluster, tiny_tokenizer_dir, tmp_path):
    shellcheck = require_tool("shellcheck", "shellcheck")
    recipes = {
        name: runs.make_recipe(
            tmp_path, tiny_tokenizer_dir, name, train={"max_steps": MAX_STEPS, "save_every": 100}
        )
        for name in ("uninterrupted", "preempted")
    }
    scripts = {name: render(cluster, recipe, tmp_path, name) for name, recipe in recipes.items()}
    for script in scripts.values():
        assert subprocess.run(["bash", "-n", script]).returncode == 0
        lint = subprocess.run([shellcheck, script], capture_output=True, text=True)
        assert lint.returncode == 0, lint.stdout
    env = cpu_env()
    jobs = {name: cluster.submit(script, **env) for name, script in scripts.items()}
    out = tmp_path / "preempted"
    try:
        deadline = time.monotonic() + 600
        while 8 not in runs.metrics(out):
            state = cluster.job(jobs["preempted"]).get("JobState")
            assert state in ("PENDING", "RUNNING", "CONFIGURING"), (
                f"job ended early: {state}\n{cluster.logs()}"
            )
            assert time.monotonic() < deadline, f"step 8 never came\n{cluster.logs()}"
            time.sleep(0.2)
        cluster.run("scancel", "-s", "USR1", "-b", str(jobs["preempted"]))
        done = {
            name: cluster.wait_for(job, {"COMPLETED", "FAILED", "CANCELLED"}, 600)
            for name, job in jobs.items()
        }
    finally:
        cluster.run("scancel", *map(str, jobs.values()), check=False)

    with open(out / f"slurm-{jobs['preempted']}.out", encoding="utf-8", newline="") as f:
        log = f.read()  # newline="": progress bars redraw with \r, which is not a new line
    assert done["preempted"]["JobState"] == "COMPLETED" and done["preempted"]["Restarts"] == "1", (
        f"{done['preempted']}\n{log[-5000:]}"
    )
    assert done["uninterrupted"]["JobState"] == "COMPLETED" and done["uninterrupted"]["Restarts"] == "0"
    # The first run: the signal reached both ranks, both saved the same step, exit 75, requeue.
    first = [line for line in log.split("\n") if line.startswith("[restart 0] ")]
    saved = dict(
        re.findall(r"\[rank(\d)\].*pre-emption signal received: saving step (\d+)", "\n".join(first))
    )
    assert set(saved) == {"0", "1"} and len(set(saved.values())) == 1, log[-5000:]
    assert any("got SIGUSR1: passing SIGUSR1 to the ranks" in line for line in first)
    assert any("requeueing job" in line for line in first)
    # The second run: the same job, resumed from that step, finished; the rank facts from srun.
    second = "\n".join(line for line in log.split("\n") if line.startswith("[restart 1] "))
    assert f"resumed from {out / 'checkpoints' / ('step_' + saved['0'])}" in second, log[-5000:]
    assert "from srun, master 127.0.0.1:" in second and "node 0 of 2" in second
    assert "srun exited 0" in second
    # Every line carries its restart, but slurmstepd's own note on the requeue.
    untagged = [line for line in log.split("\n") if line and not line.startswith(("[restart ", "slurmstepd"))]
    assert not untagged
    runs.assert_same_run(runs.metrics(out), runs.metrics(tmp_path / "uninterrupted"), STEPS)
    assert sorted(runs.metrics(tmp_path / "uninterrupted")) == list(STEPS)
