"""Shared fixtures: a tiny tokenizer and generated parquet with traceable doc ids.

The functions behind them live in :mod:`tests.helpers`; process launching in :mod:`tests.launch`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import SHARED_DATA, make_docs, train_tokenizer, write_parquet


def pytest_collection_modifyitems(config, items):
    """A test that reads ../shared/data must say so with ``@pytest.mark.shared_data`` (one of its
    parametrizations, at least), so ``-m "not shared_data"`` is what a clean checkout runs."""
    marked = {item.originalname for item in items if item.get_closest_marker("shared_data")}
    for item in items:
        source = getattr(item.function, "__code__", None)
        uses_shared = source is not None and "shared_path" in (*source.co_names, *source.co_varnames)
        if uses_shared and item.originalname not in marked:
            raise pytest.UsageError(f"{item.nodeid} calls shared_path() without @pytest.mark.shared_data")


def pytest_report_header(config):
    return f"shared data: {SHARED_DATA} ({'present' if SHARED_DATA.is_dir() else 'absent: shared_data tests skip'})"


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A 512-token byte-level BPE trained on generated text, saved as an HF tokenizer dir."""
    return train_tokenizer(tmp_path_factory.mktemp("tokenizer"), vocab_size=512)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """One parquet file of 600 short documents with a traceable doc_id column."""
    out = tmp_path_factory.mktemp("corpus")
    return write_parquet(out / "train.parquet", make_docs(600, seed=2))
