"""DPO vs IPO on a handful of pairs: where do the chosen and rejected log-probs go?

The seed claim under test: "DPO drives the rejected response's probability towards 0 whatever β
is, while IPO's β controls where it converges". Why it should hold: DPO's loss −log σ(β·h) keeps
falling as the log-ratio margin h grows, so its optimum is h → ∞ and the easiest way there is to
push log π(y_r) down without end; β only rescales the gradient. IPO regresses the (per-token)
margin onto 1/(2β), so once it is reached the gradient is zero and the log-probs stop moving.

The experiment trains a tiny random Llama with prefopt's own loop (`prefopt.trainer.train`, full
fine-tune, frozen copy as reference) for many epochs over a few pairs, one optimizer step per
epoch (the batch is the whole set), for DPO (`sigmoid`) and IPO at several β, and reads
logps/chosen and logps/rejected (mean summed log-prob of the batch, before the step's update)
from each run's metrics.jsonl.

    python examples/dpo_vs_ipo.py                 # ~1 min on 2 idle CPU cores, ~15 min on busy ones
    python examples/dpo_vs_ipo.py --fast          # seconds (the test's version)
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from _common import (
    make_parser,
    make_tiny_model,
    markdown_table,
    quiet,
    setup,
    train_records,
    train_run,
    write_jsonl,
    write_result,
)

NAME = "dpo_vs_ipo"
PAIRS = [
    ("what is the capital of france ?", " paris .", " the moon ."),
    ("say hello", " hello ! nice to see you .", " no ."),
    ("is the sun hot ?", " yes , very hot .", " no , it is cold ."),
    ("tell me a story", " a cat saw the moon .", " no story ."),
]
LOSSES = {"sigmoid": "DPO", "ipo": "IPO"}


@dataclass
class Trajectory:
    """One run's per-epoch metrics."""

    loss: str
    beta: float
    chosen: list[float]
    rejected: list[float]
    margins: list[float]

    @property
    def label(self) -> str:
        return f"{LOSSES[self.loss]} β={self.beta:g}"

    def tail_change(self, series: list[float], frac: float = 0.25) -> float:
        """Change of `series` over its last `frac` of epochs."""
        k = max(1, int(len(series) * frac))
        return series[-1] - series[-1 - k]

    def ratio_margin(self) -> float:
        """The final log-ratio margin rewards/margins / β (IPO: per token; DPO: summed)."""
        return self.margins[-1] / self.beta

    def settled_epoch(self, tol: float = 0.05) -> int | None:
        """IPO: the first epoch from which h stays within `tol` (relative) of 1/(2β) to the
        end; None for DPO (no target) or if the last epoch is still outside."""
        if self.loss != "ipo":
            return None
        target = 1 / (2 * self.beta)
        inside = [abs(m / self.beta / target - 1) <= tol for m in self.margins]
        if not inside or not inside[-1]:
            return None
        first = len(inside)
        while first > 1 and inside[first - 2]:
            first -= 1
        return first  # 1-based: the metrics of epoch e are logged before its update


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = make_parser(NAME, __doc__.splitlines()[0] if __doc__ else NAME)
    p.add_argument("--betas", type=float, nargs="+", help="β values (default 0.1 0.5 1.0)")
    p.add_argument("--epochs", type=int, help="epochs per run (default 500; --fast 80)")
    p.add_argument("--lr", type=float, default=1e-3, help="constant AdamW learning rate")
    return p.parse_args(argv)


def run_one(
    args: argparse.Namespace, model: Path, data: Path, loss: str, beta: float, epochs: int
) -> Trajectory:
    """Train one (loss, β) and read its per-epoch log-probs back from metrics.jsonl."""
    run_dir = train_run(
        args.out / "runs" / f"{loss}-beta{beta:g}",
        [
            f"model.name_or_path={model}", f"data.train={data}", f"loss.name={loss}",
            f"loss.beta={beta}", f"optim.lr={args.lr}", "optim.warmup_ratio=0",
            "optim.scheduler=constant", f"train.batch_size={len(PAIRS)}", f"train.epochs={epochs}",
            "train.seed=0", "data.max_length=64",
        ],
        verbose=args.verbose,
    )  # fmt: skip
    return Trajectory(
        loss,
        beta,
        train_records(run_dir, "logps/chosen"),
        train_records(run_dir, "logps/rejected"),
        train_records(run_dir, "rewards/margins"),
    )


def plot(runs: list[Trajectory]) -> object:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = plt.get_cmap("viridis")
    betas = sorted({r.beta for r in runs})
    for r in runs:
        color = colors(betas.index(r.beta) / max(1, len(betas) - 1) * 0.85)
        style = "-" if r.loss == "sigmoid" else "--"
        epochs = range(1, len(r.rejected) + 1)
        axes[0].plot(epochs, r.rejected, style, color=color, label=r.label)
        axes[1].plot(epochs, r.chosen, style, color=color, label=r.label)
        if r.loss == "ipo":
            axes[2].plot(epochs, [m / r.beta for m in r.margins], style, color=color, label=r.label)
            axes[2].axhline(1 / (2 * r.beta), color=color, lw=0.8, ls=":")
    titles = [
        "rejected: mean log π(y_r|x)",
        "chosen: mean log π(y_c|x)",
        "IPO per-token log-ratio margin (dotted: 1/(2β))",
    ]
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[2].legend(fontsize=8)
    return fig


def report(runs: list[Trajectory], args: argparse.Namespace, epochs: int) -> str:
    rows = [
        (
            r.label, f"{r.chosen[0]:.2f}", f"{r.rejected[0]:.2f}", f"{r.rejected[-1]:.2f}",
            f"{r.tail_change(r.rejected):+.2f}", f"{r.chosen[-1]:.2f}",
            f"{r.tail_change(r.chosen):+.2f}", f"{r.ratio_margin():.2f}",
            f"{1 / (2 * r.beta):.2f}" if r.loss == "ipo" else "∞",
            "—" if r.settled_epoch() is None else str(r.settled_epoch()),
        )
        for r in runs
    ]  # fmt: skip
    table = markdown_table(
        ["run", "chosen @1", "rejected @1", f"rejected @{epochs}", "Δ rejected, last 25%",
         f"chosen @{epochs}", "Δ chosen, last 25%", "final margin h", "IPO target 1/(2β)",
         "h within 5% of target from epoch"],
        rows,
    )  # fmt: skip
    command = "python examples/dpo_vs_ipo.py " + " ".join(sys.argv[1:])
    return (
        f"Command: `{command.strip()}`\n\n"
        f"{len(PAIRS)} pairs, tiny random Llama (full fine-tune, frozen-copy reference), "
        f"{epochs} epochs of one full-batch step, AdamW lr {args.lr:g} constant. Log-probs are "
        "summed over response tokens and averaged over the pairs. The margin h is "
        "rewards/margins / β: summed log-ratio margin for DPO, per-token for IPO (which "
        "regresses it onto 1/(2β)). The last column is the first epoch from which the IPO "
        "margin stays within 5% of its target to the end (DPO has no target).\n\n" + table
    )


def main(argv: list[str] | None = None) -> list[Trajectory]:
    """Run the experiment; returns the trajectories (the test reads them)."""
    args = parse(argv)
    out = setup(args)
    betas = args.betas or ([0.5, 1.0] if args.fast else [0.1, 0.5, 1.0])
    epochs = args.epochs or (80 if args.fast else 500)
    words = {w for row in PAIRS for text in row for w in text.split()}
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS]
    data = write_jsonl(out / "pairs.jsonl", rows)
    with quiet(args.verbose):
        model = make_tiny_model(out / "tiny-model", words, hidden=32)
        runs = [run_one(args, model, data, loss, b, epochs) for loss in LOSSES for b in betas]
    write_result(out, "DPO vs IPO: log-prob trajectories", report(runs, args, epochs), plot(runs))
    for r in runs:
        print(
            f"{r.label:<12} rejected {r.rejected[0]:8.2f} -> {r.rejected[-1]:8.2f} "
            f"(last 25%: {r.tail_change(r.rejected):+7.2f})   chosen -> {r.chosen[-1]:8.2f}"
        )
    print(f"wrote {out / 'result.md'} and {out / 'result.png'}")
    return runs


if __name__ == "__main__":
    main()
