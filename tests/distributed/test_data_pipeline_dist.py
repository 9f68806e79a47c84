"""The data pipeline of 2 ranks in separate processes: coverage, disjoint shards, exact resume.

A rank's TrainData does no collective (the Trainer keeps ranks in step), so each rank runs as
its own process, with real dataloader workers. Process start-up is the expensive part, so
there are two launches of 2 processes each, and each runs many checks:

1. ``run``: the coverage grid ({0,1,2} workers x {1,3,7} files, 2 epochs each), an imbalanced
   corpus whose ranks end their shards at different batch counts, and the uninterrupted
   reference of the resume corpus (2 ranks x 2 workers), saving the data state at batches
   k = 1, 6, mid-epoch, 600 and the epoch's last batch;
2. ``resume``: NEW processes build fresh pipelines, load each state, and record the next 50
   batches and the restore time (best of 5: build + load_state_dict + first batch).

This module is also the rank script: ``python -m tests.distributed.test_data_pipeline_dist``.
"""

from __future__ import annotations

import itertools
import json
import os
import pickle
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import load_tokenizer_file, make_docs, train_tokenizer, write_corpus
from tests.launch import communicate_or_kill, kill_group, start

pytestmark = pytest.mark.distributed

WORLD = 2
MICRO_BATCH = 2
SEQ = 32
RESUME_KS = (1, 6, 300, 600)  # plus the last batch of epoch 0
NEXT = 50
GRID = [(w, f) for w in (0, 1, 2) for f in (1, 3, 7)]


# ------------------------------------------------------------------------------- rank script


def _cfg(paths, num_workers: int, buffer_size: int = 16):
    from trainer.data.config import DataConfig

    return DataConfig(
        train=[str(p) for p in paths],
        max_seq_len=SEQ,
        buffer_size=buffer_size,
        num_workers=num_workers,
        validation_fraction=0.0,
    )


def _ids(batch) -> list[list[int]]:
    return batch["doc_ids"].tolist()


def _rank_run(work: Path, rank: int, tok) -> dict:
    from trainer.data import build_train_data
    from trainer.dist import DistInfo

    dist = DistInfo(rank=rank, world_size=WORLD)
    out: dict = {"grid": {}, "seconds": {}}
    t0 = time.perf_counter()
    for workers, files in GRID + [(0, "imbalanced")]:
        paths = sorted((work / f"grid-{files}").glob("*.parquet"))
        data = build_train_data(_cfg(paths, workers), tok, dist, seed=7, micro_batch_size=MICRO_BATCH)
        epochs = []
        for _ in range(2):
            batches = [_ids(b) for b in data]
            data.end_epoch()
            epochs.append({"batches": batches, "skipped": data.skipped_docs})
        out["grid"][f"{workers}-{files}"] = epochs

    out["seconds"]["grid"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    paths = sorted((work / "resume").glob("*.parquet"))
    data = build_train_data(_cfg(paths, 2, buffer_size=64), tok, dist, seed=11, micro_batch_size=MICRO_BATCH)
    ref: list[list[list[int]]] = []
    states: dict[int, bytes] = {}
    epoch_len = None
    while epoch_len is None or len(ref) < epoch_len + NEXT:
        for batch in data:
            ref.append(_ids(batch))
            k = len(ref)
            if k in RESUME_KS or (epoch_len is None and k > 1):
                states[k] = pickle.dumps(data.state_dict())
            if epoch_len is not None and len(ref) >= epoch_len + NEXT:
                break
        data.end_epoch()
        if epoch_len is None:
            epoch_len = len(ref)
            # keep only the states we test (the loop above kept the latest for "last batch")
            states = {k: v for k, v in states.items() if k in RESUME_KS or k == epoch_len}
    for k, blob in states.items():
        (work / f"state-r{rank}-k{k}.pkl").write_bytes(blob)
    mid_shards = pickle.loads(states[300])["shards"]
    out["resume"] = {"ref": ref, "epoch_len": epoch_len, "ks": sorted(states), "mid_shards": mid_shards}
    out["seconds"]["reference"] = time.perf_counter() - t0
    return out


def _rank_resume(work: Path, rank: int, tok) -> dict:
    from trainer.data import build_train_data
    from trainer.dist import DistInfo

    dist = DistInfo(rank=rank, world_size=WORLD)
    paths = sorted((work / "resume").glob("*.parquet"))
    ks = json.loads((work / f"ks-r{rank}.json").read_text())
    states = {k: pickle.loads((work / f"state-r{rank}-k{k}.pkl").read_bytes()) for k in ks}

    def restore(k: int):
        data = build_train_data(
            _cfg(paths, 2, buffer_size=64), tok, dist, seed=11, micro_batch_size=MICRO_BATCH
        )
        data.load_state_dict(states[k])
        return data

    out: dict = {"next": {}, "restore_s": {"6": [], "600": []}}
    for k in ks:
        data = restore(k)
        batches: list = []
        while len(batches) < NEXT:  # an epoch may end on the way: iterate again for the next one
            batches.extend(_ids(b) for b in itertools.islice(iter(data), NEXT - len(batches)))
            if data.state_dict()["local_done"]:
                data.end_epoch()
        out["next"][str(k)] = batches
        del data
    # Restore time: build + load_state_dict + first batch (2 workers start). Interleaved, best of 5.
    for _ in range(5):
        for k in (6, 600):
            t0 = time.perf_counter()
            data = restore(k)
            it = iter(data)
            next(it)
            out["restore_s"][str(k)].append(time.perf_counter() - t0)
            del it, data
    out["restore_s"] = {k: min(v) for k, v in out["restore_s"].items()}
    return out


def rank_main(argv: list[str]) -> None:
    phase, work_s, rank_s = argv
    work, rank = Path(work_s), int(rank_s)
    tok = load_tokenizer_file(work / "tok" / "tokenizer.json")
    result = _rank_run(work, rank, tok) if phase == "run" else _rank_resume(work, rank, tok)
    (work / f"{phase}-rank{rank}.json").write_text(json.dumps(result))


# ------------------------------------------------------------------------------------- pytest


def _launch(phase: str, work: Path, timeout: float = 300) -> list[dict]:
    """Both ranks' processes at once (each in its own process group, killed whole on failure)."""
    module = "tests.distributed.test_data_pipeline_dist"
    procs = [start([sys.executable, "-m", module, phase, str(work), str(r)]) for r in range(WORLD)]
    try:
        logs = [communicate_or_kill(proc, timeout)[0] for proc in procs]
    finally:
        for proc in procs:
            kill_group(proc)
    for r, (proc, log) in enumerate(zip(procs, logs, strict=True)):
        assert proc.returncode == 0, f"{phase} rank {r} exited {proc.returncode}:\n{log[-4000:]}"
    return [json.loads((work / f"{phase}-rank{r}.json").read_text()) for r in range(WORLD)]


def _write_imbalanced(out: Path) -> None:
    """Two row groups, one of long docs and one of short docs: the ranks' token counts differ a lot."""
    out.mkdir(parents=True)
    docs = make_docs(20, seed=1, min_words=60, max_words=80, numbered=False) + make_docs(
        20, seed=2, min_words=2, max_words=4, numbered=False
    )
    table = pa.table({"doc_id": list(range(500, 540)), "text": docs})
    pq.write_table(table, out / "skewed.parquet", row_group_size=20)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    work = tmp_path_factory.mktemp("data_dist")
    train_tokenizer(work / "tok", vocab_size=384, seed=99)
    for _, files in GRID:
        if not (work / f"grid-{files}").exists():
            write_corpus(work / f"grid-{files}", files, 90 // files + 3, row_group_size=6, seed=files)
    _write_imbalanced(work / "grid-imbalanced")
    write_corpus(work / "resume", 4, 1200, row_group_size=50, seed=5)
    t0 = time.perf_counter()
    run = _launch("run", work)
    t1 = time.perf_counter()
    for rank in range(WORLD):
        (work / f"ks-r{rank}.json").write_text(json.dumps(run[rank]["resume"]["ks"]))
    resume = _launch("resume", work)
    print(f"launch run {t1 - t0:.1f}s {run[0]['seconds']}, resume {time.perf_counter() - t1:.1f}s")
    return work, run, resume


def _all_ids(work: Path, name: str) -> set[int]:
    ids: set[int] = set()
    for p in (work / name).glob("*.parquet"):
        ids |= set(pq.read_table(p, columns=["doc_id"]).column("doc_id").to_pylist())
    return ids


def _eos_docs(batches) -> list[int]:
    """Every document ends with one EOS when packing: the doc ids of the EOS positions."""
    return [d for b in batches for row in b for d in row if d >= 0]


def _token_counts(batches) -> dict[int, int]:
    counts: dict[int, int] = {}
    for b in batches:
        for row in b:
            for d in row:
                if d >= 0:
                    counts[d] = counts.get(d, 0) + 1
    return counts


@pytest.mark.parametrize("workers,files", GRID + [(0, "imbalanced")])
def test_two_rank_coverage(results, workers, files):
    work, run, _ = results
    name = f"grid-{files}"
    all_ids = _all_ids(work, name)
    epochs = [[r["grid"][f"{workers}-{files}"][e] for r in run] for e in range(2)]
    orders = []
    for per_rank in epochs:
        counts = [_token_counts(r["batches"]) for r in per_rank]
        assert not (counts[0].keys() & counts[1].keys()), "a document reached both ranks"
        seen = counts[0].keys() | counts[1].keys()
        assert seen == all_ids and sum(r["skipped"] for r in per_rank) == 0
        orders.append(
            [d for r in per_rank for b in r["batches"] for row in b for d in dict.fromkeys(row) if d >= 0]
        )
    # Same docs, each with the same number of tokens (so none is repeated), in a different order.
    assert _token_counts(epochs[0][0]["batches"] + epochs[0][1]["batches"]) == _token_counts(
        epochs[1][0]["batches"] + epochs[1][1]["batches"]
    )
    assert orders[0] != orders[1]
    if files == "imbalanced":
        lengths = [len(r["batches"]) for r in epochs[0]]
        assert lengths[0] != lengths[1], "the imbalanced corpus should end the ranks' shards apart"


def test_exact_resume_in_new_processes(results):
    _, run, resume = results
    for rank in range(WORLD):
        epoch_len = run[rank]["resume"]["epoch_len"]
        assert epoch_len > 600 + 1
        ks = run[rank]["resume"]["ks"]
        assert set(ks) == set(RESUME_KS) | {epoch_len}
        # At k=300 every worker is inside a full shuffle block that began mid row group.
        mid = run[rank]["resume"]["mid_shards"]
        assert len(mid) == 2 and all(s["block_no"] > 0 for s in mid)
        assert any(0 < s["block_index"] < 64 and s["block_start"][1] % 50 != 0 for s in mid), mid
        ref = run[rank]["resume"]["ref"]
        for k in ks:
            got = resume[rank]["next"][str(k)]
            assert got == ref[k : k + NEXT], f"rank {rank}: resume at batch {k} diverged"


def test_restore_cost_does_not_grow_with_position(results):
    _, _, resume = results
    for rank in range(WORLD):
        t6, t600 = resume[rank]["restore_s"]["6"], resume[rank]["restore_s"]["600"]
        print(f"rank {rank}: restore at k=6 {t6 * 1000:.0f} ms, at k=600 {t600 * 1000:.0f} ms")
        assert t600 <= 1.5 * t6 + 0.1, (t6, t600)  # +0.1 s: worker start-up noise on a shared CPU


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    rank_main(sys.argv[1:])
