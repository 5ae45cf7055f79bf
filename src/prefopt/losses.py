"""The DPO loss family as pure functions of sequence log-probabilities.

Every loss takes per-pair (or per-example) log-prob tensors and returns a `LossOutput` of
per-pair losses (with gradient) and implicit rewards (detached). Nothing here knows about
models, tokenizers or configs: this module imports only torch (and `average_logps` from
`prefopt.logprobs`, which itself imports only torch).

Notation used in the docstrings (all tensors are [B], float32):
    π_c, π_r   policy log π(y_c|x), log π(y_r|x)       (summed over response tokens)
    ρ_c, ρ_r   reference log π_ref(y_c|x), log π_ref(y_r|x)
    n_c, n_r   response token counts
    h          (π_c − ρ_c) − (π_r − ρ_r)              the log-ratio margin
    σ          logistic sigmoid

Losses are selected by name through `prefopt.loss_registry.LOSSES`, which records what each
one needs (a reference, paired or unpaired data) so unsupported combinations are refused
instead of silently replaced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prefopt.logprobs import average_logps

Tensor = torch.Tensor


@dataclass(frozen=True)
class LossOutput:
    """Per-pair losses and implicit rewards.

    Attributes:
        losses: [B] per-pair loss, differentiable.
        chosen_rewards: [B] detached implicit reward of the chosen response (or, for unpaired
            data, of desirable examples; see `kto_loss`).
        rejected_rewards: [B] detached implicit reward of the rejected response.
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


@dataclass(frozen=True)
class PairLogps:
    """Everything a paired loss may read, gathered in one place.

    Attributes:
        policy_chosen: [B] summed log π(y_c|x).
        policy_rejected: [B] summed log π(y_r|x).
        chosen_tokens: [B] number of scored response tokens of y_c (float or long), None when
            not counted (only losses that length-normalise read them).
        rejected_tokens: [B] number of scored response tokens of y_r, or None.
        ref_chosen: [B] summed log π_ref(y_c|x), None without a reference.
        ref_rejected: [B] summed log π_ref(y_r|x), None without a reference.

    Which fields a loss needs is declared in `prefopt.loss_registry.LossSpec.inputs`; a loss
    asked to run without one of them is refused there.
    """

    policy_chosen: Tensor
    policy_rejected: Tensor
    chosen_tokens: Tensor | None = None
    rejected_tokens: Tensor | None = None
    ref_chosen: Tensor | None = None
    ref_rejected: Tensor | None = None


# ---------------------------------------------------------------------------------------------
# Reference-based pairwise losses
# ---------------------------------------------------------------------------------------------


def sigmoid_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """DPO (Rafailov et al. 2023, arXiv 2305.18290, eq. 7), with cDPO label smoothing.

    L = −(1−ε)·log σ(β·h) − ε·log σ(−β·h),   rewards r = β·(π − ρ).

    ε = `label_smoothing` is the probability that a label is flipped (cDPO, Mitchell 2023);
    ε = 0 is plain DPO.

    Args:
        policy_chosen_logps: [B] π_c.
        policy_rejected_logps: [B] π_r.
        ref_chosen_logps: [B] ρ_c.
        ref_rejected_logps: [B] ρ_r.
        beta: β, strength of the KL penalty towards the reference.
        label_smoothing: ε in [0, 0.5).

    Returns:
        LossOutput with [B] losses and rewards.
    """
    chosen_ratio = policy_chosen_logps - ref_chosen_logps  # [B]
    rejected_ratio = policy_rejected_logps - ref_rejected_logps  # [B]
    logits = beta * (chosen_ratio - rejected_ratio)  # [B] β·h
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return LossOutput(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def robust_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """Robust DPO (Chowdhury et al. 2024, arXiv 2403.00409, eq. 8): unbiased under label noise ε.

    L = [−(1−ε)·log σ(β·h) + ε·log σ(−β·h)] / (1 − 2ε),   rewards r = β·(π − ρ).

    Args:
        policy_chosen_logps: [B] π_c.
        policy_rejected_logps: [B] π_r.
        ref_chosen_logps: [B] ρ_c.
        ref_rejected_logps: [B] ρ_r.
        beta: β.
        label_smoothing: ε in [0, 0.5), the assumed flip rate.

    Returns:
        LossOutput with [B] losses and rewards.
    """
    chosen_ratio = policy_chosen_logps - ref_chosen_logps  # [B]
    rejected_ratio = policy_rejected_logps - ref_rejected_logps  # [B]
    logits = beta * (chosen_ratio - rejected_ratio)  # [B]
    eps = label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)
    return LossOutput(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def hinge_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
) -> LossOutput:
    """Hinge loss of SLiC (Zhao et al. 2023, arXiv 2305.10425, eq. 3) as used by RSO
    (Liu et al. 2023, arXiv 2309.06657): β plays the role of 1/δ.

    L = max(0, 1 − β·h),   rewards r = β·(π − ρ).

    Args:
        policy_chosen_logps: [B] π_c.
        policy_rejected_logps: [B] π_r.
        ref_chosen_logps: [B] ρ_c.
        ref_rejected_logps: [B] ρ_r.
        beta: β.

    Returns:
        LossOutput with [B] losses and rewards.
    """
    chosen_ratio = policy_chosen_logps - ref_chosen_logps  # [B]
    rejected_ratio = policy_rejected_logps - ref_rejected_logps  # [B]
    losses = torch.relu(1 - beta * (chosen_ratio - rejected_ratio))
    return LossOutput(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    *,
    beta: float = 0.1,
) -> LossOutput:
    """IPO (Azar et al. 2023, arXiv 2310.12036, eq. 17) on length-averaged log-ratios, as TRL.

    With ĥ = (π_c − ρ_c)/n_c − (π_r − ρ_r)/n_r:
    L = (ĥ − 1/(2β))²,   rewards r = β·(π − ρ)/n  (also averaged).

    Here β is the paper's τ: the margin IPO regresses to is 1/(2β), so β controls where the
    log-ratio converges (unlike DPO, whose optimum pushes the margin to infinity).

    Args:
        policy_chosen_logps: [B] π_c.
        policy_rejected_logps: [B] π_r.
        ref_chosen_logps: [B] ρ_c.
        ref_rejected_logps: [B] ρ_r.
        chosen_tokens: [B] n_c.
        rejected_tokens: [B] n_r.
        beta: β (τ in the paper).

    Returns:
        LossOutput with [B] losses and rewards.
    """
    chosen_ratio = average_logps(policy_chosen_logps - ref_chosen_logps, chosen_tokens)  # [B]
    rejected_ratio = average_logps(
        policy_rejected_logps - ref_rejected_logps, rejected_tokens
    )  # [B]
    losses = (chosen_ratio - rejected_ratio - 1 / (2 * beta)) ** 2
    return LossOutput(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


# ---------------------------------------------------------------------------------------------
# Reference-free losses
# ---------------------------------------------------------------------------------------------


def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 1.0,
) -> LossOutput:
    """SimPO (Meng et al. 2024, arXiv 2405.14734, eq. 6): length-normalised, no reference.

    L = −log σ(β·π_c/n_c − β·π_r/n_r − γ),   rewards r = β·π/n.

    Args:
        policy_chosen_logps: [B] π_c.
        policy_rejected_logps: [B] π_r.
        chosen_tokens: [B] n_c.
        rejected_tokens: [B] n_r.
        beta: β (the paper uses 2.0–2.5).
        gamma: γ, the target reward margin (the paper's γ, not γ/β).

    Returns:
        LossOutput with [B] losses and rewards.
    """
    chosen_rewards = beta * average_logps(policy_chosen_logps, chosen_tokens)  # [B]
    rejected_rewards = beta * average_logps(policy_rejected_logps, rejected_tokens)  # [B]
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return LossOutput(losses, chosen_rewards.detach(), rejected_rewards.detach())


def _log1m_exp(x: Tensor) -> Tensor:
    """log(1 − exp(x)) for x < 0, stable near 0 and for very negative x."""
    # Mächler's rule: log(−expm1(x)) near 0, log1p(−exp(x)) far from 0.
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    *,
    beta: float = 0.1,
) -> LossOutput:
    """ORPO (Hong et al. 2024, arXiv 2403.07691, eqs. 6–7): SFT plus an odds-ratio term.

    With p = π/n (average log-prob) and log odds(y|x) = p − log(1 − e^p):
    L = −p_c + λ·(−log σ(log odds_c − log odds_r)),   rewards r = β·p.

    `beta` is λ (TRL's convention), also used to scale the reported rewards.

    Args:
        policy_chosen_logps: [B] π_c.
        policy_rejected_logps: [B] π_r.
        chosen_tokens: [B] n_c.
        rejected_tokens: [B] n_r.
        beta: λ, weight of the odds-ratio term.

    Returns:
        LossOutput with [B] losses and rewards.
    """
    # Clamp just below 0: a response with average log-prob 0 has infinite odds.
    avg_chosen = average_logps(policy_chosen_logps, chosen_tokens).clamp(max=-1e-6)  # [B]
    avg_rejected = average_logps(policy_rejected_logps, rejected_tokens).clamp(max=-1e-6)  # [B]
    log_odds = (avg_chosen - _log1m_exp(avg_chosen)) - (avg_rejected - _log1m_exp(avg_rejected))
    losses = -avg_chosen - beta * F.logsigmoid(log_odds)
    return LossOutput(losses, beta * avg_chosen.detach(), beta * avg_rejected.detach())


def sft_loss(
    policy_chosen_logps: Tensor,
    chosen_tokens: Tensor,
) -> LossOutput:
    """Negative log-likelihood of the chosen response per token (the RPO term of
    Pang et al. 2024, arXiv 2404.19733, eq. 3, which adds it to DPO).

    L = −π_c/n_c.   Rewards are zero (this loss defines none).

    Args:
        policy_chosen_logps: [B] π_c.
        chosen_tokens: [B] n_c.

    Returns:
        LossOutput with [B] losses and zero rewards.
    """
    losses = -average_logps(policy_chosen_logps, chosen_tokens)
    zeros = torch.zeros_like(losses).detach()
    return LossOutput(losses, zeros, zeros)


# ---------------------------------------------------------------------------------------------
# Unpaired
# ---------------------------------------------------------------------------------------------


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    labels: Tensor,
    kl_estimate: Tensor,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> LossOutput:
    """KTO (Ethayarajh et al. 2024, arXiv 2402.01306, eq. 8) on unpaired examples.

    With r = π − ρ and z₀ = max(0, KL̂) (detached, the batch estimate of KL(π‖π_ref)):
        desirable:    L = λ_D·(1 − σ(β·(r − z₀)))
        undesirable:  L = λ_U·(1 − σ(β·(z₀ − r)))
    Rewards β·r are returned in `chosen_rewards` for desirable examples and in
    `rejected_rewards` for undesirable ones (NaN elsewhere: callers use nanmean).

    Args:
        policy_logps: [N] summed log π(y|x).
        ref_logps: [N] summed log π_ref(y|x).
        labels: [N] bool, True for desirable.
        kl_estimate: [] scalar mean of (π − ρ) on mismatched (x_i, y_j) pairs.
        beta: β.
        desirable_weight: λ_D.
        undesirable_weight: λ_U.

    Returns:
        LossOutput with [N] losses and rewards.
    """
    z0 = kl_estimate.detach().clamp(min=0)  # []
    ratio = policy_logps - ref_logps  # [N]
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (ratio - z0)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - ratio)))
    losses = torch.where(labels, desirable, undesirable)
    rewards = beta * ratio.detach()
    nan = torch.full_like(rewards, float("nan"))
    return LossOutput(losses, torch.where(labels, rewards, nan), torch.where(labels, nan, rewards))
