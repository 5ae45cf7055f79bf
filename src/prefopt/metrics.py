"""Training/eval metrics under TRL's names, so users recognise them.

Per-pair values are accumulated as sums and counts and averaged over all pairs seen (across
micro-batches and, when a reducer is given, across processes), so a metric never depends on how
the batch was split.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from prefopt.losses import LossOutput, PairLogps

Tensor = torch.Tensor


TIE_TOLERANCE = 1e-6
"""A reward margin with |margin| <= this counts as a tie in `reward_accuracy` (reward units,
i.e. β·nats). An untrained policy's rewards are 0 only up to float rounding when the reference
is a precomputed table or prefix-shared scoring sums the tokens in another order: float32
log-probs of a few tens of nats differ by ~1e-6, which β = 0.1 scales to ~1e-7. Exact
equality would read that noise as accuracy 0 or 1 per pair instead of 0.5. Training moves
margins far past this within a step, so real wins and losses still count."""


def reward_accuracy(
    chosen_rewards: Tensor, rejected_rewards: Tensor, tolerance: float = TIE_TOLERANCE
) -> Tensor:
    """[B] 1 where chosen's reward is higher, 0 where lower, 0.5 on a tie.

    Ties count half so that an untrained policy (all rewards 0) reads 0.5, not 0 as TRL's
    strict '>' gives. A tie is |chosen − rejected| <= `tolerance` (see `TIE_TOLERANCE`).
    """
    margin = chosen_rewards - rejected_rewards  # [B]
    return (margin > tolerance).float() + 0.5 * (margin.abs() <= tolerance).float()


def pair_metrics(out: LossOutput, logps: PairLogps) -> dict[str, Tensor]:
    """Per-pair metric values ([B] each) for one batch of pairs (token counts when given)."""
    chosen, rejected = out.chosen_rewards.detach(), out.rejected_rewards.detach()
    metrics = {
        "loss": out.losses.detach().float(),
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
        "rewards/accuracies": reward_accuracy(chosen, rejected),
        "logps/chosen": logps.policy_chosen.detach(),
        "logps/rejected": logps.policy_rejected.detach(),
    }
    if logps.chosen_tokens is not None:
        metrics["tokens/chosen"] = logps.chosen_tokens.detach().float()
    if logps.rejected_tokens is not None:
        metrics["tokens/rejected"] = logps.rejected_tokens.detach().float()
    return metrics


class MetricAccumulator:
    """Averages per-pair metrics over everything added since the last `compute()`.

    NaN entries (e.g. KTO's rewards/chosen on undesirable examples) are left out of both the
    sum and the count of that metric.
    """

    def __init__(self) -> None:
        self._sums: dict[str, Tensor] = {}
        self._counts: dict[str, Tensor] = {}

    def add(self, values: dict[str, Tensor]) -> None:
        for name, value in values.items():
            value = value.detach().float().reshape(-1)  # [B]
            finite = ~torch.isnan(value)
            total = torch.where(finite, value, torch.zeros_like(value)).sum().cpu()
            count = finite.sum().float().cpu()
            self._sums[name] = self._sums.get(name, torch.zeros(())) + total
            self._counts[name] = self._counts.get(name, torch.zeros(())) + count

    def compute(self, reduce: Callable[[Tensor], Tensor] | None = None) -> dict[str, float]:
        """Means over all pairs added, then reset.

        Args:
            reduce: Sums a tensor across processes (e.g. accelerate's `reduce(t, "sum")`).
        """
        names = sorted(self._sums)
        if not names:
            return {}
        sums = torch.stack([self._sums[n] for n in names])  # [K]
        counts = torch.stack([self._counts[n] for n in names])  # [K]
        if reduce is not None:
            sums, counts = reduce(sums), reduce(counts)
        self._sums, self._counts = {}, {}
        return {
            n: (s / c if c > 0 else math.nan)
            for n, s, c in zip(names, sums.tolist(), counts.tolist(), strict=True)
        }
