"""Load a data file for the data tools: raw rows, the detected format, examples, and what was
left out (with row indices), so that nothing disappears without a count.

On top of `prefopt.data.load_preference_data` this

* reads files with `reader.read_raw_rows` (JSON Lines and CSV line by line, with a line size
  limit; unreadable rows of JSON Lines, CSV and JSON arrays skippable),
* knows the extra source formats "shp" and "ranked" (see `extra_formats`) and UltraFeedback's
  all-pairs expansion,
* counts rows with an empty field (blank text, null, empty list) as findings rather than errors,
* names the format of a row in another format than row 0 (also one that only lacks row 0's
  columns, e.g. an HH row after standard rows), and with `on_error="skip"` skips it (counted).

Rows that are left out before normalisation are replaced by a valid stand-in row of the same
format, so `normalize_rows` still sees every row at its own index (its errors name the right
row); the stand-ins' examples are then removed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, cast

from prefopt.data.fields import DEFAULT_COLUMNS, ColumnMap, RowContext, RowDropped
from prefopt.data.formats import FORMATS, normalize_rows
from prefopt.data.records import LoadReport, PreferencePair, UnpairedExample
from prefopt.datatools.extra_formats import (
    EXTRA_FORMATS,
    PairConverter,
    Pairing,
    ranked_pairs,
    shp_pairs,
    ultrafeedback_pairs,
)
from prefopt.datatools.loader_detect import auto_format, format_fields, other_rows
from prefopt.datatools.reader import DEFAULT_MAX_LINE_BYTES, OnError, read_raw_rows
from prefopt.errors import ConfigError, DataError

__all__ = ["ALL_FORMATS", "EMPTY_FIELD", "OTHER_FORMAT", "LoadedData", "load_data"]

Row = dict[str, Any]
Example = Union[PreferencePair, UnpairedExample]

ALL_FORMATS = (*FORMATS, *EXTRA_FORMATS)
"""Every source format the data tools read."""

OTHER_FORMAT = "row in another format than row 0"
"""Reason under which rows in a different format are skipped (on_error="skip")."""

EMPTY_FIELD = "empty field (blank text, null or empty list)"
"""Reason under which rows with an empty prompt or response are left out (always)."""

_CONVERTERS: dict[str, PairConverter] = {
    "shp": shp_pairs,
    "ranked": ranked_pairs,
    "ultrafeedback": ultrafeedback_pairs,
}

_TEXT_KEYS = ("content", "response", "text")


@dataclass
class LoadedData:
    """A file as the data tools see it.

    Attributes:
        source: The file.
        format: The detected (or given) source format.
        rows: Raw rows by source index; None for a line that could not be read.
        examples: Normalised examples; each keeps its source row index (with `pairs="all"`
            several pairs share one).
        report: Rows read/kept, and reason -> rows for everything left out: unreadable lines,
            rows in another format and rows with an empty field (`EMPTY_FIELD`) included.
        empty_fields: Row index -> its first empty field, for the rows left out for that.
    """

    source: str
    format: str
    rows: list[Row | None]
    examples: list[PreferencePair] | list[UnpairedExample]
    report: LoadReport
    empty_fields: dict[int, str] = field(default_factory=dict)

    @property
    def paired(self) -> bool:
        return self.format != "unpaired"


def load_data(
    path: str | Path,
    *,
    format: str = "auto",
    pairs: Pairing = "best-worst",
    on_error: OnError = "raise",
    columns: ColumnMap = DEFAULT_COLUMNS,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> LoadedData:
    """Read and normalise `path` (see the module docstring).

    Args:
        path: A data file (see `reader.read_raw_rows`).
        format: "auto" or one of `ALL_FORMATS`.
        pairs: For UltraFeedback and ranked rows: best vs worst, or every ordered pair.
        on_error: "raise" stops at the first bad row with a `DataError` naming file, row and
            field; "skip" leaves it out and counts it in `report.dropped`.
        columns: Column names.
        max_line_bytes: Longest JSON Lines or CSV line accepted.

    Raises:
        ConfigError: For an unknown format or pairing.
        DataError: For bad rows (on_error="raise"), or when no row is usable.
    """
    if format != "auto" and format not in ALL_FORMATS:
        raise ConfigError(f"unknown format {format!r} (expected auto or {', '.join(ALL_FORMATS)})")
    if pairs not in ("best-worst", "all"):
        raise ConfigError(f"pairs must be 'best-worst' or 'all', got {pairs!r}")
    raw = read_raw_rows(path, on_error=on_error, max_line_bytes=max_line_bytes)
    source, rows = raw.source, raw.rows
    left_out: dict[str, list[int]] = {k: list(v) for k, v in raw.skipped.items()}
    if all(r is None for r in rows):
        raise DataError("no readable rows", file=source)
    if format == "auto":
        fmt, other = auto_format(rows, columns, source, on_error)
    else:
        fmt, other = format, other_rows(rows, format, columns, source, on_error)
    if other:
        left_out[OTHER_FORMAT] = other
    empty = _empty_rows(rows, fmt, columns, set(sum(left_out.values(), [])))
    skipped = set(sum(left_out.values(), [])) | set(empty)
    stand_in = _stand_in(fmt, columns)
    filled = [stand_in if i in skipped or r is None else r for i, r in enumerate(rows)]
    examples, report = _normalize(filled, fmt, pairs, columns, source, on_error)
    examples = [e for e in examples if e.index not in skipped]
    report.dropped = {
        reason: left
        for reason, indices in report.dropped.items()
        if (left := [i for i in indices if i not in skipped])
    }
    report.dropped.update(left_out)
    if empty:
        report.dropped[EMPTY_FIELD] = sorted(empty)
    report.warnings = {}  # duplicates are the audit's business (stand-ins would confuse them)
    report.rows_kept = len(examples)
    if not examples:
        raise DataError(f"no usable rows\n{report.summary()}", file=source)
    kept = cast("list[PreferencePair] | list[UnpairedExample]", examples)
    return LoadedData(source, fmt, rows, kept, report, empty)


# ---------------------------------------------------------------------------------------------
# Empty fields and stand-in rows


def _blank(value: Any, path: str) -> str | None:
    """`path` (or the path of an item inside) if the value is null, blank text, an empty list,
    or a list holding a blank item or a message/completion with blank text."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return path
    if isinstance(value, (list, tuple)):
        if not value:
            return path
        for i, item in enumerate(value):
            if isinstance(item, Mapping):
                key = next((k for k in _TEXT_KEYS if k in item), None)
                if key is not None and _blank(item[key], "") is not None:
                    return f"{path}[{i}].{key}"
            elif _blank(item, "") is not None:
                return f"{path}[{i}]"
    return None


def _empty_rows(
    rows: Sequence[Row | None], fmt: str, columns: ColumnMap, skip: set[int]
) -> dict[int, str]:
    empty: dict[int, str] = {}
    for index, row in enumerate(rows):
        if row is None or index in skip:
            continue
        for column in format_fields(fmt, row, columns):
            found = _blank(row[column], column) if column in row else None
            if found is not None:
                empty[index] = found
                break
    return empty


def _stand_in(fmt: str, c: ColumnMap) -> Row:
    """A valid row of `fmt` (its example is discarded): keeps left-out rows' indices in place."""
    user = [{"role": "user", "content": "x"}]
    hh = "\n\nHuman: x\n\nAssistant: "
    if fmt == "conversational":
        answer = [{"role": "assistant", "content": "a"}], [{"role": "assistant", "content": "b"}]
        return {c.prompt: user, c.chosen: answer[0], c.rejected: answer[1]}
    rows: dict[str, Row] = {
        "standard": {c.prompt: "x", c.chosen: "a", c.rejected: "b"},
        "implicit_prompt": {c.chosen: "x a", c.rejected: "x b"},
        "hh": {c.chosen: f"{hh}a", c.rejected: f"{hh}b"},
        "ultrafeedback": {
            c.prompt: "x",
            "completions": [{"response": "a", "score": 1}, {"response": "b", "score": 0}],
        },
        "unpaired": {c.prompt: "x", c.completion: "a", c.label: True},
        "shp": {"history": "x", "human_ref_A": "a", "human_ref_B": "b", "labels": 1},
        "ranked": {c.prompt: "x", "ranked": ["a", "b"]},
    }
    return rows[fmt]


# ---------------------------------------------------------------------------------------------
# Normalisation


def _normalize(
    rows: list[Row], fmt: str, pairs: Pairing, columns: ColumnMap, source: str, on_error: OnError
) -> tuple[list[Example], LoadReport]:
    if fmt in FORMATS and not (fmt == "ultrafeedback" and pairs == "all"):
        examples, report = normalize_rows(
            rows, format=fmt, columns=columns, source=source, on_error=on_error
        )
        return list(examples), report
    convert = _CONVERTERS[fmt]
    report = LoadReport(source=source, format=fmt, rows_read=len(rows))
    out: list[Example] = []
    for index, row in enumerate(rows):
        ctx = RowContext(source, index)
        try:
            out.extend(convert(row, columns, ctx, pairs))
        except RowDropped as dropped:
            report.drop(dropped.reason, index)
        except DataError as error:
            if on_error == "raise":
                raise
            reason = error.reason.split(" (")[0]
            report.drop(f"{error.field}: {reason}" if error.field else reason, index)
    return out, report
