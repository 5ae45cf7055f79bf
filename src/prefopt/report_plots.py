"""PNG plots of a run's metrics for the HTML report (matplotlib, no display needed).

Train curves are batch means and noisy: each is drawn as faint raw points plus a smoothed line
(a two-sided exponential moving average, EMA). Eval points are exact values on a fixed set:
drawn as markers joined by a dashed line, in the same colour as the train curve of that metric.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from prefopt.health import as_float

TRAIN_COLOR, EVAL_COLOR = "#1f77b4", "#ff7f0e"
CHOSEN, REJECTED, MARGIN = "#2e7d32", "#c62828", "#1565c0"


@dataclass(frozen=True)
class Series:
    """One metric on a plot: its key in the records, legend label and colour."""

    key: str
    label: str
    color: str


@dataclass(frozen=True)
class PlotSpec:
    """One PNG: file name, title, y-axis label and the metrics it shows."""

    name: str
    title: str
    ylabel: str
    series: tuple[Series, ...]
    smooth: bool = True
    eval_too: bool = True
    hlines: tuple[tuple[float, str], ...] = field(default=())


def _one(key: str) -> tuple[Series, ...]:
    return (Series(key, "", TRAIN_COLOR),)


PLOTS: tuple[PlotSpec, ...] = (
    PlotSpec("loss", "Loss", "loss", _one("loss")),
    PlotSpec(
        "rewards",
        "Implicit rewards  β·log(π/π_ref)",
        "reward",
        (
            Series("rewards/chosen", "chosen", CHOSEN),
            Series("rewards/rejected", "rejected", REJECTED),
            Series("rewards/margins", "margin", MARGIN),
        ),
        hlines=((0.0, ""),),
    ),  # fmt: skip
    PlotSpec(
        "accuracies",
        "Reward accuracy (chosen reward > rejected)",
        "accuracy",
        _one("rewards/accuracies"),
        hlines=((0.5, "chance"),),
    ),  # fmt: skip
    PlotSpec(
        "logps",
        "Policy log-probs (sum over response tokens)",
        "log-prob (nats)",
        (Series("logps/chosen", "chosen", CHOSEN), Series("logps/rejected", "rejected", REJECTED)),
    ),  # fmt: skip
    PlotSpec("lr", "Learning rate", "learning rate", _one("lr"), smooth=False, eval_too=False),
    PlotSpec(
        "grad_norm",
        "Gradient norm (before clipping)",
        "L2 norm",
        _one("grad_norm"),
        eval_too=False,
    ),  # fmt: skip
    PlotSpec("tokens_per_s", "Throughput", "tokens / s", _one("tokens_per_s"), eval_too=False),
)


def ema(values: Sequence[float], weight: float) -> list[float]:
    """Debiased exponential moving average (as TensorBoard draws it); NaN points are skipped.

    A NaN input yields the current average (or NaN before the first finite value), so one bad
    step neither breaks the line nor poisons everything after it.
    """
    out, avg, norm = [], 0.0, 0.0
    for v in values:
        if math.isfinite(v):
            avg = weight * avg + (1 - weight) * v
            norm = weight * norm + (1 - weight)
        out.append(avg / norm if norm > 0 else math.nan)
    return out


def smooth(values: Sequence[float], weight: float) -> list[float]:
    """Two-sided EMA: each point is the weight^|i-j|-weighted mean of all finite points j.

    A one-way EMA lags behind a steep curve (early DPO margins); the report is drawn after the
    fact, so a symmetric kernel can be used, which has no lag. Near the ends the kernel simply
    has fewer points, so the line does not jump to the last (noisy) value. NaN points get no
    weight; a point with no finite value in reach stays NaN.
    """
    mask = [1.0 if math.isfinite(v) else 0.0 for v in values]
    xs = [v if m else 0.0 for v, m in zip(values, mask, strict=True)]
    num = _two_sided_sum(xs, weight)
    den = _two_sided_sum(mask, weight)
    return [n / d if d > 1e-12 else math.nan for n, d in zip(num, den, strict=True)]


def _two_sided_sum(xs: Sequence[float], weight: float) -> list[float]:
    """s_i = Σ_j weight^|i-j| x_j in O(n): a forward and a backward running sum."""
    forward, acc = [], 0.0
    for x in xs:
        acc = weight * acc + x
        forward.append(acc)
    backward, acc = [0.0] * len(xs), 0.0
    for i in range(len(xs) - 1, -1, -1):
        acc = weight * acc + xs[i]
        backward[i] = acc
    return [f + b - x for f, b, x in zip(forward, backward, xs, strict=True)]  # x_i counted twice


def ema_weight(n: int) -> float:
    """Smoothing for n points: the average spans about √n points (capped at 50).

    Short runs keep most of their detail; long runs get a steady line that still follows
    changes within a few percent of the run.
    """
    span = min(50.0, max(1.0, math.sqrt(n)))
    return 1 - 2 / (span + 1)


def points(records: Sequence[dict[str, Any]], split: str, key: str) -> tuple[list, list]:
    """(steps, values) of one metric in one split; "nan"/"inf" strings become floats."""
    xs, ys = [], []
    for r in records:
        if r.get("split", "train") != split or key not in r:
            continue
        step, value = as_float(r.get("step")), as_float(r[key])
        if step is not None and value is not None:
            xs.append(step)
            ys.append(value)
    return xs, ys


def non_finite_steps(records: Sequence[dict[str, Any]]) -> list[float]:
    """Steps of train records with a non-finite loss (marked on the loss plot)."""
    xs, ys = points(records, "train", "loss")
    return [x for x, y in zip(xs, ys, strict=True) if not math.isfinite(y)]


def write_plots(
    records: Sequence[dict[str, Any]], folder: Path, *, max_grad_norm: float | None = None
) -> list[tuple[str, str]]:
    """Write every plot that has data into `folder`; [(file name, title)] in report order."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for spec in PLOTS:
        if spec.name == "grad_norm" and max_grad_norm:
            spec = replace(spec, hlines=((max_grad_norm, "optim.max_grad_norm"),))
        height = 4.5 if len(spec.series) > 1 else 4.0  # room for the legend underneath
        fig = Figure(figsize=(7.2, height), dpi=110, layout="constrained")
        ax = fig.subplots()
        if not _draw(ax, spec, records):
            continue
        fig.savefig(folder / f"{spec.name}.png")
        written.append((f"{spec.name}.png", spec.title))
    return written


def _draw(ax: Any, spec: PlotSpec, records: Sequence[dict[str, Any]]) -> bool:
    """Draw one plot; False when none of its metrics has a finite value."""
    drawn = False
    multi = len(spec.series) > 1
    for s in spec.series:
        train_color = s.color if multi else TRAIN_COLOR
        eval_color = s.color if multi else EVAL_COLOR
        drawn |= _train_curve(ax, spec, s, train_color, records, multi)
        if spec.eval_too:
            drawn |= _eval_curve(ax, s, eval_color, records, multi)
    if not drawn:
        return False
    for y, label in spec.hlines:
        ax.axhline(y, color="#777777", lw=0.8, ls=":", label=label or None)
    if spec.name == "loss":
        for i, x in enumerate(non_finite_steps(records)[:50]):
            ax.axvline(x, color="#c62828", lw=0.8, alpha=0.6, label=None if i else "non-finite")
    _style(ax, spec)
    return True


def _train_curve(
    ax: Any, spec: PlotSpec, s: Series, color: str, records: Sequence[dict[str, Any]], multi: bool
) -> bool:
    xs, ys = points(records, "train", s.key)
    if not any(math.isfinite(y) for y in ys):
        return False
    name = f"{s.label} (train)" if multi else "train"
    if not spec.smooth:
        ax.plot(xs, ys, color=color, lw=1.6, marker="o" if len(xs) == 1 else None, label=name)
        return True
    raw_alpha = 0.25 if len(xs) > 200 else 0.5
    finite = [(x, y) for x, y in zip(xs, ys, strict=True) if math.isfinite(y)]
    if len(xs) > 1:  # one point: the line's marker alone says it
        raw = "train, per step" if not multi else None
        ax.scatter(
            *zip(*finite, strict=True), s=9, color=color, alpha=raw_alpha, linewidths=0, label=raw
        )
    line = smooth(ys, ema_weight(len(ys)))
    ax.plot(xs, line, color=color, lw=1.8, marker="o" if len(xs) == 1 else None,
            label=f"{name}, smoothed" if len(xs) > 1 else name)  # fmt: skip
    return True


def _eval_curve(
    ax: Any, s: Series, color: str, records: Sequence[dict[str, Any]], multi: bool
) -> bool:
    xs, ys = points(records, "eval", s.key)
    if not any(math.isfinite(y) for y in ys):
        return False
    name = f"{s.label} (eval)" if multi else "eval"
    ax.plot(xs, ys, color=color, lw=1.4, ls="--", marker="o", ms=5, mfc="white", mew=1.5,
            label=name, zorder=3)  # fmt: skip
    return True


def _style(ax: Any, spec: PlotSpec) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_title(spec.title, fontsize=11)
    ax.set_xlabel("step")
    ax.set_ylabel(spec.ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    x0, x1 = ax.dataLim.x0, ax.dataLim.x1
    if x1 - x0 < 2:  # one or two steps: widen, or the integer ticks become 0.945, 0.96, ...
        ax.set_xlim(x0 - 1, x1 + 1)
    ax.grid(True, alpha=0.3)
    if spec.name == "accuracies":
        ax.set_ylim(-0.03, 1.03)
    if spec.name == "lr":
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    handles, _ = ax.get_legend_handles_labels()
    if len(handles) > 1 or spec.eval_too:  # a lone lr line needs no legend
        # ncol = number of series: the legend reads as columns "chosen | rejected | margin"
        # with train above eval.
        if len(spec.series) > 1:  # six entries would cover the curves: put them underneath
            ax.legend(fontsize=8, frameon=False, ncol=len(spec.series), loc="upper center",
                      bbox_to_anchor=(0.5, -0.14))  # fmt: skip
        else:
            ax.legend(fontsize=8, frameon=False, loc="best")
