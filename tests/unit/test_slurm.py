"""Rank facts from every launcher (DistInfo.from_env), SLURM node lists, and the sbatch script:
its fields, its checks, `dstrain slurm`, and the examples in scripts/slurm/ (bash -n, shellcheck)."""

from __future__ import annotations

import importlib.util
import os
import shlex
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from launcher.cli import main
from launcher.slurm import TEMPLATE, SlurmJob, render_sbatch
from launcher.spawn import NodeLayout
from tests.helpers import REPO
from tests.slurm_cluster import require_tool
from trainer.dist import (
    DistInfo,
    expand_hostlist,
    expand_tasks_per_node,
    global_batch_summary,
    slurm_master_port,
)
from trainer.errors import ConfigError


@pytest.mark.parametrize(
    ("spec", "hosts"),
    [
        ("a[1-3]", ["a1", "a2", "a3"]),
        ("gpu[01-03,07],cpu5", ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]),
        ("node-[001-002]x", ["node-001x", "node-002x"]),
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("r[1-2]-n[1-2]", ["r1-n1", "r1-n2", "r2-n1", "r2-n2"]),
        ("login", ["login"]),
    ],
)
def test_node_lists_expand(spec: str, hosts: list[str]) -> None:
    assert expand_hostlist(spec) == hosts


@pytest.mark.parametrize("spec", ["a[1-3", "a]1[", "a[3-1]", "a[x]", "a,,b", "a[[1]]", ""])
def test_bad_node_lists_name_the_list(spec: str) -> None:
    with pytest.raises(ConfigError, match="cannot expand the node list"):
        expand_hostlist(spec)


def test_tasks_per_node_and_job_port() -> None:
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("8") == [8]
    with pytest.raises(ConfigError, match="tasks per node"):
        expand_tasks_per_node("2(x)")
    ports = {slurm_master_port(job) for job in range(100_000, 140_000)}
    assert min(ports) >= 15000 and max(ports) < 32768, "below Linux's ephemeral range"
    assert slurm_master_port(123456) == slurm_master_port(123456) != slurm_master_port(123457)


def test_rank_facts_from_dstrains_spawner_round_trip() -> None:
    layout = NodeLayout(nproc_per_node=4, node_rank=2, nnodes=3, master_addr="n0", master_port=2900)
    env = layout.rank_env({}, local_rank=1)
    assert DistInfo.from_env(env, cuda_devices=4) == DistInfo(
        rank=9,
        local_rank=1,
        world_size=12,
        local_world_size=4,
        node_rank=2,
        num_nodes=3,
        master_addr="n0",
        master_port=2900,
        launcher="dstrain",
        device="cuda:1",
    )


def test_rank_facts_from_torchrun_and_deepspeed() -> None:
    torchrun = {
        **dict(RANK="3", LOCAL_RANK="1", WORLD_SIZE="4", LOCAL_WORLD_SIZE="2", GROUP_RANK="1"),
        **dict(GROUP_WORLD_SIZE="2", MASTER_ADDR="10.0.0.1", MASTER_PORT="29500", TORCHELASTIC_RUN_ID="x"),
    }
    got = DistInfo.from_env(torchrun, cuda_devices=0)
    assert (got.rank, got.local_rank, got.world_size, got.node_rank, got.num_nodes) == (3, 1, 4, 1, 2)
    assert (got.launcher, got.device, got.backend, got.init_method) == (
        "torchrun",
        "cpu",
        "gloo",
        "tcp://10.0.0.1:29500",
    )
    deepspeed = {
        **dict(RANK="5", LOCAL_RANK="1", WORLD_SIZE="8", LOCAL_SIZE="4", CROSS_RANK="1", CROSS_SIZE="2"),
        **dict(MASTER_ADDR="fd00::1", MASTER_PORT="29500"),
    }
    got = DistInfo.from_env(deepspeed, cuda_devices=4)
    assert (got.launcher, got.local_world_size, got.node_rank, got.num_nodes) == ("deepspeed", 4, 1, 2)
    assert got.init_method == "tcp://[fd00::1]:29500"


SRUN_TASK = {
    "SLURM_JOB_ID": "4242",
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "5",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_NTASKS": "8",
    "SLURM_STEP_NUM_TASKS": "8",
    "SLURM_STEP_NUM_NODES": "2",
    "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
    "SLURM_STEP_NODELIST": "gpu[07-08]",
}


def test_rank_facts_from_a_bare_srun_task() -> None:
    got = DistInfo.from_env(SRUN_TASK, cuda_devices=4)
    assert got == DistInfo(
        rank=5,
        local_rank=1,
        world_size=8,
        local_world_size=4,
        node_rank=1,
        num_nodes=2,
        master_addr="gpu07",
        master_port=slurm_master_port(4242),
        launcher="srun",
        device="cuda:1",
    )
    # The sbatch template exports the master; a task takes it over its own derivation.
    assert DistInfo.from_env(
        {**SRUN_TASK, "MASTER_ADDR": "10.1.1.7", "MASTER_PORT": "15999"}, 0
    ).init_method == ("tcp://10.1.1.7:15999")
    # `srun --gpus-per-task=1`: each task sees its one GPU as cuda:0, and DeepSpeed is told so.
    one_gpu = DistInfo.from_env(SRUN_TASK, cuda_devices=1)
    assert one_gpu.device == "cuda:0" and one_gpu.library_env()["LOCAL_RANK"] == "0"
    assert one_gpu.library_env()["RANK"] == "5" and one_gpu.library_env()["CROSS_RANK"] == "1"


def test_which_launcher_wins() -> None:
    # A launcher inside an srun task (torchrun, dstrain run) sets RANK: its facts win.
    inside = {
        **SRUN_TASK,
        "RANK": "1",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "a",
        "MASTER_PORT": "1",
    }
    assert DistInfo.from_env(inside, cuda_devices=0).world_size == 2
    # The batch script itself has SLURM_PROCID=0 and SLURM_NTASKS=8 but is no task of a step:
    # a trainer started there is one process, not rank 0 of 8 waiting for 7 peers.
    batch = {k: v for k, v in SRUN_TASK.items() if not k.startswith("SLURM_STEP")}
    assert DistInfo.from_env(batch, cuda_devices=0) == DistInfo()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "1"}, r"\$MASTER_ADDR is not set"),
        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "a"}, r"\$MASTER_PORT is not set"),
        (
            {"RANK": "x", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"},
            r"\$RANK='x' is not an integer",
        ),
        ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "rank 2 of 2"),
        (
            {**SRUN_TASK, "SLURM_JOB_NODELIST": "", "SLURM_STEP_NODELIST": ""},
            r"\$SLURM_JOB_NODELIST is not set",
        ),
    ],
)
def test_bad_rank_facts_are_config_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DistInfo.from_env(env, cuda_devices=0)


def test_global_batch_summary() -> None:
    assert global_batch_summary(16, 8, 24, 512) == (
        "global batch = micro x accum x world = 16 x 8 x 24 = 3072 sequences (1572864 tokens)"
    )


def job(**changes: object) -> SlurmJob:
    fields: dict = dict(
        title="test job",
        run_yaml=Path("/runs/a b/run.yaml"),
        workdir=Path("/work dir"),
        python="/venv/bin/python",
        trainer_script=Path("/repo/trainer/main.py"),
        nodes=2,
        tasks_per_node=4,
        gpus_per_node=4,
        job_name="tiny",
        output="/runs/slurm-%j.out",
        env={"NCCL_SOCKET_IFNAME": "ib0", "HF_HOME": "/data/hf cache", "X": "it's"},
    )
    fields.update(changes)
    return SlurmJob(**fields)


def lint(script: str, tmp_path: Path) -> None:
    """bash -n, then shellcheck (installed with apt-get when missing, else a skip)."""
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    syntax = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    shellcheck = require_tool("shellcheck", "shellcheck")
    checked = subprocess.run([shellcheck, str(path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout


def test_rendered_script_has_the_preemption_contract(tmp_path: Path) -> None:
    script = render_sbatch(job(partition="gpu", time="4:00:00", qos="high", account="proj", cpus_per_task=6))
    directives = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert directives == [
        "#SBATCH --job-name=tiny",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --output=/runs/slurm-%j.out",
        "#SBATCH --open-mode=append",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@300",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --cpus-per-task=6",
        "#SBATCH --time=4:00:00",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj",
        "#SBATCH --qos=high",
    ]
    assert "{{" not in script
    train = "/venv/bin/python -u /repo/trainer/main.py --config '/runs/a b/run.yaml' --resume auto"
    assert f"train=({train})" in script
    assert 'srun --ntasks-per-node=4 --cpus-per-task=6 "${train[@]}" &' in script
    assert "trap 'forward USR1' USR1" in script and 'kill -USR1 "$srun_pid"' in script
    assert 'if [ "$rc" -eq 75 ]; then' in script and 'scontrol requeue "$SLURM_JOB_ID"' in script
    assert "export MASTER_PORT=$((15000 + SLURM_JOB_ID % 16000))" in script
    assert "export HF_HOME='/data/hf cache'" in script and "export X='it'\"'\"'s'" in script
    assert "cd '/work dir' || exit 1" in script
    lint(script, tmp_path)


def test_rendered_script_runs_its_trap_and_requeue_logic(tmp_path: Path) -> None:
    """The script under bash with stand-ins for srun and scontrol: a SIGUSR1 to the script
    reaches "srun", whose exit 75 leads to `scontrol requeue JOBID` and exit 75."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        textwrap.dedent(
            """\
            #!/bin/bash
            trap 'echo "srun got USR1"; exit 75' USR1
            echo "srun $*"; touch "$MARKS/srun-started"
            while true; do sleep 0.1; done
            """
        )
    )
    (bin_dir / "scontrol").write_text(
        '#!/bin/bash\necho "$*" >> "$MARKS/scontrol"\n[ "$2" = hostnames ] && echo n7\n'
    )
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch(job(workdir=tmp_path, output=str(tmp_path / "out"))))
    marks = tmp_path / "marks"
    marks.mkdir()
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "MARKS": str(marks), "SLURM_JOB_ID": "77"}
    env |= {"SLURM_JOB_NODELIST": "n[7-8]", "SLURM_JOB_NUM_NODES": "2", "SLURM_RESTART_COUNT": "3"}
    proc = subprocess.Popen(
        ["bash", str(script)], env=env, stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 60
        while not (marks / "srun-started").exists():
            assert time.monotonic() < deadline and proc.poll() is None, "the stand-in srun never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)  # as scancel -s USR1 -b does
        out, _ = proc.communicate(timeout=60)
    finally:
        try:  # whatever the script left running (the stand-in srun on a failure)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 75, out
    assert (marks / "scontrol").read_text().splitlines()[-1] == "requeue 77"
    lines = out.splitlines()
    assert all(line.startswith("[restart 3] ") for line in lines), out
    assert any("got SIGUSR1: passing SIGUSR1 to the ranks" in line for line in lines)
    assert any(line.endswith("srun got USR1") for line in lines)
    assert any("the ranks saved and exited 75: requeueing job 77" in line for line in lines)
    assert any("master n7" in line for line in lines)  # no NodeAddr from the stand-in: the host name


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"job_name": "my job"}, "--job-name 'my job'"),
        ({"time": "1:00\n#SBATCH --x"}, "--time"),
        ({"extra_sbatch": ("--mem 64G",)}, "--sbatch '--mem 64G'"),
        ({"signal_lead_s": 0}, "--signal-lead-s 0"),
        ({"tasks_per_node": 0}, "must be >= 1"),
    ],
)
def test_bad_slurm_options_are_config_errors(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        job(**changes)


def test_template_fields_are_checked(tmp_path: Path) -> None:
    custom = tmp_path / "mine.sbatch.in"
    custom.write_text(TEMPLATE.read_text() + "echo {{unknown_field}}\n")
    with pytest.raises(ConfigError, match="unknown field.*unknown_field"):
        render_sbatch(job(), custom)


def test_dstrain_slurm_writes_the_run_files_and_prints_the_script(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        f"output_dir: {tmp_path / 'run'}\ntokenizer: t\ntrain: {{micro_batch_size: 2, grad_accum: 4}}\n"
    )
    monkeypatch.setenv("NCCL_DEBUG", "WARN")
    argv = [
        "slurm",
        str(recipe),
        "--nodes",
        "3",
        "--gpus-per-node",
        "8",
        "--partition",
        "gpu",
        "--time",
        "2:00:00",
    ]
    argv += [
        "--sbatch=--exclusive",
        "--env",
        "WANDB_PROJECT=x",
        "--workdir",
        str(tmp_path),
        "--optim.lr",
        "1e-3",
    ]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert (tmp_path / "run" / "run.yaml").is_file() and "lr: 0.001" in (
        tmp_path / "run" / "run.yaml"
    ).read_text()
    assert "global batch = micro x accum x world = 2 x 4 x 24 = 192 sequences" in err
    for line in (
        "#SBATCH --nodes=3",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --exclusive",
        "#SBATCH --job-name=run",
    ):
        assert line in out.splitlines()
    assert f"#SBATCH --output={tmp_path / 'run' / 'slurm-%j.out'}" in out
    assert "export NCCL_DEBUG=WARN" in out and "export WANDB_PROJECT=x" in out
    assert f"--config {shlex.quote(str(tmp_path / 'run' / 'run.yaml'))} --resume auto" in out
    assert main(["slurm", str(recipe), "--device", "cpu", "--gpus-per-node", "2"]) == 0
    assert "#SBATCH --gpus-per-node" not in capsys.readouterr().out  # CPU ranks request no GPUs


def load_examples():
    spec = importlib.util.spec_from_file_location(
        "make_examples", REPO / "scripts" / "slurm" / "make_examples.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("stage", ["pretrain", "cpt", "sft"])
def test_example_per_stage_is_current_and_lint_clean(stage: str, tmp_path: Path) -> None:
    examples = load_examples()
    path = REPO / "scripts" / "slurm" / f"{stage}.sbatch"
    assert path.read_text() == render_sbatch(examples.example(stage)), "run scripts/slurm/make_examples.py"
    lint(path.read_text(), tmp_path)


@pytest.mark.parametrize(
    ("local_rank", "gpus", "launcher", "want"),
    [
        (3, 4, "deepspeed", "cuda:3"),
        (1, 0, "torchrun", "cpu"),
        (5, 1, "srun", "cuda:0"),  # srun --gpus-per-task=1: each task sees its own GPU as cuda:0
        (2, 2, "deepspeed", "more ranks"),
        (4, 4, "torchrun", "more ranks"),
        (3, 2, "srun", "more ranks"),  # 2 visible: not per-task binding, a shortfall
        (1, 1, "dstrain", "more ranks"),
    ],
)
def test_more_ranks_than_gpus_is_an_error_naming_the_numbers(local_rank, gpus, launcher, want) -> None:
    """The old rule wrapped around (local_rank % gpus): two ranks on one GPU, failing later in NCCL."""
    from trainer.dist import pick_device

    if want != "more ranks":
        assert pick_device(local_rank, 8, gpus, launcher) == want
        return
    with pytest.raises(ConfigError) as err:
        pick_device(local_rank, 8, gpus, launcher, rank=10 + local_rank)
    message = str(err.value)
    assert f"rank {10 + local_rank} is local rank {local_rank} of 8" in message
    assert f"shows {gpus} CUDA device(s)" in message and f"{launcher} started more ranks" in message
    assert f"start at most {gpus} per node" in message


def test_from_env_refuses_a_deepspeed_rank_beyond_the_gpus() -> None:
    env = dict(RANK="3", LOCAL_RANK="3", WORLD_SIZE="4", LOCAL_SIZE="4", CROSS_RANK="0", CROSS_SIZE="1")
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    with pytest.raises(ConfigError, match="rank 3 is local rank 3 of 4 .* shows 2 CUDA device"):
        DistInfo.from_env(env, cuda_devices=2)
