"""The loss registry: losses chosen by name, with what each one needs.

Each `LossSpec` says whether its loss reads a reference model and whether it works on paired
or unpaired data, so that a config asking for an unsupported combination is refused with a
clear message instead of silently running another loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from prefopt import losses as L
from prefopt.losses import LossOutput, PairLogps


@dataclass(frozen=True)
class LossParams:
    """Hyper-parameters passed on to the losses (each loss reads the ones it uses)."""

    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 1.0
    kto_desirable_weight: float = 1.0
    kto_undesirable_weight: float = 1.0


@dataclass(frozen=True)
class LossSpec:
    """A registered loss.

    Attributes:
        name: Registry key.
        needs_reference: True if the loss reads reference log-probs.
        data: "paired" or "unpaired".
        paper: Short citation for messages and docs.
        uses: Which `LossParams` fields the loss reads.
        defines_rewards: False for losses whose rewards are placeholders (sft).
        compute: (PairLogps, LossParams) -> LossOutput; None for unpaired losses (kto), which the
            training step calls directly.
    """

    name: str
    needs_reference: bool
    data: str
    paper: str
    uses: tuple[str, ...] = ("beta",)
    defines_rewards: bool = True
    compute: Callable[[PairLogps, LossParams], LossOutput] | None = None


def _refs(x: PairLogps, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if x.ref_chosen is None or x.ref_rejected is None:
        raise ValueError(f"loss '{name}' needs reference log-probs, none were given")
    return x.ref_chosen, x.ref_rejected


def _sigmoid(x: PairLogps, p: LossParams) -> LossOutput:
    rc, rr = _refs(x, "sigmoid")
    return L.sigmoid_loss(
        x.policy_chosen, x.policy_rejected, rc, rr, beta=p.beta, label_smoothing=p.label_smoothing
    )


def _robust(x: PairLogps, p: LossParams) -> LossOutput:
    rc, rr = _refs(x, "robust")
    return L.robust_loss(
        x.policy_chosen, x.policy_rejected, rc, rr, beta=p.beta, label_smoothing=p.label_smoothing
    )


def _hinge(x: PairLogps, p: LossParams) -> LossOutput:
    rc, rr = _refs(x, "hinge")
    return L.hinge_loss(x.policy_chosen, x.policy_rejected, rc, rr, beta=p.beta)


def _ipo(x: PairLogps, p: LossParams) -> LossOutput:
    rc, rr = _refs(x, "ipo")
    return L.ipo_loss(
        x.policy_chosen,
        x.policy_rejected,
        rc,
        rr,
        x.chosen_tokens,
        x.rejected_tokens,
        beta=p.beta,
    )


def _simpo(x: PairLogps, p: LossParams) -> LossOutput:
    return L.simpo_loss(
        x.policy_chosen,
        x.policy_rejected,
        x.chosen_tokens,
        x.rejected_tokens,
        beta=p.beta,
        gamma=p.simpo_gamma,
    )


def _orpo(x: PairLogps, p: LossParams) -> LossOutput:
    return L.orpo_loss(
        x.policy_chosen, x.policy_rejected, x.chosen_tokens, x.rejected_tokens, beta=p.beta
    )


def _sft(x: PairLogps, p: LossParams) -> LossOutput:
    return L.sft_loss(x.policy_chosen, x.chosen_tokens)


_SMOOTH = ("beta", "label_smoothing")
_KTO = ("beta", "kto_desirable_weight", "kto_undesirable_weight")

LOSSES: dict[str, LossSpec] = {
    s.name: s
    for s in (
        LossSpec("sigmoid", True, "paired", "DPO, Rafailov et al. 2023", _SMOOTH, compute=_sigmoid),
        LossSpec("robust", True, "paired", "rDPO, Chowdhury et al. 2024", _SMOOTH, compute=_robust),
        LossSpec("hinge", True, "paired", "SLiC/RSO, Zhao et al. 2023", compute=_hinge),
        LossSpec("ipo", True, "paired", "IPO, Azar et al. 2023", compute=_ipo),
        LossSpec(
            "simpo",
            False,
            "paired",
            "SimPO, Meng et al. 2024",
            ("beta", "simpo_gamma"),
            compute=_simpo,
        ),  # fmt: skip
        LossSpec("orpo", False, "paired", "ORPO, Hong et al. 2024", compute=_orpo),
        LossSpec(
            "sft",
            False,
            "paired",
            "NLL on chosen (RPO), Pang et al. 2024",
            (),
            defines_rewards=False,
            compute=_sft,
        ),  # fmt: skip
        LossSpec("kto", True, "unpaired", "KTO, Ethayarajh et al. 2024", _KTO),
    )
}


def get_loss(name: str) -> LossSpec:
    """Look a loss up by name; the error lists the known names."""
    try:
        return LOSSES[name]
    except KeyError:
        known = ", ".join(sorted(LOSSES))
        raise ValueError(f"unknown loss '{name}'; known losses: {known}") from None


def combined_loss(
    names: tuple[str, ...] | list[str],
    weights: tuple[float, ...] | list[float],
    logps: PairLogps,
    params: LossParams,
) -> LossOutput:
    """Weighted sum of paired losses, e.g. ["sigmoid", "sft"] with [1.0, 0.2] (RPO).

    The rewards reported are those of the first loss that defines rewards.

    Args:
        names: Loss names from `LOSSES`, all paired.
        weights: One weight per loss.
        logps: The log-probs every loss reads from.
        params: Hyper-parameters.

    Returns:
        LossOutput whose losses are Σ wᵢ·Lᵢ ([B]).
    """
    if len(names) != len(weights):
        raise ValueError(f"{len(names)} losses but {len(weights)} loss_weights")
    total: torch.Tensor | None = None
    rewards: LossOutput | None = None
    for name, weight in zip(names, weights, strict=True):
        spec = get_loss(name)
        if spec.compute is None:
            raise ValueError(f"loss '{name}' works on unpaired data and cannot be combined")
        out = spec.compute(logps, params)
        total = weight * out.losses if total is None else total + weight * out.losses
        if rewards is None and spec.defines_rewards:
            rewards = out
    if total is None:
        raise ValueError("no loss given")
    if rewards is None:  # only reward-less losses (e.g. sft alone)
        zeros = torch.zeros_like(total).detach()
        return LossOutput(total, zeros, zeros)
    return LossOutput(total, rewards.chosen_rewards, rewards.rejected_rewards)
