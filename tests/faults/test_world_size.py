"""A run saved by 2 ranks resumes on 1 rank (real DeepSpeed on CPU, gloo, fp32).

The 2-rank run is killed (SIGKILL, all processes) a little after its save at step 10; the
resume on one rank converts the checkpoint to DeepSpeed's universal format and re-derives the
data position from both ranks' states (``TrainData.load_resharded``).

What is checked, from ``metrics.jsonl`` (``log.doc_ids``: the documents of every step):

- the resumed run finishes (exit 0) and says it converted the checkpoint and re-sharded;
- the loss goes on from where it was (it does not jump back towards the untrained loss);
- no document trained up to the saved step is trained again, except the packer carries: every
  document here is shorter than ``max_seq_len``, so a document is only ever cut by a packed row
  boundary, and the only cut document whose head was trained before the save and whose tail
  was not is the carry of each old shard's packer: at most 2 ranks x 1 worker = 2, and exactly
  the ``carry_doc`` of the saved data states, seen in the saved step and the first resumed one;
- within the resumed part no document appears in two non-adjacent steps (one rank now, so a
  document cut by a row boundary lies in at most two consecutive steps).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.faults import runs
from tests.helpers import make_docs, write_parquet
from tests.launch import deepspeed_cmd, run_group

pytestmark = pytest.mark.distributed
MAX_STEPS = 40
SEQ = 64
OLD_SHARDS = 2  # 2 ranks x num_workers 1


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_tokenizer_dir):
    """Short documents (one chunk each), written where ``runs.make_recipe`` looks for its data."""
    from trainer.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("world_size")
    data = root / "data"
    data.mkdir()
    tok = load_tokenizer(str(tiny_tokenizer_dir))
    for i in range(3):
        docs = make_docs(300, seed=10 + i, min_words=5, max_words=30)
        assert max(len(ids) for ids in tok(docs, add_special_tokens=False)["input_ids"]) + 1 <= SEQ
        write_parquet(data / f"part{i}.parquet", docs, first_id=1000 * i, row_group_size=40)
    return root


def run_one_rank(recipe: Path, *args: str, timeout: float = 400) -> tuple[int, str]:
    """``deepspeed --num_gpus 1 trainer/main.py --config recipe ...`` (runs.start is 2 ranks)."""
    proc = run_group(deepspeed_cmd(1, runs.MAIN, ["--config", str(recipe), *args]), timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.parametrize("stage", [2, 3], ids=["zero2", "zero3"])
def test_two_ranks_killed_then_resumed_on_one(root, tiny_tokenizer_dir, stage):
    name = f"ws_z{stage}"
    out = root / name
    recipe = runs.make_recipe(
        root, tiny_tokenizer_dir, name, zero={"stage": stage}, train={"max_steps": MAX_STEPS, "save_every": 5}
    )
    proc = runs.start(recipe)
    runs.wait_for_step(proc, out, 12)
    runs.kill_all(proc)

    ckpts = out / "checkpoints"
    saved = ckpts / (ckpts / "latest").read_text().strip()
    step = int(saved.name.split("_")[1])
    assert step >= 10 and (saved / "COMPLETE").is_file()
    old_states = [
        torch.load(saved / f"dstrain_rank{r}.pt", weights_only=True)["parts"]["data"] for r in range(2)
    ]
    carried = {s["carry_doc"] for st in old_states for s in st["shards"] if s["carry_tokens"]}
    before = runs.metrics(out)

    code, log = run_one_rank(recipe, "--resume")
    assert code == 0, log[-4000:]
    assert "to a universal checkpoint" in log and "re-sharded from 2 ranks" in log, log[-4000:]
    print(*(line for line in log.splitlines() if "universal" in line or "re-sharded" in line), sep="\n")
    got = runs.metrics(out)
    assert sorted(got) == list(range(1, MAX_STEPS + 1))
    assert all(got[s]["epoch"] == 0 for s in got), "the test assumes one epoch (no legitimate repeats)"

    # The loss continues from the saved step's (which is far below the untrained loss): it
    # may drop further, but a lost or misplaced weight/optimizer state would make it jump back up.
    first, last_saved, resumed = before[1]["loss"], before[step]["loss"], got[step + 1]["loss"]
    print(
        f"zero{stage}: loss step 1 {first:.3f}, step {step} {last_saved:.3f}, step {step + 1} {resumed:.3f}"
    )
    assert resumed < last_saved + 0.15 * (first - last_saved), (first, last_saved, resumed)

    trained = {d for s in range(1, step + 1) for d in got[s]["doc_ids"]}
    again = {d for s in range(step + 1, MAX_STEPS + 1) for d in got[s]["doc_ids"]} & trained
    assert len(carried) <= OLD_SHARDS
    assert again == carried, f"trained before step {step} and again after: {sorted(again - carried)}"
    assert all(d in got[step]["doc_ids"] and d in got[step + 1]["doc_ids"] for d in again)

    steps_of: dict[int, list[int]] = {}
    for s in range(step + 1, MAX_STEPS + 1):
        for d in got[s]["doc_ids"]:
            steps_of.setdefault(d, []).append(s)
    spread = {d: s for d, s in steps_of.items() if s[-1] - s[0] > 1 or len(s) > 2}
    assert not spread, f"documents in non-adjacent resumed steps: {dict(list(spread.items())[:5])}"
