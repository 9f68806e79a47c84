"""GPU checks and throughput of dstrain's real training path; every figure with the device and date.

    python scripts/bench_gpu.py bench  [--out DIR] [--attn flash_attention_2,sdpa] [--checkpointing off,on]
    python scripts/bench_gpu.py parity [--out DIR]
    python scripts/bench_gpu.py resume [--out DIR]
    python scripts/bench_gpu.py env|summary --out DIR     device facts / summary.md of what DIR holds
    ... --cpu-fallback     the same code on CPU: a tiny model, fp32, a few steps (what the tests run)

bench   The Qwen2.5-0.5B architecture (24 layers, hidden 896, vocabulary 151,936), rows of 2048
        tokens, bf16, ZeRO-2 on one GPU, through ``build_model``, ``build_engine``, the streaming
        data pipeline and ``TrainModule.train_step``: one process per case (attention kernel x
        gradient checkpointing, chunked loss; plus the plain loss once for comparison). Reports
        non-pad tokens/s, MFU (``trainer.flops``: dense bf16 peak of this device), peak memory
        allocated and reserved, and what ``dstrain estimate``'s model predicts for the same case.
        Target: MFU >= 45% on one H100/H200.
parity  bf16 loss of one packed batch (several documents per row, position_ids restart) under
        eager, SDPA and flash-attention (when importable), each against fp32 eager, and each
        packed row against its documents run one by one (packing must not leak attention).
resume  A bf16 run killed with SIGKILL after a checkpoint and resumed (``dstrain run --resume``)
        against the same run uninterrupted: the per-step losses after the checkpoint.

Data: the zh-wiki sample and the Qwen tokenizer from ``../shared/data`` (or ``--input``/
``--tokenizer``); without them, the demo corpus and tokenizer built from the Python stdlib
(``scripts/make_demo_data.py``), with the embedding resized to 151,936 rows for ``bench`` so the
compute matches the real vocabulary. Each subcommand writes ``<out>/<name>.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
QWEN_VOCAB = 151_936
TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
}
# A small model for the resume check on a GPU: seconds per step, still bf16 kernels throughout.
RESUME_SHAPE = {
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 704,
}


def device_facts() -> dict[str, Any]:
    """What the figures were measured on."""
    import torch
    import transformers

    facts = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_count": os.cpu_count(),
        "flash_attn": importlib.util.find_spec("flash_attn") is not None,
        "liger_kernel": importlib.util.find_spec("liger_kernel") is not None,
    }
    try:
        import deepspeed

        facts["deepspeed"] = deepspeed.__version__
    except ImportError:
        facts["deepspeed"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.update(
            device=torch.cuda.get_device_name(0), cuda=torch.version.cuda, gpu_mem_gb=props.total_memory / 1e9
        )
    else:
        facts["device"] = f"CPU ({platform.processor() or platform.machine()})"
    return facts


def data_sources(args: argparse.Namespace) -> dict[str, Any]:
    """The input and tokenizer to use: given, ../shared/data, or the stdlib demo corpus (built once)."""
    if args.input and args.tokenizer:
        return {"input": str(args.input), "tokenizer": str(args.tokenizer), "text_column": args.text_column}
    wiki, qwen = SHARED_DATA / "zhwiki-sample" / "wikipedia-cn-sample.json", SHARED_DATA / "qwen2.5-0.5b"
    if wiki.is_file() and qwen.is_dir():
        return {"input": str(wiki), "tokenizer": str(qwen), "text_column": "completion"}
    demo = args.out / "demo-data"
    if not (demo / "train.parquet").is_file():
        subprocess.run(
            [sys.executable, str(REPO / "scripts" / "make_demo_data.py"), "--out", str(demo)],
            check=True,
            env=child_env(),
        )
    return {"input": str(demo / "train.parquet"), "tokenizer": str(demo / "tokenizer"), "text_column": "text"}


def child_env(**extra: str) -> dict[str, str]:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    )
    env.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **extra)
    return env


def single_rank_env(port: int) -> dict[str, str]:
    """One rank of a one-process 'world', so DeepSpeed initialises without a launcher."""
    return child_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {path}")


# ============================================================================ bench


def bench_job(spec: dict[str, Any]) -> Any:
    from trainer.config import build_config

    return build_config(
        base={
            "output_dir": spec["output_dir"],
            "tokenizer": spec["tokenizer"],
            "model": {
                "config": "qwen2.5-0.5b",
                "overrides": TINY if spec["cpu"] else {},
                "attn_implementation": spec["attn"],
                "gradient_checkpointing": spec["checkpointing"],
                "dtype": "fp32" if spec["cpu"] else "bf16",
                # The loss path is set after the embeddings are resized to the real vocabulary.
                "loss": "plain",
            },
            "data": {
                "train": [spec["input"]],
                "text_column": spec["text_column"],
                "max_seq_len": spec["seq_len"],
                "pack": True,
                "num_workers": spec["num_workers"],
                "validation_fraction": 0.0,
                "buffer_size": 1000,
            },
            "optim": {"lr": 3e-4},
            "schedule": {"warmup_steps": 2},
            "train": {"micro_batch_size": spec["micro"], "grad_accum": 1, "max_steps": spec["steps"]},
            "zero": {"stage": spec["zero"]},
        }
    )


def use_loss(model: Any, kind: str) -> bool:
    """``chunked``: give the model :mod:`trainer.loss`'s chunked head (as ``build_model`` does for
    ``model.loss: chunked``; here after the embeddings were resized). Returns whether it applied."""
    from trainer.loss import enable_chunked_loss

    return kind == "chunked" and enable_chunked_loss(model)


def local_step(module: Any, batches: list[dict[str, Any]]) -> tuple[float, int]:
    """One optimizer step on one rank: (mean token loss, non-pad tokens)."""
    from trainer.train_module import target_count, token_count

    targets = sum(target_count(b) for b in batches)
    result = module.train_step(batches, targets)
    return float(result.loss_sum) / max(targets, 1), sum(token_count(b) for b in batches)


def predicted_bytes(job: Any, config: Any, precision: str, chunked: bool) -> float:
    """What ``dstrain estimate`` predicts for this case on one GPU (model states + buffers + activations)."""
    from launcher.estimate import Layout, activation_memory, buffer_bytes, model_states
    from trainer.flops import param_counts

    counts = param_counts(config)
    layout = Layout(job.zero.stage)
    acts = activation_memory(
        config,
        job.train.micro_batch_size,
        job.data.max_seq_len,
        precision,
        config._attn_implementation,
        job.data.pack,
        job.model.gradient_checkpointing,
        chunked,
    )
    states = model_states(counts.total, 1, layout, precision)
    return states.gpu + buffer_bytes(layout, True, max(counts.embedding, counts.lm_head)) + acts.peak


def run_bench_case(spec: dict[str, Any]) -> dict[str, Any]:
    """One case in this process: build everything the trainer builds, time ``train_step``."""
    import torch

    from trainer.data import build_train_data
    from trainer.dist import DistInfo, init_distributed
    from trainer.ds_config import build_ds_config, resolve_precision
    from trainer.engine import build_engine
    from trainer.flops import device_peak_tflops, flops_per_token, mfu
    from trainer.model import build_model
    from trainer.tokenizer import load_tokenizer
    from trainer.train_module import TrainModule

    dist = DistInfo.from_env()
    init_distributed(dist)
    on_gpu = dist.device.startswith("cuda")
    job = bench_job(spec)
    precision = resolve_precision(job.model.dtype, on_gpu, on_gpu and torch.cuda.is_bf16_supported())
    tokenizer = load_tokenizer(job.tokenizer_path)
    ds_config = build_ds_config(job, precision, on_gpu)
    model = build_model(job, tokenizer, precision, on_gpu, ds_config)
    if spec["vocab_size"] and model.config.vocab_size < spec["vocab_size"]:
        model.resize_token_embeddings(spec["vocab_size"])  # the real vocabulary's compute
    chunked = use_loss(model, spec["loss"])
    engine = build_engine(job, model, ds_config, spec["steps"])
    module = TrainModule(engine, dist)
    data = build_train_data(job.data, tokenizer, dist, job.seed, job.train.micro_batch_size)

    def batches():
        while True:
            yield from data

    stream = batches()
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    tokens, losses = 0, []
    for step in range(spec["steps"]):
        if step == spec["warmup"]:
            sync()
            started, tokens = time.perf_counter(), 0
        loss, step_tokens = local_step(module, [next(stream)])
        tokens += step_tokens
        losses.append(loss)
    sync()
    seconds = time.perf_counter() - started
    tokens_per_s = tokens / seconds
    flops = flops_per_token(model.config, job.data.max_seq_len)
    peak = device_peak_tflops(spec["peak_tflops"])
    out = {
        "attn": model.config._attn_implementation,
        "checkpointing": spec["checkpointing"],
        "loss_path": "chunked" if chunked else "plain",
        "precision": precision,
        "micro_batch_size": spec["micro"],
        "seq_len": spec["seq_len"],
        "vocab_size": model.config.vocab_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "timed_steps": spec["steps"] - spec["warmup"],
        "tokens_per_s": tokens_per_s,
        "flops_per_token": flops,
        "peak_tflops": peak,
        "mfu": mfu(tokens_per_s, flops, 1, peak),
        "losses": losses,
        "predicted_peak_bytes": predicted_bytes(job, model.config, precision, chunked),
    }
    if on_gpu:
        out.update(
            peak_allocated_bytes=torch.cuda.max_memory_allocated(),
            peak_reserved_bytes=torch.cuda.max_memory_reserved(),
        )
    return out


def bench(args: argparse.Namespace) -> dict[str, Any]:
    sources = data_sources(args)
    cases = [(attn, ckpt, "chunked") for attn in args.attn for ckpt in args.checkpointing]
    if args.plain_loss_case:
        cases.append((cases[0][0], True, "plain"))
    results = []
    for i, (attn, ckpt, loss) in enumerate(cases):
        spec = {
            **sources,
            "cpu": args.cpu_fallback,
            "attn": attn,
            "checkpointing": ckpt,
            "loss": loss,
            "seq_len": args.seq_len,
            "micro": args.micro_batch_size,
            "steps": args.warmup + args.steps,
            "warmup": args.warmup,
            "zero": args.zero,
            "num_workers": args.num_workers,
            "vocab_size": None if args.cpu_fallback else QWEN_VOCAB,
            "peak_tflops": args.peak_tflops,
            "output_dir": str(args.out / "bench-run"),
        }
        name = f"{attn}/{'ckpt' if ckpt else 'no-ckpt'}/{loss}"
        proc = subprocess.run(
            [sys.executable, __file__, "child", json.dumps(spec)],
            env=single_rank_env(29400 + i),
            capture_output=True,
            text=True,
            timeout=args.case_timeout,
        )
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr)[-3000:]
            results.append({"case": name, "error": f"exit {proc.returncode}", "log_tail": tail})
            print(f"{name}: FAILED (exit {proc.returncode})\n{tail}", flush=True)
            continue
        result = {"case": name, **json.loads(proc.stdout.strip().splitlines()[-1])}
        results.append(result)
        print(format_bench_row(result), flush=True)
    return {"device": device_facts(), "data": sources, "results": results}


def format_bench_row(r: dict[str, Any]) -> str:
    mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
    memory = ""
    if "peak_allocated_bytes" in r:
        memory = (
            f", peak {r['peak_allocated_bytes'] / 1e9:.1f} GB allocated / {r['peak_reserved_bytes'] / 1e9:.1f} reserved"
            f" (estimate {r['predicted_peak_bytes'] / 1e9:.1f})"
        )
    return f"{r['case']}: {r['tokens_per_s']:,.0f} tokens/s, MFU {mfu}{memory}"


# ============================================================================ parity


def packed_batch(
    vocab: int, rows: int, seq: int, docs_per_row: int, device: str
) -> tuple[dict[str, Any], list[list[int]]]:
    """Rows of several documents (random ids), position_ids restarting at each; document lengths."""
    import torch

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (rows, seq), generator=gen)
    positions, labels, lengths = torch.zeros_like(ids), ids.clone(), []
    for r in range(rows):
        cuts = sorted(torch.randperm(seq - 2, generator=gen)[: docs_per_row - 1].add(1).tolist())
        bounds = [0, *cuts, seq]
        lengths.append([b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            positions[r, a:b] = torch.arange(b - a)
            if a:
                labels[r, a] = -100  # no loss across a document boundary
    batch = {"input_ids": ids, "position_ids": positions, "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}, lengths


def parity(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from trainer.config import build_config
    from trainer.loss import summed_loss
    from trainer.model import build_model, select_attention
    from trainer.tokenizer import load_tokenizer

    sources = data_sources(args)
    on_gpu = torch.cuda.is_available() and not args.cpu_fallback
    device = "cuda" if on_gpu else "cpu"
    dtype = "bf16" if on_gpu else "fp32"
    tokenizer = load_tokenizer(sources["tokenizer"])
    seq = args.seq_len
    results: dict[str, Any] = {"device": device_facts(), "dtype": dtype, "seq_len": seq, "cases": {}}

    def model_with(attn: str, precision: str) -> Any:
        """The same seeded weights every time, with ``attn`` as the attention kernel."""
        job = build_config(
            base={
                "tokenizer": sources["tokenizer"],
                "model": {
                    "overrides": TINY if args.cpu_fallback else {},
                    "attn_implementation": attn,
                    "gradient_checkpointing": False,
                },
            }
        )
        model = build_model(job, tokenizer, precision, on_gpu)
        torch_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        return model.to(device=device, dtype=torch_dtype).eval()

    def loss_sum(model: Any, batch: dict[str, Any]) -> tuple[float, int]:
        with torch.no_grad():
            total = summed_loss(model, batch, device)
        return float(total), int((batch["labels"][:, 1:] != -100).sum())

    reference = model_with("eager", "fp32")
    batch, lengths = packed_batch(reference.config.vocab_size, 2, seq, 4, device)
    ref_sum, targets = loss_sum(reference, batch)
    del reference
    attns = ["eager", "sdpa"]
    if select_attention("auto", on_gpu, dtype) == "flash_attention_2":
        attns.append("flash_attention_2")
    for attn in attns:
        model = model_with(attn, dtype)
        packed_sum, _ = loss_sum(model, batch)
        separate_sum = 0.0  # each document alone: what packing must reproduce
        for r, row_lengths in enumerate(lengths):
            start = 0
            for length in row_lengths:
                # A document's first label is never a target, so the same targets are scored.
                doc = {k: v[r : r + 1, start : start + length] for k, v in batch.items()}
                separate_sum += loss_sum(model, doc)[0]
                start += length
        results["cases"][attn] = {
            "packed_loss": packed_sum / targets,
            "vs_fp32_eager": abs(packed_sum - ref_sum) / targets,
            "packed_vs_separate": abs(packed_sum - separate_sum) / targets,
        }
        del model
    tolerance = args.parity_tolerance or (2e-2 if dtype == "bf16" else 1e-4)
    results["tolerance"] = tolerance
    results["fp32_eager_loss"] = ref_sum / targets
    results["pass"] = all(
        c["vs_fp32_eager"] <= tolerance and c["packed_vs_separate"] <= tolerance
        for c in results["cases"].values()
    )
    for attn, c in results["cases"].items():
        print(
            f"parity {attn:18s} loss {c['packed_loss']:.5f}  |vs fp32 eager| {c['vs_fp32_eager']:.2e}  "
            f"|packed vs separate| {c['packed_vs_separate']:.2e}"
        )
    print(f"parity: {'pass' if results['pass'] else 'FAIL'} (tolerance {tolerance:g})")
    return results


# ============================================================================ resume


def resume_recipe(args: argparse.Namespace, sources: dict[str, Any], name: str) -> Path:
    import yaml

    recipe = {
        "stage": "pretrain",
        "output_dir": str(args.out / "resume" / name),
        "seed": 11,
        "tokenizer": sources["tokenizer"],
        "model": {
            "overrides": TINY if args.cpu_fallback else RESUME_SHAPE,
            "gradient_checkpointing": not args.cpu_fallback,
            "dtype": "fp32" if args.cpu_fallback else "bf16",
        },
        "data": {
            "train": [sources["input"]],
            "text_column": sources["text_column"],
            "max_seq_len": 128 if args.cpu_fallback else 512,
            "num_workers": 1,
            "validation_fraction": 0.0,
        },
        "optim": {"lr": 1e-3},
        "schedule": {"warmup_steps": 3},
        "train": {
            "micro_batch_size": 2 if args.cpu_fallback else 8,
            "grad_accum": 2,
            "max_steps": args.resume_steps,
            "log_every": 1,
            "eval_every": 0,
            "save_every": args.resume_save_every,
            "keep_last": 2,
        },
        "zero": {"stage": 2},
        "log": {"plot": False, "progress": False},
    }
    path = args.out / "resume" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe))
    return path


def step_losses(output_dir: Path) -> dict[int, float]:
    path = output_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    records = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def launch(recipe: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "launcher.cli", "run", str(recipe), "--gpus", "1", *extra]
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=child_env(),
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait(proc: subprocess.Popen, timeout: float, what: str) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise SystemExit(f"{what} did not finish in {timeout:.0f}s:\n{out[-3000:]}") from None
    if proc.returncode != 0:
        raise SystemExit(f"{what} exited {proc.returncode}:\n{out[-3000:]}")
    return out


def resume(args: argparse.Namespace) -> dict[str, Any]:
    sources = data_sources(args)
    reference, killed = resume_recipe(args, sources, "uninterrupted"), resume_recipe(args, sources, "killed")
    wait(launch(reference), args.case_timeout, "the uninterrupted run")
    want = step_losses(args.out / "resume" / "uninterrupted")
    save = args.resume_save_every
    kill_after = save + 2  # a complete checkpoint at `save`, then two steps that are lost
    proc = launch(killed)
    deadline = time.time() + args.case_timeout
    while kill_after not in step_losses(args.out / "resume" / "killed"):
        if proc.poll() is not None or time.time() > deadline:
            raise SystemExit(f"the run to kill ended or stalled before step {kill_after}")
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole launcher tree, like a node failure
    proc.wait()
    wait(launch(killed, "--resume"), args.case_timeout, "the resumed run")
    got = step_losses(args.out / "resume" / "killed")
    steps = range(save + 1, args.resume_steps + 1)
    diffs = {s: abs(got[s] - want[s]) for s in steps if s in got and s in want}
    tolerance = 1e-6 if args.cpu_fallback else 2e-2
    result = {
        "device": device_facts(),
        "killed_after_step": kill_after,
        "resumed_from_step": save,
        "steps_compared": len(diffs),
        "max_loss_diff": max(diffs.values()) if diffs else None,
        "tolerance": tolerance,
        "pass": len(diffs) == len(steps) and max(diffs.values()) <= tolerance,
        "losses_uninterrupted": want,
        "losses_resumed": got,
    }
    print(
        f"resume: killed after step {kill_after}, resumed from {save}: max |loss diff| over steps "
        f"{save + 1}-{args.resume_steps} = {result['max_loss_diff']} ({'pass' if result['pass'] else 'FAIL'})"
    )
    return result


# ============================================================================ summary


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def summary(args: argparse.Namespace) -> dict[str, Any]:
    """``<out>/summary.md``: every figure the check wrote, with the device and the date."""
    out = args.out
    env = read_json(out / "env.json") or {"device": device_facts()}
    facts = env["device"]
    lines = [
        f"# GPU check, {facts['date']}",
        "",
        f"Device: **{facts['device']}**"
        + (f" ({facts.get('gpu_mem_gb', 0):.0f} GB, CUDA {facts.get('cuda')})" if "cuda" in facts else "")
        + f", {facts['cpu_count']} CPU cores, host {facts['host']}. Python {facts['python']}, torch {facts['torch']}, "
        f"transformers {facts['transformers']}, deepspeed {facts.get('deepspeed')}, flash-attn "
        f"{'yes' if facts['flash_attn'] else 'no'}, liger-kernel {'yes' if facts['liger_kernel'] else 'no'}.",
        "",
    ]
    steps = out / "steps.tsv"
    if steps.is_file():
        lines += ["| step | status | seconds |", "| --- | --- | ---: |"]
        lines += [
            f"| {' | '.join(row.split(chr(9)))} |" for row in steps.read_text().splitlines() if row.strip()
        ]
        lines.append("")
    parity_result = read_json(out / "parity.json")
    if parity_result:
        lines += [
            f"## Loss parity ({parity_result['dtype']}, packed rows of {parity_result['seq_len']}, "
            f"tolerance {parity_result['tolerance']:g}): {'pass' if parity_result['pass'] else 'FAIL'}",
            "",
            f"fp32 eager reference: {parity_result['fp32_eager_loss']:.5f}",
            "",
            "| attention | loss | vs fp32 eager | packed vs separate documents |",
            "| --- | ---: | ---: | ---: |",
        ]
        for attn, c in parity_result["cases"].items():
            lines.append(
                f"| {attn} | {c['packed_loss']:.5f} | {c['vs_fp32_eager']:.2e} | {c['packed_vs_separate']:.2e} |"
            )
        lines.append("")
    resume_result = read_json(out / "resume.json")
    if resume_result:
        lines += [
            f"## Kill and resume: {'pass' if resume_result['pass'] else 'FAIL'}",
            "",
            f"SIGKILL after step {resume_result['killed_after_step']}, resumed from step "
            f"{resume_result['resumed_from_step']}: max |loss difference| {resume_result['max_loss_diff']} over "
            f"{resume_result['steps_compared']} steps (tolerance {resume_result['tolerance']:g}).",
            "",
        ]
    bench_result = read_json(out / "bench.json")
    if bench_result:
        lines += [
            "## Throughput (`bench_gpu.py bench`)",
            "",
            "| case | tokens/s | MFU | peak allocated GB | peak reserved GB | estimate GB |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in bench_result["results"]:
            if "error" in r:
                lines.append(f"| {r['case']} | {r['error']} | | | | |")
                continue
            mfu_text = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
            alloc = r.get("peak_allocated_bytes")
            reserved = r.get("peak_reserved_bytes")
            lines.append(
                f"| {r['case']} | {r['tokens_per_s']:,.0f} | {mfu_text} | "
                f"{'-' if alloc is None else f'{alloc / 1e9:.1f}'} | {'-' if reserved is None else f'{reserved / 1e9:.1f}'} | "
                f"{r['predicted_peak_bytes'] / 1e9:.1f} |"
            )
        first = next((r for r in bench_result["results"] if "error" not in r), None)
        if first:
            lines += [
                "",
                f"{first['parameters'] / 1e6:.0f}M parameters, vocabulary {first['vocab_size']:,}, rows of "
                f"{first['seq_len']}, micro-batch {first['micro_batch_size']}, {first['precision']}, "
                f"{first['timed_steps']} timed steps; MFU against {first['peak_tflops']} TFLOP/s.",
            ]
        lines.append("")
    data_result = read_json(out / "bench_data.json")
    if data_result:
        lines += ["## Data pipeline (`bench_data.py`)", "", "| data | case | tok/s |", "| --- | --- | ---: |"]
        for r in data_result["results"]:
            rate = r.get("tokens_per_s")
            lines.append(f"| {r['dataset']} | {r['case']} | {'failed' if rate is None else f'{rate:,.0f}'} |")
        for t in data_result.get("targets", []):
            lines.append(f"- {t['target']}: {t['measured']} ({'met' if t['pass'] else 'not met'})")
        lines.append("")
    path = out / "summary.md"
    path.write_text("\n".join(lines))
    print(f"wrote {path}")
    return {}


# ============================================================================ CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=("env", "bench", "parity", "resume", "summary", "child"))
    parser.add_argument("spec", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument(
        "--out", type=Path, default=REPO / "runs" / "gpu_check", help="Where JSON and runs go."
    )
    parser.add_argument("--cpu-fallback", action="store_true", help="Tiny model, fp32, on CPU (for tests).")
    parser.add_argument("--input", type=Path, default=None, help="Training text (json/jsonl/parquet).")
    parser.add_argument("--tokenizer", type=Path, default=None, help="Tokenizer dir (with --input).")
    parser.add_argument("--text-column", default="text", help="Text column of --input.")
    parser.add_argument(
        "--attn",
        default=None,
        help="bench: kernels, comma-separated (default: flash_attention_2 when importable, sdpa).",
    )
    parser.add_argument("--checkpointing", default="off,on", help="bench: gradient checkpointing settings.")
    parser.add_argument(
        "--no-plain-loss-case",
        dest="plain_loss_case",
        action="store_false",
        help="bench: skip the plain-loss case.",
    )
    parser.add_argument(
        "--seq-len", type=int, default=None, help="Row length (default 2048; 64 with --cpu-fallback)."
    )
    parser.add_argument(
        "--micro-batch-size", type=int, default=None, help="bench: rows per step (default 8; 2 on CPU)."
    )
    parser.add_argument("--steps", type=int, default=None, help="bench: timed steps (default 10; 2 on CPU).")
    parser.add_argument("--warmup", type=int, default=3, help="bench: untimed steps first.")
    parser.add_argument("--zero", type=int, default=2, help="bench: ZeRO stage.")
    parser.add_argument("--num-workers", type=int, default=1, help="bench: data.num_workers.")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="bench: peak for MFU when the device is not in the table.",
    )
    parser.add_argument(
        "--parity-tolerance",
        type=float,
        default=None,
        help="parity: max |mean loss diff| (default 2e-2 bf16, 1e-4 fp32).",
    )
    parser.add_argument("--resume-steps", type=int, default=12, help="resume: steps per run.")
    parser.add_argument("--resume-save-every", type=int, default=4, help="resume: checkpoint interval.")
    parser.add_argument("--case-timeout", type=float, default=600, help="Seconds per subprocess.")
    args = parser.parse_args(argv)
    if args.command == "child":
        print(json.dumps(run_bench_case(json.loads(args.spec))), flush=True)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    if args.command == "env":
        write_json(args.out / "env.json", {"device": device_facts()})
        return 0
    if args.command == "summary":
        summary(args)
        return 0
    import torch

    if not args.cpu_fallback and not torch.cuda.is_available():
        parser.error("no CUDA device: pass --cpu-fallback to run the CPU version")
    cpu = args.cpu_fallback
    args.seq_len = args.seq_len or (64 if cpu else 2048)
    args.micro_batch_size = args.micro_batch_size or (2 if cpu else 8)
    args.steps = args.steps or (2 if cpu else 10)
    if args.attn is None:
        flash = not cpu and importlib.util.find_spec("flash_attn") is not None
        args.attn = ["flash_attention_2", "sdpa"] if flash else ["sdpa"]
    else:
        args.attn = [a.strip() for a in args.attn.split(",")]
    args.checkpointing = [{"on": True, "off": False}[c.strip()] for c in args.checkpointing.split(",")]
    result = {"bench": bench, "parity": parity, "resume": resume}[args.command](args)
    write_json(args.out / f"{args.command}.json", result)
    failed = result.get("pass") is False or any("error" in r for r in result.get("results", []))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
