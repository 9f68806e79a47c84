"""launcher.cli and launcher.launch: dry runs, the launch command, errors, signal forwarding."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest
import yaml

import launcher.cli as cli
from launcher.cli import main, split_overrides
from launcher.launch import Hardware, LaunchPlan, build_launch_command, run_and_wait, trainer_script
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
    cmd = build_launch_command(plan, launcher_cmd=["deepspeed"], script=Path("/pkg/trainer/main.py"))
    assert cmd == [
        "deepspeed",
        "--num_gpus",
        "2",
        "--master_port",
        "29555",
        "/pkg/trainer/main.py",
        "--config",
        "/r/run.yaml",
        "--resume",
        "auto",
    ]


def test_build_launch_command_respects_cuda_visible_devices() -> None:
    # deepspeed --num_gpus ignores CUDA_VISIBLE_DEVICES, so the plan names the devices instead.
    plan = LaunchPlan(run_yaml=Path("r.yaml"), gpus_per_node=2, visible_devices=("4", "5", "6"))
    cmd = build_launch_command(plan, launcher_cmd=["deepspeed"], script=Path("main.py"))
    assert cmd == ["deepspeed", "--include", "localhost:4,5", "main.py", "--config", "r.yaml"]


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

    cmd = shlex.split(capsys.readouterr().out.strip().splitlines()[-1])
    assert Path(cmd[0]).name == "deepspeed"
    assert cmd[1:] == [
        "--num_gpus",
        "2",
        "--master_port",
        "29611",
        str(trainer_script()),
        "--config",
        str((run_dir / "run.yaml").resolve()),
        "--resume",
        "latest",
    ]


def test_dry_run_on_gpus_uses_bf16_and_the_visible_devices(
    recipe: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "detect_hardware", lambda: Hardware(gpu_count=4, bf16_supported=True))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,5,7")
    assert main(["run", str(recipe), "--dry-run", "--zero.offload_optimizer", "true"]) == 0
    ds = json.loads((recipe.parent / "run" / "ds_config.json").read_text())
    assert ds["bf16"]["enabled"] is True
    assert ds["zero_optimization"]["offload_optimizer"]["pin_memory"] is True
    cmd = shlex.split(capsys.readouterr().out.strip().splitlines()[-1])
    assert cmd[1:3] == ["--include", "localhost:2,3,5,7"]  # --gpus defaults to all visible
    assert main(["run", str(recipe), "--dry-run", "--gpus", "8"]) == 2
    assert "--gpus 8 but only 4 CUDA GPUs" in capsys.readouterr().err


def test_builtin_recipe_name_resolves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "RECIPES_DIR", tmp_path)
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
    assert ds["fp16"]["enabled"] is True and ds["optimizer"]["params"]["lr"] == 1e-3
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


def test_run_and_wait_returns_the_exit_status() -> None:
    assert run_and_wait([sys.executable, "-c", "raise SystemExit(3)"]) == 3


CHILD = """
import os, signal, subprocess, sys, time
def stop(signum, frame):
    open(f"got_{os.getpid()}", "w").close()
    sys.exit(7)
signal.signal(signal.SIGTERM, stop)
if sys.argv[1:] == ["parent"]:
    grandchild = subprocess.Popen([sys.executable, __file__])  # same process group
open(f"ready_{os.getpid()}", "w").close()
time.sleep(30)
"""


def test_sigterm_reaches_the_whole_child_group(tmp_path: Path) -> None:
    """SIGTERM to the launcher reaches the child *and* its children (like deepspeed's ranks)."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    code = f"import sys; from launcher.launch import run_and_wait; sys.exit(run_and_wait([sys.executable, {str(script)!r}, 'parent']))"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env)
    deadline = time.monotonic() + 30
    while len(list(tmp_path.glob("ready_*"))) < 2:  # both have installed their handler
        assert time.monotonic() < deadline, "child never started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 7
    assert len(list(tmp_path.glob("got_*"))) == 2
