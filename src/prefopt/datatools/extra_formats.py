"""Source formats `prefopt data convert` reads on top of `prefopt.data.formats`.

- "shp": Stanford Human Preferences layout: `history` (the prompt), two responses
  `human_ref_A` / `human_ref_B`, and either `labels` (1: A is preferred, 0: B is) or the two
  scores `score_A` / `score_B` (the higher wins; a tie drops the row).
- "ranked": a prompt and k responses in order, best first, under `ranked`, `ranking` or
  `responses` (without `scores`: `responses` + `scores` is UltraFeedback's parallel layout).
  Items are text or objects with `content`/`response`/`text`.

Every converter returns a list of pairs (several with `pairs="all"`), raises a `DataError` that
names the row and field, or `RowDropped` for a well-formed row that yields no pair.
UltraFeedback's all-pairs expansion reuses `prefopt.data.converters.ultrafeedback_pair` on each
two-completion slice of an already validated row.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from prefopt.data.converters import ULTRAFEEDBACK_SCORE_KEYS, ultrafeedback_pair
from prefopt.data.fields import (
    ColumnMap,
    RowContext,
    RowDropped,
    check_messages,
    check_text,
    describe_type,
    get_column,
    is_message_list,
    parse_label,
)
from prefopt.data.formats import FormatMismatchError
from prefopt.data.records import PreferencePair, Text

__all__ = [
    "EXTRA_FORMATS",
    "PAIRINGS",
    "Pairing",
    "RANKED_COLUMNS",
    "SHP_COLUMNS",
    "check_extra_format",
    "ranked_pairs",
    "shp_pairs",
    "sniff_extra_format",
    "ultrafeedback_pairs",
]

Pairing = Literal["best-worst", "all"]
PAIRINGS: tuple[Pairing, ...] = ("best-worst", "all")
"""How a row with more than two ranked/scored responses becomes pairs."""

EXTRA_FORMATS = ("shp", "ranked")
"""Format names this module adds."""

SHP_COLUMNS = ("history", "human_ref_A", "human_ref_B")
"""Columns every SHP row has (plus `labels`, or `score_A` and `score_B`)."""

RANKED_COLUMNS = ("ranked", "ranking", "responses")
"""Columns a ranked list is read from, in order of preference."""

_ITEM_TEXT_KEYS = ("content", "response", "text")

PairConverter = Callable[[Mapping[str, Any], ColumnMap, RowContext, Pairing], list[PreferencePair]]


def sniff_extra_format(row: Mapping[str, Any], columns: ColumnMap) -> str | None:
    """ "shp" or "ranked" if `row` has that layout, else None (a `prefopt.data` format)."""
    if "human_ref_A" in row and "human_ref_B" in row:
        return "shp"
    if "ranked" in row or "ranking" in row:
        return "ranked"
    if "responses" in row and "scores" not in row and columns.chosen not in row:
        return "ranked"
    return None


def check_extra_format(rows: Sequence[Any], fmt: str, columns: ColumnMap, source: str) -> None:
    """Raise `FormatMismatchError` at the first row not in `fmt` (decided from row 0)."""
    for index, row in enumerate(rows):
        if isinstance(row, Mapping) and sniff_extra_format(row, columns) != fmt:
            present = ", ".join(sorted(str(k) for k in row))
            raise FormatMismatchError(
                f"row is not in '{fmt}' format (decided from row 0; it has columns "
                f"[{present}]); all rows must use one format",
                file=source,
                row=index,
            )


# ---------------------------------------------------------------------------------------------
# SHP


def shp_pairs(
    row: Mapping[str, Any], columns: ColumnMap, ctx: RowContext, pairs: Pairing = "best-worst"
) -> list[PreferencePair]:
    """One pair from an SHP row: the preferred of `human_ref_A`/`human_ref_B` is chosen.

    `labels` decides when present (1/true: A); otherwise the higher of `score_A`/`score_B`.

    Raises:
        DataError: Missing or non-text fields, a bad label, a non-numeric or NaN score.
        RowDropped: When the scores tie.
    """
    prompt_column = "history" if "history" in row else columns.prompt
    prompt = check_text(get_column(row, prompt_column, ctx), prompt_column, ctx)
    a = check_text(get_column(row, "human_ref_A", ctx), "human_ref_A", ctx)
    b = check_text(get_column(row, "human_ref_B", ctx), "human_ref_B", ctx)
    if "labels" in row:
        a_wins = parse_label(row["labels"], "labels", ctx)
    else:
        score_a = _finite_score(get_column(row, "score_A", ctx), "score_A", ctx)
        score_b = _finite_score(get_column(row, "score_B", ctx), "score_B", ctx)
        if score_a == score_b:
            raise RowDropped("score_A equals score_B")
        a_wins = score_a > score_b
    chosen, rejected = (a, b) if a_wins else (b, a)
    return [PreferencePair(ctx.index, prompt, chosen, rejected)]


def _finite_score(value: Any, field: str, ctx: RowContext) -> float:
    """A score as a finite float; numeric text (as CSV gives) is accepted."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ctx.error(f"expected a numeric score, got {describe_type(value)}", field)
    try:
        score = float(value)
    except ValueError:
        raise ctx.error(f"expected a numeric score, got text {value!r}", field) from None
    if math.isnan(score):
        raise ctx.error("score is NaN", field)
    if math.isinf(score):
        raise ctx.error("score is infinite", field)
    return score


# ---------------------------------------------------------------------------------------------
# Ranked lists


def ranked_pairs(
    row: Mapping[str, Any], columns: ColumnMap, ctx: RowContext, pairs: Pairing = "best-worst"
) -> list[PreferencePair]:
    """Pairs from k responses listed best first: (first, last), or every (i, j) with i < j.

    Pairs of identical responses (after stripping whitespace) are left out.

    Raises:
        DataError: A missing/non-text prompt, a list that is not a list, a bad item.
        RowDropped: Fewer than two responses, or no two different ones.
    """
    prompt = _ranked_prompt(row, columns, ctx)
    column = next(c for c in RANKED_COLUMNS if c in row) if _has_ranking(row) else RANKED_COLUMNS[0]
    value = get_column(row, column, ctx)
    if not is_message_list(value):
        raise ctx.error(
            f"expected a list of responses, best first, got {describe_type(value)}", column
        )
    texts = [_item_text(item, f"{column}[{i}]", ctx) for i, item in enumerate(value)]
    if len(texts) < 2:
        raise RowDropped("fewer than two ranked responses")
    if pairs == "best-worst":
        positions = [(0, len(texts) - 1)]
    else:
        positions = [(i, j) for i in range(len(texts)) for j in range(i + 1, len(texts))]
    out = [
        PreferencePair(ctx.index, prompt, _response(prompt, texts[i]), _response(prompt, texts[j]))
        for i, j in positions
        if texts[i].strip() != texts[j].strip()
    ]
    if not out:
        raise RowDropped("the ranked responses are all the same")
    return out


def _has_ranking(row: Mapping[str, Any]) -> bool:
    return any(c in row for c in RANKED_COLUMNS)


def _ranked_prompt(row: Mapping[str, Any], columns: ColumnMap, ctx: RowContext) -> Text:
    value = get_column(row, columns.prompt, ctx)
    if is_message_list(value):
        return check_messages(value, columns.prompt, ctx)
    return check_text(value, columns.prompt, ctx)


def _item_text(item: Any, field: str, ctx: RowContext) -> str:
    if isinstance(item, Mapping):
        key = next((k for k in _ITEM_TEXT_KEYS if k in item), None)
        if key is None:
            raise ctx.error(f"response object has none of {', '.join(_ITEM_TEXT_KEYS)}", field)
        return check_text(item[key], f"{field}.{key}", ctx)
    return check_text(item, field, ctx)


def _response(prompt: Text, text: str) -> Text:
    """A response of the prompt's kind: text, or one assistant message."""
    if isinstance(prompt, str):
        return text
    return ({"role": "assistant", "content": text},)


# ---------------------------------------------------------------------------------------------
# UltraFeedback, every pair


def ultrafeedback_pairs(
    row: Mapping[str, Any], columns: ColumnMap, ctx: RowContext, pairs: Pairing = "best-worst"
) -> list[PreferencePair]:
    """Best vs worst completion, or every two completions with different scores (higher one
    chosen), in completion order.

    The whole row is validated first with `ultrafeedback_pair` (so errors name the right
    completion); each two-completion slice then goes through the same function.
    """
    best_worst = ultrafeedback_pair(row, columns, ctx)
    if pairs == "best-worst":
        return [best_worst]
    count, make = _slicer(row)
    out: list[PreferencePair] = []
    for i in range(count):
        for j in range(i + 1, count):
            try:
                out.append(ultrafeedback_pair(make(i, j), columns, ctx))
            except RowDropped:
                continue  # equal scores: no preference between these two
    return out


def _slicer(row: Mapping[str, Any]) -> tuple[int, Callable[[int, int], dict[str, Any]]]:
    """How many completions a row has, and a function making its (i, j) two-completion row."""
    if "completions" in row:
        items = list(row["completions"])
        # The score key the whole row uses (the first every completion has): other score keys
        # are removed from the slice, so a slice cannot pick a different key.
        key = next(k for k in ULTRAFEEDBACK_SCORE_KEYS if all(k in item for item in items))
        trimmed = [
            {k: v for k, v in item.items() if k not in ULTRAFEEDBACK_SCORE_KEYS or k == key}
            for item in items
        ]
        return len(items), lambda i, j: {**row, "completions": [trimmed[i], trimmed[j]]}
    responses, scores = list(row["responses"]), list(row["scores"])
    return len(responses), lambda i, j: {
        **row,
        "responses": [responses[i], responses[j]],
        "scores": [scores[i], scores[j]],
    }
