"""Pretrained weights and LoRA on real 2-rank DeepSpeed (CPU, gloo, fp32): a cpt model is
partitioned as it loads under ZeRO-3 and starts at the HF model's own loss; LoRA with gradient
checkpointing trains every adapter and no base weight, on ZeRO-2 and ZeRO-3; the adapter loads
in peft and reproduces the engine's logits; a LoRA checkpoint is a small part of a full one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.distributed.workers.common import global_rows, padded_batch
from tests.helpers import REPO, tiny_model
from tests.launch import read_results, run_ranks

pytestmark = pytest.mark.distributed
WORLD = 2
PROBE = torch.arange(1, 25).view(2, 12)


@pytest.fixture(scope="module")
def checks(tmp_path_factory, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    work = tmp_path_factory.mktemp("models")
    tiny_model(seed=3, vocab_size=512).save_pretrained(work / "base")
    AutoTokenizer.from_pretrained(tiny_tokenizer_dir).save_pretrained(work / "base")
    run_ranks(WORLD, REPO / "tests/distributed/workers/model_checks.py", [str(work)])
    return work, read_results(work, WORLD)


def base_model():
    return tiny_model(seed=3, vocab_size=512).eval()


def test_cpt_weights_are_partitioned_as_they_load_under_zero3(checks):
    _, results = checks
    for rank in range(WORLD):
        done, total = results[rank]["cpt_z3_partitioned"]
        assert total > 0 and done == total, f"rank {rank}: {done}/{total} parameters partitioned at build"
        done, total = results[rank]["lora_z3_partitioned"]
        assert done == total, "the LoRA base is partitioned too"
        assert results[rank]["lora_z2_partitioned"][0] == 0, "ZeRO-2 builds whole models"


def test_cpt_first_loss_is_the_hf_models_own_loss(checks):
    """The first step's loss (before any update) equals the pretrained HF model's mean token loss
    over the same global batch: the weights loaded, and the loss is the model's."""
    _, results = checks
    rows = [r for rank_rows in global_rows(0, WORLD, 4) for r in rank_rows]
    batch = padded_batch(rows)
    with torch.no_grad():
        logits = base_model()(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
        ).logits
    want = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
    for rank in range(WORLD):
        assert abs(results[rank]["cpt_z3_first_loss"] - want.item()) <= 1e-5


@pytest.mark.parametrize("stage", [2, 3])
def test_lora_with_gradient_checkpointing_trains_the_adapters_only(checks, stage):
    from peft import PeftModel

    work, results = checks
    saved = torch.load(work / f"lora_z{stage}.pt", weights_only=True)
    state, engine_logits = saved["state"], saved["logits"]
    losses = results[0][f"lora_z{stage}"]["losses"]
    assert losses[-1] < losses[0], "the adapters learn"
    base = base_model().state_dict()
    lora_b = {k: v for k, v in state.items() if "lora_B" in k}
    assert lora_b and all(v.abs().max() > 0 for v in lora_b.values()), "every lora_B moved off zero"
    frozen = {
        k.replace("base_model.model.", "").replace(".base_layer", ""): v
        for k, v in state.items()
        if "lora_" not in k
    }
    assert set(frozen) == set(base)
    assert all(torch.equal(frozen[k], base[k]) for k in base), "a base weight changed"
    adapted = PeftModel.from_pretrained(base_model(), work / f"adapter_z{stage}").eval()
    with torch.no_grad():
        got = adapted(input_ids=PROBE).logits
    assert (got - engine_logits).abs().max() <= 1e-5
    assert (got - base_model()(input_ids=PROBE).logits).abs().max() > 1e-3, "the adapter changes the model"


def test_a_lora_checkpoint_is_a_small_part_of_a_full_one(checks):
    _, results = checks
    full = results[0]["full_ckpt_bytes"]
    for stage in (2, 3):
        lora = results[0][f"lora_z{stage}"]["ckpt_bytes"]
        assert lora < 0.25 * full, f"ZeRO-{stage}: LoRA checkpoint {lora} bytes vs full {full}"
