"""The error hierarchy. Every message names the value, the constraint and the fix.

``DstrainError`` and its subclasses are shown to users as one line (no traceback) by the
entry points (:func:`user_error`); anything else is a bug and keeps its traceback.
"""

import sys

#: Exit status of a user error (bad argument, file or row), as argparse's usage errors and
#: ``dstrain``'s own (README, exit codes).
USER_ERROR_EXIT = 2


def user_error(message: object, command: str = "dstrain") -> int:
    """Show a user error the way every entry point does: ``<command>: error: <message>`` as one
    line on stderr, no traceback. Returns :data:`USER_ERROR_EXIT`, the entry point's status."""
    print(f"{command}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return USER_ERROR_EXIT


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
