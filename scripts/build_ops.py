"""JIT-build the DeepSpeed ops a CPU run loads, once, in one process.

Called by scripts/env.sh after installing, so the first demo or test run does not spend its
first minutes compiling (and two ranks do not race on the build). On a GPU machine it does
nothing: DeepSpeed builds its CUDA ops on first use there, as usual.
"""

from __future__ import annotations

import sys
import time

import torch

from trainer.dist import clear_stale_build_locks


def main() -> int:
    if torch.cuda.is_available():
        return 0
    from deepspeed.accelerator import get_accelerator

    clear_stale_build_locks()
    for name in ("ShareMemCommBuilder", "FusedAdamBuilder"):
        builder = get_accelerator().create_op_builder(name)
        if builder is None or not builder.is_compatible():
            print(f"[build_ops] {name}: not available here, skipped")
            continue
        start = time.monotonic()
        builder.load()
        print(f"[build_ops] {builder.absolute_name()}: ready in {time.monotonic() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
