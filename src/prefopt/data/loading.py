"""Read raw rows from local files, `datasets` folders or the Hub, and load preference data.

`read_rows` only reads (JSON, JSONL, Parquet, CSV, a `save_to_disk` folder, or a Hub dataset id);
`load_preference_data` reads and then normalises with `formats.normalize_rows`.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Literal

from prefopt.data.fields import DEFAULT_COLUMNS, ColumnMap, describe_type
from prefopt.data.formats import normalize_rows
from prefopt.data.hub import HUB_TIMEOUT_S, read_hub, read_saved_dataset
from prefopt.data.records import LoadReport, PreferencePair, UnpairedExample, UnreadableRow
from prefopt.errors import DataError

Row = dict[str, Any]

__all__ = [
    "BOM",
    "CHUNK",
    "DEFAULT_MAX_LINE_BYTES",
    "HUB_TIMEOUT_S",
    "allow_long_csv_fields",
    "csv_record_error",
    "load_preference_data",
    "looks_like_json_lines",
    "read_rows",
    "unwrap_rows",
]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def read_rows(
    source: str | Path, *, split: str | None = None, on_error: Literal["raise", "skip"] = "raise"
) -> list[Row]:
    """Read raw rows (column name -> value) from a file, a `datasets` folder or the Hub.

    Args:
        source: A `.json` file (a list of objects, or {"data": [...]}), `.jsonl`, `.parquet` or
            `.csv` file; a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`;
            otherwise a Hub dataset id, loaded with `datasets.load_dataset`.
        split: Split of a `DatasetDict` folder or Hub dataset (default "train").
        on_error: "skip": in JSON Lines (a .jsonl file, or a .json file holding JSON Lines: see
            `looks_like_json_lines`), a line that is not valid JSON or holds bytes that are not
            UTF-8 becomes an empty `UnreadableRow` (so later rows keep their indices), which
            `normalize_rows` drops and counts. Whole-file problems (a broken .json document or
            CSV, an empty file) still raise.

    Returns:
        The rows, in source order.

    Raises:
        DataError: For a missing or unreadable source, bad bytes or JSON (naming the row), an
            empty source, an unknown split, or a Hub dataset that cannot be reached.
    """
    path = Path(source)
    if path.is_dir():
        return read_saved_dataset(path, split)
    if path.is_file():
        reader = _READERS.get(path.suffix.lower())
        if reader is None:
            raise DataError(
                f"unsupported file type '{path.suffix}' (expected {', '.join(_READERS)})",
                file=str(path),
            )
        rows = reader(path, skip=on_error == "skip")
        if not rows:
            raise DataError("the file holds no rows", file=str(path))
        return rows
    name = str(source)
    if path.suffix.lower() in _READERS or not _HUB_ID.match(name):
        raise DataError("no such file or folder", file=name)
    return read_hub(name, split)


def load_preference_data(
    source: str | Path,
    *,
    format: str = "auto",
    columns: ColumnMap = DEFAULT_COLUMNS,
    split: str | None = None,
    on_error: Literal["raise", "skip"] = "raise",
) -> tuple[list[PreferencePair] | list[UnpairedExample], LoadReport]:
    """Read `source` (see `read_rows`) and normalise its rows (see `normalize_rows`).

    Returns:
        The examples and a report naming the detected format and what was dropped.
    """
    rows = read_rows(source, split=split, on_error=on_error)
    return normalize_rows(
        rows, format=format, columns=columns, source=str(source), on_error=on_error
    )


# ---------------------------------------------------------------------------------------------
# Rules shared with the data tools' row-by-row reader (`prefopt.datatools.reader`)

DEFAULT_MAX_LINE_BYTES = 16 * 2**20
"""Longest JSON Lines or CSV line the data tools read (16 MiB); longer lines are refused."""

CHUNK = 2**22
"""Bytes read at a time when reading through the rest of an over-long line."""

BOM = b"\xef\xbb\xbf"
"""The UTF-8 byte order mark, dropped from the start of a file."""


def looks_like_json_lines(path: Path, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> bool:
    """Whether a .json file holds JSON Lines: its first line is one object (starts with "{" and
    ends with "}") and the next non-blank line starts with "{" too.

    A JSON array starts with "["; a pretty-printed object's first line does not end with "}",
    and a one-line {"data": [...]} has no second line. Reads at most the first two lines, an
    over-long first line in bounded chunks (at most `max_line_bytes` of it kept).
    """
    with path.open("rb") as f:
        first = _next_nonblank(f, max_line_bytes)
        if first is None or not first[0].lstrip().startswith(b"{"):
            return False
        if not first[1].rstrip().endswith(b"}"):
            return False
        second = _next_nonblank(f, max_line_bytes)
        return second is not None and second[0].lstrip().startswith(b"{")


def _next_nonblank(f: BinaryIO, max_line_bytes: int) -> tuple[bytes, bytes] | None:
    """(start, end) of the next non-blank line: at most max_line_bytes of each (equal for a
    short line). The rest of a long line is read through and dropped."""
    while line := f.readline(max_line_bytes + 1):
        if f.tell() == len(line) and line.startswith(BOM):
            line = line[len(BOM) :]
        if not line.strip():
            continue
        tail = line
        while not tail.endswith(b"\n") and (more := f.readline(CHUNK)):
            tail = more
        return line, tail
    return None


def unwrap_rows(value: Any, source: str) -> list[Any]:
    """The items of a parsed .json document: a list, or the list of {"data": [...]}."""
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if not isinstance(value, list):
        raise DataError(
            'expected a list of row objects or {"data": [...]}, got ' + describe_type(value),
            file=source,
        )
    return value


def csv_record_error(header: Sequence[str], values: Sequence[str]) -> tuple[str, str | None] | None:
    """(message, field) when a CSV record has more or fewer values than its header, else None.

    The field is the first header column without a value (None for too many values)."""
    if len(values) > len(header):
        return f"more values than the {len(header)} header columns", None
    if len(values) < len(header):
        return "fewer values than header columns", header[len(values)]
    return None


def allow_long_csv_fields() -> None:
    """Lift csv's 131072-character field limit, once and for the whole process: a long prompt
    or response is a row to read (and truncate or refuse later, with its row named), not a
    parser error. The limit is a C long, narrower than sys.maxsize on some platforms (64-bit
    Windows): halve until it fits."""
    limit = sys.maxsize
    while limit > csv.field_size_limit():
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:
            limit //= 2


# ---------------------------------------------------------------------------------------------
# Text files: bytes -> str with row-precise errors for bad UTF-8


def _read_text(path: Path) -> tuple[str, bool]:
    """The file's text and whether it held bytes that are not UTF-8.

    Bad bytes are kept as lone surrogates (errors="surrogateescape") so that, after parsing,
    `_raise_on_bad_bytes` can name the row and field holding them.
    """
    data = path.read_bytes()
    if not data.strip():
        raise DataError("the file is empty", file=str(path))
    try:
        return data.decode("utf-8-sig"), False
    except UnicodeDecodeError:
        return data.decode("utf-8-sig", errors="surrogateescape"), True


def _has_escaped_bytes(text: str) -> bool:
    # surrogateescape maps each undecodable byte 0x80-0xFF to U+DC80-U+DCFF.
    return any("\udc80" <= char <= "\udcff" for char in text)


def _bad_bytes_field(value: Any, field: str) -> str | None:
    """Path of the first string under `value` holding an escaped non-UTF-8 byte, if any."""
    if isinstance(value, str):
        return field if _has_escaped_bytes(value) else None
    if isinstance(value, Mapping):
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        sub = f"{field}[{key}]" if isinstance(key, int) else f"{field}.{key}"
        found = _bad_bytes_field(item, sub)
        if found is not None:
            return found
    return None


def _raise_on_bad_bytes(rows: list[Row], path: Path) -> None:
    for index, row in enumerate(rows):
        for column, value in row.items():
            field = str(column) if _has_escaped_bytes(str(column)) else None
            field = field or _bad_bytes_field(value, str(column))
            if field is not None:
                raise DataError(
                    "text is not valid UTF-8 (re-encode the file as UTF-8)",
                    file=str(path),
                    row=index,
                    field=field,
                )
    raise DataError("the file is not valid UTF-8 (re-encode it as UTF-8)", file=str(path))


def _check_object(value: Any, path: Path, index: int) -> Row:
    if not isinstance(value, dict):
        raise DataError(
            f"expected a row object (column -> value), got {describe_type(value)}",
            file=str(path),
            row=index,
        )
    return value


def _read_json(path: Path, *, skip: bool = False) -> list[Row]:
    if looks_like_json_lines(path):
        return _read_jsonl(path, skip=skip)
    text, bad_bytes = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(
            f"invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}",
            file=str(path),
        ) from error
    items = unwrap_rows(data, str(path))
    rows = [_check_object(value, path, index) for index, value in enumerate(items)]
    if bad_bytes:
        _raise_on_bad_bytes(rows, path)
    return rows


def _read_jsonl(path: Path, *, skip: bool = False) -> list[Row]:
    text, bad_bytes = _read_text(path)
    rows: list[Row] = []
    # Split on "\n" only: str.splitlines would also split on U+2028 etc., legal inside JSON text.
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue  # blank lines (e.g. a trailing newline) are not rows
        if skip and bad_bytes and _has_escaped_bytes(line):
            rows.append(UnreadableRow("text is not valid UTF-8"))
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            if skip:
                rows.append(UnreadableRow("invalid JSON"))
                continue
            raise DataError(
                f"invalid JSON on line {line_number} (column {error.colno}): {error.msg}",
                file=str(path),
                row=len(rows),
            ) from error
        if skip and not isinstance(value, dict):
            rows.append(UnreadableRow(f"expected a row object, got {describe_type(value)}"))
            continue
        rows.append(_check_object(value, path, len(rows)))
    if bad_bytes and not skip:
        _raise_on_bad_bytes(rows, path)
    return rows


def _read_csv(path: Path, *, skip: bool = False) -> list[Row]:
    """CSV rows with every value as text (no type guessing: "true", "" and "1" stay text).

    `skip` is ignored: a CSV problem stops the read (a quoted field may span lines, so after a
    bad record the next one's start is unknown)."""
    text, bad_bytes = _read_text(path)
    allow_long_csv_fields()
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[Row] = []
    header: list[str] | None = None
    try:
        header = next((values for values in reader if values), [])  # blank lines skipped
        for values in reader:
            if not values:
                continue  # a blank line is not a record
            mismatch = csv_record_error(header, values)
            if mismatch is not None:
                raise DataError(mismatch[0], file=str(path), row=len(rows), field=mismatch[1])
            rows.append(dict(zip(header, values, strict=True)))
    except csv.Error as error:  # Python's csv is lenient: little but a size limit gets here
        in_header = header is None
        raise DataError(
            f"invalid CSV{' header' if in_header else ''}: {error}",
            file=str(path),
            row=None if in_header else len(rows),
        ) from error
    if bad_bytes:
        _raise_on_bad_bytes(rows, path)
    return rows


def _read_parquet(path: Path, *, skip: bool = False) -> list[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows: list[Row] = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read Parquet: {error}", file=str(path)) from error
    return rows


_READERS: dict[str, Callable[..., list[Row]]] = {
    ".json": _read_json,
    ".jsonl": _read_jsonl,
    ".parquet": _read_parquet,
    ".csv": _read_csv,
}
