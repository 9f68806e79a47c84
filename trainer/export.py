"""Hugging Face exports: of the live engine at the end of a run, and offline from checkpoints.

    dstrain export CKPT OUT [--dtype bf16|fp16|fp32]    consolidate ZeRO shards into an HF dir
    dstrain ckpt list OUTPUT_DIR                         steps, completeness, sizes
    dstrain ckpt to-universal CKPT [--out DIR]           DeepSpeed universal checkpoint (other world sizes)

The offline tools run in one plain process (no ranks): ZeRO-1/2/3 shards are merged by
DeepSpeed's zero_to_fp32 reader, so even ZeRO-3 checkpoints export with every tensor filled.
Both exports write the precision the run trained in unless ``--dtype`` says otherwise, so an
offline export of the last checkpoint equals the run's own ``hf/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from trainer.checkpoint import (
    COMPLETE,
    check_pickles,
    dir_size,
    is_complete,
    list_checkpoints,
    newest_complete,
    read_meta,
    to_universal,
    verify,
)
from trainer.dist import DistInfo, barrier
from trainer.errors import CheckpointError, DstrainError, user_error

log = logging.getLogger("dstrain")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


ADAPTER_CONFIG = "adapter_config"  # a LoRA checkpoint's peft config dir
TRUST_HELP = (
    "skip the check of what the checkpoint's pickles import (only for checkpoints you wrote "
    "yourself: DeepSpeed's files are unpickled with weights_only=False, which can run code)"
)


def consolidated_state_dict(engine: Any, trainable_only: bool = False) -> dict[str, torch.Tensor] | None:
    """The model weights on rank 0 (None elsewhere), all or only the trainable ones (a LoRA
    adapter); every rank must call this.

    Under ZeRO-3 the parameters are partitioned, so they are gathered layer by layer through
    DeepSpeed (needs ``stage3_gather_16bit_weights_on_model_save``); a rank-0-only gather hangs,
    and an adapter saved without the gather comes out empty.
    """
    if engine.zero_optimization_partition_weights():
        return engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=trainable_only)
    if engine.global_rank != 0:
        return None
    if trainable_only:
        return {k: p.detach().cpu() for k, p in engine.module.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}


def save_hf(
    model: Any,
    state: dict[str, torch.Tensor],
    tokenizer: Any,
    out_dir: str | Path,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write safetensors + config + generation config + tokenizer into ``<out>.tmp``, then rename.
    ``dtype``: cast the floating-point weights (and say so in config.json) first."""
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    out = Path(out_dir)
    empty = [k for k, v in state.items() if v.numel() == 0]
    if empty:
        raise CheckpointError(
            f"export would write empty tensors ({empty[0]} ...): ZeRO-3 weights were not gathered"
        )
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    use_cache, config_dtype = model.config.use_cache, getattr(model.config, "dtype", None)
    model.config.use_cache = True  # exported for inference
    if dtype is not None:
        model.config.dtype = dtype
    try:
        model.save_pretrained(tmp, state_dict=state)
    finally:
        model.config.use_cache, model.config.dtype = use_cache, config_dtype
    tokenizer.save_pretrained(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    return out


def save_adapter(model: Any, state: dict[str, torch.Tensor], tokenizer: Any, out_dir: str | Path) -> Path:
    """Write a peft adapter (adapter_config.json + adapter_model.safetensors) and the tokenizer,
    from a PeftModel and its trainable weights, into ``<out>.tmp``, then rename."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    adapter = get_peft_model_state_dict(model, state_dict=state)
    empty = [k for k, v in adapter.items() if v.numel() == 0]
    if not adapter or empty:
        raise CheckpointError(
            f"adapter export would write {'no' if not adapter else 'empty'} tensors "
            f"({(empty or ['none'])[0]}): the LoRA weights were not gathered"
        )
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in adapter.items()}, str(tmp / "adapter_model.safetensors")
    )
    model.peft_config["default"].save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    return out


def export_live(
    engine: Any,
    tokenizer: Any,
    out_dir: str | Path,
    dist: DistInfo,
    adapter: bool,
    precision: str | None = None,
) -> Path:
    """Collective export of the live engine (rank 0 writes): the whole model as an HF directory
    in the run's ``precision`` (bf16 trains fp32 parameters under autocast, so the live weights
    are fp32), or with ``adapter`` a LoRA run's adapter in peft format."""
    state = consolidated_state_dict(engine, trainable_only=adapter)
    if dist.is_main:
        assert state is not None
        if adapter:
            save_adapter(engine.module, state, tokenizer, out_dir)
        else:
            save_hf(engine.module, state, tokenizer, out_dir, DTYPES.get(precision or "", None))
        what = (
            "the LoRA adapter (load it with PeftModel.from_pretrained)"
            if adapter
            else "the Hugging Face model"
        )
        log.info("exported %s to %s", what, out_dir)
    barrier(dist)
    return Path(out_dir)


def checkpoint_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights from a DeepSpeed checkpoint dir (ZeRO 1-3 shards or a stage-0 file)."""
    if list(ckpt.glob("*optim_states.pt")) and list(ckpt.glob("zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    model_file = ckpt / "mp_rank_00_model_states.pt"
    if not model_file.is_file():
        raise CheckpointError(f"{ckpt} holds no DeepSpeed model states (expected {model_file.name})")
    # DeepSpeed pickles its own objects beside the tensors, so this cannot be a weights_only
    # load: resolve_checkpoint has checked every global the pickles import (trainer.safe_load).
    return torch.load(model_file, map_location="cpu", weights_only=False)["module"]


def resolve_checkpoint(ckpt: str | Path, trust: bool = False) -> Path:
    """A complete, intact ``step_N`` dir from a checkpoint, a checkpoints/ dir or an output_dir:
    every file's crc32 is checked (an export reads them all anyway, and a flipped bit in a weight
    would otherwise ship), and unless ``trust`` every pickle's globals (they are loaded with
    weights_only=False)."""
    ckpt = Path(ckpt)
    if ckpt.is_dir() and not ckpt.name.startswith("step_"):  # an output_dir or checkpoints/ dir
        root = ckpt / "checkpoints" if (ckpt / "checkpoints").is_dir() else ckpt
        ckpt = newest_complete(root) or ckpt
    if not is_complete(ckpt):
        raise CheckpointError(f"{ckpt} is not a complete checkpoint (no {COMPLETE} marker)")
    problem = verify(ckpt, full=True)
    if problem is not None:
        raise CheckpointError(f"{ckpt} is damaged: {problem}; export an older checkpoint")
    if not trust:
        check_pickles(ckpt)
    return ckpt


def export_checkpoint(
    ckpt: str | Path, out: str | Path, dtype: str | None = None, merge: bool = False, trust: bool = False
) -> Path:
    """Rebuild the HF model from ``ckpt``'s config, load the consolidated weights, write ``out``
    in ``dtype`` (default: the precision the run trained in, as its own export). A LoRA
    checkpoint exports its adapter, or with ``merge`` the base model with the adapter merged in."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    ckpt = resolve_checkpoint(ckpt, trust)
    dtype = dtype or read_meta(ckpt).get("precision", "fp32")
    state = {k.removeprefix("module."): v for k, v in checkpoint_state_dict(ckpt).items()}
    if (ckpt / ADAPTER_CONFIG).is_dir():
        return export_lora_checkpoint(ckpt, state, out, dtype, merge)
    if merge:
        raise CheckpointError(f"{ckpt} holds no LoRA adapter: --merge is for LoRA runs (drop it)")
    config = AutoConfig.from_pretrained(ckpt / "hf_config")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise CheckpointError(
            f"{ckpt}: weights do not fit the saved architecture (missing {sorted(set(missing) - tied)[:3]}, "
            f"unexpected {unexpected[:3]})"
        )
    if tied:
        model.tie_weights()
    model = model.to(DTYPES[dtype])
    expected = sum(p.numel() for p in model.parameters())
    got = sum(v.numel() for k, v in state.items() if k not in tied)  # a tied head is the embedding
    if got != expected:
        raise CheckpointError(f"{ckpt}: {got} weights in the checkpoint, the model has {expected}")
    tokenizer = AutoTokenizer.from_pretrained(ckpt / "tokenizer")
    return save_hf(model, model.state_dict(), tokenizer, out)


def export_lora_checkpoint(
    ckpt: Path, state: dict[str, torch.Tensor], out: str | Path, dtype: str, merge: bool
) -> Path:
    """A LoRA checkpoint (trainable weights only) as a peft adapter, or merged into its base.

    The adapter needs no base weights (the base is built on the meta device to name the keys);
    the merge loads the run's ``model.name_or_path``, merges in fp32, then casts to ``dtype``.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from trainer.checkpoint import check_base, saved_config

    peft_config = LoraConfig.from_pretrained(str(ckpt / ADAPTER_CONFIG))
    tokenizer = AutoTokenizer.from_pretrained(ckpt / "tokenizer")
    if merge:
        job = saved_config(ckpt)
        checked = check_base(ckpt, job)  # the adapters merge into the base they were trained on
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(job.model.name_or_path, dtype=torch.float32), peft_config
        )
        if not checked:  # a hub base fetched just now
            check_base(ckpt, job)
    else:
        with torch.device("meta"):
            model = get_peft_model(
                AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ckpt / "hf_config")), peft_config
            )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = trainable - set(state), set(state) - set(model.state_dict())
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt}: the adapter weights do not fit the saved LoRA config (missing "
            f"{sorted(missing)[:2]}, unexpected {sorted(unexpected)[:2]})"
        )
    state = {k: v for k, v in state.items() if k in trainable}
    if not merge:
        return save_adapter(model, state, tokenizer, out)
    model.load_state_dict(state, strict=False)
    merged = model.merge_and_unload().to(DTYPES[dtype])
    return save_hf(merged, merged.state_dict(), tokenizer, out)


def export_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dstrain export", description="Export a checkpoint to an HF directory."
    )
    parser.add_argument(
        "checkpoint", help="a checkpoints/step_N dir, or an output_dir (its newest complete save)"
    )
    parser.add_argument("out", help="directory to write (safetensors, config, tokenizer, generation config)")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="weights dtype (default: the precision the run trained in)",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="LoRA runs: merge the adapter into the base model (in fp32, then cast) instead of "
        "writing the adapter alone",
    )
    parser.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out, args.dtype, args.merge, args.trust_checkpoint)
    except DstrainError as exc:
        return user_error(exc)
    print(f"exported {args.checkpoint} -> {out}")
    return 0


def ckpt_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dstrain ckpt", description="List and convert checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", help="steps, completeness and sizes under OUTPUT_DIR/checkpoints")
    ls.add_argument("output_dir")
    uni = sub.add_parser("to-universal", help="convert CKPT for a resume on another world size")
    uni.add_argument("checkpoint")
    uni.add_argument("--out", default=None)
    uni.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            root = Path(args.output_dir) / "checkpoints"
            rows = [
                {"checkpoint": p.name, "complete": is_complete(p), "mb": round(dir_size(p) / 1e6, 1)}
                for p in list_checkpoints(root)
            ]
            print(
                json.dumps(
                    {
                        "latest": (root / "latest").read_text() if (root / "latest").is_file() else None,
                        "checkpoints": rows,
                    },
                    indent=2,
                )
            )
        else:
            ckpt = Path(args.checkpoint)
            if not args.trust_checkpoint:  # ds_to_universal unpickles with weights_only=False
                check_pickles(ckpt)
            print(to_universal(ckpt, Path(args.out) if args.out else ckpt / "universal"))
    except DstrainError as exc:
        return user_error(exc)
    return 0


if __name__ == "__main__":
    sys.exit(export_main())
