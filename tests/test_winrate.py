"""Tests for prefopt.winrate: win/tie/loss counts and the Wilson interval against hand-computed
numbers, the KL estimate, response scoring, implicit rewards and Bradley–Terry."""

from __future__ import annotations

import math
import random

import pytest
import torch

from prefopt.logprobs import SequenceLogprobModel, sequence_logprobs
from prefopt.tokenize import tokenize_sft
from prefopt.winrate import (
    bradley_terry,
    format_ranking,
    implicit_rewards,
    kl_estimate,
    pairwise_comparisons,
    rank_within_groups,
    score_responses,
    score_token_ids,
    wilson_interval,
    win_rate,
)
from toy import make_tokenizer
from toy_models import make_model

# ---------------------------------------------------------------------------------------------
# Win rate


def test_win_rate_crafted_case() -> None:
    """7 wins, 2 ties, 3 losses (the docstring's example).

    n = 10 decided, p = 0.7, z = 1.959963984540054, z² = 3.841458820694124:
    denom = 1 + z²/10 = 1.3841458820694124; center = (0.7 + z²/20)/denom = 0.644493440027422;
    half = z/denom · sqrt(0.7·0.3/10 + z²/400) = 1.415996…·0.174939… = 0.247715292566277;
    interval [0.396778147461145, 0.892208732593699]. With ties as half: (7 + 1)/12.
    """
    policy = [5, 4, 3, 2, 1, 1, 9, 0, 0, 0, 2.0, 3.0]
    ref = [4, 3, 2, 1, 0, 0, 8, 1, 1, 1, 2.0, 3.0]
    wr = win_rate(policy, ref)
    assert (wr.wins, wr.ties, wr.losses, wr.n) == (7, 2, 3, 12)
    assert wr.rate == pytest.approx(0.7, abs=1e-12)
    assert wr.ci_low == pytest.approx(0.396778147461145, abs=1e-6)
    assert wr.ci_high == pytest.approx(0.892208732593699, abs=1e-6)
    assert wr.rate_ties_half == pytest.approx(8 / 12)
    assert "7W/2T/3L" in str(wr)


def test_win_rate_tie_eps_and_edges() -> None:
    wr = win_rate([1.0, 1.5, 2.0], [1.25, 1.0, 1.0], tie_eps=0.5)  # |diff| <= eps ties
    assert (wr.wins, wr.ties, wr.losses) == (1, 2, 0)
    all_ties = win_rate([1.0, 2.0], [1.0, 2.0])
    assert math.isnan(all_ties.rate) and (all_ties.ci_low, all_ties.ci_high) == (0.0, 1.0)
    assert all_ties.to_dict()["rate"] is None and all_ties.rate_ties_half == 0.5
    with pytest.raises(ValueError, match="2 policy scores but 1"):
        win_rate([1.0, 2.0], [1.0])


def test_wilson_interval_hand_values() -> None:
    """0 of 4: center = (z²/8)/(1 + z²/4) = half, so [0, 2·center] = [0, 0.489890836454597].
    5 of 5: mirror image of 0 of 5, [0.565517535216825, 1]. n = 0: [0, 1]."""
    assert wilson_interval(0, 4) == pytest.approx((0.0, 0.489890836454597), abs=1e-9)
    assert wilson_interval(5, 5) == pytest.approx((0.565517535216825, 1.0), abs=1e-9)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(1 - high) and 0.40 < low < 0.41


# ---------------------------------------------------------------------------------------------
# KL and log-probs of responses


def test_kl_estimate_hand_values() -> None:
    """Differences [1.0, -0.5, 2.0] over 2 + 3 + 5 tokens: per token 2.5/10 = 0.25, per
    sequence 2.5/3, standard error std([1, -0.5, 2]) / sqrt(3) = 1.2583057/1.7320508."""
    kl = kl_estimate(torch.tensor([-1.0, -2.5, -3.0]), [-2.0, -2.0, -5.0], [2, 3, 5])
    assert kl.per_token == pytest.approx(0.25)
    assert kl.per_sequence == pytest.approx(2.5 / 3)
    assert kl.per_sequence_stderr == pytest.approx(1.2583057392 / math.sqrt(3))
    assert (kl.num_samples, kl.num_tokens) == (3, 10)
    one = kl_estimate([0.0], [0.0], [4])
    assert one.per_token == 0.0 and one.to_dict()["per_sequence_stderr"] is None


PROMPTS = ["hello", "is the sun hot ?", ({"role": "user", "content": "tell me a story"},)]
RESPONSES = ["hi !", "yes , very hot and big .", ({"role": "assistant", "content": "a cat ."},)]


def test_score_responses_matches_full_logits_and_batching() -> None:
    tok = make_tokenizer()
    model = make_model("llama", seed=0).eval()
    scorer = SequenceLogprobModel(model)
    logps, tokens = score_responses(scorer, tok, PROMPTS, RESPONSES, batch_size=2)
    one_by_one, _ = score_responses(scorer, tok, PROMPTS, RESPONSES, batch_size=1)
    assert torch.allclose(logps, one_by_one, atol=1e-5)
    for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES, strict=True)):
        t = tokenize_sft(p, r, tok, max_length=256)
        assert tokens[i] == len(t.completion_ids)
        ids = torch.tensor([[*t.prompt_ids, *t.completion_ids]])
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[0, len(t.prompt_ids) :] = True
        with torch.no_grad():
            expected, _ = sequence_logprobs(model(ids).logits, ids, mask)
        assert logps[i].item() == pytest.approx(expected.item(), abs=1e-4)


def test_same_model_gives_zero_kl_and_reward_exactly() -> None:
    tok = make_tokenizer()
    a = SequenceLogprobModel(make_model("llama", seed=0))
    b = SequenceLogprobModel(make_model("llama", seed=0))
    pa, tokens = score_responses(a, tok, PROMPTS, RESPONSES)
    pb, _ = score_responses(b, tok, PROMPTS, RESPONSES)
    assert kl_estimate(pa, pb, tokens).per_token == 0.0
    reward, per_token = implicit_rewards(pa, pb, tokens, beta=0.1)
    assert reward.tolist() == [0.0, 0.0, 0.0] and per_token.tolist() == [0.0, 0.0, 0.0]
    assert a.training  # mode restored


def test_score_token_ids_empty() -> None:
    logps, tokens = score_token_ids(
        SequenceLogprobModel(make_model("llama")), [], [], pad_token_id=0
    )
    assert logps.shape == tokens.shape == (0,)


def test_implicit_rewards_and_ranks() -> None:
    reward, per_token = implicit_rewards(
        torch.tensor([-10.0, -4.0, -6.0]), torch.tensor([-12.0, -4.0, -3.0]),
        torch.tensor([4, 2, 3]), beta=0.5,
    )  # fmt: skip
    assert reward.tolist() == [1.0, 0.0, -1.5] and per_token.tolist() == [0.25, 0.0, -0.5]
    ranks = rank_within_groups(["a", "b", "a", "a", "b"], [0.1, 5.0, 0.3, -1.0, 6.0])
    assert ranks == [(2, 3), (2, 2), (1, 3), (3, 3), (1, 2)]


# ---------------------------------------------------------------------------------------------
# Bradley–Terry


def test_bradley_terry_two_players_closed_form() -> None:
    """A beats B 3 times of 4: the MLE has p_A / p_B = 3, so log-strengths are ±ln(3)/2."""
    comps = [("A", "B", 1.0)] * 3 + [("B", "A", 1.0)]
    s = bradley_terry(comps, prior=0.0)
    assert math.log(s["A"]) == pytest.approx(math.log(3) / 2, abs=1e-8)
    assert math.log(s["B"]) == pytest.approx(-math.log(3) / 2, abs=1e-8)
    # A tie counts half to each side: 2 wins + 2 ties for A, 0 + 2 halves for B -> ratio 3.
    s = bradley_terry([("A", "B", 1.0)] * 2 + [("A", "B", 0.5)] * 2, prior=0.0)
    assert s["A"] / s["B"] == pytest.approx(3.0)


def test_bradley_terry_recovers_simulated_strengths() -> None:
    rng = random.Random(0)
    truth = {"sft": -1.0, "dpo-0.5": -0.2, "dpo-0.1": 0.4, "ipo": 0.8}
    comps = []
    for a, b in [(a, b) for a in truth for b in truth if a < b]:
        p_a = 1 / (1 + math.exp(truth[b] - truth[a]))
        comps += [(a, b, float(rng.random() < p_a)) for _ in range(300)]
    strengths = bradley_terry(comps)
    assert list(strengths) == sorted(truth, key=lambda n: -truth[n])  # descending order
    logs = torch.tensor([math.log(strengths[n]) for n in truth])
    true = torch.tensor(list(truth.values()))
    assert abs(logs.mean().item()) < 1e-9
    corr = torch.corrcoef(torch.stack([logs, true - true.mean()]))[0, 1].item()
    assert corr > 0.98
    assert torch.allclose(logs, true - true.mean(), atol=0.2)
    table = format_ranking(strengths, {n: 0.0 for n in truth})
    assert table.splitlines()[1].split()[:2] == ["1", "ipo"]


def test_bradley_terry_prior_and_errors() -> None:
    never = [("A", "B", 1.0)] * 5
    with pytest.raises(ValueError, match="prior > 0"):
        bradley_terry(never, prior=0.0)
    s = bradley_terry(never)  # prior 0.1: finite, A far ahead
    assert math.isfinite(math.log(s["B"])) and s["A"] > 100 * s["B"]
    with pytest.raises(ValueError, match="never compared"):
        bradley_terry([("A", "B", 1.0), ("C", "D", 0.0)])
    with pytest.raises(ValueError, match="bad comparison"):
        bradley_terry([("A", "B", 0.3)])
    with pytest.raises(ValueError, match="at least two"):
        bradley_terry([])


def test_pairwise_comparisons() -> None:
    comps = pairwise_comparisons({"a": [1.0, 2.0], "b": [1.0, 3.0], "c": [0.0, 9.0]})
    assert comps == [
        ("a", "b", 0.5), ("a", "b", 0.0), ("a", "c", 1.0), ("a", "c", 0.0),
        ("b", "c", 1.0), ("b", "c", 0.0),
    ]  # fmt: skip
    with pytest.raises(ValueError, match="different numbers"):
        pairwise_comparisons({"a": [1.0], "b": [1.0, 2.0]})
