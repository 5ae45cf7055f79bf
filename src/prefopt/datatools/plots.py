"""The audit's PNG: length histograms of prompt / chosen / rejected, and of the length gap."""

from __future__ import annotations

from pathlib import Path

from prefopt.datatools.audit import AuditReport

__all__ = ["plot_lengths"]

_COLORS = {"prompt": "#607d8b", "chosen": "#2e7d32", "rejected": "#c62828"}


def plot_lengths(report: AuditReport, path: str | Path) -> Path:
    """Write the audit's length histograms to `path` (PNG, Agg backend, no display needed).

    Left: prompt, chosen and rejected lengths, with max_length marked. Right: chosen minus
    rejected length per pair, with 0 marked (mass to the right of 0 is length bias).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend

    fig = Figure(figsize=(11, 4), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    lengths = list(report.lengths.values())
    series = {
        name: [v[i] for v in lengths] for i, name in enumerate(("prompt", "chosen", "rejected"))
    }
    # What max_length is compared with: the prompt plus the longer response.
    series["prompt + longer"] = [p + max(c, r) for p, c, r in lengths]
    top = max(series["prompt + longer"], default=1)
    bins = [top * i / 40 for i in range(41)]  # shared bins: the curves stay comparable
    for name, values in series.items():
        left.hist(
            values,
            bins=bins,
            histtype="step",
            linewidth=1.5,
            label=name,
            color=_COLORS.get(name, "black"),
            linestyle="-" if name in _COLORS else ":",
        )
    if report.max_length <= 1.5 * top:
        left.axvline(
            report.max_length,
            color="black",
            linestyle="--",
            linewidth=1,
            label=f"max_length {report.max_length}",
        )
    else:  # a far-away line would squash the histograms into a corner
        left.plot([], [], " ", label=f"max_length {report.max_length} (off the right edge)")
    left.set_xlabel(f"length ({report.unit})")
    left.set_ylabel("rows")
    left.set_title(f"{Path(report.source).name}: lengths")
    left.legend()
    gaps = [c - r for _, c, r in lengths]
    right.hist(gaps, bins=40, color="#1565c0")
    right.axvline(0, color="black", linewidth=1)
    share = report.length_bias().get("share_chosen_longer")
    longer = "all tie" if share is None else f"chosen longer in {share:.0%} of unequal"
    right.set_title(f"chosen - rejected ({report.unit}); {longer}")
    right.set_xlabel(f"length gap ({report.unit})")
    right.set_ylabel("pairs")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out
