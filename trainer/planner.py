"""The memory model behind ``dstrain estimate``, and the planner that resolves ``auto`` settings.

Memory per GPU, in bytes. Psi parameters, N data-parallel ranks, AdamW. Read off DeepSpeed
0.19.8 (``runtime/zero/stage_1_and_2.py``, ``stage3.py``, ``engine.py``) for the way dstrain
trains: fp32 parameters in every precision, bf16/fp16 under DeepSpeed's ``torch_autocast``, so
gradients are fp32 and accumulate in fp32 at every stage.

* **Trainable weights**, bytes per parameter::

      ZeRO   weights  gradients  fp32 master   Adam (m, v)   total
      0      4        4          -             8             16
      1      4        4          4/N           8/N           8 + 12/N
      2      4        4/N        4/N           8/N           4 + 16/N
      3      4/N      4/N        4/N           8/N           20/N

  ZeRO-1/2 keep ``single_partition_of_fp32_groups``, a copy of the rank's partition
  (``.detach().clone()``, even when the weights are fp32 already). ZeRO-3 means to step its fp32
  partition in place when the dtypes match, but its test compares a ``torch.device`` with the
  string ``current_device_name()`` (``torch.device("cuda:0") == "cuda:0"`` is False), so it
  clones too. Measured on one CPU rank after backward, before the step (bytes of distinct fp32
  storages per parameter): ZeRO-0 16.0, ZeRO-1 20.0, ZeRO-2 20.0, ZeRO-3 20.0 (five fp32
  buffers the model's size: weights, gradients, master, m, v). ``offload_optimizer`` moves the master and Adam state to host memory, plus CPU Adam's
  fp32 gradient partition (4/N); ``offload_params`` (ZeRO-3) moves the weight partition too.
* **Frozen weights** (LoRA's base): their 16-bit copy only (4 bytes in fp32 runs), no
  gradient, no optimizer state; partitioned at ZeRO-3, which partitions every parameter.
* **Autocast copies** (bf16/fp16): autocast casts each trainable weight of a matmul to 16 bits
  for the forward and autograd keeps that copy for the backward: 2 bytes per weight of the layers
  alive between forward and backward (all of them; one recomputed layer with checkpointing),
  whole even at ZeRO-3 (the copy is made from the gathered weight).
* **Buffers** (approximate): ZeRO-1/2 reduce and all-gather buckets of fp32 elements, 4.5x each
  with ``overlap_comm`` (DeepSpeed's rule of thumb); ZeRO-3 the prefetch and reduce buckets plus
  the largest parameter, gathered whole. DeepSpeed sends nn.Linear gradients in 16 bits
  (``comm_dtype``) and the rest in fp32: that halves the traffic, not these buffers.
* **Activations**, per decoder layer and token: see :func:`activation_memory`.

The planner (:func:`choose`) walks the layouts fastest first (ZeRO-0 on one GPU, then 1, 2, 3,
offload last: fewest and smallest collectives first) and takes the first whose peak fits
``USABLE_FRACTION`` of the GPU at a useful micro-batch, without gradient checkpointing before
with it. Importing this module needs neither torch nor transformers.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.ds_config import ALLGATHER_BUCKET_SIZE, REDUCE_BUCKET_SIZE, STAGE3_PREFETCH_BUCKET_SIZE
from trainer.errors import ConfigError
from trainer.flops import LoraCounts, ParamCounts, head_dim

GB = 1e9
USABLE_FRACTION = 0.9
MAX_MICRO_BATCH = 4096
# Mirrors trainer.loss (not imported: that would load torch for --help).
CHUNKED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
CHUNK_BYTES = 128 * 2**20
OVERLAP_COMM_FACTOR = 4.5
# An auto micro-batch must hold at least this many tokens (or the whole per-rank batch) for a
# layout to count as fitting: below it a GPU's matmuls are too small to be fast, and a slower
# layout with a larger micro-batch wins.
MIN_MICRO_TOKENS = 8192
# CPU ranks: memory is rarely the limit of a model one trains on a CPU, so the choice is fixed.
CPU_MAX_MICRO_BATCH = 8


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


# Fastest first: ZeRO-0/1/2 move as many bytes as plain data parallelism (ZeRO-0 and 1 in fewer
# collectives), ZeRO-3 1.5x as many, offloading adds PCIe traffic and a CPU optimizer step.
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
    """Per-rank bytes of the model states on the GPU, and what offloading puts on the host."""

    weights: float
    gradients: float
    optimizer: float
    host: float

    @property
    def gpu(self) -> float:
        return self.weights + self.gradients + self.optimizer


def model_states(
    psi: int, world: int, layout: Layout, precision: str, trainable: int | None = None
) -> ModelStates:
    """Model states per rank (see the module docstring); ``trainable`` of the ``psi`` weights
    train (all by default), the rest are frozen."""
    trainable = psi if trainable is None else trainable
    frozen = psi - trainable
    n = world
    # A frozen base loads in the run's 16-bit dtype, except under ZeRO-3, whose zero.Init casts
    # every parameter to fp32 as it partitions (trainer.model.frozen_base_dtype).
    frozen_bytes = 4 if precision == "fp32" or layout.stage >= 3 else 2
    weights = (4 * trainable + frozen_bytes * frozen) / (n if layout.stage >= 3 else 1)
    gradients = 4 * trainable / (n if layout.stage >= 2 else 1)
    master = 4 * trainable / n if layout.stage >= 1 else 0.0
    adam = 8 * trainable / (n if layout.stage >= 1 else 1)
    optimizer, host = master + adam, 0.0
    if layout.offload_optimizer:
        host += optimizer + 4 * trainable / n  # CPU Adam's fp32 gradient partition
        optimizer = 0.0
    if layout.offload_params:
        host += weights
        weights = 0.0
    return ModelStates(weights, gradients, optimizer, host)


def autocast_copies(
    counts: ParamCounts, lora: LoraCounts | None, precision: str, checkpointing: bool
) -> float:
    """16-bit copies autocast makes of trainable matmul weights and autograd keeps for backward."""
    if precision == "fp32":
        return 0.0
    if lora is not None:  # the frozen base is 16-bit already; adapters are cast
        return 2.0 * (lora.adapters + lora.saved_matmul)
    alive = counts.layer_matmul * (1 if checkpointing else counts.num_layers)
    return 2.0 * (alive + counts.lm_head)


def buffer_bytes(layout: Layout, on_gpu: bool, largest_param: int) -> float:
    """DeepSpeed's communication buffers of fp32 elements (approximate, see the module docstring)."""
    if layout.stage == 0:
        return 0.0
    if layout.stage in (1, 2):
        overlap = OVERLAP_COMM_FACTOR if on_gpu and layout.stage == 2 else 1.0
        return 4 * overlap * (REDUCE_BUCKET_SIZE + ALLGATHER_BUCKET_SIZE)
    return 4 * (STAGE3_PREFETCH_BUCKET_SIZE + REDUCE_BUCKET_SIZE + largest_param)


@dataclass(frozen=True)
class Activations:
    """Bytes of one micro-batch's activations on one GPU (see :func:`activation_memory`)."""

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
    """Saved activations and logits of a Llama-family decoder, and their peak in backward.

    Per decoder layer and token, the tensors autograd saves for backward in transformers'
    Llama/Qwen2 block: Korthikanti et al. 2022 (sec. 4) redone for RMSNorm, GQA, a SwiGLU MLP,
    no dropout, and SDPA/flash kernels that keep a log-sum-exp instead of the T x T scores.
    With ``e`` bytes per activation (2 in bf16, 4 in fp32), ``h`` hidden, ``a`` heads and ``k``
    KV heads of width ``d``, ``f`` the MLP width::

        2 RMSNorms   2 (4 + 2e) h     fp32 input, normalised and weighted outputs
        attention    e a d            queries after RoPE
                     2 e k d          keys, values (2 e a d when transformers repeats them: SDPA
                                      with a mask, i.e. packed or padded rows, and eager)
                     e a d + e a d    kernel output and o_proj's input (flash: one)
                     4 a              log-sum-exp (eager: the fp32 softmax and its copy, (4 + e) a T)
        SwiGLU MLP   4 e f            gate and up outputs, SiLU output, their product

    plus the final norm, (4 + 2e) h. With gradient checkpointing a layer keeps only its input
    (e h) and one layer at a time is recomputed in backward. Logits: the plain loss peaks at 12
    bytes per token per vocab entry; the chunked loss (:mod:`trainer.loss`) at about
    (8 + e) x chunk tokens x vocab plus the head's fp32 weight gradient accumulator, 4 vocab h
    (+ 2 vocab h for a chunk's 16-bit product in bf16).
    """
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
    """One layout's memory at a micro-batch, and the largest micro-batch that fits."""

    layout: Layout
    states: ModelStates
    buffers: float
    autocast: float
    activations: Activations
    total: float
    max_micro_batch: int


def fit_layout(
    layout: Layout,
    counts: ParamCounts,
    world: int,
    usable: float,
    micro: int,
    act_args: dict[str, Any],
    lora: LoraCounts | None = None,
) -> Fit:
    """``layout``'s memory at micro-batch ``micro`` and the largest micro-batch under ``usable``."""
    precision = act_args["precision"]
    trainable = lora.trainable if lora is not None else None
    psi = counts.total + (lora.trainable if lora is not None else 0)
    states = model_states(psi, world, layout, precision, trainable)
    buffers = buffer_bytes(layout, on_gpu=True, largest_param=max(counts.embedding, counts.lm_head))
    copies = autocast_copies(counts, lora, precision, act_args["checkpointing"])
    fixed = states.gpu + buffers + copies

    def total_at(micro_batch_size: int) -> tuple[float, Activations]:
        acts = activation_memory(micro_batch_size=micro_batch_size, **act_args)
        return fixed + acts.peak, acts

    total, acts = total_at(micro)
    # Activations grow linearly in the micro-batch: bisect rather than step (4096 tries each).
    low, high = 0, MAX_MICRO_BATCH
    while low < high:
        mid = (low + high + 1) // 2
        if total_at(mid)[0] <= usable:
            low = mid
        else:
            high = mid - 1
    return Fit(layout, states, buffers, copies, acts, total, low)


# ============================================================================ the architecture


def planned_architecture(job: Any) -> tuple[Any, str]:
    """The architecture the run trains, and where its vocabulary size came from.

    Pretrained weights (``model.name_or_path``: a local dir, or a hub id read through
    transformers) bring their own config.json, which is what the trainer loads; an unreachable
    id is a one-line error, never a preset in its place. Otherwise ``model.config`` with its
    overrides; pretrain resizes the vocabulary to a local tokenizer as the trainer does.
    """
    from trainer.model import VOCAB_MULTIPLE, apply_overrides, load_architecture, round_up

    if job.model.name_or_path:
        config = load_architecture(dataclasses.replace(job.model, config=None))
        return config, f"{job.model.name_or_path}'s config.json"
    config = apply_overrides(load_architecture(job.model), job.model.overrides)
    tokenizer_dir = Path(job.tokenizer_path)
    if job.stage == "pretrain" and tokenizer_dir.is_dir():
        from trainer.tokenizer import load_tokenizer

        config.vocab_size = round_up(len(load_tokenizer(str(tokenizer_dir))), VOCAB_MULTIPLE)
        return config, f"tokenizer {tokenizer_dir} (rounded up to {VOCAB_MULTIPLE})"
    return config, "the architecture config"


def resolve_attention(requested: str, precision: str) -> str:
    """The kernel a GPU run would use: ``auto`` is flash-attention when it is installed here."""
    import importlib.util

    if requested != "auto":
        return requested
    flash = precision in ("bf16", "fp16") and importlib.util.find_spec("flash_attn") is not None
    return "flash_attention_2" if flash else "sdpa"


# ============================================================================ the planner


@dataclass(frozen=True)
class Hardware:
    """What the ranks run on: how many, and each GPU's memory (None: CPU ranks)."""

    world_size: int
    ranks_per_node: int
    gpu_mem_bytes: float | None
    cpus: int


@dataclass(frozen=True)
class Choice:
    """The resolved setup and why it was taken."""

    layout: Layout
    micro_batch_size: int
    grad_accum: int
    gradient_checkpointing: bool
    reason: str


def largest_divisor_at_most(rows: int, limit: int) -> int:
    """The largest micro-batch <= ``limit`` that divides ``rows`` (accumulation makes up the rest)."""
    return next(m for m in range(max(1, min(limit, rows)), 0, -1) if rows % m == 0)


def choose(
    fits: dict[bool, list[Fit]],
    rows_per_rank: int,
    seq_len: int,
    micro: int | None,
    checkpointing_options: list[bool],
    grad_accum: int,
) -> Choice | None:
    """The fastest layout that fits and the largest micro-batch it takes; None if none fits.

    ``fits[checkpointing]`` holds the candidate layouts fastest first. ``micro`` is the
    recipe's micro-batch, or None for auto: then a layout fits when it holds the smaller of
    ``rows_per_rank`` and ``MIN_MICRO_TOKENS`` worth of rows (failing that, one row), and the
    micro-batch is the largest that fits and divides ``rows_per_rank``, so the global batch stays.
    Checkpointing options are tried in order (off before on: recomputation costs a forward), and
    both before offloading (streaming states over PCIe and stepping on the CPU cost more).
    """
    if micro is not None:
        needs = [micro]
    else:
        useful = min(rows_per_rank, max(1, math.ceil(MIN_MICRO_TOKENS / seq_len)))
        needs = [useful] + ([1] if useful > 1 else [])
    tiers = [
        (need, offload, ckpt) for need in needs for offload in (False, True) for ckpt in checkpointing_options
    ]
    for need, offload, checkpointing in tiers:
        rows = fits[checkpointing]
        for i, fit in enumerate(rows):
            if fit.max_micro_batch < need or fit.layout.offload_optimizer != offload:
                continue
            if micro is None:
                chosen = largest_divisor_at_most(rows_per_rank, fit.max_micro_batch)
                accum = rows_per_rank // chosen
            else:
                chosen, accum = micro, grad_accum
            faster = [f"ZeRO-{r.layout.name} holds {r.max_micro_batch}" for r in rows[:i]]
            why = (
                f"ZeRO-{fit.layout.name} is the fastest layout that fits {need} row(s) of {seq_len}"
                + (f" ({'; '.join(faster)})" if faster else "")
                + f"; micro-batch {chosen} (up to {fit.max_micro_batch} fit) x accum {accum}"
                + (", gradient checkpointing on" if checkpointing else "")
                + (" (needed to fit)" if checkpointing and False in checkpointing_options else "")
            )
            return Choice(fit.layout, chosen, accum, checkpointing, why)
    return None


def default_num_workers(cpus: int, ranks_per_node: int) -> int:
    """Dataloader workers per rank: the cores each rank has, less one for the rank itself, up to 4."""
    return max(1, min(4, cpus // max(1, ranks_per_node) - 1))


def is_auto(job: Any) -> bool:
    """Whether the job leaves anything to the planner."""
    return "auto" in (job.zero.stage, job.train.micro_batch_size, job.model.gradient_checkpointing)


def rows_per_rank(job: Any, world: int) -> tuple[int, str | None]:
    """Sequences per rank per optimizer step for an auto micro-batch, and a note when the global
    batch does not divide over the ranks (it is then rounded to the nearest multiple)."""
    target = job.train.global_batch_size
    rows = max(1, round(target / world))
    note = None
    if rows * world != target:
        note = f"train.global_batch_size {target} does not divide over {world} ranks: {rows} per rank, {rows * world} in all"
    return rows, note


def candidate_layouts(job: Any, world: int) -> list[Layout]:
    """The recipe's layout when its stage is fixed, else every layout fastest first (ZeRO-0
    only on one rank: on several, ZeRO-1 shards the optimizer for the same traffic)."""
    if job.zero.stage != "auto":
        return [Layout(job.zero.stage, job.zero.offload_optimizer, job.zero.offload_params)]
    return [layout for layout in LAYOUTS if layout.stage != 0 or world == 1]


def plan_auto(job: Any, hardware: Hardware, precision: str, saved: Any = None) -> tuple[Any, list[str]]:
    """``job`` with its ``auto`` settings resolved for ``hardware``, and the lines to log.

    ``saved`` is the checkpoint's own config on a resume: its resolved stage, micro-batch and
    checkpointing are kept while they still fit, so a resumed run does not move on its own;
    when they no longer fit (fewer or smaller GPUs), the planner chooses again and says so (the
    checkpoint is then re-sharded like any other stage or world-size change).
    """
    lines: list[str] = []
    job, line = one_rank_stage(job, hardware.world_size, saved)
    if line:
        lines.append(line)
    if job.data.num_workers == "auto":
        workers = default_num_workers(hardware.cpus, hardware.ranks_per_node)
        job = replace_in(job, "data", num_workers=workers)
        lines.append(
            f"data.num_workers auto -> {workers} ({hardware.cpus} cores / {hardware.ranks_per_node} rank(s) "
            "on this node, one kept for the rank itself, at most 4)"
        )
    if not is_auto(job):
        return job, lines
    world = hardware.world_size
    micro = None if job.train.micro_batch_size == "auto" else job.train.micro_batch_size
    rows, note = rows_per_rank(job, world) if micro is None else (micro * job.train.grad_accum, None)
    if note:
        lines.append(note)
    ckpt_options = (
        [False, True] if job.model.gradient_checkpointing == "auto" else [job.model.gradient_checkpointing]
    )
    choose_for = _cpu_choice if hardware.gpu_mem_bytes is None else _gpu_choice
    choice = None
    if saved is not None:
        kept = _kept_from_checkpoint(job, saved, hardware, precision, rows)
        if kept is not None:
            job, line = kept
            return job, [*lines, line]
        if job.zero.stage == "auto" and saved.zero.stage != "auto":
            # The stage first: changing it re-shards the checkpoint (and ZeRO-0's cannot be).
            layout = {
                "stage": saved.zero.stage,
                "offload_optimizer": saved.zero.offload_optimizer,
                "offload_params": saved.zero.offload_params,
            }
            pinned = replace_in(job, "zero", **layout)
            try:
                choice = choose_for(pinned, hardware, precision, rows, micro, ckpt_options)
                job = pinned
                lines.append(f"kept the checkpoint's zero.stage {saved.zero.stage}; the rest planned again")
            except ConfigError:
                choice = None
        if choice is None:
            lines.append(
                f"the checkpoint's setup (ZeRO-{saved.zero.stage}, micro-batch {saved.train.micro_batch_size}, "
                f"checkpointing {str(saved.model.gradient_checkpointing).lower()}) does not fit "
                f"{world} rank(s) here: planning again"
            )
    if choice is None:
        choice = choose_for(job, hardware, precision, rows, micro, ckpt_options)
    job = apply_choice(job, choice)
    lines.append(
        f"planner: zero.stage {choice.layout.stage}, offload optimizer {str(choice.layout.offload_optimizer).lower()}, "
        f"offload params {str(choice.layout.offload_params).lower()}, micro-batch {choice.micro_batch_size} x accum "
        f"{choice.grad_accum}, gradient checkpointing {str(choice.gradient_checkpointing).lower()}: {choice.reason}"
    )
    return job, lines


def one_rank_stage(job: Any, world: int, saved: Any = None) -> tuple[Any, str | None]:
    """A fixed ``zero.stage`` 1 or 2 on one rank runs DeepSpeed's ZeRO-0 engine, with a line saying so.

    On one rank ZeRO-1/2 partition over a single partition, so they save no memory; DeepSpeed
    0.19.8's ZeRO-1/2 optimizer still keeps a second fp32 copy of the parameters (4 more bytes
    a parameter: 20 against ZeRO-0's 16, measured on real engines) and adds per-parameter host
    work every step (gradient hooks, bucket and partition copies, the copy back into the model):
    1.28x / 1.51x a bare loop's host time at ZeRO-1 / ZeRO-2 against ZeRO-0's 1.04x
    (scripts/bench_host.py, docs/benchmarks.md). Kept as asked: optimizer offload (it moves the
    state to host memory), Muon (DeepSpeed builds it for ZeRO-1+), and a resume from a
    checkpoint the ZeRO-1/2 engine wrote (its files load only into that engine).
    """
    stage = job.zero.stage
    if world != 1 or stage not in (1, 2) or job.zero.offload_optimizer or job.optim.name == "muon":
        return job, None
    if saved is not None and saved.zero.stage in (1, 2):
        return job, None
    return replace_in(job, "zero", stage=0), (
        f"zero.stage {stage} on one rank runs as zero.stage 0: one partition saves no memory, and "
        "DeepSpeed's ZeRO-0 engine needs 4 fewer bytes a parameter and less host time per step"
    )


def apply_choice(job: Any, choice: Choice) -> Any:
    """``job`` with ``choice`` written into its auto fields (fixed fields are left as they are)."""
    if job.zero.stage == "auto":
        job = replace_in(
            job,
            "zero",
            stage=choice.layout.stage,
            offload_optimizer=choice.layout.offload_optimizer,
            offload_params=choice.layout.offload_params,
        )
    if job.train.micro_batch_size == "auto":
        job = replace_in(job, "train", micro_batch_size=choice.micro_batch_size, grad_accum=choice.grad_accum)
    if job.model.gradient_checkpointing == "auto":
        job = replace_in(job, "model", gradient_checkpointing=choice.gradient_checkpointing)
    return job


def replace_in(job: Any, section: str, **changes: Any) -> Any:
    return dataclasses.replace(job, **{section: dataclasses.replace(getattr(job, section), **changes)})


def _cpu_choice(
    job: Any, hardware: Hardware, precision: str, rows: int, micro: int | None, ckpt_options: list[bool]
) -> Choice:
    layout = candidate_layouts(job, hardware.world_size)[0]
    if micro is None:
        micro, accum = largest_divisor_at_most(rows, CPU_MAX_MICRO_BATCH), None
        accum = rows // micro
    else:
        accum = job.train.grad_accum
    return Choice(
        layout,
        micro,
        accum,
        ckpt_options[0],
        f"CPU ranks take a fixed choice (ZeRO-0 on one rank, else ZeRO-1: the fewest collectives; "
        f"micro-batch up to {CPU_MAX_MICRO_BATCH} rows)",
    )


def fits_for(
    job: Any,
    config: Any,
    world: int,
    usable: float,
    precision: str,
    attn: str,
    loss: str,
    micro: int,
    layouts: list[Layout] | tuple[Layout, ...] = LAYOUTS,
    checkpointing_options: tuple[bool, ...] = (False, True),
) -> dict[bool, list[Fit]]:
    """Every layout's memory for ``job`` on ``world`` GPUs, with and without checkpointing."""
    from trainer.flops import lora_counts_for, param_counts

    counts = param_counts(config)
    lora = lora_counts_for(config, job.lora)
    act_args = {
        "config": config,
        "seq_len": job.data.max_seq_len,
        "precision": precision,
        "attn": attn,
        "packed": job.data.pack,
        "chunked_loss": loss == "chunked",
    }
    return {
        ckpt: [
            fit_layout(layout, counts, world, usable, micro, {**act_args, "checkpointing": ckpt}, lora)
            for layout in layouts
        ]
        for ckpt in checkpointing_options
    }


def _gpu_choice(
    job: Any, hardware: Hardware, precision: str, rows: int, micro: int | None, ckpt_options: list[bool]
) -> Choice:
    config, _ = planned_architecture(job)
    attn = resolve_attention(job.model.attn_implementation, precision)
    loss = job.model.loss if config.model_type in CHUNKED_MODEL_TYPES else "plain"
    usable = USABLE_FRACTION * hardware.gpu_mem_bytes
    layouts = candidate_layouts(job, hardware.world_size)
    fits = fits_for(
        job,
        config,
        hardware.world_size,
        usable,
        precision,
        attn,
        loss,
        micro or 1,
        layouts,
        tuple(ckpt_options),
    )
    choice = choose(fits, rows, job.data.max_seq_len, micro, ckpt_options, job.train.grad_accum)
    if choice is None:
        raise ConfigError(
            f"nothing fits {hardware.world_size} GPU(s) of {hardware.gpu_mem_bytes / GB:.0f} GB by dstrain's memory "
            f"estimate (ZeRO {', '.join(layout.name for layout in layouts)}, micro-batch {micro or 1}, rows of "
            f"{job.data.max_seq_len}): shorten --data.max_seq_len, add GPUs, or set --zero.stage and "
            "--train.micro_batch_size yourself (`dstrain estimate` shows the figures)"
        )
    return choice


def _kept_from_checkpoint(
    job: Any, saved: Any, hardware: Hardware, precision: str, rows: int
) -> tuple[Any, str] | None:
    """The checkpoint's resolved setup for the auto fields, if it still fits here; else None."""
    micro = saved.train.micro_batch_size
    if job.train.micro_batch_size == "auto" and (not isinstance(micro, int) or rows % micro):
        return None  # the batch per rank changed (another world size): choose a micro-batch again
    if "auto" in (saved.zero.stage, micro, saved.model.gradient_checkpointing):
        return None  # the checkpoint itself left something unresolved
    layout = Layout(saved.zero.stage, saved.zero.offload_optimizer, saved.zero.offload_params)
    keep = apply_choice(job, Choice(layout, micro, rows // micro, saved.model.gradient_checkpointing, ""))
    if hardware.gpu_mem_bytes is not None:
        config, _ = planned_architecture(keep)
        attn = resolve_attention(keep.model.attn_implementation, precision)
        loss = keep.model.loss if config.model_type in CHUNKED_MODEL_TYPES else "plain"
        layout = Layout(keep.zero.stage, keep.zero.offload_optimizer, keep.zero.offload_params)
        ckpt = keep.model.gradient_checkpointing
        fit = fits_for(
            keep,
            config,
            hardware.world_size,
            USABLE_FRACTION * hardware.gpu_mem_bytes,
            precision,
            attn,
            loss,
            keep.train.micro_batch_size,
            [layout],
            (ckpt,),
        )[ckpt][0]
        if fit.max_micro_batch < keep.train.micro_batch_size:
            return None
    return keep, (
        f"planner: kept the checkpoint's choice (zero.stage {keep.zero.stage}, micro-batch "
        f"{keep.train.micro_batch_size} x accum {keep.train.grad_accum}, gradient checkpointing "
        f"{str(keep.model.gradient_checkpointing).lower()}): it still fits"
    )


def local_hardware(world_size: int, ranks_per_node: int, gpu_mem_bytes: float | None) -> Hardware:
    """Hardware facts with the cores this process may run on (its affinity: a container's or
    a job's share, not the whole machine)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return Hardware(world_size, ranks_per_node, gpu_mem_bytes, cpus)


def plan_for_ranks(job: Any, dist: Any, precision: str, saved: Any = None) -> Any:
    """:func:`plan_auto` on the ranks (collective on GPUs): every rank plans for the smallest GPU
    of the run, so all of them take the same choice; rank 0 logs it."""
    import logging

    gpu_mem = None
    if dist.device.startswith("cuda"):
        import torch

        from trainer.dist import all_reduce_max

        own = float(torch.cuda.get_device_properties(dist.cuda_index).total_memory)
        gpu_mem = -all_reduce_max([-own], dist, "the planner's GPU memory")[0] if dist.world_size > 1 else own
    hardware = local_hardware(dist.world_size, dist.local_world_size, gpu_mem)
    if dist.launcher == "srun":  # srun binds each task to its own --cpus-per-task cores
        hardware = dataclasses.replace(hardware, cpus=hardware.cpus * dist.local_world_size)
    job, lines = plan_auto(job, hardware, precision, saved)
    if dist.is_main:
        for line in lines:
            logging.getLogger("dstrain").info(line)
    return job
