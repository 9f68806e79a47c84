"""The same trainer under every launcher, on real 2-rank DeepSpeed (CPU, gloo, fp32), against
one uninterrupted `deepspeed --num_gpus 2` run:

- two `dstrain run --no-ssh` node launchers on loopback (node ranks 0 and 1, master
  127.0.0.1, one rank each): the same per-step losses, learning rates and documents;
- `torchrun --nproc-per-node 2`, stopped by SIGTERM to torchrun and resumed with torchrun;
- `deepspeed`, stopped by SIGTERM to its per-node launcher (deepspeed.launcher.launch), and
  resumed as a bare `srun` would start the ranks (SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS,
  master from SLURM_JOB_NODELIST, port from SLURM_JOB_ID, no RANK/MASTER_* at all).

The third-party launchers cannot exit 75 when they are signalled themselves (README,
"Pre-emption"): torchrun and deepspeed's launcher both exit 1. What is checked for them is what
holds: inside their grace (30 s), every rank saves the same step, and the resume is exact.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.faults import runs
from tests.launch import DSTRAIN, free_port, start, venv_bin
from trainer.dist import SLURM_PORT_BASE, SLURM_PORT_SPAN

pytestmark = pytest.mark.distributed
MAX_STEPS = 30
STEPS = range(1, MAX_STEPS + 1)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("multinode")


def recipe_for(root: Path, tokenizer_dir: Path, name: str) -> Path:
    return runs.make_recipe(root, tokenizer_dir, name, train={"max_steps": MAX_STEPS, "save_every": 100})


@pytest.fixture(scope="module")
def reference(root, tiny_tokenizer_dir) -> dict[int, dict]:
    """One node, 2 ranks, DeepSpeed's launcher, uninterrupted."""
    code, out = runs.run(recipe_for(root, tiny_tokenizer_dir, "reference"))
    assert code == 0, out[-4000:]
    got = runs.metrics(root / "reference")
    assert sorted(got) == list(STEPS)
    return got


def test_two_no_ssh_node_launchers_train_the_same_run(reference, root, tiny_tokenizer_dir):
    recipe = recipe_for(root, tiny_tokenizer_dir, "two_nodes")
    common = ["run", recipe, "--nodes", "2", "--gpus-per-node", "1", "--no-ssh"]
    common += ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    # Each "node" its own node-local temp dir (node 1 keeps its run.yaml copy there).
    tmp = [root / f"node{k}_tmp" for k in (0, 1)]
    for path in tmp:
        path.mkdir()
    nodes = [start([DSTRAIN, *common, "--node-rank", str(k)], TMPDIR=str(tmp[k])) for k in (0, 1)]
    results = [runs.finish(node) for node in nodes]
    for k, (code, out) in enumerate(results):
        assert code == 0, f"node {k}: exit {code}\n{out[-4000:]}"
    assert f"node 1 reads its node-local copy {tmp[1]}" in results[1][1]
    log = (root / "two_nodes" / "train.log").read_text()
    assert "distributed: rank 0 of 2 (node 0 of 2, local rank 0 of 1) from dstrain" in log
    runs.assert_same_run(runs.metrics(root / "two_nodes"), reference, STEPS)


def stop_and_check_save(proc: subprocess.Popen, target: psutil.Process, out: Path, at_step: int) -> int:
    """SIGTERM to ``target`` at ``at_step``; every rank saves one step. Returns the exit code."""
    runs.wait_for_step(proc, out, at_step)
    target.send_signal(signal.SIGTERM)
    code, output = runs.finish(proc)
    saved = dict(re.findall(r"\[rank(\d)\].*pre-emption signal received: saving step (\d+)", output))
    assert set(saved) == {"0", "1"} and len(set(saved.values())) == 1, f"{saved}\n{output[-4000:]}"
    ckpt = out / "checkpoints" / f"step_{saved['0']}"
    assert (out / "checkpoints" / "latest").read_text() == ckpt.name and (ckpt / "COMPLETE").is_file()
    return code


def test_torchrun_saves_on_sigterm_and_resumes_exactly(reference, root, tiny_tokenizer_dir):
    """torchrun forwards SIGTERM to its workers and gives them 30 s before SIGKILL; it exits 1
    itself (the signal is re-raised as an error), and a worker's 75 is a failure to it too."""
    recipe = recipe_for(root, tiny_tokenizer_dir, "torchrun")
    out = root / "torchrun"
    torchrun = [venv_bin("torchrun"), "--nproc-per-node", "2", "--master-port", str(free_port()), runs.MAIN]
    proc = start([*torchrun, "--config", recipe])
    code = stop_and_check_save(proc, psutil.Process(proc.pid), out, at_step=8)
    assert code == 1, "torchrun's exit status after SIGTERM changed: update README (Pre-emption)"
    code, output = runs.finish(start([*torchrun, "--config", recipe, "--resume"]))
    assert code == 0, output[-4000:]
    assert "from torchrun" in (out / "train.log").read_text()
    runs.assert_same_run(runs.metrics(out), reference, STEPS)


def deepspeed_node_launcher(runner: subprocess.Popen) -> psutil.Process:
    """The `python -m deepspeed.launcher.launch` process that DeepSpeed's runner started."""
    for child in psutil.Process(runner.pid).children():
        if "deepspeed.launcher.launch" in child.cmdline():
            return child
    raise AssertionError("no deepspeed.launcher.launch under the deepspeed runner")


def slurm_job_id_with_a_free_port() -> int:
    """A job id whose derived rendezvous port is free on this machine now."""
    for offset in range(1000, SLURM_PORT_SPAN, 97):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", SLURM_PORT_BASE + offset))
            except OSError:
                continue
        return 7 * SLURM_PORT_SPAN + offset
    raise AssertionError("no free port in the SLURM range")


def srun_task_env(task: int, tasks: int, job_id: int) -> dict[str, str]:
    """What srun gives task ``task`` of a one-node step (and nothing any other launcher sets)."""
    return {
        "SLURM_JOB_ID": str(job_id),
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": str(task),
        "SLURM_LOCALID": str(task),
        "SLURM_NODEID": "0",
        "SLURM_NTASKS": str(tasks),
        "SLURM_STEP_NUM_TASKS": str(tasks),
        "SLURM_STEP_NUM_NODES": "1",
        "SLURM_STEP_TASKS_PER_NODE": str(tasks),
        "SLURM_JOB_NODELIST": "localhost",
    }


def test_deepspeed_saves_on_sigterm_to_its_launcher_and_bare_srun_tasks_resume_exactly(
    reference, root, tiny_tokenizer_dir
):
    """deepspeed.launcher.launch terminates every rank on SIGTERM and waits 30 s before SIGKILL;
    it then exits 1 whatever the ranks returned. The resume runs as two bare srun tasks."""
    recipe = recipe_for(root, tiny_tokenizer_dir, "deepspeed")
    out = root / "deepspeed"
    runner = runs.start(recipe, launcher="deepspeed")
    runs.wait_for_step(runner, out, 2)
    code = stop_and_check_save(runner, deepspeed_node_launcher(runner), out, at_step=8)
    assert code == 1, "deepspeed's exit status after SIGTERM changed: update README (Pre-emption)"

    job_id = slurm_job_id_with_a_free_port()
    tasks = [
        start(
            [sys.executable, "-u", runs.MAIN, "--config", recipe, "--resume"], **srun_task_env(t, 2, job_id)
        )
        for t in (0, 1)
    ]
    for t, (code, output) in enumerate(runs.finish(task) for task in tasks):
        assert code == 0, f"task {t}: exit {code}\n{output[-4000:]}"
    port = SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN
    assert (
        f"rank 0 of 2 (node 0 of 1, local rank 0 of 2) from srun, master localhost:{port}"
        in (out / "train.log").read_text()
    )
    runs.assert_same_run(runs.metrics(out), reference, STEPS)
