"""``model.compile: true``: the decoder layers run compiled and train to the same losses as eager.

Compiling on CPU takes tens of seconds, so this file compiles one model (every layer shares one
graph) and runs it with gradient checkpointing on, then off.
"""

from __future__ import annotations

import logging

import torch

from tests.helpers import TINY_OVERRIDES
from trainer.config import build_config
from trainer.labels import IGNORE_INDEX
from trainer.model import build_model
from trainer.tokenizer import load_tokenizer


def train_losses(
    model: torch.nn.Module, batches: list[torch.Tensor], checkpointing: list[bool]
) -> list[float]:
    """AdamW steps on the chunked loss (the trainer's loss-only forward), one per batch."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for ids, ckpt in zip(batches, checkpointing, strict=True):
        if not ckpt:
            model.activation_checkpointing_disable()
        shifted = torch.cat([ids[:, 1:], torch.full((ids.shape[0], 1), IGNORE_INDEX)], dim=1).flatten()
        loss = model(input_ids=ids, shifted_labels=shifted) / (shifted != IGNORE_INDEX).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_compiled_layers_train_to_the_eager_losses(tiny_tokenizer_dir, caplog):
    import torch._dynamo.utils as dynamo_utils

    tok = load_tokenizer(str(tiny_tokenizer_dir))
    overrides = {**TINY_OVERRIDES, "num_hidden_layers": 3}
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(1, len(tok), (2, 24), generator=g) for _ in range(5)]
    # The recipes' default: gradient checkpointing on; then off for the last two steps.
    checkpointing = [True, True, True, False, False]
    losses = {}
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    for compiled in (False, True):
        job = build_config(
            base={
                "tokenizer": str(tiny_tokenizer_dir),
                "model": {"overrides": overrides, "compile": compiled, "gradient_checkpointing": True},
            }
        )
        with caplog.at_level(logging.INFO, logger="dstrain"):
            model = build_model(job, tok, "fp32", on_gpu=False).train()
        losses[compiled] = train_losses(model, batches, checkpointing)

    assert "model.compile: torch.compile on each of the 3 decoder layers" in caplog.text
    # The layers really ran compiled: one graph for all three, nothing left to eager by a break.
    assert dynamo_utils.counters["stats"]["unique_graphs"] == 1, dict(dynamo_utils.counters["stats"])
    assert not dynamo_utils.counters["graph_break"], dict(dynamo_utils.counters["graph_break"])
    for step, (eager, comp) in enumerate(zip(losses[False], losses[True], strict=True)):
        assert abs(eager - comp) < 1e-5, (step, losses)
