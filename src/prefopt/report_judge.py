"""Report sections for a run that was judged after training (`judge.json`, `samples.jsonl`)."""

from __future__ import annotations

from typing import Any

from prefopt.report_data import esc

__all__ = ["judge_section", "sample_row"]


def sample_row(row: dict[str, Any]) -> dict[str, Any]:
    """A `samples.jsonl` row (from judging) as report columns: prompt, policy, reference, each
    sample followed by its judge scores."""
    scores: dict[str, dict[str, list[float]]] = row.get("scores") or {}
    out: dict[str, Any] = {"#": row.get("index", ""), "prompt": row.get("prompt", "")}
    for side in ("policy", "reference"):
        texts = row.get(side) or []
        parts = []
        for j, text in enumerate(texts if isinstance(texts, list) else [texts]):
            notes = [f"{name} {by[side][j]:.3f}" for name, by in scores.items()
                     if len(by.get(side, [])) > j]  # fmt: skip
            parts.append(str(text) + (f"\n[{', '.join(notes)}]" if notes else ""))
        out[side] = "\n---\n".join(parts)
    return out


def judge_section(judge: dict[str, Any]) -> str:
    """The held-out judge comparison of `judge.json`: win/tie/loss, rate with 95% CI, KL."""
    if not judge.get("judges"):
        return ""
    head = "<tr><th>judge</th><th>policy mean</th><th>reference mean</th><th>wins / ties / "
    head += "losses</th><th>win rate (non-tied)</th><th>95% CI</th></tr>"
    rows = []
    for name, r in judge["judges"].items():
        rate = "n/a" if r.get("rate") is None else f"{r['rate']:.1%}"
        ci = "" if r.get("ci_low") is None else f"[{r['ci_low']:.1%}, {r['ci_high']:.1%}]"
        rows.append(
            f"<tr><td>{esc(name)}</td><td>{r['policy_mean']:.3f}</td>"
            f"<td>{r['reference_mean']:.3f}</td>"
            f"<td>{r['wins']} / {r['ties']} / {r['losses']}</td><td>{rate}</td>"
            f"<td>{ci}</td></tr>"
        )
    kl = judge.get("kl") or {}
    kl_line = (
        f"<p>KL(policy ‖ reference) on {kl.get('num_samples')} policy samples: "
        f"{kl.get('per_sequence', float('nan')):.4f} per response, "
        f"{kl.get('per_token', float('nan')):.4f} per token.</p>"
        if kl.get("per_token") is not None
        else ""
    )
    where = f"{judge.get('num_prompts', '?')} held-out prompts from {judge.get('prompts', '?')}"
    return (
        f"<h2>Policy vs reference, judged</h2>\n<p>{esc(where)}; one comparison per prompt, "
        f'same sampling seeds for both sides.</p>\n<table class="metrics">{head}'
        f"{''.join(rows)}</table>\n{kl_line}"
    )
