"""Real 2-rank DeepSpeed on CPU (gloo): ZeRO 0-3 agree with each other and with plain torch,
grad accumulation does not change the step, and the HF export reproduces the engine's logits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.distributed.workers.common import global_rows, padded_batch
from tests.helpers import REPO, tiny_model
from tests.launch import read_results, run_ranks

pytestmark = pytest.mark.distributed
WORLD = 2
STEPS = 10


@pytest.fixture(scope="module")
def engine_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("engine")
    run_ranks(WORLD, REPO / "tests/distributed/workers/engine_checks.py", [str(out)])
    return out, read_results(out, WORLD)


@pytest.fixture(scope="module")
def reference():
    return reference_losses()


# tiny_job's optimizer and schedule, written out here so the reference shares no code with
# dstrain's optim.py: AdamW at lr 3e-3, betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on the
# matrices only, clipping at 1.0; 3 warmup steps, then cosine to 0.1 of the peak at STEPS.
LR, BETAS, EPS, WEIGHT_DECAY, MAX_NORM = 3e-3, (0.9, 0.95), 1e-8, 0.1, 1.0
WARMUP, FLOOR = 3, 0.1


def reference_lr(step: int) -> float:
    """The lr of the update at 0-based ``step``: linear warmup from LR/3, then half a cosine."""
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    progress = (step - WARMUP) / (STEPS - WARMUP)
    return LR * (FLOOR + (1 - FLOOR) * 0.5 * (1 + math.cos(math.pi * progress)))


def reference_losses() -> tuple[list[float], list[float]]:
    """A plain single-process torch loop over the same global batches (both ranks' rows), with
    torch.optim.AdamW and the lr set by hand each step: the losses and the gradient norms
    before clipping."""
    model = tiny_model(seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=LR,
        betas=BETAS,
        eps=EPS,
    )
    losses, norms = [], []
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
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, MAX_NORM)))
        for group in optimizer.param_groups:
            group["lr"] = reference_lr(step)
        optimizer.step()
        losses.append(loss.item())
    return losses, norms


def test_zero_stages_agree_with_each_other_and_plain_torch(engine_results, reference):
    """Losses and gradient norms of ZeRO 0-3, and of ZeRO-2 with DeepSpeed's CPU Adam on
    offloaded optimizer state, against a plain torch loop (every stage logs its norm)."""
    _, results = engine_results
    losses, norms = results[0]["losses"], results[0]["norms"]
    assert results[1]["losses"] == losses, "every rank reports the same all-reduced loss"
    want_losses, want_norms = reference
    assert want_losses[-1] < want_losses[0] - 0.1, "the reference loop must actually learn"
    assert results[0]["offload_optimizer"] == "DeepSpeedCPUAdam"
    # the ZeRO-1/2 steps compared below are the ones with dstrain's host-work cuts (trainer/engine.py)
    common = ["use_foreach_grad_norm", "skip_unneeded_view_reset", "batched_copy_back"]
    assert results[0]["patches"]["1"] == [*common, "lean_zero1_bucket_fill"]
    assert results[0]["patches"]["2"] == common and results[0]["patches"]["0"] == []
    for stage in ("0", "1", "2", "3", "offload"):
        assert len(losses[stage]) == STEPS
        for step, (got, want) in enumerate(zip(losses[stage], want_losses, strict=True)):
            assert abs(got - want) <= 1e-5, f"ZeRO-{stage} step {step}: {got} vs torch {want}"
        for step, (got, want) in enumerate(zip(norms[stage], want_norms, strict=True)):
            assert got is not None and abs(got - want) <= 1e-4 * max(1.0, want), f"{stage} step {step} norm"


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


def test_muon_updates_the_hidden_matrices_at_muon_lr(engine_results):
    """Muon takes the 2-D weights of attention and MLP; embeddings (tied head), norms and biases
    go to AdamW; the groups step at muon_lr and lr (0.02 and 3e-3 in tiny_job) respectively."""
    _, results = engine_results
    groups = results[0]["muon_groups"]
    muon = sorted(p for g in groups if g["use_muon"] for p in g["params"])
    adam = sorted(p for g in groups if not g["use_muon"] for p in g["params"])
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert muon and all(p.endswith(".weight") and p.split(".")[-2] in projections for p in muon)
    assert len(muon) == 2 * len(projections)
    assert "model.embed_tokens.weight" in adam and all(
        "norm" in p or "bias" in p or "embed" in p for p in adam
    )
    lr_muon = {g["lr"] for g in groups if g["use_muon"]}
    lr_adam = {g["lr"] for g in groups if not g["use_muon"]}
    assert len(lr_muon) == len(lr_adam) == 1
    assert lr_muon.pop() / lr_adam.pop() == pytest.approx(0.02 / 3e-3)


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_changed_hyperparameters_reach_the_optimizer_after_a_resume(engine_results, name):
    """Saved with weight decay 0 (both groups look alike), loaded with 0.1: the decayed group gets
    it, biases and norms do not; the lr scales by new/old at the same schedule position; betas,
    eps (AdamW) and momentum (Muon) take the new values."""
    _, results = engine_results
    loaded, applied = results[0]["resume"][name]["loaded"], results[0]["resume"][name]["applied"]
    assert [g["name"] for g in loaded] == [g["name"] for g in applied]
    assert all(g["weight_decay"] == 0.0 for g in loaded), "the checkpoint's groups had no decay"
    for old, new in zip(loaded, applied, strict=True):
        decayed = new["name"].startswith("decay")
        assert new["weight_decay"] == (0.1 if decayed else 0.0), new
        if new.get("use_muon"):
            assert old["momentum"] == 0.95 and new["momentum"] == 0.8
            assert new["lr"] / old["lr"] == pytest.approx(0.01 / 0.02)
        else:
            assert tuple(new["betas"]) == (0.8, 0.99) and new["eps"] == 1e-6
            assert new["lr"] / old["lr"] == pytest.approx(1e-3 / 3e-3)
    assert any(g["name"].startswith("no_decay") for g in applied) and any(
        g["name"].startswith("decay") for g in applied
    )
