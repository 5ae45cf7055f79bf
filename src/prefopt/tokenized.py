"""What tokenization produces: token-id records of pairs and examples, and the report of what
tokenizing a dataset did (kept, truncated, dropped by reason, boundary fixes).

`prefopt.tokenize` makes them; collation and the data commands read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["TokenizeReport", "TokenizedExample", "TokenizedPair"]


@dataclass(frozen=True)
class TokenizedPair:
    """A preference pair as token ids.

    Attributes:
        index: Source row index.
        prompt_ids: Prompt tokens, including BOS (exactly one, if the tokenizer uses one) and the
            chat template's generation prompt.
        chosen_ids: Chosen response tokens only, ending with exactly one EOS (unless truncated).
            A response of several assistant messages also keeps the template's end-of-turn
            token closing each earlier turn (EOS itself where the template's end-of-turn is EOS,
            e.g. ChatML); see `prefopt.tokenize`, step 4.
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
        completion_ids: Completion tokens, ending with exactly one EOS (unless truncated), as
            `TokenizedPair.chosen_ids`.
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
