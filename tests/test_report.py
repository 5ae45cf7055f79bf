"""The HTML report: files of a real tiny run, odd histories, escaping, and the CLI."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from prefopt.cli import main
from prefopt.config_io import load_config
from prefopt.errors import PrefoptError
from prefopt.report import write_report
from prefopt.report_plots import PLOTS, ema, ema_weight, smooth
from prefopt.trainer import train
from toy_models import learnable_pairs, save_toy_model, write_jsonl

ALL_PLOTS = {f"{spec.name}.png" for spec in PLOTS}
EVAL_PLOTS = {"loss.png", "rewards.png", "accuracies.png", "logps.png"}


BAD_ROW = {
    "prompt": [{"role": "user", "content": "p"}],
    "chosen": [{"role": "assistant", "content": ""}],  # empty response: dropped under skip
    "rejected": [{"role": "assistant", "content": "no"}],
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 4-step training run with evals at steps 0, 2 and 4."""
    root = tmp_path_factory.mktemp("report_run")
    overrides = [
        f"model.name_or_path={save_toy_model(root / 'model')}",
        f"data.train={write_jsonl(root / 'train.jsonl', learnable_pairs(16, seed=0) + [BAD_ROW])}",
        "data.on_error=skip",  # the bad row is dropped and counted: the report's Data section
        f"data.eval={write_jsonl(root / 'eval.jsonl', learnable_pairs(4, seed=1))}",
        f"output.dir={root / 'out'}",
        "optim.lr=1e-2",
        "optim.warmup_ratio=0",
        "train.batch_size=4",
        "train.max_steps=4",
        "eval.every_steps=2",
        "output.progress=false",
    ]
    train(load_config(None, overrides))
    return root / "out"


def image_links(page: str) -> set[str]:
    return set(re.findall(r'<img src="([^"]+)"', page))


def write_history(folder: Path, records: list[dict[str, Any]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def step(n: int, **values: Any) -> dict[str, Any]:
    base = {"step": n, "split": "train", "loss": 0.6, "rewards/margins": 0.1 * n,
            "rewards/accuracies": 0.6, "lr": 1e-3, "grad_norm": 1.0,
            "tokens_per_s": 100.0}  # fmt: skip
    return {**base, **values}


def test_report_of_a_real_run(run_dir: Path):
    samples = [
        {"prompt": "hi <script>alert('x')</script>", "reference": "a & b", "policy": "<b>ok</b>"},
        {"prompt": "second", "policy": "only policy", "extra": {"score": 1}},
    ]
    index = write_report(run_dir, samples=samples)
    folder = run_dir / "report"
    assert index == folder / "index.html"
    assert {p.name for p in folder.glob("*.png")} == ALL_PLOTS
    page = index.read_text(encoding="utf-8")
    assert image_links(page) == ALL_PLOTS  # every PNG shown, by a relative link
    for name in ALL_PLOTS:
        assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Eval: first vs last" in page and "step 0" in page and "step 4" in page
    assert "Final metrics" in page and "rewards/margins" in page
    assert "config.yaml" in page and "max_grad_norm" in page  # the config is shown
    assert "No problems found" in page
    # Data: what was read, kept and dropped (data_summary.json), the empty response counted.
    summary = json.loads((run_dir / "data_summary.json").read_text())
    assert summary["train"]["rows_read"] == 17 and summary["train"]["pairs_kept"] == 16
    assert sum(summary["train"]["dropped"].values()) == 1
    assert "<h2>Data</h2>" in page
    assert re.search(r"<td>train</td><td>conversational</td><td>17</td><td>16</td><td>1</td>", page)
    # Samples: every text escaped, the answers side by side after the prompt.
    assert "<script>" not in page and "<b>ok</b>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "a &amp; b" in page
    header = re.search(r'<table class="samples"><tr>(.*?)</tr>', page)
    assert header is not None
    columns = re.findall(r"<th>(.*?)</th>", header.group(1))
    assert columns == ["prompt", "reference", "policy", "extra"]


def test_no_eval_one_step_and_nan_strings(tmp_path: Path):
    out = write_history(tmp_path / "one", [step(1, loss="nan", grad_norm="inf")])
    page = write_report(out).read_text(encoding="utf-8")
    pngs = {p.name for p in (out / "report").glob("*.png")}
    # loss is NaN at its only step: no finite value, no loss plot; the others still come.
    assert pngs == {"accuracies.png", "rewards.png", "lr.png", "tokens_per_s.png"}
    assert image_links(page) == pngs
    assert "non_finite" in page and 'class="finding error"' in page
    assert "Eval: first vs last" not in page
    assert "has not finished" in page  # no final_metrics.json
    assert "No config.yaml" in page


def test_train_only_run_with_some_nan(tmp_path: Path):
    records = [step(n) for n in range(1, 30)]
    records[5]["loss"] = "nan"
    out = write_history(tmp_path / "run", records)
    (out / "final_metrics.json").write_text(json.dumps({"loss": 0.5, "rewards/margins": "nan"}))
    page = write_report(out).read_text(encoding="utf-8")
    assert "loss.png" in image_links(page)
    assert '<span class="bad">nan</span>' in page  # a NaN final metric is shown, marked


def test_stale_plots_are_removed_and_half_lines_skipped(tmp_path: Path):
    out = write_history(tmp_path / "run", [step(1), step(2)])
    with (out / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 3, "split": "tr')  # a run still writing its next line
    (out / "report").mkdir()
    (out / "report" / "old.png").write_bytes(b"x")
    write_report(out)
    assert not (out / "report" / "old.png").exists()


def test_empty_history_and_missing_folder(tmp_path: Path):
    out = write_history(tmp_path / "empty", [])
    page = write_report(out).read_text(encoding="utf-8")
    assert "No metrics were recorded" in page and image_links(page) == set()
    with pytest.raises(PrefoptError, match="no metrics.jsonl"):
        write_report(tmp_path / "missing")


def test_cli_report(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    samples = write_jsonl(tmp_path / "samples.jsonl", [{"prompt": "p <i>", "policy": "q"}])
    assert main(["report", str(run_dir), "--samples", str(samples)]) == 0
    assert "report/index.html" in capsys.readouterr().out
    assert "p &lt;i&gt;" in (run_dir / "report" / "index.html").read_text(encoding="utf-8")
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_ema():
    assert ema([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])  # debiased from step 1
    out = ema([1.0, math.nan, 3.0], 0.5)
    assert out[1] == pytest.approx(1.0)  # a NaN keeps the average instead of poisoning it
    assert out[2] == pytest.approx((0.5 * 0.5 * 1 + 0.5 * 3) / (0.5 * 0.5 + 0.5))
    assert math.isnan(ema([math.nan], 0.5)[0])
    assert ema_weight(1) == 0.0 and 0.9 < ema_weight(1000) < 0.97


def test_two_sided_smoothing_has_no_lag():
    line = [float(i) for i in range(41)]
    out = smooth(line, 0.8)
    assert out[20] == pytest.approx(20.0)  # symmetric kernel: a straight line stays in place
    assert smooth([2.0] * 5, 0.9) == pytest.approx([2.0] * 5)
    with_nan = smooth([1.0, math.nan, 3.0], 0.5)
    assert with_nan[1] == pytest.approx(2.0)  # the NaN point takes its neighbours' mean
    assert math.isnan(smooth([math.nan], 0.5)[0])


def test_saved_findings_are_shown(tmp_path: Path):
    """health.json from the training loop adds what the metrics alone cannot show."""
    out = write_history(tmp_path / "run", [step(1), step(2)])
    saved = [
        {"kind": "reference_drift", "severity": "error", "step": 0, "message": "ref <differs>"},
        {"kind": "bogus", "severity": "error", "step": 0, "message": "ignored"},
        "not a finding",
    ]
    (out / "health.json").write_text(json.dumps(saved))
    page = write_report(out).read_text(encoding="utf-8")
    assert "reference_drift" in page and "ref &lt;differs&gt;" in page
    assert "bogus" not in page and "No problems found" not in page
