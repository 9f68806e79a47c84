"""Real 2-rank DeepSpeed on CPU (gloo): ZeRO 0-3 agree with each other and with plain torch,
grad accumulation does not change the step, and the HF export reproduces the engine's logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.distributed.workers.common import global_rows, padded_batch, tiny_job
from tests.helpers import REPO, tiny_model
from tests.launch import read_results, run_deepspeed
from trainer.optim import build_optimizer, make_scheduler

pytestmark = pytest.mark.distributed
WORLD = 2
STEPS = 10


@pytest.fixture(scope="module")
def engine_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("engine")
    run_deepspeed(WORLD, REPO / "tests/distributed/workers/engine_checks.py", [str(out)])
    return out, read_results(out, WORLD)


def reference_losses() -> list[float]:
    """A plain single-process torch loop over the same global batches (both ranks' rows)."""
    job = tiny_job(stage=0, micro=2, accum=2, steps=STEPS)
    model = tiny_model(seed=0)
    optimizer = build_optimizer(model, job.optim)
    scheduler = make_scheduler(optimizer, STEPS, job.schedule)
    losses = []
    for step in range(STEPS):
        rows = [r for rank_rows in global_rows(step, WORLD, 4) for r in rank_rows]
        batch = padded_batch(rows)
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
        ).logits
        labels = batch["labels"][:, 1:]
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100
        )
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), job.optim.max_grad_norm)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return losses


def test_zero_stages_agree_with_each_other_and_plain_torch(engine_results):
    _, results = engine_results
    losses = results[0]["losses"]
    assert results[1]["losses"] == losses, "every rank reports the same all-reduced loss"
    reference = reference_losses()
    assert reference[-1] < reference[0] - 0.1, "the reference loop must actually learn"
    for stage in ("0", "1", "2", "3"):
        assert len(losses[stage]) == STEPS
        for step, (got, want) in enumerate(zip(losses[stage], reference, strict=True)):
            assert abs(got - want) <= 1e-5, f"ZeRO-{stage} step {step}: {got} vs torch {want}"


def test_grad_accum_split_does_not_change_the_step(engine_results):
    _, results = engine_results
    losses = results[0]["losses"]
    for step, (a, b) in enumerate(zip(losses["m4a1"], losses["m1a4"], strict=True)):
        assert abs(a - b) <= 1e-5, f"step {step}: micro4xaccum1 {a} vs micro1xaccum4 {b}"
    assert results[0]["accum_weight_maxdiff"] <= 1e-5


def test_zero3_export_reproduces_engine_logits(engine_results):
    from transformers import AutoModelForCausalLM

    out, _ = engine_results
    model = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32).eval()
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == sum(p.numel() for p in tiny_model().parameters())
    probe = torch.arange(1, 17).view(2, 8)
    with torch.no_grad():
        logits = model(input_ids=probe).logits
    engine_logits = torch.load(out / "engine_logits.pt")
    assert torch.allclose(logits, engine_logits, atol=1e-5), (logits - engine_logits).abs().max()
    untrained = tiny_model()(input_ids=probe).logits
    assert (untrained - engine_logits).abs().max() > 1e-3, "export must hold the trained weights"


def test_muon_runs_as_deepspeeds_muon_and_learns(engine_results):
    _, results = engine_results
    assert "Muon" in results[0]["muon_optimizer"]
    muon, adamw = results[0]["losses"]["muon"], results[0]["losses"]["2"]
    assert muon[-1] < muon[0] - 0.1
    assert muon != adamw, "a different optimizer must give different losses"
