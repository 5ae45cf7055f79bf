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
4. End with EOS exactly once. Chat templates often close a turn with EOS plus a newline (ChatML:
   "<|im_end|>\\n"); whitespace-only tokens after the response's last EOS are dropped, so the
   response ends with EOS and the newline (part of the gap before the next turn) is not trained.
   A response that does not end with EOS gets one appended.
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
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from prefopt.data.records import Message, PreferencePair, Text, UnpairedExample, is_conversational
from prefopt.errors import ConfigError, TokenizationError

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


@dataclass(frozen=True)
class TokenizedPair:
    """A preference pair as token ids.

    Attributes:
        index: Source row index.
        prompt_ids: Prompt tokens, including BOS (exactly one, if the tokenizer uses one) and the
            chat template's generation prompt.
        chosen_ids: Chosen response tokens only, ending with EOS exactly once (unless truncated).
        rejected_ids: Rejected response tokens, same rules.
        truncated: Whether the prompt or a response was cut to fit the length limits.
    """

    index: int
    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    truncated: bool = False


@dataclass(frozen=True)
class TokenizedExample:
    """An unpaired (KTO) or SFT example as token ids.

    Attributes:
        index: Source row index.
        prompt_ids: Prompt tokens, as in `TokenizedPair`.
        completion_ids: Completion tokens, ending with EOS exactly once (unless truncated).
        label: True if desirable, False if undesirable (KTO); None for SFT.
        truncated: Whether the prompt or the completion was cut to fit the length limits.
    """

    index: int
    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    label: bool | None = None
    truncated: bool = False


@dataclass
class TokenizeReport:
    """What tokenizing a dataset did, with the rows affected.

    Attributes:
        rows: Rows seen.
        kept: Rows tokenized successfully.
        truncated: Indices of kept rows that were truncated.
        dropped: Reason -> indices of rows dropped for it (only with `on_error="skip"`).
        boundary_fixed: Indices of rows whose response was encoded apart from the prompt because
            a token merged across the prompt/response boundary.
        bos_token: The tokenizer's BOS token, if any.
        bos_token_id: Its id.
        adds_bos: Whether a BOS is prepended (the tokenizer adds one with special tokens).
        eos_token: The EOS token ending each response.
        eos_token_id: Its id.
        chat_template: Whether the chat template was applied to plain-text rows.
    """

    rows: int = 0
    kept: int = 0
    truncated: list[int] = field(default_factory=list)
    dropped: dict[str, list[int]] = field(default_factory=dict)
    boundary_fixed: list[int] = field(default_factory=list)
    bos_token: str | None = None
    bos_token_id: int | None = None
    adds_bos: bool = False
    eos_token: str | None = None
    eos_token_id: int | None = None
    chat_template: bool = False

    def drop(self, reason: str, index: int) -> None:
        self.dropped.setdefault(reason, []).append(index)

    def summary(self) -> str:
        """A few human-readable lines: counts, special tokens, dropped rows by reason."""
        bos = f"BOS {self.bos_token!r} (id {self.bos_token_id})" if self.adds_bos else "no BOS"
        lines = [
            f"tokenized {self.rows} rows: {self.kept} kept, {len(self.truncated)} truncated, "
            f"{len(self.boundary_fixed)} boundary fixed; {bos}, "
            f"EOS {self.eos_token!r} (id {self.eos_token_id}); "
            f"chat template {'on' if self.chat_template else 'off'}"
        ]
        for label, rows in [("truncated", self.truncated), ("boundary fixed", self.boundary_fixed)]:
            if rows:
                lines.append(f"  {label}: rows {_row_list(rows)}")
        for reason, rows in self.dropped.items():
            lines.append(f"  dropped {len(rows)} ({reason}): rows {_row_list(rows)}")
        return "\n".join(lines)


def _row_list(rows: list[int], limit: int = 10) -> str:
    head = ", ".join(str(r) for r in rows[:limit])
    return head if len(rows) <= limit else f"{head}, … ({len(rows) - limit} more)"


class _RowError(TokenizationError):
    """A row-level failure: raised, or under `on_error="skip"` counted under `code`."""

    def __init__(self, code: str, message: str, *, row: int, field: str | None = None) -> None:
        super().__init__(message, row=row, field=field)
        self.code = code


@dataclass
class _Info:
    """What the tokenizer does, found once per dataset."""

    tokenizer: PreTrainedTokenizerBase
    bos_id: int | None
    eos_id: int
    adds_bos: bool
    use_template: bool
    blank: dict[int, bool] = field(default_factory=dict)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def with_bos(self, ids: list[int]) -> list[int]:
        # The guard against double BOS: a template that writes BOS already produced it.
        if self.adds_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            return [self.bos_id, *ids]
        return ids

    def is_blank(self, token_id: int) -> bool:
        if token_id not in self.blank:
            text = self.tokenizer.decode([token_id])
            self.blank[token_id] = isinstance(text, str) and text.strip() == ""
        return self.blank[token_id]


def _inspect(tokenizer: PreTrainedTokenizerBase, use_chat_template: bool | None) -> _Info:
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise TokenizationError(
            "the tokenizer has no EOS token, so responses cannot be ended; set tokenizer.eos_token"
        )
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if use_chat_template and not has_template:
        raise TokenizationError(
            "use_chat_template=True, but the tokenizer has no chat template: set one "
            "(tokenizer.chat_template) or use plain text"
        )
    bos_id = tokenizer.bos_token_id
    # Probe whether the tokenizer prepends BOS itself (Llama: yes; GPT-2, Qwen2, SmolLM2: no).
    plain = list(tokenizer("hello", add_special_tokens=False)["input_ids"])
    special = list(tokenizer("hello", add_special_tokens=True)["input_ids"])
    adds_bos = bos_id is not None and special[:1] == [bos_id] and plain[:1] != [bos_id]
    use = has_template if use_chat_template is None else use_chat_template
    return _Info(tokenizer, bos_id, int(eos_id), adds_bos, use)


def _as_messages(value: Text, role: str) -> list[Message]:
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def _render_chat(
    info: _Info, prompt: Text, prompt_text: str, response: Text, index: int, name: str
) -> str:
    """Response text = what the full conversation adds after the generation-prompt rendering."""
    messages = _as_messages(prompt, "user") + _as_messages(response, "assistant")
    full_text = info.tokenizer.apply_chat_template(messages, tokenize=False)
    assert isinstance(full_text, str)
    if not full_text.startswith(prompt_text):
        raise _RowError(
            "template_prefix",
            "the chat template renders the prompt (with add_generation_prompt=True) as text that "
            "is not a prefix of the full conversation, so the response cannot be separated; "
            "use a template whose generation prompt matches the assistant turn",
            row=index,
            field=name,
        )
    return full_text[len(prompt_text) :]


def _prompt_text(info: _Info, prompt: Text) -> str:
    if not info.use_template:
        assert isinstance(prompt, str)
        return prompt
    text = info.tokenizer.apply_chat_template(
        _as_messages(prompt, "user"), tokenize=False, add_generation_prompt=True
    )
    assert isinstance(text, str)
    return text


def _encode_row(
    info: _Info, index: int, prompt: Text, responses: dict[str, Text]
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
        info = _Info(info.tokenizer, info.bos_id, info.eos_id, info.adds_bos, True, info.blank)
    prompt_text = _prompt_text(info, prompt)
    prompt_ids = info.with_bos(info.encode(prompt_text))
    if not prompt_ids:
        # Nothing to condition the first response token on: its log-prob would be undefined.
        raise _RowError("empty_prompt", "the prompt has no tokens", row=index, field="prompt")
    out: dict[str, list[int]] = {}
    fixed = False
    for name, response in responses.items():
        if info.use_template:
            response_text = _render_chat(info, prompt, prompt_text, response, index, name)
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


def _end_with_eos(info: _Info, ids: list[int], index: int, name: str) -> list[int]:
    """Drop whitespace tokens after the last EOS, or append EOS; reject blank responses."""
    if info.eos_id in ids:
        last = len(ids) - 1 - ids[::-1].index(info.eos_id)
        if all(info.is_blank(t) for t in ids[last + 1 :]):
            ids = ids[: last + 1]
    if ids[-1:] != [info.eos_id]:
        ids = [*ids, info.eos_id]
    if all(info.is_blank(t) for t in ids[:-1]):
        raise _RowError(
            "empty_response",
            "the response has no tokens, or only whitespace, before EOS",
            row=index,
            field=name,
        )
    return ids


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
        raise _RowError(
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
    info: _Info,
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
        raise _RowError(
            "identical_responses", "chosen and rejected have the same tokens", row=index
        )
    prompt_ids, ids, truncated = _truncate(
        prompt_ids, ids, max_length, max_prompt_length, info.bos_id, index
    )
    if len(ids) == 2 and ids["chosen"] == ids["rejected"]:
        raise _RowError(
            "identical_after_truncation",
            "chosen and rejected are the same after truncation; raise max_length",
            row=index,
        )
    return prompt_ids, ids, truncated, fixed


def _pair(
    info: _Info, pair: PreferencePair, max_length: int, max_prompt_length: int | None
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
    info: _Info, ex: UnpairedExample, max_length: int, max_prompt_length: int | None
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
    info = _inspect(tokenizer, use_chat_template)
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
    info = _inspect(tokenizer, use_chat_template)
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
    info = _inspect(tokenizer, use_chat_template)
    out = _example(info, ex, max_length, max_prompt_length)[0]
    return TokenizedExample(out.index, out.prompt_ids, out.completion_ids, None, out.truncated)


T = TypeVar("T", PreferencePair, UnpairedExample)
R = TypeVar("R", TokenizedPair, TokenizedExample)


def _tokenize_all(
    items: Iterable[T],
    one: Callable[[_Info, T, int, int | None], tuple[R, bool]],
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
    info = _inspect(tokenizer, use_chat_template)
    report = TokenizeReport(
        bos_token=tokenizer.bos_token, bos_token_id=info.bos_id, adds_bos=info.adds_bos,
        eos_token=tokenizer.eos_token, eos_token_id=info.eos_id, chat_template=info.use_template,
    )  # fmt: skip
    out: list[R] = []
    for item in tqdm(items, desc="tokenizing", disable=not progress, unit="row"):
        report.rows += 1
        try:
            result, fixed = one(info, item, max_length, max_prompt_length)
        except _RowError as err:
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
