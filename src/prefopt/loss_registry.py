"""The loss registry: losses chosen by name, with what each one needs.

Each `LossSpec` declares the inputs its loss reads (policy and reference log-probs, token
counts) and whether it works on paired or unpaired data, so that a config asking for an
unsupported combination, or a call missing an input, is refused with a clear message instead of
silently running another loss.
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


REFERENCE_INPUTS = frozenset({"ref_chosen", "ref_rejected", "ref_logps"})
"""Inputs that come from a reference model: a loss declaring one needs a reference."""

_INPUT_KINDS = {
    "policy_chosen": "policy log-probs",
    "policy_rejected": "policy log-probs",
    "ref_chosen": "reference log-probs",
    "ref_rejected": "reference log-probs",
    "chosen_tokens": "response token counts",
    "rejected_tokens": "response token counts",
}
_HINTS = {
    "reference log-probs": "score the pairs with a reference model too, or pick a "
    "reference-free loss (simpo, orpo, sft)",
    "response token counts": "pass the counts SequenceLogprobModel returns next to the "
    "log-probs (PairLogps.chosen_tokens / rejected_tokens)",
    "policy log-probs": "fill PairLogps.policy_chosen / policy_rejected",
}


@dataclass(frozen=True)
class LossSpec:
    """A registered loss.

    Attributes:
        name: Registry key.
        data: "paired" or "unpaired".
        paper: Short citation for messages and docs.
        inputs: The tensors the loss reads, in the order its function in `prefopt.losses` takes
            them: `PairLogps` field names for paired losses (checked by `check_inputs` before
            the loss runs), `kto_loss`'s argument names for KTO (the training step builds all
            of them). A reference input (`REFERENCE_INPUTS`) means the loss needs a reference.
        uses: Which `LossParams` fields the loss reads.
        defines_rewards: False for losses whose rewards are placeholders (sft).
        compute: (PairLogps, LossParams) -> LossOutput; None for unpaired losses (kto), which the
            training step calls directly.
    """

    name: str
    data: str
    paper: str
    inputs: tuple[str, ...]
    uses: tuple[str, ...] = ("beta",)
    defines_rewards: bool = True
    compute: Callable[[PairLogps, LossParams], LossOutput] | None = None

    @property
    def needs_reference(self) -> bool:
        """True if the loss reads reference log-probs."""
        return not REFERENCE_INPUTS.isdisjoint(self.inputs)


def missing_inputs(spec: LossSpec, logps: PairLogps) -> list[str]:
    """The declared inputs of a paired loss that `logps` leaves as None, in declared order."""
    return [name for name in spec.inputs if getattr(logps, name, None) is None]


def check_inputs(spec: LossSpec, logps: PairLogps) -> None:
    """Refuse, naming what is missing and how to supply it, when `logps` lacks an input `spec`
    declares (e.g. token counts for ipo, reference log-probs for sigmoid)."""
    missing = missing_inputs(spec, logps)
    if not missing:
        return
    kinds = list(dict.fromkeys(_INPUT_KINDS.get(name, name) for name in missing))
    what = "; ".join(
        f"{kind} ({', '.join(n for n in missing if _INPUT_KINDS.get(n, n) == kind)})"
        for kind in kinds
    )
    hints = "; ".join(_HINTS[kind] for kind in kinds if kind in _HINTS)
    raise ValueError(f"loss '{spec.name}' needs {what}, none were given: {hints}")


def _take(x: PairLogps, name: str) -> list[torch.Tensor]:
    """Loss `name`'s declared inputs from `x`, in order, after `check_inputs`."""
    spec = LOSSES[name]
    check_inputs(spec, x)
    return [getattr(x, field) for field in spec.inputs]


def _sigmoid(x: PairLogps, p: LossParams) -> LossOutput:
    return L.sigmoid_loss(*_take(x, "sigmoid"), beta=p.beta, label_smoothing=p.label_smoothing)


def _robust(x: PairLogps, p: LossParams) -> LossOutput:
    return L.robust_loss(*_take(x, "robust"), beta=p.beta, label_smoothing=p.label_smoothing)


def _hinge(x: PairLogps, p: LossParams) -> LossOutput:
    return L.hinge_loss(*_take(x, "hinge"), beta=p.beta)


def _ipo(x: PairLogps, p: LossParams) -> LossOutput:
    return L.ipo_loss(*_take(x, "ipo"), beta=p.beta)


def _simpo(x: PairLogps, p: LossParams) -> LossOutput:
    return L.simpo_loss(*_take(x, "simpo"), beta=p.beta, gamma=p.simpo_gamma)


def _orpo(x: PairLogps, p: LossParams) -> LossOutput:
    return L.orpo_loss(*_take(x, "orpo"), beta=p.beta)


def _sft(x: PairLogps, p: LossParams) -> LossOutput:
    return L.sft_loss(*_take(x, "sft"))


_POLICY = ("policy_chosen", "policy_rejected")
_WITH_REF = (*_POLICY, "ref_chosen", "ref_rejected")
_COUNTS = ("chosen_tokens", "rejected_tokens")
_SMOOTH = ("beta", "label_smoothing")
_KTO = ("beta", "kto_desirable_weight", "kto_undesirable_weight")

LOSSES: dict[str, LossSpec] = {
    s.name: s
    for s in (
        LossSpec(
            "sigmoid", "paired", "DPO, Rafailov et al. 2023", _WITH_REF, _SMOOTH, compute=_sigmoid
        ),
        LossSpec(
            "robust", "paired", "rDPO, Chowdhury et al. 2024", _WITH_REF, _SMOOTH, compute=_robust
        ),
        LossSpec("hinge", "paired", "SLiC/RSO, Zhao et al. 2023", _WITH_REF, compute=_hinge),
        LossSpec("ipo", "paired", "IPO, Azar et al. 2023", (*_WITH_REF, *_COUNTS), compute=_ipo),
        LossSpec(
            "simpo",
            "paired",
            "SimPO, Meng et al. 2024",
            (*_POLICY, *_COUNTS),
            ("beta", "simpo_gamma"),
            compute=_simpo,
        ),
        LossSpec("orpo", "paired", "ORPO, Hong et al. 2024", (*_POLICY, *_COUNTS), compute=_orpo),
        LossSpec(
            "sft",
            "paired",
            "NLL on chosen (RPO), Pang et al. 2024",
            ("policy_chosen", "chosen_tokens"),
            (),
            defines_rewards=False,
            compute=_sft,
        ),
        LossSpec(
            "kto",
            "unpaired",
            "KTO, Ethayarajh et al. 2024",
            ("policy_logps", "ref_logps", "labels", "kl_estimate"),
            _KTO,
        ),
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
        logps: The log-probs every loss reads from; each loss's declared `inputs` must be set
            (else ValueError naming the missing ones).
        params: Hyper-parameters.

    Returns:
        LossOutput whose losses are Σ wᵢ·Lᵢ ([B]).
    """
    if len(names) != len(weights):
        raise ValueError(f"{len(names)} losses but {len(weights)} loss_weights")
    total: torch.Tensor | None = None
    rewards: LossOutput | None = None
    specs = [get_loss(name) for name in names]
    for spec in specs:  # refuse before computing anything
        if spec.compute is None:
            raise ValueError(f"loss '{spec.name}' works on unpaired data and cannot be combined")
        check_inputs(spec, logps)
    for spec, weight in zip(specs, weights, strict=True):
        assert spec.compute is not None
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
