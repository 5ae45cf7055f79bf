"""`prefopt data clean`: remove exactly the rows an audit flagged, under rules you switch.

The cleaned file holds the kept rows as they were read (same columns, same order), so it stays
in its source format. Every removed row is listed with the rules that removed it: nothing goes
silently.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefopt.datatools.audit import FINDINGS, AuditReport
from prefopt.datatools.loader import LoadedData
from prefopt.datatools.reader import write_jsonl
from prefopt.errors import ConfigError

__all__ = ["CLEAN_DEFAULTS", "CleanReport", "clean_data"]

CLEAN_DEFAULTS: dict[str, bool] = {
    "unreadable": True,
    "unusable": True,
    "empty_field": True,
    "identical": True,
    "exact_duplicate": True,
    "prompt_duplicate": False,
    "tokenization": True,
    "boundary_fixed": False,
    "length_dropped": True,
    "truncated": False,
    "length_gap": True,
}
"""Rule (an audit finding) -> removed by default. "unreadable" rows cannot be kept (there is
nothing to write); "length_gap" flags rows only when a ratio is given."""

assert set(CLEAN_DEFAULTS) == set(FINDINGS), "every audit finding needs a clean rule"


@dataclass
class CleanReport:
    """What `clean_data` removed.

    Attributes:
        source: The input file.
        output: The cleaned file.
        rows_in: Rows in the input.
        rows_out: Rows written.
        rules: Rule -> whether it was applied.
        removed: Removed row -> the applied rules that flag it.
        audit: The audit the rules were applied to (its JSON form).
    """

    source: str
    output: str
    rows_in: int
    rows_out: int
    rules: dict[str, bool]
    removed: dict[int, list[str]] = field(default_factory=dict)
    audit: dict[str, Any] = field(default_factory=dict)

    def by_rule(self) -> dict[str, list[int]]:
        """Applied rule -> the rows it removed (a row flagged by two rules is in both)."""
        out: dict[str, list[int]] = {rule: [] for rule, on in self.rules.items() if on}
        for row, rules in self.removed.items():
            for rule in rules:
                out[rule].append(row)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "input": self.source,
            "output": self.output,
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "rows_removed": len(self.removed),
            "rules": self.rules,
            "removed_by_rule": self.by_rule(),
            "removed": {str(row): rules for row, rules in self.removed.items()},
            "audit": self.audit,
        }

    def summary(self) -> str:
        lines = [
            f"{self.source}: {self.rows_in} rows -> {self.rows_out} written to {self.output} "
            f"({len(self.removed)} removed)"
        ]
        for rule, rows in self.by_rule().items():
            if rows:
                head = ", ".join(str(r) for r in rows[:10])
                more = f", … ({len(rows) - 10} more)" if len(rows) > 10 else ""
                lines.append(f"  {rule:<17} {len(rows):>6}  rows {head}{more}")
        skipped = [rule for rule, on in self.rules.items() if not on]
        if skipped:
            lines.append(f"  not applied: {', '.join(skipped)}")
        return "\n".join(lines)


def resolve_rules(overrides: Mapping[str, bool | None]) -> dict[str, bool]:
    """`CLEAN_DEFAULTS` with the given rules switched (None keeps the default).

    Raises:
        ConfigError: For an unknown rule, or for keeping unreadable rows.
    """
    unknown = set(overrides) - set(CLEAN_DEFAULTS)
    if unknown:
        raise ConfigError(f"unknown clean rule(s) {sorted(unknown)}; rules: {list(CLEAN_DEFAULTS)}")
    rules = {
        rule: default if overrides.get(rule) is None else bool(overrides[rule])
        for rule, default in CLEAN_DEFAULTS.items()
    }
    if not rules["unreadable"]:
        raise ConfigError("unreadable lines cannot be kept: there is no row to write")
    return rules


def clean_data(
    data: LoadedData,
    audit: AuditReport,
    output: str | Path,
    rules: Mapping[str, bool | None] | None = None,
) -> CleanReport:
    """Write `data`'s rows minus those the applied rules flag in `audit`.

    Args:
        data: The loaded file (its raw rows are written back unchanged).
        audit: `audit_data(data, ...)`.
        output: The cleaned JSON Lines file.
        rules: Rule -> apply it (True), keep its rows (False) or the default (None / absent).

    Returns:
        The report; the caller writes or prints it.
    """
    applied = resolve_rules(rules or {})
    removed = audit.flagged([rule for rule, on in applied.items() if on])
    kept = [row for i, row in enumerate(data.rows) if row is not None and i not in removed]
    written = write_jsonl(output, kept)
    return CleanReport(
        source=data.source,
        output=str(output),
        rows_in=len(data.rows),
        rows_out=written,
        rules=applied,
        removed=removed,
        audit=audit.to_json(),
    )
