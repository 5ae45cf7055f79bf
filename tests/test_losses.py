"""Tests for prefopt.losses: hand-worked values, symmetries, gradients and edge cases.

Unless a test says otherwise, the hand-worked examples use one pair with

    π_c = −1.0, π_r = −3.0, ρ_c = −1.5, ρ_r = −2.0, n_c = 2, n_r = 4
    chosen log-ratio  π_c − ρ_c = 0.5,  rejected log-ratio  π_r − ρ_r = −1.0
    h = 0.5 − (−1.0) = 1.5

and softplus(x) = log(1 + eˣ), so −log σ(x) = softplus(−x) and softplus(x) = softplus(−x) + x.
Expected values are literals worked out once with `math`, never produced by the code under test.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from prefopt.losses import (
    LossOutput,
    hinge_loss,
    ipo_loss,
    kto_loss,
    orpo_loss,
    robust_loss,
    sft_loss,
    sigmoid_loss,
    simpo_loss,
)

Tensor = torch.Tensor


def t(*values: float, dtype: torch.dtype = torch.float32, grad: bool = False) -> Tensor:
    """A 1-D tensor of literal values."""
    return torch.tensor(values, dtype=dtype, requires_grad=grad)


def example() -> dict[str, Tensor]:
    """The one-pair example of the module docstring, with gradients on the policy log-probs."""
    return {
        "pc": t(-1.0, grad=True),
        "pr": t(-3.0, grad=True),
        "rc": t(-1.5),
        "rr": t(-2.0),
        "nc": t(2.0),
        "nr": t(4.0),
    }


def close(actual: Tensor, expected: list[float], tol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected), rtol=0, atol=tol)


# ---------------------------------------------------------------------------------------------
# Hand-worked values
# ---------------------------------------------------------------------------------------------


def test_sigmoid_hand_value() -> None:
    """β = 0.1: β·h = 0.15.
    L = −log σ(0.15) = softplus(−0.15) = log(1 + e^−0.15) = 0.6209570478.
    Rewards: β·0.5 = 0.05 and β·(−1.0) = −0.1.
    """
    x = example()
    out = sigmoid_loss(x["pc"], x["pr"], x["rc"], x["rr"], beta=0.1)
    close(out.losses, [0.6209570478])
    close(out.chosen_rewards, [0.05])
    close(out.rejected_rewards, [-0.1])


def test_sigmoid_label_smoothing_hand_value() -> None:
    """β = 0.1, ε = 0.1, x = β·h = 0.15.
    L = 0.9·softplus(−0.15) + 0.1·softplus(0.15)
      = 0.9·0.6209570478 + 0.1·(0.6209570478 + 0.15) = 0.6209570478 + 0.015 = 0.6359570478.
    """
    x = example()
    out = sigmoid_loss(x["pc"], x["pr"], x["rc"], x["rr"], beta=0.1, label_smoothing=0.1)
    close(out.losses, [0.6359570478])
    close(out.chosen_rewards, [0.05])


def test_robust_hand_value() -> None:
    """β = 0.1, ε = 0.1, x = 0.15.
    L = [0.9·softplus(−x) − 0.1·softplus(x)] / 0.8
      = [0.8·softplus(−x) − 0.1·x] / 0.8 = 0.6209570478 − 0.01875 = 0.6022070478.
    """
    x = example()
    out = robust_loss(x["pc"], x["pr"], x["rc"], x["rr"], beta=0.1, label_smoothing=0.1)
    close(out.losses, [0.6022070478])
    close(out.rejected_rewards, [-0.1])


def test_hinge_hand_value() -> None:
    """β = 0.1. Pair 1: h = 1.5, L = max(0, 1 − 0.15) = 0.85.
    Pair 2: π_c = 0, π_r = −20, ρ = 0, 0: h = 20, 1 − 2 = −1, L = 0 (past the margin).
    """
    out = hinge_loss(t(-1.0, 0.0), t(-3.0, -20.0), t(-1.5, 0.0), t(-2.0, 0.0), beta=0.1)
    close(out.losses, [0.85, 0.0])
    close(out.chosen_rewards, [0.05, 0.0])
    close(out.rejected_rewards, [-0.1, -2.0])


def test_ipo_hand_value() -> None:
    """β = 0.1, log-ratios averaged over tokens: 0.5/2 = 0.25 and −1.0/4 = −0.25.
    ĥ = 0.25 − (−0.25) = 0.5; target margin 1/(2β) = 5; L = (0.5 − 5)² = 20.25.
    Rewards β·0.25 = 0.025 and β·(−0.25) = −0.025.
    """
    x = example()
    out = ipo_loss(x["pc"], x["pr"], x["rc"], x["rr"], x["nc"], x["nr"], beta=0.1)
    close(out.losses, [20.25], tol=1e-5)
    close(out.chosen_rewards, [0.025])
    close(out.rejected_rewards, [-0.025])


def test_simpo_hand_value() -> None:
    """β = 2, γ = 1. Average log-probs −1.0/2 = −0.5 and −3.0/4 = −0.75.
    Rewards 2·(−0.5) = −1.0 and 2·(−0.75) = −1.5.
    L = −log σ(−1.0 − (−1.5) − 1) = −log σ(−0.5) = softplus(0.5) = 0.9740769842.
    """
    x = example()
    out = simpo_loss(x["pc"], x["pr"], x["nc"], x["nr"], beta=2.0, gamma=1.0)
    close(out.losses, [0.9740769842])
    close(out.chosen_rewards, [-1.0])
    close(out.rejected_rewards, [-1.5])


def test_orpo_hand_value() -> None:
    """β (λ) = 0.1. Average log-probs p_c = −0.5, p_r = −0.75.
    log odds_c = −0.5 − log(1 − e^−0.5) = −0.5 − log(0.3934693403) = 0.4327521296.
    log odds_r = −0.75 − log(1 − e^−0.75) = −0.75 − log(0.5276334473) = −0.1106465350.
    Difference 0.5433986645; −log σ(0.5433986645) = softplus(−0.5433986645) = 0.4579127333.
    L = −p_c + 0.1·0.4579127333 = 0.5 + 0.0457912733 = 0.5457912733.
    Rewards β·p: −0.05 and −0.075.
    """
    x = example()
    out = orpo_loss(x["pc"], x["pr"], x["nc"], x["nr"], beta=0.1)
    close(out.losses, [0.5457912733])
    close(out.chosen_rewards, [-0.05])
    close(out.rejected_rewards, [-0.075])


def test_sft_hand_value() -> None:
    """L = −π_c/n_c = −(−1.0)/2 = 0.5; a second example −(−6.0)/3 = 2.0; rewards are 0."""
    out = sft_loss(t(-1.0, -6.0), t(2.0, 3.0))
    close(out.losses, [0.5, 2.0])
    close(out.chosen_rewards, [0.0, 0.0])
    close(out.rejected_rewards, [0.0, 0.0])


def test_kto_hand_value() -> None:
    """β = 0.1, λ_D = 1, λ_U = 1.5; π = [−1.0, −3.0], ρ = [−1.5, −2.0], r = π − ρ = [0.5, −1.0];
    labels [desirable, undesirable]; KL̂ = 0.2 so z₀ = 0.2.
    desirable:   1 − σ(0.1·(0.5 − 0.2)) = 1 − σ(0.03) = 0.4925005624
    undesirable: 1.5·(1 − σ(0.1·(0.2 − (−1.0)))) = 1.5·(1 − σ(0.12)) = 0.7050539224
    Rewards β·r = [0.05, −0.1], chosen on the desirable slot, rejected on the undesirable one.
    """
    out = kto_loss(
        t(-1.0, -3.0, grad=True),
        t(-1.5, -2.0),
        torch.tensor([True, False]),
        torch.tensor(0.2),
        beta=0.1,
        desirable_weight=1.0,
        undesirable_weight=1.5,
    )
    close(out.losses, [0.4925005624, 0.7050539224])
    assert out.chosen_rewards[0].item() == pytest.approx(0.05)
    assert math.isnan(out.chosen_rewards[1].item())
    assert math.isnan(out.rejected_rewards[0].item())
    assert out.rejected_rewards[1].item() == pytest.approx(-0.1)


def test_kto_negative_kl_estimate_is_clamped_to_zero() -> None:
    """KL̂ = −0.3 → z₀ = max(0, −0.3) = 0.
    desirable 1 − σ(0.1·0.5) = 1 − σ(0.05) = 0.4875026035;
    undesirable 1.5·(1 − σ(0.1·1.0)) = 1.5·(1 − σ(0.1)) = 0.7125312188.
    """
    kl = torch.tensor(-0.3, requires_grad=True)
    out = kto_loss(
        t(-1.0, -3.0),
        t(-1.5, -2.0),
        torch.tensor([True, False]),
        kl,
        beta=0.1,
        undesirable_weight=1.5,
    )
    close(out.losses, [0.4875026035, 0.7125312188])
    assert not out.losses.requires_grad  # the KL estimate is detached: no gradient reaches it


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------


def random_pairs(n: int = 8, seed: int = 0, dtype: torch.dtype = torch.float32) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [-10 * torch.rand(n, generator=g, dtype=dtype) for _ in range(4)]


@pytest.mark.parametrize("loss", [sigmoid_loss, robust_loss, hinge_loss])
def test_swapping_chosen_and_rejected_flips_the_margin(loss: Callable[..., LossOutput]) -> None:
    pc, pr, rc, rr = random_pairs()
    out = loss(pc, pr, rc, rr, beta=0.3)
    swapped = loss(pr, pc, rr, rc, beta=0.3)
    margin = out.chosen_rewards - out.rejected_rewards
    torch.testing.assert_close(swapped.chosen_rewards - swapped.rejected_rewards, -margin)


def test_ipo_swap_flips_the_margin() -> None:
    pc, pr, rc, rr = random_pairs()
    nc, nr = t(1, 2, 3, 4, 5, 6, 7, 8), t(8, 7, 6, 5, 4, 3, 2, 1)
    out = ipo_loss(pc, pr, rc, rr, nc, nr)
    swapped = ipo_loss(pr, pc, rr, rc, nr, nc)
    torch.testing.assert_close(
        swapped.chosen_rewards - swapped.rejected_rewards,
        -(out.chosen_rewards - out.rejected_rewards),
    )


@pytest.mark.parametrize("loss", [simpo_loss, orpo_loss])
def test_reference_free_swap_flips_the_margin(loss: Callable[..., LossOutput]) -> None:
    """SimPO and ORPO rewards are β·π/n: swapping the log-probs and the token counts together
    swaps the rewards, so the margin changes sign and keeps its size."""
    pc, pr, _, _ = random_pairs()
    nc, nr = t(1, 2, 3, 4, 5, 6, 7, 8), t(8, 7, 6, 5, 4, 3, 2, 1)
    out = loss(pc, pr, nc, nr, beta=0.3)
    swapped = loss(pr, pc, nr, nc, beta=0.3)
    margin = out.chosen_rewards - out.rejected_rewards
    assert margin.abs().min() > 1e-3  # a real margin to flip, not zeros
    torch.testing.assert_close(swapped.chosen_rewards - swapped.rejected_rewards, -margin)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_sigmoid_swap_relation(eps: float) -> None:
    """L(h) − L(−h) = −(1 − 2ε)·β·h, since log σ(x) − log σ(−x) = x."""
    beta = 0.2
    pc, pr, rc, rr = random_pairs(dtype=torch.float64)
    h = (pc - rc) - (pr - rr)
    out = sigmoid_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    swapped = sigmoid_loss(pr, pc, rr, rc, beta=beta, label_smoothing=eps)
    torch.testing.assert_close(out.losses - swapped.losses, -(1 - 2 * eps) * beta * h)


def test_zero_label_smoothing_is_plain_dpo() -> None:
    pc, pr, rc, rr = random_pairs()
    plain = sigmoid_loss(pc, pr, rc, rr, beta=0.1)
    smoothed = sigmoid_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.0)
    robust = robust_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.0)
    expected = -torch.nn.functional.logsigmoid(0.1 * ((pc - rc) - (pr - rr)))
    torch.testing.assert_close(plain.losses, expected)
    torch.testing.assert_close(smoothed.losses, plain.losses)
    torch.testing.assert_close(robust.losses, plain.losses)


def test_policy_equal_to_reference_gives_ln2_and_zero_rewards() -> None:
    """h = 0 → L = −log σ(0) = ln 2 = 0.6931471806, for any ε."""
    pc, pr, _, _ = random_pairs()
    for eps in (0.0, 0.2):
        out = sigmoid_loss(pc, pr, pc.clone(), pr.clone(), beta=0.5, label_smoothing=eps)
        close(out.losses, [0.6931471806] * 8)
        close(out.chosen_rewards, [0.0] * 8)
        close(out.rejected_rewards, [0.0] * 8)


def all_losses(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor) -> dict[str, LossOutput]:
    """Every loss on the same log-probs (token counts 3 and 5)."""
    nc, nr = torch.full_like(pc, 3.0), torch.full_like(pr, 5.0)
    return {
        "sigmoid": sigmoid_loss(pc, pr, rc, rr, label_smoothing=0.1),
        "robust": robust_loss(pc, pr, rc, rr, label_smoothing=0.1),
        "hinge": hinge_loss(pc, pr, rc, rr, beta=0.01),  # β small: inside the margin
        "ipo": ipo_loss(pc, pr, rc, rr, nc, nr),
        "simpo": simpo_loss(pc, pr, nc, nr),
        "orpo": orpo_loss(pc, pr, nc, nr),
        "sft": sft_loss(pc, nc),
        "kto": kto_loss(pc, rc, torch.arange(len(pc)) % 2 == 0, (pc - rr).mean()),
    }


def test_rewards_are_detached_and_losses_carry_gradient() -> None:
    pc, pr, rc, rr = random_pairs()
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    for name, out in all_losses(pc, pr, rc, rr).items():
        assert out.losses.requires_grad, name
        assert out.losses.shape == (8,), name
        assert not out.chosen_rewards.requires_grad, name
        assert not out.rejected_rewards.requires_grad, name
        grad = torch.autograd.grad(out.losses.sum(), pc, allow_unused=True)[0]
        assert grad is not None and grad.abs().sum() > 0, name


@pytest.mark.parametrize("name", ["sigmoid", "robust", "ipo", "simpo", "orpo", "sft"])
def test_gradients_match_finite_differences(name: str) -> None:
    """float64 gradcheck of the loss w.r.t. the policy (and reference) log-probs."""
    pc, pr, rc, rr = (x.requires_grad_(True) for x in random_pairs(4, dtype=torch.float64))

    def losses(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor) -> Tensor:
        return all_losses(pc, pr, rc, rr)[name].losses

    assert torch.autograd.gradcheck(losses, (pc, pr, rc, rr))


@pytest.mark.parametrize("avg", [0.0, -1e-9, -1e-6, -1e-4, -1e-2, -5.0, -100.0, -1e4, -1e6])
def test_orpo_is_stable_for_extreme_average_logps(avg: float) -> None:
    """Finite loss and gradient when the chosen average log-prob is near 0 or very negative.

    Beyond finiteness, the float32 value matches a float64 evaluation of the same formula
    (average log-probs below the −1e−6 clamp); the rejected response has p_r = −1.
    """
    pc = t(avg, grad=True)
    out = orpo_loss(pc, t(-1.0), t(1.0), t(1.0), beta=0.1)
    (grad,) = torch.autograd.grad(out.losses.sum(), pc)
    assert torch.isfinite(out.losses).all() and torch.isfinite(grad).all()

    p_c = min(avg, -1e-6)
    log_odds = (p_c - math.log(-math.expm1(p_c))) - (-1.0 - math.log(-math.expm1(-1.0)))
    softplus = max(-log_odds, 0.0) + math.log1p(math.exp(-abs(log_odds)))
    expected = -p_c + 0.1 * softplus
    assert out.losses.item() == pytest.approx(expected, rel=1e-5)


def test_orpo_rejected_near_zero_is_finite() -> None:
    pr = t(-1e-8, -1e5, grad=True)
    out = orpo_loss(t(-1.0, -1.0), pr, t(1.0, 1.0), t(1.0, 1.0))
    (grad,) = torch.autograd.grad(out.losses.sum(), pr)
    assert torch.isfinite(out.losses).all() and torch.isfinite(grad).all()


def test_zero_token_responses_give_finite_values() -> None:
    """A response with no scored token has log-prob 0 and count 0: no 0/0 anywhere."""
    zero = t(0.0, 0.0, grad=True)
    other = t(0.0, -2.0, grad=True)
    tokens = t(0.0, 0.0)
    outs = all_losses(zero, other, t(0.0, 0.0), t(0.0, -1.0))
    outs["ipo_both_empty"] = ipo_loss(zero, zero, t(0.0, 0.0), t(0.0, 0.0), tokens, tokens)
    outs["simpo_both_empty"] = simpo_loss(zero, zero, tokens, tokens)
    outs["orpo_both_empty"] = orpo_loss(zero, zero, tokens, tokens)
    outs["sft_empty"] = sft_loss(zero, tokens)
    for name, out in outs.items():
        assert torch.isfinite(out.losses).all(), name
        grads = torch.autograd.grad(out.losses.sum(), (zero, other), allow_unused=True)
        assert all(g is None or torch.isfinite(g).all() for g in grads), name
