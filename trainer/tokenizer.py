"""Tokenizers: load one (local dir or hub id), or train a byte-level BPE from text."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from trainer.errors import ConfigError

EOS = "<|endoftext|>"


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> Any:
    """A fast tokenizer from a local dir or a hub id; pad falls back to EOS (masked by labels).
    ``trust_remote_code`` (``model.trust_remote_code``) allows a tokenizer's own Python code.
    Hub credentials come from the environment (``HF_TOKEN``), never from a recipe."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"--tokenizer {name_or_path!r} could not be loaded: {first}") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def train_bpe_tokenizer(
    texts: Iterable[str], out_dir: str | Path, vocab_size: int = 8192
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (GPT-2/Qwen style, no unknown tokens) and save it loadable by
    ``AutoTokenizer.from_pretrained(out_dir)``, with ``<|endoftext|>`` as EOS and pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)
    fast.save_pretrained(str(out_dir))
    return fast
