"""Generate a short sample from an exported model: a smoke test people can read."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def generate_text(model_dir: str | Path, prompt: str, max_new_tokens: int = 48, seed: int = 0) -> str:
    """A sampled continuation of ``prompt`` (top-k 40, temperature 0.8, seeded, so the same
    model gives the same text) by the model in ``model_dir``, loaded on the CPU. Sampling
    rather than greedy: a small, briefly trained model decodes greedily into blank lines."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    inputs = tokenizer(prompt, return_tensors="pt")
    torch.manual_seed(seed)
    with torch.no_grad():
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=True,
            top_k=40,
            temperature=0.8,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(output[0], skip_special_tokens=True)
