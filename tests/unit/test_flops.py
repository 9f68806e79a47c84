"""FLOPs per token counted by hand, parameter roles against a real model, the peak table, MFU."""

from __future__ import annotations

import pytest
import torch

from trainer.errors import ConfigError
from trainer.flops import device_peak_tflops, flops_per_token, mfu, param_counts, peak_tflops_for

SMALL = {
    "model_type": "qwen2",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 256,
    "tie_word_embeddings": True,
}


def test_flops_and_mfu_of_a_small_config_counted_by_hand():
    # Per layer: q 64x64 + k 64x32 + v 64x32 + o 64x64 = 12,288; gate/up/down 3 x 64x128 = 24,576.
    # Two layers: 73,728. LM head 256x64 = 16,384 (tied, still a matmul). N_matmul = 90,112.
    # 6 N = 540,672. Attention at T = 32: 12 x 2 layers x 4 heads x 16 wide x 32 = 49,152.
    assert param_counts(SMALL).matmul == 90_112
    assert flops_per_token(SMALL, seq_len=32) == 589_824
    # 2M tokens/s on 4 GPUs of 989 TFLOP/s: 589,824 x 2e6 / 3.956e15 = 2.98192e-4.
    assert mfu(2e6, 589_824, world_size=4, peak_tflops=989) == pytest.approx(2.98192e-4, rel=1e-5)
    assert mfu(2e6, 589_824, world_size=4, peak_tflops=None) is None


@pytest.mark.parametrize(
    "model_type, extra",
    [
        ("qwen2", {"tie_word_embeddings": True}),
        ("qwen2", {"tie_word_embeddings": False}),
        ("llama", {"attention_bias": True, "mlp_bias": True}),
        ("mistral", {}),
        ("qwen3", {"head_dim": 32}),
    ],
)
def test_param_roles_match_the_model_transformers_builds(model_type, extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = {k: v for k, v in SMALL.items() if k not in ("model_type", "tie_word_embeddings")}
    config = AutoConfig.for_model(model_type, **shape, **extra)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    counts = param_counts(config)
    assert counts.total == sum(p.numel() for p in model.parameters())
    linear = [m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert counts.matmul == sum(linear)


def test_qwen2_5_0_5b_published_sizes():
    """The model card's 0.49B parameters, 0.36B of them non-embedding."""
    import json

    from trainer.model import PRESETS_DIR

    counts = param_counts(json.loads((PRESETS_DIR / "qwen2.5-0.5b.json").read_text()))
    assert counts.total == 494_032_768
    assert round((counts.total - counts.embedding) / 1e9, 2) == 0.36


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", None),
        ("NVIDIA H200", 989.0),
        ("NVIDIA H200 NVL", None),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA GeForce RTX 4090", 165.0),
        ("Tesla V100-SXM2-32GB", None),
    ],
)
def test_peak_table_matches_device_names(name, peak):
    assert peak_tflops_for(name) == peak


def test_peak_is_none_on_cpu_unless_configured():
    if not torch.cuda.is_available():
        assert device_peak_tflops() is None
    assert device_peak_tflops(configured=400) == 400.0
    with pytest.raises(ConfigError, match="peak"):
        device_peak_tflops(configured=0)


def test_unknown_architecture_is_a_config_error():
    with pytest.raises(ConfigError, match="gpt2"):
        param_counts({**SMALL, "model_type": "gpt2"})


def _tiny_model(model_type: str = "qwen2", **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = {k: v for k, v in SMALL.items() if k not in ("model_type", "tie_word_embeddings")}
    config = AutoConfig.for_model(model_type, **{**shape, "num_hidden_layers": 4, **extra})
    torch.manual_seed(0)
    # eager: its attention matmuls are visible to the counter (CPU SDPA kernels are not)
    return config, AutoModelForCausalLM.from_config(config, attn_implementation="eager")


@pytest.mark.parametrize(
    "target, save",
    [(["q_proj", "v_proj"], []), ("all-linear", []), (["k_proj", "down_proj"], ["lm_head"])],
    ids=["qv", "all-linear", "kdown+head"],
)
def test_lora_trainable_count_matches_peft(target, save):
    from peft import LoraConfig, get_peft_model

    from trainer.flops import lora_counts

    config, model = _tiny_model(tie_word_embeddings=False)
    peft_model = get_peft_model(
        model, LoraConfig(task_type="CAUSAL_LM", r=8, target_modules=target, modules_to_save=save or None)
    )
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert lora_counts(config, 8, target, save).trainable == trainable


def _measured_flops(model, seq_len: int) -> int:
    """FLOPs torch actually runs for one forward + backward (matmuls and SDPA), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    ids = torch.randint(0, 256, (2, seq_len))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    return counter.get_total_flops() // (2 * seq_len)


def test_flops_per_token_is_what_torch_counts_for_full_and_lora_training():
    from types import SimpleNamespace

    from peft import LoraConfig, get_peft_model

    config, model = _tiny_model(tie_word_embeddings=False)
    measured_full = _measured_flops(model, 32)
    assert flops_per_token(config, 32) == pytest.approx(measured_full, rel=0.01)

    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8, target_modules=["q_proj", "v_proj"]))
    measured_lora = _measured_flops(peft_model, 32)
    lora = SimpleNamespace(enabled=True, r=8, target_modules=["q_proj", "v_proj"], modules_to_save=[])
    # Layer 0's k projection takes no input gradient (its input, the frozen embedding, needs none):
    # the count is an upper bound within a few percent. The 6N count is a third too high.
    assert flops_per_token(config, 32, lora) == pytest.approx(measured_lora, rel=0.05)
    assert flops_per_token(config, 32) > 1.3 * measured_lora
