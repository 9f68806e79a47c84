"""The distributed facts of this process, read once from whichever launcher started it.

Model and data code receive a :class:`DistInfo`; nothing else reads ``os.environ`` for rank,
world size, node or rendezvous address. What each launcher sets, and what is read:

================================  ==========================================================
launcher                          variables read
================================  ==========================================================
``dstrain run`` (its spawner)     RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE GROUP_RANK
                                  GROUP_WORLD_SIZE MASTER_ADDR MASTER_PORT (torchrun's names)
``torchrun``                      the same, plus TORCHELASTIC_RUN_ID
``deepspeed``                     RANK LOCAL_RANK WORLD_SIZE LOCAL_SIZE CROSS_RANK CROSS_SIZE
                                  MASTER_ADDR MASTER_PORT
bare ``srun``: a task of a step   SLURM_PROCID SLURM_LOCALID SLURM_STEP_NUM_TASKS SLURM_NODEID
(SLURM_STEP_ID set; the batch     SLURM_STEP_NUM_NODES SLURM_STEP_TASKS_PER_NODE; the master
script itself is not one)         is the first host of SLURM_JOB_NODELIST and the port is
                                  derived from SLURM_JOB_ID, unless MASTER_ADDR/PORT are set
nothing ("no launcher")           one process, rank 0 of 1
================================  ==========================================================

:func:`init_distributed` hands these facts to torch explicitly (``tcp://`` rendezvous, rank,
world size), so neither ssh nor mpi4py is ever needed. torch is imported lazily: the launcher
imports this module for the node-list and port helpers and must stay light.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

from trainer.errors import ConfigError, DistError
from trainer.faults import fault

log = logging.getLogger("dstrain")

#: Config keys that may differ between nodes (how each shows progress and library logs).
PER_NODE_KEYS = frozenset({"log.progress", "log.library_logs"})

#: How long dstrain's own collectives wait (``train.collective_timeout_s``); set by
#: :func:`init_distributed`. Module state because the process group it describes is torch's
#: module state too.
_COLLECTIVE_TIMEOUT_S = 1800.0
#: Extra seconds NCCL's watchdog waits beyond our timed waits (see :func:`_start_process_group`).
NCCL_WATCHDOG_GRACE_S = 60.0

# A JIT build of a DeepSpeed op (shm_comm at CPU init, fused/cpu Adam) takes minutes at most.
STALE_LOCK_ENV, STALE_LOCK_DEFAULT_S = "DSTRAIN_STALE_LOCK_S", 600.0

# The rendezvous port of a SLURM job: 15000 + job id mod 16000, below Linux's ephemeral range
# (32768+) so no outgoing connection holds it, and the same for every task and every restart of
# the job without any task telling another.
SLURM_PORT_BASE, SLURM_PORT_SPAN = 15000, 16000


def expand_hostlist(spec: str) -> list[str]:
    """SLURM's compressed host list as host names: ``gpu[01-03,07],cpu5`` -> gpu01 gpu02 gpu03
    gpu07 cpu5. Ranges keep the zero padding of their low bound; several bracket groups in one
    name expand as a product (``r[1-2]-n[1-2]`` -> r1-n1 r1-n2 r2-n1 r2-n2), as in SLURM."""
    hosts: list[str] = []
    for item in _split_top_level(spec):
        parts = [
            [text] if text else _expand_ranges(group, spec)
            for text, group in re.findall(r"([^\[\]]+)|\[([^\[\]]*)\]", item)
        ]
        hosts.extend("".join(choice) for choice in product(*parts))
    return hosts


def _split_top_level(spec: str) -> list[str]:
    """Split at the commas outside brackets; brackets must pair up and not nest."""
    items, depth, current = [], 0, ""
    for char in spec.strip():
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            break
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    items.append(current)
    if depth != 0 or not all(items):
        raise ConfigError(f"cannot expand the node list {spec!r}: unbalanced brackets or an empty name")
    return items


def _expand_ranges(group: str, spec: str) -> list[str]:
    """``01-03,07`` -> 01 02 03 07 (the width of each low bound is kept)."""
    out: list[str] = []
    for part in group.split(","):
        low, _, high = part.partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise ConfigError(f"cannot expand the node list {spec!r}: {part!r} is not N or N-M")
        if not high:
            out.append(low)
            continue
        if int(high) < int(low):
            raise ConfigError(f"cannot expand the node list {spec!r}: the range {part!r} runs backwards")
        out.extend(str(n).zfill(len(low)) for n in range(int(low), int(high) + 1))
    return out


def slurm_hostnames(spec: str) -> list[str]:
    """Host names of a SLURM node list: ``scontrol show hostnames`` when it is installed and
    configured (it knows every site-specific form), else :func:`expand_hostlist`."""
    if shutil.which("scontrol"):
        import subprocess  # here: the launcher imports this module and must start fast

        try:
            proc = subprocess.run(
                ["scontrol", "show", "hostnames", spec], capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired):
            proc = None
        if proc is not None and proc.returncode == 0 and proc.stdout.split():
            return proc.stdout.split()
    return expand_hostlist(spec)


def expand_tasks_per_node(spec: str) -> list[int]:
    """SLURM's ``SLURM_TASKS_PER_NODE`` form as one count per node: ``2(x3),1`` -> 2 2 2 1."""
    counts: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            raise ConfigError(f"cannot read the tasks per node {spec!r} (expected a form like 2(x3),1)")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def slurm_master_port(job_id: int) -> int:
    """The rendezvous port of SLURM job ``job_id`` (see :data:`SLURM_PORT_BASE`)."""
    return SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN


def _read_int(env: Mapping[str, str], *names: str, default: int | None = None) -> int:
    """The first of ``names`` that is set, as an int; ``default`` when none is."""
    for name in names:
        raw = env.get(name)
        if raw is None or raw == "":
            continue
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"${name}={raw!r} is not an integer (set by the launcher)") from None
    if default is None:
        raise ConfigError(
            f"${names[0]} is not set: start the trainer with dstrain run, deepspeed, torchrun or srun"
        )
    return default


@dataclass(frozen=True)
class DistInfo:
    """Rank, node and rendezvous facts of this process, and its device.

    ``master_port`` 0 lets a one-process run take any free port.
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 0
    launcher: str = "no launcher"
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not (0 <= self.rank < self.world_size and 0 <= self.node_rank < self.num_nodes):
            raise ConfigError(
                f"inconsistent rank facts from {self.launcher}: rank {self.rank} of {self.world_size}, "
                f"node {self.node_rank} of {self.num_nodes}; check the launcher's variables"
            )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str:
        return "nccl" if self.device.startswith("cuda") else "gloo"

    @property
    def cuda_index(self) -> int:
        """The CUDA device index of this rank (``device`` is ``cuda:N``)."""
        return int(self.device.split(":", 1)[1])

    @property
    def init_method(self) -> str:
        host = f"[{self.master_addr}]" if ":" in self.master_addr else self.master_addr
        return f"tcp://{host}:{self.master_port}"

    def describe(self) -> str:
        return (
            f"rank {self.rank} of {self.world_size} (node {self.node_rank} of {self.num_nodes}, "
            f"local rank {self.local_rank} of {self.local_world_size}) from {self.launcher}, "
            f"master {self.master_addr}:{self.master_port}, {self.backend} on {self.device}"
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, cuda_devices: int | None = None) -> DistInfo:
        """Read the facts that the launcher set (see the module docstring for which launcher
        sets what). ``cuda_devices`` defaults to the visible CUDA device count."""
        env = os.environ if environ is None else environ
        if "RANK" in env and "WORLD_SIZE" in env:
            facts = cls._from_rank_env(env)
        elif "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
            facts = cls._from_srun_env(env)
        else:
            facts = {"launcher": "no launcher"}
        if cuda_devices is None:
            import torch

            cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
        device = pick_device(
            facts.get("local_rank", 0),
            facts.get("local_world_size", 1),
            cuda_devices,
            facts["launcher"],
            facts.get("rank", 0),
        )
        return cls(device=device, **facts)

    @staticmethod
    def _from_rank_env(env: Mapping[str, str]) -> dict[str, Any]:
        """torchrun, deepspeed and dstrain's spawner: RANK, WORLD_SIZE, MASTER_ADDR/PORT..."""
        if "TORCHELASTIC_RUN_ID" in env:
            launcher = "torchrun"
        elif "CROSS_RANK" in env:
            launcher = "deepspeed"
        else:
            launcher = env.get("DSTRAIN_LAUNCHER", "a RANK/WORLD_SIZE launcher")
        world_size = _read_int(env, "WORLD_SIZE")
        local_world_size = _read_int(env, "LOCAL_WORLD_SIZE", "LOCAL_SIZE", default=world_size)
        multi = world_size > 1
        if multi and not env.get("MASTER_ADDR"):
            raise ConfigError(f"$MASTER_ADDR is not set by {launcher}: cannot find the rendezvous host")
        return {
            "rank": _read_int(env, "RANK"),
            "local_rank": _read_int(env, "LOCAL_RANK", default=0),
            "world_size": world_size,
            "local_world_size": local_world_size,
            "node_rank": _read_int(env, "GROUP_RANK", "CROSS_RANK", "NODE_RANK", default=0),
            "num_nodes": _read_int(
                env,
                "GROUP_WORLD_SIZE",
                "CROSS_SIZE",
                "NNODES",
                default=max(1, world_size // local_world_size),
            ),
            "master_addr": env.get("MASTER_ADDR") or "127.0.0.1",
            "master_port": _read_int(env, "MASTER_PORT", default=None if multi else 0),
            "launcher": launcher,
        }

    @staticmethod
    def _from_srun_env(env: Mapping[str, str]) -> dict[str, Any]:
        """A task of an srun step, one task per rank: SLURM_PROCID, SLURM_LOCALID, ..."""
        node_rank = _read_int(env, "SLURM_NODEID", default=0)
        per_node_spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
        per_node = expand_tasks_per_node(per_node_spec) if per_node_spec else []
        world_size = _read_int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
        if "MASTER_ADDR" in env:
            master_addr = env["MASTER_ADDR"]
        else:
            nodelist = (
                env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
            )
            if not nodelist:
                raise ConfigError(
                    "$SLURM_JOB_NODELIST is not set: cannot find the master node of this srun step"
                )
            master_addr = slurm_hostnames(nodelist)[0]
        return {
            "rank": _read_int(env, "SLURM_PROCID"),
            "local_rank": _read_int(env, "SLURM_LOCALID", default=0),
            "world_size": world_size,
            "local_world_size": per_node[node_rank] if node_rank < len(per_node) else world_size,
            "node_rank": node_rank,
            "num_nodes": _read_int(
                env, "SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES", default=1
            ),
            "master_addr": master_addr,
            "master_port": _read_int(env, "MASTER_PORT", default=0)
            or slurm_master_port(_read_int(env, "SLURM_JOB_ID")),
            "launcher": "srun",
        }

    def library_env(self) -> dict[str, str]:
        """The variables DeepSpeed and torch read for these facts, by every launcher's name.

        DeepSpeed takes ``LOCAL_RANK`` as the device index (engine, ZeRO-3 partitioning) and
        ``LOCAL_SIZE`` as the device count on CPU, so on CUDA ``LOCAL_RANK`` is the device
        index this rank uses.
        """
        local = self.cuda_index if self.device.startswith("cuda") else self.local_rank
        cpu = {} if self.device.startswith("cuda") else {"DS_ACCELERATOR": "cpu"}  # no detection warning
        return {
            **cpu,
            "RANK": str(self.rank),
            "LOCAL_RANK": str(local),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "LOCAL_SIZE": str(self.local_world_size),
            "CROSS_RANK": str(self.node_rank),
            "CROSS_SIZE": str(self.num_nodes),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


def pick_device(
    local_rank: int, local_world_size: int, cuda_devices: int, launcher: str, rank: int = 0
) -> str:
    """This rank's device: ``cuda:<local_rank>``, ``cpu`` when no GPU is visible, or a
    :class:`ConfigError` when the node runs more ranks than it shows GPUs.

    One exception keeps per-task GPU binding working: a task of ``srun --gpus-per-task=1`` (or
    ``--gpu-bind``) sees exactly one GPU, its own, as ``cuda:0``, whatever its local rank. Any
    other shortfall used to wrap around (``local_rank % gpus``), put two ranks on one GPU and
    fail later inside NCCL with an error that names neither.
    """
    if cuda_devices <= 0:
        return "cpu"
    if local_rank < cuda_devices:
        return f"cuda:{local_rank}"
    if launcher == "srun" and cuda_devices == 1:
        return "cuda:0"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    shown = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
    raise ConfigError(
        f"rank {rank} is local rank {local_rank} of {local_world_size} on its node, but the node shows "
        f"{cuda_devices} CUDA device(s){shown}: {launcher} started more ranks per node than there are "
        f"GPUs; start at most {cuda_devices} per node (deepspeed --num_gpus, torchrun --nproc-per-node, "
        "srun --ntasks-per-node, or --gpus-per-task=1 so each task sees its own)"
    )


def global_batch_summary(micro_batch_size: int, grad_accum: int, world_size: int, max_seq_len: int) -> str:
    """``global batch = micro x accum x world = N sequences (T tokens)``: what one optimizer
    step consumes over all ranks (T counts full rows: packed rows are always full)."""
    sequences = micro_batch_size * grad_accum * world_size
    return (
        f"global batch = micro x accum x world = {micro_batch_size} x {grad_accum} x {world_size} "
        f"= {sequences} sequences ({sequences * max_seq_len} tokens)"
    )


def extension_build_root() -> Path:
    """Where torch JIT-builds DeepSpeed's ops (``TORCH_EXTENSIONS_DIR`` or ~/.cache/torch_extensions).

    ``get_default_build_root()`` ignores ``TORCH_EXTENSIONS_DIR`` (torch reads it in
    ``_get_build_directory``): with it set, the locks of this run's builds are under it."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def clear_stale_build_locks(
    root: Path | None = None, stale_after_s: float | None = None, poll_s: float = 2.0
) -> list[Path]:
    """Wait out JIT-build locks under ``root``; remove those older than ``stale_after_s``.

    torch guards every load of a JIT-built op with ``<op>/lock``, a file that names no process.
    A process killed while holding it (kill -9, a SLURM time limit, a node failure) leaves it
    behind, and every later run then waits on it forever inside DeepSpeed's init. A lock held by
    a live build disappears within minutes, so one older than ``stale_after_s`` is removed with
    a warning (``stale_after_s`` defaults to ``$DSTRAIN_STALE_LOCK_S``, 600). Returns the locks removed.
    """
    if stale_after_s is None:
        raw = os.environ.get(STALE_LOCK_ENV, str(STALE_LOCK_DEFAULT_S))
        try:
            stale_after_s = float(raw)
        except ValueError:
            raise ConfigError(f"${STALE_LOCK_ENV}={raw!r} is not a number of seconds") from None
    root = extension_build_root() if root is None else root
    if not root.is_dir():
        return []
    removed: list[Path] = []
    warned = False
    while True:
        locks = [*root.glob("*/lock"), *root.glob("*/*/lock")]
        waiting = []
        for lock in locks:
            try:
                age = time.time() - lock.stat().st_mtime
            except FileNotFoundError:
                continue  # released while we looked
            if age < stale_after_s:
                waiting.append(lock)
                continue
            log.warning(
                "removing %s: a build lock %.0f s old, left by a killed process "
                "(every run would otherwise wait on it forever)",
                lock,
                age,
            )
            lock.unlink(missing_ok=True)
            removed.append(lock)
        if not waiting:
            return removed
        if not warned:
            log.warning(
                "waiting for %s: another process is building a DeepSpeed op, or one was "
                "killed while holding it (removed once %.0f s old; set "
                "DSTRAIN_STALE_LOCK_S to change)",
                waiting[0],
                stale_after_s,
            )
            warned = True
        time.sleep(poll_s)


def init_distributed(dist: DistInfo, timeout_s: float = 1800.0) -> None:
    """Start the process group (gloo on CPU, nccl on GPU) through DeepSpeed, once, from the
    facts in ``dist``: a ``tcp://`` rendezvous with this rank and world size, so nothing is
    left for DeepSpeed to discover (its fallback would be mpi4py). ``timeout_s`` bounds every
    collective (``train.collective_timeout_s``); then check that every rank runs the same
    library versions.

    Every wait in here (a stale build lock, the rendezvous, the start-up checks) can last up to
    ``timeout_s``; Ctrl-C stops it at once with one line (:func:`trainer.signals.wait_interruptibly`).
    """
    from trainer.signals import wait_interruptibly

    global _COLLECTIVE_TIMEOUT_S
    _COLLECTIVE_TIMEOUT_S = timeout_s
    wait_interruptibly(clear_stale_build_locks, "waiting for a DeepSpeed op's build lock")
    where = f"{dist.world_size} ranks at {dist.master_addr}:{dist.master_port}"
    wait_interruptibly(lambda: _start_process_group(dist, timeout_s), f"waiting at the rendezvous of {where}")
    if dist.is_main:
        log.info("distributed: %s", dist.describe())
    # Collectives: every rank is past DeepSpeed's shm set-up once they return.
    wait_interruptibly(lambda: _start_up_checks(dist), f"waiting for the start-up check of {where}")
    release_shm_name(dist)


def _start_process_group(dist: DistInfo, timeout_s: float) -> None:
    import deepspeed
    import torch

    if dist.device.startswith("cuda"):
        torch.cuda.set_device(dist.cuda_index)  # the current device is per thread
    if torch.distributed.is_initialized():
        return
    # DeepSpeed reads these itself (engine, ZeRO-3, CPU accelerator); under bare srun nothing
    # else has set them.
    os.environ.update(dist.library_env())
    # NCCL's watchdog tears the process down (TORCH_NCCL_ASYNC_ERROR_HANDLING's default, 3) when a
    # collective outlives the process group's timeout, before any Python code can say which rank
    # waited where. dstrain's own collectives wait with an explicit timeout (_wait_timed), so
    # the watchdog gets a grace period beyond it: the timed wait raises first, in Python.
    grace = NCCL_WATCHDOG_GRACE_S if dist.backend == "nccl" else 0.0
    deepspeed.init_distributed(
        dist_backend=dist.backend,
        auto_mpi_discovery=False,
        init_method=dist.init_method,
        rank=dist.rank,
        world_size=dist.world_size,
        timeout=datetime.timedelta(seconds=timeout_s + grace),
    )


def _start_up_checks(dist: DistInfo) -> None:
    import torch

    if dist.device.startswith("cuda"):
        torch.cuda.set_device(dist.cuda_index)  # this helper thread's current device
    check_same_versions(dist)


def release_shm_name(dist: DistInfo) -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce buffer from /dev/shm once every rank has it mapped.

    On a CPU, DeepSpeed's TorchBackend creates a 66 MB ``/dev/shm/deepspeed_allreduce_buffer_
    <uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>`` per rank, which its peers open by name during
    ``init_distributed``, and never removes it: every CPU run left 66 MB per rank of RAM-backed
    files behind (20 GB after a day of tests here, until the machine swapped). The mappings
    stay valid after the unlink, and the memory is freed when the last rank exits, even on a
    kill -9. GPUs use NCCL and create no such file.
    """
    if dist.device != "cpu":
        return
    name = (
        f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
        f"{os.environ.get('MASTER_PORT', '')}_{dist.rank}"
    )
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join("/dev/shm", name))


# How gloo and NCCL word a dead or stuck peer (torch raises them as plain RuntimeErrors in places).
COMM_FAILURES = (
    "Connection closed by peer",
    "Connection reset",
    "gloo",
    "NCCL",
    "nccl",
    "timed out",
    "Timed out",
)


@contextlib.contextmanager
def collective(phase: str, dist: DistInfo) -> Iterator[None]:
    """Turn a failed or timed-out collective into one line naming this rank and the phase.

    A peer that died (its own error line says why) or hangs leaves the others in a collective;
    gloo reports a closed connection at once, and any backend reports a timeout after
    ``train.collective_timeout_s``. Either way the user learns who was waiting, where.
    """
    import torch

    try:
        yield
    except (RuntimeError, torch.distributed.DistError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not isinstance(exc, torch.distributed.DistError) and not any(m in first for m in COMM_FAILURES):
            raise  # a bug in this rank's own code, not a peer: keep its traceback
        timed_out = "timed out" in first.lower() or "timeout" in first.lower()
        raise DistError(
            f"rank {dist.rank} {'timed out waiting for' if timed_out else 'lost contact with'} the other "
            f"ranks in {phase}: {first[:200]}; another rank died or is stuck: its own log "
            "(train.log, logs/rank<N>.log) names the cause"
        ) from None


def all_reduce_sum(values: list[float], dist: DistInfo, phase: str = "an all-reduce") -> list[float]:
    """Sum a few floats over all ranks (fp64, so token counts stay exact)."""
    return _all_reduce(values, dist, phase, "SUM")


def all_reduce_max(values: list[float], dist: DistInfo, phase: str = "an all-reduce") -> list[float]:
    """Max of a few floats over all ranks (flags: any rank set it)."""
    return _all_reduce(values, dist, phase, "MAX")


def _all_reduce(values: list[float], dist: DistInfo, phase: str, op: str) -> list[float]:
    import torch

    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.world_size > 1 and torch.distributed.is_initialized():
        with collective(phase, dist):
            if dist.backend == "nccl":
                tensor = tensor.to(dist.device)
            work = torch.distributed.all_reduce(
                tensor, op=getattr(torch.distributed.ReduceOp, op), async_op=True
            )
            _wait_timed(work)
            tensor = tensor.cpu()  # the readback too: on NCCL it is where a stuck peer blocks
    return tensor.tolist()


def _wait_timed(work: Any) -> None:
    """Block until ``work`` is done or ``train.collective_timeout_s`` passed, then raise.

    NCCL's ``Work.wait()`` without a timeout only makes the current stream wait: the host
    would then block in the next read-back, outside any timeout, until the watchdog kills the
    process. With a timeout it blocks the host and raises on expiry (ProcessGroupNCCL.hpp,
    ``WorkNCCL::wait``), without TORCH_NCCL_BLOCKING_WAIT making every other collective
    (DeepSpeed's overlapped reductions) block the host as well. gloo honours it the same way.
    """
    work.wait(timeout=datetime.timedelta(seconds=_COLLECTIVE_TIMEOUT_S))


def barrier(dist: DistInfo, phase: str = "a barrier") -> None:
    """Wait for every rank (a no-op on one rank or before the process group exists)."""
    import torch

    if dist.world_size > 1 and torch.distributed.is_initialized():
        with collective(phase, dist):
            torch.distributed.barrier()


def all_gather_objects(obj: object, dist: DistInfo, phase: str = "an all-gather") -> list[object]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` on one rank."""
    import torch

    if dist.world_size == 1 or not torch.distributed.is_initialized():
        return [obj]
    gathered: list[object] = [None] * dist.world_size
    with collective(phase, dist):
        torch.distributed.all_gather_object(gathered, obj)
    return gathered


def check_same_versions(dist: DistInfo) -> None:
    """Abort at start when the ranks run different torch, deepspeed or transformers versions
    (a node with another environment fails later in ways that name nothing)."""
    import deepspeed
    import torch
    import transformers

    mine = {
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__,
    }
    if fault("at_start", 0, dist.rank) == "oldtorch":
        mine["torch"] = "0.0.0"
    everyone = all_gather_objects(mine, dist, "the version check at start")
    differ = {k for k in mine if len({str(v[k]) for v in everyone}) > 1}
    if differ:
        per_rank = "; ".join(
            f"rank {r}: " + ", ".join(f"{k} {v[k]}" for k in sorted(differ)) for r, v in enumerate(everyone)
        )
        raise DistError(
            f"the ranks run different library versions ({per_rank}); install the same environment on every node"
        )


def run_facts(config: Mapping[str, Any], files: list[Mapping[str, Any]], tokenizer: str) -> dict[str, str]:
    """What every rank must agree on to train one run, as short strings by key: each resolved
    config key (``optim.lr``; minus :data:`PER_NODE_KEYS`), the data files after globbing (path,
    size, rows: not the mtime, which differs between node-local copies) and the tokenizer."""
    facts: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping) and prefix.count(".") < 1:  # sections; model.overrides stays whole
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        elif prefix not in PER_NODE_KEYS:
            facts[prefix] = repr(value)

    walk("", config)
    listing = [(str(f["path"]), f.get("size"), f.get("rows")) for f in files]
    digest = hashlib.sha1(repr(listing).encode("utf-8")).hexdigest()[:10]
    facts["data files"] = f"{len(listing)} files ({digest})"
    facts["tokenizer"] = tokenizer
    return facts


def check_same_run(facts: Mapping[str, str], dist: DistInfo) -> None:
    """Abort at start when the ranks would train different runs (one all-gather): a node
    started with another recipe, override, glob result or tokenizer trains silently
    inconsistent otherwise. The message lists, per differing key, which ranks hold which value."""
    everyone = all_gather_objects(dict(facts), dist, "the same-run check at start")
    keys = sorted({k for f in everyone for k in f})
    differ = [k for k in keys if len({f.get(k) for f in everyone}) > 1]
    if not differ:
        return
    parts = []
    for key in differ[:5]:
        holders: dict[str | None, list[int]] = {}
        for rank, f in enumerate(everyone):
            holders.setdefault(f.get(key), []).append(rank)
        parts.append(
            f"{key}: "
            + ", ".join(f"{_rank_list(ranks)} {str(value)[:60]}" for value, ranks in holders.items())
        )
    more = f" (and {len(differ) - 5} more keys)" if len(differ) > 5 else ""
    raise DistError(
        f"the ranks do not train the same run: {'; '.join(parts)}{more}; start every node with the "
        "same recipe, overrides, data files and tokenizer"
    )


def _rank_list(ranks: list[int]) -> str:
    """``rank 3`` or ``ranks 0,1,2``."""
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {','.join(map(str, ranks))}"
