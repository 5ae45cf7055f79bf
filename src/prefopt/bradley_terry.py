"""Bradley–Terry ranking of several models from pairwise judge outcomes.

Under Bradley–Terry, P(a beats b) = p_a / (p_a + p_b) for positive strengths p. Ties count as half
a win for each side. Strengths are fitted by minorise–maximise (Hunter 2004); they are identified
only up to a common factor, so they are normalised to a geometric mean of 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import combinations

import torch

__all__ = ["Comparison", "bradley_terry", "format_ranking", "pairwise_comparisons"]

Comparison = tuple[str, str, float]
"""(a, b, outcome): 1.0 if a won, 0.0 if b won, 0.5 for a tie."""


def pairwise_comparisons(
    scores: Mapping[str, Sequence[float]], tie_eps: float = 0.0
) -> list[Comparison]:
    """Every pair of models compared on every prompt: scores[name][i] is model name's score on
    prompt i (all models scored on the same prompts)."""
    lengths = {len(v) for v in scores.values()}
    if len(lengths) > 1:
        raise ValueError(f"models were scored on different numbers of prompts: {lengths}")
    out: list[Comparison] = []
    for a, b in combinations(scores, 2):
        for sa, sb in zip(scores[a], scores[b], strict=True):
            out.append((a, b, 0.5 if abs(sa - sb) <= tie_eps else float(sa > sb)))
    return out


def _check_connected(names: list[str], pairs: set[tuple[int, int]]) -> None:
    """Raise unless every model is linked to every other through a chain of comparisons."""
    reached, frontier = {0}, [0]
    while frontier:
        i = frontier.pop()
        for a, b in pairs:
            for x, y in ((a, b), (b, a)):
                if x == i and y not in reached:
                    reached.add(y)
                    frontier.append(y)
    if len(reached) < len(names):
        missing = sorted(names[i] for i in set(range(len(names))) - reached)
        raise ValueError(f"models {missing} were never compared (directly or not) with the rest")


def bradley_terry(
    comparisons: Sequence[Comparison],
    iters: int = 1000,
    *,
    prior: float = 0.1,
    tol: float = 1e-10,
) -> dict[str, float]:
    """Fit Bradley–Terry strengths, P(a beats b) = p_a / (p_a + p_b), by MM (Hunter 2004).

    The minorise–maximise update p_i ← W_i / Σ_j n_ij / (p_i + p_j) (W_i: i's wins, a tie counting
    half; n_ij: comparisons of i and j) raises the likelihood at every step. `prior` adds that many
    virtual ties to every pair that was compared, so a model that never (or always) won still
    gets a finite strength; its pull vanishes as real comparisons accumulate.

    Args:
        comparisons: (a, b, outcome) triples.
        iters: Maximum MM iterations.
        prior: Virtual ties per compared pair (>= 0; 0 is the plain maximum likelihood, which
            does not exist when some model never wins or never loses).
        tol: Stop when no log-strength moves by more than this.

    Returns:
        name -> strength p, normalised so the log-strengths have mean 0 (geometric mean 1),
        in descending order of strength.
    """
    names: list[str] = []
    index: dict[str, int] = {}
    for a, b, _ in comparisons:
        for x in (a, b):
            if x not in index:
                index[x] = len(names)
                names.append(x)
    if len(names) < 2:
        raise ValueError("Bradley–Terry needs comparisons between at least two models")
    if prior < 0:
        raise ValueError(f"prior must be >= 0, got {prior}")
    k = len(names)
    wins = torch.zeros(k, dtype=torch.float64)
    counts = torch.zeros(k, k, dtype=torch.float64)  # n_ij, symmetric
    pairs: set[tuple[int, int]] = set()
    for a, b, outcome in comparisons:
        i, j = index[a], index[b]
        if i == j or outcome not in (0.0, 0.5, 1.0):
            raise ValueError(f"bad comparison ({a!r}, {b!r}, {outcome!r})")
        wins[i] += outcome
        wins[j] += 1.0 - outcome
        counts[i, j] += 1
        counts[j, i] += 1
        pairs.add((min(i, j), max(i, j)))
    _check_connected(names, pairs)
    for i, j in pairs:  # virtual ties: half a win each
        counts[i, j] += prior
        counts[j, i] += prior
        wins[i] += prior / 2
        wins[j] += prior / 2
    if prior <= 0 and bool((wins == 0).any() | (wins == counts.sum(1)).any()):
        raise ValueError("a model never won or never lost: use prior > 0")
    log_p = torch.zeros(k, dtype=torch.float64)
    for _ in range(iters):
        p = log_p.exp()
        denom = (counts / (p[:, None] + p[None, :])).sum(1)  # [k]
        new = (wins / denom).log()
        new -= new.mean()
        done = (new - log_p).abs().max().item() < tol
        log_p = new
        if done:
            break
    strengths = {names[i]: math.exp(log_p[i].item()) for i in range(k)}
    return dict(sorted(strengths.items(), key=lambda kv: -kv[1]))


def format_ranking(strengths: dict[str, float], means: dict[str, float] | None = None) -> str:
    """A ranking table: rank, log-strength, P(beats a model of geometric-mean strength)
    = p / (1 + p), and optionally each model's mean judge score."""
    width = max(12, *(len(n) for n in strengths))
    head = f"{'rank':<5}{'model':<{width + 2}}{'log-strength':>13}{'P(win vs avg)':>15}"
    lines = [head + (f"{'mean score':>12}" if means else "")]
    for rank, (name, p) in enumerate(sorted(strengths.items(), key=lambda kv: -kv[1]), 1):
        line = f"{rank:<5}{name:<{width + 2}}{math.log(p):>13.3f}{p / (1 + p):>15.3f}"
        if means:
            line += f"{means.get(name, float('nan')):>12.3f}"
        lines.append(line)
    return "\n".join(lines)
