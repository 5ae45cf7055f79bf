"""Reading raw rows defensively, and writing JSON Lines.

`prefopt.data.loading.read_rows` reads a whole file into memory and stops at the first bad row.
The data tools read rows one at a time instead, so that with `on_error="skip"` an unreadable row
is skipped and counted under its reason rather than failing the whole file:

* JSON Lines (.jsonl, and a .json file holding JSON Lines: see `looks_like_json_lines`) are read
  line by line. A line longer than `max_line_bytes` is refused before any of it is decoded or
  parsed (a 100 MB line costs bounded reads, not a 100 MB JSON parse). Rows: a line too long,
  not UTF-8, not JSON, or not an object.
* CSV is read line by line too (lines and records over `max_line_bytes` refused), record by
  record (see `reader_csv`). Rows: a record with bytes that are not UTF-8, or with more or
  fewer values than the header.
* A .json array (or {"data": [...]}) is parsed whole, then checked row by row. Rows: an item
  that is not an object, or holds bytes that are not UTF-8. `max_line_bytes` does not apply.

Some errors concern the whole file and cannot be skipped, which their messages say: a .json
document that is not valid JSON (the parser cannot resynchronise inside it), a CSV line or
record over the limit or a CSV syntax error (a quoted field may span lines, so the next
record's start is unknown), an unreadable Parquet file or header. Parquet files and `datasets`
folders go through `read_rows` unchanged (their values are typed, so there are no row-level
read errors).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from prefopt.data.fields import describe_type
from prefopt.data.loading import (
    BOM,
    DEFAULT_MAX_LINE_BYTES,
    looks_like_json_lines,
    read_rows,
    unwrap_rows,
)
from prefopt.datatools.reader_csv import csv_records
from prefopt.datatools.reader_rows import (
    NOT_SKIPPABLE,
    RowError,
    bad_bytes_field,
    check_row,
    decode,
    nonblank_lines,
    too_long,
)
from prefopt.errors import ConfigError, DataError

__all__ = [
    "DEFAULT_MAX_LINE_BYTES",
    "NOT_SKIPPABLE",
    "OnError",
    "RawRows",
    "looks_like_json_lines",
    "read_raw_rows",
    "write_jsonl",
]

Row = dict[str, Any]
OnError = Literal["raise", "skip"]


@dataclass
class RawRows:
    """Rows as read, before any format is applied.

    Attributes:
        source: The file read.
        rows: One entry per row (non-blank line, CSV record, array item); None where a row
            could not be read (only with `on_error="skip"`).
        skipped: Reason -> indices of the rows that could not be read.
    """

    source: str
    rows: list[Row | None]
    skipped: dict[str, list[int]] = field(default_factory=dict)

    def skip(self, reason: str, index: int) -> None:
        self.rows.append(None)
        self.skipped.setdefault(reason, []).append(index)

    def add(self, read: Iterable[tuple[int, Row | RowError]], on_error: OnError) -> None:
        """Append rows as read; an error raises, or with on_error="skip" is counted."""
        for index, row in read:
            if not isinstance(row, RowError):
                self.rows.append(row)
            elif on_error == "raise":
                raise row
            else:
                self.skip(row.kind, index)  # a reason shared by rows with the same problem


def read_raw_rows(
    path: str | Path, *, on_error: OnError = "raise", max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
) -> RawRows:
    """Read a data file's rows (column -> value), row by row where the file type allows.

    Args:
        path: A .jsonl, .json or .csv file (read here; see the module docstring), or anything
            else `prefopt.data.loading.read_rows` reads (Parquet, a `datasets` folder).
        on_error: "raise" stops at the first unreadable row; "skip" records it as None.
        max_line_bytes: Longest accepted JSON Lines or CSV line, in bytes.

    Raises:
        DataError: Naming the file and row (and field, for bad bytes), for an unreadable row
            with on_error="raise"; naming the file (and saying it cannot be skipped) for a
            file-level problem; or for a file with no rows.
        ConfigError: For a bad `on_error` or `max_line_bytes`.
    """
    if on_error not in ("raise", "skip"):
        raise ConfigError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if max_line_bytes < 1:
        raise ConfigError(f"max_line_bytes must be positive, got {max_line_bytes}")
    source = Path(path)
    suffix = source.suffix.lower()
    if not source.is_file() or suffix not in (".jsonl", ".json", ".csv"):
        return RawRows(str(path), _read_other(path))
    raw = RawRows(str(path), [])
    if suffix == ".jsonl" or (suffix == ".json" and looks_like_json_lines(source, max_line_bytes)):
        raw.add(_json_lines(source, max_line_bytes), on_error)
    elif suffix == ".json":
        raw.add(_json_document(source), on_error)
    else:
        raw.add(csv_records(source, max_line_bytes), on_error)
    if not raw.rows:
        raise DataError("the file holds no rows", file=str(path))
    return raw


def _read_other(path: str | Path) -> list[Row | None]:
    """Rows `read_rows` reads whole (every one readable: their values are typed)."""
    try:
        return list(read_rows(path))
    except DataError as error:
        if error.row is None and error.reason.startswith("cannot read Parquet"):
            raise DataError(f"{error.reason} ({NOT_SKIPPABLE})", file=error.file) from error
        raise


# ---------------------------------------------------------------------------------------------
# JSON Lines


def _json_lines(path: Path, max_line_bytes: int) -> Iterator[tuple[int, Row | RowError]]:
    for index, (line_number, line) in enumerate(nonblank_lines(path, max_line_bytes)):
        try:
            yield index, _parse_line(line, line_number, max_line_bytes, str(path), index)
        except RowError as error:
            yield index, error


def _parse_line(
    line: bytes | None, line_number: int, max_line_bytes: int, source: str, index: int
) -> Row:
    if line is None:
        raise RowError(
            f"line longer than {max_line_bytes} bytes",
            too_long(line_number, max_line_bytes),
            file=source,
            row=index,
        )
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        text = line.decode("utf-8", errors="surrogateescape")
        try:
            bad_field = bad_bytes_field(json.loads(text), "")
        except json.JSONDecodeError:
            bad_field = None
        raise RowError(
            "line not valid UTF-8",
            f"line {line_number} is not valid UTF-8 (re-encode the file as UTF-8)",
            file=source,
            row=index,
            field=bad_field or None,
        ) from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise RowError(
            "invalid JSON",
            f"invalid JSON on line {line_number} (column {error.colno}): {error.msg}",
            file=source,
            row=index,
        ) from None
    if not isinstance(value, dict):
        described = f"expected a row object (column -> value), got {describe_type(value)}"
        raise RowError(described, described, file=source, row=index)
    return value


# ---------------------------------------------------------------------------------------------
# A .json document


def _json_document(path: Path) -> Iterator[tuple[int, Row | RowError]]:
    """Items of a JSON array (or {"data": [...]}), parsed whole, checked one by one."""
    data = path.read_bytes()
    if data.startswith(BOM):
        data = data[len(BOM) :]
    if not data.strip():
        raise DataError("the file is empty", file=str(path))
    try:
        value = json.loads(decode(data))
    except json.JSONDecodeError as error:
        raise DataError(
            f"invalid JSON at line {error.lineno}, column {error.colno}: {error.msg} (the file "
            f"is one JSON document, so rows after the break cannot be found; {NOT_SKIPPABLE}. "
            "Fix the file, or write one row per line as JSON Lines)",
            file=str(path),
        ) from None
    for index, item in enumerate(unwrap_rows(value, str(path))):
        try:
            yield index, check_row(item, str(path), index)
        except RowError as error:
            yield index, error


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
