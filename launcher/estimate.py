"""``dstrain estimate``: per-GPU memory of every ZeRO setup, the cheapest that fits, time per epoch.

    dstrain estimate RECIPE --gpus N [--nodes M] [--gpu-mem GB] [--json] [--section.key value ...]
                     [--tokens-per-s X | --metrics RUN_DIR | --mfu F [--peak-tflops P]]

Memory per GPU, in bytes, by the model in :mod:`trainer.planner` (model states as DeepSpeed
0.19.8 keeps them for fp32 weights trained under ``torch_autocast``, LoRA's frozen base at its
16-bit size, autocast's 16-bit weight copies, communication buffers, and the activations autograd
saves in a Llama-family decoder, with and without gradient checkpointing); the same model sizes
``zero.stage: auto`` and ``train.micro_batch_size: auto`` at the start of a run.

Checked against a real CPU forward/backward in fp32 (``tests/unit/test_estimate.py``, peak RSS
growth; docs/benchmarks.md has the figures). The bf16 figures use the same tensors with e = 2.
A setup "fits" when its peak stays under ``USABLE_FRACTION`` of the GPU's memory (the rest: the
CUDA context, NCCL and allocator fragmentation).

Data: tokens, sequences and optimizer steps per epoch come from ``dstrain data inspect``'s
counting (:func:`trainer.data.tools.inspect`; packed rows of ``data.max_seq_len``), scaled by the
share of rows left after the trainer's validation hold-out (its own rule, counted exactly); the
ETA from a given tokens/s, a run's measured ``metrics.jsonl``, or an assumed MFU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from launcher.cli import add_placement_options
from trainer.config import JobConfig, build_config
from trainer.ds_config import PRECISIONS, resolve_precision
from trainer.errors import ConfigError, DataError, DstrainError, user_error
from trainer.flops import flops_per_token, lora_counts_for, param_counts, peak_tflops_for
from trainer.jsonl import read_jsonl
from trainer.planner import (  # noqa: F401  (re-exported: the memory model's public names)
    CHUNK_BYTES,
    CHUNKED_MODEL_TYPES,
    GB,
    LAYOUTS,
    USABLE_FRACTION,
    Fit,
    Layout,
    activation_memory,
    candidate_layouts,
    choose,
    fits_for,
    model_states,
    planned_architecture,
    resolve_attention,
    rows_per_rank,
)

DEFAULT_GPU_MEM_GB = 80.0
# The loss the trainer uses where trainer.loss.enable_chunked_loss applies.
DEFAULT_LOSS = "chunked"


def steps_shape(job: JobConfig, world: int) -> tuple[int, int]:
    """(micro-batch, accum) for counting steps; an auto micro-batch counts its rows per rank as one."""
    if job.train.micro_batch_size == "auto":
        return rows_per_rank(job, world)[0], 1
    return job.train.micro_batch_size, job.train.grad_accum


def data_section(job: JobConfig, world: int) -> dict[str, Any]:
    """Tokens and steps per epoch through ``dstrain data inspect``'s counting, or why not."""
    from trainer.data.tools import inspect, parquet_inputs
    from trainer.data.tools_io import resolve_inputs

    if not job.data.train:
        return {"available": False, "reason": "data.train is empty"}
    tokenizer_dir = Path(job.tokenizer_path)
    try:
        files = resolve_inputs(job.data.train)
        with parquet_inputs(files, job.data.text_column) as pq_files:
            report = inspect(
                pq_files,
                tokenizer_dir if tokenizer_dir.is_dir() else None,
                job.data.text_column,
                job.data.max_seq_len,
                *steps_shape(job, world),
                world,
            )
    except DataError as exc:
        return {"available": False, "reason": str(exc)}
    if "epoch" not in report:
        return {"available": False, "reason": f"token counts need a local tokenizer dir ({tokenizer_dir})"}
    epoch, rows = report["epoch"], report["rows"]
    held = 0
    if job.data.validation is None:  # the trainer's own row-level hold-out, counted exactly
        import numpy as np

        from trainer.data.sharding import held_out

        mask = held_out(np.arange(rows), job.data.validation_fraction, job.data.validation_seed)
        held = int(mask.sum())
    share = (rows - held) / rows if rows else 0.0  # tokens and steps scale with the rows trained on
    return {
        "available": True,
        "files": [str(p) for p in files],
        "rows": rows,
        "held_out_rows": held,
        "tokens": round(report["estimated_total_tokens"] * share),
        "sequences": int(epoch["sequences"] * share),
        "tokens_per_step": epoch["tokens_per_step"],
        "steps_per_epoch": int(epoch["steps"] * share),
    }


def measured_tokens_per_s(run_dir: Path) -> float:
    """The median tokens/s a run logged in metrics.jsonl (its first record, with warm-up, left out)."""
    path = run_dir / "metrics.jsonl" if run_dir.is_dir() else run_dir
    if not path.is_file():
        raise ConfigError(f"--metrics {run_dir}: no metrics.jsonl there")
    rates = []
    for record in read_jsonl(path).records:  # a torn last line (a full disk) is left out
        if record.get("tokens_per_s"):
            rates.append(float(record["tokens_per_s"]))
    if not rates:
        raise ConfigError(f"--metrics {path}: no tokens_per_s records yet; let the run log a few steps")
    return statistics.median(rates[1:] or rates)


def plan(
    job: JobConfig,
    gpus: int,
    nodes: int = 1,
    gpu_mem_gb: float = DEFAULT_GPU_MEM_GB,
    precision: str | None = None,
    loss: str | None = None,
    tokens_per_s: float | None = None,
    tokens_per_s_source: str | None = None,
    mfu: float | None = None,
    peak_tflops: float | None = None,
    with_data: bool = True,
) -> dict[str, Any]:
    """The whole estimate as a JSON-able dict (bytes, tokens, seconds).

    The ETA's tokens/s is ``tokens_per_s`` (from ``tokens_per_s_source``) or, with ``mfu``,
    ``mfu`` x ``peak_tflops`` x world / FLOPs per token.
    """
    if gpus < 1 or nodes < 1:
        raise ConfigError(f"--gpus and --nodes must be >= 1, got {gpus} and {nodes}")
    world = gpus * nodes
    precision = precision or resolve_precision(job.model.dtype, on_gpu=True)
    config, vocab_source = planned_architecture(job)
    counts = param_counts(config)
    lora = lora_counts_for(config, job.lora)
    loss = loss or (DEFAULT_LOSS if config.model_type in CHUNKED_MODEL_TYPES else "plain")
    attn = resolve_attention(job.model.attn_implementation, precision)
    usable = USABLE_FRACTION * gpu_mem_gb * GB
    seq_len = job.data.max_seq_len
    auto_micro = job.train.micro_batch_size == "auto"
    micro = 1 if auto_micro else job.train.micro_batch_size
    rows = rows_per_rank(job, world)[0] if auto_micro else micro * job.train.grad_accum
    fit_args = (job, config, world, usable, precision, attn, loss)
    fits = fits_for(*fit_args, micro)
    recommendation = recommend(fits, job, world, rows)
    if auto_micro and recommendation is not None:  # the table at the micro-batch auto would take
        micro = recommendation["micro_batch_size"]
        fits = fits_for(*fit_args, micro)
    flops = flops_per_token(config, seq_len, job.lora)
    trainable = lora.trainable if lora is not None else counts.total
    report: dict[str, Any] = {
        "model": {
            "config": job.model.name_or_path or job.model.config,
            "model_type": config.model_type,
            "parameters": counts.total,
            "trainable_parameters": trainable,
            "lora_adapter_parameters": lora.adapters if lora is not None else 0,
            "matmul_parameters": counts.matmul,
            "vocab_size": config.vocab_size,
            "vocab_source": vocab_source,
            "flops_per_token": flops,
        },
        "setup": {
            "gpus": gpus,
            "nodes": nodes,
            "world_size": world,
            "gpu_mem_gb": gpu_mem_gb,
            "usable_bytes": usable,
            "precision": precision,
            "attention": attn,
            "packed": job.data.pack,
            "loss": loss,
            "seq_len": seq_len,
            "micro_batch_size": micro,
            "grad_accum": rows // micro if auto_micro else job.train.grad_accum,
            "gradient_checkpointing": job.model.gradient_checkpointing,
        },
        "layouts": {
            ("checkpointing" if ckpt else "no_checkpointing"): [fit_json(fit) for fit in rows]
            for ckpt, rows in fits.items()
        },
        "recommendation": recommendation,
    }
    data = data_section(job, world) if with_data else {"available": False, "reason": "--no-data"}
    report["data"] = data
    if mfu is not None:
        if peak_tflops is None:
            raise ConfigError("--mfu needs a peak: pass --peak-tflops or --gpu-type (e.g. 'H100 HBM3')")
        tokens_per_s = mfu * peak_tflops * 1e12 * world / flops
        tokens_per_s_source = f"MFU {mfu:.0%} of {peak_tflops:g} TFLOP/s"
    report["time"] = time_section(job, data, tokens_per_s, tokens_per_s_source, flops, world)
    return report


def fit_json(fit: Fit) -> dict[str, Any]:
    return {
        "layout": fit.layout.name,
        **asdict(fit.layout),
        "weights": fit.states.weights,
        "gradients": fit.states.gradients,
        "optimizer": fit.states.optimizer,
        "model_states": fit.states.gpu,
        "buffers": fit.buffers,
        "autocast_copies": fit.autocast,
        "activations": fit.activations.saved,
        "recompute": fit.activations.recompute,
        "logits": fit.activations.logits,
        "activation_peak": fit.activations.peak,
        "total": fit.total,
        "host_per_rank": fit.states.host,
        "max_micro_batch_size": fit.max_micro_batch,
    }


def recommend(fits: dict[bool, list[Fit]], job: JobConfig, world: int, rows: int) -> dict[str, Any] | None:
    """What ``zero.stage: auto`` and ``train.micro_batch_size: auto`` would take
    (:func:`trainer.planner.choose`): the fastest layout that fits a useful micro-batch, without
    checkpointing before with it, and the largest micro-batch that fits and divides the recipe's
    ``rows`` per rank per step, so grad_accum makes up the rest and the global batch stays."""
    auto = JobConfig.from_dict({**job.to_dict(), "zero": {"stage": "auto"}})
    names = {layout.name for layout in candidate_layouts(auto, world)}
    candidates = {ckpt: [fit for fit in rows_ if fit.layout.name in names] for ckpt, rows_ in fits.items()}
    ckpt = job.model.gradient_checkpointing
    options = [False, True] if ckpt == "auto" else [ckpt] + ([True] if not ckpt else [])
    choice = choose(candidates, rows, job.data.max_seq_len, None, options, job.train.grad_accum)
    if choice is None:
        return None
    fit = next(f for f in fits[choice.gradient_checkpointing] if f.layout == choice.layout)
    return {
        "layout": choice.layout.name,
        **asdict(choice.layout),
        "gradient_checkpointing": choice.gradient_checkpointing,
        "micro_batch_size": choice.micro_batch_size,
        "grad_accum": choice.grad_accum,
        "max_micro_batch_size": fit.max_micro_batch,
        "reason": choice.reason,
    }


def time_section(
    job: JobConfig,
    data: dict[str, Any],
    tokens_per_s: float | None,
    source: str | None,
    flops: float,
    world: int,
) -> dict[str, Any]:
    out: dict[str, Any] = {"tokens_per_s": tokens_per_s, "source": source}
    if tokens_per_s is None:
        return out
    rows = (
        rows_per_rank(job, world)[0]
        if job.train.micro_batch_size == "auto"
        else (job.train.micro_batch_size * job.train.grad_accum)
    )
    tokens_per_step = rows * world * job.data.max_seq_len
    if job.train.max_steps is not None:
        steps = job.train.max_steps
    elif data.get("available"):
        steps = job.train.epochs * data["steps_per_epoch"]
    else:
        return out
    out.update(
        steps=steps,
        tokens=steps * tokens_per_step,
        seconds=steps * tokens_per_step / tokens_per_s,
        model_tflops_per_gpu=tokens_per_s * flops / world / 1e12,
    )
    return out


# ============================================================================ output


def _gb(value: float) -> str:
    return f"{value / GB:,.1f}"


def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    model, setup = report["model"], report["setup"]
    console.print(
        f"[bold]{model['config']}[/bold] ({model['model_type']}): {model['parameters'] / 1e9:.3f}B parameters "
        f"({model['parameters']:,}; {model['trainable_parameters']:,} trained), "
        f"vocab {model['vocab_size']:,} (from {model['vocab_source']}), "
        f"{model['flops_per_token'] / 1e9:.2f} GFLOP per token at length {setup['seq_len']}"
    )
    console.print(
        f"{setup['world_size']} GPU(s) ({setup['gpus']} x {setup['nodes']} node(s)) of {setup['gpu_mem_gb']:g} GB, "
        f"{USABLE_FRACTION:.0%} usable; {setup['precision']}, {setup['attention']}, "
        f"{'packed' if setup['packed'] else 'padded'} rows of {setup['seq_len']}, {setup['loss']} loss, "
        f"micro-batch {setup['micro_batch_size']} x accum {setup['grad_accum']}"
    )
    for key, label in (("no_checkpointing", "without"), ("checkpointing", "with")):
        rows = report["layouts"][key]
        table = Table(
            title=f"GB per GPU at micro-batch {setup['micro_batch_size']}, {label} gradient checkpointing",
            caption="columns: ZeRO stage, +oo optimizer offloaded, +op parameters offloaded; total = "
            + (
                "states + buffers + 16-bit copies + activations + max(final norm + logits, recompute)"
                if key == "checkpointing"
                else "states + buffers + 16-bit copies + activations + final norm + logits"
            ),
        )
        table.add_column("")
        for row in rows:
            table.add_column(row["layout"], justify="right")
        for field, text in (
            ("weights", "weights"),
            ("gradients", "gradients"),
            ("optimizer", "optimizer"),
            ("buffers", "buffers ~"),
            ("autocast_copies", "16-bit copies"),
            ("activations", "activations"),
            ("recompute", "recompute"),
            ("logits", "logits/loss"),
            ("total", "total"),
            ("host_per_rank", "host/rank"),
        ):
            table.add_row(
                text, *(_gb(row[field]) for row in rows), style="bold" if field == "total" else None
            )
        table.add_row("max micro", *(str(row["max_micro_batch_size"]) for row in rows))
        console.print(table)
    rec = report["recommendation"]
    if rec is None:
        console.print("[red]nothing fits[/red]: add GPUs, shorten data.max_seq_len, or use larger GPUs")
    else:
        console.print(
            f"[bold]recommended[/bold]: ZeRO-{rec['layout']}, gradient checkpointing "
            f"{'on' if rec['gradient_checkpointing'] else 'off'}, micro-batch {rec['micro_batch_size']} "
            f"x accum {rec['grad_accum']} (the same global batch; up to {rec['max_micro_batch_size']} rows fit) "
            f"(--zero.stage {rec['stage']} --zero.offload_optimizer "
            f"{str(rec['offload_optimizer']).lower()} --zero.offload_params {str(rec['offload_params']).lower()} "
            f"--model.gradient_checkpointing {str(rec['gradient_checkpointing']).lower()} "
            f"--train.micro_batch_size {rec['micro_batch_size']} --train.grad_accum {rec['grad_accum']})"
        )
    data = report["data"]
    if data.get("available"):
        console.print(
            f"data: {data['rows']:,} rows ({data['held_out_rows']:,} held out for eval), {data['tokens']:,} "
            f"tokens trained on, {data['sequences']:,} packed rows; {data['tokens_per_step']:,} tokens and "
            f"{data['steps_per_epoch']:,} optimizer steps per epoch"
        )
    else:
        console.print(f"data: not counted ({data['reason']})")
    timing = report["time"]
    if "seconds" in timing:
        console.print(
            f"time: {timing['steps']:,} steps, {timing['tokens']:,} tokens at {timing['tokens_per_s']:,.0f} tokens/s "
            f"({timing['source']}): [bold]{timing['seconds'] / 3600:,.1f} h[/bold] "
            f"({timing['model_tflops_per_gpu']:.0f} model TFLOP/s per GPU)"
        )
    elif timing["tokens_per_s"] is None:
        console.print("time: pass --tokens-per-s, --metrics RUN_DIR or --mfu for an ETA")


# ============================================================================ CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dstrain estimate",
        description="Per-GPU memory for ZeRO 0-3 with and without offload, the cheapest setup and "
        "largest micro-batch that fit, and steps and time per epoch.",
        epilog="Recipe overrides (--section.key value) apply before estimating, e.g. --data.max_seq_len 4096.",
        allow_abbrev=False,
    )
    parser.add_argument("recipe", metavar="RECIPE", help="Recipe YAML file or built-in name.")
    add_placement_options(parser, "GPUs per node.", "Nodes (default 1).", default=1, gpus_required=True)
    parser.add_argument(
        "--gpu-mem",
        type=float,
        default=None,
        metavar="GB",
        help=f"Memory per GPU in GB (default: this machine's GPU, else {DEFAULT_GPU_MEM_GB:g}).",
    )
    parser.add_argument(
        "--precision", choices=PRECISIONS, default=None, help="Default: the recipe's, on a GPU."
    )
    parser.add_argument(
        "--loss", choices=("chunked", "plain"), default=None, help=f"Default: {DEFAULT_LOSS} where supported."
    )
    rate = parser.add_mutually_exclusive_group()
    rate.add_argument(
        "--tokens-per-s", type=float, default=None, help="Global training tokens/s, for the ETA."
    )
    rate.add_argument(
        "--metrics",
        type=Path,
        default=None,
        metavar="RUN_DIR",
        help="Take tokens/s from a run's metrics.jsonl.",
    )
    rate.add_argument("--mfu", type=float, default=None, help="Assume this MFU (0-1) for the ETA.")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="Peak TFLOP/s per GPU for --mfu (default: this GPU's).",
    )
    parser.add_argument("--gpu-type", default=None, help="Device name for the --mfu peak, e.g. 'H100 SXM'.")
    parser.add_argument("--no-data", action="store_true", help="Skip counting the training data.")
    parser.add_argument(
        "--json", action="store_true", help="Print JSON (bytes, tokens, seconds) instead of tables."
    )
    return parser


def local_gpu_memory_gb() -> float | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / GB


def main(argv: list[str] | None = None) -> int:
    """``dstrain estimate``; user errors are one line and exit status 2, like the other commands."""
    from launcher.cli import resolve_recipe, split_overrides

    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    own, overrides = split_overrides(parser, argv)
    args = parser.parse_args(own)
    try:
        job = build_config(config_path=resolve_recipe(args.recipe), overrides=overrides)
        gpu_mem = args.gpu_mem or local_gpu_memory_gb() or DEFAULT_GPU_MEM_GB
        tokens_per_s, source = args.tokens_per_s, "given"
        if args.metrics is not None:
            tokens_per_s, source = measured_tokens_per_s(args.metrics), f"median of {args.metrics}"
        peak = args.peak_tflops
        if args.mfu is not None and peak is None:
            from trainer.flops import device_peak_tflops

            peak = peak_tflops_for(args.gpu_type) if args.gpu_type else device_peak_tflops()
        report = plan(
            job,
            args.gpus,
            args.nodes,
            gpu_mem,
            precision=args.precision,
            loss=args.loss,
            tokens_per_s=tokens_per_s,
            tokens_per_s_source=source,
            mfu=args.mfu,
            peak_tflops=peak,
            with_data=not args.no_data,
        )
    except DstrainError as exc:
        return user_error(exc)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
