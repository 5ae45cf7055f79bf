"""Format detection for the data tools' loader: the format of a file's rows, and the rows in
another format than that (named, or with on_error="skip" left out), including a row that only
lacks the format's columns but has all of another's (e.g. an HH row after standard rows)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from prefopt.data.fields import ColumnMap
from prefopt.data.formats import FormatMismatchError, detect_format
from prefopt.datatools.extra_formats import check_extra_format, sniff_extra_format
from prefopt.datatools.reader import OnError
from prefopt.errors import DataError

__all__ = ["auto_format", "format_fields", "other_rows", "required_columns"]

Row = dict[str, Any]


def format_fields(fmt: str, row: Mapping[str, Any], columns: ColumnMap) -> list[str]:
    """The columns whose emptiness makes a row of `fmt` useless."""
    if fmt in ("standard", "conversational"):
        return [columns.prompt, columns.chosen, columns.rejected]
    if fmt in ("implicit_prompt", "hh"):
        return [columns.chosen, columns.rejected]
    if fmt == "unpaired":
        return [columns.prompt, columns.completion]
    if fmt == "ultrafeedback":
        prompt = columns.prompt if columns.prompt in row else "instruction"
        return [prompt, "completions" if "completions" in row else "responses"]
    if fmt == "shp":
        return ["history" if "history" in row else columns.prompt, "human_ref_A", "human_ref_B"]
    return [columns.prompt, next((c for c in ("ranked", "ranking") if c in row), "responses")]


def required_columns(fmt: str, row: Mapping[str, Any], columns: ColumnMap) -> list[str]:
    """The columns a row of `fmt` must have."""
    return [*format_fields(fmt, row, columns), *([columns.label] if fmt == "unpaired" else [])]


class _Tail(Sequence[Any]):
    """rows[0] followed by rows[start:], without copying (re-checking the rest is linear)."""

    def __init__(self, rows: Sequence[Any], start: int) -> None:
        self.rows, self.start = rows, start

    def __len__(self) -> int:
        return 1 + len(self.rows) - self.start

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.rows[0] if i == 0 else self.rows[self.start + i - 1]

    def __iter__(self) -> Iterator[Any]:
        yield self.rows[0]
        yield from (self.rows[i] for i in range(self.start, len(self.rows)))


def auto_format(
    rows: list[Row | None], columns: ColumnMap, source: str, on_error: OnError
) -> tuple[str, list[int]]:
    """`_detect` on the rows, unreadable ones stood in for by the first readable row."""
    first_index = next(i for i, r in enumerate(rows) if r is not None)
    first = rows[first_index]
    assert first is not None
    try:
        return _detect(
            [first if r is None else r for r in rows], columns, source, on_error, first_index
        )
    except DataError as error:
        if error.row != 0 or first_index == 0:
            raise
        # Row 0 was unreadable, and the first readable row stood in for it: name that one.
        raise DataError(error.reason, file=source, row=first_index, field=error.field) from None


def _detect(
    rows: list[Row], columns: ColumnMap, source: str, on_error: OnError, first: int = 0
) -> tuple[str, list[int]]:
    """The format of row 0, and (on_error="skip") the rows in another format; with
    on_error="raise" the first such row raises. `first` is the source row the format was
    decided from (row 0 unless that was unreadable)."""
    extra = sniff_extra_format(rows[0], columns) if isinstance(rows[0], Mapping) else None
    fmt = extra or detect_format(rows[:1], columns, source=source)
    other: list[int] = []
    for index, kind, error in _mismatches(rows, fmt, extra is not None, columns, source):
        if on_error == "skip":
            other.append(index)
        elif kind is None and error is not None:
            raise error
        else:
            raise _mismatch(str(kind), fmt, source, index, f"row {first}")
    return fmt, other


def _mismatches(
    rows: Sequence[Row], fmt: str, extra: bool, columns: ColumnMap, source: str
) -> Iterator[tuple[int, str | None, FormatMismatchError | None]]:
    """(row, its format if known, the check's error) of each row not in `fmt`, in order.

    Two checks find them: the format's own (a row that is clearly another format), and, for
    a row lacking the format's columns (which that check leaves to normalisation as a "missing
    column"), the sniffers: a row with every column of another format is in that format.
    """
    start = 1
    while True:
        error: FormatMismatchError | None = None
        try:
            if extra:
                check_extra_format(_Tail(rows, start), fmt, columns, source)
            else:
                detect_format(_Tail(rows, start), columns, source=source)
            end = len(rows)
        except FormatMismatchError as caught:
            if caught.row is None:
                raise
            end, error = start + caught.row - 1, caught
        for index in range(start, end):  # rows that passed the check
            kind = _other_format(rows[index], fmt, columns)
            if kind is not None:
                yield index, kind, None
        if error is None:
            return
        kind = _row_format(rows[end], columns)
        yield end, kind if kind != fmt else None, error
        start = end + 1


def other_rows(
    rows: Sequence[Row | None], fmt: str, columns: ColumnMap, source: str, on_error: OnError
) -> list[int]:
    """With a given format: the rows lacking its columns that are in another (see
    `_mismatches`); the first raises with on_error="raise"."""
    other = []
    for index, row in enumerate(rows):
        kind = _other_format(row, fmt, columns)
        if kind is not None:
            if on_error == "raise":
                raise _mismatch(kind, fmt, source, index, "the given format")
            other.append(index)
    return other


def _mismatch(kind: str, fmt: str, source: str, index: int, basis: str) -> FormatMismatchError:
    return FormatMismatchError(
        f"row is in another format ({kind}) than {basis} ({fmt}); all rows of a file must use "
        "one format",
        file=source,
        row=index,
    )


def _row_format(row: Any, columns: ColumnMap) -> str | None:
    """The format `row` looks like on its own, or None if it looks like none."""
    if not isinstance(row, Mapping):
        return None
    extra = sniff_extra_format(row, columns)
    if extra is not None:
        return extra
    try:
        return detect_format([row], columns)
    except DataError:
        return None


def _other_format(row: Any, fmt: str, columns: ColumnMap) -> str | None:
    """The other format of a row lacking `fmt`'s columns but having all of another's."""
    if not isinstance(row, Mapping) or all(c in row for c in required_columns(fmt, row, columns)):
        return None
    kind = _row_format(row, columns)
    if kind is None or kind == fmt:
        return None
    return kind if all(c in row for c in required_columns(kind, row, columns)) else None
