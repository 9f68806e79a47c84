from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch

from trainer.config import OptimConfig, ScheduleConfig
from trainer.optim import lr_factor, make_scheduler, param_groups


def factors(name: str, total: int = 100, **kw) -> list[float]:
    cfg = ScheduleConfig(name=name, **kw)
    return [lr_factor(s, total, cfg) for s in range(total)]


def test_cosine_warms_up_linearly_then_decays_to_the_floor():
    f = factors("cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in pairwise(f[:10]))
    assert all(a >= b for a, b in pairwise(f[10:]))
    assert lr_factor(100, 100, ScheduleConfig(warmup_steps=10, min_lr_ratio=0.1)) == pytest.approx(0.1)
    mid = lr_factor(55, 100, ScheduleConfig(warmup_steps=10, min_lr_ratio=0.1))
    assert mid == pytest.approx(0.1 + 0.9 * 0.5)


def test_linear_constant_and_wsd_shapes():
    lin = factors("linear", warmup_steps=0, min_lr_ratio=0.0)
    assert lin[0] == 1.0 and lin[50] == pytest.approx(0.5)
    assert set(factors("constant", warmup_steps=5)[5:]) == {1.0}
    wsd = factors("wsd", warmup_steps=10, min_lr_ratio=0.0, decay_fraction=0.2)
    assert set(wsd[10:80]) == {1.0}
    assert wsd[90] == pytest.approx(0.5) and wsd[99] < 0.1


def test_onecycle_starts_at_lr_over_div_factor_and_peaks_at_warmup():
    f = factors("onecycle", warmup_steps=30, div_factor=25.0, final_div_factor=1e4)
    assert f[0] == pytest.approx(1 / 25)
    assert max(f) == pytest.approx(1.0) and f.index(max(f)) == 30
    assert lr_factor(100, 100, ScheduleConfig(name="onecycle", warmup_steps=30)) == pytest.approx(1 / 25e4)


def test_a_real_optimizer_steps_at_the_hand_computed_learning_rates():
    """AdamW stepped through make_scheduler (10 steps, warmup 3, cosine to 0.1 of the peak 0.5):
    the lr each step runs at, read from the optimizer, against values worked out by hand; the
    first update moves every weight by that lr (Adam's first step is lr * sign(grad))."""
    model = torch.nn.Linear(3, 1, bias=False)
    opt = torch.optim.AdamW(model.parameters(), lr=0.5, weight_decay=0.0)
    sched = make_scheduler(opt, 10, ScheduleConfig(name="cosine", warmup_steps=3, min_lr_ratio=0.1))
    # warmup: 0.5/3, 1.0/3, 1.5/3; then 0.05 + 0.45 * (1 + cos(pi * k / 7)) / 2 for k = 0..6, by hand
    want = [0.5 / 3, 1.0 / 3, 0.5, 0.5, 0.47772, 0.41529, 0.32507, 0.22493, 0.13471, 0.07228]
    got = []
    for step in range(10):
        got.append(opt.param_groups[0]["lr"])
        before = model.weight.detach().clone()
        model(torch.ones(1, 3)).sum().backward()
        opt.step()
        opt.zero_grad()
        if step == 0:
            assert torch.allclose(before - model.weight.detach(), torch.full((1, 3), 0.5 / 3), atol=1e-6)
        sched.step()
    assert got == pytest.approx(want, abs=1e-5)


def test_muon_takes_exactly_the_attention_and_mlp_matrices_and_decay_skips_1d():
    """The tiny Qwen2 (2 layers, tied embeddings): the names Muon must take are listed by hand
    from the architecture; everything else (embeddings, norms, q/k/v biases) stays on AdamW, and
    weight decay is on the matrices only."""
    from tests.helpers import tiny_model

    model = tiny_model()
    groups = param_groups(model, OptimConfig(name="muon"))
    names = {id(p): n for n, p in model.named_parameters()}
    matrices = [
        f"model.layers.{i}.{block}.{proj}.weight"
        for i in range(2)
        for block, projs in (("self_attn", "qkvo"), ("mlp", ("gate", "up", "down")))
        for proj in ([f"{p}_proj" for p in projs])
    ]
    assert sorted(n for n, p in model.named_parameters() if p.use_muon) == sorted(matrices)
    decayed = sorted(names[id(p)] for p in groups[0]["params"])
    assert decayed == sorted([*matrices, "model.embed_tokens.weight"])
    assert any(".bias" in names[id(p)] for p in groups[1]["params"])
    assert any("norm" in names[id(p)] for p in groups[1]["params"])
    assert groups[1]["weight_decay"] == 0.0
    assert not math.isnan(groups[0]["weight_decay"])


def test_zero0_adamw_clips_like_torch_clip_grad_norm_then_adamw():
    """FiniteAdamW (what ZeRO-0 steps: it clips itself, DeepSpeed's clipping is off there)
    against torch's clip_grad_norm_ + a single-tensor AdamW: same weights after two steps."""
    from tests.helpers import tiny_model
    from trainer.config import OptimConfig
    from trainer.optim import FiniteAdamW, param_groups

    cfg = OptimConfig(lr=3e-3, weight_decay=0.1, max_grad_norm=0.5)
    ids = torch.randint(1, 120, (4, 20), generator=torch.Generator().manual_seed(0))
    weights = []
    for ours in (True, False):
        model = tiny_model(seed=0)
        groups = param_groups(model, cfg)
        kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
        optimizer = (
            FiniteAdamW(groups, max_grad_norm=cfg.max_grad_norm, fused=True, **kwargs)
            if ours
            else torch.optim.AdamW(groups, foreach=False, **kwargs)
        )
        norms = []
        for _ in range(2):
            model(input_ids=ids, labels=ids).loss.backward()
            if not ours:
                norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)))
            optimizer.step()
            if ours:
                norms.append(float(optimizer._global_grad_norm))
            optimizer.zero_grad()
        weights.append((torch.cat([p.detach().flatten() for p in model.parameters()]), norms))
    (ours_w, ours_norms), (ref_w, ref_norms) = weights
    assert ref_norms[0] > cfg.max_grad_norm, "the case must clip"
    assert ours_norms == pytest.approx(ref_norms, rel=1e-5)
    assert (ours_w - ref_w).abs().max() <= 1e-6
