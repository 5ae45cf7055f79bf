"""Row-level pieces of the data tools' reader (`reader` and `reader_csv`): lines read within a
byte limit, text decoded so that bytes that are not UTF-8 can be named, and the checks and
error of a row that can be skipped."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from prefopt.data.fields import describe_type
from prefopt.data.loading import BOM, CHUNK
from prefopt.errors import DataError

__all__ = [
    "NOT_SKIPPABLE",
    "RowError",
    "all_lines",
    "bad_bytes_field",
    "check_row",
    "decode",
    "nonblank_lines",
    "too_long",
]

Row = dict[str, Any]

NOT_SKIPPABLE = "a whole-file problem: --on-error skip skips rows, and cannot skip this"
"""Said in the message of every file-level read error."""


class RowError(DataError):
    """An unreadable row; `kind` is the reason it is counted under when skipped."""

    def __init__(
        self, kind: str, message: str, *, file: str, row: int, field: str | None = None
    ) -> None:
        super().__init__(message, file=file, row=row, field=field)
        self.kind = kind


def all_lines(path: Path, max_line_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """(1-based line number, bytes) of every line, blank ones included (a quoted CSV field may
    hold blank lines); None for a line over the limit.

    An over-long line is consumed in bounded chunks and never held in memory whole.
    """
    with path.open("rb") as f:
        line_number = 0
        while line := f.readline(max_line_bytes + 1):
            line_number += 1
            if line_number == 1 and line.startswith(BOM):
                line = line[len(BOM) :]
            if len(line) > max_line_bytes and not line.endswith(b"\n"):
                yield line_number, None
                # Only reached when the caller goes on (skipping): read past the line's rest.
                while (rest := f.readline(CHUNK)) and not rest.endswith(b"\n"):
                    pass
            else:
                yield line_number, line


def nonblank_lines(path: Path, max_line_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """`all_lines` without the blank ones (None still stands for a line over the limit)."""
    for line_number, line in all_lines(path, max_line_bytes):
        if line is None or line.strip():
            yield line_number, line


def too_long(line_number: int, max_line_bytes: int) -> str:
    return (
        f"line {line_number} is longer than {max_line_bytes} bytes (raise the limit with "
        "--max-line-bytes if such rows are expected)"
    )


def bad_bytes_field(value: Any, path: str) -> str | None:
    """Path of the first key or string under `value` holding an undecodable byte.

    With errors="surrogateescape" each byte 0x80-0xFF that is not UTF-8 becomes U+DC80-U+DCFF.
    """
    if isinstance(value, str):
        return path if any("\udc80" <= c <= "\udcff" for c in value) else None
    items: Iterable[tuple[Any, Any]]
    if isinstance(value, Mapping):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        sub = f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else key)
        found = bad_bytes_field(key, sub) if isinstance(key, str) else None
        found = found or bad_bytes_field(item, sub)
        if found is not None:
            return found
    return None


def decode(data: bytes) -> str:
    """UTF-8 text; bytes that are not UTF-8 are kept as U+DC80-U+DCFF (errors="surrogateescape")
    so that the row and field holding them can be named after parsing."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="surrogateescape")


def check_row(value: Any, source: str, index: int) -> Row:
    """`value` as a row, or a `RowError` for a non-object or bytes that are not UTF-8."""
    if not isinstance(value, dict):
        described = f"expected a row object (column -> value), got {describe_type(value)}"
        raise RowError(described, described, file=source, row=index)
    bad_field = bad_bytes_field(value, "")
    if bad_field is not None:
        raise RowError(
            "row not valid UTF-8",
            "text is not valid UTF-8 (re-encode the file as UTF-8)",
            file=source,
            row=index,
            field=bad_field,
        )
    return value
