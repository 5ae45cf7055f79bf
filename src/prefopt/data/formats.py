"""Recognise a preference data format and normalise raw rows into examples.

Formats (the name is what `detect_format` returns and `LoadReport.format` records):

- "standard": `prompt`, `chosen`, `rejected` strings.
- "conversational": `prompt` is a list of {role, content} messages (system/user/assistant/tool),
  `chosen`/`rejected` are lists of assistant messages.
- "implicit_prompt": only `chosen`/`rejected`, each a whole text or conversation; the shared
  start becomes the prompt (see `converters.implicit_prompt_pair`).
- "hh": Anthropic HH transcripts in `chosen`/`rejected`, turned into conversations.
- "ultrafeedback": a prompt (`prompt` or `instruction`) with several scored completions; the
  best and worst make a pair, ties are dropped and counted.
- "unpaired": `prompt`, `completion`, `label` (bool) rows for KTO.

The format is decided from the first row; every other row must be of the same format.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Union, cast

from prefopt.data.converters import (
    hh_pair,
    implicit_prompt_pair,
    looks_like_hh,
    ultrafeedback_pair,
)
from prefopt.data.fields import (
    DEFAULT_COLUMNS,
    ColumnMap,
    RowContext,
    RowDropped,
    check_messages,
    check_response_messages,
    check_text,
    describe_type,
    get_column,
    is_message_list,
    parse_label,
)
from prefopt.data.records import (
    LoadReport,
    PreferencePair,
    Text,
    UnpairedExample,
    UnreadableRow,
)
from prefopt.errors import ConfigError, DataError

__all__ = ["FORMATS", "ColumnMap", "detect_format", "drop_reason", "normalize_rows"]

FORMATS = ("standard", "conversational", "implicit_prompt", "hh", "ultrafeedback", "unpaired")
"""Every format name `detect_format` can return."""

Example = Union[PreferencePair, UnpairedExample]
Converter = Callable[[Mapping[str, Any], ColumnMap, RowContext], Example]

DUPLICATE_WARNING = "exact duplicate of an earlier row (kept)"


class FormatMismatchError(DataError):
    """A row in a different format from the rest of the data (never skipped: it means the file,
    or the column mapping, is not what the caller thinks)."""


def detect_format(
    rows: Sequence[Mapping[str, Any]],
    columns: ColumnMap = DEFAULT_COLUMNS,
    *,
    source: str = "<rows>",
) -> str:
    """Detect the format of `rows` from the first row, then check every row has that format.

    Rows missing a column the format needs are left alone here; `normalize_rows` reports them.

    Args:
        rows: Raw rows (column name -> value).
        columns: Column names to look for.
        source: File name used in error messages.

    Returns:
        One of `FORMATS`.

    Raises:
        DataError: If there are no rows, row 0 matches no format, or a later row is in another
            format (the error names that row).
    """
    start = next((i for i, row in enumerate(rows) if not isinstance(row, UnreadableRow)), None)
    if start is None:
        unread = f" (all {len(rows)} unreadable)" if rows else ""
        raise DataError(f"no rows to read{unread}", file=source)
    first = _as_mapping(rows[start], RowContext(source, start))
    found = _classify(first, columns, strict=False)
    if found is None:
        raise RowContext(source, start).error(_undetectable_message(first, columns))
    fmt = found[0]
    for index, row in enumerate(rows):
        if isinstance(row, Mapping) and not isinstance(row, UnreadableRow):
            _check_same_format(row, fmt, columns, RowContext(source, index))
    return fmt


def normalize_rows(
    rows: Sequence[Mapping[str, Any]],
    *,
    format: str = "auto",
    columns: ColumnMap = DEFAULT_COLUMNS,
    source: str = "<rows>",
    on_error: Literal["raise", "skip"] = "raise",
) -> tuple[list[PreferencePair] | list[UnpairedExample], LoadReport]:
    """Turn raw rows into `PreferencePair`s (or `UnpairedExample`s for "unpaired").

    Args:
        rows: Raw rows, e.g. from `read_rows`.
        format: A name from `FORMATS`, or "auto" to use `detect_format`.
        columns: Column names.
        source: File name used in error messages and the report.
        on_error: "raise" stops at the first bad row; "skip" drops it and counts it in
            `LoadReport.dropped` (grouped by field and problem). Rows in a different format
            than the rest always raise.

    Returns:
        The examples (each keeps its row index) and a report of what was detected and dropped.
        Exact duplicates are kept and listed in `LoadReport.warnings`.

    Raises:
        ConfigError: For an unknown `format` or `on_error`.
        DataError: For a bad row (with on_error="raise"), or when no row is usable.
    """
    if on_error not in ("raise", "skip"):
        raise ConfigError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if format != "auto" and format not in FORMATS:
        raise ConfigError(
            f"unknown data format {format!r} (expected 'auto' or {', '.join(FORMATS)})"
        )
    fmt = detect_format(rows, columns, source=source) if format == "auto" else format
    if not rows:
        raise DataError("no rows to read", file=source)
    report = LoadReport(source=source, format=fmt, rows_read=len(rows))
    convert = _CONVERTERS[fmt]
    examples: list[Example] = []
    for index, row in enumerate(rows):
        if isinstance(row, UnreadableRow):
            report.drop(row.reason, index)
            continue
        ctx = RowContext(source, index)
        try:
            examples.append(convert(_as_mapping(row, ctx), columns, ctx))
        except RowDropped as dropped:
            report.drop(dropped.reason, index)
        except DataError as error:
            if on_error == "raise":
                raise
            report.drop(drop_reason(error), index)
    if not examples:
        raise DataError(f"no usable rows\n{report.summary()}", file=source)
    _warn_duplicates(examples, report)
    report.rows_kept = len(examples)
    return cast("list[PreferencePair] | list[UnpairedExample]", examples), report


# ---------------------------------------------------------------------------------------------
# Detection


def _classify(
    row: Mapping[str, Any], columns: ColumnMap, *, strict: bool
) -> tuple[str, str] | None:
    """The format a row looks like and the column that decided it.

    With strict=False an unclear row gets the format whose checks will explain what is wrong
    with it (e.g. a numeric prompt -> "standard", which then reports the prompt's type).
    """
    if columns.chosen in row or columns.rejected in row:
        if columns.prompt in row:
            prompt = row[columns.prompt]
            if is_message_list(prompt):
                return "conversational", columns.prompt
            return ("standard", columns.prompt) if isinstance(prompt, str) or not strict else None
        chosen = row.get(columns.chosen)
        if isinstance(chosen, str) and looks_like_hh(chosen):
            return "hh", columns.chosen
        if isinstance(chosen, str) or is_message_list(chosen) or not strict:
            return "implicit_prompt", columns.chosen
        return None
    if "completions" in row or ("responses" in row and "scores" in row):
        return "ultrafeedback", "completions" if "completions" in row else "responses"
    if columns.completion in row and columns.label in row:
        return "unpaired", columns.completion
    return None


def _has_required_columns(row: Mapping[str, Any], fmt: str, columns: ColumnMap) -> bool:
    if fmt in ("standard", "conversational"):
        needed = [columns.prompt, columns.chosen, columns.rejected]
    elif fmt in ("implicit_prompt", "hh"):
        needed = [columns.chosen, columns.rejected]
    elif fmt == "unpaired":
        needed = [columns.prompt, columns.completion, columns.label]
    else:
        has_completions = "completions" in row or ("responses" in row and "scores" in row)
        return has_completions and (columns.prompt in row or "instruction" in row)
    return all(column in row for column in needed)


def _check_same_format(
    row: Mapping[str, Any], fmt: str, columns: ColumnMap, ctx: RowContext
) -> None:
    if not _has_required_columns(row, fmt, columns):
        return  # a missing column is a row error, reported (or skipped) by normalize_rows
    found = _classify(row, columns, strict=True)
    if found is not None and found[0] != fmt:
        kind, column = found
        raise FormatMismatchError(
            f"row is in '{kind}' format, but the data is in '{fmt}' format (decided from "
            "row 0); all rows must use one format. data.on_error=skip does not cover this: "
            "convert the file with `prefopt data convert`, or drop such rows with "
            "`prefopt data clean --on-error skip`",
            file=ctx.source,
            row=ctx.index,
            field=column,
        )


def _undetectable_message(row: Mapping[str, Any], columns: ColumnMap) -> str:
    present = ", ".join(sorted(str(key) for key in row)) or "none"
    return (
        f"cannot detect the data format from columns [{present}]; expected "
        f"'{columns.prompt}'/'{columns.chosen}'/'{columns.rejected}' (standard, conversational), "
        f"'{columns.chosen}'/'{columns.rejected}' (implicit prompt, Anthropic HH), "
        f"'instruction' or '{columns.prompt}' with 'completions' (UltraFeedback), or "
        f"'{columns.prompt}'/'{columns.completion}'/'{columns.label}' (unpaired); "
        "pass a ColumnMap for other column names"
    )


# ---------------------------------------------------------------------------------------------
# Per-format converters


def _as_mapping(row: Any, ctx: RowContext) -> Mapping[str, Any]:
    if not isinstance(row, Mapping):
        raise ctx.error(f"expected a row object (column -> value), got {describe_type(row)}")
    return row


def _standard_pair(row: Mapping[str, Any], columns: ColumnMap, ctx: RowContext) -> PreferencePair:
    prompt = check_text(get_column(row, columns.prompt, ctx), columns.prompt, ctx)
    chosen = _response_text(row, columns.chosen, ctx)
    rejected = _response_text(row, columns.rejected, ctx)
    return PreferencePair(ctx.index, prompt, chosen, rejected)


def _response_text(row: Mapping[str, Any], column: str, ctx: RowContext) -> str:
    value = get_column(row, column, ctx)
    if is_message_list(value) and value and all(isinstance(v, Mapping) for v in value):
        raise ctx.error(
            "expected text (the prompt is text), got a list of messages; text and messages "
            "cannot be mixed in one row (if chosen/rejected hold whole conversations, pass "
            "format='implicit_prompt' to take the prompt from them and ignore this column)",
            column,
        )
    return check_text(value, column, ctx)


def _conversational_pair(
    row: Mapping[str, Any], columns: ColumnMap, ctx: RowContext
) -> PreferencePair:
    prompt = _prompt_messages(row, columns, ctx)
    chosen = _response_messages(row, columns.chosen, ctx)
    rejected = _response_messages(row, columns.rejected, ctx)
    return PreferencePair(ctx.index, prompt, chosen, rejected)


def _unpaired_example(
    row: Mapping[str, Any], columns: ColumnMap, ctx: RowContext
) -> UnpairedExample:
    raw_prompt = get_column(row, columns.prompt, ctx)
    prompt: Text
    completion: Text
    if is_message_list(raw_prompt):
        prompt = _prompt_messages(row, columns, ctx)
        completion = _response_messages(row, columns.completion, ctx)
    else:
        prompt = check_text(raw_prompt, columns.prompt, ctx)
        completion = check_text(get_column(row, columns.completion, ctx), columns.completion, ctx)
    label = parse_label(get_column(row, columns.label, ctx), columns.label, ctx)
    return UnpairedExample(ctx.index, prompt, completion, label)


def _prompt_messages(row: Mapping[str, Any], columns: ColumnMap, ctx: RowContext) -> Text:
    return check_messages(get_column(row, columns.prompt, ctx), columns.prompt, ctx)


def _response_messages(row: Mapping[str, Any], column: str, ctx: RowContext) -> Text:
    value = get_column(row, column, ctx)
    if not is_message_list(value):
        # Text responses to a message-list prompt: the row mixes the two kinds.
        raise ctx.error(
            f"expected a list of assistant messages (the prompt is a list of messages), got "
            f"{describe_type(value)}; text and messages cannot be mixed in one row",
            column,
        )
    return check_response_messages(value, column, ctx)


_CONVERTERS: dict[str, Converter] = {
    "standard": _standard_pair,
    "conversational": _conversational_pair,
    "implicit_prompt": implicit_prompt_pair,
    "hh": hh_pair,
    "ultrafeedback": ultrafeedback_pair,
    "unpaired": _unpaired_example,
}


# ---------------------------------------------------------------------------------------------
# Report helpers


def drop_reason(error: DataError) -> str:
    """A reason shared by rows with the same problem: details in parentheses are left out."""
    reason = error.reason.split(" (")[0]
    return f"{error.field}: {reason}" if error.field else reason


def _text_key(text: Text) -> object:
    return text if isinstance(text, str) else tuple((m["role"], m["content"]) for m in text)


def _example_key(example: Example) -> object:
    if isinstance(example, PreferencePair):
        return (_text_key(example.prompt), _text_key(example.chosen), _text_key(example.rejected))
    return (_text_key(example.prompt), _text_key(example.completion), example.label)


def _warn_duplicates(examples: Sequence[Example], report: LoadReport) -> None:
    seen: set[object] = set()
    for example in examples:
        key = _example_key(example)
        if key in seen:
            report.warn(DUPLICATE_WARNING, example.index)
        seen.add(key)
