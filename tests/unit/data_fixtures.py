"""Helpers for the data-pipeline tests: a tiny BPE tokenizer and generated parquet/json corpora.

Every generated document has a traceable integer ``doc_id`` (parquet column / json field), so
tests can check coverage and order from the ``doc_ids`` tensor of the batches.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

WORDS = (
    "the of and to in is was for on that with as by at from his her an which are this be "
    "river stone light cloud north garden silver engine paper window market winter"
).split()
EOS = "<|endoftext|>"
REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"


def make_docs(n: int, seed: int = 0, min_words: int = 3, max_words: int = 40) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) for _ in range(n)]


def write_corpus(
    out_dir: Path,
    num_files: int,
    docs_per_file: int,
    row_group_size: int = 16,
    seed: int = 0,
    first_id: int = 1000,
) -> list[Path]:
    """``num_files`` parquet files with ``doc_id`` (``first_id``...) and ``text`` columns."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, next_id = [], first_id
    for f in range(num_files):
        docs = make_docs(docs_per_file, seed=seed * 1000 + f)
        ids = pa.array(range(next_id, next_id + len(docs)), pa.int64())
        path = out_dir / f"part-{f:03d}.parquet"
        pq.write_table(pa.table({"doc_id": ids, "text": pa.array(docs)}), path, row_group_size=row_group_size)
        paths.append(path)
        next_id += len(docs)
    return paths


def write_json_records(path: Path, records: list[dict[str, Any]], lines: bool) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        if lines:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        else:
            json.dump(records, f, ensure_ascii=False, indent=1)
    return path


def train_tokenizer_file(out_dir: Path, vocab_size: int = 384) -> Path:
    """Train a byte-level BPE on generated text (trainer.tokenizer's trainer); return its tokenizer.json."""
    from trainer.tokenizer import train_bpe_tokenizer

    train_bpe_tokenizer(make_docs(300, seed=99), out_dir, vocab_size=vocab_size)
    return out_dir / "tokenizer.json"


def load_tokenizer(tokenizer_file: Path, with_eos: bool = True):
    from transformers import PreTrainedTokenizerFast

    kwargs = {"eos_token": EOS} if with_eos else {}
    return PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), **kwargs)
