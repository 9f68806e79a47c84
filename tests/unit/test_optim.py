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


def test_scheduler_steps_follow_lr_factor():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    cfg = ScheduleConfig(warmup_steps=3)
    sched = make_scheduler(opt, 10, cfg)
    for step in range(10):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * lr_factor(step, 10, cfg))
        opt.step()
        sched.step()


def test_no_weight_decay_on_biases_and_norms_and_muon_tags_hidden_matrices():
    from tests.helpers import tiny_model

    model = tiny_model()
    groups = param_groups(model, OptimConfig(name="muon"))
    decayed = {id(p) for p in groups[0]["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.ndim >= 2), name
        assert p.use_muon == (p.ndim == 2 and "embed" not in name and "lm_head" not in name)
    assert groups[1]["weight_decay"] == 0.0
    assert not math.isnan(groups[0]["weight_decay"])
