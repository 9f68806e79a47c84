"""The ``dstrain`` command: resolve a recipe, write the run files, launch DeepSpeed.

Subcommands::

    dstrain run RECIPE [--gpus N] [--dry-run] [--resume [PATH|auto]] [--section.key value ...]
    dstrain ds-config [RECIPE] [--zero 0-3] [--offload-optimizer] ... [--section.key value ...]
    dstrain data ... | export ... | ckpt ...      (handed to the trainer's tools)

``--section.key value`` overrides may go anywhere after the subcommand. A ``DstrainError``
(bad config, data or checkpoint) is shown as one ``dstrain: error: ...`` line, exit status 2.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from launcher.launch import (
    LaunchPlan,
    build_launch_command,
    detect_hardware,
    free_port,
    run_and_wait,
    visible_cuda_devices,
)
from trainer.config import (
    RECIPES_DIR,
    JobConfig,
    build_config,
    deep_merge,
    is_number,
    parse_overrides,
    save_run_yaml,
)
from trainer.ds_config import PRECISIONS, build_ds_config, dump_ds_config, resolve_precision, write_ds_config
from trainer.errors import ConfigError, DstrainError

# Subcommands whose arguments belong to another module's ``main(argv)``: (module, function).
DELEGATED: dict[str, tuple[str, str, str]] = {
    "data": ("trainer.data.tools", "main", "Prepare and inspect data (json/jsonl -> parquet, stats)."),
    "export": ("trainer.export", "export_main", "Export a checkpoint to Hugging Face format."),
    "ckpt": ("trainer.export", "ckpt_main", "List, check and convert checkpoints."),
    "estimate": ("launcher.estimate", "main", "Plan memory per GPU (ZeRO 0-3), micro-batch and time."),
    "plot": ("trainer.plots", "main", "Draw loss curves from runs' metrics.jsonl, overlaid."),
}


def resolve_recipe(recipe: str) -> Path:
    """A recipe argument as a file: an existing path, else a built-in ``trainer/recipes/<name>.yaml``."""
    path = Path(recipe)
    if path.is_file():
        return path
    builtin = RECIPES_DIR / f"{recipe}.yaml"
    if builtin.is_file():
        return builtin
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    known = f"; built-in recipes: {', '.join(names)}" if names else ""
    raise ConfigError(f"recipe {recipe} is neither a file nor a built-in recipe{known}")


def own_options(parser: argparse.ArgumentParser) -> set[str]:
    """The option strings ``parser`` defines itself (``--gpus``, ``-h`` ...)."""
    # argparse has no public accessor; _actions has been stable since Python 2.7.
    return {s for action in parser._actions for s in action.option_strings}


def split_overrides(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate ``--section.key value`` overrides from the subcommand's own arguments.

    A ``--name`` that is not one of the parser's options is an override and takes the next
    token as its value (unless written ``--name=value``), wherever it appears, so
    ``--optim.lr 1e-3`` never becomes a positional. A near miss of an own option (``--gpu``)
    is an error that names the option rather than a config key.
    """
    options = own_options(parser)
    top_keys = set(JobConfig.__dataclass_fields__)
    own: list[str] = []
    overrides: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        name = token.split("=", 1)[0]
        if not token.startswith("--") or token == "--" or name in options:
            own.append(token)
            i += 1
            continue
        key = name[2:]
        if "." not in key and key not in top_keys:
            close = difflib.get_close_matches(name, sorted(options), n=1, cutoff=0.75)
            if close:
                raise ConfigError(f"unknown option {name}: did you mean {close[0]}?")
        overrides.append(token)
        takes_next = "=" not in token and i + 1 < len(argv)
        if takes_next and (not argv[i + 1].startswith("--") or is_number(argv[i + 1])):
            overrides.append(argv[i + 1])
            i += 1
        i += 1
    return own, overrides


def format_config_help() -> str:
    """Every ``--section.key`` with its default and help text, one per line."""
    rows = JobConfig.help_rows()
    key_width = max(len(key) for key, _, _ in rows)
    default_width = min(24, max(len(default) for _, default, _ in rows))
    lines = ["Config keys (override any with --section.key value; values parse as YAML):"]
    for key, default, text in rows:
        lines.append(f"  {key:<{key_width}}  {default:<{default_width}}  {text}")
    return "\n".join(lines)


def cmd_run(args: argparse.Namespace, overrides: list[str]) -> int:
    """``dstrain run``: resolve, write run.yaml + ds_config.json, print and run the command."""
    if args.help_config:
        print(format_config_help())
        return 0
    if args.recipe is None:
        raise ConfigError("dstrain run needs a RECIPE: a YAML file or a built-in name such as pretrain")
    cfg = build_config(config_path=resolve_recipe(args.recipe), overrides=overrides)
    hardware = detect_hardware()
    gpus = args.gpus if args.gpus is not None else max(1, hardware.gpu_count)
    if gpus < 1:
        raise ConfigError(f"--gpus must be >= 1, got {gpus}")
    if hardware.on_gpu and gpus > hardware.gpu_count:
        raise ConfigError(f"--gpus {gpus} but only {hardware.gpu_count} CUDA GPUs are visible")
    precision = resolve_precision(cfg.model.dtype, hardware.on_gpu, hardware.bf16_supported)
    ds_config = build_ds_config(cfg, precision, hardware.on_gpu)
    run_yaml = save_run_yaml(cfg, cfg.output_dir).resolve()
    ds_path = write_ds_config(ds_config, run_yaml.parent / "ds_config.json")
    print(
        f"dstrain: wrote {run_yaml} and {ds_path.name} ({precision}, ZeRO-{cfg.zero.stage})", file=sys.stderr
    )
    plan = LaunchPlan(
        run_yaml=run_yaml,
        gpus_per_node=gpus,
        resume=args.resume,
        master_port=args.master_port if args.master_port is not None else free_port(),
        visible_devices=visible_cuda_devices() if hardware.on_gpu else None,
    )
    cmd = build_launch_command(plan)
    print(shlex.join(cmd), flush=True)
    if args.dry_run:
        return 0
    return run_and_wait(cmd)


def cmd_ds_config(args: argparse.Namespace, overrides: list[str]) -> int:
    """``dstrain ds-config``: print the DeepSpeed JSON a recipe (or the defaults) gives."""
    flags: dict[str, Any] = {}
    if args.zero is not None:
        flags.setdefault("zero", {})["stage"] = args.zero
    if args.offload_optimizer:
        flags.setdefault("zero", {})["offload_optimizer"] = True
    if args.offload_params:
        flags.setdefault("zero", {})["offload_params"] = True
    if args.micro_batch_size is not None:
        flags.setdefault("train", {})["micro_batch_size"] = args.micro_batch_size
    if args.grad_accum is not None:
        flags.setdefault("train", {})["grad_accum"] = args.grad_accum
    merged = deep_merge(parse_overrides(overrides), flags)
    if args.recipe is not None:
        cfg = build_config(config_path=resolve_recipe(args.recipe), overrides=merged)
    else:
        # No recipe: dataclass defaults; the tokenizer is never loaded here.
        cfg = build_config(base={"tokenizer": "unused"}, overrides=merged)
    if args.device is None:
        hardware = detect_hardware()
        on_gpu, bf16_ok = hardware.on_gpu, hardware.bf16_supported
    else:
        on_gpu, bf16_ok = args.device == "gpu", True
    precision = resolve_precision(args.precision or cfg.model.dtype, on_gpu, bf16_ok)
    sys.stdout.write(dump_ds_config(build_ds_config(cfg, precision, on_gpu)))
    return 0


def cmd_delegated(name: str, argv: list[str]) -> int:
    """Hand ``dstrain <name> ...`` to the trainer module that implements it."""
    module_name, func_name, _ = DELEGATED[name]
    try:
        func: Callable[[list[str]], int | None] = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as exc:
        raise DstrainError(f"dstrain {name} is not available: {module_name}.{func_name} ({exc})") from None
    return func(argv) or 0


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The argparse tree and its subcommand parsers by name.

    ``--section.key`` overrides are split off (with the subcommand's parser) before it parses.
    """
    parser = argparse.ArgumentParser(
        prog="dstrain",
        description="Train causal LMs with DeepSpeed from one YAML recipe.",
        epilog="Config keys: dstrain run --help-config. Overrides: --section.key value, e.g. --optim.lr 3e-4.",
        allow_abbrev=False,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser(
        "run",
        help="Resolve a recipe, write run.yaml and ds_config.json, and launch training.",
        description="Resolve RECIPE plus overrides, write <output_dir>/run.yaml and ds_config.json, "
        "print the deepspeed command and run it (exit status is the run's).",
        epilog="Example: dstrain run pretrain --gpus 8 --train.max_steps 1000 --optim.lr 3e-4",
        allow_abbrev=False,
    )
    run.add_argument(
        "recipe",
        nargs="?",
        metavar="RECIPE",
        help="Recipe YAML file, or a built-in name (pretrain, cpt, sft, ...).",
    )
    run.add_argument(
        "--gpus", type=int, default=None, help="Ranks on this node (default: visible CUDA GPUs, or 1 on CPU)."
    )
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="Write run.yaml and ds_config.json and print the command; do not run.",
    )
    run.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="PATH|auto",
        help="Bare: the newest complete checkpoint in output_dir (an error if there is none). "
        "auto: resume if one exists, else start fresh. PATH: that checkpoint dir.",
    )
    run.add_argument("--master-port", type=int, default=None, help="Rendezvous port (default: a free port).")
    run.add_argument(
        "--help-config",
        action="store_true",
        help="List every --section.key with its default and help, then exit.",
    )

    ds = sub.add_parser(
        "ds-config",
        help="Print the DeepSpeed JSON generated for a recipe or for the defaults.",
        description="Print the DeepSpeed config that build_ds_config generates.",
        allow_abbrev=False,
    )
    ds.add_argument(
        "recipe",
        nargs="?",
        metavar="RECIPE",
        help="Recipe YAML file or built-in name (default: the config defaults).",
    )
    ds.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=None, help="ZeRO stage (--zero.stage).")
    ds.add_argument("--offload-optimizer", action="store_true", help="Offload optimizer state to the CPU.")
    ds.add_argument("--offload-params", action="store_true", help="Offload parameters to the CPU (ZeRO-3).")
    ds.add_argument("--micro-batch-size", type=int, default=None, help="Sequences per rank per forward pass.")
    ds.add_argument("--grad-accum", type=int, default=None, help="Micro-batches per optimizer step.")
    ds.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=None,
        help="Override model.dtype (default: resolved for this machine).",
    )
    ds.add_argument(
        "--device",
        choices=("gpu", "cpu"),
        default=None,
        help="Generate for GPU or CPU (default: this machine).",
    )

    for name, (_, _, text) in DELEGATED.items():
        sub.add_parser(name, help=text, add_help=False)
    return parser, {"run": run, "ds-config": ds}


HANDLERS: dict[str, Callable[[argparse.Namespace, list[str]], int]] = {
    "run": cmd_run,
    "ds-config": cmd_ds_config,
}


def dispatch(argv: list[str]) -> int:
    """Parse ``argv`` and run the subcommand; DstrainErrors propagate to :func:`main`."""
    if argv and argv[0] in DELEGATED:
        return cmd_delegated(argv[0], argv[1:])
    parser, subparsers = build_parser()
    if not argv or argv[0] not in HANDLERS:
        parser.parse_args(argv)  # prints help or the usage error, and exits
        raise AssertionError("argparse should have exited")
    own, overrides = split_overrides(subparsers[argv[0]], argv[1:])
    args = parser.parse_args([argv[0], *own])
    return HANDLERS[args.command](args, overrides)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dstrain`` and ``python -m launcher.cli``; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return dispatch(argv)
    except DstrainError as exc:
        message = " ".join(str(exc).split())
        print(f"dstrain: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
