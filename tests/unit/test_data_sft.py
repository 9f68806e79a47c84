"""SFT samples through the streaming pipeline: the loss mask survives shuffle, packing, the
packer's saved carry, resume and re-shard; long samples are truncated or dropped and counted;
json, jsonl and parquet give the same batches; bad rows name their file and row.

What a sample *is* (ids and mask against the chat template) is checked in
``test_data_formatting.py``; here the formatter's output is the reference the stream must keep.
"""

from __future__ import annotations

import ast
import json
import pickle
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.helpers import REPO, alpaca_records, shared_path, words, write_json_records
from tests.unit.test_data_formatting import bpe_file, chat_tokenizer  # noqa: F401 (bpe_file: a fixture)
from trainer.data import build_eval_batches, build_train_data, write_tokenized_shard
from trainer.data.config import DataConfig
from trainer.data.formatting import Formatter
from trainer.data.packing import IGNORE_INDEX, Packer
from trainer.data.pipeline import STATE_VERSION
from trainer.dist import DistInfo
from trainer.errors import DataError

ONE = DistInfo()


@pytest.fixture(scope="module")
def tok(bpe_file):  # noqa: F811
    return chat_tokenizer(bpe_file)


def sft_cfg(paths, **kw) -> DataConfig:
    base = dict(format="alpaca", max_seq_len=96, buffer_size=8, num_workers=0, validation_fraction=0.0)
    base.update(kw)
    return DataConfig(train=[str(p) for p in paths], **base)


def expected_samples(cfg: DataConfig, tok, records: list[dict]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """doc id (= row index) -> (ids, mask) as the stream must yield them: truncated to max_seq_len,
    samples without a target token (after the first position) left out."""
    out = {}
    for i, sample in enumerate(Formatter(cfg, tok).format_batch(records, str)):
        ids, mask = np.asarray(sample.ids)[: cfg.max_seq_len], sample.mask[: cfg.max_seq_len]
        if mask[1:].any():
            out[i] = (ids, mask)
    return out


def segments(batches):
    """(doc, ids, labels, positions) of every sample piece in the batches, in order."""
    out = []
    for b in batches:
        for r in range(b["input_ids"].shape[0]):
            docs, pos = b["doc_ids"][r].numpy(), b["position_ids"][r].numpy()
            starts = [i for i in range(len(docs)) if docs[i] >= 0 and (i == 0 or pos[i] == 0)]
            for s in starts:
                e = s + 1
                while e < len(docs) and docs[e] == docs[s] and pos[e] != 0:
                    e += 1
                out.append(
                    (int(docs[s]), b["input_ids"][r, s:e].numpy(), b["labels"][r, s:e].numpy(), pos[s:e])
                )
    return out


# -------------------------------------------------------------------------------- packing / padding


@pytest.mark.parametrize("num_workers", [0, 2])
def test_packed_rows_hold_whole_samples_with_their_masks(tmp_path, tok, num_workers):
    records = alpaca_records(60)
    path = write_json_records(tmp_path / "a.jsonl", records, lines=True)
    cfg = sft_cfg([path], num_workers=num_workers)
    want = expected_samples(cfg, tok, records)
    data = build_train_data(cfg, tok, ONE, seed=1, micro_batch_size=3)
    batches = list(data)
    assert all(b["input_ids"].shape == (3, 96) and "attention_mask" not in b for b in batches)
    segs = segments(batches)
    assert sorted(d for d, *_ in segs) == sorted(want), "every sample exactly once, none split"
    for doc, ids, labels, pos in segs:
        wids, wmask = want[doc]
        assert ids.tolist() == wids.tolist() and pos.tolist() == list(range(len(ids)))
        expected = np.where(wmask.astype(bool), wids, IGNORE_INDEX)
        expected[0] = IGNORE_INDEX  # a sample's first token is never predicted across a boundary
        assert labels.tolist() == expected.tolist()
    for b in batches:  # padding: no doc, no loss
        assert (b["labels"][b["doc_ids"] < 0] == IGNORE_INDEX).all()
    # Whole samples leave padding at row ends: it is there, and bounded.
    real = sum(int((b["doc_ids"] >= 0).sum()) for b in batches)
    assert 0.5 < real / sum(b["input_ids"].numel() for b in batches) < 1.0


@pytest.mark.parametrize("pad_is_eos", [True, False])
def test_padded_batches_supervise_eos_not_padding(tmp_path, bpe_file, pad_is_eos):  # noqa: F811
    """No chat template, pack false: each row is prompt + response + EOS; the EOS is a target
    even when pad == eos, the padding after it is not."""
    tok = chat_tokenizer(bpe_file, pad_is_eos=pad_is_eos)
    records = alpaca_records(20, seed=3)
    path = write_json_records(tmp_path / "a.json", records, lines=False)
    cfg = sft_cfg([path], pack=False, chat_template="none")
    want = expected_samples(cfg, tok, records)
    batches = list(build_train_data(cfg, tok, ONE, seed=0, micro_batch_size=4))
    seen = 0
    for b in batches:
        for r in range(4):
            doc = int(b["doc_ids"][r, 0])
            if doc < 0:
                assert (b["labels"][r] == IGNORE_INDEX).all()  # filler row
                continue
            n = int(b["attention_mask"][r].sum())
            ids, mask = want[doc]
            assert b["input_ids"][r, :n].tolist() == ids.tolist()
            assert b["labels"][r, :n].tolist() == np.where(mask.astype(bool), ids, IGNORE_INDEX).tolist()
            assert b["labels"][r, n - 1] == tok.eos_token_id == b["input_ids"][r, n - 1]
            assert (b["labels"][r, n:] == IGNORE_INDEX).all()
            assert (b["input_ids"][r, n:] == tok.pad_token_id).all()
            seen += 1
    assert seen == len(want) == 20


def test_packer_window_tops_rows_up_with_later_samples():
    """window 0: a sample that does not fit closes the row; window 2: up to 2 are set aside while
    later samples fill the row, and start the next rows, oldest first. Samples are never cut."""
    lengths = [6, 6, 3, 4, 1, 5, 2]

    def rows(window):
        it = iter([(d, np.arange(100 * d, 100 * d + n), np.ones(n, np.uint8)) for d, n in enumerate(lengths)])
        packer, out = Packer(seq_len=10, pad_id=0, window=window), []
        while (row := packer.next_row(lambda: next(it, None))) is not None:
            docs = row["doc_ids"].tolist()
            out.append([d for i, d in enumerate(docs) if d >= 0 and (i == 0 or docs[i - 1] != d)])
        return out

    assert rows(0) == [[0], [1, 2], [3, 4, 5], [6]]
    assert rows(2) == [[0, 2, 4], [1, 3], [5, 6]]


# ------------------------------------------------------------------------------------------ resume


@pytest.mark.parametrize("pack,num_workers", [(True, 2), (True, 0), (False, 0)])
def test_resume_keeps_masks_and_carry(tmp_path, tok, pack, num_workers):
    records = alpaca_records(80, seed=5)
    path = write_json_records(tmp_path / "a.jsonl", records, lines=True)
    cfg = sft_cfg([path], pack=pack, num_workers=num_workers, buffer_size=12, max_seq_len=64)
    data = build_train_data(cfg, tok, ONE, seed=2, micro_batch_size=2)
    ref, states = [], {}
    for _ in range(2):
        for b in data:
            ref.append({k: v.clone() for k, v in b.items()})
            states[len(ref)] = pickle.dumps(data.state_dict())
    pending = [p for st in map(pickle.loads, states.values()) for s in st["shards"] for p in s["pending"]]
    if pack:  # whole samples set aside by the packer, saved with their loss mask (as runs)
        assert pending and all(
            not s["carry_tokens"] for st in map(pickle.loads, states.values()) for s in st["shards"]
        )
        assert all(0 < p["targets"][0][0] < p["targets"][-1][1] <= len(p["tokens"]) for p in pending)
    per_epoch = len(ref) // 2
    for k in (1, per_epoch // 2, per_epoch):
        fresh = build_train_data(cfg, tok, ONE, seed=2, micro_batch_size=2)
        fresh.load_state_dict(pickle.loads(states[k]))
        out = []
        while len(out) < 10:
            out.extend(fresh)
        for a, b in zip(out[:10], ref[k : k + 10], strict=True):
            assert all(torch.equal(a[key], b[key]) for key in b), k


def test_old_state_version_is_a_one_line_error(tmp_path, tok):
    path = write_json_records(tmp_path / "a.jsonl", alpaca_records(10), lines=True)
    data = build_train_data(sft_cfg([path]), tok, ONE, 0, 2)
    next(iter(data))
    state = data.state_dict()
    assert state["version"] == STATE_VERSION
    state["version"] = STATE_VERSION - 1
    with pytest.raises(
        DataError, match=rf"format {STATE_VERSION - 1}, this dstrain reads {STATE_VERSION}"
    ) as err:
        build_train_data(sft_cfg([path]), tok, ONE, 0, 2).load_state_dict(state)
    assert "\n" not in str(err.value)


def test_formatting_change_is_named_on_resume(tmp_path, tok):
    """A resume with other formatting settings does not misread the position: it names the change."""
    path = write_json_records(tmp_path / "a.jsonl", alpaca_records(10), lines=True)
    data = build_train_data(sft_cfg([path]), tok, ONE, 0, 2)
    next(iter(data))
    state = data.state_dict()
    for kw in (
        {"reasoning": "drop"},
        {"chat_template": "none"},
        {"output_column": "output", "input_column": "x"},
    ):
        with pytest.raises(DataError, match=r"formatting .alpaca, .* -> .alpaca, "):
            build_train_data(sft_cfg([path], **kw), tok, ONE, 0, 2).load_state_dict(state)


def test_formatting_change_restarts_the_epoch_on_resume(tmp_path, tok):
    """Through the checkpoint protocol (``load_rank_states``) a formatting change is a data
    change: the saved epoch restarts from its beginning instead of misreading the position."""
    from trainer.state import RankStates

    path = write_json_records(tmp_path / "a.jsonl", alpaca_records(40), lines=True)
    data = build_train_data(sft_cfg([path]), tok, ONE, 0, 2)
    it = iter(data)
    next(it), next(it)
    state = data.state_dict()
    assert state["batches_in_epoch"] == 2
    for kw in (
        {"reasoning": "drop"},
        {"chat_template": "none"},
        {"output_column": "output", "input_column": "x"},
    ):
        resumed = build_train_data(sft_cfg([path], **kw), tok, ONE, 0, 2)
        resumed.load_rank_states(RankStates(own=state, saved_world_size=1, read=lambda r: state))
        assert resumed.epoch == 0 and resumed.batches_in_epoch == 0, kw
        assert resumed.state_dict()["loader"] is None, kw
    same = build_train_data(sft_cfg([path]), tok, ONE, 0, 2)
    same.load_rank_states(RankStates(own=state, saved_world_size=1, read=lambda r: state))
    assert same.batches_in_epoch == 2, "unchanged settings resume the exact position"


def test_reshard_hands_out_every_sample_once(tmp_path, tok):
    """Samples the packer set aside are whole and were never yielded, so a re-shard (2 workers -> 1)
    hands each out once: nothing duplicated, nothing lost."""
    records = alpaca_records(90, seed=8)
    path = write_json_records(tmp_path / "a.jsonl", records, lines=True)
    cfg2 = sft_cfg([path], num_workers=2, max_seq_len=64)
    data = build_train_data(cfg2, tok, ONE, seed=4, micro_batch_size=2)
    it = iter(data)
    before = [next(it) for _ in range(7)]
    state = data.state_dict()
    assert any(s["pending"] for s in state["shards"])
    resumed = build_train_data(
        sft_cfg([path], num_workers=1, max_seq_len=64), tok, ONE, seed=4, micro_batch_size=2
    )
    resumed.load_resharded([state])
    after = list(resumed)
    docs = [d for d, *_ in segments(before + after)]
    assert sorted(docs) == sorted(expected_samples(cfg2, tok, records))


# ----------------------------------------------------------------------------- truncation / drops


def test_long_samples_are_truncated_or_dropped_and_counted(tmp_path, tok):
    rng = random.Random(11)
    records = alpaca_records(30, seed=11)
    long_output = {3, 12, 20}  # the response runs past max_seq_len: truncated, kept
    long_prompt = {6, 17}  # the prompt alone fills max_seq_len: no target left, dropped (no history)
    for i in long_output:
        records[i]["output"] = words(rng, 200, 220)
    for i in long_prompt:
        records[i]["instruction"] = words(rng, 200, 220)
    path = write_json_records(tmp_path / "a.jsonl", records, lines=True)
    cfg = sft_cfg([path], max_seq_len=128)
    lengths = [len(s.ids) for s in Formatter(cfg, tok).format_batch(records, str)]
    assert {i for i, n in enumerate(lengths) if n > 128} == long_output | long_prompt
    for pack in (True, False):
        data = build_train_data(sft_cfg([path], max_seq_len=128, pack=pack), tok, ONE, 0, 2)
        batches = list(data)
        stats = data.end_epoch()
        assert stats["truncated_docs"] == 3 and stats["no_target_docs"] == 2
        docs = (
            {d for d, *_ in segments(batches)}
            if pack
            else {int(b["doc_ids"][r, 0]) for b in batches for r in range(2)} - {-1}
        )
        assert docs == set(range(30)) - long_prompt
        for b in batches:
            for r in range(2):
                d = int(b["doc_ids"][r, 0])
                if not pack and d in long_output:
                    assert int(b["attention_mask"][r].sum()) == 128  # the head, cut at max_seq_len
    assert set(expected_samples(cfg, tok, records)) == set(range(30)) - long_prompt


# ----------------------------------------------------------------------------------------- sources


def test_json_jsonl_parquet_give_the_same_batches(tmp_path, tok):
    convs = []
    for rec in alpaca_records(40, seed=13):
        turns = [{"from": "human", "value": rec["instruction"]}, {"from": "gpt", "value": rec["output"]}]
        convs.append({"conversations": turns, "system": "be brief" if len(convs) % 3 == 0 else None})
    paths = [
        write_json_records(tmp_path / "c.json", convs, lines=False),
        write_json_records(tmp_path / "c.jsonl", convs, lines=True),
    ]
    # One row group, as a json file of < 1024 records is one group: the same units, the same order.
    pq.write_table(pa.Table.from_pylist(convs), tmp_path / "c.parquet", row_group_size=1024)
    paths.append(tmp_path / "c.parquet")
    runs = []
    for path in paths:
        cfg = sft_cfg([path], format="sharegpt", buffer_size=5)
        runs.append(list(build_train_data(cfg, tok, ONE, seed=6, micro_batch_size=2)))
    assert sorted(d for d, *_ in segments(runs[0])) == list(range(40))
    assert sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in runs[0]) > 200
    for other in runs[1:]:
        assert len(other) == len(runs[0])
        for a, b in zip(runs[0], other, strict=True):
            assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_rows_and_columns_name_the_file_and_row(tmp_path, tok):
    records = alpaca_records(12)
    records[5] = {"instruction": "x", "output": ["not", "text"]}
    jpath = write_json_records(tmp_path / "bad.jsonl", records, lines=True)
    for workers in (0, 2):  # from a dataloader worker it still arrives as one line
        with pytest.raises(DataError, match=rf"{jpath} record 5: field 'output' is list") as err:
            list(build_train_data(sft_cfg([jpath], num_workers=workers), tok, ONE, 0, 2))
        assert "\n" not in str(err.value)
    ppath = tmp_path / "holes.parquet"
    rows = alpaca_records(10)
    pq.write_table(
        pa.table(
            {
                "instruction": [r["instruction"] for r in rows],
                "output": [None if i == 7 else r["output"] for i, r in enumerate(rows)],
            }
        ),
        ppath,
        row_group_size=4,
    )
    with pytest.raises(DataError, match=rf"{ppath} row 7: missing field 'output'"):
        list(build_train_data(sft_cfg([ppath]), tok, ONE, 0, 2))
    with pytest.raises(
        DataError,
        match=r"has no column 'answer' \(columns: instruction, output\); set --data.output_column .* or check --data.format alpaca",
    ):
        build_train_data(sft_cfg([ppath], output_column="answer"), tok, ONE, 0, 2)
    with pytest.raises(
        DataError, match=r"has no field 'conversations' in|has no field 'conversations' \(fields"
    ):
        build_train_data(sft_cfg([jpath], format="sharegpt"), tok, ONE, 0, 2)


def test_pretokenized_shards_cannot_be_formatted(tmp_path, tok):
    shard = write_tokenized_shard(tmp_path / "t.parquet", [[1, 2, 3]], [0])
    with pytest.raises(DataError, match=r"pre-tokenized .* no loss mask"):
        build_train_data(sft_cfg([shard]), tok, ONE, 0, 2)
    with pytest.raises(DataError, match=r"drop --data.text_template"):
        build_train_data(sft_cfg([shard], format="text", text_template="{a}"), tok, ONE, 0, 2)


def test_text_template_documents(tmp_path, tok):
    """format text + text_template: each document built from columns, EOS-joined, every token a target."""
    path = tmp_path / "pr.parquet"
    prompts = [f"q{i} river" for i in range(20)]
    responses = [None if i == 4 else f"stone {i}" for i in range(20)]
    pq.write_table(pa.table({"prompt": prompts, "response": responses, "doc_id": list(range(20))}), path)
    cfg = sft_cfg([path], format="text", text_template="{prompt}\n{response}", max_seq_len=32)
    data = build_train_data(cfg, tok, ONE, 0, 2)
    batches = list(data)
    assert data.end_epoch()["skipped_docs"] == 1  # the null response
    docs: dict[int, list[int]] = {}
    for doc, ids, labels, _ in segments(batches):  # a document may be split across rows
        docs.setdefault(doc, []).extend(ids.tolist())
        assert labels[1:].tolist() == ids[1:].tolist()  # pretraining: every token after the first
    assert sorted(docs) == [i for i in range(20) if i != 4]
    for doc, ids in docs.items():
        text = f"{prompts[doc]}\n{responses[doc]}"
        assert ids == tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_eval_and_estimate(tmp_path, tok):
    records = alpaca_records(120, seed=17)
    path = write_json_records(tmp_path / "a.jsonl", records, lines=True)
    for pack in (True, False):
        cfg = sft_cfg([path], pack=pack, validation_fraction=0.2, max_seq_len=64)
        data = build_train_data(cfg, tok, ONE, 0, 2)
        train = list(data)
        assert data.count_batches(1) == [[len(train)]]
        ev = list(build_eval_batches(cfg, tok, ONE, 2))
        train_docs, eval_docs = {d for d, *_ in segments(train)}, {d for d, *_ in segments(ev)}
        assert eval_docs and not (train_docs & eval_docs) and len(train_docs | eval_docs) == 120
        assert all((b["labels"][b["doc_ids"] >= 0] != IGNORE_INDEX).any() for b in ev[:1])


def test_ignore_index_is_one_constant():
    """No bare -100 in trainer/: labels that take no loss use trainer.labels.IGNORE_INDEX, defined once."""
    found = []
    for path in sorted((REPO / "trainer").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            negative = isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub)
            minus = isinstance(node, ast.BinOp) and isinstance(node.op, ast.Sub)
            operand = node.operand if negative else node.right if minus else None
            if isinstance(operand, ast.Constant) and operand.value == 100:
                found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert len(found) == 1 and found[0].startswith("trainer/labels.py:"), found


# ---------------------------------------------------------------------------------- real samples


@pytest.mark.shared_data
def test_alpaca_zh_with_qwen_through_the_pipeline():
    """The 1,000 shared alpaca-zh rows with the real Qwen2.5 tokenizer, packed at 512: every sample
    once, whole, each target run ending with <|im_end|>."""
    from transformers import AutoTokenizer

    qwen = AutoTokenizer.from_pretrained(shared_path("qwen2.5-0.5b"))
    src = shared_path("llamafactory-alpaca-zh-demo", "alpaca_zh_demo.json")
    cfg = DataConfig(
        train=[str(src)],
        format="alpaca",
        max_seq_len=512,
        buffer_size=200,
        num_workers=0,
        validation_fraction=0.0,
    )
    data = build_train_data(cfg, qwen, ONE, 0, 4)
    segs = segments(list(data))
    stats = data.end_epoch()
    assert len(segs) == 1000 - stats["no_target_docs"]
    assert sorted(d for d, *_ in segs) == sorted(set(d for d, *_ in segs))
    im_end = qwen.convert_tokens_to_ids("<|im_end|>")
    records = json.loads(Path(src).read_text())
    for doc, ids, labels, _ in segs[:200]:
        targets = np.flatnonzero(labels != IGNORE_INDEX)
        row = records[doc]
        if targets[-1] + 1 < len(ids) or ids[-1] == im_end:  # not truncated
            assert labels[targets[-1]] == im_end
            assert qwen.decode(ids[targets].tolist()) == row["output"] + "<|im_end|>"


@pytest.mark.shared_data
@pytest.mark.parametrize("instruct", [False, True])
def test_qwen_padded_batches_pad_vs_eos(tmp_path, instruct):
    """Qwen2.5 base (pad == eos == <|endoftext|>) and Instruct-style (eos <|im_end|>, pad
    <|endoftext|>): the end token closing each response is a target, padding never is; with no
    chat template the EOS after the response is a target even when it is the pad token."""
    from transformers import AutoTokenizer

    qwen = AutoTokenizer.from_pretrained(shared_path("qwen2.5-0.5b"))
    if instruct:
        qwen.eos_token = "<|im_end|>"
    assert (qwen.pad_token_id == qwen.eos_token_id) is not instruct
    records = json.loads(shared_path("llamafactory-alpaca-zh-demo", "alpaca_zh_demo.json").read_text())[:48]
    path = write_json_records(tmp_path / "a.jsonl", records, lines=True)
    im_end = qwen.convert_tokens_to_ids("<|im_end|>")
    for chat_template in ("auto", "none"):
        cfg = sft_cfg([path], pack=False, max_seq_len=1024, chat_template=chat_template)
        for b in build_train_data(cfg, qwen, ONE, 0, 4):
            for r in range(4):
                n = int(b["attention_mask"][r].sum())
                ids, labels = b["input_ids"][r], b["labels"][r]
                if b["doc_ids"][r, 0] < 0:
                    continue
                assert (labels[n:] == IGNORE_INDEX).all() and (ids[n:] == qwen.pad_token_id).all()
                last = int(np.flatnonzero(labels[:n] != IGNORE_INDEX)[-1])
                if chat_template == "auto":  # ... response<|im_end|> then an unsupervised newline
                    assert ids[last] == im_end and last == n - 2
                else:  # ... response EOS, the sample's last token
                    assert ids[last] == qwen.eos_token_id and last == n - 1
