"""Writing sampled generations: JSONL for tools, and a self-contained HTML page for people
(policy and reference side by side, judge scores under each sample, every text escaped)."""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path

from prefopt.generation import Completion, PromptSamples, prompt_display

__all__ = ["write_html", "write_samples_jsonl"]


def write_samples_jsonl(samples: Sequence[PromptSamples], path: str | Path) -> None:
    """One JSON line per prompt: {"index", "prompt", "seed", "policy", "reference"[, "scores"]}."""
    rows = (json.dumps(s.to_json(), ensure_ascii=False) + "\n" for s in samples)
    Path(path).write_text("".join(rows), encoding="utf-8")


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:72em;color:#222}
.meta{background:#f4f4f4;padding:.6em 1em;border-radius:6px;white-space:pre-wrap;font-size:.9em}
.card{border:1px solid #ddd;border-radius:6px;margin:1em 0;padding:.6em 1em}
.prompt{font-weight:600;white-space:pre-wrap}
.cols{display:grid;grid-template-columns:1fr 1fr;gap:1em}
.sample{white-space:pre-wrap;background:#fafafa;border-left:3px solid #9ab;padding:.3em .6em;
margin:.4em 0}
.ref .sample{border-left-color:#ca9}
.score{color:#666;font-size:.85em}
h3{margin:.3em 0;font-size:1em;color:#555}
"""


def _sample_html(samples: PromptSamples, side: str) -> str:
    """One column: a side's samples, each with its judge scores (every text escaped)."""
    items: list[Completion] = getattr(samples, side)
    parts = [f"<div class='{'ref' if side == 'reference' else 'pol'}'><h3>{side}</h3>"]
    if not items:
        parts.append("<div class='score'>(none)</div>")
    for j, c in enumerate(items):
        notes = [
            f"{name} {by_side[side][j]:.3f}"
            for name, by_side in samples.scores.items()
            if len(by_side.get(side, [])) > j
        ]
        if not c.finished:
            notes.append("cut at max_new_tokens")
        parts.append(
            f"<div class='sample'>{html.escape(c.text)}</div>"
            f"<div class='score'>{html.escape(' · '.join(notes))}</div>"
        )
    return "".join(parts) + "</div>"


def write_html(
    samples: Sequence[PromptSamples],
    path: str | Path,
    *,
    title: str = "prefopt samples",
    meta: str = "",
) -> None:
    """A self-contained, readable page: each prompt with policy and reference samples side by
    side (and judge scores, if any). Every piece of text is HTML-escaped; the page has no
    scripts and loads nothing."""
    cards = []
    for s in samples:
        cards.append(
            f"<div class='card'><div class='prompt'>#{s.index} "
            f"{html.escape(prompt_display(s.prompt))}</div><div class='cols'>"
            f"{_sample_html(s, 'policy')}{_sample_html(s, 'reference')}</div></div>"
        )
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<div class='meta'>{html.escape(meta)}</div>{''.join(cards)}</body></html>\n"
    )
    Path(path).write_text(page, encoding="utf-8")
