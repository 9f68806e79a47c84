"""The trainer-facing objects: :class:`TrainData` (an epoch-aware, resumable batch iterable) and
:class:`EvalBatches`, and the two builders of ``trainer.data``.

Ranks: a rank's TrainData is purely local (no collective). Shards hold equal numbers of
*rows* (+-1), but not of tokens, so one rank's shard can run out a batch or more before
another's: iterating simply ends there (``local_done``), and the epoch stays open until the
Trainer calls :meth:`TrainData.end_epoch`. Keeping ranks in step is the Trainer's job, with the
one small all-reduce it does per optimizer step anyway: a rank that is out of data runs
one-token filler micro-batches (``packing.filler_batch``) until every rank is, so all ranks
run the same number of forwards and the epoch ends together. Nothing is dropped: every row is
read exactly once and every batch is trained on.

Resuming on another world size or worker count (:meth:`TrainData.load_resharded`, called
with every old rank's state): the run continues the saved epoch, and no token is repeated or
dropped. Each old shard's state splits into *leftovers*, what it had read but not handed out
(its packer carry, the rest of its current shuffle block, the rest of the document that block
ended in; at most one carry + ``buffer_size`` chunks + one long document's tail per old
shard), and the row ranges nobody read yet. The ranges of all old shards are merged and dealt
to the new (rank, worker) shards in consecutive parts of equal row count (+-1); the leftovers
of old shard ``j`` go to new shard ``j mod S'``, which hands them out before its rows, packer
carries first. A leftover is kept as the position that re-creates it (the old block is
re-read once, <= ``buffer_size`` chunks, and permuted as the old shard did) plus the carry's
tokens, so the re-sharded position is itself a small state, saved and exactly resumable at the
new world size. The price: a document whose head was trained before the save and whose tail
was a packer carry appears on both sides (its tokens once each), at most one per old shard;
leftover chunks are not mixed into the new shards' shuffle; and ``skipped_docs`` of the
re-sharded epoch counts only what the new shards read. Nothing is dropped. The next
epoch is sharded normally for the new world size.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterator
from typing import Any, TypedDict

from torchdata.stateful_dataloader import StatefulDataLoader

from trainer.data.config import DataConfig
from trainer.data.epoch_count import epoch_batches, row_lengths
from trainer.data.formatting import Formatter
from trainer.data.packing import Batch
from trainer.data.sharding import build_units, deal_ranges, merge_ranges, ranges_rows, shard_bounds
from trainer.data.sources import Columns, SourceFile, describe_file, resolve_paths
from trainer.data.stream import (
    ShardPlan,
    ShardState,
    ShardStream,
    StreamSpec,
    fresh_state,
    shard_remainder,
)
from trainer.data.tokenize import eos_id, pad_id, tokenizer_fingerprint
from trainer.dist import DistInfo
from trainer.errors import DataError
from trainer.signals import ignore_stop_signals
from trainer.state import RankStates

log = logging.getLogger("dstrain.data")  # under the trainer's logger: rank 0's INFO lines reach train.log

# 2: a leftover's buffer size is saved (re-deal on a micro-batch or buffer change);
# 3: chunks carry a loss mask (the packer carry saves it) and shards count SFT truncations/drops.
STATE_VERSION = 3
#: Fingerprint keys whose change re-deals the saved position (``load_resharded``) instead of
#: restarting the epoch: they change who reads what and how it is batched, never the rows' order.
REDEAL_KEYS = ("world_size", "num_workers", "micro_batch_size", "buffer_size")
#: Eval batches are kept in memory after the first pass when they hold at most this many tokens.
EVAL_CACHE_TOKENS = 4_000_000


class DataFingerprint(TypedDict):
    """What must match for a saved position to mean the same batches."""

    world_size: int
    num_workers: int
    micro_batch_size: int
    max_seq_len: int
    pack: bool
    buffer_size: int
    seed: int
    text_column: str
    formatting: str  # Formatter.describe(): format, templates (hashed), reasoning
    max_samples: int | None
    holdout: list[float]  # [validation_fraction, validation_seed] applied to the train rows
    tokenizer: str
    files: list[dict[str, Any]]


class TrainDataState(TypedDict):
    """``TrainData.state_dict()``: plain Python types and nested dicts, safe for torch.save / JSON."""

    version: int
    rank: int
    fingerprint: DataFingerprint
    epoch: int
    batches_in_epoch: int  # micro-batches this rank yielded this epoch
    local_done: bool  # this rank's shards are exhausted (the epoch ends when every rank's are)
    loader: dict[str, Any] | None  # StatefulDataLoader state; None = start of the epoch
    shards: list[ShardState]  # per-worker positions (read from ``loader``): the re-shard seam
    reshard: list[ShardPlan] | None  # this rank's shards' work in a re-sharded epoch, else None


def _find_shard_states(obj: Any) -> list[ShardState]:
    """The ShardState dicts inside a StatefulDataLoader state (its layout is torchdata's business)."""
    found: list[ShardState] = []
    if isinstance(obj, dict):
        if "block_no" in obj and "shard" in obj and "carry_tokens" in obj and "done" in obj:
            return [obj]  # type: ignore[list-item]
        for value in obj.values():
            found.extend(_find_shard_states(value))
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            found.extend(_find_shard_states(value))
    return found


class EpochStats(TypedDict):
    """What one finished epoch yielded on this rank."""

    epoch: int
    batches: int  # micro-batches this rank yielded
    skipped_docs: int  # null/empty/non-string values skipped by this rank's shards
    truncated_docs: int  # SFT samples cut to max_seq_len (head kept) by this rank's shards
    no_target_docs: int  # SFT samples dropped: no target token left after truncation


class TrainData:
    """The training batches of this rank: iterate for the rest of the current epoch.

    Iterating yields this rank's remaining micro-batches of the current epoch and stops when
    its shards are exhausted (``local_done``); the epoch advances only on :meth:`end_epoch`.
    Attributes: ``epoch`` (current epoch, from 0), ``batches_in_epoch`` (so far), ``last_epoch``
    (:class:`EpochStats` of the last finished epoch, or None), ``skipped_docs`` (of the last
    finished epoch, this rank), ``files``.

    Resume (:meth:`load_rank_states`, the checkpoint protocol): the exact position when the
    data settings match; re-dealt from every saved rank's position (:meth:`load_resharded`)
    when only the world size, worker count, micro-batch size or shuffle buffer changed; the saved
    epoch restarted from its beginning when the data itself changed (files, sequence length,
    packing, seed, tokenizer...), with a warning naming what changed.
    """

    def __init__(
        self, spec: StreamSpec, cfg: DataConfig, dist: DistInfo, fingerprint: DataFingerprint
    ) -> None:
        self.spec = spec
        self.cfg = cfg
        self.dist = dist
        self.fingerprint = fingerprint
        self.files = spec.files
        self.epoch = 0
        self.batches_in_epoch = 0
        self.skipped_docs = 0
        self.last_epoch: EpochStats | None = None
        self._stream = ShardStream(spec)
        self._loader: StatefulDataLoader | None = None
        self._iter: Iterator[Batch] | None = None
        self._pending_loader_state: dict[str, Any] | None = None
        self._local_done = False
        self._done_shards: list[ShardState] = []  # final shard states once local_done
        self._plan: list[ShardPlan] | None = None  # this rank's shards in a re-sharded epoch
        self.counted_batches: list[list[int]] | None = None  # count_batches(): [epoch][rank]

    # -- iteration ------------------------------------------------------------------------------
    def _make_loader(self) -> StatefulDataLoader:
        self._stream.set_epoch(self.epoch, self._plan)
        workers = self.cfg.num_workers
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*set_vital.*")  # torchdata 0.11 on torch 2.13
            return StatefulDataLoader(
                self._stream,
                batch_size=None,  # the stream yields whole micro-batches
                num_workers=workers,
                prefetch_factor=2 if workers else None,
                persistent_workers=False,
                snapshot_every_n_steps=1,  # worker states are a few integers: snapshot every batch
                worker_init_fn=ignore_stop_signals,  # the rank's main process decides on a stop signal
            )

    def __iter__(self) -> Iterator[Batch]:
        """This rank's remaining batches of the current epoch (ends at ``local_done``)."""
        if self._local_done:
            return
        if self._iter is None:
            self._loader = self._make_loader()
            if self._pending_loader_state is not None:
                self._loader.load_state_dict(self._pending_loader_state)
                self._pending_loader_state = None
            self._iter = iter(self._loader)
        while True:
            try:
                batch = next(self._iter, None)
            except Exception as exc:
                raise _clean_worker_error(exc) from None
            if batch is None:
                self._local_done = True
                self._done_shards = _find_shard_states(self._loader.state_dict())
                return
            self.batches_in_epoch += 1
            yield batch

    def end_epoch(self) -> EpochStats:
        """Close the current epoch (every rank is done with it) and start the next one."""
        shards = self._done_shards
        self.skipped_docs = sum(s["skipped_read"] for s in shards)
        stats = EpochStats(
            epoch=self.epoch,
            batches=self.batches_in_epoch,
            skipped_docs=self.skipped_docs,
            truncated_docs=sum(s["truncated_read"] for s in shards),
            no_target_docs=sum(s["no_target_read"] for s in shards),
        )
        self.last_epoch = stats
        if self.dist.is_main:
            log.info(
                "data: epoch %d done: rank 0 read %d micro-batches and skipped %d null/empty/non-string docs%s",
                self.epoch,
                self.batches_in_epoch,
                self.skipped_docs,
                _sft_counts(self.last_epoch),
            )
        self.start_epoch(self.epoch + 1)
        return stats

    def start_epoch(self, epoch: int) -> None:
        """Forget the position and start ``epoch`` from its beginning on the next iteration."""
        self.epoch = epoch
        self.batches_in_epoch = 0
        self._loader = None
        self._iter = None
        self._pending_loader_state = None
        self._local_done = False
        self._done_shards = []
        self._plan = None

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> TrainDataState:
        """The position after the last batch yielded (cheap: integers and the packer carry)."""
        if self._local_done:
            loader_state = None
        elif self._iter is not None and self._loader is not None:
            loader_state = self._loader.state_dict()
        else:
            loader_state = self._pending_loader_state
        return TrainDataState(
            version=STATE_VERSION,
            rank=self.dist.rank,
            fingerprint=self.fingerprint,
            epoch=self.epoch,
            batches_in_epoch=self.batches_in_epoch,
            local_done=self._local_done,
            loader=loader_state,
            shards=self._done_shards if self._local_done else _find_shard_states(loader_state),
            reshard=self._plan,
        )

    def load_rank_states(self, states: RankStates) -> None:
        """Resume from a checkpoint: exact, re-dealt or epoch restarted (see the class docstring)."""
        own = states.own if states.own is not None else states.read(0)
        _check_version(own, "this rank's")
        old, new = own["fingerprint"], self.fingerprint
        changed = {k for k in old.keys() | new.keys() if old.get(k) != new.get(k)}
        if not changed:
            self.load_state_dict(own)
        elif changed <= set(REDEAL_KEYS):
            self.load_resharded(states.all())
        else:
            self.load_state_dict(own, strict=False)

    def load_state_dict(self, state: TrainDataState, strict: bool = True) -> None:
        """Restore a position; ``strict=False`` keeps only the epoch and starts it from the beginning."""
        _check_version(state, "the")
        if not strict:
            if state["fingerprint"] != self.fingerprint:
                log.warning(
                    "rank %d: data changed since the checkpoint (%s); restarting epoch %d from its beginning",
                    self.dist.rank,
                    describe_changes(state["fingerprint"], self.fingerprint),
                    state["epoch"],
                )
            self.start_epoch(state["epoch"])
            return
        if state["fingerprint"] != self.fingerprint:
            raise DataError(
                f"data state does not fit this run: {describe_changes(state['fingerprint'], self.fingerprint)}; "
                "resume with the same data settings, or reset the data position "
                "(TrainData.load_state_dict(state, strict=False) restarts the saved epoch)"
            )
        if state["rank"] != self.dist.rank:
            raise DataError(
                f"data state of rank {state['rank']} loaded on rank {self.dist.rank}; load each rank's own"
            )
        self.start_epoch(state["epoch"])
        self.batches_in_epoch = state["batches_in_epoch"]
        self._local_done = state["local_done"]
        self._done_shards = list(state["shards"]) if state["local_done"] else []
        self._pending_loader_state = state["loader"]
        self._plan = state["reshard"]

    def load_resharded(self, states: list[TrainDataState]) -> None:
        """Continue the epoch of a run saved with another world size, worker count, micro-batch
        size or shuffle buffer.

        ``states`` are *all* old ranks' ``state_dict()``, ordered by rank. They must be in one
        epoch and match this run in everything but :data:`REDEAL_KEYS` (else
        :class:`DataError` naming what changed). Every old shard's leftovers (packer carry, rest
        of its shuffle block, rest of the document that block ended in) and the rows nobody read
        are dealt to the new shards (see the module docstring): no chunk that was yielded before
        the save is yielded again, none is dropped, and only the
        document tails that were packer carries reach the new run having had their heads in the
        old one (at most one per old shard). Costs no reading here; each new shard re-reads the
        old blocks it inherits (<= ``buffer_size`` chunks each) when it gets to them. The result
        is an ordinary position: ``state_dict()`` saves it, ``load_state_dict`` resumes it
        exactly at the new world size. The next epoch is sharded normally.
        """
        if not states:
            raise DataError("load_resharded needs the data states of all saved ranks; got none")
        for i, state in enumerate(states):
            _check_version(state, f"saved rank {i}'s")
        old_fp = states[0]["fingerprint"]
        old_world = old_fp["world_size"]
        ranks = [s["rank"] for s in states]
        if ranks != list(range(old_world)) or any(s["fingerprint"] != old_fp for s in states):
            raise DataError(
                f"re-shard needs the data states of all {old_world} saved ranks of one run, in rank "
                f"order; got ranks {ranks}; check that every dstrain_rank<R>.pt of the checkpoint is there"
            )
        old_rest = {k: v for k, v in old_fp.items() if k not in REDEAL_KEYS}
        new_rest = {k: v for k, v in self.fingerprint.items() if k not in REDEAL_KEYS}
        if old_rest != new_rest:
            raise DataError(
                f"cannot re-deal the data position: {describe_changes(old_rest, new_rest)}; only "
                f"{', '.join(REDEAL_KEYS)} may change with it; change one thing at a time, or reset "
                "the data position (TrainData.start_epoch)"
            )
        epochs = sorted({s["epoch"] for s in states})
        if len(epochs) != 1:
            raise DataError(
                f"the saved ranks are in different epochs {epochs}; the checkpoint is inconsistent, "
                "resume from an older one"
            )
        epoch = epochs[0]
        plan, stats = _plan_reshard(self.spec, epoch, states)
        workers = max(1, self.spec.num_workers)
        self.start_epoch(epoch)
        self._plan = plan[self.dist.rank * workers : (self.dist.rank + 1) * workers]
        if self.dist.is_main:
            log.info(
                "data: epoch %d re-sharded from %d ranks x %d shards each to %d x %d: %d unread rows dealt "
                "evenly; %d leftover pieces handed out first (%d unread chunks of shuffle blocks, %d "
                "packer carries, and the rest of any document cut at a block's end)",
                epoch,
                old_world,
                stats["old_shards"] // old_world,
                self.dist.world_size,
                workers,
                stats["rows"],
                stats["leftovers"],
                stats["unread_chunks"],
                stats["carries"],
            )

    # -- length ---------------------------------------------------------------------------------
    def count_batches(self, epochs: int) -> list[list[int]]:
        """Micro-batches every rank yields in each of the first ``epochs`` epochs (``[epoch][rank]``),
        counted exactly (:mod:`trainer.data.epoch_count`); kept in ``counted_batches``.

        A collective (the ranks share the counting): every rank must call it."""
        tokens, first = row_lengths(self.spec, dict(self.fingerprint), self.dist)
        self.counted_batches = [epoch_batches(self.spec, e, tokens, first) for e in range(epochs)]
        return self.counted_batches


def _old_shard_states(spec: StreamSpec, states: list[TrainDataState]) -> list[ShardState]:
    """Every old shard's state, in shard order: the saved ones, and a start-of-epoch one for a
    shard whose rank had not started the epoch (or whose worker had not reported yet)."""
    fp = states[0]["fingerprint"]
    old_world, old_workers = fp["world_size"], max(1, fp["num_workers"])
    num_shards = old_world * old_workers
    epoch = states[0]["epoch"]
    out = []
    for state in states:
        found = {s["shard"]: dict(s) for s in state["shards"] if s["epoch"] == epoch}
        plan = {p["shard"]: p for p in state.get("reshard") or []}
        for shard in range(state["rank"] * old_workers, (state["rank"] + 1) * old_workers):
            if shard in plan:
                ranges, leftovers = plan[shard]["ranges"], plan[shard]["leftovers"]
            else:
                ranges, leftovers = [list(shard_bounds(spec.total_rows, shard, num_shards))], []
            if state["local_done"]:
                found.setdefault(shard, {**fresh_state(epoch, shard, []), "done": True})
            shard_state = found.get(shard) or fresh_state(epoch, shard, ranges, leftovers)
            shard_state.setdefault("ranges", ranges)  # states written before re-sharding existed
            out.append(shard_state)  # type: ignore[arg-type]
    return out


def _plan_reshard(
    spec: StreamSpec, epoch: int, states: list[TrainDataState]
) -> tuple[list[ShardPlan], dict[str, int]]:
    """The work of every new shard for the rest of ``epoch`` (see the module docstring)."""
    stream = ShardStream(spec)
    stream.set_epoch(epoch)
    unread: list[list[int]] = []
    groups = []
    stats = {"old_shards": 0, "rows": 0, "leftovers": 0, "unread_chunks": 0, "carries": 0}
    for old in _old_shard_states(spec, states):
        ranges, leftovers, chunks = shard_remainder(stream, old, states[0]["fingerprint"]["buffer_size"])
        unread += ranges
        groups.append(leftovers)
        stats["old_shards"] += 1
        stats["leftovers"] += len(leftovers)
        stats["unread_chunks"] += chunks
        stats["carries"] += sum(bool(lo["carry_tokens"]) for lo in leftovers)
    num_shards = spec.world_size * max(1, spec.num_workers)
    merged = merge_ranges(unread)
    stats["rows"] = ranges_rows(merged)
    plan = [ShardPlan(shard=s, ranges=r, leftovers=[]) for s, r in enumerate(deal_ranges(merged, num_shards))]
    for j, leftovers in enumerate(groups):
        plan[j % num_shards]["leftovers"].extend(leftovers)
    for shard in plan:  # carries first: the document tails then follow their heads at once
        shard["leftovers"].sort(key=lambda lo: lo["block_no"] >= 0)
    return plan, stats


def _check_version(state: Any, whose: str) -> None:
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        got = state.get("version") if isinstance(state, dict) else type(state).__name__
        raise DataError(
            f"{whose} saved data position has format {got!r}, this dstrain reads {STATE_VERSION}; "
            "resume with the dstrain version that wrote it, or restart the epoch's data position "
            "(change a data setting such as data.seed, or start a new output_dir)"
        )


def _clean_worker_error(exc: Exception) -> Exception:
    """A DataError raised in a dataloader worker comes back with the worker's traceback in its
    message; give the user the original one-line message again."""
    if isinstance(exc, DataError):
        lines = [ln for ln in str(exc).splitlines() if ln.strip()]
        prefix = f"{DataError.__module__}.{DataError.__name__}: "
        for line in reversed(lines):
            if line.startswith(prefix):
                return DataError(line[len(prefix) :])
    return exc


def describe_changes(old: DataFingerprint, new: DataFingerprint) -> str:
    """One line naming what differs between two fingerprints: ``world_size 2 -> 4; files: ...``."""
    parts = []
    for key in old.keys() | new.keys():
        if key == "files" or old.get(key) == new.get(key):
            continue
        parts.append(f"{key} {old.get(key)!r} -> {new.get(key)!r}")
    old_files = {f["path"]: f for f in old.get("files", [])}
    new_files = {f["path"]: f for f in new.get("files", [])}
    added = [p for p in new_files if p not in old_files]
    removed = [p for p in old_files if p not in new_files]
    changed = [p for p in new_files if p in old_files and new_files[p] != old_files[p]]
    if added:
        parts.append(f"files added: {', '.join(added[:3])}{' ...' if len(added) > 3 else ''}")
    if removed:
        parts.append(f"files removed: {', '.join(removed[:3])}{' ...' if len(removed) > 3 else ''}")
    if changed:
        parts.append(
            f"files changed (size/mtime/rows): {', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''}"
        )
    if not (added or removed or changed) and [f["path"] for f in old.get("files", [])] != [
        f["path"] for f in new.get("files", [])
    ]:
        parts.append("file order changed")
    return "; ".join(sorted(parts)) or "nothing"


def _sft_counts(stats: EpochStats) -> str:
    """The SFT part of the epoch-end log line (empty when nothing was truncated or dropped)."""
    if not (stats["truncated_docs"] or stats["no_target_docs"]):
        return ""
    return (
        f"; SFT samples on rank 0: {stats['truncated_docs']} truncated to max_seq_len (head kept), "
        f"{stats['no_target_docs']} dropped with no response token left"
    )


# ------------------------------------------------------------------------------------------ eval


class EvalBatches:
    """This rank's micro-batches of the fixed validation set; iterate it as often as needed.

    Rows are split among ranks in contiguous, disjoint ranges (file order, no shuffle), so the
    set is the same at every eval. Ranks may get different numbers of batches; iteration does
    no collective, so the trainer can all-reduce its sums afterwards. The batches are cached in
    memory after the first pass when they hold at most EVAL_CACHE_TOKENS tokens.
    """

    def __init__(self, spec: StreamSpec, max_batches: int | None) -> None:
        self.spec = spec
        self.max_batches = max_batches
        self._cache: list[Batch] | None = None

    def __iter__(self) -> Iterator[Batch]:
        if self._cache is not None:
            yield from self._cache
            return
        stream = ShardStream(self.spec)
        kept: list[Batch] | None = []
        tokens = 0
        for i, batch in enumerate(stream):
            if self.max_batches is not None and i >= self.max_batches:
                break
            if kept is not None:
                tokens += batch["input_ids"].numel()
                if tokens <= EVAL_CACHE_TOKENS:
                    kept.append(batch)
                else:
                    kept = None
            yield batch
        if kept is not None:
            self._cache = kept


# --------------------------------------------------------------------------------------- builders


def _describe(paths: list[str], key: str, formatter: Formatter) -> list[SourceFile]:
    columns: Columns = formatter.source_columns()
    files = [describe_file(p, columns) for p in resolve_paths(paths, key)]
    tokenized = [f.path for f in files if f.tokenized]
    if tokenized and (formatter.supervised or formatter.text_template is not None):
        raise DataError(
            f"--{key}: {tokenized[0]} is pre-tokenized (an input_ids column), which carries no loss mask "
            f"and no columns to format; use the raw files with --data.format {formatter.format}"
            + (", or drop --data.text_template" if formatter.format == "text" else "")
        )
    return files


def _fingerprint(spec: StreamSpec, cfg: DataConfig, tokenizer: Any) -> DataFingerprint:
    return DataFingerprint(
        world_size=spec.world_size,
        num_workers=spec.num_workers,
        micro_batch_size=spec.micro_batch_size,
        max_seq_len=spec.max_seq_len,
        pack=spec.pack,
        buffer_size=spec.buffer_size,
        seed=spec.seed,
        text_column=cfg.text_column,
        formatting=spec.formatter.describe(),
        max_samples=cfg.max_samples,
        holdout=[spec.holdout_fraction, spec.holdout_seed],
        tokenizer=tokenizer_fingerprint(tokenizer),
        files=[f.fingerprint() for f in spec.files],
    )


def _stream_spec(
    cfg: DataConfig,
    formatter: Formatter,
    files: list[SourceFile],
    units: list[Any],
    tokenizer: Any,
    dist: DistInfo,
    micro_batch_size: int,
    split: str,
    seed: int,
    holdout: float,
    eos: int | None,
) -> StreamSpec:
    """The stream of one split on this rank; eval runs without dataloader workers."""
    return StreamSpec(
        files=files,
        units=units,
        tokenizer=tokenizer,
        formatter=formatter,
        max_seq_len=cfg.max_seq_len,
        micro_batch_size=micro_batch_size,
        pack=cfg.pack,
        buffer_size=cfg.buffer_size,
        seed=seed,
        eos_id=eos,
        pad_id=pad_id(tokenizer),
        split=split,  # type: ignore[arg-type]
        holdout_fraction=holdout,
        holdout_seed=cfg.validation_seed,
        rank=dist.rank,
        world_size=dist.world_size,
        num_workers=cfg.num_workers if split == "train" else 0,
    )


def build_train_data(
    cfg: DataConfig, tokenizer: Any, dist: DistInfo, seed: int, micro_batch_size: int
) -> TrainData:
    """The training stream of this rank (see ``trainer.data`` for the contract)."""
    t0 = time.perf_counter()
    eos = eos_id(tokenizer, cfg.pack and not cfg.supervised)
    formatter = Formatter(cfg, tokenizer)
    files = _describe(cfg.train, "data.train", formatter)
    units = build_units(files, cfg.max_samples)
    holdout = cfg.validation_fraction if cfg.validation is None else 0.0
    spec = _stream_spec(
        cfg, formatter, files, units, tokenizer, dist, micro_batch_size, "train", seed, holdout, eos
    )
    if spec.total_rows == 0:
        raise DataError(
            f"--data.train holds no rows ({len(files)} files); check the files or --data.max_samples"
        )
    data = TrainData(spec, cfg, dist, _fingerprint(spec, cfg, tokenizer))
    if dist.is_main:
        log.info(
            "data: %d files, %d row groups, %d rows (%s held out for eval); %d shards; format %s; built in %.2fs",
            len(files),
            len(units),
            spec.total_rows,
            f"{holdout:.0%}" if holdout else "none",
            dist.world_size * max(1, cfg.num_workers),
            formatter.describe(),
            time.perf_counter() - t0,
        )
    return data


def build_eval_batches(
    cfg: DataConfig, tokenizer: Any, dist: DistInfo, micro_batch_size: int
) -> EvalBatches | None:
    """This rank's part of the fixed validation set, or None when there is none.

    ``data.validation`` files are used whole; otherwise the rows that ``validation_fraction``
    holds out of ``data.train`` (the train stream skips exactly those rows).
    """
    eos = eos_id(tokenizer, cfg.pack and not cfg.supervised)
    formatter = Formatter(cfg, tokenizer)
    if cfg.validation:
        files = _describe(cfg.validation, "data.validation", formatter)
        units, holdout = build_units(files), 0.0
    elif cfg.validation_fraction > 0:
        files = _describe(cfg.train, "data.train", formatter)
        units, holdout = build_units(files, cfg.max_samples), cfg.validation_fraction
    else:
        return None
    # Eval streams in the training process (no workers) with a fixed seed: the same set every time.
    spec = _stream_spec(
        cfg, formatter, files, units, tokenizer, dist, micro_batch_size, "eval", 0, holdout, eos
    )
    return EvalBatches(spec, cfg.eval_max_batches)


__all__ = [
    "EpochStats",
    "EvalBatches",
    "TrainData",
    "TrainDataState",
    "build_eval_batches",
    "build_train_data",
    "describe_changes",
]
