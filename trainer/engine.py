"""Build the DeepSpeed engine from the job: ZeRO config, optimizer, LR schedule; and put the
job's hyper-parameters into the optimizer after a checkpoint load."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import deepspeed
import torch

from trainer.config import JobConfig
from trainer.optim import DECAY, build_optimizer, make_scheduler, param_groups

log = logging.getLogger("dstrain")
# DeepSpeed releases whose ZeRO-1/2 optimizer the step patches were read against and tested with
# (tests/distributed/test_engine.py: losses and gradient norms of ZeRO 0-3 vs plain torch).
STEP_PATCHES_VERIFIED_ON = ("0.19.8",)


def build_engine(job: JobConfig, model: torch.nn.Module, ds_config: dict[str, Any], total_steps: int) -> Any:
    """deepspeed.initialize with the generated ZeRO config (``build_ds_config``).

    When the config has an ``optimizer`` block (CPU-offloaded Adam, or DeepSpeed's Muon)
    DeepSpeed builds the optimizer from our param groups; otherwise we pass a torch AdamW.
    Either way the LR schedule is ours (a LambdaLR over ``trainer.optim.lr_factor``).
    """
    if "optimizer" in ds_config:
        optimizer, parameters = None, param_groups(model, job.optim)
    else:
        clip_in_optimizer = job.zero.stage == 0 and not ds_config.get("gradient_clipping")
        optimizer = build_optimizer(model, job.optim, job.zero.stage, clip_in_optimizer=clip_in_optimizer)
        parameters = None
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=parameters,
        optimizer=optimizer,
        lr_scheduler=lambda opt: make_scheduler(opt, total_steps, job.schedule),
        config=ds_config,
    )
    # DeepSpeed's ZeRO-1/2 step, with less host work per parameter (each says when it applies;
    # the names applied are kept for the equality tests, which must run the patched path).
    engine.dstrain_step_patches = [
        patch.__name__ for patch in step_patches(deepspeed.__version__) if patch(engine.optimizer)
    ]
    if engine.zero_optimization_stage() == 0 and engine.dp_world_size == 1:
        # One data-parallel rank has nothing to reduce; DeepSpeed would still flatten every
        # gradient into buckets, "all-reduce" them and copy them back at each boundary.
        engine.enable_backward_allreduce = False
    return engine


def step_patches(version: str) -> tuple[Callable[[Any], bool], ...]:
    """The step patches below for this DeepSpeed version: all of them on the versions whose
    ``DeepSpeedZeroOptimizer`` they were written against and tested with, none on any other.

    Each patch replaces a DeepSpeed method with a leaner one that relies on that method's body
    (its bucket bookkeeping, its attribute names). On another release DeepSpeed's own step runs:
    correct, with its per-parameter host work, and the log says so once.
    """
    if version in STEP_PATCHES_VERIFIED_ON:
        return (use_foreach_grad_norm, skip_unneeded_view_reset, batched_copy_back, lean_zero1_bucket_fill)
    log.info(
        "DeepSpeed %s: running its own ZeRO-1/2 step (dstrain's lighter step is verified on DeepSpeed %s)",
        version,
        ", ".join(STEP_PATCHES_VERIFIED_ON),
    )
    return ()


def use_foreach_grad_norm(optimizer: Any) -> bool:
    """ZeRO-1/2's clipping norm with one multi-tensor kernel instead of a Python loop.

    DeepSpeed 0.19.8's ``DeepSpeedZeroOptimizer.get_grad_norm_direct`` calls ``vector_norm`` on
    every gradient of the partition, one kernel and several Python calls each (~290 per step for
    Qwen2.5-0.5B): a large share of the step's host time on few GPUs. For the L2 norm without
    pipeline or model parallelism (dstrain uses neither) this computes the same sum of squares
    with ``torch._foreach_norm``, then the same all-reduce over the data-parallel group and the
    same NaN/inf masking. Anything else keeps DeepSpeed's method. The ZeRO 0-3 equality tests
    (tests/distributed/test_engine.py: losses and gradient norms vs a plain torch loop) cover it.
    """
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if (
        type(optimizer) is not DeepSpeedZeroOptimizer
        or getattr(optimizer, "model_parallel_world_size", 1) != 1
    ):
        return False
    from deepspeed import comm as ds_dist
    from deepspeed.runtime.utils import mask_nan_or_inf_with_val_inplace
    from deepspeed.runtime.zero.utils import get_norm_dtype

    original = optimizer.get_grad_norm_direct

    def get_grad_norm_direct(gradients: list, params: list, norm_type: float = 2) -> Any:
        grads = [g for g in gradients if not getattr(g, "_zero_padding", False)]
        if float(norm_type) != 2.0 or any(getattr(p, "ds_pipe_replicated", False) for p in params):
            return original(gradients, params, norm_type)
        dtype = get_norm_dtype()
        if grads:
            norms = torch._foreach_norm([g.detach() for g in grads], 2.0, dtype=dtype)
            total = torch.stack(norms).pow(2).sum().float()
        else:
            total = torch.zeros((), dtype=torch.float32, device=optimizer.device)
        ds_dist.all_reduce(total, op=ds_dist.ReduceOp.SUM, group=optimizer.dp_process_group)
        total = total.sqrt()
        mask_nan_or_inf_with_val_inplace(total, device=optimizer.device)
        return total

    optimizer.get_grad_norm_direct = get_grad_norm_direct
    return True


def batched_copy_back(optimizer: Any) -> bool:
    """ZeRO-1/2's reduced gradients copied back into the parameters' gradients with one
    multi-tensor copy instead of one ``copy_`` (and one no-op accumulate call) per parameter.

    DeepSpeed 0.19.8's ``allreduce_and_copy`` flattens a bucket of gradients, all-reduces it and
    unflattens it, then walks the bucket in Python. Without ``overlap_comm`` (CPU, ZeRO-1) and
    with no partition buffer to accumulate into, that walk is only the copies: the same copies
    as ``torch._foreach_copy_``. Any other case keeps DeepSpeed's method. Its per-parameter
    bucket-fill report, a no-op unless DeepSpeed's memory logging is forced, goes too.
    """
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if type(optimizer) is not DeepSpeedZeroOptimizer or optimizer.overlap_comm:
        return False
    from deepspeed import comm as ds_dist

    original = optimizer.allreduce_and_copy

    def allreduce_and_copy(
        small_bucket: list,
        communication_data_type: torch.dtype,
        rank: Any = None,
        log: Any = None,
        divide: bool = True,
        process_group: Any = None,
        output_bucket: Any = None,
    ) -> None:
        group = optimizer.dp_process_group if process_group is None else process_group
        if (output_bucket is not None and any(o is not None for o in output_bucket)) or (
            rank is not None and rank != ds_dist.get_rank(group=group)
        ):
            return original(
                small_bucket,
                communication_data_type,
                rank=rank,
                log=log,
                divide=divide,
                process_group=process_group,
                output_bucket=output_bucket,
            )
        reduced = optimizer.allreduce_bucket(
            small_bucket, communication_data_type, rank=rank, log=log, divide=divide, process_group=group
        )
        torch._foreach_copy_(small_bucket, optimizer.unflatten(reduced, small_bucket))

    optimizer.allreduce_and_copy = allreduce_and_copy
    # Called twice per parameter per step to log bucket fill; it ends in DeepSpeed's
    # see_memory_usage(force=False), which returns at once: only the Python calls were left.
    optimizer.report_ipg_memory_usage = lambda *args, **kwargs: None
    return True


def lean_zero1_bucket_fill(optimizer: Any) -> bool:
    """ZeRO-1's end-of-backward bucket fill without DeepSpeed's per-parameter call chain.

    Without gradient hooks (ZeRO-1, no ``overlap_comm``), DeepSpeed 0.19.8's
    ``reduce_gradients`` walks every parameter through ``reduce_ready_partitions_and_remove_grads``
    -> ``reduce_independent_p_g_buckets_and_remove_grads``: about ten Python calls each
    (autocast, MoE, AutoEP, offload-safety and memory-report checks that are all off here) to
    append the gradient to its communication-dtype bucket. This appends the same gradients
    with the same bookkeeping (``bucket.grads``, ``bucket.params``, ``bucket.elements``; a full
    bucket is reduced first, as DeepSpeed does), then runs DeepSpeed's own epilogue, which
    reduces the buckets and builds the partition. Anything outside that case (ZeRO-2,
    ``overlap_comm``, contiguous gradients, offload, MoE, AutoEP, pipelines) keeps DeepSpeed's
    method.
    """
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if (
        type(optimizer) is not DeepSpeedZeroOptimizer
        or optimizer.partition_gradients
        or optimizer.overlap_comm
        or optimizer.contiguous_gradients
        or optimizer.cpu_offload
        or getattr(optimizer, "zenflow", False)
        or getattr(optimizer, "autoep_folding_tp_group", None) is not None
        or getattr(optimizer, "has_moe_layers", False)
    ):
        return False
    original = optimizer.reduce_gradients
    comm_dtypes: dict[int, torch.dtype] = {}  # fixed per parameter once autocast is set up

    def reduce_gradients(pipeline_parallel: bool = False) -> None:
        if pipeline_parallel:
            return original(pipeline_parallel)
        if optimizer.is_gradient_accumulation_boundary():
            already = optimizer.params_already_reduced
            for i, group in enumerate(optimizer.bit16_groups):
                for param in group:
                    grad = optimizer.get_gradient_for_reduction(param)
                    numel = param.numel()
                    if grad is None or numel == 0 or not getattr(param, "ds_grad_is_ready", True):
                        continue
                    key = id(param)
                    if key not in comm_dtypes:
                        comm_dtypes[key] = optimizer.get_param_comm_dtype(param)
                    bucket = optimizer.ipg_buckets[comm_dtypes[key]]
                    if bucket.elements + numel > optimizer.reduce_bucket_size:
                        optimizer.reduce_ipg_grads(comm_dtype=comm_dtypes[key])
                    param_id = optimizer.get_param_id(param)
                    assert not already[param_id], f"gradient of parameter {param_id} reduced twice"
                    bucket.elements += numel
                    bucket.grads.append(grad)
                    bucket.params.append((i, param.param_idx_in_group, param_id))
        optimizer.overlapping_partition_gradients_reduce_epilogue()

    optimizer.reduce_gradients = reduce_gradients
    return True


def skip_unneeded_view_reset(optimizer: Any) -> bool:
    """Let ZeRO-1/2's step skip re-pointing every parameter at its flat buffer when none moved.

    DeepSpeed 0.19.8's ``DeepSpeedZeroOptimizer`` makes each parameter a view of its group's
    flat buffer once, at start, then after every step sets ``p.data`` to the same view again
    ("TODO: we probably don't need this? just to be safe"): two ``narrow``/``view``/``.data``
    assignments per parameter, ~580 Python calls per step for Qwen2.5-0.5B. The all-gather
    writes the buffer in place, so the views stay valid; this compares each parameter's
    storage pointer with the one its view had (one cheap call each) and does DeepSpeed's reset
    only when one differs (a checkpoint load, or anything that replaced ``p.data``). The
    re-pointing outside ``step`` (init, loads) is untouched.
    """
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if type(optimizer) is not DeepSpeedZeroOptimizer:
        return False
    original_update = optimizer._update_model_bit16_weights
    original_step = optimizer.step
    views: dict[int, list[tuple[torch.Tensor, int]]] = {}

    def remember(group_index: int) -> None:
        original_update(group_index)
        views[group_index] = [(p, p.data_ptr()) for p in optimizer.bit16_groups[group_index]]

    def update_if_moved(group_index: int) -> None:
        pairs = views.get(group_index)
        if pairs is None or any(p.data_ptr() != ptr for p, ptr in pairs):
            remember(group_index)

    def step(*args: Any, **kwargs: Any) -> Any:
        optimizer._update_model_bit16_weights = update_if_moved
        try:
            return original_step(*args, **kwargs)
        finally:
            optimizer._update_model_bit16_weights = remember

    optimizer._update_model_bit16_weights = remember
    optimizer.step = step
    return True


def optimizer_groups(engine: Any) -> list[dict[str, Any]]:
    """The param groups the optimizer steps with (the ones the LR scheduler drives).

    DeepSpeed builds our LambdaLR on the basic optimizer, whose groups hold the real values;
    ZeRO wrappers expose the same group dicts.
    """
    scheduler = engine.lr_scheduler
    return scheduler.optimizer.param_groups if scheduler is not None else engine.optimizer.param_groups


def apply_hyperparameters(engine: Any, job: JobConfig) -> None:
    """After a checkpoint load the optimizer holds the *saved* hyper-parameters (torch's
    ``Optimizer.load_state_dict`` restores every group's values); put the job's in place so a
    changed lr, betas, eps, weight decay or Muon momentum applies from the resumed step on.

    A group's role comes from its ``name`` (``trainer.optim.param_groups`` names them, and
    DeepSpeed's Muon keeps the name as a prefix), not from its current weight decay, so a
    weight decay raised from 0 reaches the decayed group and never the biases and norms.
    """
    optim = job.optim
    groups = optimizer_groups(engine)
    scheduler = engine.lr_scheduler
    defaults = (scheduler.optimizer if scheduler is not None else engine.optimizer).defaults
    base_lrs = []
    for group in groups:
        muon = bool(group.get("use_muon"))
        if "betas" in group:
            group["betas"] = tuple(optim.betas)
        if "eps" in group:
            group["eps"] = optim.eps
        if muon and "momentum" in group:
            group["momentum"] = optim.muon_momentum
        if "weight_decay" in group:
            decayed = str(group.get("name", "")).startswith(DECAY)
            group["weight_decay"] = optim.weight_decay if decayed else 0.0
        for kernel in ("fused", "foreach"):  # a saved group brings its kernel choice back
            if kernel in group and kernel in defaults:
                group[kernel] = defaults[kernel]
        base_lrs.append(optim.muon_lr if muon else optim.lr)
    if scheduler is not None and base_lrs:
        scheduler.base_lrs = base_lrs
        factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
        for group, base in zip(groups, base_lrs, strict=True):
            group["lr"] = base * factor
        scheduler._last_lr = [g["lr"] for g in groups]
