"""Pack or pad: token chunks -> fixed rows -> micro-batches.

A chunk is ``(doc_id, ids, loss_mask)``: ``loss_mask`` (uint8, 1 = target) comes from formatting
(:mod:`trainer.data.formatting`) and travels with the ids through the shuffle buffer, the packer
and its saved carry; ``None`` means every token is a target (pretraining pays for no mask array).
``labels`` are the ids where the mask is 1 and ``IGNORE_INDEX`` elsewhere.

Policy (``data.pack: true``), documents (format text):

- every document is tokenized without special tokens and gets EOS appended; documents longer
  than ``max_seq_len`` were already cut into ``max_seq_len`` chunks before the shuffle buffer;
- chunks are laid end to end into rows of exactly ``max_seq_len`` tokens. A chunk that does
  not fit is split: its tail is the *carry* that starts the next row. No token is dropped;
  the last row of a shard's epoch is padded instead;
- ``position_ids`` restart at 0 at every piece of a document in a row, the carried tail
  included (simplest correct choice: the tail cannot attend to its head in the previous row,
  so continuing its positions would only pretend it could);
- ``labels`` are the input ids (where the mask is 1), except ``IGNORE_INDEX`` on the first token
  of every piece after the first in a row (predicting it would cross a document boundary) and
  on padding. Labels are not shifted; the model shifts them;
- no ``attention_mask``: with ``attention_mask=None`` transformers' ``masking_utils``
  (``find_packed_sequence_indices``) turns restarting ``position_ids`` into a block-diagonal
  causal mask for sdpa/eager, and flash-attention-2 uses them as varlen boundaries. Pass
  ``use_cache=False`` in training: with a KV cache the detection is skipped.

SFT samples (``Packer(window=SFT_PACK_WINDOW)``) are never split (a sample attends only to
itself and is trained whole); each has ``position_ids`` from 0. Samples were truncated to
``max_seq_len`` before, so every sample fits an empty row. A sample that does not fit the rest of
a row is set aside and the row is topped up with later samples that do fit, looking ahead at
most ``SFT_PACK_WINDOW`` samples; the set-aside samples start the next rows, oldest first, and
are saved with their masks in the packer's state (``pending``). Measured on the shared alpaca-zh
rows with the Qwen2.5 chat template (mean 145 tokens) at ``max_seq_len`` 512: slot efficiency
(real tokens / row slots) 0.82 when every sample that does not fit closes its row, 0.96 with a
window of 16 (``scripts/bench_sft.py``; figures in docs/benchmarks.md).

Policy (``data.pack: false``): every chunk (<= ``max_seq_len`` tokens, no EOS added to documents)
is one row; a batch is right-padded to its longest row, with ``attention_mask`` 0 and labels
``IGNORE_INDEX`` on padding.

Filler rows (labels all ``IGNORE_INDEX``, ``doc_ids`` -1) complete a shard's last batch and make up the
empty batches a rank yields while others still have data; in padded batches their
``attention_mask`` is 1 on the first position only, so no attention row is empty (an all-masked
row gives NaN in sdpa).

Measured cost (this 2-core CPU VM, shared; numpy): packing + collation of T=2048, B=8 takes
0.5-0.6 ms per micro-batch (~35 ns/token), padding mode ~0.25 ms. For scale, the whole
single-process stream (read + Qwen2.5 tokenizer + shuffle + pack) of the zh-wiki sample ran
at ~390k tokens/s (~41 ms per 16k-token micro-batch), so packing is ~1.5% of the data cost.
Padding overhead: packing wastes only the last row of each shard's epoch; padding mode wastes
``1 - mean(len)/max(len)`` per batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypedDict

import numpy as np
import torch

from trainer.labels import IGNORE_INDEX

#: (doc id, token ids int32, loss mask uint8 or None = every token a target)
Chunk = tuple[int, np.ndarray, np.ndarray | None]
#: SFT samples the packer may set aside while topping a row up with later ones (see above).
SFT_PACK_WINDOW = 16


class Batch(TypedDict, total=False):
    """A micro-batch: CPU tensors ``[micro_batch_size, T]`` (see ``trainer.data``)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    doc_ids: torch.Tensor


class Row(TypedDict):
    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray
    doc_ids: np.ndarray


def chunk_document(doc_id: int, tokens: np.ndarray, max_seq_len: int) -> list[Chunk]:
    """Cut a document (every token a target) into pieces of at most ``max_seq_len`` tokens."""
    if len(tokens) <= max_seq_len:
        return [(doc_id, tokens, None)]
    return [(doc_id, tokens[i : i + max_seq_len], None) for i in range(0, len(tokens), max_seq_len)]


def targets(tokens: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Labels of a chunk: its ids where the mask is 1, IGNORE_INDEX elsewhere."""
    if mask is None:
        return tokens
    return np.where(mask.astype(bool), tokens, IGNORE_INDEX)


class Packer:
    """Fills rows of exactly ``seq_len`` tokens from chunks.

    ``window`` None (documents): a chunk that does not fit is cut, its tail is ``carry`` and starts
    the next row. An int (SFT samples, never cut): a sample that does not fit is set aside in
    ``pending`` and the row is topped up with later samples that fit, until ``window`` samples are
    set aside (one more closes the row); each row starts with the pending samples, oldest first.
    ``window=0`` is "start a new row when a sample does not fit".
    """

    def __init__(self, seq_len: int, pad_id: int, window: int | None = None) -> None:
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.window = window
        self.carry: Chunk | None = None
        self.pending: list[Chunk] = []

    def next_row(self, pull: Callable[[], Chunk | None]) -> Row | None:
        """The next row, pulling chunks as needed; a partial last row is padded; None at the end."""
        T = self.seq_len
        row = Row(
            input_ids=np.full(T, self.pad_id, dtype=np.int64),
            labels=np.full(T, IGNORE_INDEX, dtype=np.int64),
            position_ids=np.zeros(T, dtype=np.int64),
            doc_ids=np.full(T, -1, dtype=np.int64),
        )
        fill = self._fill_documents(row, pull) if self.window is None else self._fill_samples(row, pull)
        if fill == 0:
            return None
        if fill < T:
            row["position_ids"][fill:] = np.arange(T - fill)  # padding is its own segment
        return row

    def _fill_documents(self, row: Row, pull: Callable[[], Chunk | None]) -> int:
        T, fill = self.seq_len, 0
        while fill < T:
            if self.carry is not None:
                chunk, self.carry = self.carry, None
            else:
                chunk = pull()
                if chunk is None:
                    break
            doc, tokens, mask = chunk
            n = min(len(tokens), T - fill)
            _place(row, fill, doc, tokens[:n], None if mask is None else mask[:n])
            fill += n
            if n < len(tokens):
                self.carry = (doc, tokens[n:], None if mask is None else mask[n:])
        return fill

    def _fill_samples(self, row: Row, pull: Callable[[], Chunk | None]) -> int:
        assert self.window is not None
        T, fill = self.seq_len, 0
        waiting, self.pending = self.pending, []
        for chunk in waiting:  # set-aside samples first, oldest first, wherever they fit
            if fill + len(chunk[1]) <= T:
                _place(row, fill, *chunk)
                fill += len(chunk[1])
            else:
                self.pending.append(chunk)
        while fill < T and len(self.pending) <= self.window:
            chunk = pull()
            if chunk is None:
                break
            if fill + len(chunk[1]) <= T:
                _place(row, fill, *chunk)
                fill += len(chunk[1])
            else:
                self.pending.append(chunk)
        return fill


def _place(row: Row, fill: int, doc: int, tokens: np.ndarray, mask: np.ndarray | None) -> None:
    """Write a piece at ``fill``: positions from 0, labels from its mask, none on its first token
    when something precedes it in the row (that would be a prediction across a boundary)."""
    n = len(tokens)
    row["input_ids"][fill : fill + n] = tokens
    row["labels"][fill : fill + n] = targets(tokens, mask)
    if fill > 0:
        row["labels"][fill] = IGNORE_INDEX
    row["position_ids"][fill : fill + n] = np.arange(n)
    row["doc_ids"][fill : fill + n] = doc


def chunk_row(chunk: Chunk) -> Row:
    """One unpacked row: a chunk as is (labels = ids where the mask is 1, positions from 0)."""
    doc, tokens, mask = chunk
    ids = tokens.astype(np.int64)
    return Row(
        input_ids=ids,
        labels=targets(ids, mask).copy(),
        position_ids=np.arange(len(ids), dtype=np.int64),
        doc_ids=np.full(len(ids), doc, dtype=np.int64),
    )


def collate(rows: list[Row], micro_batch_size: int, pad_id: int, pack: bool, seq_len: int) -> Batch:
    """Stack rows into a batch, adding filler rows up to ``micro_batch_size`` (and padding if not packing)."""
    width = seq_len if pack else max([len(r["input_ids"]) for r in rows] + [1])
    shape = (micro_batch_size, width)
    input_ids = np.full(shape, pad_id, dtype=np.int64)
    labels = np.full(shape, IGNORE_INDEX, dtype=np.int64)
    position_ids = np.broadcast_to(np.arange(width, dtype=np.int64), shape).copy()
    doc_ids = np.full(shape, -1, dtype=np.int64)
    attention_mask = np.zeros(shape, dtype=np.int64)
    attention_mask[:, 0] = 1  # filler rows: one visible key, so no attention row is empty
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = row["input_ids"]
        labels[i, :n] = row["labels"]
        position_ids[i, :n] = row["position_ids"]
        doc_ids[i, :n] = row["doc_ids"]
        attention_mask[i, :n] = 1
    batch = Batch(
        input_ids=torch.from_numpy(input_ids),
        labels=torch.from_numpy(labels),
        position_ids=torch.from_numpy(position_ids),
        doc_ids=torch.from_numpy(doc_ids),
    )
    if not pack:
        batch["attention_mask"] = torch.from_numpy(attention_mask)
    return batch


def filler_batch(attention_mask: bool) -> Batch:
    """A one-token batch that carries no loss (label ``IGNORE_INDEX``, doc id -1).

    What a rank runs when it has no data for a micro-batch slot that other ranks fill (the
    Trainer pads every rank's step to the same number of forwards, which ZeRO-3's parameter
    gathers and every stage's gradient reduction need). One token keeps its cost negligible;
    ``attention_mask`` matches the data's batches (padded mode), so the model sees one kind of input.
    """
    zeros = torch.zeros((1, 1), dtype=torch.long)
    batch = Batch(
        input_ids=zeros,
        labels=torch.full((1, 1), IGNORE_INDEX, dtype=torch.long),
        position_ids=zeros.clone(),
        doc_ids=torch.full((1, 1), -1, dtype=torch.long),
    )
    if attention_mask:
        batch["attention_mask"] = torch.ones((1, 1), dtype=torch.long)
    return batch
