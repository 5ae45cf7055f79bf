"""Turn `compare.py`'s raw records into the markdown table of docs/benchmarks.md.

A GPU run (meta "device" cuda) gets its own columns: peak GPU memory (allocated) beside peak RSS,
matmul TFLOP/s, s/step to the millisecond, and no CPU share.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from measure import BATCH, THREADS, flops_per_token

Record = dict[str, Any]


@dataclass
class Summary:
    """The measured steps of one (row, tool) over its repetitions."""

    steps: list[float]
    cpu: list[float]
    tokens: int
    rss_gib: float
    mfu: list[float]
    mfu_cpu: list[float]
    probes: list[str]
    setup_s: list[float]
    gpu_gib: float | None = None
    """Peak `torch.cuda.max_memory_allocated()` over the runs (GPU runs only)."""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / sum(self.steps)

    @property
    def cpu_share(self) -> float | None:
        """CPU time received ÷ (wall time × threads): 1.0 when nothing else competed."""
        return sum(self.cpu) / sum(self.steps) / THREADS if self.cpu else None

    @property
    def tokens_per_cpu_s(self) -> float | None:
        return self.tokens / sum(self.cpu) if self.cpu else None

    @property
    def pairs_per_s(self) -> float:
        return BATCH * len(self.steps) / sum(self.steps)


def summarize(records: Sequence[Record], probe_unit: float = 1.0) -> Summary | None:
    """Pool the measured (post-warm-up) steps of successful runs; None if none succeeded.

    `probe_unit`: the probes' GFLOP/s are shown divided by it (1000: TFLOP/s)."""
    ok = [r for r in records if "result" in r]
    if not ok:
        return None
    steps: list[float] = []
    cpu: list[float] = []
    tokens, mfu, mfu_cpu, probes = 0, [], [], []
    for r in ok:
        res = r["result"]
        w = res["warmup"]
        run_steps, run_tokens = res["step_s"][w:], sum(res["step_tokens"][w:])
        steps += run_steps
        cpu += res.get("step_cpu_s", [])[w:]
        tokens += run_tokens
        rate = (r["before"]["gflops"] + r["after"]["gflops"]) / 2
        flops = flops_per_token(res["params"], res["variant"]) * run_tokens / sum(run_steps)
        mfu.append(flops / (rate * 1e9))
        run_cpu = res.get("step_cpu_s", [])[w:]
        if run_cpu and "gflops_per_cpu_s" in r["before"]:
            cpu_rate = (r["before"]["gflops_per_cpu_s"] + r["after"]["gflops_per_cpu_s"]) / 2
            per_cpu_s = flops_per_token(res["params"], res["variant"]) * run_tokens / sum(run_cpu)
            mfu_cpu.append(per_cpu_s / (cpu_rate * 1e9))
        before, after = r["before"]["gflops"] / probe_unit, r["after"]["gflops"] / probe_unit
        probes.append(f"{before:.0f}→{after:.0f}")
    rss = max(r["result"]["peak_rss_gib"] for r in ok)
    setup = [r["result"]["setup_s"] for r in ok]
    gpu = [g for r in ok if (g := r["result"].get("peak_gpu_gib")) is not None]
    return Summary(steps, cpu, tokens, rss, mfu, mfu_cpu, probes, setup, max(gpu, default=None))


def _baseline(records: Sequence[Record], rec: Record, rows_with_trl: set[str]) -> list[Record]:
    """TRL records a prefopt row compares against: its own row's, else TRL "fast" on the data."""
    if rec["row"] in rows_with_trl:
        return [r for r in records if r["impl"] == "trl" and r["row"] == rec["row"]]
    return [
        r
        for r in records
        if r["impl"] == "trl"
        and r["variant"] == "fast"
        and r["model"] == rec["model"]
        and r["data"] == rec["data"]
    ]


def _line(row: str, tool: str, s: Summary | None, ratio: str, error: str = "") -> str:
    if s is None:
        why = error if error.startswith("TODO") else "failed (see below)"
        return f"| {row} | {tool} | {why} | | | | | | | {ratio} |"
    spread = f" ({min(s.steps):.1f}–{max(s.steps):.1f})" if len(s.steps) > 1 else ""
    return (
        f"| {row} | {tool} | {statistics.mean(s.steps):.1f}{spread} | {s.tokens_per_s:.0f} | "
        f"{s.pairs_per_s:.3f} | {s.rss_gib:.2f} | {', '.join(s.probes)} | {_cpu(s)} | "
        f"{_mfu(s)} | {ratio} |"
    )


def _gpu_line(row: str, tool: str, s: Summary | None, ratio: str, error: str = "") -> str:
    if s is None:
        return _line(row, tool, s, ratio, error)  # as many columns
    spread = f" ({min(s.steps):.3f}–{max(s.steps):.3f})" if len(s.steps) > 1 else ""
    gpu = f"{s.gpu_gib:.2f}" if s.gpu_gib is not None else ""
    return (
        f"| {row} | {tool} | {statistics.mean(s.steps):.3f}{spread} | {s.tokens_per_s:.0f} | "
        f"{s.pairs_per_s:.2f} | {gpu} | {s.rss_gib:.2f} | {', '.join(s.probes)} | "
        f"{100 * statistics.mean(s.mfu):.1f}% | {ratio} |"
    )


def _gpu_ratio(p: Summary | None, t: Summary | None) -> str:
    if p is None or t is None:
        return ""
    mfu = statistics.mean(p.mfu) / statistics.mean(t.mfu)
    out = f"**{p.tokens_per_s / t.tokens_per_s:.2f}×** tok/s, {mfu:.2f}× MFU"
    if p.gpu_gib and t.gpu_gib:
        out += f", {p.gpu_gib / t.gpu_gib:.2f}× GPU peak"
    return out


def _mfu(s: Summary) -> str:
    wall = f"{100 * statistics.mean(s.mfu):.0f}%"
    return f"{wall} / {100 * statistics.mean(s.mfu_cpu):.0f}%" if s.mfu_cpu else wall


def _cpu(s: Summary) -> str:
    if s.cpu_share is None or s.tokens_per_cpu_s is None:
        return ""
    return f"{100 * s.cpu_share:.0f}%, {s.tokens_per_cpu_s:.1f}"


def _ratio(p: Summary | None, t: Summary | None) -> str:
    if p is None or t is None:
        return ""
    mfu = statistics.mean(p.mfu) / statistics.mean(t.mfu)
    if p.tokens_per_cpu_s and t.tokens_per_cpu_s:
        cpu = p.tokens_per_cpu_s / t.tokens_per_cpu_s
        return (
            f"**{p.tokens_per_s / t.tokens_per_s:.2f}×** tok/s, {cpu:.2f}× tok/CPU-s, "
            f"{p.rss_gib / t.rss_gib:.2f}× RSS"
        )
    return (
        f"**{p.tokens_per_s / t.tokens_per_s:.2f}×** tok/s, {mfu:.2f}× MFU, "
        f"{p.rss_gib / t.rss_gib:.2f}× RSS"
    )


def token_check(records: Sequence[Record]) -> list[str]:
    """Compare each prefopt run's per-row token ids with a TRL run on the same data."""
    notes, seen = [], set()
    for p in (r for r in records if r["impl"] == "prefopt" and "result" in r):
        key = p["data"]
        t = next(
            (r for r in records if r["impl"] == "trl" and "result" in r and r["data"] == key), None
        )
        if t is None or key in seen:
            continue
        seen.add(key)
        prows, trows = p["result"]["rows"], t["result"]["rows"]
        bad = [i for i, (a, b) in enumerate(zip(prows, trows, strict=False)) if a != b]
        if len(prows) != len(trows):
            bad.append(-1)
        if bad:
            notes.append(
                f"- {key}: token MISMATCH on rows {bad[:10]} "
                f"(prefopt {prows[bad[0]]}, TRL {trows[bad[0]]})"
            )
        else:
            notes.append(f"- {key}: prefopt and TRL token ids identical on all {len(prows)} rows")
    return notes


def loss_lines(records: Sequence[Record]) -> list[str]:
    out = []
    for r in (r for r in records if "result" in r):
        losses = ", ".join(f"{x:.6f}" for x in r["result"]["losses"])
        setup = r["result"]["setup_s"]
        out.append(
            f"- {r['row']}, {r['impl']} {r['variant']}: losses {losses}; setup {setup:.1f} s"
        )
    return out


def render_table(records: Sequence[Record], meta: dict[str, Any]) -> str:
    """The markdown table (one line per row and tool), then token, loss and failure notes."""
    gpu = meta.get("device") == "cuda"
    head = _gpu_head(meta) if gpu else _cpu_head(meta)
    rows_with_trl = {r["row"] for r in records if r["impl"] == "trl"}
    lines = []
    for row in dict.fromkeys(r["row"] for r in records):
        for impl in ("prefopt", "trl"):
            mine = [r for r in records if r["row"] == row and r["impl"] == impl]
            if not mine:
                continue
            unit = 1000.0 if gpu else 1.0
            s = summarize(mine, unit)
            ratio = ""
            if impl == "prefopt":
                base = summarize(_baseline(records, mine[0], rows_with_trl), unit)
                ratio = _gpu_ratio(s, base) if gpu else _ratio(s, base)
            error = str(mine[0].get("error", ""))
            line = _gpu_line if gpu else _line
            lines.append(line(row, f"{impl} {mine[0]['variant']}", s, ratio, error))
    failures = [
        f"- {r['row']}, {r['impl']}: {str(r['error'])[-300:]}"
        for r in records
        if "error" in r and not str(r["error"]).startswith("TODO")
    ]
    notes = [
        "",
        "Tokenization check:",
        *token_check(records),
        "",
        "Per-run losses (warm-up step first) and setup time:",
        *loss_lines(records),
    ]
    if failures:
        notes += ["", "Failed or skipped runs:", *failures]
    return "\n".join(head + lines + notes)


def _cpu_head(meta: dict[str, Any]) -> list[str]:
    """Title and header of a CPU run's table."""
    return [
        f"suite {meta.get('suite')}, {meta.get('date')}: {meta.get('warmup')} warm-up + "
        f"{meta.get('steps')} measured steps per run, {meta.get('threads')} threads, fp32",
        "",
        "| case | tool / config | s/step (min–max) | tokens/s | pairs/s | peak RSS GiB | matmul "
        "GFLOP/s before→after | CPU share, tok/CPU-s | MFU wall / per CPU-s | prefopt / TRL |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]


def _gpu_head(meta: dict[str, Any]) -> list[str]:
    """Title and header of a GPU run's table."""
    precision = meta.get("precision")
    how = "bf16 autocast over fp32 weights" if precision == "bf16" else "fp32 (no TF32)"
    return [
        f"suite {meta.get('suite')}, {meta.get('date')}: {meta.get('warmup')} warm-up + "
        f"{meta.get('steps')} measured steps per run, {meta.get('gpu')}, {how}",
        "",
        "| case | tool / config | s/step (min–max) | tokens/s | pairs/s | peak GPU GiB "
        f"(allocated) | peak RSS GiB | matmul {precision} TFLOP/s before→after | MFU | "
        "prefopt / TRL |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
