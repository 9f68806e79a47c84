"""Samples at every eval: a continuation of each ``log.sample_prompts`` prompt by the model being
trained, written to ``<output_dir>/samples.jsonl`` and logged. A smoke test people can read.

Every rank generates (under ZeRO-3 each forward gathers parameters collectively, so the ranks
must run the same forwards: ``synced_gpus``); rank 0 writes. Sampling (top-k 40, temperature
0.8) rather than greedy, because a small, briefly trained model decodes greedily into blank
lines; seeded per step inside a forked RNG, so the text is reproducible and training's own
random state is untouched (a resumed run stays the same run).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from trainer.metrics import Callback

log = logging.getLogger("dstrain")


def generate(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int, seed: int, synced: bool) -> str:
    """A seeded sampled continuation of ``prompt`` (the prompt is not repeated in the result)."""
    device = next(model.parameters()).device
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=True,
            top_k=40,
            temperature=0.8,
            use_cache=True,
            pad_token_id=tokenizer.pad_token_id,
            synced_gpus=synced,
        )
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


class Samples(Callback):
    """After each eval, every rank generates from each prompt; rank 0 writes samples.jsonl."""

    def __init__(
        self, prompts: list[str], max_new_tokens: int, tokenizer: Any, path: Path, seed: int
    ) -> None:
        self.prompts = prompts
        self.max_new_tokens = max_new_tokens
        self.tokenizer = tokenizer
        self.path = path
        self.seed = seed

    def on_train_start(self, trainer: Any) -> None:
        """Drop samples past the step training starts from, as metrics.jsonl does."""
        if trainer.dist.is_main and self.path.is_file():
            kept = [line for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]
            kept = [line for line in kept if json.loads(line)["step"] <= trainer.state.step]
            self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def on_eval(self, trainer: Any, record: dict[str, Any]) -> None:
        engine = trainer.module.engine
        model = engine.module
        synced = bool(engine.zero_optimization_partition_weights()) and trainer.dist.world_size > 1
        was_training = model.training
        model.eval()
        try:
            texts = [
                generate(
                    model,
                    self.tokenizer,
                    prompt,
                    self.max_new_tokens,
                    self.seed + 1000 * record["step"] + i,
                    synced,
                )
                for i, prompt in enumerate(self.prompts)
            ]
        finally:
            model.train(was_training)
        if not trainer.dist.is_main:
            return
        with self.path.open("a", encoding="utf-8") as f:
            for prompt, text in zip(self.prompts, texts, strict=True):
                f.write(
                    json.dumps({"step": record["step"], "prompt": prompt, "text": text}, ensure_ascii=False)
                    + "\n"
                )
                log.info("sample at step %d: %r -> %r", record["step"], prompt, text)
