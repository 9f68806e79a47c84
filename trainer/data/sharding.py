"""Sharding: which rows of which groups each (rank, worker) reads in an epoch.

The *universe* is the list of :class:`Unit` (one per row group / json block, in file order,
the last one cut short by ``max_samples``). Each epoch permutes the units with a generator
seeded by ``(seed, epoch)``, concatenates their rows, and gives shard ``s`` of ``S`` the
contiguous row range ``[s*N//S, (s+1)*N//S)`` of that sequence, where ``S = world_size *
workers``. Shards are disjoint, together complete, and differ in size by at most one row; a
row group is split between two shards when a boundary falls inside it (so 3 groups on 2 ranks
give 1.5 groups each). Everything here is a pure function of the metadata: no communication.

The held-out split (``validation_fraction``) is by row: a row is held out when a hash of
``(validation_seed, global row index)`` falls below the fraction. Both the train stream
(which skips those rows) and the eval stream (which keeps only them) apply the same test
while reading, so no list of rows is ever materialised.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trainer.data.sources import SourceFile


@dataclass(frozen=True)
class Unit:
    """Rows ``[0, rows)`` of group ``group`` of file ``file``; ``row_base`` = global index of row 0."""

    file: int
    group: int
    rows: int
    row_base: int


@dataclass(frozen=True)
class Segment:
    """Rows ``[start, stop)`` of ``units[unit]``: a shard's piece of one group."""

    unit: int
    start: int
    stop: int


def build_units(files: list[SourceFile], max_rows: int | None = None) -> list[Unit]:
    """All groups of all files in file order, cut after ``max_rows`` rows (``data.max_samples``)."""
    units: list[Unit] = []
    base = 0
    for fi, src in enumerate(files):
        for gi, group in enumerate(src.groups):
            if max_rows is not None and base >= max_rows:
                return units
            rows = group.rows if max_rows is None else min(group.rows, max_rows - base)
            if rows == 0:
                continue  # an empty row group
            units.append(Unit(fi, gi, rows, base))
            base += rows
    return units


def epoch_order(num_units: int, seed: int, epoch: int) -> np.ndarray:
    """The seeded permutation of units for an epoch."""
    return np.random.default_rng([seed, epoch]).permutation(num_units)


def shard_bounds(total_rows: int, shard: int, num_shards: int) -> tuple[int, int]:
    """The contiguous row range of ``shard`` in the epoch's row sequence (sizes differ by <= 1)."""
    return shard * total_rows // num_shards, (shard + 1) * total_rows // num_shards


def shard_segments(units: list[Unit], order: np.ndarray, shard: int, num_shards: int) -> list[Segment]:
    """The pieces of the units (in epoch order) that make up ``shard``'s row range."""
    rows = np.fromiter((units[i].rows for i in order), dtype=np.int64, count=len(order))
    ends = np.cumsum(rows)
    starts = ends - rows
    lo, hi = shard_bounds(int(ends[-1]) if len(ends) else 0, shard, num_shards)
    segments = []
    first = int(np.searchsorted(ends, lo, side="right"))
    for k in range(first, len(order)):
        if starts[k] >= hi:
            break
        a, b = max(lo, int(starts[k])) - int(starts[k]), min(hi, int(ends[k])) - int(starts[k])
        if b > a:
            segments.append(Segment(int(order[k]), a, b))
    return segments


_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return x ^ (x >> np.uint64(31))


def held_out(global_rows: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask: which global row indices belong to the validation split."""
    if fraction <= 0:
        return np.zeros(len(global_rows), dtype=bool)
    with np.errstate(over="ignore"):
        keyed = global_rows.astype(np.uint64) ^ _splitmix64(np.asarray([seed], dtype=np.uint64))
    u = (_splitmix64(keyed) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return u < fraction
