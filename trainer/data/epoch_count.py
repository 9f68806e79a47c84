"""The exact length of every epoch, for the LR schedule in epochs mode.

The schedule is built before the first step, so it needs the number of optimizer steps that
``train.epochs`` passes over the data will take. That number is not a property of the rows
alone: it depends on the tokenizer, the formatting, ``max_seq_len``, packing (and for SFT on
the order the shuffle buffer hands samples to the packer, which keeps up to
``SFT_PACK_WINDOW`` samples aside), the shards of each rank and worker, and the seeded order of
each epoch. So it is counted, not estimated, in two parts:

1. **Token lengths per row** (:func:`row_lengths`): every row formatted once, as the stream
   does, and reduced to its token count (and, for SFT, the index of its first target token,
   which decides whether a truncated sample is dropped). The ranks split the row groups among
   themselves and gather the result (one all-gather). The table does not depend on
   ``max_seq_len``, packing, the seed or the world size, so it is cached beside the data
   (``<dir of the first file>/.dstrain_cache/``, else ``~/.cache/dstrain/``), keyed by a hash of
   the files (path, size, mtime, rows), the tokenizer, the formatting and ``max_samples``: a
   second run, a resume, or a run with other batch settings reads it back in milliseconds.
2. **A replay of the stream on lengths** (:func:`epoch_batches`): the same units, epoch order,
   shard ranges and held-out rows as :class:`~trainer.data.stream.ShardStream`; documents are
   cut and packed as ``packing`` does (rows of documents: ``ceil(tokens / max_seq_len)``; SFT
   samples: the shuffle blocks permuted by the same seeded generator and a length-only twin of
   ``Packer._fill_samples``). It yields the micro-batches of every rank in every epoch.

An epoch is then ``ceil(max over ranks of micro-batches / grad_accum)`` optimizer steps (the
Trainer runs filler micro-batches on ranks that ran out until every rank has). Cost: step 1 is
one tokenization pass over the data, shared by the ranks (the dataloader does the same work
during the epoch); step 2 is numpy over the row table per epoch (plus a Python loop over the
samples for packed SFT). Not covered: a resume on another world size re-deals the rest of the
saved epoch (``TrainData.load_resharded``), which this count does not replay; the Trainer warns
when an epoch ends off the count.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from trainer.data.packing import SFT_PACK_WINDOW
from trainer.data.sharding import epoch_order, held_out, range_segments, shard_bounds
from trainer.data.sources import read_group
from trainer.data.stream import StreamSpec, row_locator
from trainer.dist import DistInfo, all_gather_objects, all_reduce_max

log = logging.getLogger("dstrain.data")

LENGTHS_VERSION = 1
#: first_target of a sample with no target token at all.
NO_TARGET = np.iinfo(np.int32).max


def cache_key(fingerprint: dict[str, Any]) -> str:
    """What the row table depends on: the files, the tokenizer, the formatting, max_samples."""
    files = [{k: f[k] for k in ("path", "size", "mtime_ns", "rows")} for f in fingerprint["files"]]
    blob = json.dumps(
        {
            "version": LENGTHS_VERSION,
            "files": files,
            "tokenizer": fingerprint["tokenizer"],
            "formatting": fingerprint["formatting"],
            "text_column": fingerprint["text_column"],
            "max_samples": fingerprint["max_samples"],
        },
        sort_keys=True,
    )
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()[:20]


def cache_paths(spec: StreamSpec, key: str) -> list[Path]:
    """Where the table may live: beside the data first, then the user's cache."""
    name = f"row_lengths-{key}.npz"
    beside = Path(spec.files[0].path).parent / ".dstrain_cache" / name
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dstrain" / name
    return [beside, home]


def _load(paths: list[Path], total_rows: int) -> tuple[np.ndarray, np.ndarray] | None:
    for path in paths:
        try:
            with np.load(path, allow_pickle=False) as saved:
                tokens, first = saved["tokens"], saved["first_target"]
        except (OSError, KeyError, ValueError):
            continue
        if len(tokens) == total_rows and len(first) == total_rows:
            return tokens, first
    return None


def _save(paths: list[Path], tokens: np.ndarray, first: np.ndarray) -> Path | None:
    """Write the table atomically to the first place that takes it (None when none does)."""
    for path in paths:
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                np.savez(f, tokens=tokens, first_target=first)
            os.replace(tmp, path)
            return path
        except OSError:
            tmp.unlink(missing_ok=True)
    return None


def unit_lengths(spec: StreamSpec, unit_index: int) -> tuple[np.ndarray, np.ndarray]:
    """Token count and first target index of every row of one unit (0 tokens: a skipped row)."""
    unit = spec.units[unit_index]
    src = spec.files[unit.file]
    fmt = spec.formatter
    tokens = np.zeros(unit.rows, dtype=np.int32)
    first = np.full(unit.rows, NO_TARGET, dtype=np.int32)
    at = 0
    for rb in read_group(src, unit.group, unit.row_base, 0, unit.rows, fmt.single_column or fmt.columns):
        n = len(rb.values)
        if src.tokenized:
            tokens[at : at + n] = [len(v) if v is not None else 0 for v in rb.values]
        else:
            locate = row_locator(src, src.groups[unit.group].first_row + at, list(range(n)))
            for i, sample in enumerate(fmt.format_batch(rb.values, locate)):
                if sample is None or len(sample.ids) == 0:
                    continue
                tokens[at + i] = len(sample.ids)
                if sample.mask is not None:
                    hits = np.flatnonzero(sample.mask[1:])
                    first[at + i] = hits[0] + 1 if len(hits) else NO_TARGET
                else:
                    first[at + i] = 1
        at += n
    return tokens, first


def row_lengths(
    spec: StreamSpec, fingerprint: dict[str, Any], dist: DistInfo
) -> tuple[np.ndarray, np.ndarray]:
    """Token count and first target index of every global row, from the cache or counted by
    all ranks together (see the module docstring). Every rank must call it."""
    started = time.perf_counter()
    paths = cache_paths(spec, cache_key(fingerprint))
    cached = _load(paths, spec.total_rows)
    # Node-local data can be cached on one node and not another: count together unless all have it.
    (missing,) = all_reduce_max([float(cached is None)], dist, "the epoch count at start")
    if cached is not None and not missing:
        return cached
    import torch

    # Without a process group (one process, or a test building one rank's view) it counts alone.
    together = dist.world_size > 1 and torch.distributed.is_initialized()
    world, rank = (dist.world_size, dist.rank) if together else (1, 0)
    mine = {i: unit_lengths(spec, i) for i in range(len(spec.units)) if i % world == rank}
    tokens = np.zeros(spec.total_rows, dtype=np.int32)
    first = np.full(spec.total_rows, NO_TARGET, dtype=np.int32)
    for part in all_gather_objects(mine, dist, "the epoch count at start"):
        for i, (t, f) in part.items():  # type: ignore[union-attr]
            unit = spec.units[i]
            tokens[unit.row_base : unit.row_base + unit.rows] = t
            first[unit.row_base : unit.row_base + unit.rows] = f
    saved = _save(paths, tokens, first) if dist.local_rank == 0 else None
    if dist.is_main:
        log.info(
            "data: counted the token length of %d rows in %.1fs%s",
            spec.total_rows,
            time.perf_counter() - started,
            f" (cached in {saved})" if saved else "",
        )
    return tokens, first


def shard_rows(spec: StreamSpec, epoch: int, shard: int, num_shards: int) -> np.ndarray:
    """Global row indices of one train shard in one epoch, in reading order, held-out rows removed."""
    order = epoch_order(len(spec.units), spec.seed, epoch)
    segments = range_segments(spec.units, order, [list(shard_bounds(spec.total_rows, shard, num_shards))])
    parts = [spec.units[s.unit].row_base + np.arange(s.start, s.stop, dtype=np.int64) for s in segments]
    rows = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if spec.holdout_fraction > 0:
        rows = rows[~held_out(rows, spec.holdout_fraction, spec.holdout_seed)]
    return rows


def shard_packed_rows(
    spec: StreamSpec, epoch: int, shard: int, rows: np.ndarray, tokens: np.ndarray, first: np.ndarray
) -> int:
    """How many rows (sequences) the shard's stream builds from its rows in this epoch."""
    T = spec.max_seq_len
    lengths = tokens[rows].astype(np.int64)
    live = lengths > 0
    if not spec.formatter.supervised:
        n = lengths[live] + (1 if spec.pack else 0)  # packing appends EOS
        if spec.pack:  # documents are cut and laid end to end: only the last row is partial
            return int(-(-int(n.sum()) // T))
        return int((-(-n // T)).sum())  # each max_seq_len piece is a row
    kept = live & (first[rows] < T)  # a sample with no target left after truncation is dropped
    n = np.minimum(lengths[kept], T)
    if not spec.pack:
        return len(n)
    return _sft_packed_rows(_shuffled(spec, epoch, shard, n), T, SFT_PACK_WINDOW)


def _shuffled(spec: StreamSpec, epoch: int, shard: int, lengths: np.ndarray) -> list[int]:
    """The lengths in the order the shard's block shuffle buffer hands them out."""
    out: list[int] = []
    size = spec.buffer_size
    for block_no, lo in enumerate(range(0, len(lengths), size)):
        block = lengths[lo : lo + size]
        if len(block) > 1:
            block = block[np.random.default_rng([spec.seed, epoch, shard, block_no]).permutation(len(block))]
        out.extend(block.tolist())
    return out


def _sft_packed_rows(lengths: list[int], seq_len: int, window: int) -> int:
    """Rows ``Packer(window=...)`` fills with whole samples of these lengths, in this order."""
    stream = iter(lengths)
    pending: list[int] = []
    rows = 0
    while True:
        fill = 0
        waiting, pending = pending, []
        for n in waiting:
            if fill + n <= seq_len:
                fill += n
            else:
                pending.append(n)
        while fill < seq_len and len(pending) <= window:
            n = next(stream, None)
            if n is None:
                break
            if fill + n <= seq_len:
                fill += n
            else:
                pending.append(n)
        if fill == 0:
            return rows
        rows += 1


def epoch_batches(spec: StreamSpec, epoch: int, tokens: np.ndarray, first: np.ndarray) -> list[int]:
    """Micro-batches every rank yields in ``epoch`` (index: rank), from the row table."""
    workers = max(1, spec.num_workers)
    num_shards = spec.world_size * workers
    B = spec.micro_batch_size
    per_rank = [0] * spec.world_size
    for shard in range(num_shards):
        rows = shard_packed_rows(
            spec, epoch, shard, shard_rows(spec, epoch, shard, num_shards), tokens, first
        )
        per_rank[shard // workers] += -(-rows // B)
    return per_rank
