"""``dstrain estimate``: per-GPU memory of every ZeRO setup, the cheapest that fits, time per epoch.

    dstrain estimate RECIPE --gpus N [--nodes M] [--gpu-mem GB] [--json] [--section.key value ...]
                     [--tokens-per-s X | --metrics RUN_DIR | --mfu F [--peak-tflops P]]

Memory per GPU, in bytes. Psi parameters, N data-parallel ranks (gpus x nodes), AdamW.

* **Model states** (ZeRO paper, Rajbhandari et al. 2020, sec. 3 and 5): with 16-bit training,
  2 Psi weights, 2 Psi gradients and 12 Psi optimizer state (fp32 master weights, momentum,
  variance). ZeRO-1 partitions the optimizer state (4 Psi + 12 Psi/N), ZeRO-2 the gradients too
  (2 Psi + 14 Psi/N), ZeRO-3 the weights too (16 Psi/N). fp32 training splits the same 16 Psi as
  4/4/8 (no master copy). ``offload_optimizer`` moves the optimizer state to host memory, where
  DeepSpeed's CPU Adam also keeps an fp32 gradient partition (4 Psi/N); ``offload_params``
  (ZeRO-3) moves the 16-bit weight partition there as well.
* **Buffers** (approximate; they vary with DeepSpeed's version): ZeRO-1/2 reduce and all-gather
  buckets, 2 bytes an element, 4.5x each with ``overlap_comm`` (DeepSpeed's own rule of thumb);
  ZeRO-3 the prefetch and reduce buckets plus the largest parameter, which is gathered whole.
* **Activations**, per decoder layer and token: the tensors autograd saves for backward in
  transformers' Llama/Qwen2 block. This redoes Korthikanti et al. 2022 ("Reducing Activation
  Recomputation in Large Transformer Models", sec. 4: 34 s b h per GPT layer) for RMSNorm, GQA,
  a SwiGLU MLP, no dropout, and SDPA/flash kernels that keep a log-sum-exp instead of the T x T
  scores. With ``e`` bytes per activation (2 in bf16, 4 in fp32), ``h`` hidden, ``a`` heads and
  ``k`` KV heads of width ``d``, ``f`` the MLP width::

      2 RMSNorms   2 (4 + 2e) h     fp32 input, normalised and weighted outputs (q/k/v and MLP inputs)
      attention    e a d            queries after RoPE
                   2 e k d          keys, values (2 e a d when transformers repeats them: SDPA with a
                                    mask, i.e. packed or padded rows, and eager)
                   e a d + e a d    kernel output and o_proj's input (a transposed copy; flash: one)
                   4 a              log-sum-exp (eager instead keeps the fp32 softmax and its
                                    16-bit copy: (4 + e) a T)
      SwiGLU MLP   4 e f            gate and up outputs, SiLU output, their product

  plus the final norm, (4 + 2e) h. With gradient checkpointing a layer keeps only its input
  (e h) and one layer at a time is recomputed in backward.
* **Logits**: the plain loss peaks at 12 bytes per token per vocab entry at the start of
  backward (the saved fp32 log-softmax, its gradient and the incoming one); the chunked loss
  (:mod:`trainer.loss`) at about (8 + e) x chunk tokens x vocab (one chunk's logits) plus the
  head's weight gradient accumulated in fp32, 4 x vocab x h (+ 2 x vocab x h for a chunk's
  16-bit product in bf16).
* **Peak** = saved activations + final norm + logits without checkpointing; with it, the layer
  inputs + max(final norm + logits, one recomputed layer).

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
import importlib.util
import json
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from trainer.config import JobConfig, build_config
from trainer.ds_config import (
    ALLGATHER_BUCKET_SIZE,
    REDUCE_BUCKET_SIZE,
    STAGE3_PREFETCH_BUCKET_SIZE,
    resolve_precision,
)
from trainer.errors import ConfigError, DataError, DstrainError
from trainer.flops import ParamCounts, flops_per_token, head_dim, param_counts, peak_tflops_for
from trainer.jsonl import read_jsonl

GB = 1e9
USABLE_FRACTION = 0.9
DEFAULT_GPU_MEM_GB = 80.0
MAX_MICRO_BATCH = 4096
# The loss the trainer uses where trainer.loss.enable_chunked_loss applies.
DEFAULT_LOSS = "chunked"
# Mirrors trainer.loss (not imported: that would load torch for --help).
CHUNKED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
CHUNK_BYTES = 128 * 2**20
OVERLAP_COMM_FACTOR = 4.5


@dataclass(frozen=True)
class Layout:
    """One ZeRO setup: a stage and what is offloaded to host memory."""

    stage: int
    offload_optimizer: bool = False
    offload_params: bool = False

    @property
    def name(self) -> str:
        """Short, for table headers: ``2+oo`` = ZeRO-2 with the optimizer offloaded, ``+op`` params."""
        return (
            f"{self.stage}"
            + ("+oo" if self.offload_optimizer else "")
            + ("+op" if self.offload_params else "")
        )


# Cheapest first: ZeRO-0/1/2 move as many bytes as plain data parallelism, ZeRO-3 1.5x as many,
# offloading adds PCIe traffic and a CPU optimizer step.
LAYOUTS: tuple[Layout, ...] = (
    Layout(0),
    Layout(1),
    Layout(2),
    Layout(3),
    Layout(2, offload_optimizer=True),
    Layout(3, offload_optimizer=True),
    Layout(3, offload_optimizer=True, offload_params=True),
)


@dataclass(frozen=True)
class ModelStates:
    """Per-rank bytes of the ZeRO model states on the GPU, and what offloading puts on the host."""

    weights: float
    gradients: float
    optimizer: float
    host: float

    @property
    def gpu(self) -> float:
        return self.weights + self.gradients + self.optimizer


def model_states(psi: int, world: int, layout: Layout, precision: str) -> ModelStates:
    """The ZeRO paper's model states per rank (see the module docstring)."""
    if precision == "fp32":
        weight_bytes, grad_bytes, optim_bytes = 4, 4, 8
    else:
        weight_bytes, grad_bytes, optim_bytes = 2, 2, 12
    weights = psi * weight_bytes / (world if layout.stage >= 3 else 1)
    gradients = psi * grad_bytes / (world if layout.stage >= 2 else 1)
    optimizer = psi * optim_bytes / (world if layout.stage >= 1 else 1)
    host = 0.0
    if layout.offload_optimizer:
        host += optimizer + psi * 4 / world  # CPU Adam's fp32 gradient partition
        optimizer = 0.0
    if layout.offload_params:
        host += weights
        weights = 0.0
    return ModelStates(weights, gradients, optimizer, host)


def buffer_bytes(layout: Layout, on_gpu: bool, largest_param: int) -> float:
    """DeepSpeed's communication buffers (approximate, see the module docstring)."""
    if layout.stage == 0:
        return 0.0
    if layout.stage in (1, 2):
        overlap = OVERLAP_COMM_FACTOR if on_gpu and layout.stage == 2 else 1.0
        return 2 * overlap * (REDUCE_BUCKET_SIZE + ALLGATHER_BUCKET_SIZE)
    return 2 * (STAGE3_PREFETCH_BUCKET_SIZE + REDUCE_BUCKET_SIZE + largest_param)


@dataclass(frozen=True)
class Activations:
    """Bytes of one micro-batch's activations on one GPU (see the module docstring)."""

    layer_per_token: float
    saved: float
    recompute: float
    logits: float
    peak: float


def activation_memory(
    config: Any,
    micro_batch_size: int,
    seq_len: int,
    precision: str,
    attn: str,
    packed: bool,
    checkpointing: bool,
    chunked_loss: bool,
    chunk_bytes: int = CHUNK_BYTES,
) -> Activations:
    """Saved activations and logits of a Llama-family decoder, and their peak in backward."""
    e = 4 if precision == "fp32" else 2
    h, layers = config.hidden_size, config.num_hidden_layers
    a, d = config.num_attention_heads, head_dim(config)
    k = getattr(config, "num_key_value_heads", None) or a
    f, vocab = config.intermediate_size, config.vocab_size
    tokens = micro_batch_size * seq_len
    repeated_kv = attn == "eager" or (attn == "sdpa" and packed)
    norm = (4 + 2 * e) * h
    attention = e * a * d + 2 * e * (a if repeated_kv else k) * d + e * a * d
    attention += 0 if attn == "flash_attention_2" else e * a * d
    attention += (4 + e) * a * seq_len if attn == "eager" else 4 * a
    layer = 2 * norm + attention + 4 * e * f
    final = tokens * norm
    if chunked_loss:
        rows = min(tokens, max(1, chunk_bytes // (4 * vocab)))
        logits = (8 + e) * rows * vocab + (4 if e == 4 else 6) * vocab * h
    else:
        logits = 12.0 * tokens * vocab
    if checkpointing:
        saved = layers * tokens * e * h
        recompute = tokens * layer
        peak = saved + max(final + logits, recompute)
    else:
        saved = layers * tokens * layer
        recompute = 0.0
        peak = saved + final + logits
    return Activations(layer, saved, recompute, logits, peak)


@dataclass
class Fit:
    """One layout's memory at the recipe's micro-batch, and the largest micro-batch that fits."""

    layout: Layout
    states: ModelStates
    buffers: float
    activations: Activations
    total: float
    max_micro_batch: int


def fit_layout(
    layout: Layout, counts: ParamCounts, world: int, usable: float, micro: int, act_args: dict[str, Any]
) -> Fit:
    """``layout``'s memory at micro-batch ``micro`` and the largest micro-batch under ``usable``."""
    states = model_states(counts.total, world, layout, act_args["precision"])
    buffers = buffer_bytes(layout, on_gpu=True, largest_param=max(counts.embedding, counts.lm_head))

    def total_at(micro_batch_size: int) -> tuple[float, Activations]:
        acts = activation_memory(micro_batch_size=micro_batch_size, **act_args)
        return states.gpu + buffers + acts.peak, acts

    total, acts = total_at(micro)
    max_micro = 0
    while max_micro < MAX_MICRO_BATCH and total_at(max_micro + 1)[0] <= usable:
        max_micro += 1
    return Fit(layout, states, buffers, acts, total, max_micro)


def planned_architecture(job: JobConfig) -> tuple[Any, str]:
    """The architecture the trainer would build, and where its vocabulary size came from.

    pretrain resizes the vocabulary to the tokenizer (:func:`trainer.model.build_model`); that is
    followed when the tokenizer is a local directory, else the architecture's own size is used.
    """
    from trainer.model import VOCAB_MULTIPLE, apply_overrides, load_architecture, round_up

    config = apply_overrides(load_architecture(job.model), job.model.overrides)
    tokenizer_dir = Path(job.tokenizer_path)
    if job.stage == "pretrain" and tokenizer_dir.is_dir():
        from trainer.tokenizer import load_tokenizer

        config.vocab_size = round_up(len(load_tokenizer(str(tokenizer_dir))), VOCAB_MULTIPLE)
        return config, f"tokenizer {tokenizer_dir} (rounded up to {VOCAB_MULTIPLE})"
    return config, "the architecture config"


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
                job.train.micro_batch_size,
                job.train.grad_accum,
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


def resolve_attention(requested: str, precision: str) -> str:
    """The kernel a GPU run would use: ``auto`` is flash-attention when it is installed here."""
    if requested != "auto":
        return requested
    flash = precision in ("bf16", "fp16") and importlib.util.find_spec("flash_attn") is not None
    return "flash_attention_2" if flash else "sdpa"


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
    loss = loss or (DEFAULT_LOSS if config.model_type in CHUNKED_MODEL_TYPES else "plain")
    attn = resolve_attention(job.model.attn_implementation, precision)
    usable = USABLE_FRACTION * gpu_mem_gb * GB
    seq_len, micro = job.data.max_seq_len, job.train.micro_batch_size
    act_args = {
        "config": config,
        "seq_len": seq_len,
        "precision": precision,
        "attn": attn,
        "packed": job.data.pack,
        "chunked_loss": loss == "chunked",
    }
    fits: dict[bool, list[Fit]] = {}
    for checkpointing in (False, True):
        args = {**act_args, "checkpointing": checkpointing}
        fits[checkpointing] = [fit_layout(layout, counts, world, usable, micro, args) for layout in LAYOUTS]
    recommendation = recommend(fits, job, micro)
    flops = flops_per_token(config, seq_len)
    report: dict[str, Any] = {
        "model": {
            "config": job.model.config or job.model.name_or_path,
            "model_type": config.model_type,
            "parameters": counts.total,
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
            "grad_accum": job.train.grad_accum,
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
        "activations": fit.activations.saved,
        "recompute": fit.activations.recompute,
        "logits": fit.activations.logits,
        "activation_peak": fit.activations.peak,
        "total": fit.total,
        "host_per_rank": fit.states.host,
        "max_micro_batch_size": fit.max_micro_batch,
    }


def recommend(fits: dict[bool, list[Fit]], job: JobConfig, micro: int) -> dict[str, Any] | None:
    """The first layout, cheapest first, that runs the recipe's micro-batch; else the first that
    runs any. The recipe's checkpointing setting is tried before turning checkpointing on.

    The micro-batch is the largest that fits and divides the recipe's rows per rank per optimizer
    step (micro x accum), so grad_accum makes up the rest and the global batch stays the same.
    """
    settings = [job.model.gradient_checkpointing] + ([True] if not job.model.gradient_checkpointing else [])
    rows = micro * job.train.grad_accum
    for need in (micro, 1):
        for checkpointing in settings:
            for fit in fits[checkpointing]:
                if fit.max_micro_batch >= need:
                    best = next(m for m in range(min(fit.max_micro_batch, rows), 0, -1) if rows % m == 0)
                    return {
                        "layout": fit.layout.name,
                        **asdict(fit.layout),
                        "gradient_checkpointing": checkpointing,
                        "micro_batch_size": best,
                        "grad_accum": rows // best,
                        "max_micro_batch_size": fit.max_micro_batch,
                    }
    return None


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
    tokens_per_step = job.train.micro_batch_size * job.train.grad_accum * world * job.data.max_seq_len
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
        f"[bold]{model['config']}[/bold] ({model['model_type']}): {model['parameters'] / 1e9:.3f}B parameters, "
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
                "states + buffers + activations + max(final norm + logits, recompute)"
                if key == "checkpointing"
                else "states + buffers + activations + final norm + logits"
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
    parser.add_argument("--gpus", type=int, required=True, help="GPUs per node.")
    parser.add_argument("--nodes", type=int, default=1, help="Nodes (default 1).")
    parser.add_argument(
        "--gpu-mem",
        type=float,
        default=None,
        metavar="GB",
        help=f"Memory per GPU in GB (default: this machine's GPU, else {DEFAULT_GPU_MEM_GB:g}).",
    )
    parser.add_argument(
        "--precision", choices=("bf16", "fp16", "fp32"), default=None, help="Default: the recipe's, on a GPU."
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
        print(f"dstrain: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
