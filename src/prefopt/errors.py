"""Exceptions prefopt raises on purpose.

Every error a user can cause (a bad row, a bad flag, a bad path) is a `PrefoptError`, with a
message that names the file, row and field at fault, so the CLI can print it without a traceback.
"""

from __future__ import annotations


class PrefoptError(Exception):
    """Base class of all errors prefopt raises deliberately."""


class ConfigError(PrefoptError):
    """An invalid configuration value, unknown key or unsupported combination."""


class DataError(PrefoptError):
    """A data file or row that cannot be used.

    Args:
        message: What is wrong.
        file: The file at fault, if known.
        row: The 0-based source row index, if known.
        field: The column/field at fault, if known.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        row: int | None = None,
        field: str | None = None,
    ) -> None:
        self.file = file
        self.row = row
        self.field = field
        self.reason = message
        where = []
        if file is not None:
            where.append(f"file {file}")
        if row is not None:
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field '{field}'")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class TokenizationError(DataError):
    """A row whose tokenization cannot be trusted (e.g. the prompt boundary shifts)."""


class ModelError(PrefoptError):
    """A model or tokenizer that cannot be loaded or used as asked."""
