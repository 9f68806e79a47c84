"""Data configuration: which files, how a record becomes a sample, how long, how shuffled."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from trainer.config_base import ConfigBase, opt
from trainer.errors import ConfigError

DataFormat = Literal["text", "alpaca", "sharegpt", "messages", "template"]
#: Formats whose loss is on the response tokens only (the others train on every token).
SUPERVISED_FORMATS: tuple[str, ...] = ("alpaca", "sharegpt", "messages", "template")
Reasoning = Literal["check", "keep", "drop"]
#: The keys that decide how a record becomes a sample: changing one changes the token stream, so a
#: resume restarts the data position (trainer.checkpoint) and the data fingerprint differs.
FORMATTING_KEYS: tuple[str, ...] = (
    "format",
    "text_template",
    "prompt_template",
    "response_template",
    "chat_template",
    "reasoning",
    "instruction_column",
    "input_column",
    "output_column",
    "system_column",
    "history_column",
    "messages_column",
    "role_key",
    "content_key",
)


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
    format: DataFormat = opt(
        "text",
        "How a record becomes a sample: text (documents, loss on every token: pretrain/cpt), or alpaca / "
        "sharegpt / messages / template (SFT: loss on the response tokens and their end-of-turn only).",
    )
    text_column: str = opt("text", "Column (parquet) or field (json/jsonl) that holds the document text.")
    text_template: str | None = opt(
        None,
        "format text: build each document from several columns, e.g. '{prompt}\\n{response}' ({column} "
        "placeholders, str.format); null = the text_column as is.",
    )
    prompt_template: str | None = opt(
        None, "format template: the user prompt from {field} placeholders, e.g. '{Question}'."
    )
    response_template: str | None = opt(
        None,
        "format template: the supervised response from {field} placeholders, e.g. "
        "'<think>\\n{Complex_CoT}\\n</think>\\n\\n{Response}'.",
    )
    chat_template: str = opt(
        "auto",
        "SFT: auto (the tokenizer's chat template when it has one, else none), none (prompt + response + "
        "EOS, no role markers), or a .jinja file.",
    )
    reasoning: Reasoning = opt(
        "check",
        "SFT responses with <think>...</think>: check (fail if the chat template drops text we train on), "
        "keep (prompt with the generation prompt, supervise reasoning + answer after it, last assistant "
        "turn), or drop (train on the answer after </think> only).",
    )
    instruction_column: str = opt("instruction", "format alpaca: the instruction field.")
    input_column: str = opt(
        "input", "format alpaca: the optional input field, joined to the instruction by a newline."
    )
    output_column: str = opt("output", "format alpaca: the response field.")
    system_column: str = opt("system", "alpaca / sharegpt / messages: the optional system prompt field.")
    history_column: str = opt(
        "history", "format alpaca: the optional earlier turns, a list of [instruction, response] pairs."
    )
    messages_column: str | None = opt(
        None,
        "sharegpt / messages: the conversation field; null = conversations (sharegpt), messages (messages).",
    )
    role_key: str | None = opt(
        None, "sharegpt / messages: a turn's role key; null = from (sharegpt), role (messages)."
    )
    content_key: str | None = opt(
        None, "sharegpt / messages: a turn's text key; null = value (sharegpt), content (messages)."
    )
    max_seq_len: int = opt(
        512, "Tokens per training sequence; longer SFT samples are truncated (the head is kept) and counted."
    )
    pack: bool = opt(
        True,
        "Pack samples into max_seq_len sequences (documents joined by EOS and split across rows; SFT samples "
        "whole); false pads per batch instead.",
    )
    buffer_size: int = opt(
        10000,
        "Shuffle block, in chunks (documents cut into pieces of at most max_seq_len tokens): memory "
        "is bounded by buffer_size * max_seq_len tokens per worker; a resume re-reads one block.",
    )
    num_workers: int | Literal["auto"] = opt(
        1,
        "Dataloader worker processes per rank (0 = load in the training process); auto = "
        "min(4, cores per node // ranks per node - 1), at least 1.",
    )
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
        if self.num_workers != "auto" and self.num_workers < 0:
            raise ConfigError(f"--data.num_workers must be >= 0, got {self.num_workers}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ConfigError(f"--data.max_samples must be >= 1 or null, got {self.max_samples}")
        self._check_formatting()

    def _check_formatting(self) -> None:
        """The formatting keys fit the format: a key the format does not read is an error, not a no-op."""
        fmt = self.format
        if self.text_template is not None and fmt != "text":
            raise ConfigError(
                f"--data.text_template is for --data.format text, not {fmt}; "
                "use --data.prompt_template / --data.response_template with --data.format template"
            )
        if fmt == "template":
            for key in ("prompt_template", "response_template"):
                if getattr(self, key) is None or (key == "response_template" and not self.response_template):
                    raise ConfigError(
                        f"--data.format template needs --data.{key}, e.g. prompt_template: '{{Question}}', "
                        "response_template: '{Response}'"
                    )
        else:
            for key in ("prompt_template", "response_template"):
                if getattr(self, key) is not None:
                    raise ConfigError(f"--data.{key} is for --data.format template, not {fmt}")
        if fmt not in ("sharegpt", "messages"):
            for key in ("messages_column", "role_key", "content_key"):
                if getattr(self, key) is not None:
                    raise ConfigError(f"--data.{key} is for --data.format sharegpt or messages, not {fmt}")
        if fmt == "text":
            if self.chat_template != "auto":
                raise ConfigError(
                    f"--data.chat_template {self.chat_template!r} needs an SFT --data.format "
                    "(alpaca, sharegpt, messages, template); format text trains on plain documents"
                )
            if self.reasoning != "check":
                raise ConfigError(f"--data.reasoning {self.reasoning} needs an SFT --data.format, not text")

    @property
    def supervised(self) -> bool:
        """Whether the loss is on response tokens only (an SFT format)."""
        return self.format in SUPERVISED_FORMATS


__all__ = ["FORMATTING_KEYS", "SUPERVISED_FORMATS", "DataConfig", "DataFormat", "Reasoning"]
