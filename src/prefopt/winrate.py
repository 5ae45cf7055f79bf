"""Comparing a policy with its reference: win rate with a confidence interval, a KL estimate,
and a Bradley–Terry ranking of several checkpoints.

Win rate. Each prompt is one comparison (its samples' mean judge scores, policy vs reference):
prompts are the independent units, so the interval below is honest about them, whereas samples
of one prompt are correlated. The rate is wins / (wins + losses), ties left out, with a Wilson
score 95% interval on those non-tied comparisons. Wilson rather than the normal approximation
p ± z·sqrt(p(1-p)/n): it stays inside [0, 1], is not degenerate at 0 or n wins, and keeps close
to its nominal coverage for the small n of a quick evaluation. The rate with ties counted as
half a win is reported too.

KL. E_{y~π}[log π(y|x) − log π_ref(y|x)] on the policy's own samples, the x-axis of the DPO
paper's reward–KL frontier. Both log-probs score the exact sampled token ids. Samples drawn with
temperature < 1 or top-p < 1 come from a sharpened π, so the estimate is then of the KL on that
distribution's samples; use temperature 1 and top-p 1 for an unbiased Monte Carlo estimate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

# Re-exported: the ranking lives in its own module, callers know it from here.
from prefopt.bradley_terry import bradley_terry, format_ranking, pairwise_comparisons
from prefopt.collate import collate_examples
from prefopt.data.records import Text
from prefopt.tokenize import TokenizedExample, tokenize_sft

__all__ = [
    "KLEstimate",
    "WinRate",
    "bradley_terry",
    "format_ranking",
    "implicit_rewards",
    "kl_estimate",
    "pairwise_comparisons",
    "rank_within_groups",
    "score_responses",
    "score_token_ids",
    "wilson_interval",
    "win_rate",
]

Z_95 = 1.959963984540054
"""Two-sided 95% standard normal quantile."""


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion.

    center = (p + z²/2n) / (1 + z²/n), half = z / (1 + z²/n) · sqrt(p(1−p)/n + z²/4n²), with
    p = successes / n. For n = 0 nothing is known: (0, 1).
    """
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


@dataclass(frozen=True)
class WinRate:
    """Policy-vs-reference outcome counts and rates.

    Attributes:
        wins: Comparisons the policy won (score higher by more than tie_eps).
        ties: Comparisons within tie_eps.
        losses: Comparisons the reference won.
        rate: wins / (wins + losses); NaN when every comparison tied.
        ci_low: Lower end of the Wilson 95% interval of `rate`.
        ci_high: Upper end.
        rate_ties_half: (wins + ties / 2) / all comparisons.
    """

    wins: int
    ties: int
    losses: int
    rate: float
    ci_low: float
    ci_high: float
    rate_ties_half: float

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (NaN becomes None)."""
        return {k: None if isinstance(v, float) and math.isnan(v) else v
                for k, v in asdict(self).items()}  # fmt: skip

    def __str__(self) -> str:
        return (
            f"win {self.rate:.3f} [95% CI {self.ci_low:.3f}, {self.ci_high:.3f}] "
            f"({self.wins}W/{self.ties}T/{self.losses}L; ties as half: {self.rate_ties_half:.3f})"
        )


def win_rate(
    policy_scores: Sequence[float], ref_scores: Sequence[float], tie_eps: float = 0.0
) -> WinRate:
    """Compare scores pairwise: policy_scores[i] against ref_scores[i].

    Example (hand-computed): 7 wins, 2 ties, 3 losses -> rate 7/10 = 0.7. With
    z = 1.959963984540054: denom = 1 + z²/10 = 1.384145882069412, center = (0.7 + z²/20) / denom
    = 0.644493440027422, half = z/denom · sqrt(0.21/10 + z²/400) = 0.247715292566277, so the
    Wilson interval is [0.396778147461145, 0.892208732593699]; with ties as half: 8/12.

    Args:
        policy_scores: The policy's score per comparison.
        ref_scores: The reference's score per comparison, same order.
        tie_eps: Scores closer than or equal to this count as a tie.
    """
    if len(policy_scores) != len(ref_scores):
        raise ValueError(f"{len(policy_scores)} policy scores but {len(ref_scores)} reference")
    wins = ties = losses = 0
    for a, b in zip(policy_scores, ref_scores, strict=True):
        if abs(a - b) <= tie_eps:
            ties += 1
        elif a > b:
            wins += 1
        else:
            losses += 1
    decided = wins + losses
    low, high = wilson_interval(wins, decided)
    total = decided + ties
    return WinRate(
        wins, ties, losses,
        rate=wins / decided if decided else float("nan"), ci_low=low, ci_high=high,
        rate_ties_half=(wins + ties / 2) / total if total else float("nan"),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Log-probs of given responses, and the KL estimate


@torch.no_grad()
def score_token_ids(
    scorer: nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    batch_size: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(y|x) of each response token sequence after its prompt, batched.

    Args:
        scorer: A `SequenceLogprobModel` (wrapping the policy, or the reference).
        prompt_ids: Prompt token ids per row (non-empty).
        response_ids: Response token ids per row.
        pad_token_id: Id used for padding (masked out).
        batch_size: Rows per forward pass.

    Returns:
        (logps [N] float32, token_counts [N] long), on CPU.
    """
    device = next(scorer.parameters()).device
    rows = [
        TokenizedExample(i, tuple(p), tuple(r))
        for i, (p, r) in enumerate(zip(prompt_ids, response_ids, strict=True))
    ]
    was_training = scorer.training
    scorer.eval()
    logps, tokens = [], []
    try:
        for start in range(0, len(rows), batch_size):
            batch = collate_examples(rows[start : start + batch_size], pad_token_id=pad_token_id)
            batch = batch.to(device)
            lp, n = scorer(batch.input_ids, batch.attention_mask, batch.response_mask)
            logps.append(lp.float().cpu())
            tokens.append(n.cpu())
    finally:
        scorer.train(was_training)
    if not rows:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return torch.cat(logps), torch.cat(tokens)


def score_responses(
    model_scorer: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Text],
    responses: Sequence[Text],
    *,
    batch_size: int = 8,
    max_length: int = 2048,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(response | prompt) of text (or message) pairs, tokenized exactly as for training
    (`tokenize_sft`: chat template, one BOS, the response ending with EOS).

    Returns:
        (logps [N] float32, token_counts [N] long), on CPU.
    """
    tokenized = [
        tokenize_sft(p, r, tokenizer, max_length=max_length, index=i)
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True))
    ]
    return score_token_ids(
        model_scorer,
        [t.prompt_ids for t in tokenized],
        [t.completion_ids for t in tokenized],
        pad_token_id=tokenizer.pad_token_id,
        batch_size=batch_size,
    )


@dataclass(frozen=True)
class KLEstimate:
    """Monte Carlo KL(π ‖ π_ref) from the policy's samples.

    Attributes:
        per_token: Σ (log π − log π_ref) / Σ tokens over all samples.
        per_sequence: Mean over samples of log π(y|x) − log π_ref(y|x) (sequence-level KL).
        per_sequence_stderr: Standard error of `per_sequence` (NaN for fewer than 2 samples).
        num_samples: Samples used.
        num_tokens: Response tokens over all samples.
    """

    per_token: float
    per_sequence: float
    per_sequence_stderr: float
    num_samples: int
    num_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return {k: None if isinstance(v, float) and math.isnan(v) else v
                for k, v in asdict(self).items()}  # fmt: skip


def kl_estimate(
    policy_logps: torch.Tensor | Sequence[float],
    ref_logps: torch.Tensor | Sequence[float],
    tokens: torch.Tensor | Sequence[int],
) -> KLEstimate:
    """Estimate KL(π ‖ π_ref) from log-probs of the policy's own samples under both models.

    Args:
        policy_logps: [N] log π(y_i|x_i) of the sampled responses.
        ref_logps: [N] log π_ref(y_i|x_i) of the same responses.
        tokens: [N] response token counts.
    """
    diff = torch.as_tensor(policy_logps, dtype=torch.float64) - torch.as_tensor(
        ref_logps, dtype=torch.float64
    )  # [N]
    counts = torch.as_tensor(tokens, dtype=torch.float64)  # [N]
    n = diff.numel()
    total_tokens = int(counts.sum().item())
    per_token = diff.sum().item() / total_tokens if total_tokens else float("nan")
    per_sequence = diff.mean().item() if n else float("nan")
    stderr = (diff.std(unbiased=True) / math.sqrt(n)).item() if n > 1 else float("nan")
    return KLEstimate(per_token, per_sequence, stderr, n, total_tokens)


# ---------------------------------------------------------------------------------------------
# Implicit reward of given responses


def implicit_rewards(
    policy_logps: torch.Tensor, ref_logps: torch.Tensor, tokens: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO's implicit reward r(x, y) = β·(log π(y|x) − log π_ref(y|x)) and its per-token form.

    Args:
        policy_logps: [N] log π(y|x).
        ref_logps: [N] log π_ref(y|x).
        tokens: [N] response token counts.
        beta: β.

    Returns:
        (reward [N] float64, reward per response token [N] float64).
    """
    reward = beta * (policy_logps.double() - ref_logps.double())  # [N]
    return reward, reward / tokens.clamp(min=1).double()


def rank_within_groups(keys: Sequence[str], values: Sequence[float]) -> list[tuple[int, int]]:
    """(rank, group size) per item: rank 1 = the highest value among items with the same key
    (ties keep input order)."""
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    out = [(0, 0)] * len(keys)
    for members in groups.values():
        for rank, i in enumerate(sorted(members, key=lambda m: -values[m]), 1):
            out[i] = (rank, len(members))
    return out
