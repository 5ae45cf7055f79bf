"""The individual DPO health checks behind `health.HealthMonitor`, as pure functions.

Each check takes the records it judges (train records and evaluations as dicts of finite
floats, each with a "step"), the thresholds it uses and the current optimizer step, and returns
a `Finding` or None. The monitor keeps the state (the window of recent train records, the
evaluations so far, which findings are active); see `prefopt.health` for the kinds of finding.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from prefopt.series_stats import correlation, linear_fit
from prefopt.series_stats import series_mean as _mean

Kind = Literal["displacement", "length_bias", "overfitting", "non_finite", "reference_drift"]
Severity = Literal["info", "warning", "error"]

SEVERITY_ORDER: dict[str, int] = {"error": 0, "warning": 1, "info": 2}
MIN_EVALS_FOR_OVERFITTING = 3
"""Evaluations the overfitting check needs: a best eval loss, then a later rise above it."""

_DISPLACE_FIX = (
    "Add an NLL term on the chosen responses (loss.name=[sigmoid, sft]) or lower optim.lr"
)


@dataclass(frozen=True)
class Finding:
    """One health problem.

    Attributes:
        kind: Which check raised it (see the `prefopt.health` docstring).
        severity: "error" (results are not trustworthy), "warning" (likely a problem) or "info".
        step: Optimizer step at which it was seen.
        message: What was measured and what to do about it.
    """

    kind: Kind
    severity: Severity
    step: int
    message: str

    def __str__(self) -> str:
        return f"[{self.severity}] step {self.step} {self.kind}: {self.message}"


def _series(records: Iterable[dict[str, float]], *keys: str) -> list[list[float]]:
    """One list per key, over the records that have all of `keys`."""
    rows = [r for r in records if all(k in r for k in keys)]
    return [[r[k] for r in rows] for k in keys]


def reference_start(
    max_abs_diff: float, expected_equal: bool, tolerance: float, step: int
) -> Finding | None:
    """A measured max |log π_ref - log π_policy| (nats) at the start of training, judged."""
    if not math.isfinite(max_abs_diff):
        return Finding("reference_drift", "error", step, f"reference log-probs are {max_abs_diff}")
    if expected_equal and max_abs_diff > tolerance:
        return Finding(
            "reference_drift", "error", step,
            f"the reference differs from the starting policy by {max_abs_diff:.3g} nats "
            f"(tolerance {tolerance:.3g}) although it should equal it: every reward is biased. "
            "Check that reference.model / the cache matches model.name_or_path "
            "(or delete reference.cache_dir)",
        )  # fmt: skip
    if not expected_equal and max_abs_diff <= tolerance:
        return Finding(
            "reference_drift", "warning", step,
            f"the reference is meant to be a different model but matches the policy "
            f"(max |Δ log π| = {max_abs_diff:.3g} nats): is reference.model the same "
            "checkpoint as model.name_or_path?",
        )  # fmt: skip
    return None


def overfitting_unchecked(evals: Sequence[dict[str, float]], step: int) -> Finding | None:
    """An info note when too few evaluations were seen to judge overfitting: it needs a
    best eval loss and a later rise, so at least 3 evaluations."""
    n = len(evals)
    if n >= MIN_EVALS_FOR_OVERFITTING:
        return None
    if n == 0:
        why = "the run had no evaluation (no held-out data)"
        fix = "give held-out data (data.eval or data.eval_fraction) and set eval.every_steps"
    else:
        steps = ", ".join(str(int(e["step"])) for e in evals)
        why = f"only {n} evaluation{'s' if n > 1 else ''} (step {steps})"
        fix = "set eval.every_steps to about a fifth of the run's steps"
    return Finding(
        "overfitting", "info", step,
        f"overfitting was not checked: {why}, and the check needs eval loss at "
        f"{MIN_EVALS_FOR_OVERFITTING} or more points (a best value, then a rise). To have "
        f"it checked, {fix}",
    )  # fmt: skip


def reference_drift(
    evals: Sequence[dict[str, float]], step: int, *, tolerance: float
) -> Finding | None:
    """The latest eval's mean reference log-probs against the first eval's."""
    keys = ("ref_logps/chosen", "ref_logps/rejected")
    first = next((e for e in evals if any(k in e for k in keys)), None)
    last = evals[-1]
    if first is None or first is last:
        return None
    worst = None
    for key in (k for k in keys if k in first and k in last):
        change = abs(last[key] - first[key]) / max(1.0, abs(first[key]))
        if change > tolerance and (worst is None or change > worst[0]):
            worst = (change, key)
    if worst is None:
        return None
    key = worst[1]
    return Finding(
        "reference_drift", "error", step,
        f"the reference changed during training: its mean {key} on the eval set moved from "
        f"{first[key]:.4f} (step {int(first['step'])}) to {last[key]:.4f} nats (relative "
        f"change {worst[0]:.3g}, tolerance {tolerance:.3g}). A frozen "
        "reference scores the same eval pairs the same every time: it is being trained or "
        "was rebuilt differently (e.g. after a resume), so rewards and loss are measured "
        "against a moving target",
    )  # fmt: skip


def non_finite(values: dict[str, float], split: str, step: int) -> Finding | None:
    """An error naming the record's NaN/±Inf metrics (at most 6 shown)."""
    bad = sorted(k for k, v in values.items() if not math.isfinite(v))
    if not bad:
        return None
    shown = ", ".join(f"{k}={values[k]}" for k in bad[:6]) + (" ..." if len(bad) > 6 else "")
    return Finding(
        "non_finite", "error", step,
        f"non-finite {split} metrics: {shown}. Lower optim.lr, keep optim.max_grad_norm on, "
        "use float32/bf16 rather than fp16, and check the data rows of that step",
    )  # fmt: skip


def displacement_train(
    recent: Sequence[dict[str, float]],
    step: int,
    *,
    min_points: int,
    slope: float,
    trend_corr: float,
) -> Finding | None:
    """Chosen log-probs trending down while margins trend up over the recent train records."""
    steps, chosen, margins = _series(recent, "step", "logps/chosen", "rewards/margins")
    if len(steps) < min_points:
        return None
    c_slope, _, c_r = linear_fit(steps, chosen)
    m_slope, _, m_r = linear_fit(steps, margins)
    falling = c_slope < -slope and c_r <= -trend_corr
    if not (falling and m_slope > 0 and m_r >= trend_corr):
        return None
    return Finding(
        "displacement", "warning", step,
        f"chosen log-probs fall ({c_slope:+.3g} nats/step, r={c_r:.2f}) while margins grow "
        f"({m_slope:+.3g}/step) over steps {int(steps[0])}-{int(steps[-1])}: likelihood "
        "displacement (the policy pushes the chosen responses down too). " + _DISPLACE_FIX,
    )  # fmt: skip


def displacement_eval(
    evals: Sequence[dict[str, float]], step: int, *, eval_drop: float
) -> Finding | None:
    """Eval chosen log-prob per token dropped since the first eval while the margin grew."""
    per_token = [
        (e["logps/chosen"] / e["tokens/chosen"], e["rewards/margins"])
        for e in evals
        if e.get("tokens/chosen", 0) > 0 and "logps/chosen" in e and "rewards/margins" in e
    ]
    if len(per_token) < 2:
        return None
    (c0, m0), (c1, m1) = per_token[0], per_token[-1]
    if not (c1 < c0 - eval_drop and m1 > m0):
        return None
    return Finding(
        "displacement", "warning", step,
        f"eval chosen log-prob per token fell from {c0:.3f} to {c1:.3f} while the margin "
        f"grew from {m0:.3f} to {m1:.3f}: likelihood displacement. " + _DISPLACE_FIX,
    )  # fmt: skip


def length_bias_train(
    recent: Sequence[dict[str, float]], step: int, *, min_points: int, corr: float
) -> Finding | None:
    """The length gap against the detrended margin over the recent train records."""
    steps, tc, tr, margins = _series(
        recent, "step", "tokens/chosen", "tokens/rejected", "rewards/margins"
    )
    if len(steps) < min_points:
        return None
    # Margins grow with training whatever the lengths; correlate the length gap with the
    # margin left over after the trend, or a steady trend would hide (or fake) the effect.
    slope, intercept, _ = linear_fit(steps, margins)
    residual = [m - (slope * s + intercept) for s, m in zip(steps, margins, strict=True)]
    diffs = [c - r for c, r in zip(tc, tr, strict=True)]
    over = f"{len(diffs)} train batches"
    return length_bias_message(correlation(diffs, residual), over, step, corr=corr)


def length_bias_pairs(
    r: float, pairs: float, step: int, *, min_points: int, corr: float
) -> Finding | None:
    """Length bias from per-pair data: Pearson r of length gap and margin over `pairs`."""
    if pairs < min_points:
        return None
    return length_bias_message(r, f"{int(pairs)} pairs", step, corr=corr)


def length_bias_message(r: float, over: str, step: int, *, corr: float) -> Finding | None:
    """A warning when |r| (length gap vs margin, measured `over` ...) exceeds `corr`."""
    if abs(r) <= corr:
        return None
    side = "longer" if r > 0 else "shorter"
    return Finding(
        "length_bias", "warning", step,
        f"the reward margin follows the length gap (r={r:.2f}, r²={r * r:.2f} over "
        f"{over}): the policy may be learning to prefer the {side} "
        "response rather than the better one. Try a length-normalised loss "
        "(loss.name=simpo) or balance chosen/rejected lengths in the data",
    )  # fmt: skip


def overfitting(
    evals: Sequence[dict[str, float]],
    recent: Sequence[dict[str, float]],
    step: int,
    *,
    loss_rise: float,
    acc_gap: float,
    loss_gap: float,
) -> Finding | None:
    """Eval loss above its best while train accuracy or loss pulls away from eval."""
    losses = [e["loss"] for e in evals if "loss" in e]
    if len(losses) < 2 or not recent:
        return None
    current, best = losses[-1], min(losses[:-1])
    if current <= best + loss_rise:
        return None
    last = evals[-1]
    train_acc = _mean(r["rewards/accuracies"] for r in recent if "rewards/accuracies" in r)
    train_loss = _mean(r["loss"] for r in recent if "loss" in r)
    eval_acc = last.get("rewards/accuracies", math.nan)
    acc_diff = train_acc - eval_acc  # NaN (no accuracies) compares False below
    loss_diff = current - train_loss
    if not (acc_diff > acc_gap or loss_diff > loss_gap):
        return None
    return Finding(
        "overfitting", "warning", step,
        f"eval loss rose from its best {best:.4f} to {current:.4f} while train pulls away "
        f"(accuracy train {train_acc:.2f} vs eval {eval_acc:.2f}, "
        f"loss train {train_loss:.4f} vs eval {current:.4f}): overfitting. Stop at the best "
        "eval with eval.early_stopping_metric=loss eval.early_stopping_mode=min "
        "(and eval.every_steps>0), or train fewer epochs / raise loss.beta",
    )  # fmt: skip
