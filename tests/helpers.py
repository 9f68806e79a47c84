"""What every test builds on: paths, generated corpora with traceable doc ids, a tiny BPE
tokenizer and a tiny model. Launching processes lives in :mod:`tests.launch`; pytest
fixtures live in ``conftest.py`` and call these functions.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
EOS = "<|endoftext|>"
# The architecture every tiny test model uses (hidden 64, 2 layers).
TINY_OVERRIDES = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
}
WORDS = (
    "the of and to in is was for on that with as by at from his her an which are this be "
    "river stone light cloud north garden silver engine paper window market winter"
).split()


def shared_path(*parts: str) -> Path:
    """A path under ../shared/data, or a clean skip when the checkout has no ../shared.

    Tests that call this carry ``@pytest.mark.shared_data`` (conftest checks it), so
    ``-m "not shared_data"`` selects exactly the tests a clean checkout runs in full.
    """
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is not available (../shared is absent)")
    return path


def make_docs(
    n: int, seed: int = 0, min_words: int = 5, max_words: int = 60, numbered: bool = True
) -> list[str]:
    """``n`` random documents; ``numbered`` starts each with ``doc <i>:`` (readable in samples)."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words)))
        docs.append(f"doc {i}: {text}" if numbered else text)
    return docs


def write_parquet(path: Path, docs: list[str], first_id: int = 0, row_group_size: int = 32) -> Path:
    """One parquet file with ``doc_id`` (``first_id``...) and ``text`` columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    ids = pa.array(range(first_id, first_id + len(docs)), pa.int64())
    pq.write_table(pa.table({"doc_id": ids, "text": pa.array(docs)}), path, row_group_size=row_group_size)
    return path


def write_corpus(
    out_dir: Path,
    num_files: int,
    docs_per_file: int,
    row_group_size: int = 16,
    seed: int = 0,
    first_id: int = 1000,
) -> list[Path]:
    """``num_files`` parquet files ``part-NNN.parquet`` with consecutive doc ids from ``first_id``."""
    paths, next_id = [], first_id
    for f in range(num_files):
        docs = make_docs(docs_per_file, seed=seed * 1000 + f, min_words=3, max_words=40, numbered=False)
        paths.append(write_parquet(out_dir / f"part-{f:03d}.parquet", docs, next_id, row_group_size))
        next_id += len(docs)
    return paths


def write_json_records(path: Path, records: list[dict[str, Any]], lines: bool) -> Path:
    """``records`` as JSON lines (``lines``) or as one JSON array."""
    with open(path, "w", encoding="utf-8") as f:
        if lines:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        else:
            json.dump(records, f, ensure_ascii=False, indent=1)
    return path


def train_tokenizer(out_dir: Path, vocab_size: int = 512, seed: int = 1) -> Path:
    """A byte-level BPE trained on generated text with ``trainer.tokenizer``; returns its dir."""
    from trainer.tokenizer import train_bpe_tokenizer

    train_bpe_tokenizer(make_docs(400, seed=seed), out_dir, vocab_size=vocab_size)
    return out_dir


def load_tokenizer_file(tokenizer_file: Path, with_eos: bool = True):
    """A fast tokenizer from a ``tokenizer.json`` alone, with or without an EOS token."""
    from transformers import PreTrainedTokenizerFast

    kwargs = {"eos_token": EOS} if with_eos else {}
    return PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), **kwargs)


def tiny_model(seed: int = 0, vocab_size: int = 128):
    """Qwen2 architecture, hidden 64, 2 layers, fp32, sdpa: the shape every engine test uses."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        **TINY_OVERRIDES,
        vocab_size=vocab_size,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        use_cache=False,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)


# ChatML, as Qwen writes it, with {% generation %} around what the assistant produces: the
# assistant text and <|im_end|>, not the newline after it (see trainer/data/formatting.py).
CHATML = (
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ m.content + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{%- else %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)

# DeepSeek-R1-Distill-Qwen's chat template (drops the text before </think> of assistant turns)
# and its special tokens.
R1_TEMPLATE = REPO / "tests" / "fixtures" / "deepseek_r1_distill_qwen.jinja"
R1_TOKENS = [
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    "<｜User｜>",
    "<｜Assistant｜>",
    "<think>",
    "</think>",
]


def words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def alpaca_records(n: int, seed: int = 0) -> list[dict]:
    """Alpaca rows of varied length; every 7th has an input, every 5th a one-turn history."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        rec = {"instruction": f"q{i} " + words(rng, 1, 12), "input": "", "output": words(rng, 1, 20)}
        if i % 7 == 0:
            rec["input"] = words(rng, 1, 6)
        if i % 5 == 0:
            rec["history"] = [[words(rng, 1, 4), words(rng, 1, 4)]]
        out.append(rec)
    return out


def save_chat_base(out_dir: Path, tokenizer_dir: Path, seed: int = 3) -> Path:
    """A stand-in for pretrained chat weights: the tiny model and the tiny BPE with ChatML turn
    markers and template, saved as one HF dir (what ``model.name_or_path`` points at)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    tok.save_pretrained(out_dir)
    tiny_model(seed=seed, vocab_size=-(-len(tok) // 64) * 64).save_pretrained(out_dir)
    return out_dir
