"""Where a run's checkpoints are on disk and which are complete: light (no torch), so the
launcher's pre-flight and the offline tools can look without loading the trainer.

``<output_dir>/checkpoints/step_<N>/`` holds one save; its ``COMPLETE`` marker is written last,
``MANIFEST.json`` lists every file with its size and crc32, and ``latest`` (beside the step
dirs) names the newest complete one. See :mod:`trainer.checkpoint` for what a save holds.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("dstrain")

COMPLETE = "COMPLETE"
MANIFEST = "MANIFEST.json"  # {file: [size, crc32]} of every file of a save, checked on resume
LATEST = "latest"
TRAINER_STATE = "trainer_state.json"


def step_of(path: Path) -> int:
    return int(path.name.split("_", 1)[1])


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


def list_checkpoints(root: Path) -> list[Path]:
    """``step_<N>`` dirs under ``root``, oldest first (complete or not)."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
    return sorted(dirs, key=step_of)


def complete_newest_first(root: Path) -> list[Path]:
    """Complete checkpoints, newest first, ``latest``'s first when it names the newest step.
    Incomplete dirs newer than every complete one are reported and skipped."""
    found = list_checkpoints(root)
    complete = [p for p in found if is_complete(p)]
    for p in found:
        if not is_complete(p) and (not complete or step_of(p) > step_of(complete[-1])):
            log.warning(
                "skipping incomplete checkpoint %s (no %s marker: the save was interrupted)", p, COMPLETE
            )
    return complete[::-1]


def newest_complete(root: Path) -> Path | None:
    """The newest complete checkpoint (not verified: see :func:`resolve_resume`)."""
    complete = complete_newest_first(root)
    return complete[0] if complete else None
