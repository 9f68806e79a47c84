"""Checkpoints that never lie: atomic saves, exact resume, pre-emption, HF export.

Layout under ``<output_dir>/checkpoints/``::

    step_<N>/                 one save
      <DeepSpeed files>       engine state (model, optimizer, scheduler), from save_checkpoint
      dstrain_rank<R>.pt      rank R's data-pipeline state and RNG states (python, numpy, torch, cuda)
      trainer_state.json      counters (step, epoch, tokens seen), world size, version
      run.yaml                the resolved config of the run that saved it
      hf_config/  tokenizer/  what `dstrain export` needs to rebuild an HF model offline
      COMPLETE                written by rank 0 after every rank finished writing
    latest                    "step_<N>", replaced atomically after COMPLETE exists

A directory without ``COMPLETE`` is never loaded (a crash or a kill in the middle of a save
leaves one); ``latest`` only moves once the new save is complete, and pruning happens after.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.config import JobConfig, build_config
from trainer.data.config import FORMATTING_KEYS
from trainer.dist import DistInfo
from trainer.errors import CheckpointError

log = logging.getLogger("dstrain")

STATE_VERSION = 1
COMPLETE = "COMPLETE"
LATEST = "latest"
FAULT_ENV = "DSTRAIN_FAULT"  # test-only fault injection: "kill_rank1_in_save:12", "signal_rank0_in_save"


# ---------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- finding checkpoints


def step_of(path: Path) -> int:
    return int(path.name.split("_", 1)[1])


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


def list_checkpoints(root: Path) -> list[Path]:
    """``step_<N>`` dirs under ``root``, oldest first (complete or not)."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
    return sorted(dirs, key=step_of)


def newest_complete(root: Path) -> Path | None:
    """The checkpoint to resume from: ``latest`` if it names a complete save, else the newest
    complete one. Incomplete dirs newer than it are reported and skipped."""
    found = list_checkpoints(root)
    complete = [p for p in found if is_complete(p)]
    for p in found:
        if not is_complete(p) and (not complete or step_of(p) > step_of(complete[-1])):
            log.warning(
                "skipping incomplete checkpoint %s (no %s marker: the save was interrupted)", p, COMPLETE
            )
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if is_complete(named) and (not complete or step_of(named) >= step_of(complete[-1])):
            return named
    return complete[-1] if complete else None


def resolve_resume(arg: str | None, output_dir: str | Path) -> Path | None:
    """``--resume`` semantics: None = fresh; "latest" = newest complete (must exist);
    "auto" = newest complete or fresh; anything else = that checkpoint dir."""
    if arg is None:
        return None
    root = Path(output_dir) / "checkpoints"
    if arg in ("latest", "auto"):
        found = newest_complete(root)
        if found is None and arg == "latest":
            raise CheckpointError(
                f"--resume: no complete checkpoint under {root}; use --resume auto to start fresh"
            )
        return found
    path = Path(arg)
    if not path.is_dir():
        raise CheckpointError(f"--resume {arg}: no such checkpoint directory")
    if not is_complete(path):
        raise CheckpointError(
            f"--resume {arg}: checkpoint is incomplete (no {COMPLETE} marker); pick an older one"
        )
    return path


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def saved_world_size(path: Path) -> int:
    return int(json.loads((path / "trainer_state.json").read_text())["world_size"])


def to_universal(ckpt: Path, out: Path) -> Path:
    """Convert with DeepSpeed's ds_to_universal (possible because every save carries the
    universal_checkpoint_info client state)."""
    if not is_complete(ckpt):
        raise CheckpointError(f"{ckpt} is not a complete checkpoint (no {COMPLETE} marker)")
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
    _barrier(dist)
    return target


# ---------------------------------------------------------------- config changes on resume

ARCHITECTURE_KEYS = ("model.config", "model.name_or_path", "model.overrides", "tokenizer", "stage")
DATA_POSITION_KEYS = (
    "data.train",
    "data.validation",
    "data.validation_fraction",
    "data.validation_seed",
    "data.text_column",
    "data.max_seq_len",
    "data.pack",
    "data.max_samples",
    "seed",
    *(f"data.{key}" for key in FORMATTING_KEYS),  # how records become samples
)


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


def check_resume_config(saved: JobConfig, current: JobConfig) -> tuple[dict[str, tuple[Any, Any]], bool]:
    """Log the differences; architecture changes are errors. Returns (diff, reset_data)."""
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
    reset_data = any(k in DATA_POSITION_KEYS for k in diff)
    if reset_data:
        log.warning(
            "data files or sequence settings changed: the data position restarts at the current epoch"
        )
    if any(k.startswith(("optim.", "schedule.", "train.max_steps", "train.epochs")) for k in diff):
        log.warning("optimizer/schedule settings changed: the new values apply from the resumed step on")
    return diff, reset_data


# ---------------------------------------------------------------- save / load


def _maybe_inject_fault(point: str, step: int, dist: DistInfo) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    name, _, at = spec.partition(":")
    if int(at or step) != step:
        return
    if name == f"kill_rank{dist.rank}_{point}":
        log.warning("fault injection: SIGKILL at %s, step %d", point, step)
        os.kill(os.getpid(), signal.SIGKILL)
    if name == f"signal_rank{dist.rank}_{point}":  # e.g. a second SIGTERM during a pre-emption save
        log.warning("fault injection: SIGTERM at %s, step %d", point, step)
        os.kill(os.getpid(), signal.SIGTERM)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _barrier(dist: DistInfo) -> None:
    if dist.world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()


class Checkpointer:
    """Saves and restores the union of the stateful parts: engine, data, counters, RNG."""

    def __init__(self, job: JobConfig, dist: DistInfo, tokenizer: Any) -> None:
        self.job = job
        self.dist = dist
        self.tokenizer = tokenizer
        self.root = Path(job.output_dir) / "checkpoints"

    def save(self, trainer: Any) -> Path:
        """Collective: every rank calls it at the same step."""
        started = time.perf_counter()
        step = trainer.state.step
        tag = f"step_{step}"
        path = self.root / tag
        if self.dist.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            if path.exists():  # left by an interrupted save of the same step: never reuse it
                shutil.rmtree(path)
        _barrier(self.dist)
        engine = trainer.module.engine
        client_state = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}
        engine.save_checkpoint(str(self.root), tag=tag, client_state=client_state, save_latest=False)
        _maybe_inject_fault("in_save", step, self.dist)
        rank_state = {
            "version": STATE_VERSION,
            "rank": self.dist.rank,
            "world_size": self.dist.world_size,
            "data": trainer.train_data.state_dict(),
            "rng": rng_state(),
        }
        tmp = path / f"dstrain_rank{self.dist.rank}.pt.tmp"
        torch.save(rank_state, tmp)
        tmp.replace(path / f"dstrain_rank{self.dist.rank}.pt")
        if self.dist.is_main:
            meta = {
                "version": STATE_VERSION,
                "world_size": self.dist.world_size,
                **trainer.state.state_dict(),
            }
            _atomic_write(path / "trainer_state.json", json.dumps(meta, indent=2))
            _atomic_write(path / "run.yaml", self.job.to_yaml())
            engine.module.config.save_pretrained(path / "hf_config")
            self.tokenizer.save_pretrained(str(path / "tokenizer"))
        _barrier(self.dist)  # every rank has finished writing before the save counts
        if self.dist.is_main:
            _atomic_write(path / COMPLETE, json.dumps({"step": step, "time": time.time()}))
            _atomic_write(self.root / LATEST, tag)
            self.prune(trainer)
            log.info(
                "saved %s (%.1f MB) in %.1f s", path, dir_size(path) / 1e6, time.perf_counter() - started
            )
        _barrier(self.dist)
        return path

    def prune(self, trainer: Any) -> None:
        """Keep the newest ``keep_last`` complete saves (and the best-eval one); incomplete
        older dirs go too. Runs only after the new save is complete."""
        keep_last = self.job.train.keep_last
        if not keep_last:
            return
        found = list_checkpoints(self.root)
        complete = [p for p in found if is_complete(p)]
        keep = set(complete[-keep_last:])
        best = getattr(trainer.state, "best_step", None)
        if best is not None:
            keep.add(self.root / f"step_{best}")
        newest = step_of(complete[-1]) if complete else -1
        for p in found:
            if p not in keep and step_of(p) < newest:
                shutil.rmtree(p, ignore_errors=True)

    def load(self, trainer: Any, path: Path) -> bool:
        """Restore everything from ``path``; returns whether the data position was reset."""
        saved_job = build_config(config_path=path / "run.yaml")
        _, reset_data = check_resume_config(saved_job, self.job)
        meta = json.loads((path / "trainer_state.json").read_text())
        if meta.get("version") != STATE_VERSION:
            raise CheckpointError(f"{path}: state version {meta.get('version')} is not {STATE_VERSION}")
        engine = trainer.module.engine
        saved_world = meta["world_size"]
        resharded = saved_world != self.dist.world_size
        if resharded and not engine.load_universal_checkpoint():
            raise CheckpointError(
                f"{path} was saved by {saved_world} ranks and this run has {self.dist.world_size}: "
                "the engine must be built for a universal load (trainer/main.py does this)"
            )
        load_dir, tag = (path, "universal") if resharded else (path.parent, path.name)
        loaded, _ = engine.load_checkpoint(str(load_dir), tag=tag)
        if loaded is None:
            raise CheckpointError(f"DeepSpeed could not load the engine state from {path}")
        own = path / f"dstrain_rank{self.dist.rank}.pt"
        rank_state = torch.load(own if own.is_file() else path / "dstrain_rank0.pt", weights_only=False)
        state = {k: v for k, v in meta.items() if k not in ("version", "world_size")}
        trainer.state.load_state_dict(state)
        if reset_data:
            trainer.train_data.start_epoch(trainer.state.epoch)
        elif resharded or rank_state["data"]["fingerprint"]["num_workers"] != self.job.data.num_workers:
            # Another world size or worker count: every saved rank's position is needed.
            old = [
                torch.load(path / f"dstrain_rank{r}.pt", weights_only=False)["data"]
                for r in range(saved_world)
            ]
            trainer.train_data.load_resharded(old)
            log.warning(
                "data position re-derived from all %d saved ranks (%d rank(s) x %d worker(s) now)",
                saved_world,
                self.dist.world_size,
                self.job.data.num_workers,
            )
        else:
            trainer.train_data.load_state_dict(rank_state["data"])
        set_rng_state(rank_state["rng"])
        apply_new_hyperparameters(engine, self.job)
        log.info("resumed from %s at step %d (epoch %d)", path, trainer.state.step, trainer.state.epoch)
        return reset_data


def apply_new_hyperparameters(engine: Any, job: JobConfig) -> None:
    """After a load, the optimizer and scheduler carry the *saved* hyper-parameters; put the
    current config's in place so a changed lr/betas/weight_decay applies from this step on."""
    scheduler = engine.lr_scheduler
    # DeepSpeed builds our LambdaLR on the basic optimizer, whose groups hold the real lrs.
    groups = scheduler.optimizer.param_groups if scheduler is not None else engine.optimizer.param_groups
    base_lrs = []
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(job.optim.betas)
        if "eps" in group:
            group["eps"] = job.optim.eps
        if group.get("weight_decay", 0.0) > 0.0:
            group["weight_decay"] = job.optim.weight_decay
        base_lrs.append(job.optim.muon_lr if group.get("use_muon") else job.optim.lr)
    if scheduler is not None and base_lrs:
        scheduler.base_lrs = base_lrs
        factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
        for group, base in zip(groups, base_lrs, strict=True):
            group["lr"] = base * factor
        scheduler._last_lr = [g["lr"] for g in groups]


# ---------------------------------------------------------------- export


def consolidated_state_dict(engine: Any) -> dict[str, torch.Tensor] | None:
    """The full model weights on rank 0 (None elsewhere); every rank must call this.

    Under ZeRO-3 the parameters are partitioned, so they are gathered layer by layer through
    DeepSpeed (needs ``stage3_gather_16bit_weights_on_model_save``); a rank-0-only gather hangs.
    """
    if engine.zero_optimization_partition_weights():
        return engine._zero3_consolidated_16bit_state_dict()
    if engine.global_rank != 0:
        return None
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}


def save_hf(model: Any, state: dict[str, torch.Tensor], tokenizer: Any, out_dir: str | Path) -> Path:
    """Write safetensors + config + generation config + tokenizer into ``<out>.tmp``, then rename."""
    out = Path(out_dir)
    empty = [k for k, v in state.items() if v.numel() == 0]
    if empty:
        raise CheckpointError(
            f"export would write empty tensors ({empty[0]} ...): ZeRO-3 weights were not gathered"
        )
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    use_cache = model.config.use_cache
    model.config.use_cache = True  # exported for inference
    try:
        model.save_pretrained(tmp, state_dict=state)
    finally:
        model.config.use_cache = use_cache
    tokenizer.save_pretrained(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    return out


def export_hf(engine: Any, tokenizer: Any, out_dir: str | Path, dist: DistInfo) -> Path:
    """Collective export of the live engine to an HF directory (rank 0 writes)."""
    state = consolidated_state_dict(engine)
    if dist.is_main:
        assert state is not None
        save_hf(engine.module, state, tokenizer, out_dir)
        log.info("exported Hugging Face model to %s", out_dir)
    _barrier(dist)
    return Path(out_dir)
