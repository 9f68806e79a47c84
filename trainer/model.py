"""Model setup: tokenizer, architecture, attention backend, precision, gradient checkpointing.

Each feature is a function with one capability check and an explicit fallback:
:func:`select_attention`, :func:`apply_gradient_checkpointing` (precision: ``trainer.ds_config.resolve_precision``).
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from trainer.config import JobConfig, ModelConfig
from trainer.ds_config import Precision
from trainer.errors import ConfigError

log = logging.getLogger("dstrain")

PRESETS_DIR = Path(__file__).parent / "presets"
VOCAB_MULTIPLE = 64


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def load_architecture(cfg: ModelConfig) -> PretrainedConfig:
    """The architecture config: a built-in preset, a dir with config.json, or a hub id."""
    source = cfg.config or cfg.name_or_path
    if source is None:
        raise ConfigError("--model.config or --model.name_or_path must name an architecture")
    preset = PRESETS_DIR / f"{source}.json"
    if preset.is_file():
        data = json.loads(preset.read_text())
        return AutoConfig.for_model(data.pop("model_type"), **data)
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"--model.config {source!r} is neither a preset ({', '.join(preset_names())}) "
            f"nor a dir/hub id with a config.json: {first}"
        ) from None


def apply_overrides(config: PretrainedConfig, overrides: dict[str, Any]) -> PretrainedConfig:
    """A new config with ``overrides`` applied; a key the architecture lacks is an error.

    The config is rebuilt from a dict rather than mutated, so derived fields (Qwen2's
    per-layer ``layer_types``) are recomputed for a changed ``num_hidden_layers``.
    """
    for key in overrides:
        if not hasattr(config, key):
            raise ConfigError(
                f"--model.overrides.{key}: {type(config).__name__} has no field {key!r} "
                f"(e.g. hidden_size, num_hidden_layers, num_attention_heads, intermediate_size)"
            )
    data = {**config.to_dict(), **overrides}
    if "num_hidden_layers" in overrides and "layer_types" not in overrides:
        data.pop("layer_types", None)
        if "max_window_layers" in data:
            data["max_window_layers"] = min(data["max_window_layers"], data["num_hidden_layers"])
    heads, hidden, kv = (
        data.get("num_attention_heads"),
        data.get("hidden_size"),
        data.get("num_key_value_heads"),
    )
    if heads and hidden and hidden % heads:
        raise ConfigError(
            f"--model.overrides: hidden_size {hidden} is not divisible by num_attention_heads {heads}"
        )
    if heads and kv and heads % kv:
        raise ConfigError(
            f"--model.overrides: num_attention_heads {heads} is not divisible by num_key_value_heads {kv}"
        )
    return type(config).from_dict(data)


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def select_attention(requested: str, on_gpu: bool, precision: Precision) -> str:
    """flash_attention_2 when flash-attn imports, CUDA is present and the dtype is 16-bit; else sdpa."""
    flash_ok = on_gpu and precision in ("bf16", "fp16") and importlib.util.find_spec("flash_attn") is not None
    if requested == "auto":
        return "flash_attention_2" if flash_ok else "sdpa"
    if requested == "flash_attention_2" and not flash_ok:
        raise ConfigError(
            "--model.attn_implementation flash_attention_2 needs CUDA, bf16/fp16 and the flash-attn "
            "package (pip install 'dstrain[flash]'); use auto to fall back to sdpa"
        )
    return requested


def apply_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant checkpointing: works with frozen bases (LoRA) and needs no input grads."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


def build_model(job: JobConfig, tokenizer: Any, precision: Precision, on_gpu: bool) -> torch.nn.Module:
    """The model to train, in fp32 (DeepSpeed casts to bf16/fp16 and keeps fp32 master weights).

    pretrain: the architecture with random weights (seeded by ``job.seed``), vocab_size set to
    len(tokenizer) rounded up to a multiple of 64, special token ids taken from the tokenizer.
    """
    cfg = job.model
    attn = select_attention(cfg.attn_implementation, on_gpu, precision)
    if job.stage != "pretrain":
        raise ConfigError(f"stage {job.stage} is not available yet; use --stage pretrain")
    config = load_architecture(cfg)
    config = apply_overrides(config, cfg.overrides)
    config.vocab_size = round_up(len(tokenizer), VOCAB_MULTIPLE)
    for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
        # Taken from the tokenizer even when None: a preset's ids belong to another vocabulary.
        setattr(config, name, getattr(tokenizer, name, None))
    config.use_cache = False
    torch.manual_seed(job.seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)
    log.info(
        "model %s: %.2fM parameters, attention %s, precision %s",
        type(model).__name__,
        sum(p.numel() for p in model.parameters()) / 1e6,
        attn,
        precision,
    )
    if cfg.gradient_checkpointing:
        apply_gradient_checkpointing(model)
    return model
