"""User-facing errors.

Anything a user can cause by bad input (an unknown name, a missing file, a checkpoint that does
not fit) raises :class:`AutopruneError` with a message that says what to do. The CLI prints that
message as one line and exits with code 2; programming errors keep their tracebacks.
"""

from __future__ import annotations


class AutopruneError(Exception):
    """Bad input from the user: the message is shown as-is, without a traceback."""


class UnknownNameError(AutopruneError, KeyError):
    """A name that is not in a registry."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class DataNotFoundError(AutopruneError, FileNotFoundError):
    """A dataset root without the expected files (and no way to download them)."""


class CheckpointError(AutopruneError):
    """A checkpoint that is corrupt, refused as unsafe, or does not match the architecture."""
