"""Normalised example types: what every data format is turned into.

Text fields are either plain strings (standard format) or tuples of chat messages
(conversational format). A pair is conversational when its prompt is a message tuple; then
`chosen` and `rejected` are tuples of assistant messages (usually one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

Message = dict[str, str]
"""A chat message: {"role": "system"|"user"|"assistant"|"tool", "content": str}."""

Text = Union[str, tuple[Message, ...]]
"""Plain text, or a conversation as a tuple of messages."""


def is_conversational(value: Text) -> bool:
    """True when `value` is a message tuple rather than a plain string."""
    return not isinstance(value, str)


@dataclass(frozen=True)
class PreferencePair:
    """One preference: for `prompt`, `chosen` is preferred over `rejected`.

    Attributes:
        index: 0-based row index in the source file (kept through every later stage).
        prompt: Prompt text or messages (system/user/assistant turns before the response).
        chosen: Preferred response: text, or a tuple of assistant messages.
        rejected: Dispreferred response, same kind as `chosen`.
    """

    index: int
    prompt: Text
    chosen: Text
    rejected: Text

    @property
    def conversational(self) -> bool:
        return is_conversational(self.prompt)


@dataclass(frozen=True)
class UnpairedExample:
    """One unpaired (KTO) example: a completion labelled desirable (True) or undesirable (False).

    Attributes:
        index: 0-based row index in the source file.
        prompt: Prompt text or messages.
        completion: Response text or a tuple of assistant messages.
        label: True if the completion is desirable.
    """

    index: int
    prompt: Text
    completion: Text
    label: bool

    @property
    def conversational(self) -> bool:
        return is_conversational(self.prompt)


class UnreadableRow(dict):  # type: ignore[type-arg]
    """Stands, empty, for a source row that `read_rows(on_error="skip")` could not parse (an
    invalid JSON line, bytes that are not UTF-8), so later rows keep their indices;
    `normalize_rows` drops it and counts it under `reason`."""

    def __init__(self, reason: str) -> None:
        super().__init__()
        self.reason = reason


@dataclass
class LoadReport:
    """What loading a file found: the detected format and anything dropped, with counts.

    Attributes:
        source: The file/folder/Hub id read.
        format: Detected format name ("standard", "conversational", "implicit_prompt", "hh",
            "ultrafeedback", "unpaired").
        rows_read: Rows in the source.
        rows_kept: Examples produced.
        dropped: Reason -> list of source row indices dropped for that reason.
        warnings: Reason -> list of source row indices kept but worth a look (e.g. duplicates).
    """

    source: str
    format: str
    rows_read: int = 0
    rows_kept: int = 0
    dropped: dict[str, list[int]] = field(default_factory=dict)
    warnings: dict[str, list[int]] = field(default_factory=dict)

    def drop(self, reason: str, index: int) -> None:
        self.dropped.setdefault(reason, []).append(index)

    def warn(self, reason: str, index: int) -> None:
        self.warnings.setdefault(reason, []).append(index)

    def summary(self) -> str:
        counts = f"{self.rows_read} rows read, {self.rows_kept} kept"
        parts = [f"{self.source}: format '{self.format}', {counts}"]
        for kind, entries in (("dropped", self.dropped), ("warning", self.warnings)):
            for reason, rows in entries.items():
                head = ", ".join(str(r) for r in rows[:10])
                more = "" if len(rows) <= 10 else f", … ({len(rows) - 10} more)"
                parts.append(f"  {kind} {len(rows)} ({reason}): rows {head}{more}")
        return "\n".join(parts)
