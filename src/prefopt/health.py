"""DPO health checks: spot the known failure modes of preference tuning while they happen.

`HealthMonitor` reads the same records that go to `metrics.jsonl` (one dict per train step or
evaluation) and returns a `Finding` the first time a problem shows, and again only after it has
cleared. It is pure Python, so it works live inside the training loop and afterwards on a saved
history (`check_history(read_metrics(out_dir))`).

Kinds of finding:
    displacement     chosen log-probs fall while margins grow: the policy lowers the chosen
                     response too, just less than the rejected one (likelihood displacement,
                     huggingface/trl#800; Razin et al. 2024).
    length_bias      the margin follows the chosen/rejected length gap.
    overfitting      train accuracy (or loss) pulls away from eval while eval loss rises.
    non_finite       a metric is NaN or ±Inf (written as strings like "nan" in metrics.jsonl).
    reference_drift  the reference model is not what it should be: at the start (see
                     `reference_check`), or it changed during training (each evaluation's
                     mean reference log-probs, `ref_logps/*`, compared with the first one's).

Per-pair length bias is judged on one evaluation's pairs: from `update_pairs`, or from an eval
record's `length/margin_corr` (which `evaluation.evaluate_dataset` computes over its pairs).
`summary()` also says when the overfitting check could not run (fewer than 3 evaluations).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from prefopt.series_stats import as_float, correlation, linear_fit
from prefopt.series_stats import metric_numbers as _numbers
from prefopt.series_stats import series_mean as _mean

Kind = Literal["displacement", "length_bias", "overfitting", "non_finite", "reference_drift"]
Severity = Literal["info", "warning", "error"]

SEVERITY_ORDER: dict[str, int] = {"error": 0, "warning": 1, "info": 2}
MIN_EVALS_FOR_OVERFITTING = 3
"""Evaluations the overfitting check needs: a best eval loss, then a later rise above it."""
__all__ = [
    "MIN_EVALS_FOR_OVERFITTING",
    "SEVERITY_ORDER",
    "Finding",
    "HealthMonitor",
    "as_float",
    "check_history",
    "linear_fit",
]


@dataclass(frozen=True)
class Finding:
    """One health problem.

    Attributes:
        kind: Which check raised it (see the module docstring).
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


class HealthMonitor:
    """Watches training records and reports DPO failure modes.

    Call `update(record)` with every record written to metrics.jsonl (train steps and evals, in
    order); it returns the findings that are new. A finding is reported once and then stays
    quiet until its condition has been false for `clear_after` consecutive checks, so a
    persistent problem does not flood the log. `summary()` lists everything found.

    Args:
        window: How many recent train records the trend checks (displacement, train accuracy
            for overfitting) look at.
        min_points: Train records needed in the window before trends are judged.
        displacement_slope: Chosen log-probs must fall faster than this (nats per step, fitted
            over the window of batch means) to count as displacement.
        displacement_eval_drop: On evals, chosen log-prob per token must have dropped this many
            nats below its first eval while the margin grew (a small drop is common in healthy
            DPO runs; 0.05 nats/token is 10 nats on a 200-token answer).
        trend_corr: |Pearson r| of a metric against the step needed to call its trend real
            rather than batch-to-batch noise.
        length_corr: |r| between the length gap (tokens/chosen - tokens/rejected) and the
            margin above which the margin is said to follow length.
        length_window: Train records the length check looks at.
        length_min_points: Records (or pairs, for `update_pairs`) needed for the length check.
        overfit_acc_gap: Train accuracy minus eval accuracy above this is a gap.
        overfit_loss_gap: Eval loss minus train loss above this is a gap.
        overfit_loss_rise: Eval loss must exceed its lowest value so far by more than this.
        reference_tolerance: Default max |Δ log π| (nats) for `reference_check`.
        reference_drift_tolerance: Largest relative change of an eval's mean reference
            log-prob (`ref_logps/chosen`, `ref_logps/rejected`) from the first evaluation's
            that still counts as the same reference. The eval set and its batches are fixed,
            so a frozen reference scores them the same every time; 1e-3 is 0.06 nats on a mean
            of -60, far above float noise and far below what a single training step moves.
        clear_after: Consecutive passing checks before a reported problem counts as cleared.
    """

    def __init__(
        self,
        *,
        window: int = 32,
        min_points: int = 12,
        displacement_slope: float = 0.01,
        displacement_eval_drop: float = 0.05,
        trend_corr: float = 0.5,
        length_corr: float = 0.5,
        length_window: int = 64,
        length_min_points: int = 20,
        overfit_acc_gap: float = 0.15,
        overfit_loss_gap: float = 0.3,
        overfit_loss_rise: float = 0.01,
        reference_tolerance: float = 1e-3,
        reference_drift_tolerance: float = 1e-3,
        clear_after: int = 3,
    ):
        self.window, self.min_points = window, min_points
        self.displacement_slope = displacement_slope
        self.displacement_eval_drop = displacement_eval_drop
        self.trend_corr, self.length_corr = trend_corr, length_corr
        self.length_min_points = length_min_points
        self.overfit_acc_gap, self.overfit_loss_gap = overfit_acc_gap, overfit_loss_gap
        self.overfit_loss_rise = overfit_loss_rise
        self.reference_tolerance = reference_tolerance
        self.reference_drift_tolerance = reference_drift_tolerance
        self.clear_after = clear_after
        self._train: deque[dict[str, float]] = deque(maxlen=max(window, length_window))
        self._length_window = length_window
        self._evals: list[dict[str, float]] = []
        self._step = 0
        self._passes: dict[tuple[str, str], int] = {}  # active (kind, source) -> passing checks
        self._found: list[Finding] = []

    # ----------------------------------------------------------------- public API

    def update(self, record: Mapping[str, Any]) -> list[Finding]:
        """Take one metrics record ({"step", "split", metric: value, ...}); new findings."""
        step = as_float(record.get("step"))
        if step is not None and math.isfinite(step):
            self._step = int(step)
        split = str(record.get("split", "train"))
        values = _numbers(record)
        new = self._judge("non_finite", split, self._non_finite(values, split))
        finite = {k: v for k, v in values.items() if math.isfinite(v)}
        finite["step"] = float(self._step)
        if split == "train":
            self._train.append(finite)
            new += self._judge("displacement", "train", self._displacement_train())
            new += self._judge("length_bias", "train", self._length_bias_records())
        elif split == "eval":
            self._evals.append(finite)
            new += self._judge("displacement", "eval", self._displacement_eval())
            new += self._judge("overfitting", "eval", self._overfitting())
            new += self._judge("reference_drift", "evals", self._reference_drift_eval())
            pairs = as_float(record.get("num_pairs"))
            r = finite.get("length/margin_corr")
            # At step 0 the margins are the reference's own (zero, or rounding noise when the
            # reference equals the policy): nothing has been learned yet to be biased.
            if r is not None and pairs is not None and self._step > 0:
                new += self._judge("length_bias", "pairs", self._length_r_finding(r, pairs))
        return new

    def update_pairs(
        self, pairs: Iterable[tuple[float, float]], step: int | None = None
    ) -> list[Finding]:
        """Length check on per-pair data: (len_diff, margin) for each pair of one evaluation.

        `len_diff` is chosen tokens minus rejected tokens and `margin` the pair's reward margin.
        Per-pair data shows length bias far more clearly than batch means.
        """
        if step is not None:
            self._step = step
        clean = [(float(d), float(m)) for d, m in pairs if math.isfinite(d) and math.isfinite(m)]
        finding = None
        if clean:
            diffs, margins = zip(*clean, strict=True)
            finding = self._length_r_finding(correlation(diffs, margins), len(clean))
        return self._judge("length_bias", "pairs", finding)

    def reference_check(
        self, max_abs_diff: float, expected_equal: bool, tolerance: float | None = None
    ) -> list[Finding]:
        """Judge a measured max |log π_ref - log π_policy| (nats) at the start of training.

        (A reference that changes later shows in the eval records: see `update`.)

        Args:
            max_abs_diff: Largest per-sequence difference measured on a batch.
            expected_equal: True when the reference should equal the starting policy (a copy,
                the adapter-disabled base, or cached log-probs of it); False when it is
                meant to be a different model.
            tolerance: Override of `reference_tolerance` (e.g. scaled for bf16).
        """
        tol = self.reference_tolerance if tolerance is None else tolerance
        finding = None
        if not math.isfinite(max_abs_diff):
            finding = self._finding(
                "reference_drift", "error", f"reference log-probs are {max_abs_diff}"
            )
        elif expected_equal and max_abs_diff > tol:
            finding = self._finding(
                "reference_drift", "error",
                f"the reference differs from the starting policy by {max_abs_diff:.3g} nats "
                f"(tolerance {tol:.3g}) although it should equal it: every reward is biased. "
                "Check that reference.model / the cache matches model.name_or_path "
                "(or delete reference.cache_dir)",
            )  # fmt: skip
        elif not expected_equal and max_abs_diff <= tol:
            finding = self._finding(
                "reference_drift", "warning",
                f"the reference is meant to be a different model but matches the policy "
                f"(max |Δ log π| = {max_abs_diff:.3g} nats): is reference.model the same "
                "checkpoint as model.name_or_path?",
            )  # fmt: skip
        return self._judge("reference_drift", "reference", finding)

    def summary(self) -> list[Finding]:
        """One finding per kind seen during the run, errors first.

        The latest message of each kind is kept (it carries the latest evidence); when a kind
        was raised more than once the message says since when and how often.
        """
        by_kind: dict[str, list[Finding]] = {}
        for f in self._found:
            by_kind.setdefault(f.kind, []).append(f)
        out = []
        for group in by_kind.values():
            last = group[-1]
            severity = min((f.severity for f in group), key=SEVERITY_ORDER.__getitem__)
            message = last.message
            if len(group) > 1:
                message += f" (raised {len(group)} times, first at step {group[0].step})"
            out.append(Finding(last.kind, severity, last.step, message))
        unchecked = self._overfitting_unchecked() if "overfitting" not in by_kind else None
        if unchecked is not None:
            out.append(unchecked)
        return sorted(out, key=lambda f: (SEVERITY_ORDER[f.severity], f.step))

    # ----------------------------------------------------------------- bookkeeping

    def _finding(self, kind: Kind, severity: Severity, message: str) -> Finding:
        return Finding(kind, severity, self._step, message)

    def _judge(self, kind: str, source: str, finding: Finding | None) -> list[Finding]:
        """Report `finding` if its (kind, source) is not already active; count passes."""
        key = (kind, source)
        if finding is not None:
            was_active = key in self._passes
            self._passes[key] = 0
            if was_active:
                return []
            self._found.append(finding)
            return [finding]
        if key in self._passes:
            self._passes[key] += 1
            if self._passes[key] >= self.clear_after:
                del self._passes[key]
        return []

    # ----------------------------------------------------------------- checks

    def _overfitting_unchecked(self) -> Finding | None:
        """An info note when too few evaluations were seen to judge overfitting: it needs a
        best eval loss and a later rise, so at least 3 evaluations."""
        n = len(self._evals)
        if n >= MIN_EVALS_FOR_OVERFITTING:
            return None
        if n == 0:
            why = "the run had no evaluation (no held-out data)"
            fix = "give held-out data (data.eval or data.eval_fraction) and set eval.every_steps"
        else:
            steps = ", ".join(str(int(e["step"])) for e in self._evals)
            why = f"only {n} evaluation{'s' if n > 1 else ''} (step {steps})"
            fix = "set eval.every_steps to about a fifth of the run's steps"
        return self._finding(
            "overfitting", "info",
            f"overfitting was not checked: {why}, and the check needs eval loss at "
            f"{MIN_EVALS_FOR_OVERFITTING} or more points (a best value, then a rise). To have "
            f"it checked, {fix}",
        )  # fmt: skip

    def _reference_drift_eval(self) -> Finding | None:
        """The latest eval's mean reference log-probs against the first eval's."""
        keys = ("ref_logps/chosen", "ref_logps/rejected")
        first = next((e for e in self._evals if any(k in e for k in keys)), None)
        last = self._evals[-1]
        if first is None or first is last:
            return None
        worst = None
        for key in (k for k in keys if k in first and k in last):
            change = abs(last[key] - first[key]) / max(1.0, abs(first[key]))
            if change > self.reference_drift_tolerance and (worst is None or change > worst[0]):
                worst = (change, key)
        if worst is None:
            return None
        key = worst[1]
        return self._finding(
            "reference_drift", "error",
            f"the reference changed during training: its mean {key} on the eval set moved from "
            f"{first[key]:.4f} (step {int(first['step'])}) to {last[key]:.4f} nats (relative "
            f"change {worst[0]:.3g}, tolerance {self.reference_drift_tolerance:.3g}). A frozen "
            "reference scores the same eval pairs the same every time: it is being trained or "
            "was rebuilt differently (e.g. after a resume), so rewards and loss are measured "
            "against a moving target",
        )  # fmt: skip

    def _non_finite(self, values: dict[str, float], split: str) -> Finding | None:
        bad = sorted(k for k, v in values.items() if not math.isfinite(v))
        if not bad:
            return None
        shown = ", ".join(f"{k}={values[k]}" for k in bad[:6]) + (" ..." if len(bad) > 6 else "")
        return self._finding(
            "non_finite", "error",
            f"non-finite {split} metrics: {shown}. Lower optim.lr, keep optim.max_grad_norm on, "
            "use float32/bf16 rather than fp16, and check the data rows of that step",
        )  # fmt: skip

    def _series(self, records: Iterable[dict[str, float]], *keys: str) -> list[list[float]]:
        rows = [r for r in records if all(k in r for k in keys)]
        return [[r[k] for r in rows] for k in keys]

    def _displacement_train(self) -> Finding | None:
        recent = list(self._train)[-self.window :]
        steps, chosen, margins = self._series(recent, "step", "logps/chosen", "rewards/margins")
        if len(steps) < self.min_points:
            return None
        c_slope, _, c_r = linear_fit(steps, chosen)
        m_slope, _, m_r = linear_fit(steps, margins)
        falling = c_slope < -self.displacement_slope and c_r <= -self.trend_corr
        if not (falling and m_slope > 0 and m_r >= self.trend_corr):
            return None
        return self._finding(
            "displacement", "warning",
            f"chosen log-probs fall ({c_slope:+.3g} nats/step, r={c_r:.2f}) while margins grow "
            f"({m_slope:+.3g}/step) over steps {int(steps[0])}-{int(steps[-1])}: likelihood "
            "displacement (the policy pushes the chosen responses down too). " + _DISPLACE_FIX,
        )  # fmt: skip

    def _displacement_eval(self) -> Finding | None:
        per_token = [
            (e["logps/chosen"] / e["tokens/chosen"], e["rewards/margins"])
            for e in self._evals
            if e.get("tokens/chosen", 0) > 0 and "logps/chosen" in e and "rewards/margins" in e
        ]
        if len(per_token) < 2:
            return None
        (c0, m0), (c1, m1) = per_token[0], per_token[-1]
        if not (c1 < c0 - self.displacement_eval_drop and m1 > m0):
            return None
        return self._finding(
            "displacement", "warning",
            f"eval chosen log-prob per token fell from {c0:.3f} to {c1:.3f} while the margin "
            f"grew from {m0:.3f} to {m1:.3f}: likelihood displacement. " + _DISPLACE_FIX,
        )  # fmt: skip

    def _length_bias_records(self) -> Finding | None:
        recent = list(self._train)[-self._length_window :]
        steps, tc, tr, margins = self._series(
            recent, "step", "tokens/chosen", "tokens/rejected", "rewards/margins"
        )
        if len(steps) < self.length_min_points:
            return None
        # Margins grow with training whatever the lengths; correlate the length gap with the
        # margin left over after the trend, or a steady trend would hide (or fake) the effect.
        slope, intercept, _ = linear_fit(steps, margins)
        residual = [m - (slope * s + intercept) for s, m in zip(steps, margins, strict=True)]
        diffs = [c - r for c, r in zip(tc, tr, strict=True)]
        return self._length_finding(diffs, residual, "train batches")

    def _length_finding(
        self, diffs: list[float], margins: list[float], source: str
    ) -> Finding | None:
        return self._length_message(correlation(diffs, margins), f"{len(diffs)} {source}")

    def _length_r_finding(self, r: float, pairs: float) -> Finding | None:
        """Length bias from per-pair data: Pearson r of length gap and margin over `pairs`."""
        if pairs < self.length_min_points:
            return None
        return self._length_message(r, f"{int(pairs)} pairs")

    def _length_message(self, r: float, over: str) -> Finding | None:
        if abs(r) <= self.length_corr:
            return None
        side = "longer" if r > 0 else "shorter"
        return self._finding(
            "length_bias", "warning",
            f"the reward margin follows the length gap (r={r:.2f}, r²={r * r:.2f} over "
            f"{over}): the policy may be learning to prefer the {side} "
            "response rather than the better one. Try a length-normalised loss "
            "(loss.name=simpo) or balance chosen/rejected lengths in the data",
        )  # fmt: skip

    def _overfitting(self) -> Finding | None:
        losses = [e["loss"] for e in self._evals if "loss" in e]
        recent = list(self._train)[-self.window :]
        if len(losses) < 2 or not recent:
            return None
        current, best = losses[-1], min(losses[:-1])
        if current <= best + self.overfit_loss_rise:
            return None
        last = self._evals[-1]
        train_acc = _mean(r["rewards/accuracies"] for r in recent if "rewards/accuracies" in r)
        train_loss = _mean(r["loss"] for r in recent if "loss" in r)
        eval_acc = last.get("rewards/accuracies", math.nan)
        acc_gap = train_acc - eval_acc  # NaN (no accuracies) compares False below
        loss_gap = current - train_loss
        if not (acc_gap > self.overfit_acc_gap or loss_gap > self.overfit_loss_gap):
            return None
        return self._finding(
            "overfitting", "warning",
            f"eval loss rose from its best {best:.4f} to {current:.4f} while train pulls away "
            f"(accuracy train {train_acc:.2f} vs eval {eval_acc:.2f}, "
            f"loss train {train_loss:.4f} vs eval {current:.4f}): overfitting. Stop at the best "
            "eval with eval.early_stopping_metric=loss eval.early_stopping_mode=min "
            "(and eval.every_steps>0), or train fewer epochs / raise loss.beta",
        )  # fmt: skip


_DISPLACE_FIX = (
    "Add an NLL term on the chosen responses (loss.name=[sigmoid, sft]) or lower optim.lr"
)


def check_history(
    records: Iterable[Mapping[str, Any]], monitor: HealthMonitor | None = None
) -> list[Finding]:
    """Run a monitor over a saved history (e.g. `read_metrics(out_dir)`); its summary."""
    monitor = monitor or HealthMonitor()
    for record in records:
        monitor.update(record)
    return monitor.summary()
