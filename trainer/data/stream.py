"""One shard's stateful stream: read rows -> format -> chunk -> shuffle block -> pack/pad -> batch.

Stages (each a small piece of state, all in :class:`ShardStream`):

1. *source*: the shard's :class:`Segment` list (see ``sharding``), read in record batches;
   the position is ``(segment, row within segment, chunk within the row's document)``;
2. *format*: :class:`~trainer.data.formatting.Formatter` turns each record batch into token ids
   and loss masks (one batched tokenizer call; skipped for pre-tokenized files); null, empty or
   non-string values of text formats are skipped and counted in ``skipped_docs``. Documents
   longer than ``max_seq_len`` (EOS included when packing) are cut into chunks, so a document
   longer than the whole buffer simply spans several blocks. SFT samples are kept whole:
   truncated to ``max_seq_len`` (the head is kept; ``truncated_docs``), and dropped when no
   target token is left (``no_target_docs``);
3. *shuffle*: a seeded **block shuffle buffer**: ``buffer_size`` chunks are read, permuted
   with a generator seeded by ``(seed, epoch, shard, block number)`` and handed out in order.
   Its state is therefore the block's start position plus an index into it, never its
   contents, and no RNG state needs saving;
4. *pack/pad* and *batch*: :mod:`trainer.data.packing`; the packer's carry-over (< max_seq_len
   tokens of a document) is saved as token ids, the SFT samples it set aside (``pending``) as
   token ids and loss-mask runs.

Restoring re-reads and re-tokenizes the current block (``buffer_size`` chunks, from at most a
few row groups): its cost depends on the buffer and row-group sizes, never on how many
batches were consumed; nothing is replayed.

A shard ends with a partial, filler-padded batch; the stream then simply ends
(``StopIteration``), and :class:`~trainer.data.pipeline.TrainData` keeps ranks in step.

Re-shard seam: a shard's rows are a list of ranges (``ShardState.ranges``), and a shard can
start with :class:`Leftover` pieces, the chunks that *other* shards of a run saved on another
world size had read but not handed out (their packer carry, the rest of their current shuffle
block, the rest of the document that block ended in). A leftover is stored as the position
that re-creates it (the old shard's ranges, block start, block number, index), never as its
tokens, except the carry. :func:`shard_remainder` splits an old shard's state into "leftovers"
and "row ranges not read yet"; ``TrainData.load_resharded`` deals them to the new shards.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

import numpy as np
import pyarrow.parquet as pq
from torch.utils.data import IterableDataset, get_worker_info

from trainer.data.formatting import Formatter, Sample
from trainer.data.packing import SFT_PACK_WINDOW, Batch, Chunk, Packer, chunk_document, chunk_row, collate
from trainer.data.sharding import (
    Segment,
    Unit,
    epoch_order,
    held_out,
    range_segments,
    ranges_after,
    row_position,
    shard_bounds,
)
from trainer.data.sources import SourceFile, open_parquet, read_group

Split = Literal["train", "eval"]
#: Per-epoch counters of a shard, saved at the block start (the ``*_read`` twins: at the read position).
COUNTERS = ("docs", "skipped_docs", "truncated_docs", "no_target_docs")


def counter_fields(at_block: Mapping[str, int], at_read: Mapping[str, int] | None = None) -> dict[str, int]:
    """A :class:`ShardState`'s counters: each of :data:`COUNTERS` as of the block start, and
    the ``*_read`` twin of each but ``docs`` as of the read position (default: the same)."""
    at_read = at_block if at_read is None else at_read
    fields = {"docs": at_block["docs"]}
    for name in COUNTERS[1:]:  # in ShardState's order
        fields[name] = at_block[name]
        fields[name.replace("_docs", "_read")] = at_read[name]
    return fields


@dataclass
class StreamSpec:
    """Everything a shard stream needs; pickled to dataloader workers."""

    files: list[SourceFile]
    units: list[Unit]
    tokenizer: Any
    formatter: Formatter
    max_seq_len: int
    micro_batch_size: int
    pack: bool
    buffer_size: int
    seed: int
    eos_id: int | None
    pad_id: int
    split: Split
    # Row-level held-out split: train drops, eval keeps, rows with held_out(...) True.
    holdout_fraction: float = 0.0
    holdout_seed: int = 0
    rank: int = 0
    world_size: int = 1
    num_workers: int = 0
    total_rows: int = field(init=False)

    def __post_init__(self) -> None:
        self.total_rows = sum(u.rows for u in self.units)


class SavedSample(TypedDict):
    """An SFT sample the packer set aside, in a state: its tokens and the runs of its loss mask."""

    doc: int
    tokens: list[int]
    targets: list[list[int]]  # [start, end) runs where the loss mask is 1


def save_sample(chunk: Chunk) -> SavedSample:
    doc, tokens, mask = chunk
    assert mask is not None
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return SavedSample(doc=int(doc), tokens=tokens.tolist(), targets=edges.reshape(-1, 2).tolist())


def load_sample(saved: SavedSample) -> Chunk:
    tokens = np.asarray(saved["tokens"], dtype=np.int32)
    mask = np.zeros(len(tokens), dtype=np.uint8)
    for a, b in saved["targets"]:
        mask[a:b] = 1
    return (saved["doc"], tokens, mask)


class Leftover(TypedDict):
    """Chunks that a shard of a run saved on another world size had read but not handed out.

    Handed out in this order: the carry (explicit tokens, < max_seq_len) and the SFT samples its
    packer had set aside (``pending``), then the old shard's
    current block re-read from ``block_start`` and permuted as that shard did, from
    ``block_index`` on, followed by the remaining chunks of the document the block ended in.
    ``block_no`` -1 means a carry only.
    """

    shard: int  # the old shard (seeds its block permutation)
    ranges: list[list[int]]  # the old shard's row ranges: rebuild its segments
    block_no: int
    block_start: list[int]  # [segment, row, chunk] in the old shard's segments
    block_index: int  # entries of (permuted block + rest of its last document) handed out
    buffer_size: int  # the old run's shuffle block size (the block is re-read with it)
    carry_doc: int
    carry_tokens: list[int]
    pending: list[SavedSample]


class ShardPlan(TypedDict):
    """A shard's work for one re-sharded epoch: leftovers first, then its row ranges."""

    shard: int
    ranges: list[list[int]]
    leftovers: list[Leftover]


class ShardState(TypedDict):
    """Position of one shard's stream after the last batch it produced."""

    epoch: int
    shard: int
    block_no: int  # number of the current shuffle block (-1 before the first)
    block_start: list[int]  # [segment, row within segment, chunk] where the block's reading began
    block_index: int  # chunks of the block already handed out
    block_len: int  # chunks in the current block (<= buffer_size)
    block_end: list[int]  # [segment, row, chunk] where the block's reading stopped
    carry_doc: int  # packer carry-over of a document (doc id, tokens), -1 / [] when none
    carry_tokens: list[int]
    pending: list[SavedSample]  # SFT samples the packer set aside (<= SFT_PACK_WINDOW + 1)
    docs: int  # documents read so far this epoch, as of the block start
    skipped_docs: int  # null/empty/non-string values skipped this epoch, as of the block start
    skipped_read: int  # the same, counted up to the read position (what is reported)
    truncated_docs: int  # SFT samples cut to max_seq_len this epoch, as of the block start
    truncated_read: int  # the same, up to the read position
    no_target_docs: int  # SFT samples dropped with no target token left, as of the block start
    no_target_read: int  # the same, up to the read position
    ranges: list[list[int]]  # the shard's row ranges [[lo, hi), ...] in the epoch's row sequence
    leftovers: list[Leftover]  # re-shard: other shards' chunks still to hand out, before block 0
    next_row: int  # epoch row position of block_start (the shard's rows before it are consumed)
    done: bool


def fresh_state(
    epoch: int, shard: int, ranges: list[list[int]], leftovers: list[Leftover] | None = None
) -> ShardState:
    return ShardState(
        epoch=epoch,
        shard=shard,
        block_no=-1,
        block_start=[0, 0, 0],
        block_index=0,
        block_len=0,
        block_end=[0, 0, 0],
        carry_doc=-1,
        carry_tokens=[],
        pending=[],
        **counter_fields(dict.fromkeys(COUNTERS, 0)),
        ranges=[list(r) for r in ranges],
        leftovers=[_copy_leftover(lo) for lo in leftovers or []],
        next_row=ranges[0][0] if ranges else 0,
        done=False,
    )


def _copy_leftover(lo: Leftover) -> Leftover:
    return Leftover(
        shard=lo["shard"],
        ranges=[list(r) for r in lo["ranges"]],
        block_no=lo["block_no"],
        block_start=list(lo["block_start"]),
        block_index=lo["block_index"],
        buffer_size=lo["buffer_size"],
        carry_doc=lo["carry_doc"],
        carry_tokens=list(lo["carry_tokens"]),
        pending=[_copy_sample(p) for p in lo["pending"]],
    )


def _copy_sample(saved: SavedSample) -> SavedSample:
    return SavedSample(
        doc=saved["doc"], tokens=list(saved["tokens"]), targets=[list(t) for t in saved["targets"]]
    )


class ShardStream(IterableDataset):
    """The batches of one (rank, worker) shard for one epoch, with exact, cheap resume.

    ``state_dict()`` is the position after the last batch yielded; ``load_state_dict()`` makes
    the next ``iter()`` continue from it. ``set_epoch()`` before ``iter()`` picks the epoch.
    """

    def __init__(self, spec: StreamSpec) -> None:
        self.spec = spec
        self.epoch = 0
        self.plan: dict[int, ShardPlan] | None = None  # the epoch's re-shard plan, by shard
        self._resume: ShardState | None = None
        self._state: ShardState | None = None

    # -- Stateful protocol (called by StatefulDataLoader inside each worker) ----------------
    def state_dict(self) -> ShardState:
        if self._state is not None:
            return dict(self._state)  # type: ignore[return-value]
        if self._resume is not None:
            return dict(self._resume)  # type: ignore[return-value]
        shard, num_shards = self._shard()
        ranges, leftovers = self._work(shard, num_shards)
        return fresh_state(self.epoch, shard, ranges, leftovers)

    def load_state_dict(self, state: ShardState) -> None:
        self._resume = dict(state)  # type: ignore[assignment]
        self._state = None

    def set_epoch(self, epoch: int, plan: list[ShardPlan] | None = None) -> None:
        """Pick the epoch; ``plan`` (a re-sharded epoch) replaces the normal row ranges."""
        self.epoch = epoch
        self.plan = None if plan is None else {p["shard"]: p for p in plan}
        self._resume = None
        self._state = None

    # -- plan ---------------------------------------------------------------------------------
    def _shard(self) -> tuple[int, int]:
        info = get_worker_info()
        workers = max(1, self.spec.num_workers) if self.spec.split == "train" else 1
        worker = info.id if info is not None else 0
        return self.spec.rank * workers + worker, self.spec.world_size * workers

    def _work(self, shard: int, num_shards: int) -> tuple[list[list[int]], list[Leftover]]:
        """The shard's row ranges and leftovers this epoch: its contiguous share, or the plan's."""
        if self.plan is None:
            return [list(shard_bounds(self.spec.total_rows, shard, num_shards))], []
        if shard not in self.plan:
            raise RuntimeError(f"re-shard plan has no entry for shard {shard} (has {sorted(self.plan)})")
        return self.plan[shard]["ranges"], self.plan[shard]["leftovers"]

    def _segments(self, ranges: list[list[int]]) -> list[Segment]:
        spec = self.spec
        if not spec.units:
            return []
        if spec.split == "train":
            order = epoch_order(len(spec.units), spec.seed, self.epoch)
        else:
            order = np.arange(len(spec.units))
        return range_segments(spec.units, order, ranges)

    def _read_block(
        self, chunks: Iterator[Chunk], shard: int, block_no: int, buffer_size: int | None = None
    ) -> list[Chunk]:
        """The next ``buffer_size`` chunks (default: this run's), permuted by ``(seed, epoch,
        shard, block_no)`` (train)."""
        spec = self.spec
        block = list(itertools.islice(chunks, buffer_size or spec.buffer_size))
        if spec.split == "train" and len(block) > 1:
            perm = np.random.default_rng([spec.seed, self.epoch, shard, block_no]).permutation(len(block))
            block = [block[i] for i in perm]
        return block

    def reread_block(
        self,
        shard: int,
        ranges: list[list[int]],
        block_no: int,
        block_start: list[int],
        with_tail: bool,
        buffer_size: int | None = None,
    ) -> tuple[list[Chunk], list[int]]:
        """Re-create shard ``shard``'s block ``block_no`` of this epoch exactly as that shard read
        it; ``with_tail`` appends the remaining chunks of the document the block ended in.
        Returns the chunks and the read position after them. Costs one block of reading."""
        counters: dict[str, Any] = {name: 0 for name in COUNTERS}
        counters["next"] = list(block_start)
        chunks = self._chunks(self._segments(ranges), list(block_start), counters)
        block = self._read_block(chunks, shard, block_no, buffer_size)
        end = list(counters["next"])
        if with_tail:
            while counters["next"][2] != 0 and (chunk := next(chunks, None)) is not None:
                block.append(chunk)
        return block, end

    # -- stages ---------------------------------------------------------------------------------
    def _chunks(self, segments: list[Segment], start: list[int], counters: dict[str, int]) -> Iterator[Chunk]:
        """Source + format + chunk: chunks from position ``start``; ``counters['next']`` tracks the position."""
        spec = self.spec
        fmt = spec.formatter
        seg0, row0, chunk0 = start
        pf_cache: dict[int, pq.ParquetFile] = {}
        for si in range(seg0, len(segments)):
            seg = segments[si]
            unit = spec.units[seg.unit]
            src = spec.files[unit.file]
            r = row0 if si == seg0 else 0
            pf = None
            if src.kind == "parquet":
                if unit.file not in pf_cache:
                    pf_cache.clear()  # one open file at a time
                    pf_cache[unit.file] = open_parquet(src.path)
                pf = pf_cache[unit.file]
            columns = fmt.single_column or fmt.columns
            for rb in read_group(src, unit.group, unit.row_base, seg.start + r, seg.stop, columns, pf):
                n = len(rb.values)
                rows = np.arange(
                    unit.row_base + seg.start + r, unit.row_base + seg.start + r + n, dtype=np.int64
                )
                keep = held_out(rows, spec.holdout_fraction, spec.holdout_seed)
                if spec.split == "train":
                    keep = ~keep
                elif spec.holdout_fraction <= 0:
                    keep = np.ones(n, dtype=bool)
                if src.tokenized:
                    samples: list[Sample | None] = [
                        Sample(v, None) if keep[i] and _is_valid(v) else None for i, v in enumerate(rb.values)
                    ]
                else:
                    live = [i for i in range(n) if keep[i]]
                    first = src.groups[unit.group].first_row + seg.start + r
                    formatted = fmt.format_batch([rb.values[i] for i in live], row_locator(src, first, live))
                    samples = [None] * n
                    for i, sample in zip(live, formatted, strict=True):
                        samples[i] = sample
                for i in range(n):
                    if not keep[i]:
                        r += 1
                        continue
                    sample = samples[i]
                    if sample is None or len(sample.ids) == 0:
                        counters["skipped_docs"] += 1
                        r += 1
                        continue
                    doc = int(rb.doc_ids[i])
                    if fmt.supervised:
                        whole = _whole_sample(doc, sample, spec.max_seq_len, counters)
                        if whole is None:
                            r += 1
                            continue
                        pieces = [whole]
                    else:
                        ids = np.asarray(sample.ids, dtype=np.int32)
                        if spec.pack:
                            ids = np.append(ids, np.int32(spec.eos_id))
                        pieces = chunk_document(doc, ids, spec.max_seq_len)
                    counters["docs"] += chunk0 == 0
                    for c in range(chunk0, len(pieces)):
                        last = c + 1 == len(pieces)
                        counters["next"] = [si, r + 1, 0] if last else [si, r, c + 1]
                        yield pieces[c]
                    chunk0 = 0
                    r += 1
            row0 = 0

    def __iter__(self) -> Iterator[Batch]:
        spec = self.spec
        shard, num_shards = self._shard()
        ranges, planned = self._work(shard, num_shards)
        segments = self._segments(ranges)
        state = self._resume if self._resume is not None else fresh_state(self.epoch, shard, ranges, planned)
        self._resume = None
        if state["epoch"] != self.epoch or state["shard"] != shard:
            raise RuntimeError(
                f"shard state for epoch {state['epoch']} shard {state['shard']} loaded into "
                f"epoch {self.epoch} shard {shard}"
            )
        if state["done"]:
            self._state = state
            return
        seg_lengths = np.cumsum([0] + [s.stop - s.start for s in segments])
        # States written before re-sharding existed have no leftovers (and no block extent).
        leftovers = [_copy_leftover(lo) for lo in state.get("leftovers", [])]
        leftover_chunks: list[Chunk] | None = None

        block: list[Chunk] = []
        block_index = 0
        block_no = state["block_no"]
        block_start = list(state["block_start"])
        block_counters = {name: state[name] for name in COUNTERS}
        counters: dict[str, Any] = {**block_counters, "next": list(block_start)}
        block_end = list(block_start)
        chunks = self._chunks(segments, block_start, counters)

        def read_block() -> None:
            nonlocal block, block_index, block_end
            block = self._read_block(chunks, shard, block_no)
            block_index = 0
            block_end = list(counters["next"])

        if block_no >= 0:  # resume inside a block: re-read it, then skip what was handed out
            read_block()
            block_index = state["block_index"]
            block_counters = {name: state[name] for name in COUNTERS}

        def pull_leftover() -> Chunk | None:
            """The next chunk of the leftovers (a re-sharded epoch hands them out first)."""
            nonlocal leftover_chunks
            while leftovers:
                lo = leftovers[0]
                if lo["carry_tokens"]:
                    chunk = carry_chunk(lo["carry_doc"], lo["carry_tokens"])
                    lo["carry_doc"], lo["carry_tokens"] = -1, []
                    return chunk
                if lo["pending"]:
                    return load_sample(lo["pending"].pop(0))
                if lo["block_no"] >= 0 and leftover_chunks is None:
                    leftover_chunks, _ = self.reread_block(
                        lo["shard"],
                        lo["ranges"],
                        lo["block_no"],
                        lo["block_start"],
                        with_tail=True,
                        buffer_size=lo["buffer_size"],
                    )
                if leftover_chunks is not None and lo["block_index"] < len(leftover_chunks):
                    lo["block_index"] += 1
                    return leftover_chunks[lo["block_index"] - 1]
                leftovers.pop(0)
                leftover_chunks = None
            return None

        def pull() -> Chunk | None:
            nonlocal block_index, block_no, block_start, block_counters
            if leftovers and (chunk := pull_leftover()) is not None:
                return chunk
            if block_index >= len(block):
                block_no += 1
                block_start = list(counters["next"])
                block_counters = {k: v for k, v in counters.items() if k != "next"}
                read_block()
                if not block:
                    return None
            block_index += 1
            return block[block_index - 1]

        packer = Packer(spec.max_seq_len, spec.pad_id, SFT_PACK_WINDOW if spec.formatter.supervised else None)
        if state["carry_tokens"]:
            packer.carry = carry_chunk(state["carry_doc"], state["carry_tokens"])
        packer.pending = [load_sample(p) for p in state["pending"]]

        def snapshot(done: bool) -> ShardState:
            carry = packer.carry
            offset = int(seg_lengths[min(block_start[0], len(segments))]) + block_start[1]
            return ShardState(
                epoch=self.epoch,
                shard=shard,
                block_no=block_no,
                block_start=list(block_start),
                block_index=block_index,
                block_len=len(block),
                block_end=list(block_end),
                carry_doc=carry[0] if carry else -1,
                carry_tokens=carry[1].tolist() if carry else [],
                pending=[save_sample(c) for c in packer.pending],
                **counter_fields(block_counters, counters),
                ranges=[list(r) for r in ranges],
                leftovers=[_copy_leftover(lo) for lo in leftovers],
                next_row=row_position(ranges, offset),
                done=done,
            )

        B = spec.micro_batch_size
        while True:
            rows = []
            while len(rows) < B:
                if spec.pack:
                    row = packer.next_row(pull)
                else:
                    chunk = pull()
                    row = chunk_row(chunk) if chunk is not None else None
                if row is None:
                    break
                rows.append(row)
            if not rows:
                self._state = snapshot(done=True)
                return
            self._state = snapshot(done=len(rows) < B)
            yield collate(rows, B, spec.pad_id, spec.pack, spec.max_seq_len)
            if len(rows) < B:
                return


def shard_remainder(
    stream: ShardStream, state: ShardState, buffer_size: int
) -> tuple[list[list[int]], list[Leftover], int]:
    """What an old shard left of its epoch: ``(row ranges nobody read, leftovers, unread)``;
    ``buffer_size`` is the old run's shuffle block size.

    The leftovers are, in order: its packer carry, the leftovers it had itself inherited and not
    yet handed out, and its current shuffle block from ``block_index`` on (``unread`` chunks,
    plus the rest of the document the block ended in). The row ranges start after that
    document. ``stream`` must be set to the state's epoch. Reads nothing, unless the state
    predates ``block_end`` (then it re-reads the block to find where it ended).
    """
    if state["done"]:
        return [], [], 0
    ranges = [list(r) for r in state["ranges"]]
    leftovers: list[Leftover] = []
    if state["carry_tokens"] or state["pending"]:
        leftovers.append(
            Leftover(
                shard=state["shard"],
                ranges=[],
                block_no=-1,
                block_start=[0, 0, 0],
                block_index=0,
                buffer_size=buffer_size,
                carry_doc=state["carry_doc"],
                carry_tokens=list(state["carry_tokens"]),
                pending=[_copy_sample(p) for p in state["pending"]],
            )
        )
    leftovers.extend(_copy_leftover(lo) for lo in state.get("leftovers", []))
    if state["block_no"] < 0:
        return ranges, leftovers, 0
    if "block_end" in state:
        block_len, block_end = state["block_len"], list(state["block_end"])
    else:
        block, block_end = stream.reread_block(
            state["shard"], ranges, state["block_no"], state["block_start"], False, buffer_size
        )
        block_len = len(block)
    unread = max(0, block_len - state["block_index"])
    if unread or block_end[2] > 0:
        leftovers.append(
            Leftover(
                shard=state["shard"],
                ranges=ranges,
                block_no=state["block_no"],
                block_start=list(state["block_start"]),
                block_index=state["block_index"],
                buffer_size=buffer_size,
                carry_doc=-1,
                carry_tokens=[],
                pending=[],
            )
        )
    segments = stream._segments(ranges)
    seg, row, chunk = block_end
    read = sum(s.stop - s.start for s in segments[:seg]) + row + int(chunk > 0)
    return ranges_after(ranges, read), leftovers, unread


def _is_valid(tokens: Any) -> bool:
    """A pre-tokenized row with tokens (null and empty rows are skipped)."""
    return tokens is not None and len(tokens) > 0


def row_locator(src: SourceFile, first_row: int, rows: list[int]) -> Callable[[int], str]:
    """Names value ``j`` of a formatted batch in error messages: its file and row (record, for json)."""
    unit = "record" if src.kind in ("json", "jsonl") else "row"
    return lambda j: f"{src.path} {unit} {first_row + rows[j]}"


def _whole_sample(doc: int, sample: Sample, max_seq_len: int, counters: dict[str, Any]) -> Chunk | None:
    """An SFT sample as one chunk: its head when longer than ``max_seq_len`` (counted), None (counted)
    when no target token is left. The first token is never a target (nothing precedes it)."""
    ids = np.asarray(sample.ids, dtype=np.int32)
    mask = sample.mask
    assert mask is not None and len(mask) == len(ids)
    truncated = len(ids) > max_seq_len
    if truncated:
        ids, mask = ids[:max_seq_len], mask[:max_seq_len]
    if not mask[1:].any():
        counters["no_target_docs"] += 1
        return None
    counters["truncated_docs"] += truncated
    return (doc, ids, mask)


def carry_chunk(doc: int, tokens: list[int]) -> Chunk:
    """A saved document carry (plain ints in the state) as a chunk again (every token a target)."""
    return (doc, np.asarray(tokens, dtype=np.int32), None)
