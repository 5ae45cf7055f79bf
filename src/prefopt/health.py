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
The checks themselves are pure functions in `health_checks`; this module keeps the state.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

from prefopt import health_checks as checks
from prefopt.health_checks import (
    MIN_EVALS_FOR_OVERFITTING,
    SEVERITY_ORDER,
    Finding,
    Kind,
    Severity,
)
from prefopt.series_stats import as_float, correlation, linear_fit
from prefopt.series_stats import metric_numbers as _numbers

__all__ = [
    "MIN_EVALS_FOR_OVERFITTING",
    "SEVERITY_ORDER",
    "Finding",
    "HealthMonitor",
    "Kind",
    "Severity",
    "as_float",
    "check_history",
    "linear_fit",
]


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
        new = self._judge("non_finite", split, checks.non_finite(values, split, self._step))
        finite = {k: v for k, v in values.items() if math.isfinite(v)}
        finite["step"] = float(self._step)
        if split == "train":
            self._train.append(finite)
            new += self._judge("displacement", "train", self._displacement_train())
            new += self._judge("length_bias", "train", self._length_bias_train())
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
                new += self._judge("length_bias", "pairs", self._length_bias_pairs(r, pairs))
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
            finding = self._length_bias_pairs(correlation(diffs, margins), len(clean))
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
        finding = checks.reference_start(max_abs_diff, expected_equal, tol, self._step)
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
        if "overfitting" not in by_kind:
            unchecked = checks.overfitting_unchecked(self._evals, self._step)
            if unchecked is not None:
                out.append(unchecked)
        return sorted(out, key=lambda f: (SEVERITY_ORDER[f.severity], f.step))

    # ----------------------------------------------------------------- bookkeeping

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

    # ----------------------------------------------------------------- checks on the state

    def _displacement_train(self) -> Finding | None:
        return checks.displacement_train(
            list(self._train)[-self.window :],
            self._step,
            min_points=self.min_points,
            slope=self.displacement_slope,
            trend_corr=self.trend_corr,
        )

    def _displacement_eval(self) -> Finding | None:
        return checks.displacement_eval(
            self._evals, self._step, eval_drop=self.displacement_eval_drop
        )

    def _length_bias_train(self) -> Finding | None:
        return checks.length_bias_train(
            list(self._train)[-self._length_window :],
            self._step,
            min_points=self.length_min_points,
            corr=self.length_corr,
        )

    def _length_bias_pairs(self, r: float, pairs: float) -> Finding | None:
        return checks.length_bias_pairs(
            r, pairs, self._step, min_points=self.length_min_points, corr=self.length_corr
        )

    def _overfitting(self) -> Finding | None:
        return checks.overfitting(
            self._evals,
            list(self._train)[-self.window :],
            self._step,
            loss_rise=self.overfit_loss_rise,
            acc_gap=self.overfit_acc_gap,
            loss_gap=self.overfit_loss_gap,
        )

    def _reference_drift_eval(self) -> Finding | None:
        return checks.reference_drift(
            self._evals, self._step, tolerance=self.reference_drift_tolerance
        )


def check_history(
    records: Iterable[Mapping[str, Any]], monitor: HealthMonitor | None = None
) -> list[Finding]:
    """Run a monitor over a saved history (e.g. `read_metrics(out_dir)`); its summary."""
    monitor = monitor or HealthMonitor()
    for record in records:
        monitor.update(record)
    return monitor.summary()
