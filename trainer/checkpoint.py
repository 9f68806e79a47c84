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

import json
import logging
import os
import random
import shutil
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterable
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
from trainer.dist import DistInfo, all_gather_objects, barrier
from trainer.errors import CheckpointError
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


def checkpoint_files(path: Path) -> list[Path]:
    """The files a save wrote (what its manifest covers), sorted; not the markers, nor a
    universal conversion made later inside it."""
    skip = {path / COMPLETE, path / MANIFEST}
    return sorted(
        f
        for f in path.rglob("*")
        if f.is_file() and f not in skip and "universal" not in f.relative_to(path).parts[:1]
    )


def file_records(path: Path, dist: DistInfo) -> dict[str, list[int]]:
    """``{relative path: [size, crc32]}`` of every file of ``path``, each rank hashing a share
    (collective; on a shared filesystem the ranks read in parallel)."""
    files = checkpoint_files(path)[dist.rank :: dist.world_size]
    mine = {str(f.relative_to(path)): [f.stat().st_size, _crc32(f)] for f in files}
    merged: dict[str, list[int]] = {}
    for part in all_gather_objects(mine, dist):
        merged.update(part)
    return merged


def verify(path: Path, dist: DistInfo = ONE_PROCESS) -> str | None:
    """The first problem with ``path``'s files against its manifest (a missing, truncated or
    corrupted file), or None when every file is as it was saved. Collective when distributed."""
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
        elif _crc32(f) != crc:
            problems.append(f"{f} does not match its checksum (corrupted)")
    found = sorted(p for part in all_gather_objects(problems, dist) for p in part)
    return found[0] if found else None


def resolve_resume(arg: str | None, output_dir: str | Path, dist: DistInfo = ONE_PROCESS) -> Path | None:
    """``--resume`` semantics: None = fresh; "latest" = the newest intact checkpoint (one must
    exist); "auto" = the newest intact checkpoint or fresh; anything else = that checkpoint dir.

    Every candidate is verified against its manifest first: a damaged newest checkpoint is
    reported (naming the file) and the previous complete one is taken, never garbage. An
    explicit PATH that is damaged is an error. Collective when distributed.
    """
    if arg is None:
        return None
    root = Path(output_dir) / "checkpoints"
    if arg in ("latest", "auto"):
        candidates = complete_newest_first(root)
        for path in candidates:
            problem = verify(path, dist)
            if problem is None:
                if path != candidates[0]:
                    log.warning("resuming from %s, the newest intact checkpoint", path)
                return path
            log.warning(
                "checkpoint %s is damaged: %s; falling back to the previous complete one", path, problem
            )
        if candidates:
            raise CheckpointError(
                f"--resume: every checkpoint under {root} is damaged (the newest: {verify(candidates[0], dist)}); "
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
    problem = verify(path, dist)
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


def needs_universal(path: Path, world_size: int, zero_stage: int) -> bool:
    """Whether loading ``path`` into this run needs DeepSpeed's universal format: ZeRO-1/2/3
    shards are laid out for one world size and stage. A ZeRO-0 checkpoint holds the whole model
    and optimizer in one file that any world size loads as it is (but not a sharded optimizer)."""
    meta = read_meta(path)
    saved_world, saved_stage = int(meta["world_size"]), int(meta["zero_stage"])
    if saved_stage == 0:
        if zero_stage != 0:
            raise CheckpointError(
                f"{path} was saved with zero.stage 0 and this run uses {zero_stage}: DeepSpeed cannot "
                "re-shard a ZeRO-0 optimizer state; resume with --zero.stage 0, or export the weights "
                "(dstrain export) and start a cpt run from them"
            )
        return False
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
            f"{ckpt} is a ZeRO-0 checkpoint: it loads on any world size as it is, no conversion needed"
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


def prepare_universal(path: Path, dist: DistInfo) -> Path:
    """``<ckpt>/universal``, converted once by rank 0 while the others wait (collective)."""
    target = path / "universal"
    if dist.is_main and not (target / "zero").is_dir():
        log.warning("converting %s to a universal checkpoint for %d rank(s)", path, dist.world_size)
        to_universal(path, target)
    barrier(dist)
    return target


# ---------------------------------------------------------------- config changes on resume

ARCHITECTURE_KEYS = ("model.config", "model.name_or_path", "model.overrides", "tokenizer", "stage")


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
    """Log the differences; an architecture change is an error. Returns the diff.

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
    if any(k.startswith(("optim.", "schedule.", "train.max_steps", "train.epochs")) for k in diff):
        log.warning("optimizer/schedule settings changed: the new values apply from the resumed step on")
    return diff


# ---------------------------------------------------------------- save / load


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
        try:
            self._write(step, tag, path)
        except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as a RuntimeError
            previous = newest_complete(self.root)
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
            where = exc.filename if isinstance(exc, OSError) and exc.filename else path
            free_mb = shutil.disk_usage(self.root).free / 1e6
            raise CheckpointError(
                f"saving step {step} failed on rank {self.dist.rank}: {reason} ({where}; {free_mb:.1f} MB free "
                f"under {self.root}); the previous checkpoint {previous.name if previous else '(none)'} is "
                "intact and nothing was pruned; free space (or lower train.keep_last), then --resume"
            ) from None
        barrier(self.dist, f"the save of step {step}")  # every rank has written before the save counts
        records = file_records(path, self.dist)
        if self.dist.is_main:
            _atomic_write(path / MANIFEST, json.dumps(records))
            _atomic_write(path / COMPLETE, json.dumps({"step": step, "time": time.time()}))
            _atomic_write(self.root / LATEST, tag)
            self.prune(protect)
            self.last_save_bytes = dir_size(path)
            log.info(
                "saved %s (%.1f MB) in %.1f s",
                path,
                self.last_save_bytes / 1e6,
                time.perf_counter() - started,
            )
        barrier(self.dist)
        return path

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

    def _write(self, step: int, tag: str, path: Path) -> None:
        client_state = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}
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
        torch.save(rank_state, tmp)
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
        loaded, _ = self.engine.load_checkpoint(
            str(load_dir), tag=tag, load_module_strict=not self.exclude_frozen
        )
        if loaded is None:
            raise CheckpointError(f"DeepSpeed could not load the engine state from {path}")
        for name, part in self.shared.items():
            if name in meta["parts"]:  # a part newer than the checkpoint (tracker run ids) starts fresh
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
