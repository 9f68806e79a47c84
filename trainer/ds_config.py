"""DeepSpeed JSON from a :class:`JobConfig`: one pure function, with golden templates.

:func:`build_ds_config` maps the typed config (``train``, ``optim``, ``zero`` sections and
the resolved precision) to the dict ``deepspeed.initialize(config=...)`` takes. It reads no
files and no hardware: the caller passes ``precision`` and ``on_gpu``. The files in
``ds_configs/`` are its outputs for a fixed reference job (see ``ds_configs/README.md``);
``python -m trainer.ds_config --regenerate`` rewrites them and ``tests/unit/test_zero_config.py``
fails when they drift.

What the trainer owns, and so is *not* in the JSON: the LR scheduler (always passed to
``deepspeed.initialize``), and the AdamW optimizer when nothing is offloaded. The JSON carries
an ``optimizer`` block in two cases: ``zero.offload_optimizer``, so DeepSpeed builds its CPU
Adam (a client torch optimizer would step on the CPU at a fraction of the speed), and
``optim.name: muon``, so DeepSpeed builds its ``MuonWithAuxAdam``, which its ZeRO stages know
how to partition (they orthogonalize the full gradient before sharding it).
``train_batch_size`` is left out: DeepSpeed derives it from micro batch x accumulation x world
size, so one file fits any GPU count. Key names were checked against DeepSpeed 0.19.8
(``deepspeed/runtime/zero/config.py``, ``offload_config.py``, ``precision_config.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Literal

from trainer.config import JobConfig, build_config
from trainer.errors import ConfigError

Precision = Literal["bf16", "fp16", "fp32"]
PRECISIONS: tuple[str, ...] = ("bf16", "fp16", "fp32")

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "ds_configs"

# Large enough that DeepSpeed never prints its own step lines; our metrics callback logs.
STEPS_PER_PRINT = 1_000_000_000

# Bucket sizes in elements. 2e8 (DeepSpeed's examples) rather than its 5e8 default: with
# overlap_comm, ZeRO-2 holds about 4.5x reduce_bucket_size in buffers, so 5e8 costs ~9 GB in
# bf16 on every GPU; 2e8 keeps that near 3.6 GB at no measurable speed loss for <= 8B models.
REDUCE_BUCKET_SIZE = 200_000_000
ALLGATHER_BUCKET_SIZE = 200_000_000
# ZeRO-3: prefetch ahead of use, keep small params (norms, biases) unpartitioned.
STAGE3_PREFETCH_BUCKET_SIZE = 50_000_000
STAGE3_PARAM_PERSISTENCE_THRESHOLD = 100_000
STAGE3_MAX_LIVE_PARAMETERS = 1_000_000_000
STAGE3_MAX_REUSE_DISTANCE = 1_000_000_000
SUB_GROUP_SIZE = 1_000_000_000

# torch_autocast dtype per training precision (DeepSpeed parses these names).
AUTOCAST_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}

# The golden templates: file stem -> zero section of the reference job.
TEMPLATES: dict[str, dict[str, Any]] = {
    "zero0": {"stage": 0},
    "zero1": {"stage": 1},
    "zero2": {"stage": 2},
    "zero3": {"stage": 3},
    "zero2_offload": {"stage": 2, "offload_optimizer": True},
    "zero3_offload": {"stage": 3, "offload_optimizer": True, "offload_params": True},
}
# The reference job behind the templates: JobConfig defaults (micro batch 16, grad accum 8,
# AdamW lr 2e-5, clip 1.0), bf16, on a GPU. The tokenizer is never loaded.
REFERENCE_PRECISION: Precision = "bf16"
REFERENCE_ON_GPU = True
REFERENCE_TOKENIZER = "unused-reference-tokenizer"


def resolve_precision(dtype: str, on_gpu: bool, bf16_supported: bool = True) -> Precision:
    """The training precision for ``model.dtype`` on this hardware.

    ``auto`` is bf16 on a GPU that supports it (Ampere or newer), else fp32: fp16 needs loss
    scaling and is only used when asked for. Explicit bf16 runs on CPU (DeepSpeed's CPU
    accelerator supports it) but not on a GPU without bf16; fp16 needs a GPU.
    """
    if dtype == "auto":
        return "bf16" if on_gpu and bf16_supported else "fp32"
    if dtype not in PRECISIONS:
        raise ConfigError(f"--model.dtype must be one of auto, {', '.join(PRECISIONS)}, got {dtype!r}")
    if dtype == "fp16" and not on_gpu:
        raise ConfigError(
            "--model.dtype fp16 needs a GPU (DeepSpeed's fp16 loss scaling); use fp32 or bf16 on CPU"
        )
    if dtype == "bf16" and on_gpu and not bf16_supported:
        raise ConfigError(
            "--model.dtype bf16 needs a GPU with bf16 support (Ampere or newer); "
            "use --model.dtype fp16 (or auto) on this GPU"
        )
    return dtype  # type: ignore[return-value]


def precision_block(precision: Precision) -> dict[str, Any]:
    """Mixed precision as torch autocast over fp32 parameters (DeepSpeed's ``torch_autocast``).

    Why not DeepSpeed's ``bf16``/``fp16`` sections: they make the parameters 16-bit, and then
    DeepSpeed 0.19.8 sums the micro-batches' gradients in 16-bit at ZeRO-2 and -3 whatever
    ``data_types.grad_accum_dtype`` says (the gradient partition has the parameters' dtype), and
    ZeRO-0 falls back to a per-parameter unfused optimizer. With fp32 parameters under autocast the
    matmuls still run in 16-bit, each micro-batch's gradient is added to an fp32 gradient at every
    stage (what a bare loop and HF Trainer do), the master weights *are* the parameters, and ZeRO-0
    steps our own fused AdamW. The cost: parameters held in fp32 (4 bytes, not 2, for the part that
    is not partitioned; ``dstrain estimate`` counts it) and a 16-bit copy of each weight made per
    forward. ``lower_precision_safe_modules: []``: DeepSpeed would otherwise reduce ``nn.Linear``
    gradients in the autocast dtype, which rounds the accumulated gradient to 16 bits at ZeRO-1
    (it reduces once per step) and every micro-batch's partial sum over ranks at ZeRO-2/3
    (measured: 2-4e-3 relative error against the fp32 sum, vs 1e-6 with fp32 reduction). So
    gradients are reduced in fp32, as DDP does for fp32 parameters: twice the bytes of a 16-bit
    reduction. fp16 gets a ``torch.amp.GradScaler`` from DeepSpeed (dynamic loss scaling).
    The ``bf16``/``fp16`` sections stay, disabled, so the JSON states it explicitly.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    block: dict[str, Any] = {"bf16": {"enabled": False}, "fp16": {"enabled": False}}
    if precision != "fp32":
        block["torch_autocast"] = {
            "enabled": True,
            "dtype": AUTOCAST_DTYPES[precision],
            "lower_precision_safe_modules": [],  # reduce gradients in fp32 (see above)
        }
    return block


def zero_block(job: JobConfig, on_gpu: bool) -> dict[str, Any]:
    """The ``zero_optimization`` section for ``job.zero``.

    ``overlap_comm`` overlaps gradient reduction with backward on separate CUDA streams, so it
    is on for ZeRO-2/3 on GPUs only; on CPU (gloo) it buys nothing. Pinned host memory needs
    CUDA, so ``pin_memory`` follows ``on_gpu``.

    ``contiguous_gradients`` is off at ZeRO-1/2 without offload: at ZeRO-2 it copies every gradient, one Python call chain
    and one copy per parameter inside the gradient hook, into a preallocated bucket buffer
    (against fragmentation). That is the largest host cost of DeepSpeed's ZeRO-2 step:
    scripts/bench_host.py measured DeepSpeed's partitioned ZeRO-2 at 1.51x / 1.39x a bare
    loop's host time (fp32 / bf16) with it and 1.26x / 1.20x without (docs/benchmarks.md).
    Without it a bucket is flattened once when it is reduced, and gradients are allocated as in
    a bare loop; ZeRO-1 never used it. ZeRO-3 and optimizer offload keep it (not measured).
    """
    zero = job.zero
    out: dict[str, Any] = {"stage": zero.stage}
    if zero.stage == 0:
        return out
    out.update(
        overlap_comm=on_gpu and zero.stage >= 2,
        contiguous_gradients=zero.stage == 3 or zero.offload_optimizer,
        # DeepSpeed's ZeRO-3 refuses Muon with reduce-scatter: Muon needs whole gradients.
        reduce_scatter=not (job.optim.name == "muon" and zero.stage == 3),
        reduce_bucket_size=REDUCE_BUCKET_SIZE,
        allgather_partitions=True,
        allgather_bucket_size=ALLGATHER_BUCKET_SIZE,
    )
    if zero.offload_optimizer:
        out["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if zero.stage == 3:
        out.update(
            stage3_prefetch_bucket_size=STAGE3_PREFETCH_BUCKET_SIZE,
            stage3_param_persistence_threshold=STAGE3_PARAM_PERSISTENCE_THRESHOLD,
            stage3_max_live_parameters=STAGE3_MAX_LIVE_PARAMETERS,
            stage3_max_reuse_distance=STAGE3_MAX_REUSE_DISTANCE,
            sub_group_size=SUB_GROUP_SIZE,
            # Without this, save_16bit_model() on ZeRO-3 writes an empty state dict.
            stage3_gather_16bit_weights_on_model_save=True,
        )
        if zero.offload_params:
            out["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    return out


def optimizer_block(job: JobConfig) -> dict[str, Any]:
    """DeepSpeed's own optimizer with the job's hyper-parameters.

    AdamW (CPU Adam under offload), or Muon: DeepSpeed splits each param group by the
    ``use_muon`` tag the trainer sets, gives the Muon half ``muon_lr`` and ``momentum`` and the
    AdamW half ``lr``, ``betas`` and ``eps``. A group's own ``weight_decay`` wins over this one.
    """
    optim = job.optim
    params: dict[str, Any] = {
        "lr": optim.lr,
        "betas": list(optim.betas),
        "eps": optim.eps,
        "weight_decay": optim.weight_decay,
    }
    if optim.name == "muon":
        params.update(muon_lr=optim.muon_lr, momentum=optim.muon_momentum)
        return {"type": "Muon", "params": params}
    return {"type": "AdamW", "params": params}


def optimizer_clips(job: JobConfig, precision: Precision) -> bool:
    """Whether the client optimizer (ZeRO-0, no DeepSpeed optimizer block) clips the gradients."""
    ds_builds_optimizer = job.zero.offload_optimizer or job.optim.name == "muon"
    return job.zero.stage == 0 and not ds_builds_optimizer and precision != "fp16"


def build_ds_config(job: JobConfig, precision: Precision, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config dict for ``job`` at ``precision`` (pure: no I/O, no hardware probe).

    Raises ConfigError for Muon with optimizer offload: DeepSpeed 0.19.8 has code for it, but
    it is untested here, so it is refused rather than trusted.
    """
    if job.zero.offload_optimizer and job.optim.name == "muon":
        raise ConfigError(
            "--optim.name muon is not supported with --zero.offload_optimizer true; "
            "use --optim.name adamw with offload, or --zero.offload_optimizer false with muon"
        )
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": job.train.micro_batch_size,
        "gradient_accumulation_steps": job.train.grad_accum,
        # ZeRO-0 with our own AdamW: the optimizer clips (trainer.optim.FiniteAdamW); DeepSpeed's
        # clipping there is a per-parameter Python loop whose norm is not kept. fp16 keeps
        # DeepSpeed's, which unscales the gradients (GradScaler) before it clips.
        "gradient_clipping": 0.0 if optimizer_clips(job, precision) else job.optim.max_grad_norm,
        **precision_block(precision),
        "zero_optimization": zero_block(job, on_gpu),
        "steps_per_print": STEPS_PER_PRINT,
        "wall_clock_breakdown": False,
    }
    if job.zero.offload_optimizer or job.optim.name == "muon":
        config["optimizer"] = optimizer_block(job)
    return config


def dump_ds_config(config: dict[str, Any]) -> str:
    """Readable, stable JSON text: indent 2, sorted keys, trailing newline."""
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def write_ds_config(config: dict[str, Any], path: str | Path) -> Path:
    """Write ``config`` to ``path`` atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dump_ds_config(config), encoding="utf-8")
    tmp.replace(path)
    return path


def reference_job(zero: dict[str, Any]) -> JobConfig:
    """The job behind the templates: JobConfig defaults with the given zero section."""
    return build_config(base={"tokenizer": REFERENCE_TOKENIZER}, overrides={"zero": zero})


def template_configs() -> dict[str, dict[str, Any]]:
    """Template file stem -> its DeepSpeed config, as build_ds_config produces it."""
    return {
        name: build_ds_config(reference_job(zero), REFERENCE_PRECISION, REFERENCE_ON_GPU)
        for name, zero in TEMPLATES.items()
    }


def regenerate_templates(out_dir: str | Path = TEMPLATES_DIR) -> list[Path]:
    """Write every template to ``out_dir/<name>.json``; returns the paths written."""
    return [write_ds_config(cfg, Path(out_dir) / f"{name}.json") for name, cfg in template_configs().items()]


def stale_templates(templates_dir: str | Path = TEMPLATES_DIR) -> list[str]:
    """Names of template files that are missing, differ from build_ds_config, or are extra."""
    templates_dir = Path(templates_dir)
    expected = {f"{name}.json": dump_ds_config(cfg) for name, cfg in template_configs().items()}
    stale = [
        name
        for name, text in expected.items()
        if not (templates_dir / name).is_file() or (templates_dir / name).read_text(encoding="utf-8") != text
    ]
    stale += sorted(p.name for p in templates_dir.glob("*.json") if p.name not in expected)
    return stale


def main(argv: list[str] | None = None) -> int:
    """``python -m trainer.ds_config --regenerate | --check [--dir DIR]``."""
    parser = argparse.ArgumentParser(
        prog="python -m trainer.ds_config", description="Rewrite or check the golden ZeRO templates."
    )
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--regenerate", action="store_true", help="Rewrite the template files.")
    action.add_argument("--check", action="store_true", help="Exit 1 if a template is stale.")
    parser.add_argument(
        "--dir", type=Path, default=TEMPLATES_DIR, help="Templates folder (default: %(default)s)."
    )
    args = parser.parse_args(argv)
    if args.regenerate:
        for path in regenerate_templates(args.dir):
            print(f"wrote {path}")
        return 0
    stale = stale_templates(args.dir)
    if stale:
        print(
            f"stale ZeRO templates in {args.dir}: {', '.join(stale)}; run python -m trainer.ds_config --regenerate"
        )
        return 1
    print(f"{len(TEMPLATES)} ZeRO templates in {args.dir} are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
