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
    """A tiny recipe of ``stage`` from the base dir (no tokenizer key: it comes with the weights)."""
    path = runs.make_recipe(root, root / "base", name, **sections)
    recipe = yaml.safe_load(path.read_text())
    recipe.update(stage=stage, tokenizer=None)
    recipe["model"] = {
        "name_or_path": str(root / "base"),
        "gradient_checkpointing": True,
        **sections.get("model", {}),
    }
    path.write_text(yaml.safe_dump(recipe))
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
        "sft",
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
