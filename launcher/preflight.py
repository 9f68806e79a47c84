"""What `dstrain run` checks before it starts a rank: the inputs a user names by path.

A mistyped path or a broken file found by the ranks costs a launch (DeepSpeed and torch
imported on every rank, a model built, minutes on a big node) and prints one error per rank;
found here it is one line (``dstrain: error: ...``, exit 2) before anything is spawned or written
to ``output_dir``. Cheap by construction, and without torch: parquet and Arrow footers, the first
record of each json/jsonl file, the files of local tokenizer and model dirs, the checkpoint that
``--resume`` names. Hub ids (``org/name``, ``hf:...``) are left to the ranks, which have the
network and the credentials. The ranks still check everything themselves (the path through
``deepspeed trainer/main.py`` and ``srun`` has no pre-flight); what they find deeper in a file (a
bad row 10,000 lines down) is theirs to report.
"""

from __future__ import annotations

from pathlib import Path

from trainer.ckpt_layout import COMPLETE, complete_newest_first
from trainer.config import JobConfig
from trainer.errors import CheckpointError, ConfigError, DataError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def looks_local(spec: str) -> bool:
    """A path rather than a hub id: it exists, or is written like a path (``/x``, ``./x``, ``~/x``,
    ``a/b/c``). ``org/name`` that does not exist here is a hub id."""
    if Path(spec).expanduser().exists():
        return True
    return spec.startswith(("/", "./", "../", "~")) or spec.count("/") > 1


def check_tokenizer(spec: str, flag: str) -> None:
    if not looks_local(spec):
        return
    path = Path(spec).expanduser()
    if not path.exists():
        raise ConfigError(f"{flag} {spec}: no such directory (nor a hub id: those look like org/name)")
    if not path.is_dir() or not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(
            f"{flag} {spec}: not a tokenizer directory (none of {', '.join(TOKENIZER_FILES)}); "
            "save one with tokenizer.save_pretrained(DIR)"
        )


def check_model(job: JobConfig) -> None:
    model = job.model
    if model.config is not None and looks_local(model.config):
        path = Path(model.config).expanduser()
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"--model.config {model.config}: no config.json there (a preset name, or a dir with one)"
            )
    if model.name_or_path is None or not looks_local(str(model.name_or_path)):
        return
    path = Path(str(model.name_or_path)).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"--model.name_or_path {model.name_or_path}: no config.json there (an HF model dir or hub id)"
        )
    if job.stage != "pretrain" and not any(p.suffix in WEIGHT_SUFFIXES for p in path.iterdir()):
        raise ConfigError(
            f"--model.name_or_path {model.name_or_path}: no weights there (*.safetensors); "
            f"stage {job.stage} starts from pretrained weights"
        )


def check_data(job: JobConfig) -> None:
    from trainer.data.formatting import Formatter
    from trainer.data.sources import HUB_PREFIX, describe_file, file_kind, first_record, resolve_paths

    columns = Formatter(job.data, None).source_columns()
    for key, specs in (("data.train", job.data.train), ("data.validation", job.data.validation or [])):
        local = [s for s in specs if not str(s).startswith(HUB_PREFIX)]
        if not local and (specs or key == "data.validation"):
            continue  # hub datasets only: the ranks download and check them
        for path in resolve_paths(local, key):  # an empty data.train is its error
            if file_kind(path) in ("parquet", "arrow"):
                if not sum(g.rows for g in describe_file(path, columns).groups):
                    raise DataError(f"{path} holds no rows; remove it from --{key}")
                continue
            record = first_record(path)
            if not isinstance(record, dict):
                raise DataError(
                    f"{path} record 0: expected a JSON object per record, got {type(record).__name__}"
                )
            for name in columns.required:
                if name not in record:
                    raise columns.missing(path, name, list(record), "field")


def check_resume(job: JobConfig, resume: str | None) -> None:
    if resume in (None, "auto"):
        return
    if resume == "latest":
        root = Path(job.output_dir) / "checkpoints"
        if not complete_newest_first(root):
            raise CheckpointError(
                f"--resume latest: no complete checkpoint under {root}; use --resume auto to start fresh"
            )
        return
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"--resume {resume}: no such checkpoint directory")
    if not (path / COMPLETE).is_file():
        raise CheckpointError(
            f"--resume {resume}: not a complete checkpoint (no {COMPLETE} marker); pick another"
        )


def preflight(job: JobConfig, resume: str | None) -> None:
    """Raise the first problem found (a DstrainError: one line, exit 2); return when there is none."""
    check_resume(job, resume)
    check_model(job)
    check_tokenizer(job.tokenizer_path, "--tokenizer" if job.tokenizer else "--model.name_or_path")
    check_data(job)
