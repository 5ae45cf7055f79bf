"""Health checks: each warning fires on a crafted history and stays silent on a healthy one."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from prefopt.health import Finding, HealthMonitor, as_float, check_history, linear_fit
from prefopt.tracking import read_metrics

# Fixed "noise" so histories are literal and deterministic (period 7, mean 0).
WIGGLE = [0.3, -0.2, 0.1, -0.4, 0.2, 0.0, 0.0]


def train_record(step: int, **overrides: Any) -> dict[str, Any]:
    """A healthy train step: margins grow, chosen log-probs hold steady, lengths vary."""
    w = WIGGLE[step % 7]
    margin = 0.05 * step + w
    record = {
        "step": step, "split": "train", "loss": 0.69 - 0.004 * step + 0.02 * w,
        "rewards/chosen": 0.2 * margin, "rewards/rejected": -0.8 * margin,
        "rewards/margins": margin, "rewards/accuracies": min(0.85, 0.5 + 0.01 * step),
        "logps/chosen": -60.0 + 3 * w, "logps/rejected": -62.0 - 0.1 * step,
        "tokens/chosen": 30.0 + 4 * WIGGLE[(step * 3) % 7], "tokens/rejected": 28.0,
        "lr": 1e-6, "grad_norm": 1.0 + w, "tokens_per_s": 900.0, "epoch": 0,
    }  # fmt: skip
    record.update(overrides)
    return record


def eval_record(step: int, **overrides: Any) -> dict[str, Any]:
    """A healthy eval: loss falls, accuracy near train's, chosen log-probs steady."""
    margin = 0.05 * step
    record = {
        "step": step, "split": "eval", "loss": 0.69 - 0.004 * step,
        "rewards/chosen": 0.2 * margin, "rewards/rejected": -0.8 * margin,
        "rewards/margins": margin, "rewards/accuracies": min(0.8, 0.5 + 0.01 * step),
        "logps/chosen": -60.0, "logps/rejected": -62.0 - 0.1 * step,
        "tokens/chosen": 30.0, "tokens/rejected": 28.0, "num_pairs": 64.0,
    }  # fmt: skip
    record.update(overrides)
    return record


def healthy_history(steps: int = 60, every: int = 20) -> list[dict[str, Any]]:
    history = [eval_record(0)]
    for s in range(1, steps + 1):
        history.append(train_record(s))
        if s % every == 0:
            history.append(eval_record(s))
    return history


def feed(monitor: HealthMonitor, records: list[dict[str, Any]]) -> list[Finding]:
    found = []
    for r in records:
        found += monitor.update(r)
    return found


def kinds(findings: list[Finding]) -> list[str]:
    return [f.kind for f in findings]


def problems(findings: list[Finding]) -> list[Finding]:
    """Warnings and errors, without info notes."""
    return [f for f in findings if f.severity != "info"]


def test_healthy_run_is_silent():
    monitor = HealthMonitor()
    assert feed(monitor, healthy_history()) == []
    assert monitor.summary() == []


def test_displacement_on_train_trend_fires_once():
    # Chosen log-probs fall 0.5 nats/step while margins grow: the classic trl#800 picture.
    history = [train_record(s, **{"logps/chosen": -60.0 - 0.5 * s}) for s in range(1, 61)]
    found = feed(HealthMonitor(), history)
    assert kinds(found) == ["displacement"]  # warned once, not on every later step
    assert found[0].severity == "warning"
    assert "[sigmoid, sft]" in found[0].message and "optim.lr" in found[0].message


def test_displacement_needs_growing_margins():
    falling = [
        train_record(s, **{"logps/chosen": -60.0 - 0.5 * s, "rewards/margins": 1.0})
        for s in range(1, 61)
    ]
    assert "displacement" not in kinds(feed(HealthMonitor(), falling))


def test_displacement_on_evals():
    # Per token: -60/30 = -2.0 at the start, -75/30 = -2.5 later (0.5 nats/token lower).
    evals = [eval_record(0), eval_record(20, **{"logps/chosen": -75.0})]
    found = feed(HealthMonitor(), evals)
    assert kinds(found) == ["displacement"]
    assert "-2.000 to -2.500" in found[0].message


def test_length_bias_on_batch_means():
    # The margin is the trend plus 0.5 × the length gap: length explains what is left over.
    history = []
    for s in range(1, 41):
        gap = 10 * WIGGLE[(s * 3) % 7]
        base = train_record(s, **{"tokens/chosen": 28.0 + gap})
        base["rewards/margins"] = 0.05 * s + 0.5 * gap
        history.append(base)
    found = feed(HealthMonitor(), history)
    assert kinds(found) == ["length_bias"]
    assert "longer" in found[0].message and "simpo" in found[0].message


def test_length_bias_per_pair():
    monitor = HealthMonitor()
    pairs = [(float(d), 0.2 * d + 0.1 * WIGGLE[d % 7]) for d in range(-15, 15)]
    found = monitor.update_pairs(pairs, step=50)
    assert kinds(found) == ["length_bias"] and found[0].step == 50
    assert "30 pairs" in found[0].message
    # Unrelated margins, or too few pairs, say nothing.
    flat = [(float(d), WIGGLE[d % 7]) for d in range(-15, 15)]
    assert HealthMonitor().update_pairs(flat) == []
    assert HealthMonitor().update_pairs(pairs[:5]) == []


def test_overfitting_when_eval_loss_rises_and_train_pulls_away():
    history = [eval_record(0)]
    eval_losses = {20: 0.50, 40: 0.48, 60: 0.56}
    for s in range(1, 61):
        history.append(train_record(s, loss=0.1, **{"rewards/accuracies": 0.97}))
        if s in eval_losses:
            history.append(eval_record(s, loss=eval_losses[s], **{"rewards/accuracies": 0.7}))
    found = feed(HealthMonitor(), history)
    assert kinds(found) == ["overfitting"]
    assert found[0].step == 60
    assert "0.4800 to 0.5600" in found[0].message
    assert "eval.early_stopping_metric" in found[0].message


def test_no_overfitting_while_eval_loss_still_falls():
    history = [eval_record(0)]
    for s in range(1, 61):
        history.append(train_record(s, loss=0.1, **{"rewards/accuracies": 0.97}))
        if s % 20 == 0:
            history.append(eval_record(s, **{"rewards/accuracies": 0.7}))
    assert "overfitting" not in kinds(feed(HealthMonitor(), history))


@pytest.mark.parametrize("bad", ["nan", "NaN", "inf", "-Infinity", math.nan, math.inf])
def test_non_finite_detected(bad: Any):
    found = HealthMonitor().update(train_record(3, loss=bad))
    assert kinds(found) == ["non_finite"]
    assert found[0].severity == "error" and found[0].step == 3
    assert "loss=" in found[0].message


def test_non_finite_warns_once_until_cleared():
    monitor = HealthMonitor(clear_after=3)
    assert kinds(monitor.update(train_record(1, loss="nan"))) == ["non_finite"]
    assert monitor.update(train_record(2, loss="nan")) == []  # still the same problem
    for s in range(3, 6):  # three finite records clear it
        assert monitor.update(train_record(s)) == []
    again = monitor.update(train_record(6, grad_norm="inf"))
    assert kinds(again) == ["non_finite"]
    (summary,) = problems(monitor.summary())
    assert "raised 2 times, first at step 1" in summary.message


def test_non_finite_from_jsonl_strings(tmp_path: Path):
    """The Tracker writes NaN as the string "nan"; read back, the check still sees it."""
    history = healthy_history(40)
    history[10] = {**history[10], "rewards/margins": "nan"}
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    findings = check_history(read_metrics(tmp_path))
    assert kinds(findings) == ["non_finite"]
    assert "rewards/margins=nan" in findings[0].message


def test_reference_check():
    monitor = HealthMonitor(reference_tolerance=1e-3)
    assert monitor.reference_check(1e-6, expected_equal=True) == []
    (drift,) = monitor.reference_check(0.5, expected_equal=True)
    assert drift.kind == "reference_drift" and drift.severity == "error"
    assert "0.5 nats" in drift.message
    assert HealthMonitor().reference_check(2.0, expected_equal=False) == []
    (same,) = HealthMonitor().reference_check(0.0, expected_equal=False)
    assert same.severity == "warning" and "same checkpoint" in same.message
    assert kinds(HealthMonitor().reference_check(math.nan, expected_equal=True)) == [
        "reference_drift"
    ]
    assert HealthMonitor().reference_check(0.01, expected_equal=True, tolerance=0.02) == []


def test_reference_drift_between_evaluations():
    """A frozen reference scores the fixed eval set the same every time; a change is drift."""
    ref = {"ref_logps/chosen": -60.0, "ref_logps/rejected": -62.0}
    monitor = HealthMonitor()
    steady = [eval_record(0, **ref), eval_record(20, **ref)]
    steady.append(eval_record(40, **{**ref, "ref_logps/chosen": -60.00001}))  # float noise
    assert feed(monitor, steady) == []
    (drift,) = monitor.update(eval_record(60, **{**ref, "ref_logps/rejected": -65.0}))
    assert drift.kind == "reference_drift" and drift.severity == "error" and drift.step == 60
    assert (
        "ref_logps/rejected" in drift.message and "-62.0000 (step 0) to -65.0000" in drift.message
    )
    assert monitor.update(eval_record(80, **ref)) == []  # reported once while active
    # No reference (reference-free losses): nothing to compare.
    assert feed(HealthMonitor(), [eval_record(0), eval_record(20)]) == []


def test_reference_drift_from_a_saved_history(tmp_path: Path):
    """A resumed run replays metrics.jsonl: the baseline stays the step-0 evaluation."""
    ref = {"ref_logps/chosen": -60.0, "ref_logps/rejected": -62.0}
    history = healthy_history(60)
    history[0] = eval_record(0, **ref)
    later = {**ref, "ref_logps/chosen": -58.0}  # a reference rebuilt from the wrong weights
    history.append(eval_record(60, **later))
    assert kinds(problems(check_history(history))) == ["reference_drift"]


def test_length_bias_from_eval_records():
    """`length/margin_corr` of an evaluation's pairs: judged after step 0, with enough pairs."""
    biased = {"length/margin_corr": 0.8, "num_pairs": 30.0}
    (found,) = HealthMonitor().update(eval_record(20, **biased))
    assert found.kind == "length_bias" and "r=0.80" in found.message and "30 pairs" in found.message
    assert HealthMonitor().update(eval_record(0, **biased)) == []  # the reference's own margins
    assert HealthMonitor().update(eval_record(20, **{**biased, "num_pairs": 8.0})) == []
    assert HealthMonitor().update(eval_record(20, **{**biased, "length/margin_corr": 0.3})) == []


def test_summary_says_when_overfitting_was_not_checked():
    two = HealthMonitor()
    feed(two, [eval_record(0), train_record(1), eval_record(1)])
    (note,) = two.summary()
    assert note.kind == "overfitting" and note.severity == "info"
    assert "only 2 evaluations (step 0, 1)" in note.message and "eval.every_steps" in note.message
    none = HealthMonitor()
    feed(none, [train_record(1)])
    assert "no held-out data" in none.summary()[0].message
    three = HealthMonitor()
    feed(three, healthy_history(40))  # evaluations at steps 0, 20, 40
    assert three.summary() == []


def test_summary_lists_errors_first():
    monitor = HealthMonitor()
    feed(monitor, [eval_record(0), eval_record(20, **{"logps/chosen": -75.0})])
    monitor.update(train_record(21, loss="nan"))
    # Errors, warnings, then notes: 2 evaluations left the overfitting check out.
    assert kinds(monitor.summary()) == ["non_finite", "displacement", "overfitting"]
    assert monitor.summary()[-1].severity == "info"
    assert str(monitor.summary()[0]).startswith("[error] step 21 non_finite:")


def test_helpers():
    assert as_float("nan") is not None and math.isnan(as_float("nan") or 0.0)
    assert as_float("-inf") == -math.inf
    assert as_float(True) is None and as_float("abc") is None and as_float(None) is None
    assert as_float(3) == 3.0
    slope, intercept, r = linear_fit([0, 1, 2, 3], [1, 3, 5, 7])
    assert (slope, intercept, r) == pytest.approx((2.0, 1.0, 1.0))
    assert linear_fit([1, 1], [2, 3]) == (0.0, 2.5, 0.0)  # no spread in x: no trend
