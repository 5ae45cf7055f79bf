"""How a tokenizer renders and encodes rows: probed once per dataset (EOS, whether it prepends
BOS, whether a chat template applies), then used by `prefopt.tokenize` for every row.

A conversational prompt is rendered with `add_generation_prompt=True`; a response's text is what
the full conversation adds after that rendering, so prompt and response split exactly where the
template puts the assistant turn.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from prefopt.data.records import Message, Text
from prefopt.errors import TokenizationError

__all__ = [
    "RowError",
    "TokenizerInfo",
    "as_messages",
    "inspect_tokenizer",
    "render_prompt",
    "render_response",
]


class RowError(TokenizationError):
    """A row-level failure: raised, or under `on_error="skip"` counted under `code`."""

    def __init__(self, code: str, message: str, *, row: int, field: str | None = None) -> None:
        super().__init__(message, row=row, field=field)
        self.code = code


@dataclass
class TokenizerInfo:
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


def inspect_tokenizer(
    tokenizer: PreTrainedTokenizerBase, use_chat_template: bool | None
) -> TokenizerInfo:
    """Probe the tokenizer once: its EOS (required), BOS behaviour and chat template.

    Raises:
        TokenizationError: No EOS token, or a chat template asked for but missing.
    """
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
    return TokenizerInfo(tokenizer, bos_id, int(eos_id), adds_bos, use)


def as_messages(value: Text, role: str) -> list[Message]:
    """Plain text as one message of `role`; messages as they are."""
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def render_response(
    info: TokenizerInfo, prompt: Text, prompt_text: str, response: Text, index: int, name: str
) -> str:
    """Response text = what the full conversation adds after the generation-prompt rendering."""
    messages = as_messages(prompt, "user") + as_messages(response, "assistant")
    full_text = info.tokenizer.apply_chat_template(messages, tokenize=False)
    assert isinstance(full_text, str)
    if not full_text.startswith(prompt_text):
        raise RowError(
            "template_prefix",
            "the chat template renders the prompt (with add_generation_prompt=True) as text that "
            "is not a prefix of the full conversation, so the response cannot be separated; "
            "use a template whose generation prompt matches the assistant turn",
            row=index,
            field=name,
        )
    return full_text[len(prompt_text) :]


def render_prompt(info: TokenizerInfo, prompt: Text) -> str:
    """The prompt's text: as it is, or through the chat template with the generation prompt."""
    if not info.use_template:
        assert isinstance(prompt, str)
        return prompt
    text = info.tokenizer.apply_chat_template(
        as_messages(prompt, "user"), tokenize=False, add_generation_prompt=True
    )
    assert isinstance(text, str)
    return text
