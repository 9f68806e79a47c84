"""Test-only fault injection: ``DSTRAIN_FAULT=<action>_rank<R>_<point>[:<step>][,...]``.

Fault tests need failures at exact places that an outside signal cannot hit reliably (inside
a save, in the middle of an eval, a non-finite loss at a given step). Each spec names an
action, the rank it hits, the point in the code and optionally the optimizer step:

- ``kill_rank1_in_save:12``   SIGKILL rank 1 after DeepSpeed wrote its files for step 12;
- ``signal_rank0_in_save``    SIGTERM to rank 0 inside every save (a second pre-emption signal);
- ``kill_rank0_in_eval:8``    SIGKILL rank 0 half-way through the eval at step 8;
- ``nan_rank1_in_step:5``     make rank 1's loss NaN in the step that becomes step 5;
- ``nan_rank1_in_step:5x3``   the same three times (a skipped step is tried again as step 5);
- ``oom_rank0_in_step:3``     raise torch.OutOfMemoryError in that step, as the model's first
  forward returns its logits (activations allocated, backward not begun: CPU tests);
- ``sleep_rank0_in_eval``     a 2 s pause inside every eval (a slow eval);
- ``hang_rank1_in_plan:3``    a 12 s stall before step 3's agreement (a stuck rank);
- ``oldtorch_rank1_at_start`` rank 1 reports torch 0.0.0 in the start-up version check.

A spec fires once per process unless it says ``x<times>``. Unset (every real run), :func:`fault`
returns None after one dict lookup.
"""

from __future__ import annotations

import logging
import os
import signal
import time

log = logging.getLogger("dstrain")

FAULT_ENV = "DSTRAIN_FAULT"
SLEEP_S = 2.0
HANG_S = 12.0


_fired: dict[str, int] = {}


def fault(point: str, step: int, rank: int) -> str | None:
    """The action injected at ``point`` of ``step`` on ``rank`` (kill/signal act here), or None."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    for item in spec.split(","):
        name, _, when = item.partition(":")
        at, _, times = when.partition("x")
        action, _, rest = name.partition("_rank")
        if rest != f"{rank}_{point}" or (at and int(at) != step) or _fired.get(item, 0) >= int(times or 1):
            continue
        if at:  # a spec for one step fires its number of times; one without a step, every time
            _fired[item] = _fired.get(item, 0) + 1
        log.warning("fault injection: %s at %s, step %d", action, point, step)
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "signal":
            os.kill(os.getpid(), signal.SIGTERM)
        if action in ("sleep", "hang"):
            time.sleep(SLEEP_S if action == "sleep" else HANG_S)
        if action == "oom":
            oom_after_next_forward(step)
            return "oom armed"  # raised by the model's forward, not by the caller
        return action
    return None


def oom_after_next_forward(step: int) -> None:
    """Raise torch.OutOfMemoryError when the next outermost module call (the engine's forward,
    with the model's inside it) returns: inside the step's real forward, activations allocated,
    as a real OOM in the head or the loss would. Global module hooks track the nesting depth."""
    import torch
    from torch.nn.modules import module as nn_module

    depth = [0]

    def enter(module: object, args: object) -> None:
        depth[0] += 1

    def leave(module: object, args: object, output: object) -> None:
        depth[0] -= 1
        if depth[0] > 0:
            return
        entered.remove()
        left.remove()
        log.warning("fault injection: out of memory after the forward of step %d", step)
        raise torch.OutOfMemoryError("CUDA out of memory (injected by DSTRAIN_FAULT after the forward)")

    entered = nn_module.register_module_forward_pre_hook(enter)
    left = nn_module.register_module_forward_hook(leave)
