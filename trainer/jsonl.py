"""The run's JSON-lines files (metrics.jsonl, samples.jsonl): reading them when the last line
may be torn, and cutting them back to the step a resumed run starts from.

A line is appended in one write, so a crash or a full disk can leave only the *last* line cut
short. Readers skip such a line and warn once; a line that is not JSON anywhere else is damage
nobody expects and stays an error naming the file and line.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.errors import DataError

log = logging.getLogger("dstrain")


@dataclass
class JsonLines:
    """The records of a JSON-lines file (and each one's line as written), and the 1-based
    number of a torn last line (or None)."""

    records: list[dict[str, Any]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    torn_line: int | None = None


def read_jsonl(path: Path) -> JsonLines:
    """Every record of ``path``; a torn last line is left out (with one warning), a bad line
    before the last is a :class:`DataError` naming the file and line."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    numbered = [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]
    out = JsonLines()
    for i, (number, line) in enumerate(numbered):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i < len(numbered) - 1:
                raise DataError(
                    f"{path} line {number}: not JSON, and not the last line; the file is damaged"
                ) from None
            out.torn_line = number
            log.warning(
                "%s line %d is cut short (a crash or a full disk while it was written); it is left out",
                path,
                number,
            )
            continue
        if isinstance(record, dict):
            out.records.append(record)
            out.lines.append(line)
    return out


def keep_through_step(path: Path, step: int) -> None:
    """Rewrite ``path`` without the records past ``step`` and without a torn last line (a run
    resumed at ``step`` logs those steps again), so the file reads as one consistent run."""
    if not path.is_file():
        return
    read = read_jsonl(path)
    kept = [
        line for record, line in zip(read.records, read.lines, strict=True) if record.get("step", 0) <= step
    ]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    tmp.replace(path)
