"""The data pipeline: source -> shard -> format -> shuffle -> pack/pad -> batch.

Contract with the trainer (trainer/loop.py relies on exactly this):

``build_train_data(cfg: DataConfig, tokenizer, dist: DistInfo, seed: int, micro_batch_size: int)``
returns a :class:`TrainData`:

- iterating it yields this rank's remaining micro-batches of the current epoch and stops when
  the rank's shards are exhausted (``local_done``); breaking out of the loop and iterating
  again continues where it stopped. The epoch advances only on ``end_epoch()``, which the
  Trainer calls once *every* rank has run out (order from a seeded permutation per epoch);
- it does no collective: ranks may yield different numbers of micro-batches (shards hold equal
  rows, not equal tokens). Keeping ranks in step is the Trainer's job (one-token filler
  micro-batches on a rank that ran out); nothing is dropped. A micro-batch can have zero target
  tokens: normalise the loss by the all-reduced target count, not per batch;
- ``state_dict()`` / ``load_state_dict()`` restore the exact position, at cost independent of
  how far into the epoch the run is (:class:`TrainDataState`: version, rank, a fingerprint of
  files/world size/workers/batch shape/tokenizer, epoch, the StatefulDataLoader state whose
  per-worker part is a few integers plus the packer carry, ``shards``: the per-worker positions
  and row ranges, and ``reshard``: the plan of an epoch that was re-sharded). A mismatch raises
  DataError naming what changed; ``load_state_dict(state, strict=False)`` or
  ``start_epoch(epoch)`` reset the position to the start of an epoch instead;
- ``load_rank_states(states)`` is the checkpoint protocol (``trainer.state``): the exact
  position, re-dealt by ``load_resharded(all saved ranks' states)`` when only the world size,
  workers, micro-batch size or shuffle buffer changed (no token trained twice or dropped), or
  the saved epoch restarted when the data changed;
- ``count_batches(epochs)`` counts the micro-batches of every rank in every epoch exactly (for
  the LR schedule in epochs mode; :mod:`trainer.data.epoch_count`); unlike the rest it is a
  collective: every rank calls it.

A micro-batch (:class:`Batch`) is a dict of CPU tensors, all ``[micro_batch_size, T]``:

- ``input_ids`` (long)
- ``labels`` (long, ``IGNORE_INDEX`` where no loss is taken: padding, filler rows, SFT prompt
  tokens (the formatter's loss mask is 0 there), and when packing the first token of every
  document piece or sample after the first in a row; not shifted: the loss shifts them)
- ``position_ids`` (long, restart at 0 at every packed document piece)
- ``attention_mask`` (long, 1 = real token) only when not packing (padded batches); the
  filler rows that complete a shard's last batch have a 1 in column 0 only, so no attention
  row is fully masked
- ``doc_ids`` (long, the traceable id of the document each token came from, -1 on padding):
  the ``doc_id`` integer column/field when the file has one, else the global row index (row
  position in the concatenation of all files, in the resolved file order)

Packed batches carry no attention_mask: transformers detects packing from position_ids when
attention_mask is None, but only without a KV cache, so call the model with ``use_cache=False``.

``build_eval_batches(cfg, tokenizer, dist, micro_batch_size)`` returns a re-iterable of the
same Batch dicts over this rank's disjoint part of the fixed validation set (or None). Ranks
may get different numbers of eval batches; iterating does no collective.

Formatting (``data.format``, :mod:`trainer.data.formatting`): ``text`` documents (every token a
target), or SFT records (alpaca, sharegpt, messages, template) rendered with the tokenizer's chat
template, whose loss mask keeps only the assistant turns. Long SFT samples are truncated (or
dropped when no target is left), counted in ``TrainData.last_epoch`` (``truncated_docs``,
``no_target_docs``).

Sources: parquet files, globs, directories; ``.jsonl`` and ``.json`` (array of records, e.g.
``{"completion": ...}``) read by streaming (see :mod:`trainer.data.sources`); pre-tokenized
parquet (an ``input_ids`` list column, written by :func:`write_tokenized_shard`) skips
tokenization; ``datasets`` ``save_to_disk`` directories and ``hf:ID[:split]`` are read as
their Arrow files, with the same sharding and resume.
"""

from __future__ import annotations

import importlib
from typing import Any

# Lazy exports: ``trainer.data.config`` (imported by ``trainer.config``, hence by ``dstrain
# --help`` and every config error) must not pay for torch, torchdata and pyarrow.
_EXPORTS = {
    "Batch": "trainer.data.packing",
    "EvalBatches": "trainer.data.pipeline",
    "TrainData": "trainer.data.pipeline",
    "TrainDataState": "trainer.data.pipeline",
    "build_eval_batches": "trainer.data.pipeline",
    "build_train_data": "trainer.data.pipeline",
    "encode_texts": "trainer.data.tokenize",
    "write_tokenized_shard": "trainer.data.sources",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'trainer.data' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
