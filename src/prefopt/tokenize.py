"""Turn normalised examples into token ids: one prompt, and one or two responses per row.

How a row becomes ids (the same path for pairs, unpaired/KTO examples and SFT):

1. Render. A conversational row (any field a message tuple) goes through the tokenizer's chat
   template: the prompt with `add_generation_prompt=True`, the prompt plus response as the full
   conversation; the response text is what the full text adds after the prompt text. Plain-text
   rows go through the template too when the tokenizer has one (the prompt becomes a user turn,
   the response an assistant turn; `use_chat_template=False` turns that off), and are otherwise
   concatenated as they are (prompt text, then response text, no separator added).
2. Encode with `add_special_tokens=False`, then prepend BOS only where the tokenizer would add it
   itself (probed once) and the rendered text does not already start with it: exactly one BOS,
   never two from template + tokenizer.
3. Split. The prompt's ids must be a prefix of the prompt+response ids. When a token merges
   across the boundary (e.g. "cat" + "s" -> "cats"), the response is encoded on its own instead
   and the row is listed in `TokenizeReport.boundary_fixed`.
4. End with exactly one EOS. The rule, for one assistant message or several:
   - Every assistant turn is closed by the template's end-of-turn token, as the template
     renders it. A response of several assistant messages is rendered like any conversation:
     each turn closed, the template's separator and next assistant header between turns. Where
     the end-of-turn token is EOS (ChatML's "<|im_end|>" in SmolLM2-Instruct), such a response
     holds one EOS per assistant turn; where it is not, each turn keeps the template's own
     end-of-turn token (and what the template writes after it, e.g. a newline) and EOS appears
     once, appended at the end.
   - The response ends with exactly one EOS, never a doubled one: whitespace-only tokens after
     its last EOS are dropped (ChatML closes a turn with "<|im_end|>\\n"; the newline is part of
     the gap before the next turn and is not trained); EOS repeated at the end (EOS, possibly
     whitespace, EOS: text that already ends with EOS, closed again by the template) is cut
     back to the first; a response that does not end with EOS gets one appended.
5. Truncate (see `_truncate`): the prompt from the left to `max_prompt_length`, keeping BOS at
   position 0, then responses from the right to fit `max_length`; a cut response has no EOS.

Rows that cannot be trained on raise `TokenizationError` naming the row, or with
`on_error="skip"` are dropped and counted in the report under a reason: "empty_prompt",
"empty_response" (nothing but whitespace before EOS), "identical_responses",
"identical_after_truncation", "prompt_too_long", "template_prefix" (the template's generation
prompt is not a text prefix of the rendered conversation). A tokenizer that cannot do the job
at all (no EOS; conversational data but no chat template) raises whatever `on_error` says.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Literal, TypeVar

from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from prefopt.data.records import PreferencePair, Text, UnpairedExample, is_conversational
from prefopt.errors import ConfigError, TokenizationError
from prefopt.tokenized import TokenizedExample, TokenizedPair, TokenizeReport
from prefopt.tokenizer_info import (
    RowError,
    TokenizerInfo,
    inspect_tokenizer,
    render_prompt,
    render_response,
)

__all__ = [
    "TokenizeReport",
    "TokenizedExample",
    "TokenizedPair",
    "tokenize_example",
    "tokenize_examples",
    "tokenize_pair",
    "tokenize_pairs",
    "tokenize_sft",
]

OnError = Literal["raise", "skip"]


def _encode_row(
    info: TokenizerInfo, index: int, prompt: Text, responses: dict[str, Text]
) -> tuple[list[int], dict[str, list[int]], bool]:
    """Ids of the prompt and of each named response; True if a boundary had to be fixed."""
    conversational = any(is_conversational(v) for v in (prompt, *responses.values()))
    if conversational and not getattr(info.tokenizer, "chat_template", None):
        raise TokenizationError(
            "conversational data needs a chat template, but the tokenizer has none: set "
            "tokenizer.chat_template (the model's template) or give the data as plain text",
            row=index,
        )
    if conversational and not info.use_template:
        info = TokenizerInfo(
            info.tokenizer, info.bos_id, info.eos_id, info.adds_bos, True, info.blank
        )
    prompt_text = render_prompt(info, prompt)
    prompt_ids = info.with_bos(info.encode(prompt_text))
    if not prompt_ids:
        # Nothing to condition the first response token on: its log-prob would be undefined.
        raise RowError("empty_prompt", "the prompt has no tokens", row=index, field="prompt")
    out: dict[str, list[int]] = {}
    fixed = False
    for name, response in responses.items():
        if info.use_template:
            response_text = render_response(info, prompt, prompt_text, response, index, name)
        else:
            assert isinstance(response, str)
            response_text = response
        full_ids = info.with_bos(info.encode(prompt_text + response_text))
        if full_ids[: len(prompt_ids)] == prompt_ids:
            ids = full_ids[len(prompt_ids) :]
        else:
            fixed = True
            ids = info.encode(response_text)
        out[name] = _end_with_eos(info, ids, index, name)
    return prompt_ids, out, fixed


def _end_with_eos(info: TokenizerInfo, ids: list[int], index: int, name: str) -> list[int]:
    """End `ids` with exactly one EOS (step 4 of the module docstring): drop whitespace tokens
    after the last EOS or append EOS, then cut a repeated final EOS back to one; reject blank
    responses. EOS inside the response (closing earlier assistant turns) is left as it is."""
    if info.eos_id in ids:
        last = len(ids) - 1 - ids[::-1].index(info.eos_id)
        if all(info.is_blank(t) for t in ids[last + 1 :]):
            ids = ids[: last + 1]
    if ids[-1:] != [info.eos_id]:
        ids = [*ids, info.eos_id]
    ids = _single_final_eos(info, ids)
    if all(info.is_blank(t) for t in ids[:-1]):
        raise RowError(
            "empty_response",
            "the response has no tokens, or only whitespace, before EOS",
            row=index,
            field=name,
        )
    return ids


def _single_final_eos(info: TokenizerInfo, ids: list[int]) -> list[int]:
    """`ids` (ending with EOS) cut at the first EOS of its final run of EOS and whitespace
    tokens: [.., EOS, EOS] and [.., EOS, "\\n", EOS] become [.., EOS]."""
    end = len(ids) - 1  # position of the EOS kept
    for j in range(len(ids) - 2, -1, -1):
        if ids[j] == info.eos_id:
            end = j
        elif not info.is_blank(ids[j]):
            break
    return ids[: end + 1]


def _truncate(
    prompt: list[int],
    responses: dict[str, list[int]],
    max_length: int,
    max_prompt_length: int | None,
    bos_id: int | None,
    index: int,
) -> tuple[list[int], dict[str, list[int]], bool]:
    """Fit prompt + longest response into `max_length`.

    The prompt is cut from the left to `max_prompt_length` (its end, next to the response, is
    what matters most; BOS stays at position 0). It is never cut further to make room: a prompt
    that leaves no room for a single response token is an error. Responses are then cut from
    the right to the room left, losing their EOS.
    """
    truncated = False
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        truncated = True
        if bos_id is not None and prompt[0] == bos_id:
            prompt = [bos_id, *prompt[len(prompt) - (max_prompt_length - 1) :]]
        else:
            prompt = prompt[len(prompt) - max_prompt_length :]
    if len(prompt) >= max_length:
        raise RowError(
            "prompt_too_long",
            f"the prompt has {len(prompt)} tokens, leaving no room for a response within "
            f"max_length={max_length}; raise max_length or set max_prompt_length",
            row=index,
            field="prompt",
        )
    room = max_length - len(prompt)
    cut = {name: ids[:room] for name, ids in responses.items()}
    truncated = truncated or any(len(ids) > room for ids in responses.values())
    return prompt, cut, truncated


def _check_limits(max_length: int, max_prompt_length: int | None) -> None:
    if max_length < 2:
        raise ConfigError(f"max_length must be at least 2, got {max_length}")
    if max_prompt_length is not None and max_prompt_length < 1:
        raise ConfigError(f"max_prompt_length must be at least 1, got {max_prompt_length}")


def _tokenize_row(
    info: TokenizerInfo,
    index: int,
    prompt: Text,
    responses: dict[str, Text],
    max_length: int,
    max_prompt_length: int | None,
) -> tuple[list[int], dict[str, list[int]], bool, bool]:
    """Encode, check and truncate one row: (prompt, responses, truncated, boundary fixed)."""
    _check_limits(max_length, max_prompt_length)
    prompt_ids, ids, fixed = _encode_row(info, index, prompt, responses)
    if len(ids) == 2 and ids["chosen"] == ids["rejected"]:
        raise RowError("identical_responses", "chosen and rejected have the same tokens", row=index)
    prompt_ids, ids, truncated = _truncate(
        prompt_ids, ids, max_length, max_prompt_length, info.bos_id, index
    )
    if len(ids) == 2 and ids["chosen"] == ids["rejected"]:
        raise RowError(
            "identical_after_truncation",
            "chosen and rejected are the same after truncation; raise max_length",
            row=index,
        )
    return prompt_ids, ids, truncated, fixed


def _pair(
    info: TokenizerInfo, pair: PreferencePair, max_length: int, max_prompt_length: int | None
) -> tuple[TokenizedPair, bool]:
    responses = {"chosen": pair.chosen, "rejected": pair.rejected}
    prompt, ids, truncated, fixed = _tokenize_row(
        info, pair.index, pair.prompt, responses, max_length, max_prompt_length
    )
    out = TokenizedPair(
        pair.index, tuple(prompt), tuple(ids["chosen"]), tuple(ids["rejected"]), truncated
    )
    return out, fixed


def _example(
    info: TokenizerInfo, ex: UnpairedExample, max_length: int, max_prompt_length: int | None
) -> tuple[TokenizedExample, bool]:
    prompt, ids, truncated, fixed = _tokenize_row(
        info, ex.index, ex.prompt, {"completion": ex.completion}, max_length, max_prompt_length
    )
    out = TokenizedExample(ex.index, tuple(prompt), tuple(ids["completion"]), ex.label, truncated)
    return out, fixed


def tokenize_pair(
    pair: PreferencePair,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    use_chat_template: bool | None = None,
) -> TokenizedPair:
    """Tokenize one preference pair (see the module docstring for the rules).

    Args:
        pair: The pair.
        tokenizer: A transformers tokenizer with an EOS token.
        max_length: Maximum prompt + longest response tokens.
        max_prompt_length: Maximum prompt tokens (left-truncated), or None for no separate limit.
        use_chat_template: Apply the chat template to plain-text rows: None = when the tokenizer
            has one. Conversational rows always use it.

    Raises:
        TokenizationError: naming the row, if the pair cannot be trained on.
    """
    info = inspect_tokenizer(tokenizer, use_chat_template)
    return _pair(info, pair, max_length, max_prompt_length)[0]


def tokenize_example(
    ex: UnpairedExample,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    use_chat_template: bool | None = None,
) -> TokenizedExample:
    """Tokenize one unpaired (KTO) example; arguments as in `tokenize_pair`."""
    info = inspect_tokenizer(tokenizer, use_chat_template)
    return _example(info, ex, max_length, max_prompt_length)[0]


def tokenize_sft(
    prompt: Text,
    response: Text,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    index: int = 0,
    use_chat_template: bool | None = None,
) -> TokenizedExample:
    """Tokenize a prompt/response for SFT, exactly as a pair's chosen side (label None)."""
    ex = UnpairedExample(index, prompt, response, True)
    info = inspect_tokenizer(tokenizer, use_chat_template)
    out = _example(info, ex, max_length, max_prompt_length)[0]
    return TokenizedExample(out.index, out.prompt_ids, out.completion_ids, None, out.truncated)


T = TypeVar("T", PreferencePair, UnpairedExample)
R = TypeVar("R", TokenizedPair, TokenizedExample)


def _tokenize_all(
    items: Iterable[T],
    one: Callable[[TokenizerInfo, T, int, int | None], tuple[R, bool]],
    tokenizer: PreTrainedTokenizerBase,
    use_chat_template: bool | None,
    limits: tuple[int, int | None],
    on_error: OnError,
    progress: bool,
) -> tuple[list[R], TokenizeReport]:
    """Tokenize every row with `one`, raising or dropping bad rows, and fill the report."""
    if on_error not in ("raise", "skip"):
        raise ConfigError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    max_length, max_prompt_length = limits
    _check_limits(max_length, max_prompt_length)
    info = inspect_tokenizer(tokenizer, use_chat_template)
    report = TokenizeReport(
        bos_token=tokenizer.bos_token, bos_token_id=info.bos_id, adds_bos=info.adds_bos,
        eos_token=tokenizer.eos_token, eos_token_id=info.eos_id, chat_template=info.use_template,
    )  # fmt: skip
    out: list[R] = []
    for item in tqdm(items, desc="tokenizing", disable=not progress, unit="row"):
        report.rows += 1
        try:
            result, fixed = one(info, item, max_length, max_prompt_length)
        except RowError as err:
            if on_error == "raise":
                raise
            report.drop(err.code, item.index)
            continue
        out.append(result)
        report.kept += 1
        if result.truncated:
            report.truncated.append(item.index)
        if fixed:
            report.boundary_fixed.append(item.index)
    return out, report


def tokenize_pairs(
    pairs: Sequence[PreferencePair],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    on_error: OnError = "raise",
    progress: bool = False,
    use_chat_template: bool | None = None,
) -> tuple[list[TokenizedPair], TokenizeReport]:
    """Tokenize a dataset of pairs.

    Args:
        pairs: The pairs.
        tokenizer: A transformers tokenizer with an EOS token.
        max_length: Maximum prompt + longest response tokens.
        max_prompt_length: Maximum prompt tokens, or None.
        on_error: "raise" stops at the first bad row; "skip" drops it and counts it in the report.
            A tokenizer that cannot do the job at all (no EOS; conversational data without a
            chat template) raises either way.
        progress: Show a progress bar.
        use_chat_template: As in `tokenize_pair`.

    Returns:
        The tokenized pairs (source order, bad rows left out) and the report.
    """
    limits = (max_length, max_prompt_length)
    return _tokenize_all(pairs, _pair, tokenizer, use_chat_template, limits, on_error, progress)


def tokenize_examples(
    examples: Sequence[UnpairedExample],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    on_error: OnError = "raise",
    progress: bool = False,
    use_chat_template: bool | None = None,
) -> tuple[list[TokenizedExample], TokenizeReport]:
    """Tokenize a dataset of unpaired (KTO) examples; arguments as in `tokenize_pairs`."""
    limits = (max_length, max_prompt_length)
    return _tokenize_all(
        examples, _example, tokenizer, use_chat_template, limits, on_error, progress
    )
