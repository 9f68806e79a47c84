"""Shared fixtures: a tiny tokenizer, generated parquet with traceable doc ids, ../shared."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_DATA = SHARED / "data"
# The architecture every tiny test model uses (hidden 64, 2 layers).
TINY_OVERRIDES = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
}
WORDS = "the of and to in is was for on that with as by at from his her an which are this be".split()


def shared_path(*parts: str) -> Path:
    """A path under ../shared/data, or a clean skip when the checkout has no ../shared."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is not available (../shared is absent)")
    return path


def make_docs(n: int, seed: int = 0, min_words: int = 5, max_words: int = 60) -> list[str]:
    rng = random.Random(seed)
    return [
        f"doc {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words)))
        for i in range(n)
    ]


def write_parquet(path: Path, docs: list[str], first_id: int = 0, row_group_size: int = 32) -> Path:
    ids = pa.array(range(first_id, first_id + len(docs)), pa.int64())
    pq.write_table(pa.table({"doc_id": ids, "text": pa.array(docs)}), path, row_group_size=row_group_size)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A 512-token byte-level BPE trained on generated text, saved as an HF tokenizer dir."""
    from trainer.tokenizer import train_bpe_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_bpe_tokenizer(make_docs(400, seed=1), out, vocab_size=512)
    return out


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """One parquet file of 600 short documents with a traceable doc_id column."""
    out = tmp_path_factory.mktemp("corpus")
    return write_parquet(out / "train.parquet", make_docs(600, seed=2))
