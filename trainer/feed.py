"""What the model is fed for one micro-batch: device tensors made from the CPU batch.

Everything that depends on the batch's *values* (which positions carry a loss, where each packed
document starts and ends) is computed here on the host, from the CPU tensors the data loader
produced, before anything is copied to the device. So the forward and the loss never read a value
back from the GPU (no ``nonzero()``, no ``.item()``), and the host can queue the next micro-batch
while the GPU runs this one.

Two layouts, chosen by the attention kernel:

- ``sdpa``, ``eager``, ``flex_attention``: ``[micro_batch, T]`` as the batch comes, with
  ``position_ids`` that restart at every document of a packed row (transformers'
  ``masking_utils`` turns them into a block-diagonal causal mask, or a document BlockMask for
  flex) and, for padded batches, the ``attention_mask``.
- flash-attention kernels (``flash_attention_2``/``3``, hub kernels): one flattened row of every
  real token of the micro-batch, ``[1, N]``, with ``position_ids`` and the cumulative document
  lengths ``cu_seq_lens_q/k`` and ``max_length_q/k``. transformers' flash path then calls the varlen
  kernel with exactly these boundaries, for any micro-batch size. (Without them it looks for
  packed documents only when the batch has *one* row - ``_is_packed_sequence`` - and runs plain
  causal attention across the documents of a ``[B, T]`` batch; and even then it reads the position
  ids back from the device in every layer.) Padding is dropped from the flattened row, so padded
  SFT batches are padding-free too.

Targets: the labels shifted one to the left *per row* (``shift_labels``; the last position of a
row, and so of every document that ends a row, takes no loss), laid out like the inputs, flattened,
plus the host-computed index of the positions that carry one (``None`` when every position does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from trainer.labels import IGNORE_INDEX

#: Kernels that keep packed documents apart through ``position_ids`` ([B, T] layout).
POSITION_ID_KERNELS = ("sdpa", "eager", "flex_attention")


def varlen_kernel(attn_implementation: str) -> bool:
    """Flash-attention kernels: fed one flattened row with cumulative sequence lengths."""
    return attn_implementation.startswith("flash_attention") or "/" in attn_implementation


def keeps_documents_apart(attn_implementation: str) -> bool:
    """Whether dstrain can feed this kernel packed rows without documents attending to each other."""
    return attn_implementation in POSITION_ID_KERNELS or varlen_kernel(attn_implementation)


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] labels -> [B, T] targets: position t holds label t + 1, the last column is ignored."""
    pad = labels.new_full((labels.size(0), 1), IGNORE_INDEX)
    return torch.cat([labels[:, 1:], pad], dim=1)


@dataclass
class Feed:
    """One micro-batch, ready for the model: ``model(**inputs)``, then the loss over ``targets``."""

    inputs: dict[str, Any]  # model keyword arguments (device tensors, host ints)
    targets: torch.Tensor  # [positions] shifted labels in the inputs' flattened order (device)
    target_index: torch.Tensor | None  # positions that carry a loss (device); None = all of them
    target_count: int  # how many positions carry a loss (host)

    def selected_targets(self) -> torch.Tensor:
        """The targets at ``target_index`` (all of them when it is None)."""
        return self.targets if self.target_index is None else self.targets.index_select(0, self.target_index)


def document_bounds(position_ids: torch.Tensor, row_starts: torch.Tensor) -> torch.Tensor:
    """Cumulative document lengths (int32, with 0 and N) of a flattened row: a document starts at
    the start of a batch row and wherever the position does not continue the previous one."""
    n = position_ids.numel()
    starts = torch.ones(n, dtype=torch.bool)
    if n > 1:
        starts[1:] = position_ids[1:] != position_ids[:-1] + 1
    starts[row_starts] = True
    return torch.cat([starts.nonzero().squeeze(1), torch.tensor([n])]).to(torch.int32)


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy without stalling the host: from pinned memory on CUDA (a copy from pageable memory
    waits for the stream to drain first)."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def build_feed(batch: dict[str, torch.Tensor], device: str | torch.device, attn_implementation: str) -> Feed:
    """The model inputs and targets of ``batch`` (CPU tensors) for ``attn_implementation``."""
    device = torch.device(device)
    batch = {k: v.cpu() for k, v in batch.items()}  # no-op for loader batches; host math below
    input_ids = batch["input_ids"]
    rows, width = input_ids.shape
    position_ids = batch.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(width).expand(rows, width)
    targets = shift_labels(batch["labels"])
    mask = batch.get("attention_mask")
    if varlen_kernel(attn_implementation):
        keep = torch.ones(rows, width, dtype=torch.bool) if mask is None else mask.bool()
        lengths = keep.sum(1)
        row_starts = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
        flat_positions = position_ids[keep]
        bounds = document_bounds(flat_positions, row_starts[lengths > 0])
        longest = int((bounds[1:] - bounds[:-1]).max())
        cu = _to_device(bounds, device)
        inputs: dict[str, Any] = {
            "input_ids": _to_device(input_ids[keep][None], device),
            "position_ids": _to_device(flat_positions[None], device),
            "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu,
            "max_length_q": longest,
            "max_length_k": longest,
        }
        flat_targets = targets[keep]
    else:
        inputs = {"input_ids": _to_device(input_ids, device), "position_ids": _to_device(position_ids, device)}
        if mask is not None:
            inputs["attention_mask"] = _to_device(mask, device)
        flat_targets = targets.reshape(-1)
    index = (flat_targets != IGNORE_INDEX).nonzero().squeeze(1)
    count = index.numel()
    return Feed(
        inputs=inputs,
        targets=_to_device(flat_targets, device),
        target_index=None if count == flat_targets.numel() else _to_device(index, device),
        target_count=count,
    )
