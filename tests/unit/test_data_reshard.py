"""Resuming the data position on another world size or worker count (``TrainData.load_resharded``).

The old ranks consume a few batches and save; new ranks re-derive their position from all old
states. Every document is shorter than ``max_seq_len``, so a document is one chunk and its
tokens can be counted: over the batches before the save and after the re-shard, every token of
every training document must appear exactly once (nothing repeated, nothing dropped). The
only documents seen on both sides are the old shards' packer carries (head before, tail after).

A rank's TrainData does no collective, so the simulated ranks of one run are iterated one
after the other in this process: the old ranks stop long before their shards end, and each new
rank runs to its own end.
"""

from __future__ import annotations

import itertools
import logging
import pickle
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import load_tokenizer_file, make_docs, train_tokenizer
from trainer.data import build_eval_batches, build_train_data, encode_texts
from trainer.data.config import DataConfig
from trainer.data.sharding import deal_ranges, merge_ranges, ranges_rows
from trainer.dist import DistInfo
from trainer.errors import DataError

SEED = 5
MICRO_BATCH = 2
SEQ = 32
BUFFER = 8
SAVED_AFTER = 5  # batches each old rank yields before the save


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer_file(
        train_tokenizer(tmp_path_factory.mktemp("reshard_tok"), vocab_size=384, seed=99) / "tokenizer.json"
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tok) -> tuple[list[Path], dict[int, int]]:
    """3 files of short documents (row groups of 7); returns the paths and tokens per doc id."""
    out = tmp_path_factory.mktemp("reshard_corpus")
    paths, lengths, next_id = [], {}, 100
    for f in range(3):
        docs = make_docs(70, seed=20 + f, min_words=2, max_words=12, numbered=False)
        ids = list(range(next_id, next_id + len(docs)))
        path = out / f"part-{f}.parquet"
        pq.write_table(pa.table({"doc_id": ids, "text": docs}), path, row_group_size=7)
        paths.append(path)
        lengths.update(zip(ids, (len(t) for t in encode_texts(tok, docs)), strict=True))
        next_id += len(docs)
    assert max(lengths.values()) + 1 <= SEQ, "a test document is longer than max_seq_len"
    return paths, lengths


def cfg_for(paths, num_workers: int = 0, pack: bool = True) -> DataConfig:
    return DataConfig(
        train=[str(p) for p in paths],
        max_seq_len=SEQ,
        buffer_size=BUFFER,
        num_workers=num_workers,
        validation_fraction=0.1,
        pack=pack,
    )


def build(tok, paths, world: int, rank: int, workers: int, pack: bool = True, **overrides):
    dist = DistInfo(rank=rank, world_size=world)
    cfg = cfg_for(paths, workers, pack)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    micro = overrides.pop("micro_batch_size", MICRO_BATCH)
    return build_train_data(cfg, tok, dist, SEED, micro)


def token_counts(batches) -> Counter:
    counts: Counter = Counter()
    for b in batches:
        ids = b["doc_ids"][b["doc_ids"] >= 0]
        counts.update(ids.tolist())
    return counts


def save_old(tok, paths, world: int, workers: int, pack: bool, k: int = SAVED_AFTER):
    """Each old rank yields ``k`` batches; returns their token counts and states (as if saved)."""
    counts: Counter = Counter()
    states = []
    for rank in range(world):
        data = build(tok, paths, world, rank, workers, pack)
        counts += token_counts(itertools.islice(iter(data), k))
        states.append(pickle.loads(pickle.dumps(data.state_dict())))
    return counts, states


def resume_new(tok, paths, states, world: int, workers: int, pack: bool = True):
    """Each new rank re-derives its position and runs to the end of the epoch."""
    counts: Counter = Counter()
    for rank in range(world):
        data = build(tok, paths, world, rank, workers, pack)
        data.load_resharded(states)
        counts += token_counts(list(data))
        data.end_epoch()
        assert data.epoch == states[0]["epoch"] + 1
    return counts


def expected_tokens(tok, paths, lengths, pack: bool) -> dict[int, int]:
    """Tokens per training document (EOS included when packing); held-out rows excluded."""
    held = token_counts(build_eval_batches(cfg_for(paths, pack=pack), tok, DistInfo(), 2))
    assert held, "the corpus should hold some validation rows"
    return {d: n + int(pack) for d, n in lengths.items() if d not in held}


def carried_docs(states) -> set[int]:
    return {s["carry_doc"] for st in states for s in st["shards"] if s["carry_tokens"]}


@pytest.mark.parametrize(
    "old_world,old_workers,new_world,new_workers,pack",
    [(2, 1, 1, 0, True), (1, 0, 2, 0, True), (2, 1, 1, 2, True), (2, 0, 1, 0, False)],
    ids=["2x1-to-1x0", "1x0-to-2x0", "2x1-to-1x2", "2x0-to-1x0-unpacked"],
)
def test_reshard_covers_every_token_once(
    tok, corpus, caplog, old_world, old_workers, new_world, new_workers, pack
):
    paths, lengths = corpus
    want = expected_tokens(tok, paths, lengths, pack)
    before, states = save_old(tok, paths, old_world, old_workers, pack)
    shards = [s for st in states for s in st["shards"]]
    assert len(shards) == old_world * max(1, old_workers)
    # The save falls inside shuffle blocks, so leftovers are really exercised.
    assert any(0 < s["block_index"] < s["block_len"] for s in shards), shards
    logger = logging.getLogger("dstrain.data")  # "dstrain" may not propagate to caplog's root handler
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="dstrain.data"):
            after = resume_new(tok, paths, states, new_world, new_workers, pack)
    finally:
        logger.removeHandler(caplog.handler)
    assert any("re-sharded" in r.message for r in caplog.records)
    total = before + after
    assert dict(total) == want, "a token was repeated or lost across the re-shard"
    # Documents on both sides of the save: exactly the packer carries, at most one per old shard.
    both = set(before) & set(after)
    assert both == carried_docs(states)
    assert len(both) <= len(shards) and (pack or not both)


def test_documents_cut_at_a_block_end(tok, tmp_path):
    """Documents of several chunks: a shuffle block can end inside one, whose remaining chunks
    travel with the leftover."""
    docs = make_docs(60, seed=7, min_words=10, max_words=70, numbered=False)
    path = tmp_path / "long.parquet"
    pq.write_table(pa.table({"doc_id": list(range(60)), "text": docs}), path, row_group_size=5)
    lengths = dict(enumerate(len(t) for t in encode_texts(tok, docs)))
    assert max(lengths.values()) > 2 * SEQ
    want = expected_tokens(tok, [path], lengths, True)
    cut = 0
    for k in (2, 3, 4, 5):
        before, states = save_old(tok, [path], 2, 0, True, k=k)
        cut += sum(s["block_end"][2] > 0 for st in states for s in st["shards"])
        after = resume_new(tok, [path], states, 1, 0)
        assert dict(before + after) == want, k
    assert cut, "no save fell where a block ends inside a document"


def test_reshard_twice_inside_the_leftovers(tok, corpus):
    """2 ranks -> 1 rank (one batch, still inside the inherited leftovers) -> 2 ranks."""
    paths, lengths = corpus
    want = expected_tokens(tok, paths, lengths, True)
    before, states = save_old(tok, paths, 2, 0, True)
    mid = build(tok, paths, 1, 0, 0)
    mid.load_resharded(states)
    middle = token_counts(itertools.islice(iter(mid), 1))
    mid_state = pickle.loads(pickle.dumps(mid.state_dict()))
    assert mid_state["shards"][0]["leftovers"], "one batch should not exhaust the inherited leftovers"
    after = resume_new(tok, paths, [mid_state], 2, 0)
    assert dict(before + middle + after) == want


@pytest.mark.parametrize("new_workers", [0, 2])
def test_state_after_reshard_resumes_exactly(tok, corpus, new_workers):
    """Mid re-sharded epoch (also right after the re-shard, and inside the leftovers), a saved
    state continues with the same batches; the next epoch is sharded normally."""
    paths, _ = corpus
    _, states = save_old(tok, paths, 2, 1, True)
    ref = build(tok, paths, 1, 0, new_workers)
    ref.load_resharded(states)
    saved = {0: pickle.dumps(ref.state_dict())}
    batches = []
    for b in ref:
        batches.append(b["doc_ids"].tolist())
        if len(batches) in (1, 9):
            saved[len(batches)] = pickle.dumps(ref.state_dict())
    ref.end_epoch()
    assert ref.epoch == 1 and len(batches) > 12
    for k, blob in saved.items():
        fresh = build(tok, paths, 1, 0, new_workers)
        fresh.load_state_dict(pickle.loads(blob))
        assert [b["doc_ids"].tolist() for b in fresh] == batches[k:], f"resume at batch {k} diverged"
    if new_workers == 0:
        normal = build(tok, paths, 1, 0, 0)
        normal.start_epoch(1)
        assert [b["doc_ids"].tolist() for b in ref] == [b["doc_ids"].tolist() for b in normal]


def test_reshard_refuses_other_data_or_inconsistent_states(tok, corpus, tmp_path):
    paths, _ = corpus
    _, states = save_old(tok, paths, 2, 0, True, k=2)
    with pytest.raises(DataError, match=r"files removed: .*part-2") as err:
        build(tok, paths[:2], 1, 0, 0).load_resharded(states)
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match=r"pack True -> False"):
        build(tok, paths, 1, 0, 0, pack=False).load_resharded(states)
    with pytest.raises(DataError, match=r"all 2 saved ranks"):
        build(tok, paths, 1, 0, 0).load_resharded(states[:1])
    other_epoch = [states[0], {**states[1], "epoch": 1}]
    with pytest.raises(DataError, match=r"different epochs \[0, 1\]"):
        build(tok, paths, 1, 0, 0).load_resharded(other_epoch)


@pytest.mark.parametrize(
    "change",
    [{"micro_batch_size": 3}, {"buffer_size": 5}, {"micro_batch_size": 1, "buffer_size": 20}, {}],
    ids=["micro-batch", "buffer", "both", "nothing"],
)
def test_resume_policy_redeals_a_changed_micro_batch_or_buffer(tok, corpus, change):
    """The checkpoint protocol (``load_rank_states``): a changed micro-batch size or shuffle
    buffer re-deals the saved position like a world-size change (every token once, no epoch
    restart); with nothing changed the position is restored exactly."""
    from trainer.state import RankStates

    paths, lengths = corpus
    want = expected_tokens(tok, paths, lengths, True)
    before, states = save_old(tok, paths, 1, 0, True)
    data = build(tok, paths, 1, 0, 0, **change)
    data.load_rank_states(RankStates(own=states[0], saved_world_size=1, read=lambda r: states[r]))
    after = token_counts(list(data))
    assert dict(before + after) == want, "a token was repeated or lost (or the epoch restarted)"
    if "micro_batch_size" in change:
        assert (
            len(next(iter(build(tok, paths, 1, 0, 0, **change)))["input_ids"]) == change["micro_batch_size"]
        )


def test_resume_policy_restarts_the_epoch_when_the_data_changed(tok, corpus, caplog):
    from trainer.state import RankStates

    paths, _ = corpus
    _, states = save_old(tok, paths, 1, 0, True)
    data = build(tok, paths, 1, 0, 0, max_seq_len=SEQ * 2)
    logger = logging.getLogger("dstrain.data")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="dstrain.data"):
            data.load_rank_states(RankStates(own=states[0], saved_world_size=1, read=lambda r: states[r]))
    finally:
        logger.removeHandler(caplog.handler)
    assert data.epoch == 0 and data.batches_in_epoch == 0 and data.state_dict()["loader"] is None
    assert any(
        "max_seq_len 32 -> 64" in r.message and "restarting epoch 0" in r.message for r in caplog.records
    )


def test_deal_ranges_is_balanced_disjoint_and_complete():
    merged = merge_ranges([[40, 50], [0, 7], [7, 12], [30, 31], [12, 12]])
    assert merged == [[0, 12], [30, 31], [40, 50]]
    for shards in (1, 2, 3, 5, 30):
        parts = deal_ranges(merged, shards)
        sizes = [ranges_rows(p) for p in parts]
        assert len(parts) == shards and max(sizes) - min(sizes) <= 1
        rows = [r for p in parts for lo, hi in p for r in range(lo, hi)]
        assert rows == [r for lo, hi in merged for r in range(lo, hi)]
