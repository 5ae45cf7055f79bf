"""One micro-batch: log-probs of policy and reference, then the configured loss.

Paired data (every loss but KTO) and unpaired data (KTO) each have one function here; the
training loop and `prefopt eval` both call them, so their numbers cannot disagree. Pairs come in
either layout (two rows per pair, or one shared-prefix row per pair); both give the same
log-probs up to float rounding.
"""

from __future__ import annotations

import functools
import logging
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

logger = logging.getLogger(__name__)
Tensor = torch.Tensor


@dataclass(frozen=True)
class StepOutput:
    """Per-pair (or per-example) losses with gradient, and per-pair metric values."""

    losses: Tensor  # [B]
    metrics: dict[str, Tensor]  # name -> [B]
    logps: PairLogps | None = None  # the log-probs behind them (paired data)
    # Unpaired data: [N] reference log-probs of the examples, which the metrics (rewards) hide;
    # evaluation reports them. Pairs carry theirs in `logps`.
    ref_logps: Tensor | None = None


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


def kl_estimate(
    policy: nn.Module,
    reference: Reference,
    batch: ExampleBatch,
    positions: Sequence[int],
    reduce_mean: Callable[[Tensor], Tensor] | None = None,
    split: str = "train",
) -> Tensor:
    """KTO's batch estimate of KL(π‖π_ref): the mean of π − ρ over the mismatched KL rows.

    Ethayarajh et al. 2024 (arXiv 2402.01306, §4.1) estimate z₀ from (x_i, y_j) pairs of the
    same micro-batch and pass no gradient through it, so the policy scores the KL rows under
    no_grad and the result is detached. With `reduce_mean`, every process contributes its
    (sum, row count) and the estimate is the mean over all KL rows of all processes; it is
    called on every process even when this one has no KL rows, so the collective never hangs.

    A micro-batch of one example has no mismatched pair (`collate_examples` builds no KL rows
    for N = 1): it contributes nothing, and where no process has any KL row the estimate is
    0 (z₀ = 0: rewards are compared with 0 instead of the KL). A warning says so, once.

    Returns:
        [] float32 detached estimate (before KTO's clamp at 0).
    """
    stats = torch.zeros(2, device=batch.input_ids.device)  # [Σ(π − ρ), number of KL rows]
    if batch.kl_input_ids is None:
        _warn_no_kl_rows(batch.num_examples)
    else:
        assert batch.kl_attention_mask is not None and batch.kl_response_mask is not None
        rows = _KLRows(batch.kl_input_ids, batch.kl_attention_mask, batch.kl_response_mask)
        with torch.no_grad():
            kl_policy, _ = policy(rows.input_ids, rows.attention_mask, rows.response_mask)
        kl_ref = reference.row_logps(rows, [(split, p, "kl") for p in positions])  # [N]
        diff = (kl_policy - kl_ref).float()  # [N]
        stats = torch.stack([diff.sum(), torch.tensor(float(diff.numel()), device=diff.device)])
    if reduce_mean is not None:
        stats = reduce_mean(stats)  # means over processes: their ratio is the global mean
    return (stats[0] / stats[1].clamp(min=1.0)).detach()  # [] (0 with no KL rows anywhere)


@functools.cache
def _warn_no_kl_rows(n: int) -> None:
    logger.warning(
        "KTO: a micro-batch of %d example(s) has no mismatched (prompt, completion) pair for "
        "the KL estimate; it contributes none, and z0 is 0 where no process has one "
        "(use train.batch_size >= 2 per process)",
        n,
    )


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
    gradient, as in the KTO paper (see `kl_estimate`); `reduce_mean` averages it across
    processes.
    """
    logps, tokens = policy(batch.input_ids, batch.attention_mask, batch.response_mask)  # [N]
    ref = reference.row_logps(batch, [(split, p, "completion") for p in positions])  # [N]
    kl = kl_estimate(policy, reference, batch, positions, reduce_mean, split)  # []
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
    return StepOutput(out.losses, metrics, ref_logps=ref.detach())


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
