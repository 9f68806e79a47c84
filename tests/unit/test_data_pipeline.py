"""The streaming data pipeline in one process: packing policy, coverage, order, resume, errors.

Ranks are simulated by building one TrainData per rank in this process (it does no collective).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.helpers import (
    load_tokenizer_file,
    make_docs,
    shared_path,
    train_tokenizer,
    write_corpus,
    write_json_records,
)
from trainer.data import build_eval_batches, build_train_data, encode_texts, write_tokenized_shard
from trainer.data.config import DataConfig
from trainer.data.packing import IGNORE_INDEX, Packer, collate
from trainer.dist import DistInfo
from trainer.errors import ConfigError, DataError

ONE = DistInfo()


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory) -> Path:
    return train_tokenizer(tmp_path_factory.mktemp("data_tok"), vocab_size=384, seed=99) / "tokenizer.json"


@pytest.fixture(scope="session")
def tok(tokenizer_file):
    return load_tokenizer_file(tokenizer_file)


def cfg_for(paths, **kw) -> DataConfig:
    base = dict(max_seq_len=32, buffer_size=16, num_workers=0, validation_fraction=0.0)
    base.update(kw)
    return DataConfig(train=[str(p) for p in paths], **base)


def epoch_batches(data) -> list[dict[str, torch.Tensor]]:
    """This rank's batches of the current epoch, then the epoch's end (what the Trainer does
    once every rank has run out)."""
    batches = list(iter(data))
    data.end_epoch()
    return batches


def doc_sequence(batches) -> list[int]:
    """Doc ids in stream order, one entry per contiguous run of a doc."""
    out: list[int] = []
    for b in batches:
        for row in b["doc_ids"].tolist():
            prev = None
            for d in row:
                if d >= 0 and d != prev:
                    out.append(d)
                prev = d
    return out


# ------------------------------------------------------------------------------------ packing


def test_packer_policy():
    """Rows are full, keep every token in order, restart positions per piece, mask cross-doc labels."""
    chunks = [(1, np.arange(10, 15), None), (2, np.arange(20, 32), None), (3, np.arange(40, 43), None)]
    it = iter(chunks)
    packer = Packer(seq_len=8, pad_id=0)
    rows = []
    while (row := packer.next_row(lambda: next(it, None))) is not None:
        rows.append(row)
    assert len(rows) == 3
    ids = np.concatenate([r["input_ids"] for r in rows])
    docs = np.concatenate([r["doc_ids"] for r in rows])
    assert ids[docs >= 0].tolist() == list(range(10, 15)) + list(range(20, 32)) + list(range(40, 43))
    r0, r1, r2 = rows
    assert r0["doc_ids"].tolist() == [1] * 5 + [2] * 3
    assert r0["position_ids"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert r0["labels"][5] == IGNORE_INDEX and r0["labels"][4] == 14  # doc 2's first token: no loss
    # doc 2's tail carries into row 1 and restarts its positions at 0.
    assert r1["doc_ids"].tolist() == [2] * 8 and r1["position_ids"].tolist() == list(range(8))
    assert r1["labels"].tolist() == r1["input_ids"].tolist()
    # last row: doc 2's end, doc 3, then padding (its own segment, no loss, doc -1).
    assert r2["doc_ids"].tolist() == [2, 3, 3, 3, -1, -1, -1, -1]
    assert r2["labels"].tolist() == [31, IGNORE_INDEX, 41, 42] + [IGNORE_INDEX] * 4
    assert r2["position_ids"].tolist() == [0, 0, 1, 2, 0, 1, 2, 3]


def test_collate_padded_and_filler_rows():
    rows = [
        {"input_ids": np.array([5, 6, 7]), "labels": np.array([5, 6, 7]),
         "position_ids": np.arange(3), "doc_ids": np.array([9, 9, 9])},
    ]  # fmt: skip
    batch = collate(rows, micro_batch_size=2, pad_id=0, pack=False, seq_len=8)
    assert batch["input_ids"].shape == (2, 3)
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]  # filler row: one visible key
    assert batch["labels"][1].tolist() == [IGNORE_INDEX] * 3
    assert batch["doc_ids"][1].tolist() == [-1] * 3
    packed = collate(rows, micro_batch_size=2, pad_id=0, pack=True, seq_len=8)
    assert "attention_mask" not in packed and packed["input_ids"].shape == (2, 8)


def test_batch_format(tmp_path, tok):
    paths = write_corpus(tmp_path, 1, 40)
    for pack in (True, False):
        data = build_train_data(cfg_for(paths, pack=pack), tok, ONE, seed=0, micro_batch_size=3)
        batch = next(iter(data))
        assert set(batch) == {"input_ids", "labels", "position_ids", "doc_ids"} | (
            set() if pack else {"attention_mask"}
        )
        for v in batch.values():
            assert v.dtype == torch.long and v.shape[0] == 3 and v.device.type == "cpu"
        if pack:
            assert batch["input_ids"].shape[1] == 32
            # Every doc ends with EOS; no special token other than EOS appears.
            real = batch["doc_ids"] >= 0
            assert (batch["input_ids"][real] == tok.eos_token_id).sum() >= 1
        else:
            # Unpacked rows hold one chunk each, without EOS.
            assert (batch["input_ids"][batch["attention_mask"].bool()] != tok.eos_token_id).all()


# ----------------------------------------------------------------------------------- coverage


@pytest.mark.parametrize("num_files", [1, 3, 7])
@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_one_rank_coverage_and_order(tmp_path, tok, num_workers, num_files):
    """Each doc exactly once per epoch (none skipped here); epochs differ."""
    paths = write_corpus(tmp_path, num_files, 84 // num_files + 5, row_group_size=7)
    all_ids = set(pq.read_table(paths[0]).column("doc_id").to_pylist())
    for p in paths[1:]:
        all_ids |= set(pq.read_table(p).column("doc_id").to_pylist())
    data = build_train_data(cfg_for(paths, num_workers=num_workers), tok, ONE, seed=3, micro_batch_size=2)
    orders = []
    for epoch in range(2):
        assert data.epoch == epoch
        batches = epoch_batches(data)
        seq = doc_sequence(batches)
        # A doc may appear as two runs only when a packed row boundary splits it: count first tokens.
        firsts = _doc_starts(batches, tok.eos_token_id)
        assert len(firsts) == len(set(firsts)), "a document was yielded twice"
        assert set(seq) <= all_ids
        unseen = all_ids - set(seq)
        assert not unseen and data.skipped_docs == 0
        assert data.last_epoch is not None and data.last_epoch["batches"] == len(batches)
        orders.append(firsts)
    assert data.epoch == 2
    assert orders[0] != orders[1] and sorted(orders[0]) == sorted(orders[1])


def _doc_starts(batches, eos_id: int) -> list[int]:
    """Doc ids whose EOS appears (each document ends with exactly one EOS when packing)."""
    out = []
    for b in batches:
        hit = (b["input_ids"] == eos_id) & (b["doc_ids"] >= 0)
        out.extend(b["doc_ids"][hit].tolist())
    return out


def test_long_document_is_chunked(tmp_path, tok):
    """A document longer than the whole buffer (in tokens) streams through in chunks, none lost."""
    long_doc = " ".join(["river stone light"] * 400)
    docs = make_docs(20, min_words=3, max_words=40, numbered=False) + [long_doc]
    path = tmp_path / "long.parquet"
    pq.write_table(pa.table({"doc_id": list(range(len(docs))), "text": docs}), path, row_group_size=8)
    n_long = len(encode_texts(tok, [long_doc])[0]) + 1
    for pack in (True, False):
        data = build_train_data(cfg_for([path], buffer_size=4, pack=pack), tok, ONE, 0, 2)
        batches = epoch_batches(data)
        got = sum(int((b["doc_ids"] == 20).sum()) for b in batches)
        assert got == n_long - (0 if pack else 1)


# ------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("pack,num_workers", [(True, 2), (False, 0)])
def test_resume_in_process(tmp_path, tok, pack, num_workers):
    """State at batch k, loaded into a fresh TrainData, continues exactly (also across epochs)."""
    paths = write_corpus(tmp_path, 3, 40, row_group_size=8)
    cfg = cfg_for(paths, pack=pack, num_workers=num_workers, buffer_size=12)
    data = build_train_data(cfg, tok, ONE, seed=5, micro_batch_size=2)
    ref, states = [], {}
    for _ in range(2):
        for b in data:
            ref.append(b["doc_ids"].tolist())
            states[len(ref)] = pickle.dumps(data.state_dict())
        data.end_epoch()
    per_epoch = len(ref) // 2
    for k in (1, per_epoch // 2, per_epoch):
        fresh = build_train_data(cfg, tok, ONE, seed=5, micro_batch_size=2)
        fresh.load_state_dict(pickle.loads(states[k]))
        out = []
        while len(out) < 12:
            out.extend(b["doc_ids"].tolist() for b in fresh)
            if fresh.state_dict()["local_done"]:
                fresh.end_epoch()
        assert out[:12] == ref[k : k + 12], k


def test_state_mismatch_names_the_change(tmp_path, tok):
    paths = write_corpus(tmp_path, 2, 30)
    cfg = cfg_for(paths, num_workers=0)
    data = build_train_data(cfg, tok, ONE, 0, 2)
    next(iter(data))
    state = data.state_dict()

    with pytest.raises(DataError, match=r"world_size 1 -> 2"):
        build_train_data(cfg, tok, DistInfo(rank=0, world_size=2), 0, 2).load_state_dict(state)
    with pytest.raises(DataError, match=r"num_workers 0 -> 2"):
        build_train_data(cfg_for(paths, num_workers=2), tok, ONE, 0, 2).load_state_dict(state)
    with pytest.raises(DataError, match=r"max_seq_len 32 -> 64"):
        build_train_data(cfg_for(paths, max_seq_len=64), tok, ONE, 0, 2).load_state_dict(state)
    with pytest.raises(DataError, match=r"files removed: .*part-001"):
        build_train_data(cfg_for(paths[:1]), tok, ONE, 0, 2).load_state_dict(state)
    extra = write_corpus(tmp_path / "more", 1, 5, first_id=9000)
    with pytest.raises(DataError, match=r"files added"):
        build_train_data(cfg_for(paths + extra), tok, ONE, 0, 2).load_state_dict(state)
    pq.write_table(pa.table({"doc_id": [1], "text": ["changed"]}), paths[1])
    with pytest.raises(DataError, match=r"files changed .*part-001") as err:
        build_train_data(cfg, tok, ONE, 0, 2).load_state_dict(state)
    assert "\n" not in str(err.value) and "strict=False" in str(err.value)
    # The documented reset: keep the epoch, start it from its beginning.
    reset = build_train_data(cfg, tok, ONE, 0, 2)
    reset.load_state_dict(state, strict=False)
    assert reset.epoch == 0 and reset.batches_in_epoch == 0
    reset.start_epoch(3)
    assert reset.epoch == 3 and reset.state_dict()["loader"] is None


# -------------------------------------------------------------------------------- validation


def test_validation_fraction_split(tmp_path, tok):
    """Held-out rows never reach training; each rank's eval part is disjoint; eval is stable."""
    paths = write_corpus(tmp_path, 2, 60, row_group_size=9)
    cfg = cfg_for(paths, validation_fraction=0.2)
    train = set(doc_sequence(epoch_batches(build_train_data(cfg, tok, ONE, 0, 2))))
    ev = build_eval_batches(cfg, tok, ONE, 2)
    eval_ids = set(doc_sequence(list(ev)))
    assert eval_ids and not (train & eval_ids)
    assert len(train | eval_ids) == 120 and 10 <= len(eval_ids) <= 40
    assert doc_sequence(list(ev)) == doc_sequence(list(ev))  # same set, same order, every eval
    parts = [
        set(doc_sequence(list(build_eval_batches(cfg, tok, DistInfo(rank=r, world_size=2), 2))))
        for r in (0, 1)
    ]
    assert not (parts[0] & parts[1]) and parts[0] | parts[1] == eval_ids
    capped = build_eval_batches(cfg_for(paths, validation_fraction=0.2, eval_max_batches=2), tok, ONE, 2)
    assert len(list(capped)) == 2
    assert build_eval_batches(cfg_for(paths, validation_fraction=0.0), tok, ONE, 2) is None


def test_validation_files(tmp_path, tok):
    paths = write_corpus(tmp_path / "train", 1, 30)
    val = write_corpus(tmp_path / "val", 1, 10, first_id=5000)
    cfg = cfg_for(paths, validation=[str(val[0])], validation_fraction=0.5, pack=False)
    train = set(doc_sequence(epoch_batches(build_train_data(cfg, tok, ONE, 0, 2))))
    assert len(train) == 30  # the fraction is ignored when validation files are given
    assert set(doc_sequence(list(build_eval_batches(cfg, tok, ONE, 4)))) == set(range(5000, 5010))


# ------------------------------------------------------------------------------ other sources


def test_pretokenized_shards_match_raw_text(tmp_path, tok):
    paths = write_corpus(tmp_path / "raw", 2, 30, row_group_size=8)
    shards = []
    for i, p in enumerate(paths):
        table = pq.read_table(p)
        ids = encode_texts(tok, table.column("text").to_pylist())
        shards.append(
            write_tokenized_shard(tmp_path / "tok" / f"s{i}.parquet", ids, table.column("doc_id"), 8)
        )
    for pack in (True, False):
        raw = epoch_batches(build_train_data(cfg_for(paths, pack=pack), tok, ONE, 1, 2))
        pre = epoch_batches(build_train_data(cfg_for(shards, pack=pack), tok, ONE, 1, 2))
        assert len(raw) == len(pre)
        for a, b in zip(raw, pre, strict=True):
            assert all(torch.equal(a[k], b[k]) for k in a)


def test_json_and_jsonl_sources(tmp_path, tok, monkeypatch):
    import trainer.data.sources as sources

    monkeypatch.setattr(sources, "JSON_ROWS_PER_GROUP", 7)  # several groups per file
    monkeypatch.setattr(sources, "_JSON_CHUNK_BYTES", 64)  # records and UTF-8 chars span read chunks
    docs = make_docs(30, seed=4, min_words=3, max_words=40, numbered=False)
    docs[3] = '含有中文的文本，以及 emoji 🙂 和 "quotes" ]} 符号'
    records = [{"completion": d} for d in docs]
    arr = write_json_records(tmp_path / "a.json", records, lines=False)
    lines = write_json_records(tmp_path / "b.jsonl", records, lines=True)
    for path in (arr, lines):
        cfg = cfg_for([path], text_column="completion", pack=False, max_seq_len=512)
        batches = epoch_batches(build_train_data(cfg, tok, ONE, 0, 2))
        ids = doc_sequence(batches)
        assert sorted(ids) == list(range(30))  # doc id = global row index
        row = next(b["input_ids"][i] for b in batches for i in range(2) if b["doc_ids"][i, 0] == 3)
        assert tok.decode(row[row != tok.eos_token_id]) == docs[3]


def test_max_samples_caps_documents(tmp_path, tok):
    paths = write_corpus(tmp_path, 3, 20, row_group_size=6)
    data = build_train_data(cfg_for(paths, max_samples=25, pack=False), tok, ONE, 0, 2)
    assert set(doc_sequence(epoch_batches(data))) == set(range(1000, 1025))


def test_count_batches_is_exact(tmp_path, tok):
    """The schedule's epoch length (more cases, many ranks: tests/unit/test_epoch_count.py)."""
    paths = write_corpus(tmp_path, 2, 80, row_group_size=16)
    for pack in (True, False):
        data = build_train_data(cfg_for(paths, pack=pack), tok, ONE, 0, 2)
        assert data.count_batches(1) == [[len(epoch_batches(data))]]


# ---------------------------------------------------------------------------------- bad input


def test_bad_inputs_are_one_line_data_errors(tmp_path, tok):
    good = write_corpus(tmp_path, 1, 10)[0]
    not_parquet = tmp_path / "notes.parquet"
    not_parquet.write_text("hello, I am not parquet")
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cases = [
        ([tmp_path / "missing.parquet"], {}, r"missing\.parquet does not exist"),
        ([tmp_path / "nothing-*.parquet"], {}, r"glob .*nothing-\*\.parquet.* matched no files"),
        ([not_parquet], {}, r"notes\.parquet is not a readable parquet file"),
        ([truncated], {}, r"truncated\.parquet is not a readable parquet file"),
        (
            [good],
            {"text_column": "body"},
            r"has no column 'body' \(columns: doc_id, text\).*--data.text_column",
        ),
    ]
    for paths, kw, pattern in cases:
        with pytest.raises(DataError, match=pattern) as err:
            build_train_data(cfg_for(paths, **kw), tok, ONE, 0, 2)
        assert "\n" not in str(err.value)
    corrupt = tmp_path / "corrupt.parquet"
    pq.write_table(
        pa.table({"text": make_docs(400, min_words=3, max_words=40, numbered=False)}),
        corrupt,
        row_group_size=100,
        compression="snappy",
    )
    raw = bytearray(corrupt.read_bytes())
    third = len(raw) // 3
    raw[third : third + 200] = bytes((x * 7 + 13) % 256 for x in raw[third : third + 200])
    corrupt.write_bytes(bytes(raw))  # the footer is intact: the damage shows while reading a row group
    with pytest.raises(DataError, match=r"corrupt\.parquet: row group \d+ cannot be read") as err:
        epoch_batches(build_train_data(cfg_for([corrupt]), tok, ONE, 0, 2))
    assert "\n" not in str(err.value)
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "fine"}\n{"text": broken\n')
    for workers in (0, 2):  # raised inside a dataloader worker, it still arrives as one line
        with pytest.raises(DataError, match=r"bad\.jsonl record 1.*invalid JSON") as err:
            epoch_batches(build_train_data(cfg_for([bad_json], num_workers=workers), tok, ONE, 0, 2))
        assert "\n" not in str(err.value)


def test_tokenizer_without_eos(tmp_path, tokenizer_file):
    good = write_corpus(tmp_path, 1, 10)
    no_eos = load_tokenizer_file(tokenizer_file, with_eos=False)
    with pytest.raises(DataError, match=r"no eos_token.*--data.pack false"):
        build_train_data(cfg_for(good), no_eos, ONE, 0, 2)
    data = build_train_data(cfg_for(good, pack=False, max_seq_len=512), no_eos, ONE, 0, 2)
    assert len(epoch_batches(data)) == 5  # fine without packing: 10 docs, 2 per batch


def test_null_empty_nonstring_are_skipped_and_counted(tmp_path, tok):
    texts = ["a good doc", None, "", "another good one", None, "third"]
    path = tmp_path / "holes.parquet"
    pq.write_table(pa.table({"doc_id": list(range(6)), "text": texts}), path)
    data = build_train_data(cfg_for([path]), tok, ONE, 0, 2)
    assert set(doc_sequence(epoch_batches(data))) == {0, 3, 5}
    assert data.skipped_docs == 3
    jpath = write_json_records(
        tmp_path / "holes.jsonl",
        [
            {"text": "ok"},
            {"text": 5},
            {"text": {"nested": 1}},
            {"text": None},
            {"other": "x"},
            {"text": "ok too"},
        ],
        lines=True,
    )
    data = build_train_data(cfg_for([jpath]), tok, ONE, 0, 2)
    assert set(doc_sequence(epoch_batches(data))) == {0, 5} and data.skipped_docs == 4


def test_config_validation():
    with pytest.raises(ConfigError, match="--data.buffer_size"):
        DataConfig(train=["x"], buffer_size=0)


# ------------------------------------------------------------------------------ real samples


@pytest.mark.shared_data
def test_zhwiki_sample_with_qwen_tokenizer():
    """The real zh-wiki JSON array and the real Qwen2.5 tokenizer (skips without ../shared)."""
    sample = shared_path("zhwiki-sample", "wikipedia-cn-sample.json")
    qwen = shared_path("qwen2.5-0.5b")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(qwen)
    cfg = DataConfig(
        train=[str(sample)], text_column="completion", max_seq_len=256, buffer_size=64,
        num_workers=0, max_samples=200, validation_fraction=0.05,
    )  # fmt: skip
    data = build_train_data(cfg, tok, ONE, 0, 4)
    batches = epoch_batches(data)
    ev = list(build_eval_batches(cfg, tok, ONE, 4))
    train_ids, eval_ids = set(doc_sequence(batches)), set(doc_sequence(ev))
    assert not (train_ids & eval_ids) and len(train_ids | eval_ids) == 200 - data.skipped_docs
    assert all(b["input_ids"].shape == (4, 256) for b in batches)
    text = tok.decode(batches[0]["input_ids"][0][:40])
    assert any("\u4e00" <= ch <= "\u9fff" for ch in text)


# ---------------------------------------------------------------------------- packing isolation


def test_packed_document_logits_equal_alone(tmp_path, tok):
    """sdpa + position_ids restarting, no attention_mask: a packed doc's logits equal its own run."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=len(tok), max_position_embeddings=256,
    )  # fmt: skip
    model = Qwen2ForCausalLM._from_config(
        config, attn_implementation="sdpa", torch_dtype=torch.float32
    ).eval()
    paths = write_corpus(tmp_path, 1, 40)
    data = build_train_data(cfg_for(paths, max_seq_len=64), tok, ONE, 0, 2)
    batch = next(iter(data))
    assert "attention_mask" not in batch
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
        checked = 0
        for r in range(batch["input_ids"].shape[0]):
            docs = batch["doc_ids"][r]
            starts = [0] + [i for i in range(1, len(docs)) if batch["position_ids"][r, i] == 0]
            for a, b in zip(starts, starts[1:] + [len(docs)], strict=True):
                if docs[a] < 0:
                    continue
                alone = model(input_ids=batch["input_ids"][r : r + 1, a:b], use_cache=False).logits[0]
                assert torch.allclose(packed[r, a:b], alone, atol=1e-5, rtol=0), (r, a, b)
                checked += 1
        assert checked >= 3
        # The same packed row with causal-only attention differs: the isolation is real.
        leaky = model(input_ids=batch["input_ids"], use_cache=False).logits
        assert not torch.allclose(leaky, packed, atol=1e-3)


# ------------------------------------------------------------------------------ bounded memory


def rss_probe(path: str, tokenizer_file: str) -> None:
    """Stream one epoch of ``path`` in this process; print batches, resident MiB before streaming,
    the highest resident MiB sampled at every batch (/proc/self/statm), and ru_maxrss (MiB)."""
    import os
    import resource

    def resident() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    tok = load_tokenizer_file(Path(tokenizer_file))
    data = build_train_data(cfg_for([path], buffer_size=256, max_seq_len=256), tok, ONE, 0, 4)
    encode_texts(
        tok, make_docs(50, min_words=3, max_words=40, numbered=False)
    )  # warm the tokenizer's allocations before the baseline
    before = high = resident()
    n = 0
    for _ in data:
        n += 1
        high = max(high, resident())
    print(n, before, high, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def test_peak_memory_does_not_grow_with_file_size(tmp_path, tokenizer_file):
    """Peak RSS streaming a 4x larger file grows by < 20% (each measured in a fresh process).

    ru_maxrss is dominated by the import of torch and transformers, so the growth *while
    streaming* (resident memory sampled at every batch, minus before the first) is checked too:
    a loader that held the file's text or tokens would add tens of MiB there.
    """
    import os
    import subprocess
    import sys

    from tests.helpers import REPO

    runs = {}
    for scale in (1, 4):
        docs = make_docs(700 * scale, seed=scale, min_words=120, max_words=200, numbered=False)
        path = tmp_path / f"x{scale}.parquet"
        pq.write_table(pa.table({"text": docs}), path, row_group_size=256)
        code = f"from tests.unit.test_data_pipeline import rss_probe; rss_probe({str(path)!r}, {str(tokenizer_file)!r})"
        proc = subprocess.run(
            [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        batches, before, high, peak = proc.stdout.split()[-4:]
        runs[scale] = (int(batches), float(before), float(high), float(peak), sum(map(len, docs)) / 2**20)
    print(
        f"1x {runs[1]}, 4x {runs[4]} (batches, MiB resident before/highest while streaming, ru_maxrss, text MiB)"
    )
    (b1, before1, high1, peak1, _), (b4, before4, high4, peak4, _) = runs[1], runs[4]
    assert b4 > 3 * b1
    assert peak4 < 1.2 * peak1
    assert high4 - before4 < 1.2 * (high1 - before1) + 8, "memory grew with the file while streaming"
