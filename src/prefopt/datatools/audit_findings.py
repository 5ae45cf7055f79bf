"""The checks behind `prefopt data audit` (see `audit.FINDINGS`): each fills its findings, as
source row indices, into an `AuditReport`."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from prefopt.data.records import PreferencePair, Text
from prefopt.datatools.loader import EMPTY_FIELD, LoadedData

if TYPE_CHECKING:
    from prefopt.datatools.audit import AuditReport

__all__ = [
    "Lengths",
    "TokenIds",
    "duplicate_findings",
    "length_findings",
    "load_findings",
    "measure_lengths",
    "text_key",
]

Lengths = tuple[int, int, int]  # prompt, chosen, rejected
TokenIds = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]  # prompt, chosen, rejected

_NO_LIMIT = sys.maxsize


def text_key(text: Text, strip: bool = False) -> object:
    """A hashable key for text or messages (contents stripped of whitespace if `strip`)."""
    if isinstance(text, str):
        return text.strip() if strip else text
    return tuple((m["role"], m["content"].strip() if strip else m["content"]) for m in text)


def load_findings(report: AuditReport, data: LoadedData) -> None:
    """Rows left out while loading: unreadable lines, unusable rows, empty fields."""
    unreadable: dict[str, list[int]] = {}
    unusable: dict[str, list[int]] = {}
    for reason, rows in data.report.dropped.items():
        if reason == EMPTY_FIELD:
            continue  # its own finding
        for row in rows:
            target = unreadable if data.rows[row] is None else unusable
            target.setdefault(reason, []).append(row)
    report.reasons = {"unreadable": unreadable, "unusable": unusable}
    for name, by_reason in report.reasons.items():
        report.findings[name] = [row for rows in by_reason.values() for row in rows]
    report.findings["empty_field"] = list(data.empty_fields)


def duplicate_findings(report: AuditReport, pairs: Sequence[PreferencePair]) -> set[int]:
    """Flag identical responses, then exact and prompt duplicates among the other rows.

    Returns:
        The rows with identical responses (left out of the later checks).
    """
    identical = {
        p.index for p in pairs if text_key(p.chosen, strip=True) == text_key(p.rejected, strip=True)
    }
    report.distinct_prompts = len({text_key(p.prompt) for p in pairs})
    seen_pairs: set[object] = set()
    seen_prompts: set[object] = set()
    for pair in pairs:
        if pair.index in identical:
            continue
        prompt = text_key(pair.prompt)
        key = (prompt, text_key(pair.chosen), text_key(pair.rejected))
        if key in seen_pairs:
            report.findings["exact_duplicate"].append(pair.index)
        elif prompt in seen_prompts:
            report.findings["prompt_duplicate"].append(pair.index)
        seen_pairs.add(key)
        seen_prompts.add(prompt)
    report.findings["identical"] = sorted(identical)
    return identical


def _tokenize(
    report: AuditReport, pairs: Sequence[PreferencePair], tokenizer: Any
) -> dict[int, TokenIds]:
    """Tokenize without a length limit (so lengths are whole); flag boundary fixes and drops."""
    from prefopt.tokenize import tokenize_pairs

    tokenized, tok_report = tokenize_pairs(pairs, tokenizer, max_length=_NO_LIMIT, on_error="skip")
    report.findings["tokenization"] = [r for rows in tok_report.dropped.values() for r in rows]
    report.reasons["tokenization"] = tok_report.dropped
    report.findings["boundary_fixed"] = list(tok_report.boundary_fixed)
    report.tokenizer = {
        "bos_token": tok_report.bos_token if tok_report.adds_bos else None,
        "eos_token": tok_report.eos_token,
        "chat_template": tok_report.chat_template,
        "rows_tokenized": tok_report.kept,
    }
    return {t.index: (t.prompt_ids, t.chosen_ids, t.rejected_ids) for t in tokenized}


def measure_lengths(
    report: AuditReport, pairs: Sequence[PreferencePair], tokenizer: Any | None
) -> dict[int, TokenIds]:
    """Fill `report.lengths` in tokens (with a tokenizer; its token ids are returned) or
    whitespace-separated words (none returned)."""
    if tokenizer is not None:
        token_ids = _tokenize(report, pairs, tokenizer)
        report.lengths = {i: (len(p), len(c), len(r)) for i, (p, c, r) in token_ids.items()}
        return token_ids
    report.lengths = {p.index: _word_lengths(p) for p in pairs}
    report.notes.append(
        "lengths are whitespace-separated words (no --model): token counts, chat template "
        "and special tokens included, will be larger"
    )
    return {}


def _words(text: Text) -> int:
    if isinstance(text, str):
        return len(text.split())
    return sum(len(m["content"].split()) for m in text)


def _word_lengths(pair: PreferencePair) -> Lengths:
    return _words(pair.prompt), _words(pair.chosen), _words(pair.rejected)


def length_findings(
    report: AuditReport,
    token_ids: dict[int, TokenIds],
    max_length_ratio: float | None,
) -> None:
    """Rows the limits would drop or cut (as `prefopt.tokenize._truncate` does: the prompt
    from the left to max_prompt_length, then the responses to the room left), and length gaps."""
    limit, prompt_limit = report.max_length, report.max_prompt_length
    for row, (prompt, chosen, rejected) in report.lengths.items():
        prompt_cut = prompt_limit is not None and prompt > prompt_limit
        room = limit - (min(prompt, prompt_limit) if prompt_limit is not None else prompt)
        if room <= 0:
            report.findings["length_dropped"].append(row)
        elif max(chosen, rejected) > room or prompt_cut:
            ids = token_ids.get(row)
            if ids is not None and ids[1][:room] == ids[2][:room]:
                report.findings["length_dropped"].append(row)  # identical once cut
            else:
                report.findings["truncated"].append(row)
        longer, shorter = max(chosen, rejected), max(min(chosen, rejected), 1)
        if max_length_ratio is not None and longer > max_length_ratio * shorter:
            report.findings["length_gap"].append(row)
