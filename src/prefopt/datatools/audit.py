"""`prefopt data audit`: what is in a preference file, and what is wrong with it.

Every finding is a list of source row indices, so `prefopt data clean` can remove exactly what
the audit flagged (see `FINDINGS` for the rules, in the order they are checked). Lengths are
counted in tokens with a tokenizer (through `prefopt.tokenize.tokenize_pairs`, which also checks
the prompt/response boundary of every row), else in whitespace-separated words.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from prefopt.data.records import PreferencePair
from prefopt.datatools.audit_findings import (
    Lengths,
    duplicate_findings,
    length_findings,
    load_findings,
    measure_lengths,
    text_key,
)
from prefopt.datatools.loader import LoadedData
from prefopt.errors import ConfigError

__all__ = [
    "DEFAULT_MAX_LENGTH",
    "FINDINGS",
    "PROBLEMS",
    "AuditReport",
    "audit_data",
    "load_audit_tokenizer",
    "text_key",
]

DEFAULT_MAX_LENGTH = 512
"""prefopt's default `data.max_length` (`prefopt.config.DataConfig`), used without --max-length."""

FINDINGS: dict[str, str] = {
    "unreadable": "line could not be read (too long, not UTF-8, not JSON, not an object)",
    "unusable": "row gives no pair (bad or missing field, NaN score, tied scores, other format)",
    "empty_field": "empty prompt or response (blank text, null, empty list)",
    "identical": "chosen and rejected are the same text",
    "exact_duplicate": "same prompt, chosen and rejected as an earlier row",
    "prompt_duplicate": "same prompt as an earlier row (another pair for it; often fine)",
    "tokenization": "the tokenizer cannot train on it (empty after tokenizing, template, ...)",
    "boundary_fixed": "a token merges across the prompt/response boundary (encoded apart)",
    "length_dropped": "no room for a response within max_length, or responses identical once cut",
    "truncated": "prompt + longest response exceed max_length, or the prompt exceeds "
    "max_prompt_length (training cuts them)",
    "length_gap": "one response is more than --max-length-ratio times longer than the other",
}
"""Finding name -> what it flags. Each row is checked against every rule."""

PROBLEMS = (
    "unreadable",
    "unusable",
    "empty_field",
    "identical",
    "exact_duplicate",
    "tokenization",
    "length_dropped",
)
"""Findings that make the verdict "needs cleaning" (the rest are warnings or information)."""

_WARNINGS = ("truncated", "boundary_fixed", "length_gap")
_STRONG_BIAS = 0.65  # share of pairs with the longer response chosen that earns a warning


@dataclass
class AuditReport:
    """What `audit_data` found.

    Attributes:
        source: The file.
        format: Its detected format.
        unit: "tokens" (with a tokenizer) or "words".
        rows: Rows in the file.
        usable: Rows that gave a pair.
        findings: Finding name (see `FINDINGS`) -> flagged row indices, ascending.
        reasons: For "unreadable", "unusable" and "tokenization": reason -> rows.
        empty_fields: Row -> its empty field.
        max_length: The limit the truncation findings assume.
        max_prompt_length: The prompt limit they assume (None: the prompt is not cut alone).
        distinct_prompts: Different prompts among the usable rows (identical-response rows
            included).
        lengths: Row -> (prompt, chosen, rejected) length in `unit`.
        tokenizer: The tokenizer's special tokens and template use, if one was given.
        notes: Caveats worth printing.
    """

    source: str
    format: str
    unit: str
    rows: int
    usable: int
    findings: dict[str, list[int]]
    reasons: dict[str, dict[str, list[int]]]
    empty_fields: dict[int, str]
    max_length: int
    max_prompt_length: int | None = None
    distinct_prompts: int = 0
    lengths: dict[int, Lengths] = field(default_factory=dict)
    tokenizer: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def length_stats(self) -> dict[str, dict[str, float]]:
        """min / mean / median / p95 / max of prompt, chosen and rejected lengths."""
        out: dict[str, dict[str, float]] = {}
        for i, name in enumerate(("prompt", "chosen", "rejected")):
            values = sorted(v[i] for v in self.lengths.values())
            if values:
                out[name] = {
                    "min": values[0],
                    "mean": round(statistics.fmean(values), 2),
                    "median": statistics.median(values),
                    "p95": values[min(len(values) - 1, int(0.95 * len(values)))],
                    "max": values[-1],
                }
        return out

    def length_bias(self) -> dict[str, Any]:
        """How often the chosen response is the longer one, and by how much on average.

        The share is over the pairs whose responses differ in length (ties tell nothing about
        a preference for length); it is None when every pair ties.
        """
        pairs = [(c, r) for _, c, r in self.lengths.values()]
        if not pairs:
            return {}
        n = len(pairs)
        differ = [(c, r) for c, r in pairs if c != r]
        longer = sum(c > r for c, r in differ)
        mean_c = statistics.fmean(c for c, _ in pairs)
        mean_r = statistics.fmean(r for _, r in pairs)
        return {
            "pairs": n,
            "ties": n - len(differ),
            "share_chosen_longer": round(longer / len(differ), 4) if differ else None,
            "share_chosen_shorter": round(1 - longer / len(differ), 4) if differ else None,
            "share_same_length": round((n - len(differ)) / n, 4),
            "mean_chosen": round(mean_c, 2),
            "mean_rejected": round(mean_r, 2),
            "mean_gap": round(mean_c - mean_r, 2),
            "relative_gap": round((mean_c - mean_r) / mean_r, 4) if mean_r else 0.0,
        }

    def verdict(self) -> str:
        """One line: "needs cleaning", "usable, with warnings" or "looks clean", and why."""
        problems = [f"{len(self.findings[f])} {f}" for f in PROBLEMS if self.findings[f]]
        if problems:
            return "needs cleaning: " + ", ".join(problems)
        warnings = [f"{len(self.findings[f])} {f}" for f in _WARNINGS if self.findings[f]]
        bias = self.length_bias()
        share = bias.get("share_chosen_longer")
        if share is not None and not 1 - _STRONG_BIAS < share < _STRONG_BIAS:
            differ = bias["pairs"] - bias["ties"]
            warnings.append(
                f"length bias (chosen longer in {share:.0%} of {differ} pairs of unequal length)"
            )
        if warnings:
            return "usable, with warnings: " + ", ".join(warnings)
        return "looks clean"

    def flagged(self, rules: Sequence[str]) -> dict[int, list[str]]:
        """Row -> the rules among `rules` that flag it (rows flagged by none are left out)."""
        out: dict[int, list[str]] = {}
        for rule in rules:
            for row in self.findings[rule]:
                out.setdefault(row, []).append(rule)
        return dict(sorted(out.items()))

    def summary(self) -> str:
        """The audit as a few readable lines."""
        lines = [
            f"audit of {self.source}",
            f"  format {self.format}: {self.rows} rows, {self.usable} usable, "
            f"{self.distinct_prompts} distinct prompts",
            f"  {'length (' + self.unit + ')':<18}"
            + "".join(f"{h:>8}" for h in ("min", "mean", "median", "p95", "max")),
        ]
        for name, st in self.length_stats().items():
            lines.append(
                f"    {name:<16}{st['min']:>8}{st['mean']:>8.1f}{st['median']:>8g}"
                f"{st['p95']:>8}{st['max']:>8}"
            )
        f = self.findings
        prompt_limit = self.max_prompt_length
        lines.append(
            f"  max_length {self.max_length}"
            + (f", max_prompt_length {prompt_limit}" if prompt_limit is not None else "")
            + f": truncates {len(f['truncated'])} rows, drops {len(f['length_dropped'])}"
        )
        bias = self.length_bias()
        if bias:
            differ = bias["pairs"] - bias["ties"]
            share = bias["share_chosen_longer"]
            lines.append(
                "  length bias: "
                + (
                    f"chosen longer in {share:.1%} of the {differ} pairs of unequal length"
                    if share is not None
                    else "every pair's responses have the same length"
                )
                + f" ({bias['ties']} ties), mean gap {bias['mean_gap']:+g} {self.unit} "
                f"({bias['relative_gap']:+.1%})"
            )
        if self.tokenizer:
            t = self.tokenizer
            lines.append(
                f"  tokenizer: BOS {t['bos_token']!r}, EOS {t['eos_token']!r}, chat "
                f"template {'on' if t['chat_template'] else 'off'}"
            )
        lines.append("  findings:")
        for name, rows in f.items():
            head = ", ".join(str(r) for r in rows[:10]) + (" …" if len(rows) > 10 else "")
            lines.append(f"    {name:<17}{len(rows):>6}  {head}".rstrip())
        lines.extend(f"  note: {note}" for note in self.notes)
        lines.append(f"verdict: {self.verdict()}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able summary with every finding's rows."""
        return {
            "file": self.source,
            "format": self.format,
            "unit": self.unit,
            "rows": self.rows,
            "usable_rows": self.usable,
            "distinct_prompts": self.distinct_prompts,
            "verdict": self.verdict(),
            "findings": {
                name: {"count": len(rows), "rows": rows, "description": FINDINGS[name]}
                for name, rows in self.findings.items()
            },
            "reasons": self.reasons,
            "empty_fields": {str(k): v for k, v in self.empty_fields.items()},
            "max_length": self.max_length,
            "max_prompt_length": self.max_prompt_length,
            "lengths": self.length_stats(),
            "length_bias": self.length_bias(),
            "tokenizer": self.tokenizer,
            "notes": self.notes,
        }


def load_audit_tokenizer(model: str) -> Any:
    """The tokenizer of a model folder, .gguf, bundled name or Hub id (no weights loaded)."""
    from prefopt.config import ModelConfig
    from prefopt.models import load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path=model))


def audit_data(
    data: LoadedData,
    *,
    tokenizer: Any | None = None,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    max_length_ratio: float | None = None,
) -> AuditReport:
    """Check every row of loaded paired data (see `FINDINGS`).

    Args:
        data: From `loader.load_data` (with pairs="best-worst": one pair per row).
        tokenizer: Count tokens and check tokenization with it; None counts words.
        max_length: Token limit the truncation findings assume (default `DEFAULT_MAX_LENGTH`).
        max_prompt_length: Prompt token limit, as training's `data.max_prompt_length`: a longer
            prompt is cut from the left to it (and the row counts as truncated) before the
            responses are fitted into the rest of `max_length`.
        max_length_ratio: Flag pairs whose longer response is more than this many times longer
            than the shorter one ("length_gap"); None turns the rule off.

    Raises:
        ConfigError: For unpaired (KTO) data, or bad limits.
    """
    limit = _check_limits(data, max_length, max_prompt_length, max_length_ratio)
    pairs: list[PreferencePair] = list(data.examples)  # type: ignore[arg-type]
    report = AuditReport(
        source=data.source,
        format=data.format,
        unit="tokens" if tokenizer else "words",
        rows=len(data.rows),
        usable=len(pairs),
        findings={name: [] for name in FINDINGS},
        reasons={},
        empty_fields=dict(data.empty_fields),
        max_length=limit,
        max_prompt_length=max_prompt_length,
    )
    load_findings(report, data)
    identical = duplicate_findings(report, pairs)
    token_ids = measure_lengths(report, [p for p in pairs if p.index not in identical], tokenizer)
    if max_length is None:
        report.notes.append(f"max_length {limit} is prefopt's default (pass --max-length)")
    length_findings(report, token_ids, max_length_ratio)
    for name, rows in report.findings.items():
        report.findings[name] = sorted(set(rows))
    return report


def _check_limits(
    data: LoadedData,
    max_length: int | None,
    max_prompt_length: int | None,
    max_length_ratio: float | None,
) -> int:
    """The max_length to assume, after refusing unpaired data and bad limits."""
    if not data.paired:
        raise ConfigError("audit and clean work on paired data; this file holds unpaired rows")
    limit = DEFAULT_MAX_LENGTH if max_length is None else max_length
    if limit < 2:
        raise ConfigError(f"max_length must be at least 2, got {limit}")
    if max_prompt_length is not None and not 1 <= max_prompt_length < limit:
        raise ConfigError(
            f"max_prompt_length must be in [1, max_length={limit}), got {max_prompt_length}"
        )
    if max_length_ratio is not None and not max_length_ratio >= 1:
        raise ConfigError(f"max_length_ratio must be >= 1, got {max_length_ratio}")
    return limit
