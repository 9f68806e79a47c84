"""The epoch count that sizes the LR schedule in epochs mode equals what the real streams yield:
every rank's micro-batches in every epoch, for packed and padded documents and packed and
padded SFT samples (the packer's 16-sample window), with held-out rows and dataloader workers."""

from __future__ import annotations

import pytest

from tests.helpers import alpaca_records, write_corpus, write_json_records
from tests.unit.test_data_formatting import bpe_file, chat_tokenizer  # noqa: F401 (bpe_file: a fixture)
from tests.unit.test_data_pipeline import cfg_for, tok, tokenizer_file  # noqa: F401 (fixtures)
from tests.unit.test_data_sft import sft_cfg
from trainer.data import build_train_data
from trainer.data.epoch_count import cache_key, cache_paths
from trainer.dist import DistInfo

WORLD, EPOCHS = 2, 2


def real_batches(cfg, tokenizer, micro: int, seed: int = 5) -> list[list[int]]:
    """[epoch][rank]: how many micro-batches each rank's real stream yields (one view per rank,
    no process group: a rank's TrainData does no collective)."""
    out = [[0] * WORLD for _ in range(EPOCHS)]
    for rank in range(WORLD):
        data = build_train_data(cfg, tokenizer, DistInfo(rank=rank, world_size=WORLD), seed, micro)
        for epoch in range(EPOCHS):
            out[epoch][rank] = sum(1 for _ in data)
            data.end_epoch()
    return out


def counted(cfg, tokenizer, micro: int, seed: int = 5) -> list[list[int]]:
    return build_train_data(cfg, tokenizer, DistInfo(rank=0, world_size=WORLD), seed, micro).count_batches(
        EPOCHS
    )


@pytest.mark.parametrize(("pack", "workers"), [(True, 0), (False, 0), (True, 2)])
def test_documents_count_equals_the_stream(tmp_path, tok, pack, workers):  # noqa: F811
    # Row groups of 7 rows: shard boundaries fall inside groups; 10% held out for eval.
    paths = write_corpus(tmp_path, 3, 41, row_group_size=7)
    cfg = cfg_for(paths, pack=pack, num_workers=workers, validation_fraction=0.1, max_seq_len=24)
    want = real_batches(cfg, tok, micro=3)
    assert counted(cfg, tok, micro=3) == want
    assert want[0] != want[1] or pack, "the epochs should differ somewhere to make this test bite"


@pytest.fixture(scope="module")
def chat_tok(bpe_file):  # noqa: F811
    return chat_tokenizer(bpe_file)


@pytest.mark.parametrize("pack", [True, False])
def test_sft_count_follows_the_packer_window(tmp_path, chat_tok, pack):
    tokenizer = chat_tok
    path = write_json_records(tmp_path / "a.jsonl", alpaca_records(150, seed=3), lines=True)
    # max_seq_len 80 truncates some samples and drops some that keep no response token.
    cfg = sft_cfg([path], pack=pack, max_seq_len=80, buffer_size=8, validation_fraction=0.1)
    want = real_batches(cfg, tokenizer, micro=2)
    assert counted(cfg, tokenizer, micro=2) == want


def test_the_row_table_is_cached_beside_the_data_and_keyed_by_what_changes_it(tmp_path, tok):  # noqa: F811
    paths = write_corpus(tmp_path, 1, 30, row_group_size=8)
    data = build_train_data(cfg_for(paths), tok, DistInfo(), 5, 2)
    first = data.count_batches(1)
    beside = cache_paths(data.spec, cache_key(dict(data.fingerprint)))[0]
    assert beside.parent == paths[0].parent / ".dstrain_cache" and beside.is_file()
    # Another max_seq_len reuses the table (it holds lengths, not rows); another format does not.
    other = build_train_data(cfg_for(paths, max_seq_len=16), tok, DistInfo(), 5, 2)
    assert cache_key(dict(other.fingerprint)) == cache_key(dict(data.fingerprint))
    assert other.count_batches(1)[0][0] > first[0][0]
    templated = build_train_data(cfg_for(paths, text_template="x {text}"), tok, DistInfo(), 5, 2)
    assert cache_key(dict(templated.fingerprint)) != cache_key(dict(data.fingerprint))
