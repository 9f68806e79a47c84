"""Sharding: which rows of which groups each (rank, worker) reads in an epoch.

The *universe* is the list of :class:`Unit` (one per row group / json block, in file order,
the last one cut short by ``max_samples``). Each epoch permutes the units with a generator
seeded by ``(seed, epoch)``, concatenates their rows, and gives shard ``s`` of ``S`` the
contiguous row range ``[s*N//S, (s+1)*N//S)`` of that sequence, where ``S = world_size *
workers``. Shards are disjoint, together complete, and differ in size by at most one row; a
row group is split between two shards when a boundary falls inside it (so 3 groups on 2 ranks
give 1.5 groups each). Everything here is a pure function of the metadata: no communication.

A shard is in general a *list* of row ranges ``[[lo, hi), ...]`` of the epoch's row sequence,
read in order: one range on the normal path, several after a re-shard (a resume on another
world size or worker count), where the rows nobody read yet are merged (:func:`merge_ranges`)
and dealt again (:func:`deal_ranges`) into consecutive parts of equal row count (+-1).

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
    total = sum(units[i].rows for i in order)
    return range_segments(units, order, [list(shard_bounds(total, shard, num_shards))])


def range_segments(units: list[Unit], order: np.ndarray, ranges: list[list[int]]) -> list[Segment]:
    """The pieces of the units (in epoch order) that make up the row ranges, range after range."""
    rows = np.fromiter((units[i].rows for i in order), dtype=np.int64, count=len(order))
    ends = np.cumsum(rows)
    starts = ends - rows
    segments = []
    for lo, hi in ranges:
        first = int(np.searchsorted(ends, lo, side="right"))
        for k in range(first, len(order)):
            if starts[k] >= hi:
                break
            a, b = max(lo, int(starts[k])) - int(starts[k]), min(hi, int(ends[k])) - int(starts[k])
            if b > a:
                segments.append(Segment(int(order[k]), a, b))
    return segments


def ranges_rows(ranges: list[list[int]]) -> int:
    """How many rows the ranges hold."""
    return sum(hi - lo for lo, hi in ranges)


def ranges_after(ranges: list[list[int]], offset: int) -> list[list[int]]:
    """The ranges without their first ``offset`` rows (counted range after range)."""
    out = []
    for lo, hi in ranges:
        skip = min(offset, hi - lo)
        offset -= skip
        if lo + skip < hi:
            out.append([lo + skip, hi])
    return out


def row_position(ranges: list[list[int]], offset: int) -> int:
    """The epoch row position of the ``offset``-th row of the ranges (the end of the last if past it)."""
    for lo, hi in ranges:
        if offset < hi - lo:
            return lo + offset
        offset -= hi - lo
    return ranges[-1][1] if ranges else 0


def merge_ranges(ranges: list[list[int]]) -> list[list[int]]:
    """Sorted, with touching ranges joined and empty ones gone; overlapping ranges are a bug."""
    out: list[list[int]] = []
    for lo, hi in sorted(r for r in ranges if r[1] > r[0]):
        assert not out or lo >= out[-1][1], f"overlapping row ranges {out[-1]} and {[lo, hi]}"
        if out and lo == out[-1][1]:
            out[-1][1] = hi
        else:
            out.append([lo, hi])
    return out


def deal_ranges(ranges: list[list[int]], num_shards: int) -> list[list[list[int]]]:
    """Split the rows of ``ranges`` (in order) into ``num_shards`` consecutive parts whose row
    counts differ by at most one: the :func:`shard_bounds` rule applied to their concatenation."""
    total = ranges_rows(ranges)
    parts = []
    for shard in range(num_shards):
        lo, hi = shard_bounds(total, shard, num_shards)
        parts.append(_ranges_head(ranges_after(ranges, lo), hi - lo))
    return parts


def _ranges_head(ranges: list[list[int]], count: int) -> list[list[int]]:
    """The first ``count`` rows of the ranges."""
    out = []
    for lo, hi in ranges:
        if count <= 0:
            break
        take = min(count, hi - lo)
        out.append([lo, lo + take])
        count -= take
    return out


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
