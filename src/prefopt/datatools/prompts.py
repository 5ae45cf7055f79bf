"""Prompts for `prefopt data build`, read with the data tools' reader.

Unlike `prefopt.generation.load_prompts`, which stops at the first bad row, this honours
`on_error` and `max_line_bytes` as the other data commands do: with `on_error="skip"` an
unreadable row (see `reader.read_raw_rows`) or a row without a usable prompt (missing column,
not text or messages, blank) is left out and counted under its reason. Each prompt keeps its
source row, so later errors (a judge's NaN score) can name it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from prefopt.data.fields import RowContext, parse_prompt
from prefopt.data.formats import drop_reason
from prefopt.data.records import Text
from prefopt.datatools.reader import DEFAULT_MAX_LINE_BYTES, OnError, read_raw_rows
from prefopt.errors import DataError

__all__ = ["PromptRows", "load_prompt_rows"]


@dataclass
class PromptRows:
    """The usable prompts of a file.

    Attributes:
        source: The file.
        prompts: Text or chat messages, in file order.
        rows: The source row of each prompt.
        skipped: Reason -> source rows left out (only with on_error="skip").
    """

    source: str
    prompts: list[Text]
    rows: list[int]
    skipped: dict[str, list[int]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)

    def head(self, n: int) -> PromptRows:
        """The first `n` prompts (rows skipped before the last of them stay counted)."""
        if n >= len(self.prompts):
            return self
        last = self.rows[n - 1] if n else -1
        skipped = {
            reason: kept
            for reason, rows in self.skipped.items()
            if (kept := [r for r in rows if r < last])
        }
        return PromptRows(self.source, self.prompts[:n], self.rows[:n], skipped)

    @property
    def skipped_count(self) -> int:
        return sum(len(rows) for rows in self.skipped.values())


def load_prompt_rows(
    path: str | Path,
    *,
    column: str = "prompt",
    on_error: OnError = "raise",
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> PromptRows:
    """Read the prompts of a file of rows with `column` holding text or chat messages.

    Raises:
        DataError: Naming file, row and field, for a bad row with on_error="raise"; or when
            no row holds a usable prompt.
    """
    raw = read_raw_rows(path, on_error=on_error, max_line_bytes=max_line_bytes)
    out = PromptRows(raw.source, [], [], {k: list(v) for k, v in raw.skipped.items()})
    for index, row in enumerate(raw.rows):
        if row is None:
            continue
        ctx = RowContext(raw.source, index)
        try:
            prompt = parse_prompt(row, column, ctx)
        except DataError as error:
            if on_error == "raise":
                raise
            out.skipped.setdefault(drop_reason(error), []).append(index)
            continue
        out.prompts.append(prompt)
        out.rows.append(index)
    if not out.prompts:
        left_out = "; ".join(f"{reason}: {len(rows)}" for reason, rows in out.skipped.items())
        raise DataError(f"no usable prompts (left out: {left_out or 'none'})", file=raw.source)
    return out
