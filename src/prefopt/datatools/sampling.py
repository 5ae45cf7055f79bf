"""Sampling k replies per prompt for `prefopt data build`, in one of two seeded ways.

* "per-prompt" (default): `prefopt.generation.generate_completions`, prompt i seeded with
  `seed + i`. A prompt's replies do not depend on the batch size or on which other prompts are
  sampled with it, so a resumed build gives exactly what an uninterrupted one would.
* "per-batch": what `scripts/build_demo_data.py` did for the bundled demo data. Prompts are
  grouped into batches by the token length of their text, and batch b calls
  `model.generate(do_sample=True, num_return_sequences=k)` after `torch.manual_seed(seed *
  100003 + b)`. Replies depend on the batch plan (so on --batch-size and the whole prompt list);
  a resumed build re-samples a partly done batch whole to keep it exact.

Either way a reply is the decoded new text, stripped of surrounding whitespace; with `trim` a
reply that hit max_new_tokens is cut back to its last complete sentence (`trim_to_sentence`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prefopt.data.records import Text
from prefopt.datatools.build import Sampling
from prefopt.generation import SamplingParams, encode_prompt, generate_completions
from prefopt.judges import prompt_text

__all__ = ["Sample", "plan_batches", "sample_replies", "trim_to_sentence"]

BATCH_SEED_STRIDE = 100_003
"""Batch b of a per-batch build samples with seed * BATCH_SEED_STRIDE + b."""


@dataclass(frozen=True)
class Sample:
    """One reply: its text (stripped, maybe trimmed) and whether it hit max_new_tokens."""

    text: str
    cut_off: bool


# A sentence end: . ! or ? after a word character or closing quote/bracket, then optional closing
# quotes/brackets, then whitespace or the end of the text.
_SENTENCE_END = re.compile(r"(?<=[\w)\]\"'’”])[.!?]+[\"'’”)\]]*(?=\s|$)")
_LIST_NUMBER = re.compile(r"(?:^|\n)\s*\d+\.$")  # "1." opening a list item, not an end


def trim_to_sentence(text: str, min_words: int = 2) -> str:
    """Cut a reply that hit max_new_tokens back to its last complete sentence.

    Training appends an end-of-turn token after each reply, so an untrimmed cut-off reply would
    teach the model to stop mid-sentence. Replies with no sentence end after `min_words` words
    (e.g. code) are kept whole.
    """
    text = text.strip()
    for match in reversed(list(_SENTENCE_END.finditer(text))):
        head = text[: match.end()]
        if _LIST_NUMBER.search(head):
            continue
        return head if len(head.split()) >= min_words else text
    return text


def _reply(text: str, cut_off: bool, trim: bool) -> Sample:
    return Sample(trim_to_sentence(text) if cut_off and trim else text.strip(), cut_off)


def plan_batches(
    sampling: Sampling, tokenizer: Any, prompts: Sequence[Text], batch_size: int
) -> list[list[int]]:
    """Prompt indices in batches of `batch_size`, prompts of similar length together.

    per-batch sorts by the token count of the prompt's text (`judges.prompt_text`, tokenizer
    defaults), as the demo script did; per-prompt by the encoded prompt (template applied).
    Ties keep prompt order.
    """
    if sampling == "per-batch":
        lengths = [len(tokenizer(prompt_text(p)).input_ids) for p in prompts]
    else:
        lengths = [len(encode_prompt(tokenizer, p)) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (lengths[i], i))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def sample_replies(
    sampling: Sampling,
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Text],
    indices: Sequence[int],
    params: SamplingParams,
    *,
    batch_number: int,
    trim: bool,
) -> list[list[Sample]]:
    """`params.num_samples` replies for each prompt in `indices` (one batch of the plan).

    Args:
        sampling: "per-prompt" or "per-batch" (see the module docstring).
        model: The causal LM, on its device.
        tokenizer: Its tokenizer.
        prompts: All prompts (indexed by `indices`).
        indices: The batch's prompt indices.
        params: Temperature, top-p, max_new_tokens, k (num_samples) and the base seed.
        batch_number: The batch's position in the plan (seeds a per-batch build).
        trim: Cut replies that hit max_new_tokens back to a sentence end.

    Returns:
        Per prompt of `indices`, its k replies in sample order.
    """
    if sampling == "per-batch":
        seed = params.seed * BATCH_SEED_STRIDE + batch_number
        return _per_batch(model, tokenizer, [prompts[i] for i in indices], params, seed, trim)
    ids = [encode_prompt(tokenizer, prompts[i]) for i in indices]
    seeds = [params.seed + i for i in indices]
    done = generate_completions(model, tokenizer, ids, seeds, params, batch_size=len(ids))
    return [[_reply(c.text, not c.finished, trim) for c in cs] for cs in done]


def _chat_text(tokenizer: Any, prompt: Text) -> str:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if not getattr(tokenizer, "chat_template", None):
        return prompt_text(prompt)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert isinstance(text, str)
    return text


@torch.inference_mode()
def _per_batch(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Text],
    params: SamplingParams,
    seed: int,
    trim: bool,
) -> list[list[Sample]]:
    """One `model.generate` call for the batch, seeded once (the demo script's sampling)."""
    texts = [_chat_text(tokenizer, p) for p in prompts]
    side = tokenizer.padding_side
    # Left padding: every row's last prompt token sits at the same position for generation.
    # The chat template already holds the special tokens.
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    batch = batch.to(next(model.parameters()).device)
    torch.manual_seed(seed)
    out = model.generate(  # type: ignore[operator]
        **batch,
        do_sample=True,
        temperature=params.temperature,
        top_p=params.top_p,
        max_new_tokens=params.max_new_tokens,
        num_return_sequences=params.num_samples,
        pad_token_id=tokenizer.pad_token_id,
    )  # (B * k, prompt_len + new_len); the rows of one prompt are adjacent
    new_tokens = out[:, batch["input_ids"].shape[1] :]  # (B * k, new_len)
    # Cut off = no EOS among the new tokens (padding after an EOS is the EOS id itself).
    cut_off = (new_tokens != tokenizer.eos_token_id).all(dim=1).tolist()  # (B * k,)
    decoded = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    replies = [_reply(t, cut, trim) for t, cut in zip(decoded, cut_off, strict=True)]
    k = params.num_samples
    return [replies[i * k : (i + 1) * k] for i in range(len(prompts))]
