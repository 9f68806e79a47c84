"""The job configuration: one dataclass per concern, composed into :class:`JobConfig`.

Precedence: dataclass defaults < the recipe (``--config FILE``, or the stage's default recipe
in ``trainer/recipes/``) < ``--section.key value`` overrides. Values on the command line parse
as YAML, so ``--data.train '[a.parquet, b/*.parquet]'`` and ``--optim.betas '[0.9, 0.95]'``
work. Unknown keys are errors that name the closest valid key. The resolved config is written
to ``<output_dir>/run.yaml`` and into every checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from trainer.config_base import ConfigBase, opt, suggest, unknown_key_message
from trainer.data.config import SUPERVISED_FORMATS, DataConfig
from trainer.errors import ConfigError

Stage = Literal["pretrain", "cpt", "sft"]
STAGES: tuple[str, ...] = ("pretrain", "cpt", "sft")
RECIPES_DIR = Path(__file__).parent / "recipes"
#: The experiment trackers ``log.report_to`` knows (trainer/reporters.py).
TRACKERS: tuple[str, ...] = ("tensorboard", "wandb", "swanlab", "mlflow")


@dataclass
class ModelConfig(ConfigBase):
    """Which architecture or weights to train, and how to run them."""

    config: str | None = opt(
        "qwen2.5-0.5b",
        "Architecture: a built-in preset name (see trainer/presets/) or a dir holding config.json.",
    )
    name_or_path: str | None = opt(
        None, "Pretrained weights (local dir or hub id) for cpt/sft; null builds random weights."
    )
    overrides: dict[str, Any] = opt(dict, "Architecture fields to change, e.g. {hidden_size: 512}.")
    attn_implementation: Literal["auto", "sdpa", "flash_attention_2", "flex_attention", "eager"] = opt(
        "auto",
        "Attention kernel; auto = flash_attention_2 when usable (CUDA, bf16/fp16), else sdpa. "
        "Every choice keeps packed documents apart.",
    )
    gradient_checkpointing: bool | Literal["auto"] = opt(
        True,
        "Recompute activations in backward (non-reentrant); auto = only when the planner needs it to fit "
        "(trainer/planner.py).",
    )
    trust_remote_code: bool = opt(
        False,
        "Run Python code shipped with the weights/tokenizer (custom architectures); only for sources you trust.",
    )
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = opt(
        "auto", "Training precision; auto = bf16 on GPUs that support it, else fp32."
    )
    loss: Literal["chunked", "plain"] = opt(
        "chunked",
        "chunked = next-token loss over chunks of target tokens, never the full [tokens, vocab] fp32 "
        "logits (llama/mistral/qwen2/qwen3 heads); plain = HF's full logits.",
    )
    compile: bool = opt(
        False,
        "torch.compile each decoder layer (fused kernels, fewer launches); the first steps pay the "
        "compile time; not under ZeRO-3. Off by default until measured faster on a GPU.",
    )


@dataclass
class LoraConfig(ConfigBase):
    """LoRA adapters (peft): train low-rank updates of the target layers, freeze the base."""

    enabled: bool = opt(False, "Train LoRA adapters instead of all weights (the base is frozen).")
    r: int = opt(16, "Rank of each adapter's low-rank update.")
    alpha: float = opt(32.0, "Scaling numerator: the update is scaled by alpha / r.")
    dropout: float = opt(0.05, "Dropout on the adapter's input (training only).")
    target_modules: str | list[str] = opt(
        ["q_proj", "v_proj"], "Module names to adapt (e.g. [q_proj, v_proj]), or all-linear."
    )
    modules_to_save: list[str] = opt(
        list, "Modules trained in full and saved with the adapter (e.g. [lm_head])."
    )

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"--lora.r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ConfigError(f"--lora.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"--lora.dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            self.target_modules = [self.target_modules]
        if not self.target_modules:
            raise ConfigError("--lora.target_modules is empty: name the modules to adapt, or all-linear")


@dataclass
class OptimConfig(ConfigBase):
    """The optimizer and its hyper-parameters."""

    name: Literal["adamw", "muon"] = opt(
        "adamw", "adamw, or muon (Muon on 2-D hidden weights, AdamW on the rest)."
    )
    lr: float = opt(2.0e-5, "Peak learning rate (AdamW part).")
    weight_decay: float = opt(0.1, "Decoupled weight decay (not applied to biases and norms).")
    betas: list[float] = opt([0.9, 0.95], "Adam betas [beta1, beta2].")
    eps: float = opt(1.0e-8, "Adam epsilon.")
    max_grad_norm: float = opt(1.0, "Clip the global gradient norm to this (0 disables clipping).")
    muon_lr: float = opt(0.02, "Peak learning rate of the Muon part (optim.name: muon).")
    muon_momentum: float = opt(0.95, "Muon momentum (optim.name: muon).")

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"--optim.lr must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"--optim.betas must be two numbers in [0, 1), got {self.betas}")
        if self.max_grad_norm < 0:
            raise ConfigError(f"--optim.max_grad_norm must be >= 0, got {self.max_grad_norm}")


@dataclass
class ScheduleConfig(ConfigBase):
    """The learning-rate schedule, in optimizer steps."""

    name: Literal["cosine", "linear", "constant", "onecycle", "wsd"] = opt(
        "cosine", "cosine | linear | constant (all after linear warmup) | onecycle | wsd."
    )
    warmup_steps: int = opt(200, "Linear warmup length in optimizer steps.")
    min_lr_ratio: float = opt(0.1, "Final LR as a fraction of the peak (cosine, linear, wsd).")
    div_factor: float = opt(25.0, "onecycle: the LR starts at lr / div_factor.")
    final_div_factor: float = opt(1.0e4, "onecycle: the LR ends at lr / (div_factor * final_div_factor).")
    decay_fraction: float = opt(0.1, "wsd: fraction of the steps spent in the final decay.")

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ConfigError(f"--schedule.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"--schedule.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ConfigError(f"--schedule.decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if self.div_factor < 1.0 or self.final_div_factor < 1.0:
            raise ConfigError("--schedule.div_factor and --schedule.final_div_factor must be >= 1")


@dataclass
class TrainConfig(ConfigBase):
    """How long to train and how often to log, evaluate and save (all in optimizer steps)."""

    micro_batch_size: int | Literal["auto"] = opt(
        16,
        "Sequences per rank per forward pass; auto = the largest that fits the GPU by dstrain's memory "
        "estimate and divides the batch per rank (grad_accum is then derived from global_batch_size).",
    )
    grad_accum: int = opt(8, "Micro-batches per optimizer step on each rank (derived when micro_batch_size is auto).")
    global_batch_size: int | None = opt(
        None,
        "Sequences per optimizer step over all ranks, kept by micro_batch_size auto (each rank takes "
        "global / world, rounded); ignored when micro_batch_size is a number.",
    )
    epochs: int = opt(1, "Passes over the training data (ignored when max_steps is set).")
    max_steps: int | None = opt(None, "Stop after this many optimizer steps (overrides epochs).")
    log_every: int = opt(50, "Log train metrics every N optimizer steps.")
    eval_every: int = opt(500, "Evaluate every N optimizer steps (0 = only at the end).")
    save_every: int = opt(500, "Save a checkpoint every N optimizer steps (0 = only at the end).")
    keep_last: int = opt(3, "Keep the newest N complete checkpoints (0 = keep all).")
    keep_best: bool = opt(False, "Also keep the checkpoint with the best eval loss (saved at eval steps).")
    max_bad_steps: int = opt(
        5, "Stop after this many non-finite (NaN/Inf) steps in a row; each is skipped (0 = never stop)."
    )
    collective_timeout_s: float = opt(
        1800.0,
        "Seconds a rank waits in a collective before the run stops, naming the rank and the phase "
        "(NCCL and gloo; DeepSpeed's shared-memory all-reduce of single-node CPU runs has no timeout).",
    )

    def __post_init__(self) -> None:
        if self.micro_batch_size == "auto":
            if self.global_batch_size is None:
                raise ConfigError(
                    "--train.micro_batch_size auto needs --train.global_batch_size (sequences per optimizer "
                    "step over all ranks), which the planner keeps while it sizes the micro-batch"
                )
        elif self.micro_batch_size < 1:
            raise ConfigError(f"--train.micro_batch_size must be >= 1 or auto, got {self.micro_batch_size}")
        if self.global_batch_size is not None and self.global_batch_size < 1:
            raise ConfigError(f"--train.global_batch_size must be >= 1 or null, got {self.global_batch_size}")
        for key in ("grad_accum", "epochs", "log_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"--train.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("eval_every", "save_every", "keep_last", "max_bad_steps"):
            if getattr(self, key) < 0:
                raise ConfigError(f"--train.{key} must be >= 0, got {getattr(self, key)}")
        if self.collective_timeout_s <= 0:
            raise ConfigError(f"--train.collective_timeout_s must be > 0, got {self.collective_timeout_s}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"--train.max_steps must be >= 1 or null, got {self.max_steps}")


@dataclass
class ZeroConfig(ConfigBase):
    """DeepSpeed ZeRO partitioning and offload."""

    stage: int | Literal["auto"] = opt(
        2,
        "ZeRO stage: 0 (DDP), 1 (optimizer), 2 (+gradients), 3 (+parameters); auto = the fastest that fits "
        "the GPUs present by dstrain's memory estimate, offload included (trainer/planner.py). On one rank "
        "1 and 2 run as 0 (see Planner).",
    )
    offload_optimizer: bool = opt(False, "Keep optimizer state on the CPU and step with CPU Adam.")
    offload_params: bool = opt(False, "Keep parameters on the CPU (ZeRO-3 only).")

    def __post_init__(self) -> None:
        if self.stage not in (0, 1, 2, 3, "auto"):
            raise ConfigError(f"--zero.stage must be 0, 1, 2, 3 or auto, got {self.stage}")
        if self.stage == "auto":
            return  # the planner chooses the offload flags with the stage
        if self.offload_params and self.stage != 3:
            raise ConfigError("--zero.offload_params needs --zero.stage 3")
        if self.offload_optimizer and self.stage == 0:
            raise ConfigError("--zero.offload_optimizer needs --zero.stage 1, 2 or 3")


@dataclass
class LogConfig(ConfigBase):
    """Where progress and metrics go (rank 0 only)."""

    progress: bool = opt(True, "Show a rich progress display on rank 0 (off when not a terminal).")
    report_to: list[str] = opt(
        list,
        "Experiment trackers to send the metrics.jsonl records to (rank 0): any of tensorboard, wandb, "
        "swanlab, mlflow (each needs its package: the [track] extra); one tracker run across --resume.",
    )
    tensorboard: bool = opt(False, "Same as adding tensorboard to report_to (events in <output_dir>/tb).")
    project: str | None = opt(
        None,
        "Tracker project (MLflow experiment); null = the tracker's own variable (WANDB_PROJECT, "
        "SWANLAB_PROJ_NAME, MLFLOW_EXPERIMENT_NAME), else 'dstrain'.",
    )
    run_name: str | None = opt(None, "Run name in the trackers; null = the name of output_dir.")
    plot: bool = opt(True, "Write <output_dir>/loss_curve.png at the end.")
    sample_prompts: list[str] = opt(
        list, "Prompts to continue at every eval; the texts go to <output_dir>/samples.jsonl and the log."
    )
    sample_tokens: int = opt(48, "Tokens to generate per sample prompt.")
    doc_ids: bool = opt(False, "Record each logged step's document ids in metrics.jsonl (an all-gather).")
    peak_tflops: float | None = opt(
        None,
        "Dense bf16 peak TFLOP/s of one GPU, for MFU; null = from the device name (A100 312, H100 SXM "
        "989, H100 PCIe 756, H200 989, L40S 362, RTX 4090 165); MFU is null on a CPU or an unknown GPU.",
    )
    library_logs: bool = opt(
        False, "Show DeepSpeed's and transformers' own start-up, op-build and progress messages (rank 0)."
    )

    def __post_init__(self) -> None:
        chosen = [name.lower() for name in self.report_to if name.lower() != "none"]
        for name in chosen:
            if name not in TRACKERS:
                hint = suggest(name, list(TRACKERS))
                raise ConfigError(
                    f"--log.report_to: unknown tracker {name!r}; choose from {', '.join(TRACKERS)}"
                    + (f" (did you mean {hint}?)" if hint else "")
                )
        self.report_to = list(dict.fromkeys(chosen))

    @property
    def trackers(self) -> list[str]:
        """report_to, with tensorboard when ``log.tensorboard`` is on (its older spelling)."""
        return list(dict.fromkeys([*self.report_to, *(["tensorboard"] if self.tensorboard else [])]))


@dataclass
class JobConfig(ConfigBase):
    """A whole run. YAML recipes and ``--section.key`` overrides fill it."""

    stage: Stage = opt("pretrain", "pretrain | cpt | sft.")
    output_dir: str = opt("runs/default", "Run directory: run.yaml, logs, checkpoints, hf/.")
    seed: int = opt(1234, "Seed of weights init, data order and dropout.")
    tokenizer: str | None = opt(None, "Tokenizer dir or hub id; null = model.name_or_path.")
    model: ModelConfig = opt(None, "")
    data: DataConfig = opt(None, "")
    optim: OptimConfig = opt(None, "")
    schedule: ScheduleConfig = opt(None, "")
    train: TrainConfig = opt(None, "")
    zero: ZeroConfig = opt(None, "")
    lora: LoraConfig = opt(None, "")
    log: LogConfig = opt(None, "")

    def __post_init__(self) -> None:
        # Sections left out of a recipe take their defaults.
        for name, cls in SECTIONS.items():
            if getattr(self, name) is None:
                setattr(self, name, cls())
        if self.stage in ("cpt", "sft") and not self.model.name_or_path:
            raise ConfigError(f"stage {self.stage} starts from pretrained weights: set --model.name_or_path")
        if self.stage == "sft" and not self.data.supervised:
            # Without a prompt/response split every token is a target: that is continued
            # pretraining (which takes lora.* too), not SFT, and would train on the prompts.
            raise ConfigError(
                f"stage sft with --data.format {self.data.format} has no prompt to mask and would train "
                f"on every token: set --data.format to one of {', '.join(SUPERVISED_FORMATS)} (the loss is on "
                "the responses only), or use --stage cpt to train on whole documents (LoRA works there too)"
            )
        if self.model.name_or_path and self.model.overrides:
            raise ConfigError(
                "--model.overrides changes an architecture, and pretrained weights (model.name_or_path) "
                "keep theirs: remove the overrides, or pretrain from --model.config"
            )
        if self.tokenizer is None and self.model.name_or_path is None:
            raise ConfigError("--tokenizer is required when model.name_or_path is not set")

    @property
    def tokenizer_path(self) -> str:
        """The tokenizer's dir or hub id: ``tokenizer``, else the pretrained weights'."""
        return self.tokenizer or str(self.model.name_or_path)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


SECTIONS: dict[str, type[ConfigBase]] = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "schedule": ScheduleConfig,
    "train": TrainConfig,
    "zero": ZeroConfig,
    "lora": LoraConfig,
    "log": LogConfig,
}


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a recipe file; a missing file or a non-mapping is a ConfigError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"recipe {path}{where} is not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of sections, got {type(data).__name__}")
    return data


def recipe_path(stage: str) -> Path:
    """The default recipe of a stage: ``trainer/recipes/<stage>.yaml``."""
    return RECIPES_DIR / f"{stage}.yaml"


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """Turn ``['--optim.lr', '1e-3', '--data.pack=false']`` into a nested dict.

    Values parse as YAML; a dotted key with no value is an error naming it.
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        token = args[i]
        if not token.startswith("--"):
            raise ConfigError(f"unexpected argument {token!r}: overrides look like --section.key value")
        key, sep, raw = token[2:].partition("=")
        if not sep:
            if i + 1 >= len(args) or (args[i + 1].startswith("--") and not is_number(args[i + 1])):
                raise ConfigError(f"--{key} needs a value")
            raw = args[i + 1]
            i += 1
        i += 1
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        set_dotted(out, key, value)
    return out


def is_number(text: str) -> bool:
    """A value such as ``-2`` or ``1e-3`` that looks like a flag but is not one."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--{key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, key by key into every mapping: ``--model.overrides.hidden_size 128``
    changes one field of a recipe's overrides and keeps the others."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def check_keys(data: dict[str, Any]) -> None:
    """Reject unknown top-level and section keys before building, with the closest valid one."""
    top = [f for f in JobConfig.__dataclass_fields__]
    for key, value in data.items():
        if key not in top:
            raise ConfigError(unknown_key_message("", key, top))
        if key in SECTIONS and value is not None and not isinstance(value, dict):
            raise ConfigError(f"--{key} must be a section (a mapping), got {value!r}")


def build_config(
    stage: str | None = None,
    config_path: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    base: dict[str, Any] | None = None,
) -> JobConfig:
    """Resolve a JobConfig: ``base`` (or the recipe) then overrides, strictly checked.

    ``base`` is a saved run.yaml mapping (resume); otherwise ``config_path`` or the stage's
    default recipe. ``stage`` given on the command line wins over the recipe's.
    """
    if base is not None:
        data = copy.deepcopy(base)
    elif config_path is not None:
        data = read_yaml(config_path)
    else:
        stage = stage or "pretrain"
        if stage not in STAGES:
            raise ConfigError(f"--stage must be one of {', '.join(STAGES)}, got {stage!r}")
        data = read_yaml(recipe_path(stage))
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    data = deep_merge(data, overrides or {})
    if stage is not None:
        data["stage"] = stage
    check_keys(data)
    return JobConfig.from_dict(data)


def save_run_yaml(cfg: JobConfig, output_dir: str | Path) -> Path:
    """Write the resolved config to ``<output_dir>/run.yaml`` atomically."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "run.yaml"
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(cfg.to_yaml(), encoding="utf-8")
    tmp.replace(path)
    return path


# ---------------------------------------------------------------- command lines


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
