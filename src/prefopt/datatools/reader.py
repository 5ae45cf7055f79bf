"""Reading raw rows defensively, and writing JSON Lines.

`prefopt.data.loading.read_rows` reads a whole file into memory and stops at the first bad row.
The data tools read rows one at a time instead, so that with `on_error="skip"` an unreadable row
is skipped and counted under its reason rather than failing the whole file:

* JSON Lines (.jsonl, and a .json file holding JSON Lines: see `looks_like_json_lines`) are read
  line by line. A line longer than `max_line_bytes` is refused before any of it is decoded or
  parsed (a 100 MB line costs bounded reads, not a 100 MB JSON parse). Rows: a line too long,
  not UTF-8, not JSON, or not an object.
* CSV is read line by line too (lines over `max_line_bytes` refused), record by record. Rows: a
  record with bytes that are not UTF-8, or with more or fewer values than the header.
* A .json array (or {"data": [...]}) is parsed whole, then checked row by row. Rows: an item
  that is not an object, or holds bytes that are not UTF-8. `max_line_bytes` does not apply.

Some errors concern the whole file and cannot be skipped, which their messages say: a .json
document that is not valid JSON (the parser cannot resynchronise inside it), a CSV line over the
limit or a CSV syntax error (a quoted field may span lines, so the next record's start is
unknown), an unreadable Parquet file or header. Parquet files and `datasets` folders go through
`read_rows` unchanged (their values are typed, so there are no row-level read errors).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from prefopt.data.fields import describe_type
from prefopt.data.loading import read_rows
from prefopt.errors import ConfigError, DataError

__all__ = [
    "DEFAULT_MAX_LINE_BYTES",
    "OnError",
    "RawRows",
    "looks_like_json_lines",
    "read_raw_rows",
    "write_jsonl",
]

Row = dict[str, Any]
OnError = Literal["raise", "skip"]

DEFAULT_MAX_LINE_BYTES = 16 * 2**20
"""Longest JSON Lines or CSV line read (16 MiB); longer lines are refused (or skipped)."""

NOT_SKIPPABLE = "a whole-file problem: --on-error skip skips rows, and cannot skip this"
"""Said in the message of every file-level read error."""

_CHUNK = 2**22
_BOM = b"\xef\xbb\xbf"


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

    def add(self, read: Iterable[tuple[int, Row | DataError]], on_error: OnError) -> None:
        """Append rows as read; an error raises, or with on_error="skip" is counted."""
        for index, row in read:
            if not isinstance(row, DataError):
                self.rows.append(row)
            elif on_error == "raise":
                raise row
            else:
                self.skip(_reason(row), index)


class _RowError(DataError):
    """An unreadable row; `kind` is the reason it is counted under when skipped."""

    def __init__(self, kind: str, message: str, *, file: str, row: int, field: str | None = None):
        super().__init__(message, file=file, row=row, field=field)
        self.kind = kind


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
        return RawRows(str(path), list[Row | None](_read_other(path)))
    raw = RawRows(str(path), [])
    if suffix == ".jsonl" or (suffix == ".json" and looks_like_json_lines(source, max_line_bytes)):
        raw.add(_json_lines(source, max_line_bytes), on_error)
    elif suffix == ".json":
        raw.add(_json_document(source), on_error)
    else:
        raw.add(_csv_records(source, max_line_bytes), on_error)
    if not raw.rows:
        raise DataError("the file holds no rows", file=str(path))
    return raw


def _read_other(path: str | Path) -> list[Row]:
    try:
        return list(read_rows(path))
    except DataError as error:
        if error.row is None and error.reason.startswith("cannot read Parquet"):
            raise DataError(f"{error.reason} ({NOT_SKIPPABLE})", file=error.file) from error
        raise


# ---------------------------------------------------------------------------------------------
# JSON Lines


def looks_like_json_lines(path: Path, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> bool:
    """Whether a .json file holds JSON Lines: its first line is one object (starts with "{" and
    ends with "}") and the next non-blank line starts with "{" too.

    A JSON array starts with "["; a pretty-printed object's first line does not end with "}",
    and a one-line {"data": [...]} has no second line. Reads at most the first two lines, an
    over-long first line in bounded chunks.
    """
    with path.open("rb") as f:
        first = _next_nonblank(f, max_line_bytes)
        if first is None or not first[0].lstrip().startswith(b"{"):
            return False
        tail = first[1]
        if not tail.rstrip().endswith(b"}"):
            return False
        second = _next_nonblank(f, max_line_bytes)
        return second is not None and second[0].lstrip().startswith(b"{")


def _next_nonblank(f: Any, max_line_bytes: int) -> tuple[bytes, bytes] | None:
    """(start, end) of the next non-blank line: at most max_line_bytes of each (equal for a
    short line). The rest of a long line is read through and dropped."""
    while line := f.readline(max_line_bytes + 1):
        if f.tell() == len(line) and line.startswith(_BOM):
            line = line[len(_BOM) :]
        if not line.strip():
            continue
        tail = line
        while not tail.endswith(b"\n") and (more := f.readline(_CHUNK)):
            tail = more
        return line, tail
    return None


def _json_lines(path: Path, max_line_bytes: int) -> Iterator[tuple[int, Row | DataError]]:
    for index, (line_number, line) in enumerate(_lines(path, max_line_bytes)):
        try:
            yield index, _parse_line(line, line_number, max_line_bytes, str(path), index)
        except DataError as error:
            yield index, error


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


def _too_long(line_number: int, max_line_bytes: int) -> str:
    return (
        f"line {line_number} is longer than {max_line_bytes} bytes (raise the limit with "
        "--max-line-bytes if such rows are expected)"
    )


def _parse_line(
    line: bytes | None, line_number: int, max_line_bytes: int, source: str, index: int
) -> Row:
    if line is None:
        raise DataError(_too_long(line_number, max_line_bytes), file=source, row=index)
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


def _decode(data: bytes) -> str:
    """UTF-8 text; bytes that are not UTF-8 are kept as U+DC80-U+DCFF (errors="surrogateescape")
    so that the row and field holding them can be named after parsing."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="surrogateescape")


def _check_row(value: Any, source: str, index: int) -> Row:
    """`value` as a row, or a `_RowError` for a non-object or bytes that are not UTF-8."""
    if not isinstance(value, dict):
        described = f"expected a row object (column -> value), got {describe_type(value)}"
        raise _RowError(described, described, file=source, row=index)
    bad_field = _bad_bytes_field(value, "")
    if bad_field is not None:
        raise _RowError(
            "row not valid UTF-8",
            "text is not valid UTF-8 (re-encode the file as UTF-8)",
            file=source,
            row=index,
            field=bad_field,
        )
    return value


# ---------------------------------------------------------------------------------------------
# A .json document


def _json_document(path: Path) -> Iterator[tuple[int, Row | DataError]]:
    """Items of a JSON array (or {"data": [...]}), parsed whole, checked one by one."""
    data = path.read_bytes()
    if data.startswith(_BOM):
        data = data[len(_BOM) :]
    if not data.strip():
        raise DataError("the file is empty", file=str(path))
    try:
        value = json.loads(_decode(data))
    except json.JSONDecodeError as error:
        raise DataError(
            f"invalid JSON at line {error.lineno}, column {error.colno}: {error.msg} (the file "
            f"is one JSON document, so rows after the break cannot be found; {NOT_SKIPPABLE}. "
            "Fix the file, or write one row per line as JSON Lines)",
            file=str(path),
        ) from None
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if not isinstance(value, list):
        raise DataError(
            'expected a list of row objects or {"data": [...]}, got ' + describe_type(value),
            file=str(path),
        )
    for index, item in enumerate(value):
        try:
            yield index, _check_row(item, str(path), index)
        except DataError as error:
            yield index, error


# ---------------------------------------------------------------------------------------------
# CSV


def _csv_lines(path: Path, max_line_bytes: int, count: list[int]) -> Iterator[str]:
    """The file's lines as text for the csv module; `count[0]` is the current line number."""
    for line_number, line in _all_lines(path, max_line_bytes):
        count[0] = line_number
        if line is None:
            raise DataError(
                f"{_too_long(line_number, max_line_bytes)}; a CSV record may span lines, so "
                f"the next record's start is unknown ({NOT_SKIPPABLE})",
                file=str(path),
            )
        yield _decode(line)


def _all_lines(path: Path, max_line_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """Every line, blank ones included (a quoted CSV field may hold blank lines)."""
    with path.open("rb") as f:
        line_number = 0
        while line := f.readline(max_line_bytes + 1):
            line_number += 1
            if line_number == 1 and line.startswith(_BOM):
                line = line[len(_BOM) :]
            yield line_number, None if len(line) > max_line_bytes and b"\n" not in line else line


def _csv_records(path: Path, max_line_bytes: int) -> Iterator[tuple[int, Row | DataError]]:
    """Records under the header, every value as text (no type guessing: "true", "" and "1"
    stay text)."""
    source = str(path)
    line = [0]
    previous_limit = csv.field_size_limit()
    csv.field_size_limit(max_line_bytes)  # the default, 128 KiB, is short for long responses
    try:
        reader = csv.reader(_csv_lines(path, max_line_bytes, line))
        header = next((values for values in reader if values), None)  # blank lines skipped
        if header is None:
            raise DataError("the file is empty", file=source)
        if _bad_bytes_field(header, "") is not None:
            raise DataError(f"the header is not valid UTF-8 ({NOT_SKIPPABLE})", file=source)
        index = 0
        while True:
            try:
                values = next(reader, None)
            except csv.Error as error:
                raise DataError(
                    f"CSV syntax error in record {index} (line {line[0]}): {error} "
                    f"({NOT_SKIPPABLE})",
                    file=source,
                ) from None
            if values is None:
                return
            if not values:
                continue  # a blank line is not a record
            yield index, _csv_row(header, values, source, index)
            index += 1
    finally:
        csv.field_size_limit(previous_limit)


def _csv_row(header: list[str], values: list[str], source: str, index: int) -> Row | DataError:
    if len(values) > len(header):
        kind = f"more values than the {len(header)} header columns"
        return _RowError(kind, kind, file=source, row=index)
    if len(values) < len(header):
        kind = "fewer values than header columns"
        return _RowError(kind, kind, file=source, row=index, field=header[len(values)])
    try:
        return _check_row(dict(zip(header, values, strict=True)), source, index)
    except DataError as error:
        return error


def _reason(error: DataError) -> str:
    """A reason shared by rows with the same problem (line numbers and details left out)."""
    if isinstance(error, _RowError):
        return error.kind
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
