"""Next-token cross-entropy that never materialises the full [tokens, vocab] fp32 logits.

The contract (shared with the plain path): the *sum* of next-token cross-entropy over the target
tokens (labels != -100), accumulated in fp32; the caller divides by the step's all-reduced target
count. Labels are shifted, never the logits: ``shift_labels`` moves each row's labels one to the
left and pads with -100, so position t of the hidden states is scored against token t + 1 and no
[tokens, vocab] tensor is sliced or copied.

Why: at vocab 152k the plain path (``lm_head`` over every position, ``logits[:, :-1]`` copied,
``.float()``, ``log_softmax`` saved for backward) peaks at about 12 bytes per token per vocab
entry: 30 GB for 8 x 2048 tokens, more than all of Qwen2.5-0.5B's activations.

How: :class:`ChunkedLMHead` replaces ``model.lm_head``, keeping the same ``weight`` Parameter (so
``state_dict`` keys and the tie to the input embedding stay as they are). Called with hidden
states alone it is the plain linear layer (generation, HF's own forward). Called with
``shifted_labels`` it returns the loss sum through :class:`ChunkedLinearCrossEntropy`, which
computes the logits of ``chunk_rows`` target tokens at a time, keeps only each token's
log-sum-exp, and recomputes each chunk's logits in backward. Peak extra memory is one chunk's
logits (a few x ``chunk_bytes``) plus, in backward, an fp32 accumulator for the head's weight
gradient: independent of the number of tokens. The price is one more [tokens x hidden x vocab]
matmul in backward (about 2 * vocab * hidden FLOPs per token).

DeepSpeed: the loss must come out of ``engine(...)`` (the engine registers its backward prologue,
which ZeRO needs, on the forward's outputs), so :func:`enable_chunked_loss` also gives the causal
LM a forward that takes ``shifted_labels`` and then runs the decoder and the head. Under ZeRO-3 the
head weight is a partitioned parameter, gathered only inside its module's forward; the chunked
matmuls run inside the head's forward, and DeepSpeed's pre-backward hook on the head's output
re-gathers the weight before the backward recomputes the chunks. Stages 0-3, gradient
checkpointing (the decoder layers only) and peft LoRA (whose ``LoraModel`` calls the base model)
all pass through unchanged.

On CUDA with ``liger_kernel`` installed the head uses Liger's fused linear cross-entropy instead
(Triton; it computes the gradients chunk by chunk in forward, so backward does no recompute).
Liger is not installable on the CPU machines the tests run on: that path is guarded and small.
"""

from __future__ import annotations

import importlib.util
import logging
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer.feed import Feed, build_feed
from trainer.labels import IGNORE_INDEX

log = logging.getLogger("dstrain")

# fp32 logits held per chunk: 128 MiB is 220 tokens at vocab 152k, a [220 x hidden] x [hidden x
# 152k] matmul that still keeps a GPU busy; peak extra memory is about 3 chunks.
DEFAULT_CHUNK_BYTES = 128 * 2**20
# Decoders whose forward is "decoder, then lm_head(hidden)" with nothing applied to the logits
# (no soft-capping or scaling), so running the two directly gives the same loss.
CHUNKED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# Arguments peft and HF callers pass that the loss-only forward does not use.
UNUSED_FORWARD_ARGS = ("labels", "return_dict", "output_attentions", "output_hidden_states", "inputs_embeds")


def chunk_rows_for(vocab_size: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Tokens per chunk so that one chunk's fp32 logits take about ``chunk_bytes``."""
    return max(1, chunk_bytes // (4 * vocab_size))


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """One chunk's logits in the compute dtype, upcast to (at least) fp32 for the softmax."""
    logits = F.linear(hidden, weight, bias)
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _cast(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return tensor if tensor is None or tensor.dtype == dtype else tensor.to(dtype)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden[i] @ weight.T + bias, targets[i]) without the full logits.

    The matmuls run in ``compute_dtype`` (the autocast dtype under mixed precision: the head's
    fp32 weight is cast once per forward and once per backward, as autocast would cast it per
    call); the softmax, the loss and the weight gradient's sum are fp32. forward keeps each
    token's log-sum-exp (4 bytes a token); backward recomputes each chunk's logits, turns them
    into softmax - one_hot in place, and accumulates the weight gradient in fp32 over the chunks,
    returned as is to an fp32 weight (no 16-bit rounding of the sum, unlike one big autocast
    matmul) while writing the hidden gradient's rows.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        chunk_rows: int,
        compute_dtype: torch.dtype,
    ) -> torch.Tensor:
        acc_dtype = torch.promote_types(compute_dtype, torch.float32)
        w, b = _cast(weight, compute_dtype), _cast(bias, compute_dtype)
        lse = torch.empty(hidden.size(0), dtype=acc_dtype, device=hidden.device)
        total = torch.zeros((), dtype=acc_dtype, device=hidden.device)
        for start in range(0, hidden.size(0), chunk_rows):
            stop = start + chunk_rows
            logits = _chunk_logits(_cast(hidden[start:stop], compute_dtype), w, b)
            chunk_lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, targets[start:stop, None]).squeeze(1)
            total += (chunk_lse - picked).sum()
            lse[start:stop] = chunk_lse
            del logits
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_rows = chunk_rows
        ctx.compute_dtype = compute_dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        cdt = ctx.compute_dtype
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        w, b = _cast(weight, cdt), _cast(bias, cdt)
        grad_hidden = torch.empty(hidden.shape, dtype=cdt, device=hidden.device) if need_hidden else None
        acc_dtype = lse.dtype
        grad_weight = (
            torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_weight else None
        )
        grad_bias = (
            torch.zeros(bias.shape, dtype=acc_dtype, device=bias.device)
            if bias is not None and need_bias
            else None
        )
        rows = torch.arange(ctx.chunk_rows, device=hidden.device)
        for start in range(0, hidden.size(0), ctx.chunk_rows):
            stop = min(start + ctx.chunk_rows, hidden.size(0))
            chunk = _cast(hidden[start:stop], cdt)
            probs = _chunk_logits(chunk, w, b).sub_(lse[start:stop, None]).exp_()
            probs[rows[: stop - start], targets[start:stop]] -= 1.0
            probs.mul_(grad_total)
            if grad_bias is not None:
                grad_bias += probs.sum(0)
            grad_logits = probs.to(cdt)
            del probs
            if grad_hidden is not None:
                torch.mm(grad_logits, w, out=grad_hidden[start:stop])
            if grad_weight is not None:
                add_product(grad_weight, grad_logits.t(), chunk)
            del grad_logits
        return (
            _cast(grad_hidden, hidden.dtype),
            _cast(grad_weight, weight.dtype),
            _cast(grad_bias, bias.dtype) if bias is not None else None,
            None,
            None,
            None,
        )


def add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b``, ``acc`` fp32 and ``a``, ``b`` maybe 16-bit.

    Same dtypes: one in-place GEMM. 16-bit factors on CUDA: one GEMM that accumulates into the
    fp32 ``acc`` (``out_dtype``, torch >= 2.8), so the [vocab x hidden] accumulator is read and
    written once per chunk and no 16-bit product is materialised; elsewhere (CPU, older torch)
    the 16-bit product is made and added in fp32.
    """
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
        return
    if acc.is_cuda:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, TypeError):  # no 16-bit x 16-bit -> fp32 GEMM in this build
            pass
    acc += a.mm(b)


def compute_dtype_for(tensor: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmuls run in: autocast's when it is on for the tensor's device."""
    device_type = tensor.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return tensor.dtype


def liger_available(device: torch.device) -> bool:
    """Liger's fused kernel runs on CUDA only, and only when the package is installed."""
    return device.type == "cuda" and importlib.util.find_spec("liger_kernel") is not None


def linear_cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    use_liger: bool | None = None,
    target_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum of CE(hidden @ weight.T + bias, targets) over the targets, fp32, chunked.

    ``hidden`` is [..., H] and ``targets`` the matching [...] shifted labels (-100 = no loss).
    ``target_index`` (the flat positions that carry a loss, computed on the host by
    :func:`trainer.feed.build_feed`) selects them without reading the labels back from the device;
    without it, positions are selected here (a host sync on a GPU). Only the target positions go
    through the head: prompt tokens masked in SFT cost no vocab matmul.
    ``use_liger`` None = Liger when :func:`liger_available`.
    """
    flat_hidden = hidden.reshape(-1, hidden.size(-1))
    flat_targets = targets.reshape(-1)
    if target_index is None and bool((flat_targets == IGNORE_INDEX).any()):
        target_index = (flat_targets != IGNORE_INDEX).nonzero().squeeze(1)
    if target_index is not None:
        flat_hidden = flat_hidden.index_select(0, target_index)
        flat_targets = flat_targets.index_select(0, target_index)
    compute_dtype = compute_dtype_for(hidden)
    if use_liger is None:
        use_liger = liger_available(hidden.device)
    if use_liger and flat_targets.numel():
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        out = LigerFusedLinearCrossEntropyLoss(reduction="sum")(
            _cast(weight, compute_dtype), _cast(flat_hidden, compute_dtype), flat_targets, _cast(bias, compute_dtype)
        )
        return (out[0] if isinstance(out, tuple) else out).float()
    rows = chunk_rows_for(weight.size(0), chunk_bytes)
    return ChunkedLinearCrossEntropy.apply(flat_hidden, weight, bias, flat_targets, rows, compute_dtype)


class ChunkedLMHead(nn.Linear):
    """A drop-in ``lm_head`` that shares the original's ``weight`` (and bias) Parameter.

    ``head(hidden)`` gives logits like the ``nn.Linear`` it replaces; ``head(hidden,
    shifted_labels)`` gives the fp32 loss sum without full logits (:func:`linear_cross_entropy_sum`).
    """

    def __init__(self, head: nn.Linear, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        # Built on the meta device, then handed the original Parameters: nothing is allocated.
        super().__init__(head.in_features, head.out_features, bias=head.bias is not None, device="meta")
        self.weight = head.weight
        self.bias = head.bias
        self.chunk_bytes = chunk_bytes

    def forward(
        self,
        hidden: torch.Tensor,
        shifted_labels: torch.Tensor | None = None,
        target_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if shifted_labels is None:
            return super().forward(hidden)
        return linear_cross_entropy_sum(
            hidden, self.weight, shifted_labels, self.bias, self.chunk_bytes, target_index=target_index
        )


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The HF causal LM inside a DeepSpeed engine (``.module``) and/or a peft model."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _forward_with_loss(
    self: nn.Module,
    *args: Any,
    shifted_labels: torch.Tensor | None = None,
    target_index: torch.Tensor | None = None,
    **kwargs: Any,
):
    """The causal LM's forward, plus a loss-only mode: with ``shifted_labels`` (flat, in the
    inputs' order) and optionally ``target_index``, run the decoder and return the chunked head's
    loss sum (a 0-dim fp32 tensor) instead of an output object."""
    if shifted_labels is None:
        return type(self).forward(self, *args, **kwargs)
    for key in UNUSED_FORWARD_ARGS:
        if kwargs.pop(key, None) is not None:
            raise ValueError(f"the loss-only forward takes no {key}")
    kwargs["use_cache"] = False
    hidden = self.get_decoder()(*args, **kwargs).last_hidden_state
    return self.get_output_embeddings()(hidden, shifted_labels, target_index)


def enable_chunked_loss(model: nn.Module, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> bool:
    """Give ``model`` (an HF causal LM, or a peft model around one) the chunked loss.

    Call it before ``deepspeed.initialize`` (ZeRO-3 hooks the modules that exist then). Returns
    False, with a log line, and changes nothing where the chunked path cannot apply: an
    architecture outside :data:`CHUNKED_MODEL_TYPES`, or an ``lm_head`` that is not a plain
    ``nn.Linear`` (e.g. LoRA on the head, or peft's ``modules_to_save`` wrapper).
    """
    causal = causal_lm_of(model)
    head = causal.get_output_embeddings()
    if isinstance(head, ChunkedLMHead):
        return True
    model_type = getattr(causal.config, "model_type", None)
    if model_type not in CHUNKED_MODEL_TYPES:
        log.info(
            "loss: plain full-logits path (chunked loss supports %s, not %s)", CHUNKED_MODEL_TYPES, model_type
        )
        return False
    if type(head) is not nn.Linear:
        log.info("loss: plain full-logits path (lm_head is a %s, not nn.Linear)", type(head).__name__)
        return False
    if hasattr(head, "ds_id"):  # ZeRO-3 hooks only the modules that existed at initialize
        raise RuntimeError("enable_chunked_loss must run before deepspeed.initialize")
    causal.set_output_embeddings(ChunkedLMHead(head, chunk_bytes))
    causal.forward = types.MethodType(_forward_with_loss, causal)
    log.info(
        "loss: chunked cross-entropy, %d tokens per chunk%s",
        chunk_rows_for(head.out_features, chunk_bytes),
        " (Liger fused kernel on CUDA)" if importlib.util.find_spec("liger_kernel") else "",
    )
    return True


def uses_chunked_loss(model: nn.Module) -> bool:
    return isinstance(causal_lm_of(model).get_output_embeddings(), ChunkedLMHead)


def attention_of(model: nn.Module) -> str:
    """The attention kernel the causal LM inside ``model`` runs."""
    return str(getattr(causal_lm_of(model).config, "_attn_implementation", None) or "eager")


def summed_loss(model: nn.Module, batch: dict[str, torch.Tensor], device: str | torch.device) -> torch.Tensor:
    """Sum of next-token cross-entropy over the batch's target tokens, fp32.

    ``model`` is what the caller trains through (the DeepSpeed engine, a peft model or the bare
    HF model); ``batch`` holds CPU tensors (``trainer.feed.build_feed`` lays them out for the
    model's attention kernel and finds the targets on the host). Chunked when
    :func:`enable_chunked_loss` applied, else the plain path, which still shifts the labels rather
    than copying the logits, and upcasts them to fp32.
    """
    feed = build_feed(batch, device, attention_of(model))
    return feed_loss(model, feed)


def feed_loss(model: nn.Module, feed: Feed) -> torch.Tensor:
    """The summed loss of one prepared micro-batch (see :func:`summed_loss`)."""
    if uses_chunked_loss(model):
        return model(**feed.inputs, shifted_labels=feed.targets, target_index=feed.target_index)
    logits = model(**feed.inputs, use_cache=False).logits
    return F.cross_entropy(
        logits.flatten(0, 1).float(), feed.targets, ignore_index=IGNORE_INDEX, reduction="sum"
    )
