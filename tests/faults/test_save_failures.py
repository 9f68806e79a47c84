"""A save that fails for another reason than a full disk says so (real 2-rank DeepSpeed, CPU).

The full-disk case itself is ``test_hardening.py::test_a_full_disk_during_a_save_keeps_every_good_checkpoint``.
"""

from __future__ import annotations

import pytest

from tests.faults import runs

pytestmark = pytest.mark.distributed


def test_a_peer_dying_in_a_save_is_named_as_such_not_as_a_full_disk(tmp_path, tiny_tokenizer_dir):
    """Rank 1 is killed as the save of step 4 starts; rank 0, waiting for it in DeepSpeed's
    save, reports a lost peer and the intact previous checkpoint, with no free-space advice."""
    recipe = runs.make_recipe(tmp_path, tiny_tokenizer_dir, "peer", train={"max_steps": 6, "save_every": 2})
    code, out = runs.run(recipe, env={"DSTRAIN_FAULT": "kill_rank1_at_save_start:4"})
    assert code != 0, out[-4000:]
    errors = [line for line in out.splitlines() if "dstrain: error: [rank0]" in line]
    assert len(errors) == 1, out[-4000:]
    assert "saving step 4 failed on rank 0: rank 0 lost contact with the other ranks" in errors[0]
    assert "the previous checkpoint step_2 is intact" in errors[0]
    assert "free" not in errors[0] and "[rank0]: Traceback" not in out
    assert (tmp_path / "peer" / "checkpoints" / "latest").read_text() == "step_2"
