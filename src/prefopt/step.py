"""One micro-batch: log-probs of policy and reference, then the configured loss.

Paired data (every loss but KTO) and unpaired data (KTO) each have one function here; the
training loop and `prefopt eval` both call them, so their numbers cannot disagree. Pairs come in
either layout (two rows per pair, or one shared-prefix row per pair); both give the same
log-probs up to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from prefopt.collate import ExampleBatch, PairBatch
from prefopt.loss_registry import LossParams, combined_loss
from prefopt.losses import LossOutput, PairLogps, kto_loss
from prefopt.metrics import pair_metrics
from prefopt.prefix_sharing import SharedPrefixBatch, pair_row_logps
from prefopt.reference import Reference

Tensor = torch.Tensor


@dataclass(frozen=True)
class StepOutput:
    """Per-pair (or per-example) losses with gradient, and per-pair metric values."""

    losses: Tensor  # [B]
    metrics: dict[str, Tensor]  # name -> [B]
    logps: PairLogps | None = None  # the log-probs behind them (paired data)


def pair_keys(positions: Sequence[int], split: str = "train") -> list[Hashable]:
    """Row keys of a PairBatch: chosen rows first, then rejected, as `collate_pairs` lays them."""
    keys: list[Hashable] = [(split, p, "chosen") for p in positions]
    return keys + [(split, p, "rejected") for p in positions]


def paired_logps(
    policy: nn.Module,
    reference: Reference | None,
    batch: PairBatch | SharedPrefixBatch,
    positions: Sequence[int],
    split: str = "train",
) -> PairLogps:
    """Policy (with gradient) and reference log-probs of a batch of pairs (either layout; a
    `SharedPrefixBatch` needs a `SharedPrefixLogprobModel` policy)."""
    logps, tokens = pair_row_logps(policy, batch)  # [2B], chosen rows first
    b = batch.num_pairs
    ref = reference.row_logps(batch, pair_keys(positions, split)) if reference is not None else None
    return PairLogps(
        policy_chosen=logps[:b],
        policy_rejected=logps[b:],
        chosen_tokens=tokens[:b],
        rejected_tokens=tokens[b:],
        ref_chosen=None if ref is None else ref[:b],
        ref_rejected=None if ref is None else ref[b:],
    )


def paired_step(
    policy: nn.Module,
    reference: Reference | None,
    batch: PairBatch | SharedPrefixBatch,
    positions: Sequence[int],
    names: Sequence[str],
    weights: Sequence[float],
    params: LossParams,
    split: str = "train",
) -> StepOutput:
    """Loss and metrics of one batch of pairs (`split` names the rows for a precomputed ref)."""
    logps = paired_logps(policy, reference, batch, positions, split)
    out = combined_loss(list(names), list(weights), logps, params)
    return StepOutput(out.losses, pair_metrics(out, logps), logps)


@dataclass
class _KLRows:
    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor


def unpaired_step(
    policy: nn.Module,
    reference: Reference,
    batch: ExampleBatch,
    positions: Sequence[int],
    params: LossParams,
    reduce_mean: Callable[[Tensor], Tensor] | None = None,
    split: str = "train",
) -> StepOutput:
    """KTO loss and metrics of one batch of unpaired examples.

    The KL estimate z₀ uses mismatched rows (prompt i with completion i+1) scored without
    gradient, as in the KTO paper; `reduce_mean` averages it across processes.
    """
    logps, tokens = policy(batch.input_ids, batch.attention_mask, batch.response_mask)  # [N]
    ref = reference.row_logps(batch, [(split, p, "completion") for p in positions])  # [N]
    kl = torch.zeros((), device=logps.device)
    if batch.kl_input_ids is not None:
        assert batch.kl_attention_mask is not None and batch.kl_response_mask is not None
        rows = _KLRows(batch.kl_input_ids, batch.kl_attention_mask, batch.kl_response_mask)
        with torch.no_grad():
            kl_policy, _ = policy(rows.input_ids, rows.attention_mask, rows.response_mask)
        kl_ref = reference.row_logps(rows, [(split, p, "kl") for p in positions])
        kl = (kl_policy - kl_ref).mean()
        if reduce_mean is not None:
            kl = reduce_mean(kl)
    out = kto_loss(
        logps,
        ref,
        batch.labels,
        kl,
        beta=params.beta,
        desirable_weight=params.kto_desirable_weight,
        undesirable_weight=params.kto_undesirable_weight,
    )
    metrics = _kto_metrics(out, logps, tokens, batch.labels, kl)
    return StepOutput(out.losses, metrics)


def _kto_metrics(
    out: LossOutput, logps: Tensor, tokens: Tensor, labels: Tensor, kl: Tensor
) -> dict[str, Tensor]:
    nan = torch.full_like(logps, float("nan")).detach()
    return {
        "loss": out.losses.detach(),
        "rewards/chosen": out.chosen_rewards,
        "rewards/rejected": out.rejected_rewards,
        "logps/chosen": torch.where(labels, logps.detach(), nan),
        "logps/rejected": torch.where(labels, nan, logps.detach()),
        "tokens/completion": tokens.float(),
        "kl": kl.detach().expand_as(logps),
    }
