"""The ``dstrain`` command: resolve a recipe, write the run files, launch DeepSpeed.

Subcommands::

    dstrain run RECIPE [--nodes N] [--gpus-per-node G] [--hostfile F | --no-ssh --node-rank K
                       --master-addr A --master-port P] [--dry-run] [--resume [PATH|auto]] [...]
    dstrain slurm RECIPE --nodes N --gpus-per-node G [--partition P --time T ...] > job.sbatch
    dstrain ds-config [RECIPE] [--zero 0-3] [--offload-optimizer] ... [--section.key value ...]
    dstrain data ... | export ... | ckpt ...      (handed to the trainer's tools)

``--section.key value`` overrides may go anywhere after the subcommand. A ``DstrainError``
(bad config, data or checkpoint) is shown as one ``dstrain: error: ...`` line, exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from launcher.hosts import forwarded_env, read_hostfile, write_deepspeed_env
from launcher.launch import (
    Hardware,
    LaunchPlan,
    build_launch_command,
    detect_hardware,
    exec_command,
    free_port,
    node_local_config,
    spawn_command,
    trainer_script,
    write_node_local_config,
)
from launcher.preflight import preflight
from launcher.slurm import QUEUE_OPTIONS, TEMPLATE, SlurmJob, render_sbatch
from trainer.config import (
    JobConfig,
    build_config,
    deep_merge,
    parse_overrides,
    resolve_recipe,
    save_run_yaml,
    set_dotted,
    split_overrides,
)
from trainer.dist import global_batch_summary
from trainer.ds_config import PRECISIONS, build_ds_config, dump_ds_config, resolve_precision, write_ds_config
from trainer.errors import ConfigError, DstrainError, user_error
from trainer.planner import is_auto, rows_per_rank

# Subcommands whose arguments belong to another module's ``main(argv)``: (module, function).
DELEGATED: dict[str, tuple[str, str, str]] = {
    "data": ("trainer.data.tools", "main", "Prepare and inspect data (json/jsonl -> parquet, stats)."),
    "export": ("trainer.export", "export_main", "Export a checkpoint to Hugging Face format."),
    "ckpt": ("trainer.export", "ckpt_main", "List, check and convert checkpoints."),
    "doctor": (
        "trainer.doctor",
        "doctor_main",
        "Check that this machine can run a recipe (GPUs, ops, disk).",
    ),
    "estimate": ("launcher.estimate", "main", "Plan memory per GPU (ZeRO 0-3), micro-batch and time."),
    "plot": ("trainer.plots", "main", "Draw loss curves from runs' metrics.jsonl, overlaid."),
}


def format_config_help() -> str:
    """Every ``--section.key`` with its default and help text, one per line."""
    rows = JobConfig.help_rows()
    key_width = max(len(key) for key, _, _ in rows)
    default_width = min(24, max(len(default) for _, default, _ in rows))
    lines = ["Config keys (override any with --section.key value; values parse as YAML):"]
    for key, default, text in rows:
        lines.append(f"  {key:<{key_width}}  {default:<{default_width}}  {text}")
    return "\n".join(lines)


def write_run_files(cfg: JobConfig, on_gpu: bool, bf16_ok: bool) -> Path:
    """Write <output_dir>/run.yaml and ds_config.json; returns the run.yaml path (absolute)."""
    precision = resolve_precision(cfg.model.dtype, on_gpu, bf16_ok)
    run_yaml = save_run_yaml(cfg, cfg.output_dir).resolve()
    if is_auto(cfg):  # the ranks plan on the GPUs they find, then rewrite both files
        print(
            f"dstrain: wrote {run_yaml} ({precision}); zero.stage, micro-batch or checkpointing is auto: "
            "the ranks choose on their GPUs, log the choice and write it into run.yaml and ds_config.json",
            file=sys.stderr,
        )
        return run_yaml
    ds_path = write_ds_config(build_ds_config(cfg, precision, on_gpu), run_yaml.parent / "ds_config.json")
    print(
        f"dstrain: wrote {run_yaml} and {ds_path.name} ({precision}, ZeRO-{cfg.zero.stage})", file=sys.stderr
    )
    return run_yaml


def say_global_batch(cfg: JobConfig, world_size: int) -> None:
    train = cfg.train
    if train.micro_batch_size == "auto":
        rows, note = rows_per_rank(cfg, world_size)
        if note:
            print(f"dstrain: {note}", file=sys.stderr)
        print(
            f"dstrain: global batch = {rows * world_size} sequences ({rows * world_size * cfg.data.max_seq_len} "
            "tokens); the micro-batch is auto (the ranks log it)",
            file=sys.stderr,
        )
        return
    summary = global_batch_summary(train.micro_batch_size, train.grad_accum, world_size, cfg.data.max_seq_len)
    print(f"dstrain: {summary}", file=sys.stderr)


def run_topology(args: argparse.Namespace, hardware: Hardware) -> tuple[int, int, int]:
    """(nodes, ranks per node, world size) from the run options, checked against each other."""
    if args.hostfile is not None and args.no_ssh:
        raise ConfigError("--hostfile (DeepSpeed's launcher over pdsh) and --no-ssh exclude each other")
    if args.node_rank is not None and not args.no_ssh:
        raise ConfigError("--node-rank goes with --no-ssh (the same command on every node)")
    gpus = args.gpus if args.gpus is not None else max(1, hardware.gpu_count)
    if gpus < 1:
        raise ConfigError(f"--gpus-per-node must be >= 1, got {gpus}")
    if hardware.on_gpu and gpus > hardware.gpu_count:
        raise ConfigError(f"--gpus-per-node {gpus} but only {hardware.gpu_count} CUDA GPUs are visible")
    if args.hostfile is not None:
        hosts = read_hostfile(args.hostfile)
        nodes = args.nodes if args.nodes is not None else len(hosts)
        if not 1 <= nodes <= len(hosts):
            raise ConfigError(f"--nodes {nodes} but --hostfile {args.hostfile} lists {len(hosts)} host(s)")
        return nodes, gpus, sum(min(h.slots, gpus) for h in hosts[:nodes])
    nodes = args.nodes if args.nodes is not None else 1
    if nodes < 1:
        raise ConfigError(f"--nodes must be >= 1, got {nodes}")
    if nodes > 1 and not args.no_ssh:
        raise ConfigError(
            f"--nodes {nodes} needs --hostfile F (DeepSpeed's launcher, ssh to every node) or --no-ssh "
            "--node-rank K --master-addr A --master-port P (the same command on every node)"
        )
    if nodes > 1:
        missing = [
            flag for flag in ("node_rank", "master_addr", "master_port") if getattr(args, flag) is None
        ]
        if missing:
            flags = ", ".join("--" + m.replace("_", "-") for m in missing)
            raise ConfigError(
                f"--no-ssh on {nodes} nodes needs {flags}: every node must name the same master"
            )
    node_rank = args.node_rank or 0
    if not 0 <= node_rank < nodes:
        raise ConfigError(f"--node-rank {node_rank} must be in 0..{nodes - 1} (--nodes {nodes})")
    return nodes, gpus, nodes * gpus


def checkpoint_flags(args: argparse.Namespace) -> list[str]:
    """The resume's checkpoint options, for the trainer (the last arguments of every launch
    command, whichever launcher starts it)."""
    flags = ["--trust-checkpoint"] if args.trust_checkpoint else []
    return flags + (["--verify-checkpoint", "full"] if args.verify_checkpoint == "full" else [])


def cmd_run(args: argparse.Namespace, overrides: list[str]) -> int:
    """``dstrain run``: resolve, write the run files, print this node's command and become it.

    Only node 0 writes into output_dir; another node (``--no-ssh --node-rank K``) keeps its
    copy of run.yaml in a node-local temp dir. ``--dry-run`` prints every node's command.
    """
    if args.help_config:
        print(format_config_help())
        return 0
    if args.recipe is None:
        raise ConfigError("dstrain run needs a RECIPE: a YAML file or a built-in name such as pretrain")
    cfg = build_config(config_path=resolve_recipe(args.recipe), overrides=overrides)
    hardware = detect_hardware()
    nodes, gpus, world_size = run_topology(args, hardware)
    if not args.dry_run:  # paths, files and --resume, before anything is spawned or written
        preflight(cfg, args.resume)
    node_rank = args.node_rank or 0
    env = forwarded_env(os.environ, args.env)
    if node_rank == 0:
        run_yaml = write_run_files(cfg, hardware.on_gpu, hardware.bf16_supported)
    else:
        run_yaml = write_node_local_config(cfg.to_yaml())
        print(f"dstrain: node {node_rank} reads its node-local copy {run_yaml}", file=sys.stderr)
    say_global_batch(cfg, world_size)
    plan = LaunchPlan(
        run_yaml=run_yaml,
        gpus_per_node=gpus,
        nodes=nodes,
        node_rank=node_rank,
        master_addr=args.master_addr,
        master_port=args.master_port if args.master_port is not None or args.hostfile else free_port(),
        resume=args.resume,
        launcher="pdsh" if args.hostfile is not None else "local",
        hostfile=args.hostfile,
    )
    launch_env = dict(os.environ)
    if plan.launcher == "pdsh":
        # DeepSpeed's runner exports these on every node; DS_ENV_FILE names the file (an
        # absolute name is used as it is), so nothing is written into ~ or the working dir.
        env_file = write_deepspeed_env(env, run_yaml.parent / ".deepspeed_env")
        launch_env["DS_ENV_FILE"] = str(env_file)
        print(
            f"dstrain: every node gets {', '.join(env) or 'no extra variables'} ({env_file})", file=sys.stderr
        )
    elif nodes > 1 and env:
        print(
            f"dstrain: --no-ssh: each node's ranks inherit that node's environment; set "
            f"{', '.join(env)} the same way on every node",
            file=sys.stderr,
        )
    cmd = build_launch_command(plan) + checkpoint_flags(args)
    if args.dry_run and plan.launcher == "local" and nodes > 1:
        shared = Path(cfg.output_dir).resolve() / "run.yaml"
        for k in range(nodes):
            node_yaml = shared if k == 0 else node_local_config(cfg.to_yaml())
            print(f"# node {k} of {nodes}")
            print(shlex.join(spawn_command(plan, node_rank=k, run_yaml=node_yaml) + checkpoint_flags(args)))
        return 0
    prefix = f"DS_ENV_FILE={shlex.quote(launch_env['DS_ENV_FILE'])} " if plan.launcher == "pdsh" else ""
    print(prefix + shlex.join(cmd), flush=True)
    if args.dry_run:
        return 0
    exec_command(cmd, launch_env)


def cmd_slurm(args: argparse.Namespace, overrides: list[str]) -> int:
    """``dstrain slurm``: resolve, write the run files, print the sbatch script."""
    cfg = build_config(config_path=resolve_recipe(args.recipe), overrides=overrides)
    on_gpu = args.device == "gpu"
    run_yaml = write_run_files(cfg, on_gpu=on_gpu, bf16_ok=on_gpu)
    say_global_batch(cfg, args.nodes * args.gpus)
    workdir = (args.workdir or Path.cwd()).resolve()
    job = SlurmJob(
        title=f"dstrain {cfg.stage}: rendered by `dstrain slurm` from {args.template.name}; edit either by hand.",
        run_yaml=run_yaml,
        workdir=workdir,
        python=args.python,
        trainer_script=trainer_script(),
        nodes=args.nodes,
        tasks_per_node=args.gpus,
        gpus_per_node=args.gpus if on_gpu else 0,
        job_name=args.job_name or run_yaml.parent.name,
        output=args.log or str(run_yaml.parent / "slurm-%j.out"),
        signal_lead_s=args.signal_lead_s,
        **{name: getattr(args, name) for name in QUEUE_OPTIONS},
        cpus_per_task=args.cpus_per_task,
        extra_sbatch=tuple(args.sbatch),
        env=forwarded_env(os.environ, args.env),
    )
    sys.stdout.write(render_sbatch(job, args.template))
    return 0


#: ``dstrain ds-config``'s shorthand flags: (flag, the ``--section.key`` it sets, argparse options).
DS_CONFIG_SHORTHANDS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("--zero", "zero.stage", {"type": int, "choices": (0, 1, 2, 3), "help": "ZeRO stage (--zero.stage)."}),
    (
        "--offload-optimizer",
        "zero.offload_optimizer",
        {"action": "store_true", "help": "Offload optimizer state to the CPU."},
    ),
    (
        "--offload-params",
        "zero.offload_params",
        {"action": "store_true", "help": "Offload parameters to the CPU (ZeRO-3)."},
    ),
    (
        "--micro-batch-size",
        "train.micro_batch_size",
        {"type": int, "metavar": "N", "help": "Sequences per rank per forward pass."},
    ),
    (
        "--grad-accum",
        "train.grad_accum",
        {"type": int, "metavar": "N", "help": "Micro-batches per optimizer step."},
    ),
)


def cmd_ds_config(args: argparse.Namespace, overrides: list[str]) -> int:
    """``dstrain ds-config``: print the DeepSpeed JSON a recipe (or the defaults) gives."""
    flags: dict[str, Any] = {}
    for _, key, _ in DS_CONFIG_SHORTHANDS:
        if (value := getattr(args, key)) is not None:
            set_dotted(flags, key, value)
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
    if cfg.zero.stage == "auto" or cfg.train.micro_batch_size == "auto":
        raise ConfigError(
            "zero.stage or train.micro_batch_size is auto, which the ranks choose at start: pass --zero N "
            "and --micro-batch-size M (`dstrain estimate RECIPE --gpus G` shows what auto would take)"
        )
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


def add_placement_options(
    parser: argparse.ArgumentParser,
    gpus_help: str,
    nodes_help: str,
    default: int | None = None,
    gpus_required: bool = False,
) -> None:
    """``--gpus-per-node G`` (alias ``--gpus``) and ``--nodes N``, spelled alike by every command
    that places ranks (run, slurm, estimate); each command's help says what None means there."""
    parser.add_argument(
        "--gpus-per-node",
        "--gpus",
        dest="gpus",
        type=int,
        default=default,
        required=gpus_required,
        metavar="G",
        help=gpus_help,
    )
    parser.add_argument("--nodes", type=int, default=default, metavar="N", help=nodes_help)


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
        "print this node's launch command and run it. The exit status is the run's: 0 done, 2 a "
        "config/data/checkpoint error, 75 saved after SIGTERM/SIGUSR1/SIGINT (requeue me).",
        epilog="Examples: dstrain run pretrain --gpus-per-node 8 --train.max_steps 1000 --optim.lr 3e-4; "
        "on each of 2 nodes: dstrain run pretrain --nodes 2 --gpus-per-node 8 --no-ssh --node-rank K "
        "--master-addr 10.0.0.1 --master-port 29500",
        allow_abbrev=False,
    )
    run.add_argument(
        "recipe",
        nargs="?",
        metavar="RECIPE",
        help="Recipe YAML file, or a built-in name (pretrain, cpt, sft, ...).",
    )
    add_placement_options(
        run,
        "Ranks per node (default: visible CUDA GPUs, or 1 on CPU, where ranks are gloo processes).",
        "Nodes (default 1; with --hostfile, its hosts).",
    )
    run.add_argument(
        "--hostfile",
        type=Path,
        default=None,
        metavar="F",
        help="DeepSpeed hostfile ('HOST slots=N' lines): run DeepSpeed's launcher, which reaches "
        "the other nodes over pdsh/ssh.",
    )
    run.add_argument(
        "--no-ssh",
        action="store_true",
        help="Run this command on every node yourself, each with its --node-rank: no ssh needed.",
    )
    run.add_argument(
        "--node-rank", type=int, default=None, metavar="K", help="With --no-ssh: this node's index, 0..N-1."
    )
    run.add_argument(
        "--master-addr",
        default=None,
        metavar="A",
        help="Address of node 0, reachable from every node (--no-ssh, --hostfile).",
    )
    run.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME[=VALUE]",
        help="Also forward this variable to every node (NCCL_*, GLOO_*, CUDA_*, HF_HOME, PYTHONPATH always are).",
    )
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="Write run.yaml and ds_config.json and print the command (every node's with --no-ssh); "
        "do not run.",
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
    run.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="With --resume: load the checkpoint's pickles without checking what they import "
        "(only for checkpoints you wrote yourself: DeepSpeed unpickles its files with weights_only=False).",
    )
    run.add_argument(
        "--verify-checkpoint",
        choices=("size", "full"),
        default="size",
        help="With --resume: check each file's size against the manifest (size), or its crc32 too, "
        "reading every byte (full; done anyway after a failed load).",
    )
    run.add_argument(
        "--master-port",
        type=int,
        default=None,
        metavar="P",
        help="Rendezvous port on node 0 (one node: a free port).",
    )
    run.add_argument(
        "--help-config",
        action="store_true",
        help="List every --section.key with its default and help, then exit.",
    )

    slurm = sub.add_parser(
        "slurm",
        help="Print an sbatch script (srun one task per rank, pre-emption requeue) for a recipe.",
        description="Resolve RECIPE plus overrides, write <output_dir>/run.yaml and ds_config.json, and "
        "print an sbatch script rendered from scripts/slurm/template.sbatch.in: one srun task per rank, "
        "SIGUSR1 before the time limit, a save and a requeue on exit 75, --resume auto on restart.",
        epilog="Example: dstrain slurm pretrain --nodes 4 --gpus-per-node 8 --partition gpu --time 48:00:00 "
        "> pretrain.sbatch && sbatch pretrain.sbatch",
        allow_abbrev=False,
    )
    slurm.add_argument("recipe", metavar="RECIPE", help="Recipe YAML file, or a built-in name.")
    add_placement_options(slurm, "GPUs, and so ranks, per node.", "Nodes (#SBATCH --nodes).", default=1)
    slurm.add_argument(
        "--device",
        choices=("gpu", "cpu"),
        default="gpu",
        help="cpu: gloo ranks, no --gpus-per-node request (--gpus-per-node is then the ranks per node).",
    )
    for name, text in QUEUE_OPTIONS.items():
        slurm.add_argument(f"--{name}", default=None, help=text)
    slurm.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per rank (dataloader workers).")
    slurm.add_argument(
        "--job-name", default=None, help="#SBATCH --job-name (default: the output dir's name)."
    )
    slurm.add_argument(
        "--signal-lead-s",
        type=int,
        default=300,
        help="Seconds before the time limit at which SLURM sends SIGUSR1: one step plus one save must fit.",
    )
    slurm.add_argument(
        "--log", default=None, help="The job's output file (default: <output_dir>/slurm-%%j.out, appended)."
    )
    slurm.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="OPTION",
        help="Another #SBATCH option, e.g. --sbatch=--mem=200G --sbatch=--exclusive.",
    )
    slurm.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME[=VALUE]",
        help="Also export this variable to every rank (NCCL_*, GLOO_*, CUDA_*, HF_HOME, PYTHONPATH always are).",
    )
    slurm.add_argument(
        "--python", default=sys.executable, help="The Python of the compute nodes (default: this one)."
    )
    slurm.add_argument(
        "--workdir", type=Path, default=None, help="Directory the job runs in (default: the current one)."
    )
    slurm.add_argument("--template", type=Path, default=TEMPLATE, help="The sbatch template to render.")

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
    for flag, key, options in DS_CONFIG_SHORTHANDS:
        ds.add_argument(flag, dest=key, default=None, **options)
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
    return parser, {"run": run, "slurm": slurm, "ds-config": ds}


HANDLERS: dict[str, Callable[[argparse.Namespace, list[str]], int]] = {
    "run": cmd_run,
    "slurm": cmd_slurm,
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
        return user_error(exc)


if __name__ == "__main__":
    sys.exit(main())
