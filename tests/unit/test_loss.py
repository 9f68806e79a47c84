"""The chunked loss: the same value and gradients as the plain full-logits path, on tensors and on
a whole (tied, checkpointed, LoRA) model, and a peak memory measured to be several times lower."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import REPO, tiny_model
from trainer.feed import shift_labels
from trainer.loss import (
    ChunkedLinearCrossEntropy,
    ChunkedLMHead,
    chunk_rows_for,
    enable_chunked_loss,
    linear_cross_entropy_sum,
    summed_loss,
    uses_chunked_loss,
)
from trainer.model import apply_gradient_checkpointing


def plain_loss_sum(hidden, weight, labels, bias=None):
    """The path being replaced: full logits, the logits shifted and copied, upcast, summed CE."""
    logits = F.linear(hidden, weight, bias)
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)).float(),
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )


def masked_labels(batch: int, seq: int, vocab: int) -> torch.Tensor:
    labels = torch.randint(0, vocab, (batch, seq))
    labels[0, :7] = -100  # a masked prompt
    labels[1, -5:] = -100  # padding
    return labels


def test_shift_labels_moves_targets_left_and_ignores_the_last_column():
    labels = torch.tensor([[5, 6, 7, -100], [1, 2, 3, 4]])
    assert shift_labels(labels).tolist() == [[6, 7, -100, -100], [2, 3, 4, -100]]


@pytest.mark.parametrize("with_bias", [False, True])
def test_value_and_gradients_match_the_plain_path(with_bias):
    torch.manual_seed(0)
    batch, seq, hidden_size, vocab = 3, 50, 32, 1000
    hidden = torch.randn(batch, seq, hidden_size)
    weight = torch.randn(vocab, hidden_size) * 0.1
    bias = torch.randn(vocab) * 0.1 if with_bias else None
    labels = masked_labels(batch, seq, vocab)
    targets = int((labels[:, 1:] != -100).sum())
    results = []
    for chunked in (False, True):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight) + ((bias,) if with_bias else ())]
        b = leaves[2] if with_bias else None
        if chunked:  # 16 tokens per chunk: 9 chunks, the last one partial
            loss = linear_cross_entropy_sum(leaves[0], leaves[1], shift_labels(labels), b, 16 * 4 * vocab)
        else:
            loss = plain_loss_sum(leaves[0], leaves[1], labels, b)
        (loss / targets).backward()
        results.append((loss.item() / targets, [t.grad for t in leaves]))
    (plain, plain_grads), (chunked, chunked_grads) = results
    assert abs(plain - chunked) <= 1e-5 and plain > 1.0
    for name, a, b in zip(("hidden", "weight", "bias"), plain_grads, chunked_grads, strict=False):
        assert (a - b).abs().max().item() <= 1e-5, name
        assert a.abs().max().item() > 1e-3, f"{name}: a gradient that is all zeros proves nothing"


def test_chunked_function_passes_gradcheck_in_fp64():
    torch.manual_seed(1)
    hidden = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(11, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (7,))
    assert torch.autograd.gradcheck(
        lambda h, w, b: ChunkedLinearCrossEntropy.apply(h, w, b, targets, 3, torch.float64), (hidden, weight, bias)
    )


def test_no_targets_gives_zero_loss_and_zero_gradients():
    hidden = torch.randn(2, 6, 8, requires_grad=True)
    weight = torch.randn(20, 8, requires_grad=True)
    loss = linear_cross_entropy_sum(hidden, weight, torch.full((2, 6), -100))
    loss.backward()
    assert loss.item() == 0.0
    assert hidden.grad.abs().max() == 0 and weight.grad.abs().max() == 0


def test_chunk_rows_follow_the_byte_budget():
    assert chunk_rows_for(151_936, 128 * 2**20) == 220
    assert chunk_rows_for(10**9, 1) == 1


def batch_of(vocab: int) -> dict[str, torch.Tensor]:
    """Two packed rows (position_ids restart at a document boundary) with masked tokens."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (2, 40), generator=gen)
    labels = ids.clone()
    labels[:, 15] = -100  # no loss across the document boundary
    labels[0, :5] = -100
    positions = torch.cat([torch.arange(15), torch.arange(25)]).repeat(2, 1)
    return {"input_ids": ids, "position_ids": positions, "labels": labels}


def loss_and_grads(model, batch) -> tuple[float, dict[str, torch.Tensor]]:
    loss = summed_loss(model, batch, "cpu")
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads


def test_whole_model_with_tied_head_and_checkpointing_matches_plain():
    vocab = 256
    plain, chunked = tiny_model(seed=0, vocab_size=vocab), tiny_model(seed=0, vocab_size=vocab)
    apply_gradient_checkpointing(plain)
    apply_gradient_checkpointing(chunked)
    keys = list(chunked.state_dict())
    assert enable_chunked_loss(chunked, chunk_bytes=16 * 4 * vocab)
    assert enable_chunked_loss(chunked), "enabling twice is a no-op"
    assert uses_chunked_loss(chunked) and not uses_chunked_loss(plain)
    head = chunked.get_output_embeddings()
    assert isinstance(head, ChunkedLMHead) and head.weight is chunked.get_input_embeddings().weight
    assert list(chunked.state_dict()) == keys
    batch = batch_of(vocab)
    plain_loss, plain_grads = loss_and_grads(plain, batch)
    chunked_loss, chunked_grads = loss_and_grads(chunked, batch)
    targets = int((batch["labels"][:, 1:] != -100).sum())
    assert abs(plain_loss - chunked_loss) / targets <= 1e-6
    assert plain_grads.keys() == chunked_grads.keys()
    for name, grad in plain_grads.items():
        assert (grad - chunked_grads[name]).abs().max().item() / targets <= 1e-6, name
    with torch.no_grad():  # without labels the head is the plain linear layer (generation, eval)
        probe = batch["input_ids"][:, :8]
        assert torch.equal(plain(input_ids=probe).logits, chunked(input_ids=probe).logits)


def test_lora_model_matches_plain_and_lora_on_the_head_falls_back():
    from peft import LoraConfig, get_peft_model

    vocab = 256
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    plain = get_peft_model(tiny_model(seed=0, vocab_size=vocab), lora)
    torch.manual_seed(5)
    chunked = get_peft_model(tiny_model(seed=0, vocab_size=vocab), lora)
    chunked.load_state_dict(plain.state_dict())
    assert enable_chunked_loss(chunked, chunk_bytes=16 * 4 * vocab)
    batch = batch_of(vocab)
    plain_loss, plain_grads = loss_and_grads(plain, batch)
    chunked_loss, chunked_grads = loss_and_grads(chunked, batch)
    assert all("lora" in name for name in chunked_grads), "only the adapters train"
    assert abs(plain_loss - chunked_loss) <= 1e-4
    for name, grad in plain_grads.items():
        assert (grad - chunked_grads[name]).abs().max().item() <= 1e-5, name

    on_head = LoraConfig(r=4, target_modules=["q_proj", "lm_head"])
    model = get_peft_model(tiny_model(seed=0, vocab_size=vocab), on_head)
    assert not enable_chunked_loss(model)
    assert not uses_chunked_loss(model)
    assert summed_loss(model, batch, "cpu").item() > 0, "the plain path still works"


MEMORY_PROBE = r"""
import json, sys, torch, torch.nn.functional as F
from tests.unit.test_loss import plain_loss_sum
from trainer.feed import shift_labels
from trainer.loss import linear_cross_entropy_sum

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

def run(mode, hidden, weight, labels):
    if mode == "plain":
        loss = plain_loss_sum(hidden, weight, labels)
    else:
        loss = linear_cross_entropy_sum(hidden, weight, shift_labels(labels))
    loss.backward()
    return loss.item()

mode, vocab, tokens, width = sys.argv[1], *map(int, sys.argv[2:])
torch.manual_seed(0)
weight = (torch.randn(vocab, width) * 0.02).requires_grad_()
hidden = torch.randn(1, tokens, width, requires_grad=True)
labels = torch.randint(0, vocab, (1, tokens))
run(mode, hidden[:, :8], weight, labels[:, :8])  # load the kernels and allocate weight.grad
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
base = status("VmRSS:")
loss = run(mode, hidden, weight, labels)
print(json.dumps({"loss": loss, "peak_bytes": status("VmHWM:") - base}))
"""


def measure_peak(mode: str, vocab: int, tokens: int, width: int) -> dict:
    """Peak RSS growth of one forward + backward, in a fresh process.

    glibc would keep freed blocks below its (adaptive) mmap threshold in the heap, so the
    threshold is pinned low: every tensor gets its own mapping and RSS follows live memory.
    """
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="2", PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, mode, str(vocab), str(tokens), str(width)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_peak_memory_is_at_least_4x_lower_at_vocab_152k_and_2k_tokens():
    vocab, tokens, width = 151_936, 2048, 64
    plain = measure_peak("plain", vocab, tokens, width)
    chunked = measure_peak("chunked", vocab, tokens, width)
    assert abs(plain["loss"] - chunked["loss"]) / tokens <= 1e-5
    full_logits = tokens * vocab * 4
    assert plain["peak_bytes"] >= 2 * full_logits, plain  # the plain path holds several copies
    ratio = plain["peak_bytes"] / chunked["peak_bytes"]
    print(
        f"peak RSS growth: plain {plain['peak_bytes'] / 2**20:.0f} MiB, chunked "
        f"{chunked['peak_bytes'] / 2**20:.0f} MiB, ratio {ratio:.1f}x"
    )
    assert ratio >= 4, (plain, chunked)


def test_chunked_loss_under_bf16_autocast_follows_autocast_and_sums_the_head_gradient_in_fp32():
    """Under autocast (how bf16 trains) the chunked head runs its matmuls in bf16 like the plain
    path, keeps fp32 gradients for fp32 weights, and its summed weight gradient is closer to the
    exact one than autocast's single bf16-rounded product."""
    torch.manual_seed(0)
    tokens, hidden_size, vocab = 96, 32, 500
    hidden = torch.randn(tokens, hidden_size)
    weight = torch.randn(vocab, hidden_size) * 0.05
    targets = torch.randint(0, vocab, (tokens,))
    grads = {}
    for mode in ("plain", "chunked", "exact"):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        if mode == "exact":
            loss = F.cross_entropy(F.linear(h.double(), w.double()), targets, reduction="sum")
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                if mode == "plain":
                    loss = F.cross_entropy(F.linear(h, w).float(), targets, reduction="sum")
                else:
                    loss = linear_cross_entropy_sum(h, w, targets, chunk_bytes=16 * 4 * vocab)
        loss.backward()
        grads[mode] = (float(loss.detach()), h.grad, w.grad)
    (plain_loss, plain_h, plain_w), (loss, grad_h, grad_w) = grads["plain"], grads["chunked"]
    exact_loss, exact_h, exact_w = grads["exact"]
    assert grad_w.dtype == torch.float32 and grad_h.dtype == torch.float32
    assert abs(loss - plain_loss) <= 1e-3 * abs(plain_loss), "bf16 matmuls, like autocast's"
    assert abs(loss - exact_loss) > 1e-6 * abs(exact_loss), "the matmuls really ran in bf16"
    assert (grad_h - plain_h).abs().max() <= 2e-2 * plain_h.abs().max()
    chunked_err = (grad_w.double() - exact_w).abs().max()
    plain_err = (plain_w.double() - exact_w).abs().max()
    assert chunked_err < plain_err


def test_add_product_accumulates_16_bit_factors_in_fp32():
    from trainer.loss import add_product

    torch.manual_seed(0)
    a, b = torch.randn(40, 30).bfloat16(), torch.randn(30, 20).bfloat16()
    acc = torch.ones(40, 20)
    add_product(acc, a, b)
    assert acc.dtype == torch.float32
    exact = 1 + a.double() @ b.double()
    assert (acc.double() - exact).abs().max() <= 1e-2 * exact.abs().max()  # one bf16 rounding
    same = torch.ones(40, 20)
    add_product(same, a.float(), b.float())
    assert (same.double() - (1 + a.double() @ b.double())).abs().max() <= 1e-4
