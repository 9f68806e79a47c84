"""Data configuration: which files, which column, how long, how shuffled, how many workers."""

from __future__ import annotations

from dataclasses import dataclass

from trainer.config_base import ConfigBase, opt
from trainer.errors import ConfigError


@dataclass
class DataConfig(ConfigBase):
    """Where the training text comes from and how it is cut into batches."""

    train: list[str] = opt(
        list, "Training files: parquet/jsonl/json paths, globs or directories (a list or one string)."
    )
    validation: list[str] | None = opt(
        None, "Held-out files (paths/globs); null carves validation_fraction of the train rows instead."
    )
    validation_fraction: float = opt(
        0.1, "Fraction of train rows held out for eval when data.validation is null (0 disables eval)."
    )
    validation_seed: int = opt(2222, "Seed of the row-level train/validation split.")
    text_column: str = opt("text", "Column (parquet) or field (json/jsonl) that holds the document text.")
    max_seq_len: int = opt(512, "Tokens per training sequence.")
    pack: bool = opt(
        True, "Pack documents (joined by EOS) into max_seq_len sequences; false pads per batch instead."
    )
    buffer_size: int = opt(
        10000,
        "Shuffle block, in chunks (documents cut into pieces of at most max_seq_len tokens): memory "
        "is bounded by buffer_size * max_seq_len tokens per worker; a resume re-reads one block.",
    )
    num_workers: int = opt(1, "Dataloader worker processes per rank (0 = load in the training process).")
    max_samples: int | None = opt(
        None,
        "Use only the first N rows (documents) of data.train in file order, before the "
        "validation_fraction split (null = all).",
    )
    eval_max_batches: int | None = opt(None, "Cap on eval micro-batches per rank (null = the whole set).")

    def __post_init__(self) -> None:
        if isinstance(self.train, str):
            self.train = [self.train]
        if isinstance(self.validation, str):
            self.validation = [self.validation]
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ConfigError(f"--data.validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if self.max_seq_len < 2:
            raise ConfigError(f"--data.max_seq_len must be >= 2, got {self.max_seq_len}")
        if self.buffer_size < 1:
            raise ConfigError(f"--data.buffer_size must be >= 1, got {self.buffer_size}")
        if self.num_workers < 0:
            raise ConfigError(f"--data.num_workers must be >= 0, got {self.num_workers}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ConfigError(f"--data.max_samples must be >= 1 or null, got {self.max_samples}")


__all__ = ["DataConfig"]
