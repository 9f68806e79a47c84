"""Model FLOPs per token and MFU, counted the way the PaLM paper does (Chowdhery et al. 2022, app. B).

    flops_per_token = 6 * N_matmul + 12 * L * H * Q * T

- ``N_matmul``: the parameters that take part in a matrix multiply per token: every decoder
  layer's q, k, v, o, gate, up and down weight matrices, plus the LM head (vocab x hidden; counted
  even when it is tied to the input embedding, because the head *is* a matmul). Excluded: the input
  embedding (a lookup, no FLOPs), biases and norm weights (element-wise, not matmuls). Forward is
  2 FLOPs per weight per token (multiply and add), backward 4 (input and weight gradients): 6.
- ``12 L H Q T``: attention scores and the weighted sum of values, ``L`` layers, ``H`` query heads
  of width ``Q``, ``T`` the sequence length. Forward is 2 matmuls of 2 * H * Q * T FLOPs per token,
  times 3 for forward + backward. As in PaLM, the whole T x T score matrix is counted (no halving
  for the causal mask) and T is the training sequence length even for packed rows whose documents
  attend only within themselves, so figures compare across codebases.
- Model FLOPs, not hardware FLOPs: recomputation (gradient checkpointing) does not count, so MFU
  does not improve by recomputing more.
- LoRA (a frozen base): a frozen weight takes no weight gradient, so it costs 2 (forward) + 2
  (input gradient) = 4 FLOPs per token, and each adapter weight the full 6:
  ``4 * N_matmul + 6 * N_adapter + 12 L H Q T`` (+ 2 per weight of a matmul in
  ``modules_to_save``, e.g. a trained ``lm_head``). :func:`lora_counts` counts the adapters.

MFU = flops_per_token * tokens/s / (world_size * peak). The peak is the device's *dense* bf16
tensor-core figure (never the 2x "with sparsity" one); unknown devices and CPUs have none, and MFU
is then ``None`` unless a peak is configured: no made-up number. Importing this module needs
neither torch nor transformers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from trainer.errors import ConfigError

# Dense bf16 tensor-core peak in TFLOP/s, from the vendors' data sheets, matched in order against
# torch.cuda.get_device_name(). The NVL variants of H100/H200 have lower clocks (and other
# figures): they stay unknown rather than borrow the SXM peak.
PEAK_TFLOPS_BF16: tuple[tuple[str, float], ...] = (
    (r"H100.*PCIe", 756.0),
    (r"H100(?!.*NVL)", 989.0),  # SXM5 ("NVIDIA H100 80GB HBM3")
    (r"H200(?!.*NVL)", 989.0),
    (r"A100", 312.0),  # SXM4 and PCIe alike
    (r"L40S", 362.0),
    (r"RTX 4090", 165.0),
)

# Llama-family decoders whose layer shapes param_counts knows.
KNOWN_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class ParamCounts:
    """Parameters of a Llama-family decoder by role (element counts)."""

    embedding: int
    lm_head: int
    layer_matmul: int
    layer_other: int
    final_norm: int
    num_layers: int
    tied: bool

    @property
    def matmul(self) -> int:
        """N_matmul: the layers' weight matrices plus the LM head (see the module docstring)."""
        return self.num_layers * self.layer_matmul + self.lm_head

    @property
    def total(self) -> int:
        """Every distinct parameter (a tied head shares the embedding's storage): the ZeRO Psi."""
        head = 0 if self.tied else self.lm_head
        return (
            self.embedding + head + self.num_layers * (self.layer_matmul + self.layer_other) + self.final_norm
        )


def _get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def head_dim(config: Any) -> int:
    """Width of one attention head: ``head_dim`` when the config sets it, else hidden / heads."""
    return int(_get(config, "head_dim") or _get(config, "hidden_size") // _get(config, "num_attention_heads"))


def param_counts(config: Any) -> ParamCounts:
    """Parameter counts of a Llama/Mistral/Qwen2/Qwen3 decoder from its HF config (object or dict).

    Attention: q and o are hidden x (heads * head_dim), k and v hidden x (kv_heads * head_dim);
    biases on q, k, v for Qwen2, on all four with ``attention_bias``. SwiGLU MLP: gate, up, down
    of hidden x intermediate (biases with ``mlp_bias``). Two RMSNorms per layer (+ Qwen3's per-head
    q/k norms) and a final norm.
    """
    model_type = _get(config, "model_type")
    if model_type not in KNOWN_MODEL_TYPES:
        raise ConfigError(
            f"model_type {model_type!r}: FLOPs and memory are counted for {', '.join(KNOWN_MODEL_TYPES)} "
            f"decoders only; add its layer shapes to trainer/flops.py:param_counts"
        )
    hidden = int(_get(config, "hidden_size"))
    heads, kv_heads = int(_get(config, "num_attention_heads")), int(_get(config, "num_key_value_heads") or 0)
    kv_heads = kv_heads or heads
    dim = head_dim(config)
    inter, vocab = int(_get(config, "intermediate_size")), int(_get(config, "vocab_size"))
    q_width, kv_width = heads * dim, kv_heads * dim
    attn = 2 * hidden * q_width + 2 * hidden * kv_width
    mlp = 3 * hidden * inter
    if model_type == "qwen2":
        biases = q_width + 2 * kv_width
    elif _get(config, "attention_bias", False):
        biases = q_width + 2 * kv_width + hidden  # o's bias has the hidden width
    else:
        biases = 0
    if _get(config, "mlp_bias", False):
        biases += 2 * inter + hidden
    norms = 2 * hidden + (2 * dim if model_type == "qwen3" else 0)
    return ParamCounts(
        embedding=vocab * hidden,
        lm_head=vocab * hidden,
        layer_matmul=attn + mlp,
        layer_other=biases + norms,
        final_norm=hidden,
        num_layers=int(_get(config, "num_hidden_layers")),
        tied=bool(_get(config, "tie_word_embeddings", False)),
    )


# The linear layers of a Llama-family decoder layer, (in, out) as functions of the config.
def _linear_shapes(config: Any) -> dict[str, tuple[int, int]]:
    hidden, inter = int(_get(config, "hidden_size")), int(_get(config, "intermediate_size"))
    heads = int(_get(config, "num_attention_heads"))
    kv_heads = int(_get(config, "num_key_value_heads") or 0) or heads
    dim = head_dim(config)
    return {
        "q_proj": (hidden, heads * dim),
        "k_proj": (hidden, kv_heads * dim),
        "v_proj": (hidden, kv_heads * dim),
        "o_proj": (heads * dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


@dataclass(frozen=True)
class LoraCounts:
    """What LoRA trains: adapter weights and full copies of ``modules_to_save`` (element counts)."""

    adapters: int
    saved_modules: int
    saved_matmul: int  # the part of saved_modules that is a matmul (a trained lm_head)

    @property
    def trainable(self) -> int:
        return self.adapters + self.saved_modules


def lora_counts(config: Any, r: int, target_modules: str | list[str], modules_to_save: list[str] = ()) -> LoraCounts:
    """peft's trainable parameters for LoRA rank ``r`` on ``target_modules`` of a Llama-family decoder.

    An adapted linear ``in -> out`` gains A (r x in) and B (out x r): r (in + out). ``all-linear``
    is every layer's projection (peft leaves the output head out); ``lm_head`` and
    ``embed_tokens`` may be named too. ``modules_to_save`` trains a full copy of each module named.
    """
    param_counts(config)  # the same architecture check
    shapes = _linear_shapes(config)
    hidden, vocab = int(_get(config, "hidden_size")), int(_get(config, "vocab_size"))
    layers = int(_get(config, "num_hidden_layers"))
    names = list(shapes) if target_modules == "all-linear" else list(target_modules)
    adapters = 0
    for name in names:
        short = name.rsplit(".", 1)[-1]
        if short in shapes:
            adapters += layers * r * sum(shapes[short])
        elif short in ("lm_head", "embed_tokens"):
            adapters += r * (vocab + hidden)
        else:
            raise ConfigError(
                f"--lora.target_modules: {name!r} is not a linear layer of a {_get(config, 'model_type')} "
                f"decoder ({', '.join(shapes)}, lm_head, embed_tokens, or all-linear)"
            )
    saved = saved_matmul = 0
    for name in modules_to_save:
        short = name.rsplit(".", 1)[-1]
        if short in ("lm_head", "embed_tokens"):
            saved += vocab * hidden
            saved_matmul += vocab * hidden if short == "lm_head" else 0
        elif short == "norm":
            saved += hidden
        else:
            raise ConfigError(
                f"--lora.modules_to_save: {name!r}: the planner counts lm_head, embed_tokens and norm"
            )
    return LoraCounts(adapters, saved, saved_matmul)


def lora_counts_for(config: Any, lora: Any) -> LoraCounts | None:
    """:func:`lora_counts` for a ``LoraConfig`` section; None when LoRA is off (or not given)."""
    if lora is None or not getattr(lora, "enabled", False):
        return None
    return lora_counts(config, lora.r, lora.target_modules, list(lora.modules_to_save))


def flops_per_token(config: Any, seq_len: int, lora: Any = None) -> float:
    """Training FLOPs per token (see the module docstring): 6 * N_matmul + 12 * L * H * Q * T, or,
    for a frozen base with LoRA (``lora``: the job's ``LoraConfig`` with ``enabled``),
    4 * N_matmul + 6 * N_adapter (+ 2 per trained matmul weight in modules_to_save) + 12 L H Q T."""
    counts = param_counts(config)
    attention = 12 * counts.num_layers * int(_get(config, "num_attention_heads")) * head_dim(config) * seq_len
    adapters = lora_counts_for(config, lora)
    if adapters is None:
        return float(6 * counts.matmul + attention)
    return float(4 * counts.matmul + 6 * adapters.adapters + 2 * adapters.saved_matmul + attention)


def peak_tflops_for(device_name: str) -> float | None:
    """The dense bf16 peak of a device named like ``torch.cuda.get_device_name()``; None if unknown."""
    for pattern, tflops in PEAK_TFLOPS_BF16:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return tflops
    return None


def device_peak_tflops(configured: float | None = None, device: int | None = None) -> float | None:
    """The peak to divide by: ``configured`` when set, else this CUDA device's from the table.

    None on CPU and on GPUs missing from the table, so MFU is reported as null, not guessed.
    """
    if configured is not None:
        if configured <= 0:
            raise ConfigError(f"a configured peak must be > 0 TFLOP/s, got {configured}")
        return float(configured)
    import torch

    if not torch.cuda.is_available():
        return None
    return peak_tflops_for(torch.cuda.get_device_name(device))


def mfu(
    tokens_per_s: float, flops_per_token: float, world_size: int, peak_tflops: float | None
) -> float | None:
    """Model FLOPs utilisation in [0, 1]: achieved model FLOP/s over ``world_size`` devices' peak.

    ``tokens_per_s`` is the global rate (non-pad tokens of all ranks). None without a peak.
    """
    if peak_tflops is None:
        return None
    return tokens_per_s * flops_per_token / (world_size * peak_tflops * 1e12)
