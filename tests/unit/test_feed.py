"""Packed micro-batches keep their documents apart under every attention kernel dstrain feeds.

The reference is each document piece run alone through the same model. flash-attn has no wheel for
a CPU machine, so for ``flash_attention_2`` transformers' own dispatch and branch logic run
(``_flash_attention_forward``: varlen kwargs, ``_is_packed_sequence``, plain causal) with two
exact reference kernels in place of the CUDA ones: causal attention over a whole row, and causal
attention within each ``cu_seqlens`` segment, which is what flash-attn computes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers.modeling_flash_attention_utils as fa_utils

from tests.helpers import tiny_model
from trainer.data.packing import Packer, collate
from trainer.feed import build_feed, document_bounds, keeps_documents_apart
from trainer.labels import IGNORE_INDEX
from trainer.loss import summed_loss

ROWS, SEQ = 4, 16


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale) -> torch.Tensor:
    """[T, H, D] attention with GQA, as flash-attn defines it."""
    q, k, v = (x.transpose(0, 1) for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=True)
    return out.transpose(0, 1)


def ref_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1)):
    return torch.stack([_attend(q[b], k[b], v[b], causal, softmax_scale) for b in range(q.size(0))])


VARLEN_CALLS: list[list[int]] = []


def ref_flash_attn_varlen_func(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
    causal=False, window_size=(-1, -1),
):  # fmt: skip
    VARLEN_CALLS.append(cu_seqlens_q.tolist())
    assert isinstance(max_seqlen_q, int), "max_length must come from the host, not a device tensor"
    bounds = cu_seqlens_q.tolist()
    return torch.cat(
        [
            _attend(q[a:b], k[a:b], v[a:b], causal, softmax_scale)
            for a, b in zip(bounds, bounds[1:], strict=False)
        ]
    )


@pytest.fixture
def reference_flash_kernels(monkeypatch):
    """transformers' flash path, with exact CPU kernels where flash-attn's CUDA ones would be."""
    monkeypatch.setattr(fa_utils, "_loaded_implementation", "flash_attention_2")
    monkeypatch.setattr(fa_utils, "_flash_fn", ref_flash_attn_func)
    monkeypatch.setattr(fa_utils, "_flash_varlen_fn", ref_flash_attn_varlen_func)
    monkeypatch.setattr(fa_utils, "_pad_fn", fa_utils._pad_input)
    monkeypatch.setattr(fa_utils, "_unpad_fn", fa_utils._unpad_input)
    monkeypatch.setattr(
        fa_utils,
        "_process_flash_kwargs_fn",
        fa_utils._lazy_define_process_function(ref_flash_attn_varlen_func),
    )
    VARLEN_CALLS.clear()


def packed_batch(seed: int = 0):
    """A packed micro-batch of 4 rows of 16: documents of 3-13 tokens, some split across rows."""
    rng = np.random.default_rng(seed)
    docs = [(i, rng.integers(1, 120, size=int(rng.integers(3, 14))).astype(np.int32), None) for i in range(9)]
    stream = iter(docs)
    packer = Packer(SEQ, pad_id=0)
    rows = [packer.next_row(lambda: next(stream, None)) for _ in range(ROWS)]
    return collate([r for r in rows if r is not None], ROWS, pad_id=0, pack=True, seq_len=SEQ)


def segments(batch) -> list[tuple[int, int, int]]:
    """(row, start, stop) of every document piece, from the positions restarting at 0."""
    out = []
    for r in range(batch["input_ids"].size(0)):
        pos = batch["position_ids"][r].tolist()
        starts = [t for t, p in enumerate(pos) if p == 0] + [len(pos)]
        out += [(r, a, b) for a, b in zip(starts, starts[1:], strict=False)]
    return out


@torch.no_grad()
def alone_logits(model, batch) -> torch.Tensor:
    """[4, 16, V] logits where each document piece was run alone (sdpa, no packing)."""
    attn = model.config._attn_implementation
    model.config._attn_implementation = "sdpa"
    out = torch.zeros(*batch["input_ids"].shape, model.config.vocab_size)
    for r, a, b in segments(batch):
        out[r, a:b] = model(input_ids=batch["input_ids"][r : r + 1, a:b]).logits[0]
    model.config._attn_implementation = attn
    return out


def test_packed_batch_really_has_split_and_several_documents_per_row():
    batch = packed_batch()
    per_row = [sum(1 for s in segments(batch) if s[0] == r) for r in range(ROWS)]
    assert min(per_row) >= 2, per_row


@pytest.mark.parametrize("attn", ["sdpa", "eager", "flex_attention"])
def test_position_id_kernels_match_each_document_alone(attn):
    model = tiny_model(seed=0).eval()
    batch = packed_batch()
    expected = alone_logits(model, batch)
    model.config._attn_implementation = attn
    feed = build_feed(batch, "cpu", attn)
    assert feed.inputs["input_ids"].shape == (ROWS, SEQ)
    with torch.no_grad():
        got = model(**feed.inputs).logits
    assert (got - expected).abs().max() <= 1e-5


def test_flash_attention_gets_document_boundaries_and_matches_each_document_alone(reference_flash_kernels):
    model = tiny_model(seed=0).eval()
    batch = packed_batch()
    expected = alone_logits(model, batch)
    model.config._attn_implementation = "flash_attention_2"

    # What transformers does with a [4, 16] batch and restarting positions (the inputs before
    # dstrain flattened them): its detection only looks at batches of one row, so it runs plain
    # causal attention over each row and documents see each other.
    assert not fa_utils._is_packed_sequence(batch["position_ids"], batch_size=ROWS)
    with torch.no_grad():
        leaked = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    assert (leaked - expected).abs().max() > 1e-2
    assert VARLEN_CALLS == []

    feed = build_feed(batch, "cpu", "flash_attention_2")
    starts = sorted(r * SEQ + a for r, a, _ in segments(batch))
    assert feed.inputs["cu_seq_lens_q"].tolist() == starts + [ROWS * SEQ]
    assert feed.inputs["input_ids"].shape == (1, ROWS * SEQ)
    with torch.no_grad():
        got = model(**feed.inputs).logits.reshape(ROWS, SEQ, -1)
    layers = model.config.num_hidden_layers
    assert VARLEN_CALLS == [feed.inputs["cu_seq_lens_q"].tolist()] * layers, "the varlen kernel, every layer"
    assert (got - expected).abs().max() <= 1e-5


def test_flash_loss_equals_the_sdpa_loss_with_gradients(reference_flash_kernels):
    """The flattened layout also reorders the targets: same loss and gradients as [B, T] sdpa."""
    batch = packed_batch(seed=1)
    results = []
    for attn in ("sdpa", "flash_attention_2"):
        model = tiny_model(seed=0)
        model.config._attn_implementation = attn
        loss = summed_loss(model, batch, "cpu")
        loss.backward()
        results.append((float(loss.detach()), model.model.embed_tokens.weight.grad.clone()))
    (loss_a, grad_a), (loss_b, grad_b) = results
    assert abs(loss_a - loss_b) <= 1e-5 * abs(loss_a)
    assert (grad_a - grad_b).abs().max() <= 1e-5 * grad_a.abs().max()


def test_padded_batches_go_padding_free_under_flash():
    """SFT without packing: the padding is dropped from the flattened row, each row a document."""
    ids = torch.tensor([[5, 6, 7, 0, 0], [8, 9, 0, 0, 0], [1, 2, 3, 4, 5]])
    mask = (ids != 0).long()
    mask[1, 0] = 1
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    batch = {
        "input_ids": ids,
        "labels": labels,
        "attention_mask": mask,
        "position_ids": torch.arange(5).expand(3, 5),
    }
    feed = build_feed(batch, "cpu", "flash_attention_2")
    assert feed.inputs["input_ids"].tolist() == [[5, 6, 7, 8, 9, 1, 2, 3, 4, 5]]
    assert feed.inputs["cu_seq_lens_q"].tolist() == [0, 3, 5, 10]
    assert feed.inputs["max_length_q"] == 5
    # Each row's last token predicts nothing (the shift is per row, before flattening).
    assert feed.selected_targets().tolist() == [6, 7, 9, 2, 3, 4, 5]
    assert "attention_mask" not in feed.inputs


def test_document_bounds_from_positions_and_row_starts():
    pos = torch.tensor([0, 1, 2, 0, 1, 5, 6, 0])
    assert document_bounds(pos, torch.tensor([0])).tolist() == [0, 3, 5, 7, 8]
    assert document_bounds(torch.arange(6), torch.tensor([0, 3])).tolist() == [0, 3, 6]


def test_targets_are_found_on_the_host():
    """The index of the loss positions is built from the CPU labels (no device read-back)."""
    batch = packed_batch()
    feed = build_feed(batch, "cpu", "sdpa")
    expected = torch.cat([batch["labels"][:, 1:], torch.full((ROWS, 1), IGNORE_INDEX)], 1) != IGNORE_INDEX
    assert feed.target_count == int(expected.sum())
    assert (
        feed.target_index is not None
        and feed.target_index.tolist() == expected.reshape(-1).nonzero().squeeze(1).tolist()
    )


def test_kernels_that_cannot_keep_documents_apart_are_known():
    assert keeps_documents_apart("sdpa") and keeps_documents_apart("flash_attention_2")
    assert keeps_documents_apart("kernels-community/flash-attn2")
    assert not keeps_documents_apart("paged_attention")


def test_select_attention_refuses_a_kernel_that_would_mix_packed_documents():
    from trainer.errors import ConfigError
    from trainer.model import select_attention

    assert select_attention("sdpa", on_gpu=False, precision="fp32", packed=True) == "sdpa"
    with pytest.raises(ConfigError, match="cannot keep packed documents apart"):
        select_attention("paged_attention", on_gpu=False, precision="fp32", packed=True)
