"""Bradley–Terry on simulated comparisons: are the strengths recovered, and do more epochs
widen the gaps?

Models with known log-strengths θ play random pairwise games, model a beating model b with
probability σ(θ_a − θ_b); `prefopt.winrate.bradley_terry` (the fit behind `prefopt judge
--models`) then estimates the strengths from the outcomes.

1. Recovery: fitted vs true log-strengths for a large sample, and the rank correlation and error
   as the number of games grows.
2. "More training epochs widen the gaps" (the seed claim, read as overfitting). bradley_terry
   fits by minorise–maximise (MM) iterations starting from equal strengths; each iteration is
   one full pass over the comparisons, i.e. one epoch of full-batch fitting. On a *small* sample
   the fit is stopped after 1, 2, 5, ... iterations, with the pseudo-count prior (virtual ties
   per compared pair) nearly off, at the library default, and strong. Measured: the spread
   (std) of fitted log-strengths against the truth's, and the excess held-out loss, i.e. the
   KL(true ‖ fitted) of the win probabilities averaged over all pairs (exact, no test sample).

    python examples/bradley_terry_sim.py          # ~30 s
    python examples/bradley_terry_sim.py --fast   # ~2 s (the test's version)
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
from dataclasses import dataclass

from _common import make_parser, markdown_table, pearson, setup, spearman, write_result

from prefopt.winrate import bradley_terry

NAME = "bradley_terry_sim"
Comparison = tuple[str, str, float]


@dataclass
class Sizes:
    """How big each part is (full vs --fast)."""

    models: int
    recovery_games: int
    curve_games: list[int]
    small_games: int
    replicates: int
    iterations: list[int]
    priors: list[float]


FULL = Sizes(
    8, 5000, [50, 100, 200, 500, 1000, 2000, 5000], 60, 40,
    [1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000, 2000], [0.001, 0.1, 1.0],
)  # fmt: skip
FAST = Sizes(6, 1000, [50, 500], 40, 6, [1, 5, 20, 100, 500], [0.001, 1.0])


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = make_parser(NAME, "Bradley–Terry on simulated comparisons")
    p.add_argument("--seed", type=int, default=0, help="simulation seed")
    p.add_argument("--spread", type=float, default=1.5, help="true log-strengths span ±SPREAD")
    return p.parse_args(argv)


def true_strengths(k: int, spread: float) -> dict[str, float]:
    """k models with log-strengths evenly spaced in [−spread, spread] (mean 0)."""
    return {f"m{i}": spread * (2 * i / (k - 1) - 1) for i in range(k)}


def simulate(theta: dict[str, float], n: int, rng: random.Random) -> list[Comparison]:
    """n games between uniformly random distinct pairs, outcomes drawn from the BT model."""
    names = list(theta)
    games: list[Comparison] = []
    for _ in range(n):
        a, b = rng.sample(names, 2)
        p_a = 1 / (1 + math.exp(theta[b] - theta[a]))
        games.append((a, b, 1.0 if rng.random() < p_a else 0.0))
    return games


def fitted_logs(games: list[Comparison], names: list[str], **kwargs: float) -> list[float]:
    """Fitted log-strengths (mean 0) in the order of `names`."""
    fit = bradley_terry(games, **kwargs)  # type: ignore[arg-type]
    return [math.log(fit[n]) for n in names]


def excess_loss(true: list[float], fit: list[float]) -> float:
    """Mean over all pairs of KL(Bernoulli(true win prob) ‖ Bernoulli(fitted win prob)), nats:
    the expected held-out log-loss of the fit minus the truth's own, for random pairs."""
    total, pairs = 0.0, 0
    for i in range(len(true)):
        for j in range(i + 1, len(true)):
            p = 1 / (1 + math.exp(true[j] - true[i]))
            q = 1 / (1 + math.exp(fit[j] - fit[i]))
            total += p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
            pairs += 1
    return total / pairs


def mle_exists(games: list[Comparison], names: list[str]) -> bool:
    """Whether the plain (prior 0) maximum-likelihood BT fit exists: Zermelo/Ford's condition
    that the "a beat b" graph is strongly connected, i.e. no group of models never lost to the
    rest. Without it the MLE pushes that group's strengths apart from the rest without end."""
    beat: dict[str, set[str]] = {n: set() for n in names}
    lost: dict[str, set[str]] = {n: set() for n in names}
    for a, b, outcome in games:
        winner, loser = (a, b) if outcome > 0.5 else (b, a)
        beat[winner].add(loser)
        lost[loser].add(winner)

    def reaches_all(edges: dict[str, set[str]]) -> bool:
        seen, todo = {names[0]}, [names[0]]
        while todo:
            for nxt in edges[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return len(seen) == len(names)

    return reaches_all(beat) and reaches_all(lost)


def rmse(a: list[float], b: list[float]) -> float:
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b, strict=True)) / len(a))


@dataclass
class Recovery:
    """Part 1's numbers."""

    true: list[float]
    fit: list[float]
    spearman: float
    pearson: float
    rmse: float
    curve: list[tuple[int, float, float]]  # (games, mean Spearman, mean RMSE)


def recovery(theta: dict[str, float], sizes: Sizes, rng: random.Random) -> Recovery:
    names, true = list(theta), list(theta.values())
    fit = fitted_logs(simulate(theta, sizes.recovery_games, rng), names)
    curve = []
    for n in sizes.curve_games:
        fits = [fitted_logs(simulate(theta, n, rng), names) for _ in range(sizes.replicates)]
        rho = statistics.fmean(spearman(true, f) for f in fits)
        curve.append((n, rho, statistics.fmean(rmse(true, f) for f in fits)))
    return Recovery(true, fit, spearman(true, fit), pearson(true, fit), rmse(true, fit), curve)


@dataclass
class EpochCurve:
    """Part 2's numbers for one prior: per iteration count, mean spread and excess loss."""

    prior: float
    spread: list[float]
    excess: list[float]
    no_mle: int  # samples on which the plain maximum-likelihood fit does not exist


def epochs_effect(theta: dict[str, float], sizes: Sizes, rng: random.Random) -> list[EpochCurve]:
    """Stop MM after t iterations (tol=0: exactly t) on small samples, per prior."""
    names, true = list(theta), list(theta.values())
    samples = [simulate(theta, sizes.small_games, rng) for _ in range(sizes.replicates)]
    no_mle = sum(not mle_exists(s, names) for s in samples)
    curves = []
    for prior in sizes.priors:
        spread, excess = [], []
        for t in sizes.iterations:
            fits = [fitted_logs(s, names, iters=t, prior=prior, tol=0.0) for s in samples]
            spread.append(statistics.fmean(statistics.pstdev(f) for f in fits))
            excess.append(statistics.fmean(excess_loss(true, f) for f in fits))
        curves.append(EpochCurve(prior, spread, excess, no_mle))
    return curves


def plot(rec: Recovery, curves: list[EpochCurve], sizes: Sizes, true_spread: float) -> object:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    ax.scatter(rec.true, rec.fit, color="C0")
    low, high = min(rec.true + rec.fit), max(rec.true + rec.fit)
    ax.plot([low, high], [low, high], "k:", lw=1, label="y = x")
    ax.set(xlabel="true log-strength", ylabel="fitted log-strength")
    ax.set_title(
        f"recovery, {sizes.recovery_games} games (Spearman {rec.spearman:.3f})", fontsize=10
    )
    ax.legend(fontsize=8)
    for c in curves:
        axes[1].plot(sizes.iterations, c.spread, marker="o", ms=3, label=f"prior {c.prior:g}")
        axes[2].plot(sizes.iterations, c.excess, marker="o", ms=3, label=f"prior {c.prior:g}")
    axes[1].axhline(true_spread, color="k", ls=":", lw=1, label="true spread")
    axes[1].set(xscale="log", xlabel="MM iterations (epochs)", ylabel="std of log-strengths")
    axes[1].set_title(f"spread, {sizes.small_games}-game samples (mean of "
                      f"{sizes.replicates})", fontsize=10)  # fmt: skip
    axes[2].set(xscale="log", yscale="log", xlabel="MM iterations (epochs)",
                ylabel="KL(true ‖ fit), nats/comparison")  # fmt: skip
    axes[2].set_title("excess held-out loss", fontsize=10)
    for a in axes:
        a.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    axes[2].legend(fontsize=8)
    return fig


def report(
    rec: Recovery, curves: list[EpochCurve], sizes: Sizes, true_spread: float, seed: int
) -> str:
    command = "python examples/bradley_terry_sim.py " + " ".join(sys.argv[1:])
    part1 = markdown_table(
        ["games", "mean Spearman", "mean RMSE of log-strengths"],
        [(n, rho, err) for n, rho, err in rec.curve],
    )
    part2 = markdown_table(
        ["MM iterations", *(f"spread, prior {c.prior:g}" for c in curves),
         *(f"KL, prior {c.prior:g}" for c in curves)],
        [(t, *(f"{c.spread[i]:.3f}" for c in curves), *(f"{c.excess[i]:.4f}" for c in curves))
         for i, t in enumerate(sizes.iterations)],
    )  # fmt: skip
    best = [(c.prior, sizes.iterations[c.excess.index(min(c.excess))]) for c in curves]
    no_mle = curves[0].no_mle if curves else 0
    return f"""Command: `{command.strip()}` (seed {seed})

{sizes.models} models, true log-strengths evenly spaced, std {true_spread:.3f}.

**Recovery** ({sizes.recovery_games} games, prior 0.1): Spearman {rec.spearman:.3f}, Pearson
{rec.pearson:.3f}, RMSE {rec.rmse:.3f}. Averaged over {sizes.replicates} samples per size:

{part1}

**Epochs** ({sizes.small_games}-game samples, mean over {sizes.replicates}; spread = std of the
fitted log-strengths, KL = excess held-out loss). Iterations with the lowest KL per prior:
{", ".join(f"prior {p:g}: {t}" for p, t in best)}. On {no_mle} of the {sizes.replicates} samples
the plain maximum-likelihood fit (prior 0) does not exist: some group of models never lost to
the rest (the "beat" graph is not strongly connected).

{part2}
"""


def main(argv: list[str] | None = None) -> tuple[Recovery, list[EpochCurve]]:
    """Run both parts; returns their numbers (the test reads them)."""
    args = parse(argv)
    out = setup(args)
    sizes = FAST if args.fast else FULL
    rng = random.Random(args.seed)
    theta = true_strengths(sizes.models, args.spread)
    true_spread = statistics.pstdev(theta.values())
    rec = recovery(theta, sizes, rng)
    curves = epochs_effect(theta, sizes, rng)
    body = report(rec, curves, sizes, true_spread, args.seed)
    write_result(out, "Bradley–Terry on simulated comparisons", body,
                 plot(rec, curves, sizes, true_spread))  # fmt: skip
    n = sizes.recovery_games
    print(f"recovery: Spearman {rec.spearman:.3f}, RMSE {rec.rmse:.3f} ({n} games)")
    for c in curves:
        print(
            f"prior {c.prior:<6g} spread after {sizes.iterations[0]} / {sizes.iterations[-1]} "
            f"iterations: {c.spread[0]:.3f} / {c.spread[-1]:.3f} (true {true_spread:.3f}); "
            f"KL {c.excess[0]:.4f} / {c.excess[-1]:.4f}"
        )
    print(f"wrote {out / 'result.md'} and {out / 'result.png'}")
    return rec, curves


if __name__ == "__main__":
    main()
