"""Samples at every eval: a continuation of each ``log.sample_prompts`` prompt by the model being
trained, written to ``<output_dir>/samples.jsonl`` and logged. A smoke test people can read.

Every rank generates (under ZeRO-3 each forward gathers parameters collectively, so the ranks
must run the same forwards: ``synced_gpus``); rank 0 writes. A small, briefly trained model
decodes greedily, and even when sampled, into its most frequent tokens: runs of newlines and
indentation, a sample of blank lines. So the samples are drawn with top-k 40, temperature 0.8, a
repetition penalty of 1.2, and at most :data:`MAX_NEWLINES` newlines (or :data:`MAX_BLANK_TOKENS`
whitespace tokens) in a row, after which only a token with a visible character may follow; no
end-of-text before :data:`MIN_NEW_TOKENS`. Seeded per step inside a forked RNG, so the text is reproducible and training's own random state is
untouched (a resumed run stays the same run).

``python -m trainer.generate RUN_DIR`` prints the newest samples of a run (the demo ends with it).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from trainer.callback import Callback
from trainer.errors import DataError, DstrainError, user_error
from trainer.jsonl import keep_through_step, read_jsonl

log = logging.getLogger("dstrain")


TOP_K = 40
TEMPERATURE = 0.8
REPETITION_PENALTY = 1.2
MAX_NEWLINES = 2  # a blank line is allowed, a run of them is not
MAX_BLANK_TOKENS = 4  # nor a run of whitespace-only tokens without newlines (tabs, spaces)
MIN_NEW_TOKENS = 8


def blank_tokens(tokenizer: Any) -> dict[int, int]:
    """The ids of the tokens that hold no visible character, each with its count of newlines."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return {i: text.count("\n") for i, text in enumerate(texts) if text and not text.strip()}


class NoBlankRuns(LogitsProcessor):
    """Once the continuation ends in a run of whitespace-only tokens that holds ``max_newlines``
    newlines or ``max_tokens`` tokens, forbid every such token: the next one must write something."""

    def __init__(
        self,
        blank: dict[int, int],
        prompt_length: int,
        max_newlines: int = MAX_NEWLINES,
        max_tokens: int = MAX_BLANK_TOKENS,
    ) -> None:
        self.newlines = blank  # token id -> newlines in it, for the whitespace-only tokens
        self.prompt_length = prompt_length
        self.max_newlines = max_newlines
        self.max_tokens = max_tokens
        self.blank_ids = torch.tensor(sorted(blank), dtype=torch.long)

    def run_too_long(self, ids: list[int]) -> bool:
        """Whether the whitespace-only tokens at the end of ``ids`` already make a long run."""
        tokens = newlines = 0
        for token_id in reversed(ids):
            if token_id not in self.newlines:
                break
            tokens += 1
            newlines += self.newlines[token_id]
        return newlines >= self.max_newlines or tokens >= self.max_tokens

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row in range(input_ids.shape[0]):
            if self.run_too_long(input_ids[row, self.prompt_length :].tolist()):
                scores[row, self.blank_ids.to(scores.device)] = -float("inf")
        return scores


def generate(
    model: Any,
    tokenizer: Any,
    prompt: str,
    max_new_tokens: int,
    seed: int,
    synced: bool,
    blank: dict[int, int] | None = None,
) -> str:
    """A seeded sampled continuation of ``prompt`` (the prompt is not repeated in the result).
    ``blank``: :func:`blank_tokens` of the tokenizer, when the caller keeps it between calls."""
    device = next(model.parameters()).device
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    prompt_length = inputs["input_ids"].shape[1]
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min(MIN_NEW_TOKENS, max_new_tokens),
            do_sample=True,
            top_k=TOP_K,
            temperature=TEMPERATURE,
            repetition_penalty=REPETITION_PENALTY,
            logits_processor=LogitsProcessorList(
                [NoBlankRuns(blank or blank_tokens(tokenizer), prompt_length)]
            ),
            use_cache=True,
            pad_token_id=tokenizer.pad_token_id,
            synced_gpus=synced,
        )
    return tokenizer.decode(output[0, prompt_length:], skip_special_tokens=True)


@dataclass(eq=False)
class Samples(Callback):
    """After each eval, every rank generates from each prompt; rank 0 writes samples.jsonl."""

    prompts: list[str]
    max_new_tokens: int
    tokenizer: Any
    path: Path
    seed: int  # sample i at step s draws with seed + 1000 * s + i

    def __post_init__(self) -> None:
        self.blank = blank_tokens(self.tokenizer)

    def on_train_start(self, trainer: Any) -> None:
        """Drop samples past the step training starts from, as metrics.jsonl does."""
        if trainer.dist.is_main:
            keep_through_step(self.path, trainer.state.step)

    def on_eval(self, trainer: Any, record: dict[str, Any]) -> None:
        engine = trainer.module.engine
        model = engine.module
        synced = bool(engine.zero_optimization_partition_weights()) and trainer.dist.world_size > 1
        was_training = model.training
        model.eval()
        # Generate in the training precision: bf16 runs keep fp32 parameters and 16-bit matmuls
        # under DeepSpeed's autocast (flash-attention refuses fp32 inputs).
        from deepspeed.runtime.torch_autocast import autocast_if_enabled

        try:
            with autocast_if_enabled(engine):
                texts = [
                    generate(
                        model,
                        self.tokenizer,
                        prompt,
                        self.max_new_tokens,
                        self.seed + 1000 * record["step"] + i,
                        synced,
                        self.blank,
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


def show_samples(run_dir: Path) -> str:
    """The newest step's prompts and samples of a run, laid out for a person to read."""
    path = run_dir / "samples.jsonl"
    if not path.is_file():
        raise DataError(f"{run_dir}: no samples.jsonl there (log.sample_prompts writes it at each eval)")
    records = read_jsonl(path).records
    if not records:
        raise DataError(f"{path} holds no samples yet")
    step = max(r["step"] for r in records)
    rule = "-" * 72
    parts = [f"Samples of the model at step {step} ({path}):"]
    for r in (r for r in records if r["step"] == step):
        parts += [rule, "prompt:", r["prompt"].rstrip("\n"), rule, "the model's continuation:", r["text"]]
    parts.append(rule)
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m trainer.generate", description="Print the newest samples a run wrote at its evals."
    )
    parser.add_argument("run_dir", type=Path, help="The run's output_dir.")
    args = parser.parse_args(argv)
    try:
        print(show_samples(args.run_dir))
    except DstrainError as err:
        return user_error(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
