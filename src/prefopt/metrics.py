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
"""Absolute part of the tie band of `reward_accuracy` (reward units, i.e. β·nats)."""

TIE_RELATIVE = 1e-7
"""Relative part of the tie band, per nat of the log-probs behind the rewards.

An untrained policy's rewards are 0 only up to float rounding when the reference is a
precomputed table or prefix-shared scoring sums the tokens in another order, and that rounding
grows with the sums: two float32 sums of 1,500 token log-probs differed by 2.4e-4 nats.
Exact equality (or a fixed 1e-6) would read it as accuracy 0 or 1 per pair instead of 0.5.
1e-7 × (|π_c| + |π_r| + |ρ_c| + |ρ_r|) covers that (1.2e-3 for 12,000 nats) even at β = 1,
while training moves margins past it within a step, so real wins and losses still count."""


def tie_band(logps: PairLogps) -> Tensor:
    """[B] |margin| at or below which a pair counts as a tie: `TIE_TOLERANCE` plus
    `TIE_RELATIVE` × the summed magnitude of the pair's policy and reference log-probs."""
    total = logps.policy_chosen.detach().abs() + logps.policy_rejected.detach().abs()  # [B]
    for ref in (logps.ref_chosen, logps.ref_rejected):
        if ref is not None:
            total = total + ref.detach().abs()
    return TIE_TOLERANCE + TIE_RELATIVE * total.float()


def reward_accuracy(
    chosen_rewards: Tensor, rejected_rewards: Tensor, tolerance: float | Tensor = TIE_TOLERANCE
) -> Tensor:
    """[B] 1 where chosen's reward is higher, 0 where lower, 0.5 on a tie.

    Ties count half so that an untrained policy (all rewards 0) reads 0.5, not 0 as TRL's
    strict '>' gives. A tie is |chosen − rejected| <= `tolerance`: a float, or a [B] band per
    pair (`tie_band`).
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
        "rewards/accuracies": reward_accuracy(chosen, rejected, tie_band(logps)),
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
        # Sums stay on the values' device: reading them back per batch would stall a GPU on
        # every micro-batch; `compute` reads them all back once.
        for name, value in values.items():
            value = value.detach().float().reshape(-1)  # [B]
            finite = ~torch.isnan(value)
            total = torch.where(finite, value, torch.zeros_like(value)).sum()  # []
            count = finite.sum().float()  # []
            if name in self._sums:
                total = self._sums[name] + total.to(self._sums[name].device)
                count = self._counts[name] + count.to(self._counts[name].device)
            self._sums[name], self._counts[name] = total, count

    def compute(self, reduce: Callable[[Tensor], Tensor] | None = None) -> dict[str, float]:
        """Means over all pairs added, then reset.

        Args:
            reduce: Sums a tensor across processes (e.g. accelerate's `reduce(t, "sum")`).
        """
        names = sorted(self._sums)
        if not names:
            return {}
        # One device for the stack (a metric may have been computed on the CPU).
        device = self._sums[names[0]].device
        sums = torch.stack([self._sums[n].to(device) for n in names])  # [K]
        counts = torch.stack([self._counts[n].to(device) for n in names])  # [K]
        if reduce is not None:
            sums, counts = reduce(sums), reduce(counts)
        self._sums, self._counts = {}, {}
        return {
            n: (s / c if c > 0 else math.nan)
            for n, s, c in zip(names, sums.tolist(), counts.tolist(), strict=True)
        }
