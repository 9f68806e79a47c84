"""A ZeRO-0 checkpoint in DeepSpeed's universal format, so a ZeRO-1/2 run can resume from it.

A one-rank run with ``zero.stage`` 1 or 2 trains on DeepSpeed's ZeRO-0 engine
(:func:`trainer.planner.one_rank_stage`), so its checkpoints are ZeRO-0's: one
``mp_rank_00_model_states.pt`` holding the whole model and the whole torch optimizer state. A
resume on more ranks at ``zero.stage`` 1 or 2 needs that state sharded, which DeepSpeed's
``ds_to_universal`` does only for ZeRO-1/2/3 checkpoints. This writes the same universal layout
DeepSpeed 0.19.8's loader reads (``BaseOptimizer.load_hp_checkpoint_state_from_checkpoint_dir``
and ``checkpoint/universal_checkpoint.py``):

    <out>/mp_rank_00_model_states.pt   the engine's metadata, client state and LR scheduler
                                       (the optimizer state taken out: it is below)
    <out>/zero/optimizer_state.pt      the param groups' hyperparameters and the DeepSpeed version
    <out>/zero/<param name>/fp32.pt    {"param": full fp32 tensor}; exp_avg.pt and exp_avg_sq.pt
                                       the same for Adam's moments; step.pt the step count

The torch optimizer state is keyed by position in its param groups, so the parameter names come
from the live model through the same grouping the optimizer was built with
(:func:`trainer.optim.param_group_names`): the model a resume builds is the model that saved it
(the architecture check runs first).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from trainer.errors import CheckpointError

MODEL_STATES = "mp_rank_00_model_states.pt"
# What a ZeRO-1/2 optimizer's param group takes from the saved one (the loader copies every key
# but ``params``; torch's own switches such as ``fused`` stay the ones this run chose).
HYPERPARAMETERS = ("lr", "initial_lr", "betas", "eps", "weight_decay", "name")
MOMENTS = ("exp_avg", "exp_avg_sq")


def zero0_to_universal(ckpt: Path, out: Path, group_names: list[list[str]]) -> Path:
    """Write ``ckpt`` (a ZeRO-0 save) to ``out`` in universal format; ``group_names`` holds the
    parameter names of each optimizer param group, in the optimizer's order."""
    # The checkpoint's pickles were checked against the allow-list when the resume was resolved.
    states = torch.load(ckpt / MODEL_STATES, map_location="cpu", weights_only=False, mmap=True)
    optimizer = states.get("optimizer")
    if not isinstance(optimizer, dict) or "param_groups" not in optimizer:
        raise CheckpointError(f"{ckpt / MODEL_STATES} holds no ZeRO-0 optimizer state to convert")
    saved_groups = optimizer["param_groups"]
    if [len(g["params"]) for g in saved_groups] != [len(names) for names in group_names]:
        raise CheckpointError(
            f"{ckpt / MODEL_STATES}: its optimizer groups hold "
            f"{[len(g['params']) for g in saved_groups]} parameters, this model's "
            f"{[len(n) for n in group_names]}; resume with the settings that saved it"
        )
    unknown = {key for state in optimizer["state"].values() for key in state} - {"step", *MOMENTS}
    if unknown:  # e.g. Muon's momentum_buffer: the universal layout here carries AdamW's state
        raise CheckpointError(
            f"{ckpt / MODEL_STATES}: its optimizer state holds {sorted(unknown)}, which dstrain "
            "converts to a ZeRO-1/2 layout only for AdamW; resume with --zero.stage 0"
        )
    module = states["module"]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    zero = tmp / "zero"
    zero.mkdir(parents=True)
    for group, names in zip(saved_groups, group_names, strict=True):
        for index, name in zip(group["params"], names, strict=True):
            if name not in module:
                raise CheckpointError(f"{ckpt / MODEL_STATES} has no weights for {name!r}")
            folder = zero / name
            folder.mkdir()
            torch.save({"param": module[name].float()}, folder / "fp32.pt")
            state = optimizer["state"].get(index, {})
            for key in MOMENTS:
                if key in state:
                    torch.save({"param": state[key].float()}, folder / f"{key}.pt")
            if "step" in state:
                torch.save(state["step"], folder / "step.pt")
    groups = [{k: g[k] for k in HYPERPARAMETERS if k in g} for g in saved_groups]
    torch.save({"param_groups": groups, "ds_version": states["ds_version"]}, zero / "optimizer_state.pt")
    torch.save({**states, "optimizer": None}, tmp / MODEL_STATES)
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return out


def step_on_param_device(optimizer: Any) -> None:
    """Move each loaded ``step`` beside its parameter where torch's fused or capturable AdamW
    needs it there (a universal load assigns the step as it was saved, on the CPU here)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    for group in inner.param_groups:
        if not (group.get("fused") or group.get("capturable")):
            continue
        for param in group["params"]:
            state = inner.state.get(param, {})
            step = state.get("step")
            if isinstance(step, torch.Tensor) and step.device != param.device:
                state["step"] = step.to(param.device)
