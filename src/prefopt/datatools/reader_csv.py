"""CSV for the data tools' reader: read line by line within a byte limit, record by record.

A record with bytes that are not UTF-8, or with more or fewer values than the header, is a row
error (skippable). A line over the limit, a record spanning more than the limit (an unclosed
quote would otherwise swallow the rest of the file) and a CSV syntax error stop the read: a
quoted field may span lines, so the next record's start is unknown.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefopt.data.loading import allow_long_csv_fields, csv_record_error
from prefopt.datatools.reader_rows import (
    NOT_SKIPPABLE,
    RowError,
    all_lines,
    bad_bytes_field,
    check_row,
    decode,
    too_long,
)
from prefopt.errors import DataError

__all__ = ["csv_records"]

Row = dict[str, Any]


@dataclass
class _Position:
    """Where the csv module is in the file: the line read last, and the bytes of the record
    being read so far."""

    line: int = 0
    record_bytes: int = 0


def csv_records(path: Path, max_line_bytes: int) -> Iterator[tuple[int, Row | RowError]]:
    """Records under the header, every value as text (no type guessing: "true", "" and "1"
    stay text); a row error in place of a record that cannot be a row.

    Raises:
        DataError: For a whole-file problem (see the module docstring), an empty file, or a
            header that is not valid UTF-8.
    """
    source = str(path)
    at = _Position()
    allow_long_csv_fields()  # the record size is bounded here instead, by max_line_bytes
    reader = csv.reader(_csv_lines(path, max_line_bytes, at))
    header: list[str] | None = []
    while header == []:  # blank lines before the header are skipped
        header = _next_values(reader, source, at, None)
    if header is None:
        raise DataError("the file is empty", file=source)
    if bad_bytes_field(header, "") is not None:
        raise DataError(f"the header is not valid UTF-8 ({NOT_SKIPPABLE})", file=source)
    index = 0
    while (values := _next_values(reader, source, at, index)) is not None:
        if values:  # a blank line is not a record
            yield index, _csv_row(header, values, source, index)
            index += 1


def _next_values(
    reader: Iterator[list[str]], source: str, at: _Position, index: int | None
) -> list[str] | None:
    """The next record's values (None at the end of the file; `index` None: the header)."""
    try:
        values = next(reader, None)
    except csv.Error as error:
        where = "the header" if index is None else f"record {index}"
        raise DataError(
            f"CSV syntax error in {where} (line {at.line}): {error} ({NOT_SKIPPABLE})",
            file=source,
        ) from None
    at.record_bytes = 0
    return values


def _csv_lines(path: Path, max_line_bytes: int, at: _Position) -> Iterator[str]:
    """The file's lines as text for the csv module, counted in `at`."""
    for line_number, line in all_lines(path, max_line_bytes):
        at.line = line_number
        if line is None:
            raise DataError(
                f"{too_long(line_number, max_line_bytes)}; a CSV record may span lines, so "
                f"the next record's start is unknown ({NOT_SKIPPABLE})",
                file=str(path),
            )
        at.record_bytes += len(line)
        if at.record_bytes > max_line_bytes:
            raise DataError(
                f"a CSV record runs past {max_line_bytes} bytes at line {line_number} (an "
                f"unclosed quote?), so the next record's start is unknown ({NOT_SKIPPABLE}); "
                "raise the limit with --max-line-bytes if such records are expected",
                file=str(path),
            )
        yield decode(line)


def _csv_row(header: list[str], values: list[str], source: str, index: int) -> Row | RowError:
    mismatch = csv_record_error(header, values)
    if mismatch is not None:
        message, field = mismatch
        return RowError(message, message, file=source, row=index, field=field)
    try:
        return check_row(dict(zip(header, values, strict=True)), source, index)
    except RowError as error:
        return error
