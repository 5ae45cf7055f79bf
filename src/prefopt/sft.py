"""Supervised fine-tuning (the stage before DPO): data and the per-batch loss.

SFT reuses everything of `prefopt train` (config, tokenization, LoRA, checkpoints, logging,
report); only the rows and the loss differ: each row is a prompt and one response, and the loss
is the negative log-likelihood of the response tokens (assistant tokens only, never the prompt).

Accepted rows:
* `prompt` + `response` (or `completion`, or `chosen` — preference data's chosen side), text or
  messages;
* `messages`: a conversation whose last turn is the assistant's response; earlier turns are the
  prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from prefopt.collate import ExampleBatch
from prefopt.data.fields import RowContext, check_messages, check_text, is_message_list
from prefopt.data.loading import read_rows
from prefopt.data.records import Text
from prefopt.errors import DataError
from prefopt.step import StepOutput

_RESPONSE_COLUMNS = ("response", "completion", "chosen")


def _text_or_messages(value: Any, field: str, ctx: RowContext) -> Text:
    if is_message_list(value):
        return check_messages(value, field, ctx)
    return check_text(value, field, ctx)


def _sft_row(row: dict[str, Any], ctx: RowContext) -> tuple[Text, Text]:
    """(prompt, response) of one row; raises DataError naming the row and field."""
    if "messages" in row:
        messages = check_messages(row["messages"], "messages", ctx)
        if len(messages) < 2 or messages[-1]["role"] != "assistant":
            raise ctx.error("the conversation must end with an assistant turn", "messages")
        return messages[:-1], messages[-1:]
    if "prompt" not in row:
        raise ctx.error("no 'prompt' (or 'messages') column", "prompt")
    column = next((c for c in _RESPONSE_COLUMNS if c in row), None)
    if column is None:
        raise ctx.error(f"no response column (one of {', '.join(_RESPONSE_COLUMNS)})", "response")
    prompt = _text_or_messages(row["prompt"], "prompt", ctx)
    response = _text_or_messages(row[column], column, ctx)
    if isinstance(prompt, str) != isinstance(response, str):
        raise ctx.error("prompt and response must both be text or both be messages", column)
    return prompt, response


def load_sft_rows(
    source: str, *, split: str | None = None, on_error: str = "raise"
) -> tuple[list[tuple[int, Text, Text]], list[int]]:
    """(source index, prompt, response) for every usable row, and the indices skipped."""
    rows = read_rows(source, split=split)
    if not rows:
        raise DataError("no rows", file=str(source))
    out: list[tuple[int, Text, Text]] = []
    skipped: list[int] = []
    for index, row in enumerate(rows):
        try:
            prompt, response = _sft_row(row, RowContext(str(source), index))
        except DataError:
            if on_error != "skip":
                raise
            skipped.append(index)
            continue
        out.append((index, prompt, response))
    return out, skipped


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
