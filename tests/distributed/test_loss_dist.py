"""Real 2-rank DeepSpeed ZeRO-3 on CPU: the chunked loss trains exactly like the plain one, with
the tied head weight partitioned across ranks."""

from __future__ import annotations

import pytest

from tests.helpers import REPO
from tests.launch import read_results, run_ranks

pytestmark = pytest.mark.distributed
WORLD = 2


def test_zero3_chunked_loss_matches_plain_losses_and_weights(tmp_path):
    run_ranks(WORLD, REPO / "tests/distributed/workers/loss_checks.py", [str(tmp_path)])
    results = read_results(tmp_path, WORLD)
    main = results[0]
    for facts in (main["plain_facts"], main["chunked_facts"]):
        assert facts["tied"] and facts["head_partitioned"], facts
    assert main["chunked_facts"]["enabled"] and main["chunked_facts"]["uses_chunked"]
    assert not main["plain_facts"]["uses_chunked"] and main["plain_facts"]["late_enable_refused"]
    assert main["plain"][-1] < main["plain"][0] - 0.1, "the runs must actually train"
    for step, (plain, chunked) in enumerate(zip(main["plain"], main["chunked"], strict=True)):
        assert abs(plain - chunked) <= 1e-5, f"step {step}: plain {plain} vs chunked {chunked}"
    assert results[1]["chunked"] == main["chunked"], "every rank reports the same all-reduced loss"
    for rank in results:  # eval (no_grad) through the chunked head, after training
        plain, chunked = rank["plain_facts"], rank["chunked_facts"]
        assert plain["eval_targets"] == chunked["eval_targets"] > 0
        assert abs(plain["eval_sum"] - chunked["eval_sum"]) / plain["eval_targets"] <= 1e-5
    assert main["keys_equal"], "the chunked head must not change the state_dict keys"
    assert main["weights_moved"] > 1e-3
    assert main["weight_maxdiff"] <= 1e-5
