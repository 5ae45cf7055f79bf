"""Health findings of real tiny training runs, read from the run's health.json: a reference that
changes during training, a "different" reference that is the policy's own checkpoint, and a
clean run whose reference holds still."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from torch import nn

import prefopt.reference_setup
from toy_models import toy_assets, toy_train


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return toy_assets(tmp_path_factory.mktemp("health_runs"), n_train=16)


def run(assets: dict[str, Path], out: Path, *overrides: str) -> list[dict[str, Any]]:
    """6 steps, evaluated at 0, 2, 4 and 6; the findings of health.json."""
    toy_train(
        assets, out, "train.max_steps=6", "eval.every_steps=2", "train.device=cpu",
        "output.report=false", *overrides,
    )  # fmt: skip
    findings: list[dict[str, Any]] = json.loads((out / "health.json").read_text())
    return findings


def eval_records(out: Path) -> list[dict[str, Any]]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("split") == "eval"]


def test_a_reference_that_trains_with_the_policy_is_an_error(
    assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bug this guards against: the "copy" reference shares the policy's weights (no copy,
    nothing frozen), so every step moves it too. Step 0 cannot tell (both are equal then);
    the evaluations can."""

    def no_copy(cfg: Any, model: nn.Module) -> nn.Module:
        return model

    monkeypatch.setattr(prefopt.reference_setup, "_starting_copy", no_copy)
    monkeypatch.setattr(prefopt.reference_setup, "freeze", lambda model: model)
    findings = run(assets, tmp_path / "out", "reference.strategy=copy")
    drift = [f for f in findings if f["kind"] == "reference_drift"]
    assert len(drift) == 1, findings
    assert drift[0]["severity"] == "error" and drift[0]["step"] == 2
    assert "changed during training" in drift[0]["message"]
    # What the check read: the reference's mean log-probs on the eval set kept moving.
    means = [r["ref_logps/chosen"] for r in eval_records(tmp_path / "out")]
    assert len(set(means)) == len(means) == 4


def test_reference_model_equal_to_the_policy_is_a_warning(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    """reference.model names the checkpoint the policy starts from: meant as a different
    model, it is the same one (step 0's check finds max |Δ log π| = 0)."""
    findings = run(assets, tmp_path / "out", f"reference.model={assets['model']}")
    (same,) = [f for f in findings if f["kind"] == "reference_drift"]
    assert same["severity"] == "warning" and same["step"] == 0
    assert "same checkpoint" in same["message"]


def test_clean_run_has_a_steady_reference_and_checks_overfitting(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    findings = run(assets, tmp_path / "out", "reference.strategy=copy")
    assert not [f for f in findings if f["kind"] in ("reference_drift", "overfitting")], findings
    evals = eval_records(tmp_path / "out")
    assert [r["step"] for r in evals] == [0, 2, 4, 6]
    assert len({(r["ref_logps/chosen"], r["ref_logps/rejected"]) for r in evals}) == 1
    assert evals[0]["logps/chosen"] != evals[-1]["logps/chosen"]  # while the policy moved
    assert all(-1 <= r["length/margin_corr"] <= 1 for r in evals)


def test_two_evaluations_say_overfitting_was_not_checked(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    findings = run(assets, tmp_path / "out", "eval.every_steps=0")
    (note,) = [f for f in findings if f["kind"] == "overfitting"]
    assert note["severity"] == "info" and "only 2 evaluations (step 0, 6)" in note["message"]
