"""launcher.cli, launcher.launch, launcher.hosts and launcher.spawn: dry runs, the launch
commands of every node, errors, the forwarded environment, and the spawner's signals and exit codes."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import types
from pathlib import Path

import pytest
import yaml

import launcher.cli as cli
import trainer.config as config
from launcher.cli import main, split_overrides
from launcher.hosts import forwarded_env, read_hostfile
from launcher.launch import Hardware, LaunchPlan, build_launch_command, node_local_config, trainer_script
from trainer.config import build_config
from trainer.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    """A tiny recipe whose tokenizer and data are never loaded."""
    path = tmp_path / "tiny.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            stage: pretrain
            output_dir: {tmp_path / "run"}
            tokenizer: some/dir
            model:
              config: tiny
            train:
              micro_batch_size: 2
              grad_accum: 2
            """
        )
    )
    return path


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The CLI as a user runs it: a fresh interpreter, real exit status and stderr."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "launcher.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_build_launch_command_single_node() -> None:
    plan = LaunchPlan(run_yaml=Path("/r/run.yaml"), gpus_per_node=2, resume="auto", master_port=29555)
    cmd = build_launch_command(plan, script=Path("/pkg/trainer/main.py"))
    python = sys.executable
    assert cmd == [
        *(python, "-m", "launcher.spawn", "--nproc-per-node", "2", "--nnodes", "1", "--node-rank", "0"),
        *("--master-addr", "127.0.0.1", "--master-port", "29555", "--"),
        *(python, "-u", "/pkg/trainer/main.py", "--config", "/r/run.yaml", "--resume", "auto"),
    ]


def test_build_launch_command_pdsh() -> None:
    plan = LaunchPlan(
        run_yaml=Path("/r/run.yaml"),
        gpus_per_node=4,
        nodes=2,
        launcher="pdsh",
        hostfile=Path("/h/hosts"),
        master_addr="10.0.0.1",
    )
    cmd = build_launch_command(plan, launcher_cmd=["deepspeed"], script=Path("main.py"))
    assert cmd == [
        *("deepspeed", "--hostfile", "/h/hosts", "--launcher", "pdsh", "--num_nodes", "2", "--num_gpus", "4"),
        *("--master_addr", "10.0.0.1", "main.py", "--config", "/r/run.yaml"),
    ]


def test_trainer_script_is_the_installed_file_not_cwd_relative() -> None:
    import trainer

    assert trainer_script() == Path(trainer.__file__).resolve().parent / "main.py"
    assert trainer_script().is_absolute()


@pytest.fixture
def cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the CLI see a CPU-only machine, whatever this one has."""
    monkeypatch.setattr(cli, "detect_hardware", lambda: Hardware(gpu_count=0, bf16_supported=False))


def test_dry_run_writes_run_files_and_prints_the_command(
    recipe: Path, cpu_only: None, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["run", str(recipe), "--optim.lr", "3e-4", "--dry-run", "--gpus", "2", "--zero.stage=3"]
    argv += ["--train.grad_accum", "4", "--master-port", "29611", "--resume"]
    assert main(argv) == 0
    run_dir = recipe.parent / "run"
    resolved = build_config(base=yaml.safe_load((run_dir / "run.yaml").read_text()))
    assert resolved.optim.lr == 3e-4 and resolved.zero.stage == 3 and resolved.train.grad_accum == 4
    assert resolved.train.micro_batch_size == 2 and resolved.model.config == "tiny"
    ds = json.loads((run_dir / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["gradient_accumulation_steps"] == 4 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True

    captured = capsys.readouterr()
    cmd = shlex.split(captured.out.strip().splitlines()[-1])
    assert cmd == [
        *(
            sys.executable,
            "-m",
            "launcher.spawn",
            "--nproc-per-node",
            "2",
            "--nnodes",
            "1",
            "--node-rank",
            "0",
        ),
        *("--master-addr", "127.0.0.1", "--master-port", "29611", "--", sys.executable, "-u"),
        *(str(trainer_script()), "--config", str((run_dir / "run.yaml").resolve()), "--resume", "latest"),
    ]
    # micro 2 x accum 4 x 2 ranks, 512-token rows (the default max_seq_len)
    assert "global batch = micro x accum x world = 2 x 4 x 2 = 16 sequences (8192 tokens)" in captured.err


def test_dry_run_on_gpus_uses_bf16_and_every_visible_device(
    recipe: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The spawner leaves CUDA_VISIBLE_DEVICES to the ranks: local rank i takes the i-th visible GPU.
    monkeypatch.setattr(cli, "detect_hardware", lambda: Hardware(gpu_count=4, bf16_supported=True))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,5,7")
    assert main(["run", str(recipe), "--dry-run", "--zero.offload_optimizer", "true"]) == 0
    ds = json.loads((recipe.parent / "run" / "ds_config.json").read_text())
    assert ds["torch_autocast"]["dtype"] == "bfloat16"  # bf16: autocast over fp32 parameters
    assert ds["zero_optimization"]["offload_optimizer"]["pin_memory"] is True
    cmd = shlex.split(capsys.readouterr().out.strip().splitlines()[-1])
    assert cmd[cmd.index("--nproc-per-node") + 1] == "4"  # --gpus defaults to all visible
    assert main(["run", str(recipe), "--dry-run", "--gpus", "8"]) == 2
    assert "--gpus-per-node 8 but only 4 CUDA GPUs" in capsys.readouterr().err


def test_no_ssh_dry_run_prints_every_node_and_only_node0_writes_the_output_dir(
    recipe: Path, cpu_only: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(recipe.parent / "node-tmp"))  # the node-local dir
    common = ["run", str(recipe), "--nodes", "3", "--gpus-per-node", "2", "--no-ssh"]
    common += ["--master-addr", "10.1.2.3", "--master-port", "29400", "--dry-run"]
    run_dir = recipe.parent / "run"
    assert main([*common, "--node-rank", "2"]) == 0
    assert not run_dir.exists(), "a node other than node 0 wrote into the shared output dir"
    err = capsys.readouterr().err
    local = node_local_config(build_config(config_path=recipe).to_yaml())
    assert f"node 2 reads its node-local copy {local}" in err and local.is_file()
    assert "= 2 x 2 x 6 = 24 sequences" in err

    assert main([*common, "--node-rank", "0"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0::2] == ["# node 0 of 3", "# node 1 of 3", "# node 2 of 3"]
    for k, line in enumerate(lines[1::2]):
        cmd = shlex.split(line)
        assert cmd[cmd.index("--node-rank") + 1] == str(k) and cmd[cmd.index("--nnodes") + 1] == "3"
        assert (
            cmd[cmd.index("--master-addr") + 1] == "10.1.2.3"
            and cmd[cmd.index("--master-port") + 1] == "29400"
        )
        config = cmd[cmd.index("--config") + 1]
        assert config == (str((run_dir / "run.yaml").resolve()) if k == 0 else str(local))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--nodes", "2"], "--nodes 2 needs --hostfile F"),
        (["--nodes", "2", "--no-ssh", "--node-rank", "1"], "needs --master-addr, --master-port"),
        (
            ["--nodes", "2", "--no-ssh", "--node-rank", "2", "--master-addr", "a", "--master-port", "1"],
            "0..1",
        ),
        (["--node-rank", "1"], "--node-rank goes with --no-ssh"),
        (["--no-ssh", "--hostfile", "h"], "exclude each other"),
        (["--env", "NOT_SET_ANYWHERE_XYZ"], "$NOT_SET_ANYWHERE_XYZ is not set here"),
        (["--env", "1BAD=x"], "is not a variable name"),
    ],
)
def test_multi_node_option_errors_are_one_line(
    recipe: Path, cpu_only: None, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    assert main(["run", str(recipe), "--dry-run", *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_hostfile_run_uses_deepspeed_over_pdsh_and_forwards_the_environment(
    recipe: Path, cpu_only: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    hostfile = recipe.parent / "hosts"
    hostfile.write_text("# our nodes\nworker-1 slots=8\nworker-2 slots=8  # spare\nworker-3 slots=4\n")
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "ib0")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setenv("MY_TOKEN", "a b")
    argv = [
        "run",
        str(recipe),
        "--hostfile",
        str(hostfile),
        "--gpus",
        "8",
        "--nodes",
        "2",
        "--env",
        "MY_TOKEN",
    ]
    assert main([*argv, "--env", "EXTRA=1", "--master-port", "29777", "--dry-run"]) == 0
    out, err = capsys.readouterr()
    env_file = recipe.parent / "run" / ".deepspeed_env"
    line = shlex.split(out.strip().splitlines()[-1])
    assert line[0] == f"DS_ENV_FILE={env_file}" and Path(line[1]).name == "deepspeed"
    assert line[2:13] == [
        *("--hostfile", str(hostfile), "--launcher", "pdsh", "--num_nodes", "2", "--num_gpus", "8"),
        *("--master_port", "29777", str(trainer_script())),
    ]
    exported = dict(row.split("=", 1) for row in env_file.read_text().splitlines())
    assert (
        exported["NCCL_SOCKET_IFNAME"] == "ib0" and exported["MY_TOKEN"] == "a b" and exported["EXTRA"] == "1"
    )
    assert "CUDA_VISIBLE_DEVICES" not in exported, "each node's launcher sets its own devices"
    assert "= 2 x 2 x 16 = 64 sequences" in err  # 2 of 3 hosts, 8 slots each

    hostfile.write_text("worker-1 slots=8\nworker-2 8\n")
    assert main([*argv, "--dry-run"]) == 2
    assert f"--hostfile {hostfile} line 2: 'worker-2 8' is not 'HOST slots=N'" in capsys.readouterr().err


def test_forwarded_env_and_hostfile_reading(tmp_path: Path) -> None:
    environ = {
        "NCCL_IB_HCA": "mlx5",
        "GLOO_SOCKET_IFNAME": "eth1",
        "CUDA_HOME": "/cuda",
        "CUDA_VISIBLE_DEVICES": "3",
        "HF_HOME": "/hf",
        "HOME": "/root",
        "PATH": "/bin",
        "MY_VAR": "x",
    }
    env = forwarded_env(environ, ["MY_VAR", "OTHER=y=z"])
    assert env == {
        "CUDA_HOME": "/cuda",
        "GLOO_SOCKET_IFNAME": "eth1",
        "HF_HOME": "/hf",
        "NCCL_IB_HCA": "mlx5",
        "MY_VAR": "x",
        "OTHER": "y=z",
    }
    hostfile = tmp_path / "hosts"
    hostfile.write_text("a slots=2\nb slots=4\n")
    assert [(h.name, h.slots) for h in read_hostfile(hostfile)] == [("a", 2), ("b", 4)]
    hostfile.write_text("a slots=2\na slots=2\n")
    with pytest.raises(ConfigError, match="line 2: host a is listed twice"):
        read_hostfile(hostfile)


def test_builtin_recipe_name_resolves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "RECIPES_DIR", tmp_path)
    (tmp_path / "demo.yaml").write_text("tokenizer: some/dir\n")
    assert cli.resolve_recipe("demo") == tmp_path / "demo.yaml"
    with pytest.raises(ConfigError, match="built-in recipes: demo"):
        cli.resolve_recipe("pretrian")


def test_typo_is_one_line_naming_the_right_key(recipe: Path) -> None:
    proc = run_cli("run", str(recipe), "--optim.lerning_rate", "1", cwd=recipe.parent)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("dstrain: error:") and "--optim.lr" in lines[0]
    assert not (recipe.parent / "run").exists()


def test_near_miss_of_a_launcher_option_names_it() -> None:
    parser = cli.build_parser()[1]["run"]
    with pytest.raises(ConfigError, match="did you mean --gpus"):
        split_overrides(parser, ["r.yaml", "--gpu", "2"])


def test_overrides_split_off_anywhere() -> None:
    parser = cli.build_parser()[1]["ds-config"]
    own, overrides = split_overrides(
        parser, ["--optim.lr", "1e-3", "--zero", "3", "--seed=5", "r.yaml", "--schedule.warmup_steps", "-1"]
    )
    assert own == ["--zero", "3", "r.yaml"]
    assert overrides == ["--optim.lr", "1e-3", "--seed=5", "--schedule.warmup_steps", "-1"]


def test_help_config_lists_every_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--help-config"]) == 0
    out = capsys.readouterr().out
    for key in ("--optim.lr", "--zero.stage", "--train.micro_batch_size", "--data.max_seq_len", "--seed"):
        assert key in out
    assert "Peak learning rate" in out


def test_ds_config_command_prints_json(
    recipe: Path, cpu_only: None, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["ds-config", "--zero", "3", "--offload-optimizer", "--offload-params", "--precision", "fp16"]
    argv += ["--device", "gpu", "--micro-batch-size", "4", str(recipe), "--optim.lr", "1e-3"]
    assert main(argv) == 0
    ds = json.loads(capsys.readouterr().out)
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 2
    assert ds["torch_autocast"]["dtype"] == "float16" and ds["optimizer"]["params"]["lr"] == 1e-3
    assert ds["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}


def test_ds_config_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ds-config", "--zero", "2", "--offload-params", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--zero.offload_params needs --zero.stage 3" in err


def test_delegated_subcommands(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    seen: list[list[str]] = []
    fake = types.ModuleType("fake_tools")
    fake.main = lambda argv: seen.append(argv) or 5  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_tools", fake)
    monkeypatch.setitem(cli.DELEGATED, "data", ("fake_tools", "main", "help"))
    assert main(["data", "prepare", "--x", "1"]) == 5
    assert seen == [["prepare", "--x", "1"]]

    monkeypatch.setitem(cli.DELEGATED, "export", ("no_such_module_xyz", "export_main", "help"))
    assert main(["export", "run/"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dstrain export is not available" in err


RANK_SCRIPT = """
import os, signal, sys, time
from pathlib import Path
rank, mode = os.environ["RANK"], sys.argv[1]
def stop(signum, frame):
    Path(f"got_{rank}_{signum}_{time.monotonic_ns()}").touch()
    if mode != "fail":  # in "fail" mode rank 2 ignores SIGTERM: only SIGKILL ends it
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)  # as trainer.signals.Preemption.uninstall does
        sys.exit(75)
for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
    signal.signal(sig, stop)
keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
        "MASTER_ADDR", "MASTER_PORT", "DSTRAIN_LAUNCHER")
Path(f"ready_{rank}").write_text(" ".join(os.environ[k] for k in keys))
if mode == "done":
    sys.exit(0)
if mode == "fail" and rank == "3":
    while not Path("ready_2").exists():
        time.sleep(0.01)
    sys.exit(3)
time.sleep(60)
"""


def start_spawner(tmp_path: Path, mode: str, *extra: str) -> subprocess.Popen:
    """`python -m launcher.spawn` as node 1 of 2 with 2 ranks (global ranks 2 and 3), in its
    own session so that the test can signal its process group."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    cmd = [
        sys.executable,
        "-m",
        "launcher.spawn",
        "--nproc-per-node",
        "2",
        "--nnodes",
        "2",
        "--node-rank",
        "1",
    ]
    cmd += [
        "--master-addr",
        "10.0.0.9",
        "--master-port",
        "29123",
        *extra,
        "--",
        sys.executable,
        str(script),
        mode,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def wait_ready(tmp_path: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("ready_*"))) < 2:
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the ranks never started"
        time.sleep(0.05)


def test_spawner_gives_each_rank_torchruns_variables(tmp_path: Path) -> None:
    proc = start_spawner(tmp_path, "done")
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    assert (tmp_path / "ready_2").read_text() == "2 0 4 2 1 2 10.0.0.9 29123 dstrain"
    assert (tmp_path / "ready_3").read_text() == "3 1 4 2 1 2 10.0.0.9 29123 dstrain"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT], ids=lambda s: s.name)
@pytest.mark.parametrize("to_group", [False, True], ids=["to-spawner", "to-group"])
def test_spawner_passes_stop_signals_to_every_rank_and_exits_75(
    tmp_path: Path, sig: signal.Signals, to_group: bool
) -> None:
    proc = start_spawner(tmp_path, "wait")
    wait_ready(tmp_path, proc)
    if to_group:
        os.killpg(proc.pid, sig)  # what a scheduler does: every process at once
    else:
        proc.send_signal(sig)
    assert proc.wait(timeout=60) == 75
    assert {p.name.split("_")[1:3] == ["2", str(int(sig))] for p in tmp_path.glob("got_2_*")} == {True}
    assert {p.name.split("_")[1:3] == ["3", str(int(sig))] for p in tmp_path.glob("got_3_*")} == {True}
    assert f"got {sig.name}: passed it to every running rank" in proc.stderr.read()


def test_spawner_stops_the_other_ranks_when_one_fails(tmp_path: Path) -> None:
    """Rank 3 exits 3: rank 2 gets SIGTERM, ignores it, and gets SIGKILL --kill-after-s later."""
    proc = start_spawner(tmp_path, "fail", "--kill-after-s", "1")
    assert proc.wait(timeout=60) == 3
    assert list(tmp_path.glob("got_2_15_*")), "rank 2 was not sent SIGTERM"
    log = proc.stderr.read()
    assert "rank 3 exited 3" in log and "sending SIGKILL to rank(s) 2" in log and "rank 2 exited 137" in log
