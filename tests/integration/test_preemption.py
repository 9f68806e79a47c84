"""Pre-emption on every path of `dstrain run`: SIGTERM, then SIGUSR1, sent to (a) the `dstrain
run` process, (b) its whole process group (what a scheduler does), (c) one rank only, with a
dataloader worker per rank (``data.num_workers: 1``), on real 2-rank DeepSpeed (CPU, gloo, fp32).

Each case chains three launches in one output dir: a run stopped by SIGTERM, a ``--resume``
stopped by SIGUSR1, and a ``--resume`` to the end. Each stop must exit 75 from `dstrain run`,
after every rank saved the same step (one complete checkpoint holding both ranks' files, both
ranks logging that step) and with no rank left running; the finished run must reproduce the
uninterrupted run's per-step losses, learning rates and documents.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import psutil
import pytest

from tests.faults import runs
from tests.launch import DSTRAIN, start
from trainer.signals import PREEMPTED_EXIT_CODE

pytestmark = pytest.mark.distributed
MAX_STEPS = 30
STEPS = range(1, MAX_STEPS + 1)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("preemption")


def recipe_for(root: Path, tokenizer_dir: Path, name: str) -> Path:
    """The only save of these runs is the pre-emption one (save_every beyond max_steps)."""
    return runs.make_recipe(
        root, tokenizer_dir, name, train={"max_steps": MAX_STEPS, "save_every": 100}, data={"num_workers": 1}
    )


def dstrain_run(recipe: Path, *args: str) -> subprocess.Popen:
    """`dstrain run RECIPE --gpus 2 ARGS` in its own session (its pid leads its process group)."""
    return start([DSTRAIN, "run", recipe, "--gpus", "2", *args])


def send(target: str, proc: subprocess.Popen, sig: signal.Signals, ranks: dict[int, psutil.Process]) -> None:
    if target == "dstrain":
        proc.send_signal(sig)
    elif target == "group":
        os.killpg(proc.pid, sig)
    else:
        ranks[1].send_signal(sig)


def stop_with(target: str, sig: signal.Signals, recipe: Path, out: Path, at_step: int, *args: str) -> int:
    """Start `dstrain run`, signal ``target`` once step ``at_step`` is logged, and check the stop:
    exit 75, one complete checkpoint that both ranks wrote, the same step in both ranks' logs,
    and no rank left running. Returns the saved step."""
    proc = dstrain_run(recipe, *args)
    runs.wait_for_step(proc, out, at_step)
    ranks = runs.rank_processes(proc.pid)
    assert sorted(ranks) == [0, 1], f"rank processes under dstrain run: {sorted(ranks)}"
    send(target, proc, sig, ranks)
    code, output = runs.finish(proc)
    assert code == PREEMPTED_EXIT_CODE, f"{sig.name} to {target}: exit {code}\n{output[-4000:]}"
    assert not [r for r in ranks.values() if r.is_running() and r.status() != psutil.STATUS_ZOMBIE], (
        "dstrain run exited before its ranks"
    )
    saved = dict(re.findall(r"\[rank(\d)\].*pre-emption signal received: saving step (\d+)", output))
    assert set(saved) == {"0", "1"} and len(set(saved.values())) == 1, f"rank: step saved {saved}"
    step = int(saved["0"])
    # Each rank's warnings in its own file: appends from many nodes to one file interleave on NFS.
    assert f"saving step {step}" in (out / "logs" / "rank1.log").read_text()
    assert "[rank1]" not in (out / "train.log").read_text()
    ckpt = out / "checkpoints" / f"step_{step}"
    assert (out / "checkpoints" / "latest").read_text() == f"step_{step}"
    assert (ckpt / "COMPLETE").is_file()
    assert (ckpt / "dstrain_rank0.pt").is_file() and (ckpt / "dstrain_rank1.pt").is_file()
    assert step >= at_step
    return step


@pytest.fixture(scope="module")
def reference(root, tiny_tokenizer_dir) -> dict[int, dict]:
    """The uninterrupted run, through `dstrain run` too."""
    recipe = recipe_for(root, tiny_tokenizer_dir, "reference")
    code, out = runs.finish(dstrain_run(recipe))
    assert code == 0, out[-4000:]
    got = runs.metrics(root / "reference")
    assert sorted(got) == list(STEPS)
    return got


@pytest.mark.parametrize(
    "target", ["dstrain", "group", "rank"], ids=["to-dstrain-run", "to-group", "to-one-rank"]
)
def test_sigterm_then_sigusr1_save_exit_75_and_resume_exactly(target, reference, root, tiny_tokenizer_dir):
    name = f"stop_{target}"
    recipe = recipe_for(root, tiny_tokenizer_dir, name)
    out = root / name
    first = stop_with(target, signal.SIGTERM, recipe, out, at_step=6)
    second = stop_with(target, signal.SIGUSR1, recipe, out, first + 5, "--resume")
    assert second > first
    code, output = runs.finish(dstrain_run(recipe, "--resume"))
    assert code == 0, output[-4000:]
    runs.assert_same_run(runs.metrics(out), reference, STEPS)
