"""Tokenize: text -> token ids, the one definition both the loader and ``dstrain data tokenize`` use.

Documents are encoded without special tokens (``add_special_tokens=False``); when packing, the
loader appends EOS to every document itself, for raw text and pre-tokenized shards alike.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from trainer.errors import DataError


def encode_texts(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens added (a batched call of a fast tokenizer).

    A fast tokenizer with no truncation or padding configured is called through its Rust
    backend (``encode_batch_fast``): the same ids as ``tokenizer(...)`` without the Python
    wrapper, which cost about 20% of the pipeline's throughput (scripts/bench_data.py, a vs a-hf).
    """
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        return [enc.ids for enc in backend.encode_batch_fast(list(texts), add_special_tokens=False)]
    out = tokenizer(list(texts), add_special_tokens=False, return_attention_mask=False)
    return out["input_ids"]


def eos_id(tokenizer: Any, pack: bool) -> int | None:
    """The EOS id; packing needs one to separate documents, so its absence is a DataError."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None and pack:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(
            f"tokenizer {name!r} has no eos_token; packing joins documents with EOS: "
            "set tokenizer.eos_token (eos_token in tokenizer_config.json) or use --data.pack false"
        )
    return eos


def pad_id(tokenizer: Any) -> int:
    """The id put in padded positions (labels there are always IGNORE_INDEX): pad, else EOS, else 0."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of the tokenizer's vocabulary and rules (changes the token stream when it changes)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        blob = backend.to_str()
    else:
        blob = f"{type(tokenizer).__name__}:{len(tokenizer)}"
    blob += f"|eos={getattr(tokenizer, 'eos_token_id', None)}"
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()[:16]
