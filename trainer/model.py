"""Model setup: architecture or pretrained weights, attention backend, gradient checkpointing, LoRA.

Each feature is a function with one capability check and an explicit fallback:
:func:`select_attention`, :func:`apply_gradient_checkpointing`, :func:`apply_lora`,
:func:`apply_compile`, :func:`zero3_init` (precision: ``trainer.ds_config.resolve_precision``).

- pretrain: the architecture with random weights, built whole on each rank (seeded, so every
  ZeRO stage starts from the same weights);
- cpt / sft: ``model.name_or_path`` (a local dir or a hub id). Under ZeRO-3 the weights are
  partitioned over the ranks as they load (transformers' ``HfDeepSpeedConfig`` makes
  ``from_pretrained`` build the model inside ``deepspeed.zero.Init``), so a 7B model never sits
  whole on one GPU.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from trainer.config import JobConfig, LoraConfig, ModelConfig
from trainer.ds_config import Precision
from trainer.errors import ConfigError
from trainer.feed import keeps_documents_apart
from trainer.loss import causal_lm_of, enable_chunked_loss

log = logging.getLogger("dstrain")

PRESETS_DIR = Path(__file__).parent / "presets"
VOCAB_MULTIPLE = 64


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def warn_remote_code(cfg: ModelConfig) -> None:
    if cfg.trust_remote_code:
        log.warning(
            "model.trust_remote_code: true runs the Python files that come with %s with this job's rights; "
            "only for sources you trust",
            cfg.name_or_path or cfg.config,
        )


def load_error(exc: Exception, what: str) -> ConfigError:
    """One line from a transformers loading error; custom code gets the flag that allows it."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "custom code" in first or "trust_remote_code" in first:
        where = what.split(" could not")[0].split(" is neither")[0]
        return ConfigError(
            f"{where} ships its own Python code (a custom architecture or tokenizer); set "
            "--model.trust_remote_code true if you trust that source"
        )
    return ConfigError(f"{what}: {first}")


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
        return AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        flag = "--model.config" if cfg.config else "--model.name_or_path"
        raise load_error(
            exc,
            f"{flag} {source!r} is neither a preset ({', '.join(preset_names())}) nor a dir/hub id with a config.json",
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


def select_attention(requested: str, on_gpu: bool, precision: Precision, packed: bool = False) -> str:
    """flash_attention_2 when flash-attn imports, CUDA is present and the dtype is 16-bit; else sdpa.

    ``packed`` (``data.pack``): the kernel must keep the packed documents apart, which dstrain
    arranges for every kernel it feeds (``trainer.feed``); anything else is refused here, at start,
    rather than training with attention across documents.
    """
    flash_ok = on_gpu and precision in ("bf16", "fp16") and importlib.util.find_spec("flash_attn") is not None
    if requested == "auto":
        return "flash_attention_2" if flash_ok else "sdpa"
    if requested == "flash_attention_2" and not flash_ok:
        raise ConfigError(
            "--model.attn_implementation flash_attention_2 needs CUDA, bf16/fp16 and the flash-attn "
            "package (pip install 'dstrain[flash]'); use auto to fall back to sdpa"
        )
    if packed and not keeps_documents_apart(requested):
        raise ConfigError(
            f"--model.attn_implementation {requested} cannot keep packed documents apart; use sdpa, eager, "
            "flex_attention or flash_attention_2, or --data.pack false"
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


@contextlib.contextmanager
def zero3_init(ds_config: dict[str, Any] | None) -> Iterator[None]:
    """While active, ``from_pretrained`` partitions the weights as they load under ZeRO-3.

    transformers checks a weakly referenced ``HfDeepSpeedConfig``; it is dropped on exit, so later
    calls (export, generation) see plain modules. A no-op for other stages.
    """
    stage = (ds_config or {}).get("zero_optimization", {}).get("stage", 0)
    if stage != 3:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    keep_alive = HfDeepSpeedConfig(ds_config)
    try:
        yield
    finally:
        del keep_alive
        unset_hf_deepspeed_config()


def load_pretrained(cfg: ModelConfig, attn: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Weights from a local dir or a hub id, in fp32 (the trained weights are the master weights;
    autocast runs the matmuls in 16-bit) unless ``dtype`` says otherwise (a frozen LoRA base)."""
    try:
        return AutoModelForCausalLM.from_pretrained(
            cfg.name_or_path,
            attn_implementation=attn,
            dtype=dtype,
            trust_remote_code=cfg.trust_remote_code,
        )
    except (OSError, ValueError) as exc:
        raise load_error(
            exc, f"--model.name_or_path {cfg.name_or_path!r} could not be loaded as a causal LM"
        ) from None


def frozen_base_dtype(job: JobConfig, precision: Precision, ds_config: dict[str, Any] | None) -> torch.dtype:
    """The dtype the pretrained weights load in.

    A LoRA base is frozen: it needs no fp32 master copy, so in a bf16/fp16 run it loads in that
    dtype (2 bytes a weight instead of 4) and autocast's cast of it is free; peft keeps the adapters
    fp32. Under ZeRO-3, ``deepspeed.zero.Init`` casts every parameter to the config's dtype as it
    partitions (fp32, since bf16 runs as autocast over fp32), so the base stays fp32 there
    (partitioned over the ranks).
    """
    stage = (ds_config or {}).get("zero_optimization", {}).get("stage", 0)
    if job.lora.enabled and precision in ("bf16", "fp16") and stage != 3:
        return torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.float32


def build_from_architecture(job: JobConfig, tokenizer: Any, attn: str) -> torch.nn.Module:
    """pretrain: random weights (seeded by ``job.seed``), vocab_size = len(tokenizer) rounded up to
    a multiple of 64, special token ids taken from the tokenizer."""
    config = apply_overrides(load_architecture(job.model), job.model.overrides)
    config.vocab_size = round_up(len(tokenizer), VOCAB_MULTIPLE)
    for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
        # Taken from the tokenizer even when None: a preset's ids belong to another vocabulary.
        setattr(config, name, getattr(tokenizer, name, None))
    torch.manual_seed(job.seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)


def fit_vocab(model: torch.nn.Module, tokenizer: Any) -> None:
    """Grow the embeddings when the tokenizer has more tokens than the model (a tokenizer with
    added special tokens), to a multiple of 64; never shrink a pretrained vocabulary."""
    weight = model.get_input_embeddings().weight
    rows = weight.ds_shape[0] if hasattr(weight, "ds_shape") else weight.shape[0]  # ZeRO-3 partitioned
    if len(tokenizer) > rows:
        log.warning(
            "the tokenizer has %d tokens, the model %d: resizing the embeddings", len(tokenizer), rows
        )
        model.resize_token_embeddings(round_up(len(tokenizer), VOCAB_MULTIPLE))


def apply_lora(model: torch.nn.Module, cfg: LoraConfig) -> torch.nn.Module:
    """Wrap ``model`` in peft LoRA adapters; the base is frozen. Logs the trainable count."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    target = cfg.target_modules
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    if target != "all-linear":
        missing = [t for t in target if t not in names]
        if missing:
            raise ConfigError(
                f"--lora.target_modules: {type(model).__name__} has no module named {missing[0]!r} "
                f"(it has e.g. {', '.join(sorted(n for n in names if n.endswith('proj'))[:7])}; or use all-linear)"
            )
    peft_config = PeftLoraConfig(
        task_type="CAUSAL_LM",
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=target,
        modules_to_save=list(cfg.modules_to_save) or None,
    )
    model = get_peft_model(model, peft_config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    log.info(
        "LoRA r=%d alpha=%g on %s: %d trainable parameters (%.3f%% of %d)",
        cfg.r,
        cfg.alpha,
        target,
        trainable,
        100 * trainable / total,
        total,
    )
    return model


def compile_layer(layer: torch.nn.Module) -> None:
    """``torch.compile`` the body of one decoder layer, under transformers' checkpointing.

    transformers (5.x) checkpoints a layer by wrapping its class ``forward``; compiling the whole
    call (``layer.compile()``) would put that checkpoint inside the graph, where dynamo gives up on
    it (a graph break, and the layer runs eagerly). So the wrapped original forward is compiled and
    checkpointed from outside, as the wrapper does: the recompute in backward replays the compiled
    graph. Module hooks (DeepSpeed's) stay outside the compiled region; ``state_dict`` keys do not
    change (no ``_orig_mod`` wrapper).
    """
    body = getattr(type(layer).forward, "__wrapped__", type(layer).forward)
    compiled = torch.compile(functools.partial(body, layer))

    def forward(*args: Any, **kwargs: Any) -> Any:
        if getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled():
            return layer._gradient_checkpointing_func(functools.partial(compiled, **kwargs), *args)
        return compiled(*args, **kwargs)

    layer.forward = forward


def apply_compile(model: torch.nn.Module) -> torch.nn.Module:
    """Compile each decoder layer (``model.model.layers[i]``, also inside peft) with torch.compile.

    Per layer rather than the whole model (DeepSpeed's ``engine.compile()`` compiles the engine's
    whole module): the embedding, mask building, and the chunked loss stay eager, so their graph
    breaks cannot split the layers' graphs; all layers share one compiled graph (same code, same
    shapes), so compile time does not grow with depth; and it runs here, before
    ``deepspeed.initialize``, like the other model changes.
    """
    layers = getattr(causal_lm_of(model).get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise ConfigError(
            f"--model.compile: {type(causal_lm_of(model)).__name__} has no decoder layers at model.layers "
            "to compile; use --model.compile false"
        )
    for layer in layers:
        compile_layer(layer)
    log.info(
        "model.compile: torch.compile on each of the %d decoder layers (%s); the first steps include compile time",
        len(layers),
        type(layers[0]).__name__,
    )
    return model


def build_model(
    job: JobConfig,
    tokenizer: Any,
    precision: Precision,
    on_gpu: bool,
    ds_config: dict[str, Any] | None = None,
) -> torch.nn.Module:
    """The model to train, in fp32 (DeepSpeed casts to bf16/fp16 and keeps fp32 master weights):
    random weights for pretrain, ``model.name_or_path`` for cpt/sft (partitioned as it loads
    under ZeRO-3, see :func:`zero3_init`), then gradient checkpointing, LoRA and compilation when
    asked."""
    cfg = job.model
    attn = select_attention(cfg.attn_implementation, on_gpu, precision, packed=job.data.pack)
    warn_remote_code(cfg)
    if cfg.name_or_path:
        with zero3_init(ds_config):
            model = load_pretrained(cfg, attn, frozen_base_dtype(job, precision, ds_config))
        fit_vocab(model, tokenizer)
    else:
        model = build_from_architecture(job, tokenizer, attn)
    model.config.use_cache = False
    log.info(
        "model %s: %.2fM parameters, attention %s, precision %s",
        type(model).__name__,
        sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()) / 1e6,
        attn,
        precision,
    )
    if cfg.gradient_checkpointing:
        apply_gradient_checkpointing(model)
    if job.lora.enabled:
        model = apply_lora(model, job.lora)
    if cfg.compile and (ds_config or {}).get("zero_optimization", {}).get("stage", 0) == 3:
        # Measured on CPU: ZeRO-3 swaps each parameter between its empty partition and the
        # gathered tensor, so dynamo's shape guards fail and it recompiles until its limit.
        log.warning(
            "model.compile: skipped under ZeRO-3 (partitioned parameters change shape); use stage 0-2"
        )
    elif cfg.compile:
        apply_compile(model)
    if cfg.loss == "chunked":
        enable_chunked_loss(model)  # before deepspeed.initialize: ZeRO-3 hooks the modules then
    return model
