"""``dstrain estimate``: ZeRO model states by the paper's formulas, an activation model measured
against a real CPU forward/backward, the micro-batch search, and steps and time from the data."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from launcher.estimate import LAYOUTS, Layout, activation_memory, main, model_states
from tests.helpers import REPO

GB = 1e9


def run_estimate(capsys, *argv: str) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def write_recipe(path, text: str):
    path.write_text(text)
    return str(path)


# Qwen2.5-7B's published config.json (huggingface.co/Qwen/Qwen2.5-7B), written out here so the
# test does not depend on the preset file that the planner could also read.
QWEN2_5_7B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "max_position_embeddings": 131072,
    "max_window_layers": 28,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_sliding_window": False,
}


def meta_model(config_dir, lora_targets=None):
    """The model transformers builds from a config dir, on the meta device (no memory), and with
    peft's LoRA r 16 on ``lora_targets`` when given."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir))
        if lora_targets:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(
                model, LoraConfig(task_type="CAUSAL_LM", r=16, target_modules=lora_targets)
            )
    return model


def test_a_recipe_naming_only_pretrained_weights_is_sized_by_their_config(tmp_path, capsys):
    """cpt/sft plan the model the run loads (model.name_or_path), not the default preset."""
    weights = tmp_path / "qwen2.5-7b"
    weights.mkdir()
    (weights / "config.json").write_text(json.dumps(QWEN2_5_7B))
    psi = sum(p.numel() for p in meta_model(weights).parameters())
    assert psi == 7_615_616_512, "Qwen2.5-7B's published size (7.61B)"

    recipe = write_recipe(tmp_path / "r.yaml", f"stage: cpt\nmodel: {{name_or_path: {weights}}}\n")
    report = run_estimate(capsys, recipe, "--gpus", "8", "--gpu-mem", "80", "--no-data")
    assert report["model"]["parameters"] == psi == report["model"]["trainable_parameters"]

    # LoRA r 16 on q and v: the frozen base keeps its 16-bit copy (2 bytes), each adapter weight
    # its fp32 weight, gradient and Adam moments (16 bytes); counts from peft's own model.
    peft_model = meta_model(weights, ["q_proj", "v_proj"])
    adapters = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    recipe = write_recipe(
        tmp_path / "lora.yaml",
        f"stage: sft\ndata: {{format: alpaca}}\nmodel: {{name_or_path: {weights}}}\n"
        "lora: {enabled: true, r: 16, target_modules: [q_proj, v_proj]}\n",
    )
    report = run_estimate(capsys, recipe, "--gpus", "8", "--gpu-mem", "80", "--no-data")
    assert report["model"]["trainable_parameters"] == adapters
    rows = {row["layout"]: row for row in report["layouts"]["no_checkpointing"]}
    expected = 2 * psi + 16 * adapters
    assert abs(rows["0"]["model_states"] - expected) <= 0.05 * expected
    assert rows["0"]["model_states"] < 0.2 * 16 * psi, "no optimizer state for the frozen base"


def test_an_unreachable_hub_id_is_one_line_and_no_preset_stands_in(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", "stage: cpt\nmodel: {name_or_path: nobody/no-such-model}\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-m", "launcher.estimate", recipe, "--gpus", "8", "--no-data"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "nobody/no-such-model" in lines[0] and "--model.name_or_path" in lines[0]
    assert "0.494" not in out.stdout


def test_model_states_per_parameter_follow_deepspeed_0_19_8():
    """Bytes per trainable parameter on 8 ranks for fp32 weights under torch_autocast, read off
    DeepSpeed 0.19.8 and measured on one CPU rank (trainer/planner.py's docstring): every ZeRO
    stage >= 1 keeps a cloned fp32 master partition (stage_1_and_2.py's
    ``single_partition_of_fp32_groups``; stage3.py's in-place path never triggers)."""
    n, psi = 8, 8_000
    per_param = {0: 4 + 4 + 8, 1: 4 + 4 + (4 + 8) / n, 2: 4 + (4 + 4 + 8) / n, 3: (4 + 4 + 4 + 8) / n}
    for stage, expected in per_param.items():
        states = model_states(psi, n, Layout(stage), "bf16")
        assert states.gpu / psi == pytest.approx(expected), stage
    frozen = model_states(psi, n, Layout(2), "bf16", trainable=0)
    # A frozen base is 16-bit, except under ZeRO-3, whose zero.Init keeps fp32 partitions.
    assert frozen.gpu / psi == 2 and model_states(psi, n, Layout(3), "bf16", trainable=0).gpu / psi == 4 / n


def test_fp32_model_states_split_16_psi_as_4_4_8():
    states = model_states(1000, 4, LAYOUTS[0], "fp32")
    assert (states.weights, states.gradients, states.optimizer) == (4000, 4000, 8000)


PROBE = r"""
import json, sys, torch
from transformers import Qwen2Config, AutoModelForCausalLM
from trainer.loss import enable_chunked_loss, summed_loss
from trainer.model import apply_gradient_checkpointing

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

spec = json.loads(sys.argv[1])
config = Qwen2Config(**spec["shape"], tie_word_embeddings=True, use_cache=False)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
if spec["checkpointing"]:
    apply_gradient_checkpointing(model)
if spec["chunk_bytes"]:
    enable_chunked_loss(model, chunk_bytes=spec["chunk_bytes"])
model.train()
micro, seq = spec["micro"], spec["seq"]
ids = torch.randint(0, config.vocab_size, (micro, seq))
half = seq // 2  # packed rows: two documents each, position_ids restart
positions = torch.cat([torch.arange(half), torch.arange(seq - half)]).repeat(micro, 1)
batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": positions}
summed_loss(model, batch, "cpu").backward()  # kernels loaded, every .grad allocated
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
base = status("VmRSS:")
summed_loss(model, batch, "cpu").backward()
print(json.dumps({"peak_bytes": status("VmHWM:") - base}))
"""

SHAPE = {
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 704,
    "vocab_size": 8192,
}


def run_probe(script: str, arg: object, **env: str) -> dict:
    """Run ``script`` in a fresh Python with ``arg`` as JSON; its last stdout line, as JSON."""
    env = dict(os.environ, PYTHONPATH=str(REPO), **env)
    out = subprocess.run(
        [sys.executable, "-c", script, json.dumps(arg)], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def measured_peak(spec: dict) -> int:
    """Peak RSS growth of one training forward/backward in a fresh process. glibc's mmap
    threshold is pinned low so freed tensors leave RSS at once (see tests/unit/test_loss.py)."""
    return run_probe(PROBE, spec, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="2")["peak_bytes"]


@pytest.mark.parametrize(
    "checkpointing, chunk_tokens",
    [(False, None), (True, None), (False, 256)],
    ids=["plain", "ckpt", "chunked"],
)
def test_activation_estimate_is_within_25_percent_of_a_measured_cpu_run(checkpointing, chunk_tokens):
    from transformers import Qwen2Config

    micro, seq = 8, 256
    chunk_bytes = chunk_tokens * 4 * SHAPE["vocab_size"] if chunk_tokens else 0
    spec = {
        "shape": SHAPE,
        "micro": micro,
        "seq": seq,
        "checkpointing": checkpointing,
        "chunk_bytes": chunk_bytes,
    }
    measured = measured_peak(spec)
    estimate = activation_memory(
        Qwen2Config(**SHAPE),
        micro_batch_size=micro,
        seq_len=seq,
        precision="fp32",
        attn="sdpa",
        packed=True,
        checkpointing=checkpointing,
        chunked_loss=bool(chunk_tokens),
        chunk_bytes=chunk_bytes or 1,
    ).peak
    print(
        f"activations {spec['checkpointing']=} {chunk_tokens=}: estimate {estimate / 2**20:.1f} MiB, "
        f"measured {measured / 2**20:.1f} MiB ({estimate / measured - 1:+.1%})"
    )
    assert measured > 20 * 2**20, "the probe must allocate enough to measure"
    assert abs(estimate - measured) <= 0.25 * measured


def test_recommendation_is_the_cheapest_layout_that_fits_and_its_largest_micro_batch(tmp_path, capsys):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        "tokenizer: unused\nmodel: {config: qwen2.5-7b, gradient_checkpointing: false}\n"
        "data: {max_seq_len: 2048}\ntrain: {micro_batch_size: 1, grad_accum: 16}\n",
    )
    report = run_estimate(capsys, recipe, "--gpus", "8", "--gpu-mem", "80", "--no-data")
    rec = report["recommendation"]
    # 8 GPUs: ZeRO-0 is no candidate (ZeRO-1 shards the optimizer for the same traffic); a layout
    # fits when it holds 4 rows of 2048 (8192 tokens), checkpointing only when none does without.
    need = 4
    plain = [row for row in report["layouts"]["no_checkpointing"] if row["layout"] != "0"]
    assert rec["gradient_checkpointing"] == all(row["max_micro_batch_size"] < need for row in plain)
    rows = [
        r for r in report["layouts"]["checkpointing" if rec["gradient_checkpointing"] else "no_checkpointing"]
    ]
    rows = [row for row in rows if row["layout"] != "0"]
    chosen = next(i for i, row in enumerate(rows) if row["layout"] == rec["layout"])
    assert all(row["max_micro_batch_size"] < need for row in rows[:chosen]), "a faster layout fits"
    largest = rows[chosen]["max_micro_batch_size"]
    assert rec["max_micro_batch_size"] == largest >= need
    # the recipe's 16 rows per step: the largest divisor of 16 that fits, accum makes up the rest
    assert rec["micro_batch_size"] == max(m for m in (1, 2, 4, 8, 16) if m <= largest)
    assert rec["micro_batch_size"] * rec["grad_accum"] == 16
    ckpt = str(rec["gradient_checkpointing"]).lower()
    key = "checkpointing" if rec["gradient_checkpointing"] else "no_checkpointing"
    # the largest micro-batch: it fits, one more does not
    args = [recipe, "--gpus", "8", "--gpu-mem", "80", "--no-data", "--model.gradient_checkpointing", ckpt]
    usable = report["setup"]["usable_bytes"]
    for micro, fits in ((largest, True), (largest + 1, False)):
        again = run_estimate(capsys, *args, "--train.micro_batch_size", str(micro))
        total = next(r for r in again["layouts"][key] if r["layout"] == rec["layout"])["total"]
        assert (total <= usable) is fits, (micro, total, usable)
    # on 1 GPU of 24 GB nothing holds 7B without offloading everything; a 1000 GB GPU takes ZeRO-0
    small = run_estimate(capsys, recipe, "--gpus", "1", "--gpu-mem", "24", "--no-data")
    assert small["recommendation"] is None or small["recommendation"]["offload_optimizer"]
    huge = run_estimate(capsys, recipe, "--gpus", "1", "--gpu-mem", "1000", "--no-data")
    assert huge["recommendation"]["layout"] == "0"


def test_steps_and_time_per_epoch_from_pre_tokenized_data(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # 100 documents of 99 tokens: packing adds one EOS each, 10,000 tokens = 100 rows of 100.
    ids = [[(i * 7 + j) % 500 + 1 for j in range(99)] for i in range(100)]
    table = pa.table(
        {"doc_id": pa.array(range(100), pa.int64()), "input_ids": pa.array(ids, pa.list_(pa.int64()))}
    )
    pq.write_table(table, tmp_path / "tok.parquet", row_group_size=25)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        f"tokenizer: unused\nmodel: {{config: qwen2.5-0.5b, overrides: {{hidden_size: 64, num_hidden_layers: 2, "
        f"num_attention_heads: 4, num_key_value_heads: 2, intermediate_size: 128}}}}\n"
        f"data: {{train: [{tmp_path / 'tok.parquet'}], max_seq_len: 100, validation_fraction: 0}}\n"
        f"train: {{micro_batch_size: 2, grad_accum: 5, epochs: 3}}\n",
    )
    report = run_estimate(capsys, recipe, "--gpus", "2", "--tokens-per-s", "1000")
    data, timing = report["data"], report["time"]
    # 2 ranks x micro 2 x accum 5 = 20 rows (2,000 tokens) a step: 5 steps an epoch, 15 in 3 epochs.
    assert (data["tokens"], data["sequences"], data["steps_per_epoch"], data["held_out_rows"]) == (
        9_900,
        100,
        5,
        0,
    )
    assert data["tokens_per_step"] == 2_000
    assert (timing["steps"], timing["tokens"], timing["seconds"]) == (15, 30_000, 30.0)
    # the default hold-out (10% of rows for eval, the trainer's seeded rule) leaves fewer steps
    from trainer.data.sharding import held_out

    held = int(held_out(np.arange(100), 0.1, 2222).sum())
    assert 0 < held < 25
    report = run_estimate(capsys, recipe, "--gpus", "2", "--data.validation_fraction", "0.1")
    assert report["data"]["held_out_rows"] == held
    assert report["data"]["sequences"] == 100 - held  # every document fills exactly one packed row


def test_tokens_per_s_from_a_runs_metrics(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    records = [{"step": 10, "loss": 3.0, "tokens_per_s": 100.0}, {"step": 20, "eval_loss": 2.9}]
    records += [
        {"step": 10 * i, "loss": 2.0, "tokens_per_s": rate}
        for i, rate in ((3, 400.0), (4, 500.0), (5, 600.0))
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    recipe = write_recipe(
        tmp_path / "r.yaml",
        "tokenizer: unused\ntrain: {max_steps: 10, micro_batch_size: 1, grad_accum: 1}\ndata: {max_seq_len: 100}\n",
    )
    report = run_estimate(capsys, recipe, "--gpus", "1", "--no-data", "--metrics", str(run))
    # median of the records after the first (warm-up): 500 tokens/s; 10 steps x 100 tokens = 2 s
    assert report["time"]["tokens_per_s"] == 500.0 and report["time"]["seconds"] == 2.0


def test_user_errors_are_one_line(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", "tokenizer: unused\n")
    assert main([recipe, "--gpus", "0"]) == 2
    assert "--gpus" in capsys.readouterr().err
    if not torch.cuda.is_available():  # no device peak to assume an MFU of
        assert main([recipe, "--gpus", "1", "--mfu", "0.4", "--no-data"]) == 2
        assert "--peak-tflops" in capsys.readouterr().err
    assert main([recipe, "--gpus", "1", "--optim.lerning_rate", "1"]) == 2
    assert "did you mean --optim.lr" in capsys.readouterr().err


def test_table_output_names_the_recommendation(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", "tokenizer: unused\nmodel: {config: qwen2.5-7b}\n")
    assert (
        main(
            [
                recipe,
                "--gpus",
                "8",
                "--gpu-mem",
                "80",
                "--no-data",
                "--tokens-per-s",
                "5e4",
                "--train.max_steps",
                "100",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "recommended: ZeRO-" in out and "--zero.stage" in out and " h " in out


def test_the_planners_copy_of_the_loss_settings_matches_trainer_loss():
    """estimate.py mirrors two constants of trainer.loss so that --help does not import torch."""
    from launcher import estimate
    from trainer import loss

    assert estimate.CHUNK_BYTES == loss.DEFAULT_CHUNK_BYTES
    assert estimate.CHUNKED_MODEL_TYPES == loss.CHUNKED_MODEL_TYPES


DS_PROBE = r"""
import gc, json, sys
import torch
import deepspeed

def fp32_bytes():
    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.dtype != torch.float32:
                continue
            storage = obj.untyped_storage()
        except Exception:
            continue
        if storage.data_ptr() not in seen and storage.nbytes() > 4096:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total

out = {}
for stage in json.loads(sys.argv[1]):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256, bias=False) for _ in range(8)])
    psi = sum(p.numel() for p in model.parameters())
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": stage},
        "torch_autocast": {"enabled": True, "dtype": "bfloat16"},
        "zero_allow_untested_optimizer": True,
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    x = torch.randn(4, 256)
    engine.backward(engine(x).float().pow(2).mean())
    engine.step()
    engine.backward(engine(x).float().pow(2).mean())  # the peak: gradients and optimizer state
    gc.collect()
    out[stage] = fp32_bytes() / psi
    engine.destroy()
    del engine, optimizer, model
    gc.collect()
print(json.dumps(out))
"""


@pytest.mark.distributed
def test_model_states_match_a_deepspeed_engine_under_torch_autocast():
    """fp32 bytes per parameter that a real DeepSpeed 0.19.8 engine holds (one CPU rank,
    torch_autocast bf16 over fp32 weights) between backward and step, against the planner."""
    stages = [0, 1, 3]
    one_rank = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    measured = run_probe(DS_PROBE, stages, OMP_NUM_THREADS="1", MASTER_PORT="29517", **one_rank)
    for stage in stages:
        planned = model_states(1000, 1, Layout(stage), "bf16").gpu / 1000
        assert measured[str(stage)] == pytest.approx(planned, abs=0.5), (stage, measured)
