"""GPU check: a collective that never completes on NCCL ends in dstrain's one line (rank and
phase) after ``train.collective_timeout_s``, not in NCCL's watchdog abort.

    python scripts/check_nccl_stuck_rank.py        # one GPU is enough; prints PASS or FAIL, exit 0/1

A stuck peer needs two GPUs; one GPU shows the same thing: a ~30 s GPU sleep kernel queued on
the current stream before dstrain's step-agreement all-reduce keeps the NCCL work from
completing, exactly as a peer that never joins does. The all-reduce goes through
``trainer.dist.all_reduce_sum`` (the production path: device copy, async all-reduce, the timed
host wait, the read-back) on a process group started by ``init_distributed`` with a 3 s
timeout. Expected: ``DistError: rank 0 timed out waiting for the other ranks in the start of
step 3`` after ~3 s. Before the fix the read-back blocked outside any timeout until the kernel
ended (and, with a real stuck peer, until the watchdog killed the process).
"""

from __future__ import annotations

import os
import socket
import sys
import time

TIMEOUT_S = 3.0
SLEEP_CYCLES = 60_000_000_000  # ~30 s at 2 GHz


def main() -> int:
    import torch

    from trainer.dist import DistInfo, all_reduce_sum, init_distributed
    from trainer.errors import DistError

    if not torch.cuda.is_available():
        print("SKIP: no CUDA device")
        return 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    one = DistInfo(device="cuda:0", master_port=port)
    init_distributed(one, timeout_s=TIMEOUT_S)
    assert torch.distributed.get_backend() == "nccl"
    # The agreement code runs its collectives only for world_size > 1: the same rank, told it
    # has a peer, on the one-rank NCCL group.
    rank0_of_2 = DistInfo(rank=0, world_size=2, local_world_size=2, device="cuda:0", master_port=port)
    assert all_reduce_sum([1.0], rank0_of_2, "a warm-up") == [1.0]
    torch.cuda._sleep(SLEEP_CYCLES)
    started = time.monotonic()
    try:
        got = all_reduce_sum([1.0], rank0_of_2, "the start of step 3")
    except DistError as exc:
        waited = time.monotonic() - started
        line = str(exc)
        ok = "rank 0 timed out waiting for the other ranks in the start of step 3" in line and waited < 20
        print(f"{'PASS' if ok else 'FAIL'}: after {waited:.1f}s: {line}", flush=True)
        os._exit(0 if ok else 1)  # the sleep kernel is still queued: do not wait for it
    waited = time.monotonic() - started
    print(f"FAIL: no timeout; the all-reduce returned {got} after {waited:.1f}s", flush=True)
    os._exit(1)


if __name__ == "__main__":
    sys.exit(main())
