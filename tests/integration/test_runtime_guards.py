"""What the runtime promises at the edges of a run, through the commands users type, on real
2-rank DeepSpeed (CPU, gloo, fp32):

- epochs mode: the LR schedule is exactly as long as the training (pretraining with packing,
  and SFT with the packer's 16-sample window), read from the optimizer's lr in metrics.jsonl;
- a stop signal sent during a slow eval saves the step being evaluated, without finishing it;
- Ctrl-C while a node waits at the rendezvous for a peer that never comes exits in seconds;
- two `--no-ssh` node launchers that would train different runs stop at start, naming the key.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from tests.faults import runs
from tests.helpers import alpaca_records, save_chat_base, write_json_records
from tests.launch import DSTRAIN, free_port, start
from trainer.signals import INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("guards")


def dstrain_run(recipe: Path, *args: str, **env: str):
    return start([DSTRAIN, "run", recipe, "--gpus", "2", *args], **env)


def wait_for_text(path: Path, text: str, proc, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.is_file() and text in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before {text!r}:\n{proc.stdout.read()[-4000:]}")
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not in {path} after {timeout}s")


def assert_schedule_ends_with_the_run(out: Path, lr: float, floor: float) -> None:
    """A linear decay to ``floor * lr``: every step lowers the lr by the same amount, and one more
    decrement after the last step lands exactly on the floor (the logged lr is the one each
    update used). A schedule sized for more steps stops above it; for fewer, reaches it early."""
    total = int(re.search(r"training (\d+) optimizer steps", (out / "train.log").read_text()).group(1))
    got = runs.metrics(out)
    steps = sorted(got)
    assert steps == list(range(1, total + 1)), f"{len(steps)} steps trained, the schedule has {total}"
    lrs = [got[s]["lr"] for s in steps]
    decrement = lrs[-2] - lrs[-1]
    assert decrement > 0 and lrs[-1] - decrement == pytest.approx(floor * lr, rel=1e-9, abs=1e-15)
    assert lrs[-3] - lrs[-2] == pytest.approx(decrement, rel=1e-6)


SCHEDULE = {"name": "linear", "warmup_steps": 2, "min_lr_ratio": 0.1}


def epochs_recipe(root: Path, tokenizer_dir: Path, kind: str) -> tuple[Path, float]:
    """2 epochs, linear schedule: packed pretraining, or packed LoRA SFT (alpaca rows, ChatML)."""
    train = {"max_steps": None, "epochs": 2, "save_every": 0}
    if kind == "pretrain":
        recipe = runs.make_recipe(
            root,
            tokenizer_dir,
            "epochs_pretrain",
            train={**train, "micro_batch_size": 4},
            schedule=SCHEDULE,
            log={"doc_ids": False},
        )
        return recipe, 3.0e-3
    base = root / "chat_base"
    save_chat_base(base, tokenizer_dir)
    write_json_records(root / "alpaca.jsonl", alpaca_records(160, seed=5), lines=True)
    recipe = runs.pretrained_recipe(
        root,
        base,
        "epochs_sft",
        "sft",
        data={"train": [str(root / "alpaca.jsonl")], "format": "alpaca", "max_seq_len": 96, "pack": True},
        model={"gradient_checkpointing": False},
        lora={"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0},
        optim={"lr": 1e-2},
        train=train,
        schedule=SCHEDULE,
        log={"doc_ids": False},
    )
    return recipe, 1e-2


@pytest.mark.parametrize("kind", ["pretrain", "sft"])
def test_epochs_mode_schedule_length_is_the_training_length(root, tiny_tokenizer_dir, kind):
    recipe, lr = epochs_recipe(root, tiny_tokenizer_dir, kind)
    code, out = runs.run(recipe)
    assert code == 0, out[-4000:]
    assert_schedule_ends_with_the_run(root / f"epochs_{kind}", lr, SCHEDULE["min_lr_ratio"])


def test_a_stop_signal_during_a_slow_eval_saves_that_step(root, tiny_tokenizer_dir):
    """Rank 0 spends 2 s on every eval batch (about 40 per rank: 80 s). SIGTERM to the whole
    process group, as SLURM signals a job step, during the eval at step 3: the eval is abandoned,
    step 3 is saved, and `dstrain run` exits 75 within seconds, not after the eval."""
    name = "slow_eval"
    recipe = runs.make_recipe(
        root,
        tiny_tokenizer_dir,
        name,
        data={"validation_fraction": 0.3},
        train={"max_steps": 20, "eval_every": 3, "save_every": 100},
    )
    proc = dstrain_run(recipe, DSTRAIN_FAULT="sleep_rank0_in_eval")
    wait_for_text(root / name / "train.log", "fault injection: sleep at in_eval, step 3", proc)
    sent = time.monotonic()
    os.killpg(proc.pid, signal.SIGTERM)
    code, out = runs.finish(proc)
    elapsed = time.monotonic() - sent
    assert code == PREEMPTED_EXIT_CODE, out[-4000:]
    saved = set(re.findall(r"\[rank\d\].*pre-emption signal received: saving step (\d+)", out))
    assert saved == {"3"}, out[-4000:]
    assert (root / name / "checkpoints" / "latest").read_text() == "step_3"
    assert "eval abandoned" in out and elapsed < 30, f"{elapsed:.0f}s after the signal"
    records = [json.loads(x) for x in (root / name / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert not [r for r in records if "eval_loss" in r], "no eval record from an abandoned eval"


def test_ctrl_c_at_the_rendezvous_exits_within_5s_with_one_line(root, tiny_tokenizer_dir):
    """Node 0 of 2 waits at the rendezvous for node 1, which never starts (up to
    collective_timeout_s, 1800 s); Ctrl-C in its terminal (SIGINT to the foreground group)."""
    name = "rendezvous"
    recipe = runs.make_recipe(root, tiny_tokenizer_dir, name)
    port = str(free_port())
    proc = start(
        [DSTRAIN, "run", recipe, "--nodes", "2", "--gpus-per-node", "1", "--no-ssh", "--node-rank", "0"]
        + ["--master-addr", "127.0.0.1", "--master-port", port]
    )
    wait_for_text(root / name / "train.log", "doctor: python", proc)  # the summary line, just before the wait
    time.sleep(2)
    sent = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    code, out = runs.finish(proc, timeout=60)
    elapsed = time.monotonic() - sent
    assert elapsed < 5, f"{elapsed:.1f}s\n{out[-3000:]}"
    assert code == INTERRUPTED_EXIT_CODE, out[-3000:]
    lines = [line for line in out.splitlines() if "Ctrl-C" in line or "error" in line.lower()]
    assert len(lines) == 1, out
    # A DeepSpeed op being built by another process on this machine makes it wait at the lock first.
    locked = "another process is building a DeepSpeed op" in out and "distributed:" not in out
    want = (
        "waiting for a DeepSpeed op's build lock" if locked else f"rendezvous of 2 ranks at 127.0.0.1:{port}"
    )
    assert "Ctrl-C while waiting" in lines[0] and want in lines[0], out
    assert "Traceback" not in out


def test_nodes_that_would_train_different_runs_stop_at_start(root, tiny_tokenizer_dir):
    """Two `--no-ssh` node launchers, node 1 with another --optim.lr: both stop with one line
    naming the key and which rank holds which value, exit 2, before any step."""
    name = "two_runs"
    recipe = runs.make_recipe(root, tiny_tokenizer_dir, name, train={"max_steps": 3})
    common = ["run", recipe, "--nodes", "2", "--gpus-per-node", "1", "--no-ssh"]
    common += ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    tmp = [root / f"{name}_node{k}_tmp" for k in (0, 1)]
    for path in tmp:
        path.mkdir()
    nodes = [
        start([DSTRAIN, *common, "--node-rank", "0"], TMPDIR=str(tmp[0])),
        start([DSTRAIN, *common, "--node-rank", "1", "--optim.lr", "0.001"], TMPDIR=str(tmp[1])),
    ]
    for k, (code, out) in enumerate(runs.finish(node) for node in nodes):
        assert code == 2, f"node {k}: exit {code}\n{out[-3000:]}"
        errors = [line for line in out.splitlines() if "dstrain: error:" in line]
        assert len(errors) == 1, out[-3000:]
        # Only optim.lr: the nodes' own copies of run.yaml agree on everything else.
        assert "the ranks do not train the same run: optim.lr: rank 0 0.003, rank 1 0.001; start" in errors[0]
        assert "Traceback" not in out
    assert not (root / name / "metrics.jsonl").exists()
