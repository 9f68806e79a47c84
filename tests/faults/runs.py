"""Launch real 2-rank training runs in the background, watch their metrics, kill or signal them."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import psutil
import yaml

from tests.helpers import REPO, TINY_OVERRIDES, make_docs, write_parquet
from tests.launch import communicate_or_kill, deepspeed_cmd, kill_group, spawn_cmd
from tests.launch import start as start_group

MAIN = REPO / "trainer" / "main.py"


def make_recipe(root: Path, tokenizer_dir: Path, name: str, **sections: dict) -> Path:
    """A tiny fp32 pretrain recipe over generated parquet (3 files, traceable doc ids)."""
    data_dir = root / "data"
    if not data_dir.exists():
        data_dir.mkdir(parents=True)
        for i in range(3):
            write_parquet(
                data_dir / f"part{i}.parquet",
                make_docs(300, seed=10 + i),
                first_id=1000 * i,
                row_group_size=40,
            )
    recipe = {
        "stage": "pretrain",
        "output_dir": str(root / name),
        "seed": 7,
        "tokenizer": str(tokenizer_dir),
        "model": {
            "overrides": dict(TINY_OVERRIDES),
            "gradient_checkpointing": False,
        },
        "data": {
            "train": [str(data_dir / "*.parquet")],
            "max_seq_len": 64,
            "buffer_size": 32,
            "num_workers": 1,
            "validation_fraction": 0.05,
        },
        "optim": {"lr": 3.0e-3},
        "schedule": {"name": "cosine", "warmup_steps": 10},
        "train": {
            "micro_batch_size": 2,
            "grad_accum": 2,
            "max_steps": 40,
            "log_every": 1,
            "eval_every": 0,
            "save_every": 5,
            "keep_last": 3,
        },
        "zero": {"stage": 2},
        "log": {"doc_ids": True, "plot": False, "progress": False},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            recipe[section] = {**recipe.get(section, {}), **values}
        else:
            recipe[section] = values
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def pretrained_recipe(root: Path, base_dir: Path, name: str, stage: str, **sections: dict) -> Path:
    """A tiny ``stage`` (cpt or sft) recipe whose weights and tokenizer come from ``base_dir``
    (an HF dir standing in for pretrained weights): :func:`make_recipe` with its model section
    replaced (``sections["model"]`` adds to it) and no tokenizer key."""
    path = make_recipe(root, base_dir, name, **{k: v for k, v in sections.items() if k != "model"})
    recipe = yaml.safe_load(path.read_text())
    recipe.update(stage=stage, tokenizer=None)
    recipe["model"] = {
        "name_or_path": str(base_dir),
        "gradient_checkpointing": True,
        **sections.get("model", {}),
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def start(
    recipe: Path, *args: str, env: dict[str, str] | None = None, launcher: str = "spawn"
) -> subprocess.Popen:
    """``trainer/main.py --config RECIPE ARGS`` on 2 ranks in its own process group, started by
    dstrain's spawner, or by ``deepspeed --num_gpus 2`` (``launcher="deepspeed"``, the README's
    command, kept for the tests that must go through it)."""
    build = deepspeed_cmd if launcher == "deepspeed" else spawn_cmd
    return start_group(build(2, MAIN, ["--config", str(recipe), *args]), **(env or {}))


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    out, _ = communicate_or_kill(proc, timeout)
    return proc.returncode, out


def run(
    recipe: Path, *args: str, env: dict[str, str] | None = None, launcher: str = "spawn"
) -> tuple[int, str]:
    return finish(start(recipe, *args, env=env, launcher=launcher))


def metrics(output_dir: Path) -> dict[int, dict]:
    path = output_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if "loss" in record:
                out[record["step"]] = record
    return out


def wait_for_step(proc: subprocess.Popen, output_dir: Path, step: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if step in metrics(output_dir):
            return
        if proc.poll() is not None:
            raise AssertionError(
                f"run ended (exit {proc.returncode}) before step {step}:\n{proc.stdout.read()[-4000:]}"
            )
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def shm_buffers() -> set[str]:
    """DeepSpeed's CPU all-reduce buffers in /dev/shm (66 MB per rank each)."""
    return {p.name for p in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")}


def kill_all(proc: subprocess.Popen) -> None:
    kill_group(proc, signal.SIGKILL)
    proc.wait(timeout=60)


def rank_processes(launcher_pid: int) -> dict[int, psutil.Process]:
    """The training ranks' main processes under ``launcher_pid`` (the spawner's children, or
    DeepSpeed's runner's grandchildren), by global rank (their RANK variable). A forked
    dataloader worker has its rank's command line and RANK too, so only the shallowest count."""
    found: dict[int, tuple[int, psutil.Process, int]] = {}
    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            env, cmdline, parent = child.environ(), child.cmdline(), child.ppid()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if str(MAIN) in cmdline and "RANK" in env:
            found[child.pid] = (int(env["RANK"]), child, parent)
    return {rank: proc for rank, proc, parent in found.values() if parent not in found}


def assert_same_run(got: dict[int, dict], want: dict[int, dict], steps: range) -> None:
    for step in steps:
        assert step in got, f"step {step} missing from the resumed run"
        a, b = got[step], want[step]
        assert abs(a["loss"] - b["loss"]) <= 1e-6, f"step {step}: loss {a['loss']} vs {b['loss']}"
        assert abs(a["lr"] - b["lr"]) <= 1e-12, f"step {step}: lr {a['lr']} vs {b['lr']}"
        assert a["doc_ids"] == b["doc_ids"], f"step {step}: different documents"
