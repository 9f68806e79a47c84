"""``dstrain data``: convert, split, sample, inspect, tokenize (trainer/data/tools*.py)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import make_docs, shared_path, write_parquet
from trainer.data.sharding import held_out
from trainer.data.tools import main, normalized_hashes
from trainer.data.tools_io import iter_json_array
from trainer.errors import DataError

# Texts that trip naive readers: commas, quotes, newlines, non-ASCII.
TRICKY = ["plain", 'a, "quoted", b', "two\nlines", "中文，标点。", "  padded  "]


def _records(n: int) -> list[dict]:
    docs = make_docs(n - len(TRICKY), seed=5) + TRICKY
    return [{"completion": d, "title": f"t{i}", "score": i * 0.5} for i, d in enumerate(docs)]


def _write(path: Path, records: list[dict], fmt: str) -> Path:
    if fmt == "json":
        path.write_text(json.dumps(records, ensure_ascii=False, indent=1))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    else:
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
    return path


def _row_group_sizes(path: Path) -> list[int]:
    meta = pq.ParquetFile(path).metadata
    return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


# ----------------------------------------------------------------------------- convert


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv"])
def test_convert_to_parquet(tmp_path, fmt):
    records = _records(47)
    src = _write(tmp_path / f"in.{fmt}", records, fmt)
    out = tmp_path / "out.parquet"
    argv = ["convert", str(src), str(out), "--text-column", "completion", "--row-group-size", "10"]
    assert main([*argv, "--keep-columns", "title"]) == 0
    assert _row_group_sizes(out) == [10, 10, 10, 10, 7]
    table = pq.read_table(out)
    assert table.column_names == ["doc_id", "text", "title"]
    assert table.schema.field("doc_id").type == pa.int64()
    assert table["doc_id"].to_pylist() == list(range(47))
    assert table["text"].to_pylist() == [r["completion"] for r in records]
    assert table["title"].to_pylist() == [r["title"] for r in records]


def test_convert_parquet_keeps_doc_id_and_detects_text_column(tmp_path):
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"doc_id": pa.array([7, 3, 9]), "content": ["a", "b", "c"]}), src)
    out = tmp_path / "out.parquet"
    assert main(["convert", str(src), str(out), "--out-column", "body"]) == 0  # finds "content"
    table = pq.read_table(out)
    assert table.to_pydict() == {"doc_id": [7, 3, 9], "body": ["a", "b", "c"]}


def test_convert_bad_rows_name_file_and_line(tmp_path, capsys):
    lines = [json.dumps({"text": f"doc {i}"}) for i in range(6)]
    lines[2] = '{"text": "broken'  # line 3: invalid JSON
    lines[4] = json.dumps({"title": "no text"})  # line 5: missing field
    src = tmp_path / "bad.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.parquet"
    with pytest.raises(DataError, match=r"bad\.jsonl: line 3: invalid JSON.*--skip-bad"):
        from trainer.data.tools import convert

        convert(src, out)
    assert main(["convert", str(src), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.jsonl: line 3" in err
    assert not out.exists()  # no half-written output

    assert main(["convert", str(src), str(out), "--skip-bad"]) == 0
    assert "skipped 2 bad row(s)" in capsys.readouterr().err
    assert pq.read_table(out)["doc_id"].to_pylist() == [0, 1, 3, 5]  # ids keep the input position

    src2 = tmp_path / "bad.json"
    src2.write_text('[{"text": "a"},\n {"text": "b"},\n {"body": "c"}]')
    with pytest.raises(DataError, match=r"bad\.json: line 3: missing field 'text'"):
        convert(src2, out)


def test_json_array_reader_across_chunk_boundaries(tmp_path):
    values = [{"text": 'é"\\' * (i % 5), "n": -(10**i), "f": 1.25e-3, "l": [True, None]} for i in range(30)]
    values += [123456789, "s", 3.5, None, []]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(values, indent=2, ensure_ascii=False))
    for chunk_chars in (1, 3, 17, 1 << 20):
        assert [r.value for r in iter_json_array(path, chunk_chars=chunk_chars)] == values
    lines = path.read_text().splitlines()
    record = list(iter_json_array(path, chunk_chars=5))[3]
    assert lines[record.line - 1].strip() == "{"


def test_module_entry_point(tmp_path):
    src = _write(tmp_path / "in.jsonl", [{"text": "hello"}], "jsonl")
    out = tmp_path / "out.parquet"
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.data.tools", "convert", str(src), str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert pq.read_table(out)["text"].to_pylist() == ["hello"]


def test_user_errors_exit_2_through_the_real_cli(tmp_path):
    """``dstrain data`` exits 2 on every user error, with one ``error:`` line and no traceback (the
    README's exit codes): bad arguments, a missing input, a missing column, an unwritable output."""
    import os

    from tests.helpers import REPO

    dstrain = Path(sys.executable).with_name("dstrain")
    src = _write(tmp_path / "in.json", _records(6), "json")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cases = [
        (
            ["convert", str(tmp_path / "missing.json"), str(tmp_path / "o.parquet")],
            "missing.json: no such file",
        ),
        (["convert", str(src), str(tmp_path / "o.parquet"), "--text-column", "nope"], "no column 'nope'"),
        (["convert", str(src), str(blocker / "o.parquet")], "a-file"),  # OSError: not a directory
        (
            ["sample", str(src), str(tmp_path / "s.parquet"), "--n", "2", "--row-group-size", "0"],
            "--row-group-size",
        ),
        (["split", str(src), "--out-dir", str(tmp_path / "sp"), "--validation-fraction", "1.5"], "(0, 1)"),
        (["convert", str(src)], "required: output"),  # argparse's own usage error
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for argv, needle in cases:
        proc = subprocess.run(
            [str(dstrain), "data", *argv], capture_output=True, text=True, env=env, timeout=120
        )
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2, (argv, proc.stderr)
        assert "Traceback" not in proc.stderr and "error: " in last and needle in last, (argv, proc.stderr)


# ----------------------------------------------------------------------------- split


def test_split_disjoint_complete_deterministic(tmp_path):
    src = write_parquet(tmp_path / "in.parquet", make_docs(1000, seed=3), first_id=100, row_group_size=64)
    for out in ("a", "b", "c"):
        seed = 7 if out != "c" else 8
        argv = [
            "split",
            str(src),
            "--out-dir",
            str(tmp_path / out),
            "--validation-fraction",
            "0.2",
            "--seed",
            str(seed),
        ]
        assert main(argv) == 0
    train = pq.read_table(tmp_path / "a" / "train.parquet")
    val = pq.read_table(tmp_path / "a" / "validation.parquet")
    train_ids, val_ids = set(train["doc_id"].to_pylist()), set(val["doc_id"].to_pylist())
    assert not train_ids & val_ids
    assert train_ids | val_ids == set(range(100, 1100))
    assert 150 <= len(val_ids) <= 250
    # The trainer's own held-out rule (data.validation: null), so both hold out the same rows.
    expected = {100 + i for i in np.flatnonzero(held_out(np.arange(1000), 0.2, 7))}
    assert val_ids == expected
    assert pq.read_table(tmp_path / "b" / "validation.parquet").equals(val)
    assert set(pq.read_table(tmp_path / "c" / "validation.parquet")["doc_id"].to_pylist()) != val_ids
    assert train["doc_id"].to_pylist() == sorted(train_ids)  # input order kept


# ----------------------------------------------------------------------------- sample


def test_sample_exact_count(tmp_path, capsys):
    src = write_parquet(tmp_path / "in.parquet", make_docs(500, seed=4), row_group_size=50)
    for name in ("a", "b"):
        assert (
            main(
                ["sample", str(src), str(tmp_path / f"{name}.parquet"), "--n", "123", "--seed", "1", "--json"]
            )
            == 0
        )
    report = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert report["before"]["rows"] == 500 and report["after"]["rows"] == 123
    ids = pq.read_table(tmp_path / "a.parquet")["doc_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 123 and ids == sorted(ids)
    assert pq.read_table(tmp_path / "b.parquet").equals(pq.read_table(tmp_path / "a.parquet"))
    assert main(["sample", str(src), str(tmp_path / "c.parquet"), "--fraction", "0.1"]) == 0
    assert pq.ParquetFile(tmp_path / "c.parquet").metadata.num_rows == 50


def test_sample_smart_dedups_and_keeps_every_length_bucket(tmp_path, capsys):
    rng = np.random.default_rng(0)
    docs = []
    for i in range(400):  # mostly 64-511 characters
        docs.append(f"doc {i} " + "word " * int(rng.integers(12, 100)))
    docs += [f"short {i}" for i in range(5)]  # rare bucket: < 64 characters
    docs += [f"long {i} " + "x" * 3000 for i in range(3)]  # rare bucket: 2048-4095 characters
    docs += [docs[0], docs[1].upper(), "  " + docs[2].replace(" ", "\t") + " ", docs[400]]  # 4 duplicates
    src = write_parquet(tmp_path / "in.parquet", docs, row_group_size=100)
    out = tmp_path / "out.parquet"
    assert main(["sample", str(src), str(out), "--n", "60", "--smart", "--seed", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["duplicates_removed"] == 4
    kept = pq.read_table(out)["text"]
    assert len(kept) == 60
    assert len(set(normalized_hashes(kept).tolist())) == 60
    buckets = {b["chars"]: b for b in report["buckets"]}
    assert set(buckets) == {"0-63", "64-127", "128-255", "256-511", "2048-4095"}
    assert all(b["after"] >= 1 for b in buckets.values())
    # The big buckets keep their share (within one row of proportional).
    unique_rows = len(docs) - 4
    for b in buckets.values():
        assert abs(b["after"] - 60 * b["before"] / unique_rows) <= 2


# ----------------------------------------------------------------------------- inspect


def test_inspect_json_numbers(tmp_path, tiny_tokenizer_dir, capsys):
    from transformers import AutoTokenizer

    docs = make_docs(300, seed=6)
    src = write_parquet(tmp_path / "in.parquet", docs, row_group_size=40)
    argv = ["inspect", str(src), "--tokenizer", str(tiny_tokenizer_dir), "--json", "--max-seq-len", "64"]
    argv += ["--micro-batch-size", "2", "--grad-accum", "3", "--world-size", "2", "--step-seconds", "36"]
    assert main([*argv, "--sample-rows", "1000"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert (r["rows"], r["row_groups"], r["pretokenized"]) == (300, 8, False)
    assert r["columns"] == {"doc_id": "int64", "text": "string"}
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tokens = sum(len(x) for x in tok(docs, add_special_tokens=False)["input_ids"])
    assert r["estimated_total_tokens"] == tokens  # every row sampled: exact
    e = r["epoch"]
    assert e["sequences"] == (tokens + 300) // 64  # one EOS per document
    assert e["steps"] == e["sequences"] // (2 * 3 * 2)
    assert e["tokens_per_step"] == 2 * 3 * 2 * 64
    assert e["hours"] == round(e["steps"] * 36 / 3600, 3)
    assert main([*argv, "--sample-rows", "50"]) == 0  # sampled: an estimate near the truth
    r = json.loads(capsys.readouterr().out)
    assert r["tokens"]["sampled_rows"] == 50
    assert abs(r["estimated_total_tokens"] - tokens) < 0.1 * tokens


# ----------------------------------------------------------------------------- tokenize


def test_tokenize_two_workers_matches_tokenizer(tmp_path, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    from trainer.data.sources import describe_file

    docs_a, docs_b = make_docs(90, seed=7), make_docs(50, seed=8)
    a = write_parquet(tmp_path / "a.parquet", docs_a, first_id=1000, row_group_size=16)
    b = tmp_path / "b.parquet"  # no doc_id column: ids are the global row index (90..139)
    pq.write_table(pa.table({"text": docs_b}), b, row_group_size=16)
    out = tmp_path / "tok"
    argv = ["tokenize", str(a), str(b), "--tokenizer", str(tiny_tokenizer_dir), "--out-dir", str(out)]
    assert main([*argv, "--workers", "2", "--rows-per-shard", "40", "--row-group-size", "15"]) == 0

    shards = sorted(out.glob("part-*.parquet"))
    assert [pq.ParquetFile(p).metadata.num_rows for p in shards] == [40, 40, 40, 20]
    assert _row_group_sizes(shards[0]) == [15, 15, 10]
    table = pq.read_table(shards)
    assert table.schema.field("input_ids").type == pa.list_(pa.int32())
    assert table.schema.field("doc_id").type == pa.int64()
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    ids = tok(docs_a + docs_b, add_special_tokens=False)["input_ids"]
    expected = dict(zip([*range(1000, 1090), *range(90, 140)], ids, strict=True))
    got = dict(zip(table["doc_id"].to_pylist(), table["input_ids"].to_pylist(), strict=True))
    assert got == expected  # raw ids: no BOS/EOS added

    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["rows"] == 140
    assert manifest["tokens"] == sum(len(x) for x in expected.values())
    assert manifest["tokenizer"]["vocab_size"] == len(tok)
    assert manifest["tokenizer"]["eos_token_id"] == tok.eos_token_id
    assert describe_file(shards[0], "text").tokenized  # the loader reads them as token ids
    assert main(argv) == 2  # refuses to mix with existing shards unless --overwrite


@pytest.mark.shared_data
def test_real_zhwiki_convert_and_tokenize(tmp_path):
    from transformers import AutoTokenizer

    src = shared_path("zhwiki-sample", "wikipedia-cn-sample.json")
    tokenizer_dir = shared_path("qwen2.5-0.5b")
    out = tmp_path / "zh.parquet"
    assert (
        main(["convert", str(src), str(out), "--text-column", "completion", "--keep-columns", "title"]) == 0
    )
    table = pq.read_table(out)
    assert table.num_rows == 1104 and table.column_names == ["doc_id", "text", "title"]
    argv = ["tokenize", str(out), "--tokenizer", str(tokenizer_dir), "--out-dir", str(tmp_path / "tok")]
    assert main([*argv, "--workers", "0", "--max-rows", "40"]) == 0
    got = pq.read_table(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert (
        got["input_ids"].to_pylist()
        == tok(table["text"].to_pylist()[:40], add_special_tokens=False)["input_ids"]
    )
    assert got["doc_id"].to_pylist() == list(range(40))
