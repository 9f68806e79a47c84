"""GPU checks and throughput of dstrain's real training path; every figure with the device and date.

    python scripts/bench_gpu.py bench  [--out DIR] [--systems bare,hf,dstrain-defaults,dstrain-best] [--best "zero.stage=0"]
    python scripts/bench_gpu.py parity [--out DIR]
    python scripts/bench_gpu.py syncs  [--out DIR]
    python scripts/bench_gpu.py attn   [--out DIR]
    python scripts/bench_gpu.py resume [--out DIR]
    python scripts/bench_gpu.py env|summary --out DIR     device facts / summary.md of what DIR holds
    ... --cpu-fallback     the same code on CPU: a tiny model, fp32, a few steps (what the tests run)

bench   The Qwen2.5-0.5B architecture (24 layers, hidden 896, vocabulary 151,936), rows of 2048
        tokens, micro-batch 8, bf16, one GPU, the same batches (dstrain's packed pipeline) for
        every system, one process per system: ``bare`` (a careful torch loop: fp32 master weights,
        bf16 autocast, fused AdamW, clipping, HF's loss; ``bench_host.bare_stepper``), ``hf`` (HF
        Trainer, bf16, ``adamw_torch_fused``), ``dstrain-defaults`` (the pretrain recipe's
        settings: ZeRO stage, attention, workers, loss) and ``dstrain-best`` (the defaults plus
        ``--best``), or ``dstrain:<key=value ...>`` for any other. Prints non-pad tokens/s, MFU
        (``trainer.flops``: dense bf16 peak of this device), peak memory, ``dstrain estimate``'s
        prediction and the ratios. Issue 16's targets: defaults >= 1.0x bare and >= 1.1x HF; best
        >= 1.2x bare at MFU >= 35%; peak memory within 10% of the estimate.
parity  bf16 loss of a packed micro-batch (8 rows of 4 documents, built by dstrain's packer and
        collate, fed through ``summed_loss``) under eager, SDPA, flex_attention and flash-attention
        (when importable): against fp32 eager, and per document against that document run alone
        (packing must not leak attention); a leak control shows the check can see a leak.
syncs   One dstrain ``train_step`` at the defaults under ``torch.cuda.set_sync_debug_mode("warn")``:
        the synchronising calls counted and listed by call site (issue 15: at most 2 a step).
attn    Forward + backward of the model on one packed micro-batch with sdpa, flex_attention,
        flash-attention varlen (rows flattened) and causal sdpa without boundaries: tokens/s.
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
# The script runs the tree it lives in, with or without an install (the GPU node has none; the
# worktrees here share one editable install pointing elsewhere).
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
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

# The systems ``bench`` compares on the same shape and the same batches (issue 16 item 7).
SYSTEMS = ("bare", "hf", "dstrain-defaults", "dstrain-best")
# dstrain's best settings as far as measured on CPU (scripts/bench_host.py: ZeRO-0 has the least host work;
# on one GPU the planner runs ZeRO-1/2 as ZeRO-0 anyway); override with --best when the step changes.
BEST_OVERRIDES = "zero.stage=0"


def bench_job(spec: dict[str, Any]) -> Any:
    """The pretrain recipe as a user gets it (ZeRO stage, attention ``auto``, dtype ``auto``,
    dataloader workers, loss), at the benchmark's shape: the Qwen2.5-0.5B architecture, rows of
    ``seq_len``, ``micro`` rows a step, no accumulation, no checkpointing (the issue's default
    row), then the case's own overrides (``dstrain-best``, ``dstrain:...``)."""
    from trainer.config import build_config, deep_merge, parse_overrides

    shape = {
        "output_dir": spec["output_dir"],
        "tokenizer": spec["tokenizer"],
        "model": {"overrides": TINY if spec["cpu"] else {}, "gradient_checkpointing": False},
        "data": {
            "train": [spec["input"]],
            "text_column": spec["text_column"],
            "max_seq_len": spec["seq_len"],
            "validation_fraction": 0.0,
            "buffer_size": 1000,
        },
        "schedule": {"warmup_steps": 2},
        "train": {"micro_batch_size": spec["micro"], "grad_accum": 1, "max_steps": spec["steps"]},
        "log": {"progress": False, "plot": False},
    }
    if spec["cpu"]:
        shape["model"]["dtype"] = "fp32"
    extra = parse_overrides([f"--{item}" for item in spec.get("overrides", "").split()])
    return build_config(stage="pretrain", overrides=deep_merge(shape, extra))


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
    from trainer.flops import param_counts
    from trainer.planner import Layout, activation_memory, buffer_bytes, model_states

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


class Clock:
    """Wall time and tokens from the end of the warm-up steps; syncs the GPU only at the two ends."""

    def __init__(self, warmup: int, on_gpu: bool) -> None:
        import torch

        self.warmup, self.tokens, self.started, self.seconds = warmup, 0, None, None
        self.sync = torch.cuda.synchronize if on_gpu else (lambda: None)

    def step_done(self, step: int, tokens: int) -> None:
        """After step ``step`` (0-based) of ``tokens`` non-pad tokens."""
        if step + 1 == self.warmup:
            self.sync()
            self.started = time.perf_counter()
        elif step + 1 > self.warmup:
            self.tokens += tokens

    def stop(self) -> float:
        self.sync()
        self.seconds = time.perf_counter() - self.started
        return self.tokens / self.seconds


def shared_setup(spec: dict[str, Any]) -> dict[str, Any]:
    """What every system's case shares: the job (data settings), the tokenizer, the batches of
    dstrain's own pipeline (so all systems train on the same rows), device facts."""
    import torch

    from trainer.data import build_train_data
    from trainer.dist import DistInfo
    from trainer.ds_config import resolve_precision
    from trainer.tokenizer import load_tokenizer

    dist = DistInfo.from_env()
    on_gpu = dist.device.startswith("cuda")
    from trainer.planner import plan_for_ranks

    job = bench_job(spec)
    precision = resolve_precision(job.model.dtype, on_gpu, on_gpu and torch.cuda.is_bf16_supported())
    job = plan_for_ranks(job, dist, precision)  # the recipes' auto settings, as the trainer resolves them
    tokenizer = load_tokenizer(job.tokenizer_path)
    return {
        "dist": dist,
        "on_gpu": on_gpu,
        "job": job,
        "precision": precision,
        "tokenizer": tokenizer,
        "data": lambda: build_train_data(job.data, tokenizer, dist, job.seed, job.train.micro_batch_size),
    }


def repeat(data_factory: Any) -> Any:
    while True:
        yield from data_factory()


def finish(
    out: dict[str, Any], clock: Clock, config: Any, spec: dict[str, Any], on_gpu: bool
) -> dict[str, Any]:
    import torch

    from trainer.flops import device_peak_tflops, flops_per_token, mfu

    tokens_per_s = clock.stop()
    flops = flops_per_token(config, spec["seq_len"])
    peak = device_peak_tflops(spec["peak_tflops"]) if on_gpu else None
    out.update(
        micro_batch_size=spec["micro"],
        seq_len=spec["seq_len"],
        vocab_size=config.vocab_size,
        timed_steps=spec["steps"] - spec["warmup"],
        tokens_per_s=tokens_per_s,
        flops_per_token=flops,
        peak_tflops=peak,
        mfu=mfu(tokens_per_s, flops, 1, peak),
    )
    if on_gpu:
        out.update(
            peak_allocated_bytes=torch.cuda.max_memory_allocated(),
            peak_reserved_bytes=torch.cuda.max_memory_reserved(),
        )
    return out


def run_dstrain_case(spec: dict[str, Any]) -> dict[str, Any]:
    """dstrain in this process: everything the trainer builds, ``train_step`` timed."""
    import torch

    from trainer.dist import init_distributed
    from trainer.ds_config import build_ds_config
    from trainer.engine import build_engine
    from trainer.model import build_model
    from trainer.train_module import TrainModule

    s = shared_setup(spec)
    init_distributed(s["dist"])
    job, precision, on_gpu = s["job"], s["precision"], s["on_gpu"]
    loss_kind = job.model.loss
    job.model.loss = "plain"  # the chunked head goes on after the embeddings are resized
    ds_config = build_ds_config(job, precision, on_gpu)
    model = build_model(job, s["tokenizer"], precision, on_gpu, ds_config)
    if spec["vocab_size"] and model.config.vocab_size < spec["vocab_size"]:
        model.resize_token_embeddings(spec["vocab_size"])  # the real vocabulary's compute
    chunked = use_loss(model, loss_kind)
    job.model.loss = loss_kind
    engine = build_engine(job, model, ds_config, spec["steps"])
    module = TrainModule(engine, s["dist"])
    stream = repeat(s["data"])
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    clock, losses = Clock(spec["warmup"], on_gpu), []
    for step in range(spec["steps"]):
        loss, step_tokens = local_step(module, [next(stream)])
        losses.append(loss)
        clock.step_done(step, step_tokens)
    out = {
        "attn": model.config._attn_implementation,
        "zero_stage": job.zero.stage,
        "checkpointing": job.model.gradient_checkpointing,
        "num_workers": job.data.num_workers,
        "loss_path": "chunked" if chunked else "plain",
        "precision": precision,
        "parameters": sum(p.numel() for p in model.parameters()),
        "losses": losses,
        "predicted_peak_bytes": predicted_bytes(job, model.config, precision, chunked),
    }
    return finish(out, clock, model.config, spec, on_gpu)


def reference_model(spec: dict[str, Any], vocab: int, on_gpu: bool) -> Any:
    """The same architecture from transformers alone (the preset's config.json), fp32 weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(REPO / "trainer" / "presets" / "qwen2.5-0.5b.json")
    for key, value in (TINY if spec["cpu"] else {}).items():
        setattr(config, key, value)
    config.vocab_size, config.use_cache = vocab, False
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    return model.to("cuda" if on_gpu else "cpu")


def run_reference_case(spec: dict[str, Any]) -> dict[str, Any]:
    """``bare``: the careful torch loop of ``bench_host.py`` (fp32 master weights, bf16 autocast,
    fused AdamW, clipping, HF's loss). ``hf``: HF Trainer (bf16, ``adamw_torch_fused``). Both on
    the rows dstrain's pipeline gives, SDPA, no dstrain code in the step."""
    import torch
    from bench_host import bare_stepper, hf_training_args
    from transformers import Trainer, TrainerCallback, default_data_collator

    from trainer.train_module import token_count

    s = shared_setup(spec)
    on_gpu, precision = s["on_gpu"], s["precision"]
    stream = repeat(s["data"])
    keys = ("input_ids", "labels", "position_ids")
    batches = [
        {k: b[k] for k in keys} | {"tokens": token_count(b)}
        for b in (next(stream) for _ in range(spec["steps"]))
    ]
    vocab = max(spec["vocab_size"] or 0, -(-len(s["tokenizer"]) // 64) * 64)
    model = reference_model(spec, vocab, on_gpu)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    clock = Clock(spec["warmup"], on_gpu)
    if spec["system"] == "bare":
        step = bare_stepper(precision, spec["steps"], model)
        losses = []
        for i, b in enumerate(batches):
            losses.append(step(b))
            clock.step_done(i, b["tokens"])
        losses = [float(x) for x in losses]
    else:

        class Timer(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                clock.step_done(state.global_step - 1, batches[state.global_step - 1]["tokens"])

        rows = [{k: b[k][r] for k in keys} for b in batches for r in range(spec["micro"])]
        args = hf_training_args(
            spec["output_dir"], spec["steps"], spec["micro"], precision, use_cpu=not on_gpu
        )
        Trainer(
            model=model,
            args=args,
            train_dataset=rows,
            data_collator=default_data_collator,
            callbacks=[Timer()],
        ).train()
        losses = []
    out = {
        "attn": "sdpa",
        "precision": precision,
        "parameters": sum(p.numel() for p in model.parameters()),
        "losses": losses,
    }
    return finish(out, clock, model.config, spec, on_gpu)


def system_overrides(system: str, args: argparse.Namespace) -> str:
    """A dstrain case's overrides: none at its defaults, ``--best`` at its best settings,
    ``dstrain:<key=value ...>`` for any other."""
    if system == "dstrain-best":
        return args.best
    if system.startswith("dstrain:"):
        return system.split(":", 1)[1]
    return ""


def bench(args: argparse.Namespace) -> dict[str, Any]:
    sources = data_sources(args)
    results = []
    for i, system in enumerate(args.systems):
        spec = {
            **sources,
            "system": system,
            "overrides": system_overrides(system, args),
            "cpu": args.cpu_fallback,
            "seq_len": args.seq_len,
            "micro": args.micro_batch_size,
            "steps": args.warmup + args.steps,
            "warmup": args.warmup,
            "vocab_size": None if args.cpu_fallback else QWEN_VOCAB,
            "peak_tflops": args.peak_tflops,
            "output_dir": str(args.out / "bench-run" / f"case{i}"),
        }
        name = (
            system
            if not spec["overrides"] or system.startswith("dstrain:")
            else f"{system} ({spec['overrides']})"
        )
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
        result = {"case": name, "system": system, **json.loads(proc.stdout.strip().splitlines()[-1])}
        results.append(result)
        print(format_bench_row(result), flush=True)
    ratios = bench_ratios(results)
    for line in ratios["lines"]:
        print(line)
    return {"device": device_facts(), "data": sources, "results": results, "ratios": ratios["values"]}


def bench_ratios(results: list[dict[str, Any]]) -> dict[str, Any]:
    """tokens/s of every case against the bare loop's and HF Trainer's (issue 16's targets:
    defaults >= 1.0x bare and >= 1.1x HF; best >= 1.2x bare at MFU >= 35%)."""
    rate = {r["system"]: r["tokens_per_s"] for r in results if "error" not in r}
    values, lines = {}, []
    for r in results:
        if "error" in r or r["system"] in ("bare", "hf"):
            continue
        row = {base: rate[r["system"]] / rate[base] for base in ("bare", "hf") if base in rate}
        values[r["case"]] = row
        lines.append(f"{r['case']}: " + ", ".join(f"x{v:.2f} {k}" for k, v in row.items()))
    if "bare" in rate and "hf" in rate:
        values["hf"] = {"bare": rate["hf"] / rate["bare"]}
        lines.append(f"hf: x{values['hf']['bare']:.2f} bare")
    return {"values": values, "lines": lines}


def format_bench_row(r: dict[str, Any]) -> str:
    mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
    memory = ""
    if "peak_allocated_bytes" in r:
        estimate = f" (estimate {r['predicted_peak_bytes'] / 1e9:.1f})" if "predicted_peak_bytes" in r else ""
        memory = (
            f", peak {r['peak_allocated_bytes'] / 1e9:.1f} GB allocated / {r['peak_reserved_bytes'] / 1e9:.1f} reserved"
            + estimate
        )
    return f"{r['case']}: {r['tokens_per_s']:,.0f} tokens/s, MFU {mfu}{memory}"


# ============================================================================ parity

PARITY_KERNELS = ("eager", "sdpa", "flex_attention", "flash_attention_2")


def packed_rows(
    vocab: int, rows: int, seq: int, docs_per_row: int, pad_id: int
) -> tuple[dict[str, Any], list[Any]]:
    """A micro-batch of ``rows`` packed rows built by dstrain's own packer and collate (so whatever
    they hand the model, the check feeds it too), and the documents, in order."""
    import numpy as np

    from trainer.data.packing import Packer, collate

    rng = np.random.default_rng(0)
    docs = []
    for _ in range(rows):
        cuts = np.sort(rng.choice(np.arange(8, seq - 8), docs_per_row - 1, replace=False))
        for length in np.diff([0, *cuts.tolist(), seq]):
            docs.append((len(docs), rng.integers(1, vocab, int(length)).astype(np.int32), None))
    queue = iter(docs)
    packer = Packer(seq, pad_id)
    packed = [packer.next_row(lambda: next(queue, None)) for _ in range(rows)]
    return collate(packed, rows, pad_id, True, seq), docs


def single_document(doc: Any, pad_id: int) -> dict[str, Any]:
    from trainer.data.packing import chunk_row, collate

    return collate([chunk_row(doc)], 1, pad_id, True, len(doc[1]))


def parity(args: argparse.Namespace) -> dict[str, Any]:
    """Each kernel's loss on packed rows against the same documents run one by one (the packing
    must keep them apart), and against fp32 eager. A leak control calibrates the check: the same
    rows with an all-ones attention_mask (causal attention over the whole row, positions still
    restarting: what flash-attention did with more than one row) must land far from the documents
    run alone, else the check could not see a leak."""
    import torch

    from trainer.loss import summed_loss
    from trainer.tokenizer import load_tokenizer

    sources = data_sources(args)
    on_gpu = torch.cuda.is_available() and not args.cpu_fallback
    device = "cuda" if on_gpu else "cpu"
    dtype = "bf16" if on_gpu else "fp32"
    tokenizer = load_tokenizer(sources["tokenizer"])
    seq, rows = args.seq_len, args.parity_rows or (8 if on_gpu else 4)
    results: dict[str, Any] = {
        "device": device_facts(),
        "dtype": dtype,
        "seq_len": seq,
        "rows": rows,
        "cases": {},
    }

    def model_with(attn: str, precision: str) -> Any:
        """The same seeded weights every time, with ``attn`` as the attention kernel."""
        model = kernel_model(sources["tokenizer"], tokenizer, attn, precision, on_gpu, args.cpu_fallback)
        torch_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        return model.to(device=device, dtype=torch_dtype).eval()

    def loss_sum(model: Any, batch: dict[str, Any]) -> float:
        with torch.no_grad():
            return float(summed_loss(model, batch, device))

    reference = model_with("eager", "fp32")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batch, docs = packed_rows(reference.config.vocab_size, rows, seq, 4, pad_id)
    targets = int((batch["labels"][:, 1:] != -100).sum())
    ref_sum = loss_sum(reference, batch)
    del reference
    kernels = [k for k in args.parity_kernels if k != "flash_attention_2" or flash_importable(on_gpu)]
    for attn in kernels:
        try:
            model = model_with(attn, dtype)
            packed_sum = loss_sum(model, batch)
            leaky = dict(batch, attention_mask=torch.ones_like(batch["input_ids"]))
            # Per document: the packed rows' loss on that document's targets alone (the forward is
            # the same, the labels select), against the document run alone; mean loss per target.
            worst, worst_leak = 0.0, 0.0
            for doc in docs:
                only = batch["doc_ids"] == doc[0]
                labels = batch["labels"].masked_fill(~only, -100)
                n = int((labels[:, 1:] != -100).sum())
                if n == 0:
                    continue
                alone = loss_sum(model, single_document(doc, pad_id))
                worst = max(worst, abs(loss_sum(model, dict(batch, labels=labels)) - alone) / n)
                worst_leak = max(worst_leak, abs(loss_sum(model, dict(leaky, labels=labels)) - alone) / n)
        except Exception as exc:  # a kernel this torch/transformers cannot run is a finding, not a crash
            results["cases"][attn] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            print(f"parity {attn:18s} ERROR {results['cases'][attn]['error']}")
            continue
        results["cases"][attn] = {
            "kernel": model.config._attn_implementation,  # what transformers actually runs
            "packed_loss": packed_sum / targets,
            "vs_fp32_eager": abs(packed_sum - ref_sum) / targets,
            "packed_vs_separate": worst,
            "leak_vs_separate": worst_leak,
        }
        del model
    tolerance = args.parity_tolerance or (2e-2 if dtype == "bf16" else 1e-4)
    results["tolerance"] = tolerance
    results["fp32_eager_loss"] = ref_sum / targets
    ok = [c for c in results["cases"].values() if "error" not in c]
    results["pass"] = (
        bool(ok)
        and all(
            c["vs_fp32_eager"] <= tolerance
            and c["packed_vs_separate"] <= tolerance
            and c["packed_vs_separate"] * 4 < c["leak_vs_separate"]
            for c in ok
        )
        and all(k in results["cases"] and "error" not in results["cases"][k] for k in ("eager", "sdpa"))
    )
    for attn, c in results["cases"].items():
        if "error" in c:
            continue
        print(
            f"parity {attn:18s} loss {c['packed_loss']:.5f}  |vs fp32 eager| {c['vs_fp32_eager']:.2e}  "
            f"worst document |packed vs alone| {c['packed_vs_separate']:.2e}  (with a leak: {c['leak_vs_separate']:.2e})"
        )
    print(f"parity: {'pass' if results['pass'] else 'FAIL'} (tolerance {tolerance:g}, {rows} rows of {seq})")
    return results


def kernel_model(
    tokenizer_path: str, tokenizer: Any, attn: str, precision: str, on_gpu: bool, tiny: bool
) -> Any:
    """``build_model`` with ``attn``; a kernel the config does not (yet) accept, such as
    flex_attention, is set on the built model through transformers."""
    from trainer.config import build_config
    from trainer.errors import ConfigError
    from trainer.model import build_model

    def job_with(kernel: str) -> Any:
        model = {
            "overrides": TINY if tiny else {},
            "attn_implementation": kernel,
            "gradient_checkpointing": False,
        }
        return build_config(base={"tokenizer": tokenizer_path, "model": model})

    try:
        return build_model(job_with(attn), tokenizer, precision, on_gpu)
    except ConfigError:
        model = build_model(job_with("sdpa"), tokenizer, precision, on_gpu)
        model.set_attn_implementation(attn)
        return model


def flash_importable(on_gpu: bool) -> bool:
    return on_gpu and importlib.util.find_spec("flash_attn") is not None


# ============================================================================ syncs


def run_sync_case(spec: dict[str, Any]) -> dict[str, Any]:
    """dstrain at its defaults: two warm-up steps, then one ``train_step`` under
    ``torch.cuda.set_sync_debug_mode("warn")``; every synchronising call is counted and listed by
    the innermost frame outside torch (where in dstrain or DeepSpeed it was asked for)."""
    import traceback
    import warnings

    import torch

    from trainer.dist import init_distributed
    from trainer.ds_config import build_ds_config
    from trainer.engine import build_engine
    from trainer.model import build_model
    from trainer.train_module import TrainModule, target_count

    s = shared_setup(spec)
    init_distributed(s["dist"])
    job, precision, on_gpu = s["job"], s["precision"], s["on_gpu"]
    ds_config = build_ds_config(job, precision, on_gpu)
    model = build_model(job, s["tokenizer"], precision, on_gpu, ds_config)
    module = TrainModule(build_engine(job, model, ds_config, spec["steps"]), s["dist"])
    stream = repeat(s["data"])
    for step in range(2):
        b = next(stream)
        module.train_step([b], target_count(b), step)
    b = next(stream)
    targets = target_count(b)  # host tensors: no device sync
    torch_dir = str(Path(torch.__file__).parent)
    sites: dict[str, int] = {}

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if not f.filename.startswith(torch_dir)]
        frames = [f for f in frames if "warnings" not in Path(f.filename).name]
        where = " <- ".join(f"{short_path(f.filename)}:{f.lineno} {f.name}" for f in reversed(frames[-3:]))
        sites[where] = sites.get(where, 0) + 1

    out: dict[str, Any] = {
        "precision": precision,
        "zero_stage": job.zero.stage,
        "attn": model.config._attn_implementation,
    }
    if not on_gpu:
        module.train_step([b], targets, 2)
        return {**out, "skipped": "no CUDA device: sync debug mode needs one", "syncs": 0, "sites": {}}
    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            module.train_step([b], targets, 2)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    ordered = dict(sorted(sites.items(), key=lambda kv: -kv[1]))
    return {**out, "syncs": sum(sites.values()), "sites": ordered}


def short_path(path: str) -> str:
    for marker in ("/site-packages/", "/dist-packages/", f"{REPO}/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def syncs(args: argparse.Namespace) -> dict[str, Any]:
    spec = {
        **data_sources(args),
        "system": "syncs",
        "overrides": args.sync_overrides,
        "cpu": args.cpu_fallback,
        "seq_len": args.seq_len,
        "micro": args.micro_batch_size,
        "steps": 3,
        "warmup": 2,
        "vocab_size": None,
        "peak_tflops": None,
        "output_dir": str(args.out / "syncs-run"),
    }
    proc = subprocess.run(
        [sys.executable, __file__, "child", json.dumps(spec)],
        env=single_rank_env(29390),
        capture_output=True,
        text=True,
        timeout=args.case_timeout,
    )
    if proc.returncode != 0:
        print((proc.stdout + proc.stderr)[-3000:])
        return {"device": device_facts(), "error": f"exit {proc.returncode}", "pass": False}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(
        f"syncs in one train_step ({result['precision']}, ZeRO-{result['zero_stage']}, {result['attn']}): {result['syncs']}"
        + (f" ({result['skipped']})" if "skipped" in result else "")
    )
    for where, count in result["sites"].items():
        print(f"  {count:4d}  {where}")
    # Issue 15: at most two per optimizer step outside log steps.
    return {"device": device_facts(), **result, "pass": "skipped" in result or result["syncs"] <= 2}


# ============================================================================ attention kernels on packed rows

ATTN_CASES = ("sdpa", "flex_attention", "flash_attention_2-varlen", "sdpa-causal")


def attn_speed(args: argparse.Namespace) -> dict[str, Any]:
    """Forward + backward of the model (no optimizer) on one packed micro-batch, per kernel:
    ``sdpa`` (transformers turns the restarting position_ids into a dense block-diagonal mask),
    ``flex_attention`` (a document BlockMask from the same position ids), ``flash_attention_2-varlen``
    (the rows flattened into one, which transformers' flash path splits at the restarts), and
    ``sdpa-causal`` (positions 0..T-1, no document boundaries: wrong for packing, the speed a
    kernel that ignores them would reach). Tokens/s from the median of the timed repeats."""
    import statistics

    import torch

    from trainer.tokenizer import load_tokenizer

    sources = data_sources(args)
    on_gpu = torch.cuda.is_available() and not args.cpu_fallback
    device = "cuda" if on_gpu else "cpu"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    tokenizer = load_tokenizer(sources["tokenizer"])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    cases = args.attn_cases or (list(ATTN_CASES) if on_gpu else ["sdpa", "sdpa-causal"])
    result: dict[str, Any] = {
        "device": device_facts(),
        "rows": args.micro_batch_size,
        "seq_len": args.seq_len,
        "cases": {},
    }
    batch = None
    for case in cases:
        kernel = case.split("-")[0]
        if kernel == "flash_attention_2" and not flash_importable(on_gpu):
            result["cases"][case] = {"error": "flash_attn is not importable"}
            continue
        try:
            precision = "bf16" if on_gpu else "fp32"
            model = kernel_model(
                sources["tokenizer"], tokenizer, kernel, precision, on_gpu, args.cpu_fallback
            )
            model = model.to(device=device, dtype=dtype)
            if batch is None:
                batch, _ = packed_rows(
                    model.config.vocab_size, args.micro_batch_size, args.seq_len, 8, pad_id
                )
            inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
            if case.endswith("-varlen"):
                inputs = {k: v.reshape(1, -1) for k, v in inputs.items()}
            elif case.endswith("-causal"):
                inputs["position_ids"] = torch.arange(args.seq_len).expand_as(batch["input_ids"])
            inputs = {k: v.to(device) for k, v in inputs.items()}
            seconds = []
            for i in range(args.warmup + args.attn_repeats):
                if on_gpu:
                    torch.cuda.synchronize()
                started = time.perf_counter()
                logits = model(**inputs, use_cache=False).logits
                logits.float().sum().backward()
                del logits
                if on_gpu:
                    torch.cuda.synchronize()
                if i >= args.warmup:
                    seconds.append(time.perf_counter() - started)
                model.zero_grad(set_to_none=True)
            median = statistics.median(seconds)
            result["cases"][case] = {"tokens_per_s": batch["input_ids"].numel() / median, "median_s": median}
            print(
                f"attn {case:26s} {result['cases'][case]['tokens_per_s']:12,.0f} tokens/s (fwd+bwd, median {median * 1e3:.1f} ms)"
            )
            del model
        except Exception as exc:  # a kernel this torch/transformers cannot run is a finding, not a crash
            result["cases"][case] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            print(f"attn {case:26s} ERROR {result['cases'][case]['error']}")
    return result


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
            "gradient_checkpointing": False,
            "dtype": "fp32" if args.cpu_fallback else "bf16",
        },
        "data": {
            "train": [sources["input"]],
            "text_column": sources["text_column"],
            "max_seq_len": 128 if args.cpu_fallback else 256,
            "num_workers": 1,
            "validation_fraction": 0.0,
        },
        "optim": {"lr": 1e-3},
        "schedule": {"warmup_steps": 3},
        "train": {
            "micro_batch_size": 2 if args.cpu_fallback else 4,
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
            f"## Loss parity ({parity_result['dtype']}, {parity_result.get('rows', 2)} packed rows of "
            f"{parity_result['seq_len']}, tolerance {parity_result['tolerance']:g}): "
            f"{'pass' if parity_result['pass'] else 'FAIL'}",
            "",
            f"fp32 eager reference: {parity_result['fp32_eager_loss']:.5f}",
            "",
            "| attention | loss | vs fp32 eager | worst document, packed vs alone | the same with a leak |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for attn, c in parity_result["cases"].items():
            if "error" in c:
                lines.append(f"| {attn} | {c['error']} | | | |")
                continue
            lines.append(
                f"| {attn} | {c['packed_loss']:.5f} | {c['vs_fp32_eager']:.2e} | {c['packed_vs_separate']:.2e} | "
                f"{c.get('leak_vs_separate', float('nan')):.2e} |"
            )
        lines.append("")
    sync_result = read_json(out / "syncs.json")
    if sync_result and "syncs" in sync_result:
        lines += [
            f"## Host syncs in one `train_step` ({sync_result['precision']}, ZeRO-{sync_result['zero_stage']}, "
            f"{sync_result['attn']}): {sync_result['syncs']}"
            + (f" ({sync_result['skipped']})" if "skipped" in sync_result else ""),
            "",
        ]
        lines += [f"- {count} x `{where}`" for where, count in sync_result["sites"].items()]
        lines.append("")
    attn_result = read_json(out / "attn.json")
    if attn_result:
        lines += [
            f"## Attention kernels on packed rows ({attn_result['rows']} x {attn_result['seq_len']}, forward + backward)",
            "",
            "| kernel | tokens/s |",
            "| --- | ---: |",
        ]
        for case, c in attn_result["cases"].items():
            lines.append(f"| {case} | {c['error'] if 'error' in c else format(c['tokens_per_s'], ',.0f')} |")
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
            estimate = r.get("predicted_peak_bytes")
            lines.append(
                f"| {r['case']} | {r['tokens_per_s']:,.0f} | {mfu_text} | "
                f"{'-' if alloc is None else f'{alloc / 1e9:.1f}'} | {'-' if reserved is None else f'{reserved / 1e9:.1f}'} | "
                f"{'-' if estimate is None else f'{estimate / 1e9:.1f}'} |"
            )
        for case, row in bench_result.get("ratios", {}).items():
            lines.append("")
            lines.append(f"- {case}: " + ", ".join(f"x{v:.2f} {k}" for k, v in row.items()))
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
    parser.add_argument(
        "command", choices=("env", "bench", "parity", "syncs", "attn", "resume", "summary", "child")
    )
    parser.add_argument("spec", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument(
        "--out", type=Path, default=REPO / "runs" / "gpu_check", help="Where JSON and runs go."
    )
    parser.add_argument("--cpu-fallback", action="store_true", help="Tiny model, fp32, on CPU (for tests).")
    parser.add_argument("--input", type=Path, default=None, help="Training text (json/jsonl/parquet).")
    parser.add_argument("--tokenizer", type=Path, default=None, help="Tokenizer dir (with --input).")
    parser.add_argument("--text-column", default="text", help="Text column of --input.")
    parser.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help="bench: comma-separated, from bare, hf, dstrain-defaults, dstrain-best, dstrain:<key=value ...>.",
    )
    parser.add_argument(
        "--best",
        default=BEST_OVERRIDES,
        help="bench: dstrain-best's overrides of the defaults, space-separated key=value.",
    )
    parser.add_argument(
        "--sync-overrides", default="", help="syncs: overrides of the defaults, space-separated key=value."
    )
    parser.add_argument(
        "--parity-kernels",
        default=",".join(PARITY_KERNELS),
        help="parity: attention kernels (flash_attention_2 only when importable on a GPU).",
    )
    parser.add_argument("--parity-rows", type=int, default=None, help="parity: rows (default 8; 4 on CPU).")
    parser.add_argument(
        "--attn-cases",
        default=None,
        help=f"attn: comma-separated from {', '.join(ATTN_CASES)} (default all on a GPU).",
    )
    parser.add_argument("--attn-repeats", type=int, default=5, help="attn: timed forward+backward passes.")
    parser.add_argument(
        "--seq-len", type=int, default=None, help="Row length (default 2048; 64 with --cpu-fallback)."
    )
    parser.add_argument(
        "--micro-batch-size", type=int, default=None, help="bench: rows per step (default 8; 2 on CPU)."
    )
    parser.add_argument("--steps", type=int, default=None, help="bench: timed steps (default 10; 2 on CPU).")
    parser.add_argument("--warmup", type=int, default=3, help="bench: untimed steps first.")
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
    parser.add_argument("--resume-steps", type=int, default=8, help="resume: steps per run.")
    parser.add_argument("--resume-save-every", type=int, default=3, help="resume: checkpoint interval.")
    parser.add_argument("--case-timeout", type=float, default=600, help="Seconds per subprocess.")
    args = parser.parse_args(argv)
    if args.command == "child":
        spec = json.loads(args.spec)
        run = {"bare": run_reference_case, "hf": run_reference_case, "syncs": run_sync_case}.get(
            spec["system"], run_dstrain_case
        )
        print(json.dumps(run(spec)), flush=True)
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
    args.systems = [x.strip() for x in args.systems.split(",") if x.strip()]
    args.parity_kernels = [k.strip() for k in args.parity_kernels.split(",") if k.strip()]
    args.attn_cases = args.attn_cases and [c.strip() for c in args.attn_cases.split(",")]
    commands = {"bench": bench, "parity": parity, "syncs": syncs, "attn": attn_speed, "resume": resume}
    result = commands[args.command](args)
    write_json(args.out / f"{args.command}.json", result)
    failed = result.get("pass") is False or any("error" in r for r in result.get("results", []))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
