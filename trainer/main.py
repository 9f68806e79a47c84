"""dstrain's training entry point: under ``dstrain run``'s spawner, ``deepspeed``, ``torchrun``,
a bare ``srun`` task per rank, or plain ``python`` for one rank.

    deepspeed --num_gpus 3 trainer/main.py --stage pretrain [--config recipe.yaml] [--section.key value ...]

Reads like a table of contents: parse the config, build the parts, train, export, close.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import random
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from trainer.config import STAGES, JobConfig, build_config, save_run_yaml
from trainer.dist import DistInfo, check_same_run, global_batch_summary, init_distributed, run_facts
from trainer.errors import DstrainError, user_error
from trainer.signals import INTERRUPTED_EXIT_CODE, Interrupted, Preemption

log = logging.getLogger("dstrain")


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stage", choices=STAGES, default=None, help="pretrain | cpt | sft")
    parser.add_argument("--config", default=None, help="recipe YAML (default: trainer/recipes/<stage>.yaml)")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        help="continue from the newest complete checkpoint in output_dir, from PATH, or 'auto' "
        "(resume if one exists, else start fresh)",
    )
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="load the resumed checkpoint's pickles without checking what they import (only for "
        "checkpoints you wrote yourself: a pickle can run code)",
    )
    parser.add_argument(
        "--verify-checkpoint",
        choices=("size", "full"),
        default="size",
        help="before a resume, check every file's size against the manifest (size), or also its "
        "crc32, reading every byte (full; done anyway after a failed load)",
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_known_args(argv)


def quiet_stdout(quiet: bool) -> contextlib.AbstractContextManager:
    """Swallow what libraries print to stdout inside (log.library_logs: true shows it)."""
    return contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run(
    job: JobConfig,
    dist: DistInfo,
    resume: str | None,
    preemption: Preemption,
    console: object = None,
    args: argparse.Namespace | None = None,
) -> int:
    """Build the parts and train; returns the exit code. Imports are local so `--help` and
    config errors stay fast."""
    from trainer import checkpoint as ckpt
    from trainer.data import build_eval_batches, build_train_data
    from trainer.ds_config import build_ds_config, resolve_precision, write_ds_config
    from trainer.engine import apply_hyperparameters, build_engine
    from trainer.loop import Trainer, total_steps_for
    from trainer.metrics import callbacks_for
    from trainer.model import build_model
    from trainer.optim import param_group_names
    from trainer.planner import plan_for_ranks
    from trainer.reporters import reporters_of
    from trainer.signals import PREEMPTED_EXIT_CODE
    from trainer.tokenizer import load_tokenizer
    from trainer.train_module import TrainModule

    on_gpu = dist.device.startswith("cuda")
    precision = resolve_precision(job.model.dtype, on_gpu, on_gpu and torch.cuda.is_bf16_supported())
    out = Path(job.output_dir)
    trust, full = (args.trust_checkpoint, args.verify_checkpoint == "full") if args else (False, False)
    resume_path = ckpt.resolve_resume(resume, job.output_dir, dist, full_verify=full, trust=trust)
    saved = ckpt.saved_config(resume_path) if resume_path is not None else None
    job = plan_for_ranks(job, dist, precision, saved)  # zero.stage, micro-batch, workers: auto
    # fail fast on an architecture, LoRA, ZeRO-3 boundary or base change, before building anything
    base_checked = resume_path is None or ckpt.check_resume(resume_path, job)
    tokenizer = load_tokenizer(job.tokenizer_path, job.model.trust_remote_code)
    train_data = build_train_data(job.data, tokenizer, dist, job.seed, job.train.micro_batch_size)
    check_same_run(
        run_facts(job.to_dict(), train_data.fingerprint["files"], train_data.fingerprint["tokenizer"]), dist
    )
    eval_batches = build_eval_batches(job.data, tokenizer, dist, job.train.micro_batch_size)
    total_steps = total_steps_for(job, train_data)
    ds_config = build_ds_config(job, precision, on_gpu)
    seed_everything(job.seed)
    model = build_model(job, tokenizer, precision, on_gpu, ds_config)
    if not base_checked:  # a hub base that was not on this machine before build_model fetched it
        ckpt.check_base(resume_path, job)
    if resume_path is not None and ckpt.needs_universal(resume_path, dist.world_size, job.zero.stage):
        ckpt.prepare_universal(resume_path, dist, param_group_names(model, job.optim))
        ds_config["checkpoint"] = {"load_universal": True}
    engine = build_engine(job, model, ds_config, total_steps)
    if dist.is_main:
        save_run_yaml(job, out)
        write_ds_config(ds_config, out / "ds_config.json")
        log.info("training %d optimizer steps on %d rank(s); output in %s", total_steps, dist.world_size, out)
        log.info(
            global_batch_summary(
                job.train.micro_batch_size, job.train.grad_accum, dist.world_size, job.data.max_seq_len
            )
        )
    callbacks = callbacks_for(job, dist, total_steps, console, engine.module.config, tokenizer)
    trainer = Trainer(
        job,
        dist,
        TrainModule(engine, dist),
        train_data,
        eval_batches,
        total_steps,
        callbacks,
        preemption=preemption,
    )
    trainer.checkpointer = ckpt.Checkpointer(
        job.output_dir,
        dist,
        engine,
        shared={"trainer": trainer.state, "trackers": reporters_of(callbacks)},  # tracker run ids
        per_rank={"data": train_data, "rng": ckpt.RNGState()},
        keep_last=job.train.keep_last,
        write_extras=lambda path: write_checkpoint_extras(path, job, engine, tokenizer),
        meta={"precision": precision, "base_fingerprint": ckpt.base_fingerprint(job.model.name_or_path)},
        exclude_frozen=job.lora.enabled,  # a LoRA checkpoint holds the adapter, not the frozen base
    )
    resumed_at = None
    if resume_path is not None:
        trainer.checkpointer.load(resume_path)
        apply_hyperparameters(engine, job)
        resumed_at = trainer.state.step
        log.info("resuming at step %d (epoch %d)", trainer.state.step, trainer.state.epoch)
    if trainer.finished:  # a resume of a finished run leaves its checkpoints alone
        log.info("the run already finished at step %d: nothing to train", trainer.state.step)
    else:
        trainer.fit()
        if trainer.stop_requested:
            log.warning(
                "stopped by a signal after saving step %d; exit %d", trainer.state.step, PREEMPTED_EXIT_CODE
            )
            return PREEMPTED_EXIT_CODE
    export_final(job, engine, tokenizer, dist, precision, fresh=trainer.state.last_save_step != resumed_at)
    return 0


def write_checkpoint_extras(path: Path, job: JobConfig, engine: object, tokenizer: object) -> None:
    """What an offline export needs beside the engine's files (rank 0, inside every save)."""
    from trainer.export import ADAPTER_CONFIG

    (path / "run.yaml").write_text(job.to_yaml(), encoding="utf-8")
    engine.module.config.save_pretrained(path / "hf_config")
    tokenizer.save_pretrained(str(path / "tokenizer"))
    if job.lora.enabled:
        engine.module.peft_config["default"].save_pretrained(str(path / ADAPTER_CONFIG))


def export_final(
    job: JobConfig, engine: object, tokenizer: object, dist: DistInfo, precision: str, fresh: bool
) -> Path:
    """``<output_dir>/hf/`` (or ``adapter/`` for LoRA): written after training, or when missing."""
    from trainer.export import export_live

    out = Path(job.output_dir) / ("adapter" if job.lora.enabled else "hf")
    if fresh or not out.is_dir():
        export_live(engine, tokenizer, out, dist, adapter=job.lora.enabled, precision=precision)
    return out


def main(argv: list[str] | None = None) -> int:
    # torch.distributed's deprecation notices, raised inside DeepSpeed on every rank.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    args, overrides = parse_args(argv)
    try:
        dist = DistInfo.from_env()
    except DstrainError as exc:  # the launcher's variables, or more ranks than GPUs
        return user_error(exc)
    os.environ.update(dist.library_env())  # before DeepSpeed is imported: it reads some at import
    # From the first moment: a stop signal during start-up (DeepSpeed init, data, model: minutes
    # on a big model) is remembered and honoured after the first step, instead of killing the rank.
    preemption = Preemption()
    preemption.install()
    try:
        job = build_config(stage=args.stage, config_path=args.config, overrides=overrides)
        from trainer.metrics import setup_logging

        console = setup_logging(job.output_dir, dist, job.log.library_logs)
        if dist.is_main:
            from trainer.doctor import summary_line

            log.info(summary_line(job, dist))
        with quiet_stdout(not job.log.library_logs):  # DeepSpeed prints its op builds per rank
            init_distributed(dist, job.train.collective_timeout_s)
        return run(job, dist, args.resume, preemption, console, args)
    except Interrupted as exc:
        # The half-built process group is left alone: tearing it down could wait again.
        print(f"dstrain: interrupted: [rank{dist.rank}] {exc}", file=sys.stderr, flush=True)
        os._exit(INTERRUPTED_EXIT_CODE)
    except DstrainError as exc:
        return user_error(f"[rank{dist.rank}] {exc}")
    finally:
        preemption.uninstall()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
