"""Tests for prefopt.metrics: reward accuracy and the split-invariant metric accumulator."""

from __future__ import annotations

import math

import pytest
import torch

from prefopt.losses import LossOutput, PairLogps
from prefopt.metrics import (
    TIE_TOLERANCE,
    MetricAccumulator,
    pair_metrics,
    reward_accuracy,
    tie_band,
)


def test_reward_accuracy_counts_ties_as_half() -> None:
    chosen = torch.tensor([1.0, 0.0, -1.0, 0.0])
    rejected = torch.tensor([0.0, 1.0, -1.0, 0.0])
    torch.testing.assert_close(
        reward_accuracy(chosen, rejected), torch.tensor([1.0, 0.0, 0.5, 0.5])
    )


def test_reward_accuracy_rounding_noise_is_a_tie() -> None:
    """Margins within 1e-6 of 0 (rounding, e.g. a precomputed reference) count half; the
    tolerance is inclusive, and margins just past it on either side count as 1 and 0."""
    assert TIE_TOLERANCE == 1e-6
    chosen = torch.tensor([3e-7, 0.0, 1e-6, 2e-6, 0.0, 0.25], dtype=torch.float64)
    rejected = torch.tensor([0.0, 3e-7, 0.0, 0.0, 2e-6, 0.25 - 1e-7], dtype=torch.float64)
    torch.testing.assert_close(
        reward_accuracy(chosen, rejected),
        torch.tensor([0.5, 0.5, 0.5, 1.0, 0.0, 0.5], dtype=torch.float32),
    )


def test_untrained_policy_with_noisy_rewards_reads_one_half() -> None:
    """Policy == reference up to rounding of log-probs (±5e-6 nats): β·(π − ρ) is at most
    5e-7 at β = 0.1, so the batch's accuracy is exactly 0.5 rather than a coin flip per pair."""
    g = torch.Generator().manual_seed(0)
    logps = -20 * torch.rand(64, generator=g, dtype=torch.float64)
    noisy = logps + (torch.rand(64, generator=g, dtype=torch.float64) - 0.5) * 1e-5
    chosen, rejected = 0.1 * (noisy[:32] - logps[:32]), 0.1 * (noisy[32:] - logps[32:])
    assert (chosen != rejected).all()  # exact equality would call none of them ties
    assert reward_accuracy(chosen, rejected).mean().item() == 0.5


def test_long_responses_summed_in_another_order_still_tie() -> None:
    """1,500 float32 token log-probs summed in two orders (a precomputed or prefix-shared
    reference): the sums differ by up to ~1e-4 nats, above a fixed 1e-6 even at β = 0.1, but
    within the band that grows with the log-probs, so the untrained policy reads 0.5."""
    g = torch.Generator().manual_seed(0)
    tokens = -4 * torch.rand(8, 1500, generator=g)  # [B, T] float32 token log-probs
    policy = tokens.sum(-1)  # [B]
    reference = tokens.flip(-1).cumsum(-1)[:, -1]  # [B] same numbers, other order
    assert (policy != reference).any()
    beta = 1.0
    logps = PairLogps(policy[:4], policy[4:], ref_chosen=reference[:4], ref_rejected=reference[4:])
    chosen = beta * (logps.policy_chosen - reference[:4])
    rejected = beta * (logps.policy_rejected - reference[4:])
    assert (reward_accuracy(chosen, rejected) != 0.5).any()  # a fixed 1e-6 band fails here
    assert reward_accuracy(chosen, rejected, tie_band(logps)).tolist() == [0.5] * 4
    # A real margin of 0.05 is still a win.
    assert reward_accuracy(chosen + 0.05, rejected, tie_band(logps)).tolist() == [1.0] * 4


def test_accumulator_over_two_adds_equals_mean_of_concatenation() -> None:
    """Batches of 3 and 1 pairs: the mean is over the 4 pairs, not the mean of batch means."""
    first = torch.tensor([1.0, 2.0, 3.0])
    second = torch.tensor([10.0])
    acc = MetricAccumulator()
    acc.add({"loss": first})
    acc.add({"loss": second})
    result = acc.compute()
    assert result["loss"] == pytest.approx(torch.cat([first, second]).mean().item())
    assert result["loss"] == pytest.approx(4.0)  # (1 + 2 + 3 + 10) / 4, not (2 + 10) / 2


def test_accumulator_skips_nan_entries() -> None:
    """KTO-style rewards: NaN where a slot does not apply; they count in neither sum nor count."""
    acc = MetricAccumulator()
    acc.add({"rewards/chosen": torch.tensor([1.0, math.nan]), "loss": torch.tensor([0.5, 1.5])})
    acc.add({"rewards/chosen": torch.tensor([math.nan, 3.0]), "loss": torch.tensor([2.5, 3.5])})
    result = acc.compute()
    assert result["rewards/chosen"] == pytest.approx(2.0)  # (1 + 3) / 2
    assert result["loss"] == pytest.approx(2.0)  # (0.5 + 1.5 + 2.5 + 3.5) / 4


def test_accumulator_all_nan_metric_is_nan() -> None:
    acc = MetricAccumulator()
    acc.add({"rewards/rejected": torch.tensor([math.nan, math.nan])})
    assert math.isnan(acc.compute()["rewards/rejected"])


def test_compute_applies_reduce_and_resets() -> None:
    """A fake two-process reduce: every process holds the same sums and counts, so summing
    doubles both and the means are unchanged; the reducer is called on sums and counts."""
    acc = MetricAccumulator()
    acc.add({"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([5.0])})
    calls: list[torch.Tensor] = []

    def reduce(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.clone())
        return 2 * x

    result = acc.compute(reduce)
    assert result == {"a": pytest.approx(2.0), "b": pytest.approx(5.0)}
    assert len(calls) == 2
    torch.testing.assert_close(calls[0], torch.tensor([4.0, 5.0]))  # sums, names sorted
    torch.testing.assert_close(calls[1], torch.tensor([2.0, 1.0]))  # counts
    assert acc.compute() == {}  # reset after compute


def test_reduce_combines_different_processes() -> None:
    """Process 0 saw [1, 2, 3], process 1 saw [10]: a reducer that adds process 1's sums and
    counts gives the global mean 4.0."""
    pending = [torch.tensor([10.0]), torch.tensor([1.0])]  # process 1's sums, then counts

    acc = MetricAccumulator()
    acc.add({"loss": torch.tensor([1.0, 2.0, 3.0])})
    result = acc.compute(lambda x: x + pending.pop(0))
    assert result["loss"] == pytest.approx(4.0)


def test_pair_metrics_names_and_values() -> None:
    out = LossOutput(
        losses=torch.tensor([0.5, 0.7], requires_grad=True),
        chosen_rewards=torch.tensor([0.2, 0.0]),
        rejected_rewards=torch.tensor([0.1, 0.0]),
    )
    logps = PairLogps(
        policy_chosen=torch.tensor([-1.0, -2.0]),
        policy_rejected=torch.tensor([-3.0, -4.0]),
        chosen_tokens=torch.tensor([2, 3]),
        rejected_tokens=torch.tensor([4, 5]),
    )
    values = pair_metrics(out, logps)
    assert not any(v.requires_grad for v in values.values())
    torch.testing.assert_close(values["rewards/margins"], torch.tensor([0.1, 0.0]))
    torch.testing.assert_close(values["rewards/accuracies"], torch.tensor([1.0, 0.5]))
    torch.testing.assert_close(values["tokens/rejected"], torch.tensor([4.0, 5.0]))
    acc = MetricAccumulator()
    acc.add(values)
    result = acc.compute()
    assert result["loss"] == pytest.approx(0.6)
    assert result["logps/chosen"] == pytest.approx(-1.5)
    assert set(result) == {
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "tokens/chosen",
        "tokens/rejected",
    }
