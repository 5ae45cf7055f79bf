"""Checks for single fields of a raw row: text, chat messages, labels.

Every check either returns the normalised value or raises a `DataError` naming the file, the row
and the field (column, or a path such as `prompt[2].role` inside a message list), so a bad row can
be found from the message alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from prefopt.data.records import Message, Text
from prefopt.errors import DataError

ROLES = ("system", "user", "assistant", "tool")
"""Message roles accepted in conversational data."""

_TRUE_LABELS = ("true", "1")
_FALSE_LABELS = ("false", "0")


@dataclass(frozen=True)
class ColumnMap:
    """Names of the raw columns each format reads (change them for differently named data).

    UltraFeedback's inner keys (`instruction`, `completions`, `response`, `overall_score`, ...)
    are fixed by that layout; its prompt is read from `prompt` when present, else `instruction`.
    """

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    completion: str = "completion"
    label: str = "label"


DEFAULT_COLUMNS = ColumnMap()
"""The default column names (a module-level instance, used as the default argument)."""


@dataclass(frozen=True)
class RowContext:
    """Where a row came from, so that errors can name the file and row."""

    source: str
    index: int

    def error(self, message: str, field: str | None = None) -> DataError:
        """A `DataError` for this row (returned, so the caller writes `raise ctx.error(...)`)."""
        return DataError(message, file=self.source, row=self.index, field=field)


class RowDropped(Exception):
    """A well-formed row that yields no example (e.g. tied UltraFeedback scores).

    Unlike a `DataError`, this is never fatal: the row is dropped and counted under `reason`.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def describe_type(value: Any) -> str:
    """A short, user-facing name of `value`'s JSON-ish type ("null", "a number", ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


def is_message_list(value: Any) -> bool:
    """True for a list/tuple (what a conversation looks like before it is checked)."""
    return isinstance(value, (list, tuple))


def get_column(row: Mapping[str, Any], column: str, ctx: RowContext) -> Any:
    """`row[column]`, or a "missing column" error listing the columns the row does have."""
    if column not in row:
        present = ", ".join(sorted(str(key) for key in row))
        raise ctx.error(f"missing column (the row has: {present})", column)
    return row[column]


def check_text(value: Any, field: str, ctx: RowContext) -> str:
    """Return `value` unchanged if it is non-blank text.

    Raises:
        DataError: For any other type (number, null, list, ...) or blank text.
    """
    if not isinstance(value, str):
        raise ctx.error(f"expected text, got {describe_type(value)}", field)
    if not value.strip():
        raise ctx.error("empty text", field)
    return value


def parse_prompt(row: Mapping[str, Any], column: str, ctx: RowContext) -> Text:
    """The prompt in `row[column]`: chat messages when it is a list, else non-blank text.

    Raises:
        DataError: For a missing column, or a value `check_messages`/`check_text` refuses.
    """
    value = get_column(row, column, ctx)
    if isinstance(value, (list, tuple)):
        return check_messages(value, column, ctx)
    return check_text(value, column, ctx)


def check_message(value: Any, field: str, ctx: RowContext) -> Message:
    """Normalise one chat message to a plain `{"role", "content"}` dict (other keys dropped).

    Raises:
        DataError: If it is not an object, or its role is unknown, or its content is missing,
            not text, or blank.
    """
    if not isinstance(value, Mapping):
        raise ctx.error(f"expected a message object, got {describe_type(value)}", field)
    role = value.get("role")
    if role is None:
        raise ctx.error("message has no 'role'", f"{field}.role")
    if not isinstance(role, str) or role not in ROLES:
        raise ctx.error(
            f"unknown role {role!r} (expected one of {', '.join(ROLES)})", f"{field}.role"
        )
    if value.get("content") is None:
        raise ctx.error("message has no 'content'", f"{field}.content")
    content = check_text(value["content"], f"{field}.content", ctx)
    return {"role": role, "content": content}


def check_messages(value: Any, field: str, ctx: RowContext) -> tuple[Message, ...]:
    """Normalise a non-empty list of chat messages (see `check_message`)."""
    if not is_message_list(value):
        raise ctx.error(f"expected a list of messages, got {describe_type(value)}", field)
    if not value:
        raise ctx.error("empty list of messages", field)
    return tuple(check_message(item, f"{field}[{i}]", ctx) for i, item in enumerate(value))


def check_assistant_turns(
    messages: tuple[Message, ...], field: str, ctx: RowContext, *, offset: int = 0
) -> tuple[Message, ...]:
    """Return `messages` if every one is an assistant turn (what a response must consist of).

    Args:
        messages: Already normalised messages.
        field: Column they came from.
        ctx: Row context for errors.
        offset: Position of `messages[0]` in the original list (for the error's field path).
    """
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            raise ctx.error(
                f"expected an assistant message, got role '{message['role']}' "
                f"('{field}' must consist of assistant turns only)",
                f"{field}[{offset + i}].role",
            )
    return messages


def check_response_messages(value: Any, field: str, ctx: RowContext) -> tuple[Message, ...]:
    """Normalise a response given as a list of assistant messages."""
    return check_assistant_turns(check_messages(value, field, ctx), field, ctx)


def parse_label(value: Any, field: str, ctx: RowContext) -> bool:
    """Parse a KTO label: a boolean, 0/1, or the text "true"/"false"/"1"/"0" (any case).

    Raises:
        DataError: For any other value.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE_LABELS:
            return True
        if word in _FALSE_LABELS:
            return False
        raise ctx.error(f"expected a boolean label (true/false), got text {value!r}", field)
    raise ctx.error(f"expected a boolean label (true/false), got {describe_type(value)}", field)
