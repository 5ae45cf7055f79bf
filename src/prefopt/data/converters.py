"""Converters for the formats that need more than a field-by-field check.

- implicit prompt: `chosen`/`rejected` hold whole texts or conversations; their shared start is
  the prompt.
- Anthropic HH: `chosen`/`rejected` are "\\n\\nHuman: ...\\n\\nAssistant: ..." transcripts.
- UltraFeedback: one prompt with several scored completions; the best and the worst make a pair.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from prefopt.data.fields import (
    ColumnMap,
    RowContext,
    RowDropped,
    check_assistant_turns,
    check_messages,
    check_text,
    describe_type,
    get_column,
    is_message_list,
)
from prefopt.data.records import Message, PreferencePair

# Anthropic HH transcripts: each turn starts with a blank line and a speaker tag.
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}

ULTRAFEEDBACK_SCORE_KEYS = ("overall_score", "fine-grained_score", "score")
"""Score keys of an UltraFeedback completion, in order of preference (the first key that every
completion of a row has is used for that row)."""

ULTRAFEEDBACK_TEXT_KEYS = ("response", "text")
"""Keys holding an UltraFeedback completion's text, in order of preference."""


def looks_like_hh(text: str) -> bool:
    """True if `text` is an Anthropic HH transcript: it opens with a Human turn and has an
    Assistant turn."""
    return text.lstrip().startswith("Human:") and "\n\nAssistant:" in text


# ---------------------------------------------------------------------------------------------
# Implicit prompt


def implicit_prompt_pair(
    row: Mapping[str, Any], columns: ColumnMap, ctx: RowContext
) -> PreferencePair:
    """Split two full texts or conversations into shared prompt + differing responses."""
    chosen = get_column(row, columns.chosen, ctx)
    rejected = get_column(row, columns.rejected, ctx)
    if is_message_list(chosen):
        if not is_message_list(rejected):
            raise ctx.error(
                f"expected a list of messages like '{columns.chosen}', got "
                f"{describe_type(rejected)}",
                columns.rejected,
            )
        return _split_conversations(chosen, rejected, columns, ctx)
    chosen_text = check_text(chosen, columns.chosen, ctx)
    rejected_text = check_text(rejected, columns.rejected, ctx)
    return _split_texts(chosen_text, rejected_text, columns, ctx)


def shared_prompt_length(chosen: str, rejected: str) -> int:
    """Length of the prompt two texts share: their longest common prefix, cut back to just after
    its last whitespace character (so no word is split between prompt and response).

    Returns 0 when the common prefix holds no whitespace, or only whitespace.
    """
    common = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        common += 1
    prefix = chosen[:common]
    cut = max((i + 1 for i, char in enumerate(prefix) if char.isspace()), default=0)
    return cut if prefix[:cut].strip() else 0


def _split_texts(chosen: str, rejected: str, columns: ColumnMap, ctx: RowContext) -> PreferencePair:
    cut = shared_prompt_length(chosen, rejected)
    if cut == 0:
        raise ctx.error(
            "no shared prompt: the texts do not start with the same word(s)", columns.chosen
        )
    for column, text in ((columns.chosen, chosen), (columns.rejected, rejected)):
        if not text[cut:].strip():
            raise ctx.error("empty response once the shared prompt is removed", column)
    return PreferencePair(ctx.index, chosen[:cut], chosen[cut:], rejected[cut:])


def _split_conversations(
    chosen_raw: Sequence[Any], rejected_raw: Sequence[Any], columns: ColumnMap, ctx: RowContext
) -> PreferencePair:
    chosen = check_messages(chosen_raw, columns.chosen, ctx)
    rejected = check_messages(rejected_raw, columns.rejected, ctx)
    shared = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        shared += 1
    # Identical (or one a prefix of the other) conversations: keep at least one message on each
    # side, so the duplicate/prefix case reaches the tokenizer's chosen == rejected check.
    shared = min(shared, len(chosen) - 1, len(rejected) - 1)
    if shared == 0:
        raise ctx.error("no shared prompt: the conversations start differently", columns.chosen)
    return PreferencePair(
        ctx.index,
        chosen[:shared],
        check_assistant_turns(chosen[shared:], columns.chosen, ctx, offset=shared),
        check_assistant_turns(rejected[shared:], columns.rejected, ctx, offset=shared),
    )


# ---------------------------------------------------------------------------------------------
# Anthropic HH


def hh_pair(row: Mapping[str, Any], columns: ColumnMap, ctx: RowContext) -> PreferencePair:
    """Convert an Anthropic HH row to a conversational pair.

    The prompt is every turn before the final Assistant turn; chosen/rejected are that final turn.
    Both transcripts must share the same history.
    """
    chosen = hh_messages(get_column(row, columns.chosen, ctx), columns.chosen, ctx)
    rejected = hh_messages(get_column(row, columns.rejected, ctx), columns.rejected, ctx)
    if chosen[:-1] != rejected[:-1]:
        raise ctx.error(
            f"the conversation before the final Assistant turn differs from '{columns.chosen}'",
            columns.rejected,
        )
    return PreferencePair(ctx.index, chosen[:-1], chosen[-1:], rejected[-1:])


def hh_messages(text: Any, field: str, ctx: RowContext) -> tuple[Message, ...]:
    """Parse an HH transcript into user/assistant messages (content stripped of whitespace).

    Raises:
        DataError: If it is not text, has text before the first turn, has an empty turn, does
            not end with an Assistant turn, or has no turn before it.
    """
    text = check_text(text, field, ctx)
    # A transcript may lack the leading blank line; add it so every turn splits the same way.
    parts = _HH_TURN.split("\n\n" + text.lstrip())
    if parts[0].strip() or len(parts) < 3:
        raise ctx.error("not an Anthropic HH transcript ('\\n\\nHuman: ...' turns)", field)
    messages: list[Message] = []
    for turn, (speaker, content) in enumerate(zip(parts[1::2], parts[2::2], strict=True)):
        if not content.strip():
            raise ctx.error(f"empty {speaker} turn (turn {turn})", field)
        messages.append({"role": _HH_ROLES[speaker], "content": content.strip()})
    if messages[-1]["role"] != "assistant":
        raise ctx.error("the transcript does not end with an Assistant turn", field)
    if len(messages) < 2:
        raise ctx.error("no Human turn before the final Assistant turn", field)
    return tuple(messages)


# ---------------------------------------------------------------------------------------------
# UltraFeedback


def ultrafeedback_prompt_column(row: Mapping[str, Any], columns: ColumnMap) -> str:
    """The column an UltraFeedback row's prompt is read from: `prompt`, else `instruction`."""
    return columns.prompt if columns.prompt in row else "instruction"


def ultrafeedback_pair(
    row: Mapping[str, Any], columns: ColumnMap, ctx: RowContext
) -> PreferencePair:
    """Pair the best-scored completion (chosen) with the worst-scored one (rejected).

    Reads `completions: [{response|text, overall_score|fine-grained_score|score}]` or parallel
    `responses` + `scores` lists. Among equal scores the first completion wins.

    Raises:
        RowDropped: With fewer than two completions, or when all scores tie.
        DataError: For malformed completions or scores.
    """
    column = ultrafeedback_prompt_column(row, columns)
    prompt = check_text(get_column(row, column, ctx), column, ctx)
    if "completions" in row:
        texts, scores = _scored_completions(row["completions"], ctx)
    else:
        texts, scores = _parallel_completions(row, ctx)
    if len(texts) < 2:
        raise RowDropped("fewer than two completions")
    best = max(range(len(scores)), key=lambda i: scores[i])
    worst = min(range(len(scores)), key=lambda i: scores[i])
    if scores[best] == scores[worst]:
        raise RowDropped("all completions have the same score")
    return PreferencePair(ctx.index, prompt, texts[best], texts[worst])


def _scored_completions(value: Any, ctx: RowContext) -> tuple[list[str], list[float]]:
    field = "completions"
    if not is_message_list(value):
        raise ctx.error(f"expected a list of completions, got {describe_type(value)}", field)
    for i, item in enumerate(value):
        if not isinstance(item, Mapping):
            raise ctx.error(
                f"expected a completion object, got {describe_type(item)}", f"{field}[{i}]"
            )
    text_key = next((k for k in ULTRAFEEDBACK_TEXT_KEYS if value and k in value[0]), "response")
    score_key = next(
        (k for k in ULTRAFEEDBACK_SCORE_KEYS if all(k in item for item in value)), None
    )
    if score_key is None and value:
        raise ctx.error(
            "no score key shared by all completions (expected one of "
            f"{', '.join(ULTRAFEEDBACK_SCORE_KEYS)})",
            field,
        )
    texts = [_completion_text(item, text_key, f"{field}[{i}]", ctx) for i, item in enumerate(value)]
    scores = [
        _score(item[score_key], f"{field}[{i}].{score_key}", ctx) for i, item in enumerate(value)
    ]
    return texts, scores


def _completion_text(item: Mapping[str, Any], key: str, field: str, ctx: RowContext) -> str:
    if key not in item:
        raise ctx.error(f"completion has no '{key}'", f"{field}.{key}")
    return check_text(item[key], f"{field}.{key}", ctx)


def _parallel_completions(row: Mapping[str, Any], ctx: RowContext) -> tuple[list[str], list[float]]:
    responses = get_column(row, "responses", ctx)
    scores = get_column(row, "scores", ctx)
    for field, value in (("responses", responses), ("scores", scores)):
        if not is_message_list(value):
            raise ctx.error(f"expected a list, got {describe_type(value)}", field)
    if len(responses) != len(scores):
        raise ctx.error(f"{len(scores)} scores for {len(responses)} responses", "scores")
    texts = [check_text(text, f"responses[{i}]", ctx) for i, text in enumerate(responses)]
    return texts, [_score(score, f"scores[{i}]", ctx) for i, score in enumerate(scores)]


def _score(value: Any, field: str, ctx: RowContext) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ctx.error(f"expected a numeric score, got {describe_type(value)}", field)
    if not math.isfinite(value):
        raise ctx.error("score is NaN" if math.isnan(value) else "score is infinite", field)
    return float(value)
