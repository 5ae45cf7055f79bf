"""Report samples without a judge: the saved policy and its reference on the first held-out
prompts, written to samples.jsonl and shown in the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prefopt.config_io import load_config
from prefopt.pipeline import prepare_data
from prefopt.report import write_report
from prefopt.report_samples import heldout_prompts, sample_for_report
from toy import make_tokenizer
from toy_models import learnable_pairs, save_toy_model, toy_train, write_jsonl


def as_json(value: object) -> object:
    """Prompts as JSON reads them back (chat messages come as tuples)."""
    return json.loads(json.dumps(value))


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("report_samples")
    return {
        "model": save_toy_model(root / "model", "llama", seed=0),
        "train": write_jsonl(root / "train.jsonl", learnable_pairs(12, seed=0)),
        "eval": write_jsonl(root / "eval.jsonl", learnable_pairs(12, seed=1)),
    }


def test_first_distinct_held_out_prompts(assets: dict[str, Path]) -> None:
    cfg = load_config(None, [f"data.train={assets['train']}", f"data.eval={assets['eval']}"])
    rows = [json.loads(x) for x in assets["eval"].read_text().splitlines()]
    distinct: list = []
    for r in rows:
        if r["prompt"] not in distinct:
            distinct.append(r["prompt"])
    assert as_json(heldout_prompts(cfg, 3)) == distinct[:3]
    # eval_fraction: the prompts of the split training makes (same seed, same rows).
    cfg = load_config(None, [f"data.train={assets['train']}", "data.eval_fraction=0.4"])
    data = prepare_data(cfg, make_tokenizer())
    assert data.eval is not None
    train_rows = [json.loads(x) for x in assets["train"].read_text().splitlines()]
    expected = {json.dumps(train_rows[e.index]["prompt"]) for e in data.eval}
    assert {json.dumps(as_json(p)) for p in heldout_prompts(cfg, 100)} == expected
    assert heldout_prompts(load_config(None, [f"data.train={assets['train']}"]), 4) == []


def test_renamed_columns_are_read_as_training_reads_them(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    """data.columns applies to the held-out prompts too, for pairs and for SFT rows."""
    rows = [json.loads(x) for x in assets["eval"].read_text().splitlines()]
    renamed = [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in rows]
    path = write_jsonl(tmp_path / "renamed.jsonl", renamed)
    columns = ["data.columns.prompt=question", "data.columns.chosen=good"]
    cfg = load_config(None, [f"data.train={assets['train']}", f"data.eval={path}", *columns,
                             "data.columns.rejected=bad"])  # fmt: skip
    assert as_json(heldout_prompts(cfg, 2)) == [r["prompt"] for r in rows][:2]
    sft = load_config(None, [f"data.train={assets['train']}", f"data.eval={path}", *columns,
                             "data.sft=true", "loss.name=sft"])  # fmt: skip
    assert as_json(heldout_prompts(sft, 2)) == [r["prompt"] for r in rows][:2]


def test_unjudged_run_gets_samples_in_its_report(assets: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    overrides = ["train.max_steps=2", "train.device=cpu", "output.report=false"]
    toy_train(assets, out, *overrides)
    cfg = load_config(
        None,
        [
            f"model.name_or_path={assets['model']}", f"data.train={assets['train']}",
            f"data.eval={assets['eval']}", f"output.dir={out}", "train.device=cpu",
            "judge.report_samples=3", "judge.max_new_tokens=6",
        ],
    )  # fmt: skip
    path = sample_for_report(cfg, out)
    assert path == out / "samples.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert [r["prompt"] for r in rows] == as_json(heldout_prompts(cfg, 3))
    assert all(len(r["policy"]) == 1 and len(r["reference"]) == 1 for r in rows)
    page = write_report(out).read_text()
    assert "<h2>Samples</h2>" in page
    assert all(r["policy"][0].strip()[:10] in page for r in rows if r["policy"][0].strip())
    # Nothing to do: a judge samples, samples are turned off, or the report is.
    assert sample_for_report(load_config(None, [*_same(cfg), "judge.prompts=p.jsonl"]), out) is None
    assert (
        sample_for_report(load_config(None, [*_same(cfg), "judge.report_samples=0"]), out) is None
    )
    assert sample_for_report(load_config(None, [*_same(cfg), "output.report=false"]), out) is None


def _same(cfg) -> list[str]:
    return [
        f"model.name_or_path={cfg.model.name_or_path}", f"data.train={cfg.data.train}",
        f"data.eval={cfg.data.eval}", f"output.dir={cfg.output.dir}",
    ]  # fmt: skip


def test_a_failure_is_logged_not_raised(
    assets: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "model").mkdir()  # a saved folder that does not load
    cfg = load_config(None, [f"data.train={assets['train']}", f"data.eval={assets['eval']}"])
    with caplog.at_level("WARNING", logger="prefopt.report_samples"):
        assert sample_for_report(cfg, tmp_path) is None
    assert "could not sample the saved model" in caplog.text
