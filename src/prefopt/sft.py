"""Supervised fine-tuning (the stage before DPO): data, tokenization and the per-batch loss.

SFT reuses everything of `prefopt train` (config, LoRA, checkpoints, logging, report); only the
rows, their loss mask and the loss differ: the loss is the negative log-likelihood of the
assistant tokens, per example averaged over those tokens, and never of the prompt.

Accepted rows (`data.format=auto`, the default; `data.columns` renames the columns):
* `prompt` + a response column: `response`, `completion` or `chosen` (preference data's chosen
  side), text or messages; a column renamed with `data.columns.completion=...` or
  `data.columns.chosen=...` is looked for first;
* `messages`: a conversation that ends with an assistant turn.

`data.format=standard` requires text, `conversational` requires messages; `implicit_prompt`,
`hh` and `ultrafeedback` read preference files in those layouts and train on the chosen side.
`unpaired` (KTO rows) and `data.columns.rejected`/`label` do not apply to the native rows and are
refused with a ConfigError.

Which tokens the loss scores:
* one response (plain text, or a conversation with a single assistant turn at the end): the
  response tokens exactly as `prefopt.tokenize` splits a pair's chosen side (through EOS);
* a conversation with several assistant turns: every assistant turn, in one sequence. Each
  turn's span is what the chat template adds between rendering `messages[:i]` with
  `add_generation_prompt=True` and rendering `messages[:i + 1]`; user and system turns and the
  template's role headers are context only. Whitespace tokens after a turn's EOS (ChatML's
  newline) are not scored, and the sequence ends with the last turn's EOS. Every rendering must
  be a text prefix of the whole conversation's and encode to a token prefix of it; a template or
  tokenizer that breaks this raises a `TokenizationError` naming the row ("template_prefix").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from prefopt.collate import ExampleBatch, collate_examples
from prefopt.data.fields import (
    DEFAULT_COLUMNS,
    ColumnMap,
    RowContext,
    check_messages,
    check_text,
    is_message_list,
)
from prefopt.data.formats import normalize_rows
from prefopt.data.loading import read_rows
from prefopt.data.records import Message, PreferencePair, Text, UnpairedExample, UnreadableRow
from prefopt.errors import ConfigError, DataError, TokenizationError
from prefopt.step import StepOutput
from prefopt.tokenize import _example, _tokenize_all, _truncate  # shared with pairs
from prefopt.tokenized import TokenizedExample, TokenizeReport
from prefopt.tokenizer_info import RowError, TokenizerInfo

NATIVE_FORMATS = ("auto", "standard", "conversational")
"""Formats read as SFT rows (prompt + one response, or messages)."""
PREFERENCE_FORMATS = ("implicit_prompt", "hh", "ultrafeedback")
"""Preference layouts whose chosen side becomes the SFT response."""


# ---------------------------------------------------------------------------------------------
# Rows


def _response_columns(columns: ColumnMap) -> tuple[str, ...]:
    """Where the response may be: renamed columns first, then response/completion/chosen."""
    renamed = [
        c for c, d in ((columns.completion, "completion"), (columns.chosen, "chosen")) if c != d
    ]
    return tuple(dict.fromkeys([*renamed, "response", columns.completion, columns.chosen]))


def _text_or_messages(value: Any, field: str, ctx: RowContext, fmt: str) -> Text:
    if fmt == "standard" and is_message_list(value):
        raise ctx.error("data.format=standard reads text, but this is a list of messages", field)
    if fmt == "conversational" and not is_message_list(value):
        raise ctx.error("data.format=conversational reads lists of messages", field)
    if is_message_list(value):
        return check_messages(value, field, ctx)
    return check_text(value, field, ctx)


def _conversation(row: dict[str, Any], ctx: RowContext) -> tuple[Text, Text]:
    messages = check_messages(row["messages"], "messages", ctx)
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        raise ctx.error("the conversation must end with an assistant turn", "messages")
    if messages[0]["role"] == "assistant":
        raise ctx.error("the conversation starts with an assistant turn (no prompt)", "messages")
    return messages[:-1], messages[-1:]


def _sft_row(
    row: dict[str, Any], ctx: RowContext, columns: ColumnMap, fmt: str
) -> tuple[Text, Text]:
    """(prompt, response) of one row; raises DataError naming the row and field."""
    if "messages" in row:
        if fmt == "standard":
            raise ctx.error(
                "data.format=standard reads prompt/response text, not messages", "messages"
            )
        return _conversation(row, ctx)
    if columns.prompt not in row:
        present = ", ".join(sorted(str(key) for key in row))
        raise ctx.error(
            f"no '{columns.prompt}' (or 'messages') column (the row has: {present}); rename "
            "it with data.columns.prompt, or for pairs whose prompt is inside the chosen text "
            "set data.format=implicit_prompt or hh",
            columns.prompt,
        )
    if columns.label in row:  # KTO rows: SFT would imitate the undesirable completions too
        raise ctx.error(
            f"the row has a '{columns.label}' column, as KTO data does; SFT would imitate the "
            f"undesirable completions too. Keep only the rows with {columns.label}=true and "
            "drop the column",
            columns.label,
        )
    candidates = _response_columns(columns)
    column = next((c for c in candidates if c in row), None)
    if column is None:
        raise ctx.error(f"no response column (one of {', '.join(candidates)})", "response")
    prompt = _text_or_messages(row[columns.prompt], columns.prompt, ctx, fmt)
    response = _text_or_messages(row[column], column, ctx, fmt)
    if isinstance(prompt, str) != isinstance(response, str):
        raise ctx.error("prompt and response must both be text or both be messages", column)
    return prompt, response


def _check_sft_config(format: str, columns: ColumnMap) -> None:
    if format == "unpaired":
        raise ConfigError(
            "data.format=unpaired does not apply to SFT: KTO rows include undesirable "
            "completions, which SFT would imitate; keep the desirable rows as prompt/completion "
            "and use data.format=auto"
        )
    if format not in NATIVE_FORMATS + PREFERENCE_FORMATS:
        known = ", ".join(NATIVE_FORMATS + PREFERENCE_FORMATS)
        raise ConfigError(f"unknown data format {format!r} for SFT (expected one of {known})")
    if columns.label != DEFAULT_COLUMNS.label:
        raise ConfigError("data.columns.label does not apply to SFT (it reads no labels)")
    if format in NATIVE_FORMATS and columns.rejected != DEFAULT_COLUMNS.rejected:
        raise ConfigError(
            "data.columns.rejected does not apply to SFT rows (one response each); for "
            "preference files set data.format (implicit_prompt, hh, ultrafeedback)"
        )


def load_sft_rows(
    source: str,
    *,
    split: str | None = None,
    on_error: str = "raise",
    columns: ColumnMap = DEFAULT_COLUMNS,
    format: str = "auto",
) -> tuple[list[tuple[int, Text, Text]], list[int]]:
    """(source index, prompt, response) for every usable row, and the indices skipped.

    Args:
        source: A file, `save_to_disk` folder or Hub id (see `read_rows`).
        split: Split to read from a DatasetDict or Hub dataset.
        on_error: "raise" stops at the first bad row; "skip" drops it, unreadable JSON Lines
            lines included (see `read_rows`).
        columns: Column names (`data.columns`): prompt, and completion/chosen for the response.
        format: `data.format` (see the module docstring for what each means for SFT).

    Raises:
        ConfigError: For a format or column setting that does not apply to SFT.
        DataError: For a bad row (on_error="raise"), or when there are no rows.
    """
    _check_sft_config(format, columns)
    on: Literal["raise", "skip"] = "skip" if on_error == "skip" else "raise"
    rows = read_rows(source, split=split, on_error=on)
    if not rows:
        raise DataError("no rows", file=str(source))
    if format in PREFERENCE_FORMATS:
        pairs, report = normalize_rows(
            rows, format=format, columns=columns, source=str(source), on_error=on
        )
        kept = [(p.index, p.prompt, p.chosen) for p in pairs if isinstance(p, PreferencePair)]
        return kept, sorted(i for idx in report.dropped.values() for i in idx)
    out: list[tuple[int, Text, Text]] = []
    skipped: list[int] = []
    for index, row in enumerate(rows):
        if isinstance(row, UnreadableRow):  # a JSONL line that could not be read (skip only)
            skipped.append(index)
            continue
        try:
            prompt, response = _sft_row(row, RowContext(str(source), index), columns, format)
        except DataError:
            if on_error != "skip":
                raise
            skipped.append(index)
            continue
        out.append((index, prompt, response))
    return out, skipped


# ---------------------------------------------------------------------------------------------
# Tokenization: every assistant turn of a conversation


@dataclass(frozen=True)
class SFTExample(TokenizedExample):
    """A multi-turn SFT example: `completion_ids` runs from the first assistant turn to the end.

    Attributes:
        completion_mask: Per completion token, whether the loss scores it (False on the user
            turns and template text between assistant turns).
    """

    completion_mask: tuple[bool, ...] = ()


def _is_multi_turn(ex: UnpairedExample) -> bool:
    """Whether the prompt already holds an assistant turn (so there are several to score)."""
    return not isinstance(ex.prompt, str) and any(m["role"] == "assistant" for m in ex.prompt)


def _render(info: TokenizerInfo, messages: Sequence[Message], generation_prompt: bool) -> str:
    text = info.tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=generation_prompt
    )
    assert isinstance(text, str)
    return text


def _not_prefix(index: int, turn: int, what: str) -> RowError:
    return RowError(
        "template_prefix",
        f"the chat template is not prefix-stable at assistant turn messages[{turn}]: {what}, so "
        "the assistant turns cannot be located in the conversation; train on the last turn "
        "only (prompt = earlier messages) or use a template whose renderings extend each other",
        row=index,
        field=f"messages[{turn}]",
    )


def _assistant_spans(
    info: TokenizerInfo, index: int, messages: Sequence[Message]
) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of the whole conversation and the [start, end) token span of each assistant
    turn (rendered incrementally; every rendering must be a text and token prefix)."""
    full_text = _render(info, messages, False)
    full_ids = info.with_bos(info.encode(full_text))

    def token_end(text: str, turn: int) -> int:
        if not full_text.startswith(text):
            raise _not_prefix(index, turn, "a partial rendering is not a text prefix")
        ids = info.with_bos(info.encode(text))
        if full_ids[: len(ids)] != ids:
            raise _not_prefix(index, turn, "a token merges across a turn boundary")
        return len(ids)

    spans = []
    for turn, message in enumerate(messages):
        if message["role"] == "assistant":
            start = token_end(_render(info, messages[:turn], True), turn)
            end = token_end(_render(info, messages[: turn + 1], False), turn)
            spans.append((start, end))
    return full_ids, spans


def _scored_end(info: TokenizerInfo, ids: list[int], start: int, end: int) -> int:
    """End of a turn's scored tokens: whitespace tokens after its last EOS are not scored."""
    span = ids[start:end]
    if info.eos_id in span:
        last = start + len(span) - 1 - span[::-1].index(info.eos_id)
        if all(info.is_blank(t) for t in ids[last + 1 : end]):
            return last + 1
    return end


def _multi_turn_example(
    info: TokenizerInfo, ex: UnpairedExample, max_length: int, max_prompt_length: int | None
) -> SFTExample:
    """One sequence with every assistant turn scored (see the module docstring)."""
    if not getattr(info.tokenizer, "chat_template", None):
        raise TokenizationError(
            "conversational data needs a chat template, but the tokenizer has none", row=ex.index
        )
    assert not isinstance(ex.prompt, str) and not isinstance(ex.completion, str)
    messages = [*ex.prompt, *ex.completion]
    ids, spans = _assistant_spans(info, ex.index, messages)
    mask = [False] * len(ids)
    for start, end in spans:
        scored = _scored_end(info, ids, start, end)
        if all(info.is_blank(t) or t == info.eos_id for t in ids[start:scored]):
            raise RowError(
                "empty_response", "an assistant turn has no tokens", row=ex.index, field="messages"
            )
        mask[start:scored] = [True] * (scored - start)
    last = len(mask) - mask[::-1].index(True)  # the sequence ends with the last turn
    ids, mask = ids[:last], mask[:last]
    if ids[-1] != info.eos_id:
        ids, mask = [*ids, info.eos_id], [*mask, True]
    first = spans[0][0]
    prompt, completion, completion_mask = ids[:first], ids[first:], mask[first:]
    # Cut as `prefopt.tokenize` cuts pairs: the prompt from the left (BOS kept), later turns
    # from the right.
    prompt, cut, truncated = _truncate(
        prompt, {"completion": completion}, max_length, max_prompt_length, info.bos_id, ex.index
    )
    completion = cut["completion"]
    completion_mask = completion_mask[: len(completion)]
    return SFTExample(
        ex.index, tuple(prompt), tuple(completion), None, truncated, tuple(completion_mask)
    )


def tokenize_sft_rows(
    examples: Sequence[UnpairedExample],
    tokenizer: Any,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    on_error: Literal["raise", "skip"] = "raise",
    progress: bool = False,
) -> tuple[list[TokenizedExample], TokenizeReport]:
    """Tokenize SFT rows (label None): single responses as `prefopt.tokenize` does, and
    conversations with several assistant turns as one `SFTExample` scoring all of them.

    Returns:
        The examples in source order (bad rows left out under on_error="skip") and the report.
    """
    return _tokenize_all(
        examples, _sft_example, tokenizer, None, (max_length, max_prompt_length), on_error,
        progress,
    )  # fmt: skip


def _sft_example(
    info: TokenizerInfo, ex: UnpairedExample, max_length: int, max_prompt_length: int | None
) -> tuple[TokenizedExample, bool]:
    """One SFT row: a conversation with several assistant turns scores all of them, anything
    else tokenizes as `prefopt.tokenize` does (label None: SFT has no desirability)."""
    if _is_multi_turn(ex):
        return _multi_turn_example(info, ex, max_length, max_prompt_length), False
    t, fixed = _example(info, ex, max_length, max_prompt_length)
    return TokenizedExample(t.index, t.prompt_ids, t.completion_ids, None, t.truncated), fixed


def collate_sft(examples: Sequence[TokenizedExample], *, pad_token_id: int) -> ExampleBatch:
    """`collate_examples`, with each `SFTExample`'s completion mask applied to response_mask."""
    batch = collate_examples(examples, pad_token_id=pad_token_id)
    for i, ex in enumerate(examples):
        if isinstance(ex, SFTExample):
            start = len(ex.prompt_ids)
            mask = torch.tensor(ex.completion_mask, dtype=torch.bool)  # [len(completion)]
            batch.response_mask[i, start : start + len(mask)] = mask
    return batch


# ---------------------------------------------------------------------------------------------
# The loss


def sft_step(policy: nn.Module, batch: ExampleBatch) -> StepOutput:
    """Per-example NLL per response token ([N]) and metrics of one SFT batch."""
    logps, tokens = policy(batch.input_ids, batch.attention_mask, batch.response_mask)  # [N]
    nll = -logps / tokens.clamp(min=1).to(logps.dtype)  # [N]
    metrics = {
        "loss": nll.detach(),
        "logps/response": logps.detach(),
        "tokens/response": tokens.detach().float(),
        "perplexity": torch.exp(nll.detach()),
    }
    return StepOutput(nll, metrics)


def is_sft_batch(examples: Sequence[Any]) -> bool:
    """SFT examples are TokenizedExample rows without a label."""
    return bool(examples) and getattr(examples[0], "label", True) is None
