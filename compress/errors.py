"""Typed errors. A `CompressError` is the user's to fix: the CLI prints its message on one line and
exits with status 2. Anything else is our bug and exits with status 1."""

from __future__ import annotations


class CompressError(Exception):
    """Bad input or an impossible request. The message names the file or option and what is wrong."""


class DataError(CompressError):
    """A data or labels file that cannot be used."""


class TeacherError(CompressError):
    """A teacher model that cannot be loaded or run."""


class ConfigError(CompressError):
    """An option value that makes no sense (a width of 0, a rank larger than the input, ...)."""


class OutputError(CompressError):
    """An output that cannot be written where it was asked for: a full disk, a quota, no permission."""


class ExportError(CompressError):
    """An exported model that failed validation; `failures` lists every failing check."""

    def __init__(self, message: str, failures: list[str] | None = None):
        self.failures = failures or []
        detail = "; ".join(self.failures)
        super().__init__(f"{message}: {detail}" if detail else message)


class DivergedError(CompressError):
    """Training whose loss turned NaN or infinite: nothing it made is kept as a student."""
