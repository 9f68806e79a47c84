"""The error hierarchy. Every message names the value, the constraint and the fix.

``DstrainError`` and its subclasses are shown to users as one line (no traceback) by the
entry points; anything else is a bug and keeps its traceback.
"""


class DstrainError(Exception):
    """Base of all errors that are the user's to fix (bad config, data, checkpoint)."""


class ConfigError(DstrainError):
    """A recipe key or value is wrong; the message names the key (``--section.key``)."""


class DataError(DstrainError):
    """A data file, column or row is wrong; the message names the file, column or row."""


class CheckpointError(DstrainError):
    """A checkpoint is missing, incomplete or does not fit the current run."""


class TrainingError(DstrainError):
    """Training cannot go on as configured: out of memory, or the loss diverged (non-finite steps)."""


class DistError(DstrainError):
    """A collective failed or timed out: another rank died or hangs, or the ranks do not match."""
