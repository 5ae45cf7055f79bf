"""A run report you can open in a browser: `prefopt report OUTPUT_DIR`.

Reads the run folder (metrics.jsonl, config.yaml, final_metrics.json), replays the health
checks over the history and writes `OUTPUT_DIR/report/`: one PNG per plot and an index.html that
shows the health findings, the metrics, the plots, optional sample generations and the config.
All text from the run (config values, samples) is HTML-escaped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast, get_args

from prefopt.errors import PrefoptError
from prefopt.health import SEVERITY_ORDER, Finding, Kind, Severity, as_float, check_history
from prefopt.report_data import DATA_SUMMARY_FILE, data_section, esc
from prefopt.report_judge import judge_section, sample_row
from prefopt.report_plots import write_plots
from prefopt.tracking import read_metrics

_KEY_METRICS = (
    "loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
    "logps/chosen", "logps/rejected",
)  # fmt: skip
_HEALTH_KINDS = (
    "displacement, length bias, overfitting, non-finite values and reference drift over the metrics"
)
HEALTH_FILE = "health.json"
"""Findings saved by the training loop (`[dataclasses.asdict(f) for f in monitor.summary()]`);
the report adds those the metrics alone cannot show (e.g. reference_drift)."""


def write_report(output_dir: Path, *, samples: list[dict] | None = None) -> Path:
    """Write `output_dir/report/` (PNGs + index.html) for a finished or running run.

    Args:
        output_dir: A prefopt output folder (holding metrics.jsonl).
        samples: Optional generations to show side by side, one dict per prompt, e.g.
            {"prompt": ..., "reference": ..., "policy": ...}; every key becomes a column.

    Returns:
        Path of the written index.html.

    Raises:
        PrefoptError: When the folder has no metrics.jsonl.
    """
    output_dir = Path(output_dir)
    if not (output_dir / "metrics.jsonl").is_file():
        raise PrefoptError(f"{output_dir} has no metrics.jsonl: is it a prefopt output folder?")
    records = _read_records(output_dir)
    config_text, config = _read_config(output_dir / "config.yaml")
    final = _read_json(output_dir / "final_metrics.json")
    judge = _read_json(output_dir / "judge.json")
    data_summary = _read_json(output_dir / DATA_SUMMARY_FILE)
    if samples is None and (output_dir / "samples.jsonl").is_file():
        samples = [sample_row(s) for s in read_samples(output_dir / "samples.jsonl")]
    findings = _merge(check_history(records), _saved_findings(output_dir / HEALTH_FILE))
    folder = output_dir / "report"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):  # a plot that has no data this time must not linger
        old.unlink()
    max_norm = as_float(_get(config, "optim", "max_grad_norm"))
    plots = write_plots(records, folder, max_grad_norm=max_norm)
    page = render_html(
        output_dir, records, config, config_text, final, findings, plots, samples or [], judge,
        data_summary,
    )  # fmt: skip
    index = folder / "index.html"
    index.write_text(page, encoding="utf-8")
    return index


def cli_report(output_dir: str, samples_path: str | None = None) -> int:
    """`prefopt report OUTPUT_DIR [--samples FILE.jsonl]`: write the report, print its path."""
    samples = read_samples(Path(samples_path)) if samples_path else None
    index = write_report(Path(output_dir), samples=samples)
    print(f"report written: {index}")
    return 0


def read_samples(path: Path) -> list[dict[str, Any]]:
    """Sample generations from a JSONL file, one JSON object per line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise PrefoptError(f"cannot read samples file {path}: {exc}") from None
    samples = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PrefoptError(f"{path}:{number}: not JSON ({exc.msg})") from None
        if not isinstance(item, dict):
            raise PrefoptError(f"{path}:{number}: expected a JSON object per line")
        samples.append(item)
    return samples


def _read_records(output_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl; a run still writing may leave a half line at the end, which is skipped."""
    try:
        return read_metrics(output_dir)
    except json.JSONDecodeError:
        pass
    records = []
    for line in (output_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(item, dict):
            records.append(item)
    return records


def _saved_findings(path: Path) -> list[Finding]:
    items = _read_json_any(path)
    out = []
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            continue
        kind, severity = item.get("kind"), item.get("severity")
        step, message = as_float(item.get("step")), item.get("message")
        if kind in get_args(Kind) and severity in get_args(Severity) and step is not None:
            out.append(Finding(cast(Kind, kind), cast(Severity, severity), int(step), str(message)))
    return out


def _merge(replayed: list[Finding], saved: list[Finding]) -> list[Finding]:
    """Replayed findings plus saved ones of kinds the replay did not produce, errors first."""
    seen = {f.kind for f in replayed}
    merged = replayed + [f for f in saved if f.kind not in seen]
    return sorted(merged, key=lambda f: (SEVERITY_ORDER.get(f.severity, 9), f.step))


def _read_config(path: Path) -> tuple[str, dict[str, Any]]:
    if not path.is_file():
        return "", {}
    import yaml

    text = path.read_text(encoding="utf-8")
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError:
        return text, {}
    return text, parsed if isinstance(parsed, dict) else {}


def _read_json_any(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None


def _read_json(path: Path) -> dict[str, Any]:
    data = _read_json_any(path)
    return data if isinstance(data, dict) else {}


def _get(tree: dict[str, Any], *keys: str) -> Any:
    node: Any = tree
    for key in keys:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def _fmt(value: Any) -> str:
    number = as_float(value)
    if number is None:
        return esc(value)
    if not math.isfinite(number):
        return f'<span class="bad">{esc(number)}</span>'
    if number != 0 and (abs(number) >= 1e5 or abs(number) < 1e-3):
        return f"{number:.3e}"
    return f"{number:.4f}".rstrip("0").rstrip(".") if number != int(number) else str(int(number))


# ----------------------------------------------------------------------- HTML sections


def render_html(
    output_dir: Path,
    records: Sequence[dict[str, Any]],
    config: dict[str, Any],
    config_text: str,
    final: dict[str, Any],
    findings: Sequence[Finding],
    plots: Sequence[tuple[str, str]],
    samples: Sequence[dict[str, Any]],
    judge: dict[str, Any] | None = None,
    data_summary: dict[str, Any] | None = None,
) -> str:
    """The whole index.html as a string (self-contained apart from the PNGs beside it)."""
    body = [
        _header(output_dir, records, config),
        _health(findings),
        judge_section(judge or {}),
        _metrics(records, final),
        data_section(data_summary or {}, records),
        _plots(plots),
        _samples(samples),
        _config(config_text),
    ]
    title = f"prefopt report: {output_dir.name}"
    return (
        f'<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(part for part in body if part)
        + "\n</body>\n</html>\n"
    )


def _header(output_dir: Path, records: Sequence[dict[str, Any]], config: dict[str, Any]) -> str:
    train = [r for r in records if r.get("split", "train") == "train"]
    loss = _get(config, "loss", "name")
    facts = [
        ("run folder", str(output_dir.resolve())),
        ("model", _get(config, "model", "name_or_path")),
        ("data", _get(config, "data", "train")),
        ("loss", " + ".join(map(str, loss)) if isinstance(loss, list) else loss),
        ("beta", None if loss in ("sft", ["sft"]) else _get(config, "loss", "beta")),
        ("learning rate", _get(config, "optim", "lr")),
        ("steps logged", max((r.get("step", 0) for r in train), default=0)),
        ("evaluations", sum(1 for r in records if r.get("split") == "eval")),
    ]
    items = "".join(
        f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in facts if v is not None and v != ""
    )
    return f'<h1>prefopt run report</h1>\n<dl class="facts">{items}</dl>'


def _health(findings: Sequence[Finding]) -> str:
    """Problems first; with none, a line saying what was checked, then any notes (info), e.g.
    that too few evaluations left the overfitting check out."""
    ok = ""
    if all(f.severity == "info" for f in findings):
        ok = f'\n<div class="finding ok"><b>No problems found.</b> Checked: {_HEALTH_KINDS}.</div>'
    rows = "".join(
        f'\n<div class="finding {esc(f.severity)}"><b>{esc(f.severity)}</b> · '
        f"<code>{esc(f.kind)}</code> · step {f.step}<br>{esc(f.message)}</div>"
        for f in findings
    )
    return f"<h2>Health</h2>{ok}{rows}"


def _metrics(records: Sequence[dict[str, Any]], final: dict[str, Any]) -> str:
    evals = [r for r in records if r.get("split") == "eval"]
    parts = ["<h2>Metrics</h2>"]
    if len(evals) >= 2:
        first, last = evals[0], evals[-1]
        rows = "".join(
            f"<tr><td>{esc(k)}</td><td>{_fmt(first[k])}</td><td>{_fmt(last[k])}</td>"
            f"<td>{_change(first[k], last[k])}</td></tr>"
            for k in _KEY_METRICS
            if k in first and k in last
        )
        parts.append(
            f"<h3>Eval: first vs last</h3>\n<table><tr><th>metric</th>"
            f"<th>step {esc(first.get('step'))}</th><th>step {esc(last.get('step'))}</th>"
            f"<th>change</th></tr>{rows}</table>"
        )
    if final:
        rows = "".join(f"<tr><td>{esc(k)}</td><td>{_fmt(v)}</td></tr>" for k, v in final.items())
        parts.append(f"<h3>Final metrics</h3>\n<table><tr><th>metric</th><th>value</th></tr>"
                     f"{rows}</table>")  # fmt: skip
    elif not records:
        parts.append("<p>No metrics were recorded.</p>")
    else:
        parts.append("<p>No final_metrics.json (the run has not finished).</p>")
    return "\n".join(parts)


def _change(a: Any, b: Any) -> str:
    x, y = as_float(a), as_float(b)
    if x is None or y is None or not math.isfinite(x) or not math.isfinite(y):
        return ""
    return f"{y - x:+.4f}"


def _plots(plots: Sequence[tuple[str, str]]) -> str:
    if not plots:
        return "<h2>Plots</h2>\n<p>No metric values to plot yet.</p>"
    figures = "\n".join(
        f'<figure><a href="{esc(name)}"><img src="{esc(name)}" alt="{esc(title)}"></a>'
        f"<figcaption>{esc(title)}</figcaption></figure>"
        for name, title in plots
    )
    return f'<h2>Plots</h2>\n<div class="plots">\n{figures}\n</div>'


def _samples(samples: Sequence[dict[str, Any]]) -> str:
    if not samples:
        return ""
    columns: list[str] = []
    for sample in samples:
        columns += [str(k) for k in sample if str(k) not in columns]
    if "prompt" in columns:  # the prompt reads first, the answers side by side after it
        columns.remove("prompt")
        columns.insert(0, "prompt")
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    rows = "".join(
        "<tr>" + "".join(f"<td><pre>{esc(_text(s, c))}</pre></td>" for c in columns) + "</tr>"
        for s in samples
    )
    return f'<h2>Samples</h2>\n<table class="samples"><tr>{head}</tr>{rows}</table>'


def _text(sample: dict[str, Any], column: str) -> str:
    for key, value in sample.items():
        if str(key) == column:
            return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return ""


def _config(config_text: str) -> str:
    if not config_text:
        return "<h2>Config</h2>\n<p>No config.yaml in the run folder.</p>"
    return (
        "<h2>Config</h2>\n<details open><summary>config.yaml (resolved, every default filled in)"
        f'</summary><pre class="config">{esc(config_text)}</pre></details>'
    )


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto;
       max-width: 1500px; padding: 0 1.5rem; color: #222; line-height: 1.45; }
h1 { margin-bottom: .4rem; } h2 { margin-top: 2rem; border-bottom: 1px solid #ddd; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: .15rem 1rem; }
dl.facts dt { color: #666; } dl.facts dd { margin: 0; font-family: monospace; }
.finding { border-left: 5px solid; padding: .5rem .8rem; margin: .5rem 0; border-radius: 3px; }
.finding.error { border-color: #c62828; background: #fdecea; }
.finding.warning { border-color: #e65100; background: #fff4e5; }
.finding.info { border-color: #1565c0; background: #e8f1fb; }
.finding.ok { border-color: #2e7d32; background: #edf7ed; }
table { border-collapse: collapse; margin: .5rem 0; }
th, td { border: 1px solid #ddd; padding: .25rem .6rem; text-align: left; vertical-align: top; }
th { background: #f5f5f5; } td { font-family: monospace; }
.bad { color: #c62828; font-weight: bold; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 1rem; }
figure { margin: 0; } figure img { width: 100%; border: 1px solid #eee; }
figcaption { color: #666; font-size: .9rem; text-align: center; }
table.samples { width: 100%; table-layout: fixed; }
table.samples pre { white-space: pre-wrap; word-break: break-word; margin: 0; font-size: .85rem; }
pre.config { background: #f7f7f7; padding: .8rem; overflow-x: auto; font-size: .85rem; }
"""
