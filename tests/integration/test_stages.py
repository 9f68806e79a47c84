"""The cpt and sft stages end to end through `dstrain run` on 2 CPU ranks, from a tiny random
Qwen2 saved as an HF dir (it stands in for pretrained weights): the first loss is the HF
model's own, exports round-trip, and a LoRA run's adapter and merged export load where users
load them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import yaml

from tests.faults import runs
from tests.helpers import tiny_model
from tests.integration.test_paths import dstrain, logits
from trainer.data.packing import IGNORE_INDEX

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("stages")
    tiny_model(seed=3, vocab_size=512).save_pretrained(root / "base")
    AutoTokenizer.from_pretrained(tiny_tokenizer_dir).save_pretrained(root / "base")
    return root


def stage_recipe(root, name: str, stage: str, **sections) -> tuple:
    path = runs.pretrained_recipe(root, root / "base", name, stage, **sections)
    return path, yaml.safe_load(path.read_text())


def first_step_loss(recipe: dict, world: int) -> float:
    """The HF base model's mean token loss over the first optimizer step's micro-batches of every
    rank, as the data pipeline deals them (the pipeline is per rank and collective-free)."""
    from transformers import AutoModelForCausalLM

    from trainer.config import build_config
    from trainer.data import build_train_data
    from trainer.dist import DistInfo
    from trainer.tokenizer import load_tokenizer

    job = build_config(base=recipe)
    tokenizer = load_tokenizer(job.tokenizer_path)
    model = AutoModelForCausalLM.from_pretrained(job.model.name_or_path, dtype=torch.float32).eval()
    total, targets = 0.0, 0
    for rank in range(world):
        data = build_train_data(
            job.data, tokenizer, DistInfo(rank=rank, world_size=world), job.seed, job.train.micro_batch_size
        )
        stream = iter(data)
        for _ in range(job.train.grad_accum):
            batch = next(stream)
            with torch.no_grad():
                out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
            labels = batch["labels"][:, 1:]
            total += F.cross_entropy(
                out[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            ).item()
            targets += int((labels != IGNORE_INDEX).sum())
    return total / targets


def test_cpt_on_zero3_starts_at_the_models_own_loss_and_exports_round_trip(root):
    path, recipe = stage_recipe(
        root,
        "cpt",
        "cpt",
        zero={"stage": 3},
        train={"max_steps": 4, "save_every": 4},
        data={"num_workers": 1},
    )
    code, log = dstrain("run", path, "--gpus", 2, cwd=root)
    assert code == 0, log[-4000:]
    got = runs.metrics(root / "cpt")
    assert abs(got[1]["loss"] - first_step_loss(recipe, 2)) <= 1e-5, "the first loss is the HF model's own"
    assert got[4]["loss"] < got[1]["loss"]
    code, log = dstrain("export", root / "cpt" / "checkpoints" / "step_4", root / "cpt_export", cwd=root)
    assert code == 0, log[-3000:]
    exported = logits(root / "cpt_export")
    assert (exported - logits(root / "cpt" / "hf")).abs().max() <= 1e-6
    assert (exported - logits(root / "base")).abs().max() > 1e-4, "the export holds the trained weights"


def test_lora_run_writes_a_peft_adapter_and_merges_offline(root):
    """LoRA on ZeRO-2 with gradient checkpointing: adapter/ loads with PeftModel.from_pretrained;
    `dstrain export CKPT OUT` writes the same adapter; `--merge` gives a plain transformers
    model with the same logits (merged in fp32)."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    path, _ = stage_recipe(
        root,
        "lora",
        "cpt",
        lora={"enabled": True, "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        optim={"lr": 1e-2},
        train={"max_steps": 4, "save_every": 4},
    )
    code, log = dstrain("run", path, "--gpus", 2, cwd=root)
    assert code == 0, log[-4000:]
    assert "trainable parameters" in log
    out = root / "lora"
    assert (out / "adapter" / "adapter_config.json").is_file() and not (out / "hf").exists()
    base = AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, out / "adapter").eval()
    probe = torch.arange(1, 40).view(3, 13)
    with torch.no_grad():
        want = adapted(input_ids=probe).logits
    assert (want - logits(root / "base")).abs().max() > 1e-4, "the adapter was trained"

    ckpt = out / "checkpoints" / "step_4"
    code, log = dstrain("export", ckpt, root / "lora_adapter", cwd=root)
    assert code == 0, log[-3000:]
    live = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    offline = load_file(str(root / "lora_adapter" / "adapter_model.safetensors"))
    assert live.keys() == offline.keys() and all(torch.allclose(live[k], offline[k], atol=1e-7) for k in live)

    code, log = dstrain("export", ckpt, root / "lora_merged", "--merge", cwd=root)
    assert code == 0, log[-3000:]
    merged = root / "lora_merged"
    assert not (merged / "adapter_config.json").exists()
    assert (logits(merged) - want).abs().max() <= 1e-4


@pytest.mark.shared_data
def test_sft_medical_lora_recipe_end_to_end_on_the_medical_rows(tmp_path):
    """`dstrain run sft_medical_lora` as the README gives it, on the shared medical-o1 demo rows,
    with a tiny stand-in for DeepSeek-R1-Distill-Qwen (the real Qwen2.5 vocabulary with R1's
    special tokens and chat template): the recipe's LoRA settings reach the adapter, the
    reasoning is supervised after the prompt (reasoning: keep), and the run ends with adapter/
    and loss_curve.png."""
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.helpers import R1_TEMPLATE, R1_TOKENS, shared_path

    base = tmp_path / "r1-distill-tiny"
    tok = AutoTokenizer.from_pretrained(shared_path("qwen2.5-0.5b"))
    tok.add_special_tokens(
        {"bos_token": R1_TOKENS[0], "eos_token": R1_TOKENS[1], "additional_special_tokens": R1_TOKENS[2:]}
    )
    tok.chat_template = R1_TEMPLATE.read_text(encoding="utf-8")
    tok.save_pretrained(base)
    tiny_model(seed=5, vocab_size=-(-len(tok) // 64) * 64).save_pretrained(base)
    rows = shared_path("medical-o1-huatuogpt-demo", "demo_data.json")
    out = tmp_path / "run"
    code, log = dstrain(
        "run", "sft_medical_lora", "--gpus", 2,
        "--model.name_or_path", base, "--data.train", f"[{rows}]", "--output_dir", out,
        # CPU-sized: two steps of 1024-token rows, logged each step; one worker per rank.
        "--data.max_seq_len", 1024, "--train.max_steps", 2, "--train.log_every", 1,
        "--train.save_every", 2, "--train.eval_every", 2, "--model.gradient_checkpointing", "false",
        cwd=tmp_path,
    )  # fmt: skip
    assert code == 0, log[-4000:]
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], adapter["lora_dropout"]) == (16, 32, 0.05)
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and all(0 < x < 20 for x in losses)
    assert any("eval_loss" in r for r in records)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out / "adapter").eval()
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().max() > 0 for p in lora_b), "every adapter trained"
