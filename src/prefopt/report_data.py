"""The report's "Data" section: what data preparation read, kept and dropped
(`data_summary.json`, written by `pipeline.write_data_summary` before training) and the
training steps that were skipped as non-finite (marked in metrics.jsonl)."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

DATA_SUMMARY_FILE = "data_summary.json"


def esc(value: Any) -> str:
    """`value` as HTML text (quotes escaped too): the report's one escaping rule."""
    return html.escape(str(value), quote=True)


def _split_row(name: str, part: dict[str, Any]) -> str:
    dropped = part.get("dropped") or {}
    dropped_text = (
        ", ".join(f"{esc(reason)}: {count}" for reason, count in sorted(dropped.items()))
        if dropped
        else "none"
    )
    cells = (name, part.get("format", ""), part.get("rows_read", ""), part.get("pairs_kept", ""),
             sum(dropped.values()), part.get("truncated", 0))  # fmt: skip
    row = "".join(f"<td>{esc(c)}</td>" for c in cells)
    return f"<tr>{row}<td>{dropped_text}</td></tr>"


def data_section(summary: dict[str, Any], records: Sequence[dict[str, Any]]) -> str:
    """HTML for the data summary and the skipped steps; "" when there is neither."""
    skipped = [
        r.get("step")
        for r in records
        if r.get("split", "train") == "train" and r.get("non_finite_step")
    ]
    parts = []
    splits = [(n, summary[n]) for n in ("train", "eval") if isinstance(summary.get(n), dict)]
    if splits:
        head = ("<tr><th>split</th><th>format</th><th>rows read</th><th>examples kept</th>"
                "<th>dropped</th><th>truncated</th><th>dropped, by reason</th></tr>")  # fmt: skip
        rows = "".join(_split_row(n, p) for n, p in splits)
        parts.append(f"<table>{head}{rows}</table>")
        notes = [note for _, p in splits for note in p.get("notes", [])]
        if notes:
            items = "".join(f"<li>{esc(n)}</li>" for n in notes)
            parts.append(f"<ul>{items}</ul>")
    if skipped:
        steps = ", ".join(esc(s) for s in skipped)
        parts.append(
            f'<div class="finding error"><b>{len(skipped)} non-finite training step(s)</b>: '
            f"{steps} (skipped with train.on_nan=skip, or the step the run stopped at)</div>"
        )
    return "<h2>Data</h2>\n" + "\n".join(parts) if parts else ""
