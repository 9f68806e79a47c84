"""Checkpoints that never lie: atomic saves of named stateful parts, resume resolution, pruning.

Layout under ``<output_dir>/checkpoints/``::

    step_<N>/                 one save
      <DeepSpeed files>       the engine (model, optimizer, scheduler), from save_checkpoint
      dstrain_rank<R>.pt      rank R's parts (data position, RNG states): {"parts": {name: state}}
      trainer_state.json      the shared parts (the Trainer's counters), world size, precision, version
      run.yaml                the resolved config of the run that saved it
      hf_config/  tokenizer/  what `dstrain export` needs to rebuild an HF model offline
      COMPLETE                written by rank 0 after every rank finished writing
    latest                    "step_<N>", replaced atomically after COMPLETE exists

A directory without ``COMPLETE`` is never loaded (a crash or a kill in the middle of a save
leaves one); ``latest`` only moves once the new save is complete, and pruning happens after.
The :class:`Checkpointer` knows the parts only by name and protocol (``trainer.state``): the
engine (DeepSpeed writes its own files, collectively), shared parts and per-rank parts.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pickle
import random
import shutil
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.ckpt_layout import (
    COMPLETE,
    LATEST,
    MANIFEST,
    TRAINER_STATE,
    complete_newest_first,
    is_complete,
    list_checkpoints,
    newest_complete,
    step_of,
)
from trainer.config import JobConfig, build_config
from trainer.dist import DistInfo, all_gather_objects, barrier, collective
from trainer.errors import CheckpointError, DistError
from trainer.faults import fault
from trainer.state import RankStateful, RankStates, Stateful

log = logging.getLogger("dstrain")

STATE_VERSION = 2
ONE_PROCESS = DistInfo()  # offline tools (dstrain export/ckpt) verify on their own


# ---------------------------------------------------------------- RNG


class RNGState:
    """This rank's python, numpy, torch (and CUDA) generators, as a per-rank part.

    The state holds tensors, ints and lists only, so it loads with ``torch.load(weights_only=True)``.
    A rank that did not exist in the saved run (a larger world size) takes rank 0's state.
    """

    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state = {
            "python": random.getstate(),
            "numpy": [kind, torch.from_numpy(keys.copy()), pos, has_gauss, cached],
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])

    def load_rank_states(self, states: RankStates) -> None:
        self.load_state_dict(states.own if states.own is not None else states.read(0))


def _crc32(path: Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 23):
            crc = zlib.crc32(chunk, crc)
    return crc


class _ChecksummingWriter:
    """A file that checksums what passes through it: torch.save writes its zip front to back
    through ``write`` (no seeks), so the crc32 of the bytes written is the file's, without
    reading it back. A full disk surfaces as the OSError (ENOSPC) that ``write`` raised (see
    :func:`save_with_crc`), not as torch's errno-less RuntimeError."""

    def __init__(self, f: Any) -> None:
        self.f, self.crc, self.size = f, 0, 0
        self.error: OSError | None = None  # torch turns it into an errno-less RuntimeError

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.crc = zlib.crc32(view, self.crc)
        self.size += view.nbytes
        done = 0
        try:
            while done < view.nbytes:  # an unbuffered write may be short; a full disk then raises
                done += self.f.write(view[done:])
        except OSError as exc:
            self.error = exc
            raise
        return view.nbytes

    def flush(self) -> None:
        pass  # unbuffered


def save_with_crc(obj: Any, path: str | Path) -> tuple[int, int]:
    """``torch.save(obj, path)``, fsynced; returns the file's (size, crc32)."""
    with open(path, "wb", buffering=0) as f:
        writer = _ChecksummingWriter(f)
        try:
            torch.save(obj, writer)
        except RuntimeError:
            if writer.error is not None:
                raise writer.error from None
            raise
        os.fsync(f.fileno())
    return writer.size, writer.crc


def checkpoint_files(path: Path) -> list[Path]:
    """The files a save wrote (what its manifest covers), sorted; not the markers, nor a
    universal conversion made later inside it."""
    skip = {path / COMPLETE, path / MANIFEST}
    return sorted(
        f
        for f in path.rglob("*")
        if f.is_file() and f not in skip and "universal" not in f.relative_to(path).parts[:1]
    )


def file_records(
    path: Path, dist: DistInfo, written: dict[str, tuple[int, int]] | None = None
) -> dict[str, list[int]]:
    """``{relative path: [size, crc32]}`` of every file of ``path`` (collective).

    ``written``: this rank's files checksummed as they were written (absolute path -> size,
    crc32); only the files no rank checksummed that way (the small ones: JSON, YAML, the
    tokenizer) are read back, each rank reading a share."""
    merged: dict[str, list[int]] = {}
    for part in all_gather_objects(written or {}, dist, "the checkpoint manifest"):
        for name, (size, crc) in part.items():
            rel = os.path.relpath(os.path.abspath(name), os.path.abspath(path))
            if not rel.startswith(".."):  # else it is read back below, like the small files
                merged[rel] = [size, crc]
    rest = [f for f in checkpoint_files(path) if str(f.relative_to(path)) not in merged]
    mine = {
        str(f.relative_to(path)): [f.stat().st_size, _crc32(f)] for f in rest[dist.rank :: dist.world_size]
    }
    for part in all_gather_objects(mine, dist, "the checkpoint manifest"):
        merged.update(part)
    return merged


def verify(path: Path, dist: DistInfo = ONE_PROCESS, full: bool = False) -> str | None:
    """The first problem with ``path``'s files against its manifest (a missing or truncated
    file; with ``full`` a corrupted one too, by crc32), or None when every file is as it was
    saved. Collective when distributed.

    The sizes cost a ``stat`` per file; ``full`` reads every byte (a 7B run's checkpoint is
    ~100 GB): asked for with ``--verify-checkpoint full``, and done after a failed load."""
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        return f"{manifest_path} cannot be read ({exc})"
    problems = []
    for rel, (size, crc) in sorted(manifest.items())[dist.rank :: dist.world_size]:
        f = path / rel
        if not f.is_file():
            problems.append(f"{f} is missing")
        elif f.stat().st_size != size:
            problems.append(f"{f} has {f.stat().st_size} bytes, {size} were saved (truncated)")
        elif full and _crc32(f) != crc:
            problems.append(f"{f} does not match its checksum (corrupted)")
    found = sorted(p for part in all_gather_objects(problems, dist) for p in part)
    return found[0] if found else None


def check_pickles(path: Path, dist: DistInfo = ONE_PROCESS) -> None:
    """Refuse ``path`` (one line) when a pickle in it imports a global outside
    :data:`trainer.safe_load.ALLOWED`, before DeepSpeed unpickles it with weights_only=False.
    Each rank scans a share of the files (collective); only the pickles are read."""
    from trainer.safe_load import check_files, pickle_files

    mine = check_files(pickle_files(path)[dist.rank :: dist.world_size])
    found = [p for p in all_gather_objects(mine, dist, "the checkpoint check") if p is not None]
    if found:
        raise CheckpointError(found[0])


def resolve_resume(
    arg: str | None,
    output_dir: str | Path,
    dist: DistInfo = ONE_PROCESS,
    full_verify: bool = False,
    trust: bool = False,
) -> Path | None:
    """``--resume`` semantics: None = fresh; "latest" = the newest intact checkpoint (one must
    exist); "auto" = the newest intact checkpoint or fresh; anything else = that checkpoint dir.

    Every candidate is verified against its manifest first (sizes; every crc32 with
    ``full_verify``): a damaged newest checkpoint is reported (naming the file) and the previous
    complete one is taken, never garbage. An explicit PATH that is damaged is an error. The one
    taken is then scanned for unsafe pickles (:func:`check_pickles`) unless ``trust``: a refused
    checkpoint is an error, never a reason to fall back. Collective when distributed.
    """
    path = _resolve_resume(arg, output_dir, dist, full_verify)
    if path is not None and not trust:
        check_pickles(path, dist)
    return path


def _resolve_resume(arg: str | None, output_dir: str | Path, dist: DistInfo, full: bool) -> Path | None:
    if arg is None:
        return None
    root = Path(output_dir) / "checkpoints"
    if arg in ("latest", "auto"):
        candidates = complete_newest_first(root)
        for path in candidates:
            problem = verify(path, dist, full)
            if problem is None:
                if path != candidates[0]:
                    log.warning("resuming from %s, the newest intact checkpoint", path)
                return path
            log.warning(
                "checkpoint %s is damaged: %s; falling back to the previous complete one", path, problem
            )
        if candidates:
            raise CheckpointError(
                f"--resume: every checkpoint under {root} is damaged (the newest: {verify(candidates[0], dist, full)}); "
                "start a new output_dir, or export what is readable with dstrain export"
            )
        if arg == "latest":
            raise CheckpointError(
                f"--resume: no complete checkpoint under {root}; use --resume auto to start fresh"
            )
        return None
    path = Path(arg)
    if not path.is_dir():
        raise CheckpointError(f"--resume {arg}: no such checkpoint directory")
    if not is_complete(path):
        raise CheckpointError(
            f"--resume {arg}: checkpoint is incomplete (no {COMPLETE} marker); pick an older one"
        )
    problem = verify(path, dist, full)
    if problem is not None:
        raise CheckpointError(f"--resume {arg}: the checkpoint is damaged: {problem}; pick an older one")
    return path


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def read_meta(path: Path) -> dict[str, Any]:
    """A checkpoint's ``trainer_state.json`` (version, world size, precision, shared parts)."""
    try:
        meta = json.loads((path / TRAINER_STATE).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path / TRAINER_STATE} cannot be read ({exc}); resume from another checkpoint"
        ) from None
    if meta.get("version") != STATE_VERSION:
        raise CheckpointError(
            f"{path} was written with checkpoint format {meta.get('version')}, this dstrain reads "
            f"{STATE_VERSION}; resume it with the dstrain version that wrote it, or export it and start a new run"
        )
    return meta


def check_zero_stage(path: Path, zero_stage: int) -> None:
    """An error, before anything is built, for a ``zero.stage`` change DeepSpeed cannot load.

    DeepSpeed's ZeRO-0 engine loads no universal checkpoint, so nothing sharded goes back to
    ZeRO-0. ZeRO-3 names its model-state files per rank
    (``zero_pp_rank_R_mp_rank_00_model_states.pt``) where ZeRO-0/1/2 write one
    ``mp_rank_00_model_states.pt``, and DeepSpeed 0.19.8's universal load looks for the file
    names of the stage it loads into (tried: 2 -> 3 fails in ``load_checkpoint``), so the ZeRO-3
    boundary is not crossed either. From 0 to 1 or 2, between 1 and 2, and to any world size
    within a stage, the universal format carries it (:func:`needs_universal`)."""
    saved_stage = int(read_meta(path)["zero_stage"])
    if saved_stage == zero_stage or (saved_stage == 0 and zero_stage in (1, 2)):
        return
    if zero_stage == 0 or 3 in (saved_stage, zero_stage):
        why = (
            "DeepSpeed's ZeRO-0 engine cannot load a sharded optimizer state"
            if zero_stage == 0
            else "DeepSpeed's universal format (dstrain ckpt to-universal) converts across world "
            "sizes and from ZeRO 0 to 1 or 2, not across ZeRO-3's per-rank files"
        )
        raise CheckpointError(
            f"{path} was saved with zero.stage {saved_stage} and this run uses {zero_stage}: {why}; "
            f"resume with --zero.stage {saved_stage}, or export the weights (dstrain export) and "
            "start a cpt run from them"
        )


def needs_universal(path: Path, world_size: int, zero_stage: int) -> bool:
    """Whether loading ``path`` into this run needs DeepSpeed's universal format: ZeRO-1/2/3
    shards are laid out for one world size and stage. A ZeRO-0 checkpoint holds the whole model
    and optimizer in one file that a ZeRO-0 run of any world size loads as it is; a ZeRO-1/2 run
    loads it sharded (:mod:`trainer.zero0_universal`). A stage change that cannot be loaded at
    all is an error (:func:`check_zero_stage`)."""
    check_zero_stage(path, zero_stage)
    meta = read_meta(path)
    saved_world, saved_stage = int(meta["world_size"]), int(meta["zero_stage"])
    if saved_stage == 0:
        return zero_stage != 0
    return saved_world != world_size or saved_stage != zero_stage


def saved_config(path: Path) -> JobConfig:
    """The resolved config that the checkpoint's run trained with."""
    return build_config(config_path=path / "run.yaml")


def to_universal(ckpt: Path, out: Path) -> Path:
    """Convert with DeepSpeed's ds_to_universal (possible because every save carries the
    universal_checkpoint_info client state)."""
    if not is_complete(ckpt):
        raise CheckpointError(f"{ckpt} is not a complete checkpoint (no {COMPLETE} marker)")
    if int(read_meta(ckpt)["zero_stage"]) == 0:
        raise CheckpointError(
            f"{ckpt} is a ZeRO-0 checkpoint: a zero.stage 0 run of any world size loads it as it "
            "is, and a --resume at zero.stage 1 or 2 converts it itself"
        )
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(ckpt),
        "--output_folder",
        str(tmp),
        "--num_extract_workers",
        "1",
        "--num_merge_workers",
        "1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise CheckpointError(f"ds_to_universal failed on {ckpt}: {last}")
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return out


def prepare_universal(path: Path, dist: DistInfo, group_names: list[list[str]]) -> Path:
    """``<ckpt>/universal``, converted once by rank 0 while the others wait (collective).
    ``group_names``: the optimizer groups' parameter names, which a ZeRO-0 save needs
    (:mod:`trainer.zero0_universal`)."""
    target = path / "universal"
    if dist.is_main and not (target / "zero").is_dir():
        log.warning("converting %s to a universal checkpoint for %d rank(s)", path, dist.world_size)
        if int(read_meta(path)["zero_stage"]) == 0:
            from trainer.zero0_universal import zero0_to_universal

            zero0_to_universal(path, target, group_names)
        else:
            to_universal(path, target)
    barrier(dist)
    return target


# ---------------------------------------------------------------- config changes on resume

ARCHITECTURE_KEYS = ("model.config", "model.name_or_path", "model.overrides", "tokenizer", "stage")
# What the adapters' shapes and their scale are made of: a LoRA checkpoint holds them and nothing
# else, so a change would load a part of them, or none, into the wrong places without an error.
LORA_KEYS = ("lora.enabled", "lora.r", "lora.alpha", "lora.target_modules", "lora.modules_to_save")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key != "overrides":
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def config_diff(saved: JobConfig, current: JobConfig) -> dict[str, tuple[Any, Any]]:
    a, b = flatten(saved.to_dict()), flatten(current.to_dict())
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def check_resume_config(saved: JobConfig, current: JobConfig) -> dict[str, tuple[Any, Any]]:
    """Log the differences; an architecture or LoRA-setup change is an error. Returns the diff.

    What a change means for the data is the data part's decision (its fingerprint): same
    position, the position re-dealt (world size, workers, micro-batch, buffer), or its epoch
    restarted (files, sequence length, packing, seed...).
    """
    diff = config_diff(saved, current)
    for key, (old, new) in diff.items():
        log.warning("config changed since the checkpoint: %s: %r -> %r", key, old, new)
    arch = [k for k in diff if k.startswith(ARCHITECTURE_KEYS)]
    if arch:
        old, new = diff[arch[0]]
        raise CheckpointError(
            f"cannot resume: {arch[0]} changed from {old!r} to {new!r}; the architecture must match the "
            "checkpoint (start a new output_dir, or use stage cpt to start from exported weights)"
        )
    lora = [k for k in diff if k in LORA_KEYS] if saved.lora.enabled or current.lora.enabled else []
    if lora:
        old, new = diff[lora[0]]
        raise CheckpointError(
            f"cannot resume: {lora[0]} changed from {old!r} to {new!r}; the LoRA setup must match the "
            "checkpoint's adapters (resume with the saved value, or start a new output_dir from "
            "`dstrain export CKPT OUT --merge`)"
        )
    if any(k.startswith(("optim.", "schedule.", "train.max_steps", "train.epochs")) for k in diff):
        log.warning("optimizer/schedule settings changed: the new values apply from the resumed step on")
    return diff


# ---------------------------------------------------------------- the base behind a LoRA run

BASE_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
SAMPLE_BYTES = 1 << 16
SAMPLES_PER_FILE = 16


def base_dir(name_or_path: str | None) -> Path | None:
    """The local directory of ``model.name_or_path``: the path itself, or a hub id's snapshot in
    the local Hugging Face cache (no network); None when it is not on this machine (yet)."""
    if name_or_path is None:
        return None
    path = Path(str(name_or_path)).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    cached = try_to_load_from_cache(str(name_or_path), "config.json")
    return Path(cached).parent if isinstance(cached, str) else None


def _sampled_digest(f: Path, h: Any) -> None:
    """Feed ``h`` with the file's name, size and 16 evenly spaced 64 KiB samples, head and tail
    included (the whole file when it is small): a different checkpoint of the same shape differs in nearly every
    weight, so every sample tells them apart; a few MB read instead of the whole file."""
    size = f.stat().st_size
    h.update(f"{f.name}:{size}:".encode())
    with f.open("rb") as fh:
        if size <= 2 * SAMPLE_BYTES * SAMPLES_PER_FILE:
            h.update(fh.read())
            return
        last = size - SAMPLE_BYTES
        for offset in sorted({last * i // (SAMPLES_PER_FILE - 1) for i in range(SAMPLES_PER_FILE)}):
            fh.seek(offset)
            h.update(fh.read(SAMPLE_BYTES))


def base_fingerprint(name_or_path: str | None) -> str | None:
    """A sha256 over the base's config.json and sampled weight files (see :func:`_sampled_digest`),
    or None when there is no base or it is not on this machine."""
    import hashlib

    path = base_dir(name_or_path)
    if path is None:
        return None
    files = sorted(
        f
        for f in path.iterdir()
        if f.is_file() and (f.name == "config.json" or f.suffix in BASE_WEIGHT_SUFFIXES)
    )
    h = hashlib.sha256()
    for f in files:
        _sampled_digest(f.resolve(), h)  # a hub snapshot links to its blobs
    return h.hexdigest()


def check_base(path: Path, job: JobConfig) -> bool:
    """For a LoRA run (its checkpoint leaves the base out), an error when the weights behind
    ``model.name_or_path`` are not the ones the checkpoint was saved with. Returns False when
    the base is not on this machine yet (a hub id not downloaded): call again after the model
    is built. A checkpoint that recorded no fingerprint (an older dstrain) is not checked."""
    if not job.lora.enabled:
        return True
    saved = read_meta(path).get("base_fingerprint")
    if saved is None:
        log.warning("%s records no fingerprint of its base model: the base cannot be checked", path)
        return True
    current = base_fingerprint(job.model.name_or_path)
    if current is None:
        return False
    if current != saved:
        raise CheckpointError(
            f"the weights behind model.name_or_path {job.model.name_or_path} are not the "
            f"base {path} was trained on (its config or weight files differ: another revision or "
            "another model); point model.name_or_path at the original base, or start a new output_dir"
        )
    return True


def check_resume(path: Path, job: JobConfig) -> bool:
    """Everything a resume checks before anything is built: the config (:func:`check_resume_config`),
    the ZeRO stage (:func:`check_zero_stage`) and, for LoRA, the base (:func:`check_base`, whose
    return value this passes on)."""
    check_resume_config(saved_config(path), job)
    check_zero_stage(path, job.zero.stage)
    return check_base(path, job)


# ---------------------------------------------------------------- save / load


@contextlib.contextmanager
def _checksummed_engine_saves(engine: Any, written: dict[str, tuple[int, int]]) -> Iterator[None]:
    """Route DeepSpeed's torch.save of its files (its TorchCheckpointEngine, the default) through
    :func:`save_with_crc` for the duration, recording each file's size and crc32. Another
    checkpoint engine is left alone: its files are read back for the manifest instead."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    target = getattr(engine, "checkpoint_engine", None)
    if type(target) is not TorchCheckpointEngine:
        yield
        return

    def save(state_dict: Any, path: str) -> None:
        written[str(Path(path))] = save_with_crc(state_dict, path)

    target.save = save
    try:
        yield
    finally:
        del target.save  # the class's own method again


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def rank_file(path: Path, rank: int) -> Path:
    return path / f"dstrain_rank{rank}.pt"


@dataclass
class Checkpointer:
    """Saves and restores the union of named stateful parts.

    ``engine``: the DeepSpeed engine (its own collective save/load); ``shared``: parts with one
    state for the run, written by rank 0 into ``trainer_state.json`` (JSON-able states);
    ``per_rank``: parts with a state per rank, in ``dstrain_rank<R>.pt``. ``write_extras(path)``
    runs on rank 0 only (run.yaml, tokenizer, HF config); ``meta`` goes into trainer_state.json.
    ``exclude_frozen`` leaves frozen parameters (a LoRA base) out of the engine's files.
    """

    output_dir: str | Path
    dist: DistInfo
    engine: Any
    shared: dict[str, Stateful]
    per_rank: dict[str, RankStateful]
    keep_last: int
    write_extras: Callable[[Path], None] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    exclude_frozen: bool = False
    last_save_bytes: int = 0

    @property
    def root(self) -> Path:
        return Path(self.output_dir) / "checkpoints"

    def save(self, step: int, protect: Iterable[int] = ()) -> Path:
        """Collective: every rank calls it at the same step. ``protect``: steps pruning keeps.

        A failure while writing (a full disk) is a CheckpointError on the rank that hit it: the
        previous checkpoint and ``latest`` are untouched, and nothing is pruned to make room.
        """
        started = time.perf_counter()
        tag = f"step_{step}"
        path = self.root / tag
        if self.dist.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            if path.exists():  # left by an interrupted save of the same step: never reuse it
                shutil.rmtree(path)
            self._warn_if_short_of_space()
        barrier(self.dist, f"the save of step {step}")
        written: dict[str, tuple[int, int]] = {}
        try:
            with collective(f"the save of step {step}", self.dist):
                self._write(step, tag, path, written)
        except (OSError, RuntimeError, DistError) as exc:
            raise self._save_error(step, path, exc) from None
        barrier(self.dist, f"the save of step {step}")  # every rank has written before the save counts
        records = file_records(path, self.dist, written)
        if self.dist.is_main:
            _atomic_write(path / MANIFEST, json.dumps(records))
            _atomic_write(path / COMPLETE, json.dumps({"step": step, "time": time.time()}))
            _atomic_write(self.root / LATEST, tag)
            self.prune(protect)
            self.last_save_bytes = sum(size for size, _ in records.values())
            log.info(
                "saved %s (%.1f MB) in %.1f s",
                path,
                self.last_save_bytes / 1e6,
                time.perf_counter() - started,
            )
        barrier(self.dist)
        return path

    def _save_error(self, step: int, path: Path, exc: BaseException) -> CheckpointError:
        """One line for a failed save that says what failed: the free-space advice only for a
        full disk (ENOSPC, EDQUOT), a lost peer as a lost peer, anything else as itself."""
        previous = newest_complete(self.root)
        intact = f"the previous checkpoint {previous.name if previous else '(none)'} is intact and nothing was pruned"
        head = f"saving step {step} failed on rank {self.dist.rank}"
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            where = exc.filename or path
            free_mb = shutil.disk_usage(self.root).free / 1e6
            return CheckpointError(
                f"{head}: {exc.strerror} ({where}; {free_mb:.1f} MB free under {self.root}); {intact}; "
                "free space (or lower train.keep_last), then --resume"
            )
        if isinstance(exc, DistError):  # a peer died or hangs inside the save's collectives
            return CheckpointError(f"{head}: {exc}; {intact}")
        if isinstance(exc, OSError):
            reason = f"{exc.strerror or exc} ({exc.filename or path})"
        else:
            reason = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]} ({path})"
        return CheckpointError(f"{head}: {reason}; {intact}; fix the cause, then --resume")

    def _warn_if_short_of_space(self) -> None:
        free = shutil.disk_usage(self.root).free
        if self.last_save_bytes and free < 1.1 * self.last_save_bytes:
            log.warning(
                "%.1f MB free under %s and the last save took %.1f MB: the next one may not fit "
                "(older checkpoints are only pruned after a new one is complete)",
                free / 1e6,
                self.root,
                self.last_save_bytes / 1e6,
            )

    def _write(self, step: int, tag: str, path: Path, written: dict[str, tuple[int, int]]) -> None:
        """Every rank's files of this save; ``written`` gets the (size, crc32) of each file
        checksummed on its way to disk (the engine's and this rank's state)."""
        fault("at_save_start", step, self.dist.rank)
        client_state = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}
        with _checksummed_engine_saves(self.engine, written):
            self.engine.save_checkpoint(
                str(self.root),
                tag=tag,
                client_state=client_state,
                save_latest=False,
                exclude_frozen_parameters=self.exclude_frozen,
            )
        fault("in_save", step, self.dist.rank)
        rank_state = {
            "version": STATE_VERSION,
            "rank": self.dist.rank,
            "world_size": self.dist.world_size,
            "parts": {name: part.state_dict() for name, part in self.per_rank.items()},
        }
        own = rank_file(path, self.dist.rank)
        tmp = own.with_name(own.name + ".tmp")
        written[str(own)] = save_with_crc(rank_state, tmp)
        tmp.replace(own)
        if self.dist.is_main:
            meta = {
                "version": STATE_VERSION,
                "world_size": self.dist.world_size,
                "zero_stage": self.engine.zero_optimization_stage(),
                **self.meta,
                "parts": {name: part.state_dict() for name, part in self.shared.items()},
            }
            _atomic_write(path / TRAINER_STATE, json.dumps(meta, indent=2))
            if self.write_extras is not None:
                self.write_extras(path)

    def prune(self, protect: Iterable[int] = ()) -> None:
        """Keep the newest ``keep_last`` complete saves and the ``protect``ed steps; incomplete
        older dirs go too. Runs only after the new save is complete."""
        if not self.keep_last:
            return
        found = list_checkpoints(self.root)
        complete = [p for p in found if is_complete(p)]
        keep = set(complete[-self.keep_last :]) | {self.root / f"step_{s}" for s in protect}
        newest = step_of(complete[-1]) if complete else -1
        for p in found:
            if p not in keep and step_of(p) < newest:
                shutil.rmtree(p, ignore_errors=True)

    def load(self, path: Path) -> None:
        """Restore every part from ``path`` (collective for the engine)."""
        meta = read_meta(path)
        saved_world = int(meta["world_size"])
        universal = needs_universal(path, self.dist.world_size, self.engine.zero_optimization_stage())
        if universal and not self.engine.load_universal_checkpoint():
            raise CheckpointError(
                f"{path} was saved by {saved_world} ranks with zero.stage {meta['zero_stage']}: this "
                "run needs it in universal format, and the engine must be built for a universal load "
                "(trainer/main.py does this)"
            )
        load_dir, tag = (path, "universal") if universal else (path.parent, path.name)
        try:
            loaded, _ = self.engine.load_checkpoint(
                str(load_dir), tag=tag, load_module_strict=not self.exclude_frozen
            )
        except (RuntimeError, OSError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as exc:
            # The resume checked sizes only: now read every byte (this rank alone, as the others
            # may not have failed) to tell a damaged file from a checkpoint that does not fit.
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            problem = verify(path, ONE_PROCESS, full=True)
            cause = f"the full check found that {problem}" if problem else "every file matches its checksum"
            raise CheckpointError(
                f"loading {path} failed on rank {self.dist.rank} ({type(exc).__name__}: {first}); {cause}; "
                "resume from an older checkpoint with --resume PATH"
            ) from None
        if loaded is None:
            raise CheckpointError(f"DeepSpeed could not load the engine state from {path}")
        if universal:
            from trainer.zero0_universal import step_on_param_device

            step_on_param_device(self.engine.optimizer)
        for name, part in self.shared.items():
            if name not in meta["parts"] and getattr(part, "optional_in_checkpoint", False):
                continue  # a part newer than the checkpoint (tracker run ids) starts fresh
            if name not in meta["parts"]:
                raise CheckpointError(
                    f"{path} has no {name!r} state; resume from a checkpoint this dstrain wrote"
                )
            part.load_state_dict(meta["parts"][name])

        cache: dict[int, dict[str, Any]] = {}

        def read(rank: int) -> dict[str, Any]:
            if rank not in cache:
                file = rank_file(path, rank)
                if not file.is_file():
                    raise CheckpointError(
                        f"{file} is missing: the checkpoint is incomplete; resume from an older one"
                    )
                cache[rank] = torch.load(file, map_location="cpu", weights_only=True)["parts"]
            return cache[rank]

        own = read(self.dist.rank) if self.dist.rank < saved_world else None
        for name, part in self.per_rank.items():
            part.load_rank_states(
                RankStates(
                    own=None if own is None else own[name],
                    saved_world_size=saved_world,
                    read=lambda rank, name=name: read(rank)[name],
                )
            )
        log.info("resumed from %s", path)
