"""``dstrain doctor``: can this machine run a recipe? And the one-line summary every run logs.

``dstrain doctor [RECIPE] [--json] [--output-dir D] [--section.key value ...]`` checks what a run
needs before it spends minutes starting: Python and the core packages; torch, CUDA and the GPUs
(name, memory, memory other processes hold); the process-group backend (nccl on GPUs, gloo on
CPU); DeepSpeed and its accelerator; the DeepSpeed ops the job loads (the shared-memory
all-reduce on CPU, CPU Adam for ``zero.offload_optimizer``, fused Adam for Muon's Adam half);
flash-attn; the precision and attention backend that ``model.dtype`` and
``model.attn_implementation`` resolve to here (``auto`` included); the disk under
``output_dir``; the host's cores and memory. Without a RECIPE the config defaults are checked.

Each check gives a :class:`Finding`: ok / warn / fail, one line, and for warn and fail what to
do. ``fail`` means the run would stop or never start: the exit status is then 1 and the blocking
checks are named on stderr. A bad recipe or override is the usual one-line ``dstrain: error``,
exit 2. Output: a rich table on a terminal, plain lines otherwise, ``--json`` for machines. The
probes' own chatter (DeepSpeed logs to stdout) is sent to stderr, so stdout holds the report only.

Nothing is built or downloaded: a DeepSpeed op is judged by its builder's ``is_compatible()``,
by a prebuilt or JIT-cached binary, and by the tool chain a JIT build needs (a C++ compiler,
ninja, nvcc for CUDA ops).

:func:`summary_line` is the cheap part (no op checks, no subprocesses, no GPU memory probe), which
the trainer logs on rank 0 at start, before the process group forms, so a run that hangs in its
first collective has already said what it ran on.

torch, DeepSpeed and transformers are imported inside the functions: ``import launcher.cli``
stays light, and a recipe error is reported before any of them loads.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import io
import json
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TextIO

from trainer.config import (
    JobConfig,
    build_config,
    deep_merge,
    parse_overrides,
    resolve_recipe,
    split_overrides,
)
from trainer.errors import ConfigError

if TYPE_CHECKING:
    from trainer.dist import DistInfo

Status = Literal["ok", "warn", "fail"]

GIB = 1024**3
# pyproject's requires-python.
MIN_PYTHON = (3, 10)
# The distributions a run imports (pyproject's dependencies that matter at run time).
CORE_PACKAGES = (
    "torch",
    "deepspeed",
    "transformers",
    "peft",
    "datasets",
    "pyarrow",
    "tokenizers",
    "safetensors",
)
# Free disk under output_dir. Below MIN a run dies at its first save for anything but a toy
# model (a 0.5B model's ZeRO checkpoint with its fp32 Adam state is ~8 GB); below LOW it cannot
# keep train.keep_last (3) such checkpoints plus the final hf/ export.
MIN_FREE_DISK_BYTES = 1 * GIB
LOW_FREE_DISK_BYTES = 32 * GIB
# GPU memory in use before we start, beyond what our own CUDA context takes (~0.5 GiB): another
# process holds the GPU, and a run sized for the whole memory would run out.
BUSY_GPU_BYTES = 2 * GIB


@dataclass(frozen=True)
class Finding:
    """One check's verdict: ``detail`` is the one-line finding, ``fix`` what to do (warn/fail)."""

    check: str
    status: Status
    detail: str
    fix: str = ""
    facts: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OpNeed:
    """A DeepSpeed op builder (by accelerator-neutral class name) and what in the job loads it."""

    builder: str
    needed_by: str | None  # None: this job does not load it (reported, never blocking)


# ---------------------------------------------------------------------------------- facts


def version_of(distribution: str) -> str | None:
    """An installed distribution's version, from its metadata (nothing is imported)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def first_line(exc: BaseException) -> str:
    """An exception as one line: its first non-empty line, else its type."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def gib(n_bytes: float) -> str:
    return f"{n_bytes / GIB:.1f} GiB"


def nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists: where ``output_dir`` will be created."""
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def on_gpu(dist: DistInfo) -> bool:
    return dist.device.startswith("cuda")


def resolved_precision(job: JobConfig, dist: DistInfo) -> str:
    """``model.dtype`` on this device, as the trainer resolves it (raises ConfigError)."""
    import torch

    from trainer.ds_config import resolve_precision

    gpu = on_gpu(dist)
    return resolve_precision(job.model.dtype, gpu, gpu and torch.cuda.is_bf16_supported())


def resolved_attention(job: JobConfig, dist: DistInfo, precision: str) -> str:
    """``model.attn_implementation`` on this device and precision (raises ConfigError)."""
    from trainer.model import select_attention

    return select_attention(job.model.attn_implementation, on_gpu(dist), precision)  # type: ignore[arg-type]


def nccl_version() -> str | None:
    import torch

    try:
        version = torch.cuda.nccl.version()
    except (AttributeError, RuntimeError):
        return None
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def cuda_summary(dist: DistInfo) -> str:
    """``12.8 (8x NVIDIA H200 140 GiB, nccl 2.27.3)``, or ``none (cpu, gloo)``."""
    import torch

    if not on_gpu(dist):
        built = torch.version.cuda
        where = f"cpu, {dist.backend}"
        return f"none ({where})" if built is None else f"{built} built, no GPU visible ({where})"
    props = torch.cuda.get_device_properties(torch.device(dist.device))
    nccl = nccl_version() if dist.backend == "nccl" else None
    backend = dist.backend + (f" {nccl}" if nccl else "")
    return (
        f"{torch.version.cuda} ({torch.cuda.device_count()}x {props.name} "
        f"{props.total_memory / GIB:.0f} GiB, {backend})"
    )


def summary_line(job: JobConfig, dist: DistInfo) -> str:
    """The environment in one line, for the top of every run's log (rank 0).

    Cheap by design: versions come from package metadata (DeepSpeed is not imported for it), no
    subprocess, no GPU memory probe, no op check. The attention backend comes from
    ``trainer.model.select_attention``, so the first call imports transformers (which the trainer
    imports next anyway). A dtype or attention backend that cannot run here shows as
    ``unusable``; the trainer raises the full error when it resolves them.
    """
    import torch

    try:
        precision = resolved_precision(job, dist)
    except ConfigError:
        precision, attention = (
            f"{job.model.dtype} (unusable here)",
            f"{job.model.attn_implementation} (unchecked)",
        )
    else:
        try:
            attention = resolved_attention(job, dist, precision)
        except ConfigError:
            attention = f"{job.model.attn_implementation} (unusable here)"
    flash = (
        "absent" if importlib.util.find_spec("flash_attn") is None else version_of("flash-attn") or "present"
    )
    existing = nearest_existing(Path(job.output_dir))
    fields = [
        f"python {platform.python_version()}",
        f"torch {torch.__version__}",
        f"deepspeed {version_of('deepspeed') or 'absent'}",
        f"transformers {version_of('transformers') or 'absent'}",
        f"cuda {cuda_summary(dist)}",
        f"attention {attention}",
        f"precision {precision}",
        f"flash-attn {flash}",
        f"free disk {gib(shutil.disk_usage(existing).free)} under {job.output_dir}",
    ]
    return "doctor: " + ", ".join(fields)


# ---------------------------------------------------------------------------------- checks


def check_python() -> Finding:
    version = platform.python_version()
    facts = {"version": version, "executable": sys.executable}
    detail = f"{version} ({sys.executable})"
    if sys.version_info < MIN_PYTHON:
        need = ".".join(map(str, MIN_PYTHON))
        return Finding("python", "fail", detail, f"dstrain needs Python >= {need}", facts)
    return Finding("python", "ok", detail, facts=facts)


def check_packages() -> Finding:
    versions = {name: version_of(name) for name in CORE_PACKAGES}
    missing = [name for name, v in versions.items() if v is None]
    detail = ", ".join(f"{name} {v}" for name, v in versions.items() if v is not None)
    if missing:
        return Finding(
            "packages",
            "fail",
            f"missing: {', '.join(missing)}" + (f" (found {detail})" if detail else ""),
            f"pip install {' '.join(missing)} (or pip install -e . in the dstrain checkout)",
            versions,
        )
    return Finding("packages", "ok", detail, facts=versions)


def check_gpus(dist: DistInfo) -> Finding:
    """The GPUs torch sees: name, memory, compute capability, memory already in use."""
    import torch

    facts: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "devices": []}
    if not on_gpu(dist):
        if torch.version.cuda is None:
            return Finding(
                "gpu",
                "warn",
                f"none: torch {torch.__version__} is a CPU build, so ranks run on the CPU with gloo "
                "(tests and tiny models)",
                "for GPUs, install a CUDA build of torch",
                facts,
            )
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        shown = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        return Finding(
            "gpu",
            "warn",
            f"none visible: torch {torch.__version__} is built for CUDA {torch.version.cuda} but sees no GPU{shown}",
            "check nvidia-smi, the driver, and CUDA_VISIBLE_DEVICES",
            facts,
        )
    devices = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        devices.append(
            {
                "index": index,
                "name": props.name,
                "total_bytes": total,
                "free_bytes": free,
                "capability": f"{props.major}.{props.minor}",
            }
        )
    facts["devices"] = devices
    names = sorted({d["name"] for d in devices})
    first = devices[0]
    detail = (
        f"{len(devices)}x {', '.join(names)} ({gib(first['total_bytes'])}, compute {first['capability']}), "
        f"torch {torch.__version__}, CUDA {torch.version.cuda}"
    )
    busy = [d for d in devices if d["total_bytes"] - d["free_bytes"] > BUSY_GPU_BYTES]
    if busy:
        used = ", ".join(f"GPU {d['index']}: {gib(d['total_bytes'] - d['free_bytes'])}" for d in busy)
        return Finding(
            "gpu",
            "warn",
            f"{detail}; memory already in use ({used})",
            "another process holds these GPUs (nvidia-smi shows which); a run sized for the whole memory runs out",
            facts,
        )
    if len(names) > 1:
        return Finding(
            "gpu", "warn", detail, "mixed GPU models: every rank runs at the pace of the slowest", facts
        )
    return Finding("gpu", "ok", detail, facts=facts)


def check_backend(dist: DistInfo) -> Finding:
    """The process-group backend the trainer uses here (``DistInfo.backend``) is built into torch."""
    import torch.distributed as tdist

    name = dist.backend
    if name == "nccl":
        available = tdist.is_available() and tdist.is_nccl_available()
        version = nccl_version()
    else:
        available = tdist.is_available() and tdist.is_gloo_available()
        version = None
    facts = {"backend": name, "available": available, "version": version}
    if not available:
        return Finding(
            "backend",
            "fail",
            f"{name} is not available in this torch build",
            "install a torch build with distributed support"
            + (" and NCCL (the Linux CUDA wheels have it)" if name == "nccl" else ""),
            facts,
        )
    return Finding("backend", "ok", name + (f" {version}" if version else ""), facts=facts)


def check_deepspeed(dist: DistInfo) -> tuple[Finding, Any]:
    """DeepSpeed imports and its accelerator matches torch's device; returns the accelerator."""
    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()
    except Exception as exc:  # a broken install fails in many ways: ImportError, a CUDA mismatch...
        return (
            Finding(
                "deepspeed",
                "fail",
                f"import failed: {first_line(exc)}",
                "reinstall deepspeed against this torch (pip install --force-reinstall deepspeed)",
                {"version": version_of("deepspeed")},
            ),
            None,
        )
    name = accelerator.device_name()
    expected = "cuda" if on_gpu(dist) else "cpu"
    facts = {
        "version": deepspeed.__version__,
        "accelerator": name,
        "comm_backend": accelerator.communication_backend_name(),
    }
    detail = f"{deepspeed.__version__}, accelerator {name}, comm {facts['comm_backend']}"
    if name != expected:
        forced = os.environ.get("DS_ACCELERATOR")
        sees = "CUDA GPUs" if expected == "cuda" else "no CUDA GPU"
        return (
            Finding(
                "deepspeed",
                "fail",
                f"{detail}, but torch sees {sees}",
                f"unset DS_ACCELERATOR (it is {forced!r})"
                if forced
                else f"make DeepSpeed pick {expected} (DS_ACCELERATOR={expected})",
                facts,
            ),
            None,
        )
    return Finding("deepspeed", "ok", detail, facts=facts), accelerator


def ops_for(job: JobConfig, gpu: bool) -> list[OpNeed]:
    """The DeepSpeed ops this job loads, and the ones it does not (reported, never blocking)."""
    offload = job.zero.offload_optimizer
    ops = []
    if not gpu:
        # DeepSpeed's CPU accelerator builds its shared-memory all-reduce at init_distributed.
        ops.append(OpNeed("ShareMemCommBuilder", "every CPU run (DeepSpeed loads it at init)"))
    ops.append(OpNeed("CPUAdamBuilder", "zero.offload_optimizer (CPU Adam)" if offload else None))
    muon = job.optim.name == "muon" and not offload
    ops.append(OpNeed("FusedAdamBuilder", "optim.name muon (its Adam half)" if muon else None))
    return ops


def jit_build_dir(op_name: str) -> Path:
    """Where torch JIT-builds ``op_name`` (the layout of torch's private ``_get_build_directory``,
    recomputed because that function creates the directory)."""
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        if torch.version.hip is not None:
            accelerator = f"rocm{torch.version.hip.replace('.', '')}"
        elif torch.version.cuda is not None:
            accelerator = f"cu{torch.version.cuda.replace('.', '')}"
        else:
            accelerator = "cpu"
        python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
        root = os.path.join(get_default_build_root(), f"{python}_{accelerator}")
    return Path(root) / op_name


def jit_missing_tools(builder: Any) -> list[str]:
    """What a JIT build of ``builder`` would need and this machine lacks."""
    import torch
    from deepspeed.ops.op_builder.builder import CUDAOpBuilder
    from torch.utils.cpp_extension import CUDA_HOME, get_cxx_compiler, is_ninja_available

    missing = []
    compiler = get_cxx_compiler()
    if shutil.which(compiler) is None:
        missing.append(f"a C++ compiler ({compiler} is not on PATH)")
    if not is_ninja_available():
        missing.append("ninja")
    if isinstance(builder, CUDAOpBuilder) and torch.cuda.is_available() and CUDA_HOME is None:
        missing.append("nvcc (no CUDA toolkit found: set CUDA_HOME)")
    return missing


def check_op(accelerator: Any, need: OpNeed) -> Finding:
    """Can DeepSpeed load this op here without surprises: prebuilt, JIT-cached, or buildable?"""
    from deepspeed.git_version_info import accelerator_name, installed_ops

    builder = accelerator.create_op_builder(need.builder)
    severity: Status = "fail" if need.needed_by else "warn"
    role = f"needed by {need.needed_by}" if need.needed_by else "not used by this job"
    if builder is None:
        return Finding(
            f"op {need.builder}",
            severity,
            f"DeepSpeed has no {need.builder} for the {accelerator.device_name()} accelerator; {role}",
            "change the setting that needs it" if need.needed_by else "",
        )
    name = builder.NAME
    said = io.StringIO()
    with contextlib.redirect_stdout(said):  # builders print their reasons
        compatible = bool(builder.is_compatible(verbose=False))
    reason = getattr(builder, "error_log", None) or said.getvalue().strip()
    build_dir = jit_build_dir(name)
    # DeepSpeed's own test in OpBuilder.load(): built at install time for this accelerator.
    prebuilt = bool(installed_ops.get(name)) and accelerator_name == accelerator._name
    cached = (build_dir / f"{name}.so").is_file()
    facts = {
        "needed_by": need.needed_by,
        "compatible": compatible,
        "prebuilt": prebuilt,
        "jit_cached": cached,
        "build_dir": str(build_dir),
    }
    check = f"op {name}"
    if not compatible:
        why = f" ({reason.splitlines()[0]})" if reason else ""
        if need.builder == "ShareMemCommBuilder":  # DeepSpeed then all-reduces with plain gloo
            return Finding(check, "ok", f"not supported here{why}: DeepSpeed uses plain gloo", facts=facts)
        return Finding(
            check,
            severity,
            f"not compatible with this machine{why}; {role}",
            f"turn off {need.needed_by}" if need.needed_by else "",
            facts,
        )
    if prebuilt:
        return Finding(check, "ok", f"prebuilt in the DeepSpeed install; {role}", facts=facts)
    if cached:
        if (build_dir / "lock").exists():
            return Finding(
                check,
                "warn",
                f"built, but {build_dir / 'lock'} exists; {role}",
                "a build is running, or a killed one left the lock (the trainer removes it once "
                "$DSTRAIN_STALE_LOCK_S old, default 600 s)",
                facts,
            )
        return Finding(check, "ok", f"built (JIT cache); {role}", facts=facts)
    missing = jit_missing_tools(builder)
    facts["missing_tools"] = missing
    if missing:
        return Finding(
            check,
            severity,
            f"not built, and building it needs {', '.join(missing)}; {role}",
            f"install them (apt-get install g++ ninja-build), or use a DeepSpeed built with {builder.BUILD_VAR}=1",
            facts,
        )
    return Finding(
        check, "ok", f"not built yet: JIT-builds on first use (minutes, once); {role}", facts=facts
    )


def check_flash_attn(job: JobConfig, dist: DistInfo, attention: str | None) -> Finding:
    """flash-attn imports (a wheel built for another torch or CUDA fails only at import)."""
    facts: dict[str, Any] = {"installed": False, "version": None}
    wanted = job.model.attn_implementation == "flash_attention_2"
    if importlib.util.find_spec("flash_attn") is None:
        if on_gpu(dist) or wanted:
            return Finding(
                "flash-attn",
                "warn",
                "absent: model.attn_implementation auto uses sdpa",
                "pip install 'dstrain[flash]' for flash-attention-2 on bf16/fp16 GPUs",
                facts,
            )
        return Finding("flash-attn", "ok", "absent (it is only used on CUDA GPUs)", facts=facts)
    facts["installed"] = True
    try:
        import flash_attn
    except Exception as exc:  # a binary built for another torch/CUDA raises anything at import
        return Finding(
            "flash-attn",
            "fail" if attention == "flash_attention_2" else "warn",
            f"installed but does not import: {first_line(exc)}",
            "reinstall it against this torch and CUDA (pip install --force-reinstall --no-build-isolation flash-attn)",
            facts,
        )
    facts["version"] = getattr(flash_attn, "__version__", None)
    return Finding("flash-attn", "ok", str(facts["version"]), facts=facts)


def check_precision(job: JobConfig, dist: DistInfo) -> tuple[Finding, str | None]:
    facts: dict[str, Any] = {"requested": job.model.dtype, "resolved": None}
    try:
        precision = resolved_precision(job, dist)
    except ConfigError as exc:
        detail = f"model.dtype {job.model.dtype} cannot run on this machine"
        return Finding("precision", "fail", detail, str(exc), facts), None
    facts["resolved"] = precision
    detail = f"model.dtype {job.model.dtype} -> {precision}"
    if on_gpu(dist) and precision == "fp32":
        import torch

        better = "bf16" if torch.cuda.is_bf16_supported() else "fp16 (this GPU has no bf16)"
        return (
            Finding(
                "precision",
                "warn",
                f"{detail} on a GPU: several times slower than 16-bit",
                f"--model.dtype {better}",
                facts,
            ),
            precision,
        )
    return Finding("precision", "ok", detail, facts=facts), precision


def check_attention(job: JobConfig, dist: DistInfo, precision: str | None) -> tuple[Finding, str | None]:
    requested = job.model.attn_implementation
    facts: dict[str, Any] = {"requested": requested, "resolved": None}
    if precision is None:
        return (
            Finding(
                "attention",
                "warn",
                f"model.attn_implementation {requested}: unchecked",
                "fix precision first",
                facts,
            ),
            None,
        )
    try:
        attention = resolved_attention(job, dist, precision)
    except ConfigError as exc:
        detail = f"model.attn_implementation {requested} cannot run on this machine"
        return Finding("attention", "fail", detail, str(exc), facts), None
    facts["resolved"] = attention
    return Finding(
        "attention", "ok", f"model.attn_implementation {requested} -> {attention}", facts=facts
    ), attention


def check_zero(job: JobConfig, dist: DistInfo, precision: str | None) -> Finding:
    """The DeepSpeed config this job generates (``build_ds_config`` refuses some combinations)."""
    from trainer.ds_config import build_ds_config

    zero = job.zero
    offload = [
        name for name, on in (("optimizer", zero.offload_optimizer), ("params", zero.offload_params)) if on
    ]
    if zero.offload_optimizer:
        optimizer = "DeepSpeed CPU Adam"
    elif job.optim.name == "muon":
        optimizer = "DeepSpeed Muon"
    else:
        optimizer = "torch AdamW"
    facts = {"stage": zero.stage, "offload": offload, "optimizer": optimizer}
    detail = f"ZeRO-{zero.stage}, offload {' + '.join(offload) or 'none'}, {optimizer}"
    if "auto" in (zero.stage, job.train.micro_batch_size):
        # The ranks choose at start, for the GPUs they find (trainer/planner.py).
        detail = f"zero.stage {zero.stage}, micro-batch {job.train.micro_batch_size}: chosen at start ({optimizer})"
        return Finding("zero", "ok", detail, facts=facts)
    try:
        # The precision only shapes the fp16/bf16 blocks; fp32 stands in when it does not resolve.
        build_ds_config(job, precision or "fp32", on_gpu(dist))  # type: ignore[arg-type]
    except ConfigError as exc:
        return Finding("zero", "fail", f"{detail}: DeepSpeed config refused", str(exc), facts)
    return Finding("zero", "ok", detail, facts=facts)


def check_disk(output_dir: str) -> Finding:
    """``output_dir`` can be created and written, with room for checkpoints."""
    existing = nearest_existing(Path(output_dir))
    facts: dict[str, Any] = {"output_dir": output_dir, "checked": str(existing)}
    if not existing.is_dir():
        return Finding(
            "disk",
            "fail",
            f"{existing} is a file, so output_dir {output_dir} cannot be created",
            "choose another --output_dir",
            facts,
        )
    usage = shutil.disk_usage(existing)
    facts.update(free_bytes=usage.free, total_bytes=usage.total)
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        return Finding(
            "disk",
            "fail",
            f"cannot write under {existing} ({exc.strerror or exc})",
            "choose a writable --output_dir (the run writes logs, checkpoints and hf/ there)",
            facts,
        )
    detail = f"{gib(usage.free)} free of {gib(usage.total)} under {existing}"
    if usage.free < MIN_FREE_DISK_BYTES:
        return Finding(
            "disk", "fail", detail, "free space, or choose an --output_dir on a larger filesystem", facts
        )
    if usage.free < LOW_FREE_DISK_BYTES:
        return Finding(
            "disk",
            "warn",
            detail,
            "enough for small models only: checkpoints of a 0.5B model are ~8 GB each (train.keep_last of them)",
            facts,
        )
    return Finding("disk", "ok", detail, facts=facts)


def check_host() -> Finding:
    """CPU cores and memory (what CPU ranks, dataloader workers and offload share)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    available = None
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    facts = {"cpu_cores": cores, "memory_bytes": total, "available_bytes": available}
    detail = f"{cores} CPU cores, {gib(total)} memory" + (
        f" ({gib(available)} available)" if available else ""
    )
    return Finding("host", "ok", detail, facts=facts)


def diagnose(job: JobConfig) -> tuple[list[Finding], str]:
    """Every check in reading order, and the summary line; a torch or DeepSpeed failure skips
    the checks that need it."""
    findings = [check_python(), check_packages()]
    try:
        import torch  # noqa: F401

        from trainer.dist import DistInfo
    except Exception as exc:  # a broken torch install raises anything at import
        findings.append(
            Finding("torch", "fail", f"import failed: {first_line(exc)}", "reinstall torch for this Python")
        )
        return findings, "doctor: torch does not import"
    dist = DistInfo.from_env()
    findings += [check_gpus(dist), check_backend(dist)]
    deepspeed_finding, accelerator = check_deepspeed(dist)
    findings.append(deepspeed_finding)
    if accelerator is not None:
        findings += [check_op(accelerator, need) for need in ops_for(job, on_gpu(dist))]
    precision_finding, precision = check_precision(job, dist)
    attention_finding, attention = check_attention(job, dist, precision)
    findings += [
        check_flash_attn(job, dist, attention),
        precision_finding,
        attention_finding,
        check_zero(job, dist, precision),
        check_disk(job.output_dir),
        check_host(),
    ]
    return findings, summary_line(job, dist)


# ---------------------------------------------------------------------------------- command


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """While active, whatever is written to stdout (file descriptor 1 included) goes to stderr:
    DeepSpeed's logger writes to stdout and builders print, but stdout must hold only the report."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


STATUS_STYLE = {"ok": "green", "warn": "yellow", "fail": "bold red"}


def print_report(findings: list[Finding], summary: str, stream: TextIO, as_json: bool) -> None:
    """JSON, a rich table (a terminal), or plain aligned lines."""
    blocking = [f.check for f in findings if f.status == "fail"]
    if as_json:
        report = {
            "ok": not blocking,
            "blocking": blocking,
            "summary": summary,
            "checks": [asdict(f) for f in findings],
        }
        stream.write(json.dumps(report, indent=2) + "\n")
        return
    warnings = sum(f.status == "warn" for f in findings)
    verdict = (
        f"blocking: {', '.join(blocking)}" if blocking else "nothing blocks a run"
    ) + f" ({warnings} warning{'s' * (warnings != 1)})"
    if stream.isatty():
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        table = Table(title="dstrain doctor", caption=escape(summary))
        table.add_column("check", no_wrap=True)
        table.add_column("status")
        table.add_column("finding (and what to do)", overflow="fold")
        for f in findings:
            style = STATUS_STYLE[f.status]
            text = escape(f.detail) + (f"\n[{style}]-> {escape(f.fix)}[/{style}]" if f.fix else "")
            table.add_row(f.check, f"[{style}]{f.status}[/{style}]", text)
        console = Console(file=stream, highlight=False)
        console.print(table)
        console.print(escape(verdict), style="bold red" if blocking else "green")
        return
    width = max(len(f.check) for f in findings)
    lines = [summary]
    for f in findings:
        lines.append(f"{f.status:<4}  {f.check:<{width}}  {f.detail}")
        if f.fix:
            lines.append(f"{'':<4}  {'':<{width}}  fix: {f.fix}")
    lines.append(verdict)
    stream.write("\n".join(lines) + "\n")


def load_job(recipe: str | None, overrides: dict[str, Any]) -> JobConfig:
    """The recipe (or the config defaults) with overrides; the tokenizer is never loaded."""
    if recipe is not None:
        return build_config(config_path=resolve_recipe(recipe), overrides=overrides)
    return build_config(base={"tokenizer": "unused"}, overrides=overrides)


def doctor_main(argv: list[str] | None = None) -> int:
    """``dstrain doctor``: 0 when nothing blocks a run, 1 when something does (named on stderr).

    A DstrainError (bad recipe or override) propagates to ``dstrain``'s one-line error, exit 2.
    """
    parser = argparse.ArgumentParser(
        prog="dstrain doctor",
        description="Check that this machine can run a recipe: Python, torch, CUDA and GPUs, nccl/gloo, "
        "DeepSpeed and the ops the recipe loads, flash-attn, the precision and attention backend "
        "that auto picks, free disk under output_dir. Exit 0: nothing blocks; 1: something does.",
        epilog="Example: dstrain doctor pretrain --zero.offload_optimizer true --json",
        allow_abbrev=False,
    )
    parser.add_argument(
        "recipe",
        nargs="?",
        metavar="RECIPE",
        help="Recipe YAML file or built-in name (default: the config defaults).",
    )
    parser.add_argument("--json", action="store_true", help="Print the report as JSON.")
    parser.add_argument(
        "--output-dir",
        "--output_dir",
        dest="output_dir",
        default=None,
        help="Check the disk under this directory instead of the recipe's output_dir.",
    )
    own, overrides = split_overrides(parser, sys.argv[1:] if argv is None else list(argv))
    args = parser.parse_args(own)
    extra = parse_overrides(overrides)
    if args.output_dir is not None:
        extra = deep_merge(extra, {"output_dir": args.output_dir})
    job = load_job(args.recipe, extra)
    with stdout_to_stderr():
        findings, summary = diagnose(job)
    print_report(findings, summary, sys.stdout, args.json)
    sys.stdout.flush()
    blocking = [f.check for f in findings if f.status == "fail"]
    if blocking:
        print(f"dstrain doctor: blocking: {', '.join(blocking)}", file=sys.stderr)
        return 1
    return 0
