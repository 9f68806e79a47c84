from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import TINY_OVERRIDES, shared_path, tiny_model
from trainer.config import build_config
from trainer.ds_config import resolve_precision
from trainer.errors import ConfigError
from trainer.model import (
    PRESETS_DIR,
    apply_gradient_checkpointing,
    build_model,
    select_attention,
)
from trainer.tokenizer import load_tokenizer


@pytest.mark.shared_data
def test_qwen_preset_matches_the_real_config():
    real = json.loads(shared_path("qwen2.5-0.5b", "config.json").read_text())
    preset = json.loads((PRESETS_DIR / "qwen2.5-0.5b.json").read_text())
    for key, value in preset.items():
        assert real[key] == value, key
    assert set(real) - set(preset) <= {"transformers_version", "torch_dtype"}


def test_pretrain_model_takes_overrides_and_rounds_vocab(tiny_tokenizer_dir):
    tok = load_tokenizer(str(tiny_tokenizer_dir))
    job = build_config(base={"tokenizer": str(tiny_tokenizer_dir), "model": {"overrides": TINY_OVERRIDES}})
    model = build_model(job, tok, "fp32", on_gpu=False)
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    assert model.config.vocab_size % 64 == 0 and model.config.vocab_size >= len(tok)
    assert model.config.eos_token_id == tok.eos_token_id
    assert model.config._attn_implementation == "sdpa"
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing


def test_qwen_preset_has_the_published_parameter_counts():
    """Without ../shared: the preset builds Qwen2.5-0.5B as its model card describes it
    (0.49B parameters, 0.36B of them outside the tied embedding), counted on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    data = json.loads((PRESETS_DIR / "qwen2.5-0.5b.json").read_text())
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    assert round(total / 1e9, 2) == 0.49 and round((total - embedding) / 1e9, 2) == 0.36
    assert config.tie_word_embeddings and config.vocab_size == 151936


@pytest.mark.shared_data
def test_real_qwen_tokenizer_loads_from_a_local_dir():
    tok = load_tokenizer(str(shared_path("qwen2.5-0.5b")))
    assert tok.eos_token == "<|endoftext|>" and len(tok) == 151665


def test_unknown_architecture_field_is_an_error(tiny_tokenizer_dir):
    tok = load_tokenizer(str(tiny_tokenizer_dir))
    job = build_config(base={"tokenizer": "t", "model": {"overrides": {"hiden_size": 64}}})
    with pytest.raises(ConfigError, match=r"--model\.overrides\.hiden_size"):
        build_model(job, tok, "fp32", on_gpu=False)


def test_missing_tokenizer_is_a_one_line_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"--tokenizer .* could not be loaded") as info:
        load_tokenizer(str(tmp_path / "nope"))
    assert "\n" not in str(info.value)


def test_attention_and_precision_fall_back_on_cpu():
    assert select_attention("auto", on_gpu=False, precision="fp32") == "sdpa"
    assert select_attention("auto", on_gpu=True, precision="fp32") == "sdpa"
    with pytest.raises(ConfigError, match="flash_attention_2 needs CUDA"):
        select_attention("flash_attention_2", on_gpu=False, precision="bf16")
    assert resolve_precision("auto", on_gpu=False, bf16_supported=False) == "fp32"
    assert resolve_precision("auto", on_gpu=True, bf16_supported=True) == "bf16"
    assert resolve_precision("auto", on_gpu=True, bf16_supported=False) == "fp32"


def test_gradient_checkpointing_keeps_gradients_identical():

    ids = torch.arange(1, 33).view(2, 16)
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(seed=3).train()
        if checkpointing:
            apply_gradient_checkpointing(model)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_a_frozen_lora_base_loads_in_16_bit_under_bf16_and_the_adapters_stay_fp32(tmp_path, tiny_tokenizer_dir):
    """bf16 trains fp32 parameters under autocast; a frozen base needs no fp32 copy (2 bytes a
    weight, as dstrain estimate counts), except under ZeRO-3, whose zero.Init casts to fp32."""
    import torch

    from tests.helpers import save_chat_base
    from trainer.config import build_config
    from trainer.ds_config import build_ds_config
    from trainer.loss import summed_loss
    from trainer.model import build_model
    from trainer.tokenizer import load_tokenizer

    base = save_chat_base(tmp_path / "base", tiny_tokenizer_dir)
    job = build_config(
        base={
            "tokenizer": str(base),
            "model": {"name_or_path": str(base), "gradient_checkpointing": False},
            "lora": {"enabled": True, "r": 4, "target_modules": ["q_proj", "v_proj"]},
            "zero": {"stage": 2},
        }
    )
    tokenizer = load_tokenizer(str(base))
    model = build_model(job, tokenizer, "bf16", False, build_ds_config(job, "bf16", False))
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trained == {torch.float32}
    ids = torch.randint(3, 60, (2, 12))
    batch = {"input_ids": ids, "labels": ids, "position_ids": torch.arange(12).expand(2, 12)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        summed_loss(model, batch, "cpu").backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)
