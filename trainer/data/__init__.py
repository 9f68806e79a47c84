"""The data pipeline: source -> shard -> tokenize -> shuffle -> pack/pad -> batch.

Contract with the trainer (trainer/loop.py relies on exactly this):

``build_train_data(cfg: DataConfig, tokenizer, dist: DistInfo, seed: int, micro_batch_size: int)``
returns a :class:`TrainData`:

- iterating it yields the remaining micro-batches of the current epoch, then advances
  ``epoch`` so the next iteration is the next epoch (order from a seeded permutation per epoch);
- every rank yields the same number of micro-batches per epoch (no collective hang);
- ``state_dict()`` / ``load_state_dict()`` restore the exact position, at cost independent of
  how far into the epoch the run is;
- ``approx_batches_per_epoch()`` estimates micro-batches per rank per epoch (for LR schedules).

A micro-batch (:class:`Batch`) is a dict of CPU tensors, all ``[micro_batch_size, T]``:

- ``input_ids`` (long)
- ``labels`` (long, -100 where no loss is taken: padding; not shifted, the model shifts)
- ``position_ids`` (long, restart at 0 at every packed document)
- ``attention_mask`` (long, 1 = real token) only when not packing (padded batches)
- ``doc_ids`` (long, the traceable id of the document each token came from, -1 on padding)

``build_eval_batches(cfg, tokenizer, dist, micro_batch_size)`` returns a re-iterable of the
same Batch dicts over this rank's disjoint part of the fixed validation set (or None).
"""
