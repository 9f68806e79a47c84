"""Strict, typed dataclass configs: the machinery behind ``trainer.config``.

Each field is declared with :func:`opt`, which keeps its help text (shown by ``--help``).
:meth:`ConfigBase.from_dict` builds a section from a mapping, rejects unknown keys with the
closest valid name, and coerces values to the annotated type (YAML gives ``1e-3`` as a
string, ``[0.9, 0.95]`` as a list), naming ``--section.key`` in every error.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import MISSING, fields
from typing import Any, Literal, get_args, get_origin

from trainer.errors import ConfigError

# Names users bring from other frameworks, mapped to ours, so a near-miss suggests the right key.
ALIASES: dict[str, str] = {
    "learning_rate": "lr",
    "learning_rate_min": "min_lr_ratio",
    "weight_decay_rate": "weight_decay",
    "grad_clip": "max_grad_norm",
    "clip_grad_norm": "max_grad_norm",
    "gradient_clipping": "max_grad_norm",
    "batch_size": "micro_batch_size",
    "per_device_train_batch_size": "micro_batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "num_train_epochs": "epochs",
    "warmup": "warmup_steps",
    "seq_len": "max_seq_len",
    "max_length": "max_seq_len",
    "block_size": "max_seq_len",
    "logging_steps": "log_every",
    "save_steps": "save_every",
    "eval_steps": "eval_every",
    "zero_stage": "stage",
}


def opt(default: Any, help: str) -> Any:
    """Declare a config field with its default and its help text (unit included)."""
    if callable(default) and default in (list, dict):
        return dataclasses.field(default_factory=default, metadata={"help": help})
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def suggest(key: str, valid: list[str]) -> str | None:
    """The valid key closest to ``key``, through ALIASES for names from other frameworks."""
    pool = {v: v for v in valid}
    pool.update({alias: target for alias, target in ALIASES.items() if target in valid})
    match = difflib.get_close_matches(key, list(pool), n=1, cutoff=0.6)
    return pool[match[0]] if match else None


class ConfigBase:
    """Mixin for config dataclasses: strict construction from dicts and export to dicts."""

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, prefix: str = "") -> Any:
        data = dict(data or {})
        hints = typing.get_type_hints(cls)
        names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key not in names:
                raise ConfigError(unknown_key_message(prefix, key, names))
            kwargs[key] = coerce(value, hints[key], f"{prefix}{key}")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, ConfigBase) else value
        return out

    @classmethod
    def help_rows(cls, prefix: str = "") -> list[tuple[str, str, str]]:
        """(``--section.key``, default, help) for every field, recursing into sections."""
        rows = []
        hints = typing.get_type_hints(cls)
        for f in fields(cls):  # type: ignore[arg-type]
            sub = hints[f.name]
            if isinstance(sub, type) and issubclass(sub, ConfigBase):
                rows += sub.help_rows(f"{prefix}{f.name}.")
                continue
            if f.default is not MISSING:
                default = f.default
            elif f.default_factory is not MISSING:
                default = f.default_factory()
            else:
                default = "required"
            rows.append((f"--{prefix}{f.name}", repr(default), f.metadata.get("help", "")))
        return rows


def unknown_key_message(prefix: str, key: str, valid: list[str]) -> str:
    hint = suggest(key, valid)
    where = f"--{prefix}{key}"
    if hint:
        return f"unknown config key {where}: did you mean --{prefix}{hint}?"
    return f"unknown config key {where}; valid keys here: {', '.join(valid)}"


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against ``annotation`` and convert where YAML is loose (ints, floats)."""
    origin = get_origin(annotation)
    if isinstance(annotation, type) and issubclass(annotation, ConfigBase):
        if value is None:
            return annotation()
        if not isinstance(value, dict):
            raise ConfigError(f"--{key} must be a mapping of keys, got {value!r}")
        return annotation.from_dict(value, prefix=f"{key}.")
    if origin in (typing.Union, types.UnionType):
        args = get_args(annotation)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"--{key}: {value!r} fits none of {annotation}")
    if origin is Literal:
        choices = get_args(annotation)
        if value not in choices:
            hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            extra = f"; did you mean {hint[0]}?" if hint else ""
            raise ConfigError(f"--{key} must be one of {', '.join(map(str, choices))}, got {value!r}{extra}")
        return value
    if origin is list:
        (item,) = get_args(annotation) or (Any,)
        if isinstance(value, (str, int, float)) and item is str:
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"--{key} must be a list, got {value!r}")
        return [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"--{key} must be a mapping, got {value!r}")
        return dict(value)
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"--{key} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"--{key} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                as_float = float(value)
            except ValueError:
                as_float = None
            if as_float is not None and as_float.is_integer():
                return int(as_float)
        raise ConfigError(f"--{key} must be an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"--{key} must be a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"--{key} must be a number, got {value!r}")
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"--{key} must be a string, got {value!r}")
    return value
