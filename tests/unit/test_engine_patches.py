"""The ZeRO-1/2 step patches apply only on the DeepSpeed release they were tested with."""

from __future__ import annotations

import logging

import deepspeed

from trainer.engine import STEP_PATCHES_VERIFIED_ON, step_patches


def test_the_installed_deepspeed_is_the_verified_release():
    # The suite's ZeRO 0-3 equality test (tests/distributed/test_engine.py) checks on real engines
    # which patches ran; that proves them only if the installed release is the verified one.
    assert deepspeed.__version__ in STEP_PATCHES_VERIFIED_ON
    assert step_patches(deepspeed.__version__)


def test_another_deepspeed_runs_its_own_step_and_says_so(caplog):
    with caplog.at_level(logging.INFO, logger="dstrain"):
        assert step_patches("0.19.9") == ()
        assert step_patches("0.18.0") == ()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "DeepSpeed 0.19.9: running its own ZeRO-1/2 step" in lines[0], lines
