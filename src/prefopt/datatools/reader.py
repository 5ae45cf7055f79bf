"""Reading raw rows defensively, and writing JSON Lines.

`prefopt.data.loading.read_rows` reads a whole file into memory and stops at the first bad line.
The data tools read JSON Lines line by line instead, so that

* a line longer than `max_line_bytes` is refused before any of it is decoded or parsed (a 100 MB
  line costs one bounded read, not a 100 MB JSON parse), and
* with `on_error="skip"` an unreadable line (too long, not UTF-8, not JSON, not an object) is
  skipped and counted under its reason instead of failing the whole file.

Other file types (.json, .csv, .parquet, `datasets` folders) go through `read_rows` unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from prefopt.data.fields import describe_type
from prefopt.data.loading import read_rows
from prefopt.errors import ConfigError, DataError

__all__ = ["DEFAULT_MAX_LINE_BYTES", "OnError", "RawRows", "read_raw_rows", "write_jsonl"]

Row = dict[str, Any]
OnError = Literal["raise", "skip"]

DEFAULT_MAX_LINE_BYTES = 16 * 2**20
"""Longest JSON Lines line read (16 MiB); longer lines are refused (or skipped)."""

_CHUNK = 2**22
_BOM = b"\xef\xbb\xbf"


@dataclass
class RawRows:
    """Rows as read, before any format is applied.

    Attributes:
        source: The file read.
        rows: One entry per row (non-blank line); None where a line could not be read (only with
            `on_error="skip"`).
        skipped: Reason -> indices of the rows that could not be read.
    """

    source: str
    rows: list[Row | None]
    skipped: dict[str, list[int]] = field(default_factory=dict)

    def skip(self, reason: str, index: int) -> None:
        self.rows.append(None)
        self.skipped.setdefault(reason, []).append(index)


def read_raw_rows(
    path: str | Path, *, on_error: OnError = "raise", max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
) -> RawRows:
    """Read a data file's rows (column -> value), JSON Lines line by line.

    Args:
        path: A .jsonl file (read here), or anything `prefopt.data.loading.read_rows` reads.
        on_error: "raise" stops at the first unreadable line; "skip" records it as None.
        max_line_bytes: Longest accepted JSON Lines line, in bytes.

    Raises:
        DataError: Naming the file and row (and field, for bad bytes), for an unreadable line
            with on_error="raise", or a file with no rows.
        ConfigError: For a bad `on_error` or `max_line_bytes`.
    """
    if on_error not in ("raise", "skip"):
        raise ConfigError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if max_line_bytes < 1:
        raise ConfigError(f"max_line_bytes must be positive, got {max_line_bytes}")
    source = Path(path)
    if source.suffix.lower() != ".jsonl" or not source.is_file():
        return RawRows(str(path), list(read_rows(path)))
    raw = RawRows(str(path), [])
    for line_number, line in _lines(source, max_line_bytes):
        index = len(raw.rows)
        try:
            raw.rows.append(_parse_line(line, line_number, max_line_bytes, str(path), index))
        except DataError as error:
            if on_error == "raise":
                raise
            raw.skip(_reason(error), index)
    if not raw.rows:
        raise DataError("the file holds no rows", file=str(path))
    return raw


def _lines(path: Path, max_line_bytes: int) -> Iterable[tuple[int, bytes | None]]:
    """(1-based line number, bytes) of each non-blank line; None for a line over the limit.

    An over-long line is consumed in bounded chunks and never held in memory whole.
    """
    with path.open("rb") as f:
        line_number = 0
        while True:
            line = f.readline(max_line_bytes + 1)
            if not line:
                return
            line_number += 1
            if line_number == 1 and line.startswith(_BOM):
                line = line[len(_BOM) :]
            if len(line) > max_line_bytes and not line.endswith(b"\n"):
                yield line_number, None
                # Only reached when the caller goes on (skipping): read past the line's rest.
                while (rest := f.readline(_CHUNK)) and not rest.endswith(b"\n"):
                    pass
            elif line.strip():
                yield line_number, line


def _parse_line(
    line: bytes | None, line_number: int, max_line_bytes: int, source: str, index: int
) -> Row:
    if line is None:
        raise DataError(
            f"line {line_number} is longer than {max_line_bytes} bytes (raise the limit with "
            "--max-line-bytes if such rows are expected)",
            file=source,
            row=index,
        )
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        text = line.decode("utf-8", errors="surrogateescape")
        try:
            bad_field = _bad_bytes_field(json.loads(text), "")
        except json.JSONDecodeError:
            bad_field = None
        raise DataError(
            f"line {line_number} is not valid UTF-8 (re-encode the file as UTF-8)",
            file=source,
            row=index,
            field=bad_field or None,
        ) from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(
            f"invalid JSON on line {line_number} (column {error.colno}): {error.msg}",
            file=source,
            row=index,
        ) from None
    if not isinstance(value, dict):
        raise DataError(
            f"expected a row object (column -> value), got {describe_type(value)}",
            file=source,
            row=index,
        )
    return value


def _bad_bytes_field(value: Any, path: str) -> str | None:
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
        found = _bad_bytes_field(key, sub) if isinstance(key, str) else None
        found = found or _bad_bytes_field(item, sub)
        if found is not None:
            return found
    return None


def _reason(error: DataError) -> str:
    """A reason shared by lines with the same problem (line numbers and details left out)."""
    reason = error.reason
    if reason.startswith("line ") and " is " in reason:
        reason = reason.split(" is ", 1)[1].split(" (")[0]
        return f"line {reason}"
    return reason.split(" on line ")[0].split(": ")[0]


def write_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> int:
    """Write rows as UTF-8 JSON Lines through a temporary file; returns the number written."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    count = 0
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    tmp.replace(target)
    return count
