"""Errors meant for people: each says where, what, and how to fix it.

The CLI prints a `GemcutError` as one or more plain lines and exits 2, never a traceback.
"""

from __future__ import annotations


class GemcutError(Exception):
    """Base class for errors the user can act on."""


class ConfigError(GemcutError):
    """A run configuration that does not validate."""


class DataError(GemcutError):
    """A problem with the user's data; the message names file, line, field and the fix."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None,
                 field: str | None = None, reason: str | None = None):
        self.path, self.line, self.field = path, line, field
        self.reason = reason or "invalid"
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + message)


class ModelNotFoundError(GemcutError):
    """A model name that resolves to nothing local or remote."""


class TrainingError(GemcutError):
    """A run that cannot continue (NaN loss, will not fit, bad resume)."""
