"""Preference metrics of a policy over a whole dataset, without training.

Uses the same step functions as training, so `eval` numbers equal the training loop's own
metrics on the same batch, in the same layout (two rows per pair, or shared prefixes), for
pairs and for KTO's unpaired rows alike.

An evaluation also reports what only a whole, fixed eval set shows (the health checks read
them from the eval records):
    ref_logps/chosen, ref_logps/rejected   mean reference log-probs; a frozen reference gives
                                           the same values at every evaluation (drift check)
    length/margin_corr                     Pearson r of each pair's length gap (chosen −
                                           rejected tokens) and its reward margin (length bias)
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from prefopt.collate import PairBatch, collate_examples, collate_pairs
from prefopt.loss_registry import LossParams
from prefopt.metrics import MetricAccumulator
from prefopt.prefix_collate import SharedPrefixBatch, collate_shared_prefix
from prefopt.reference import Reference
from prefopt.series_stats import correlation
from prefopt.sft import collate_sft, is_sft_batch, sft_step
from prefopt.step import StepOutput, paired_step, unpaired_step
from prefopt.tokenize import TokenizedExample, TokenizedPair

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)


def loss_params(loss_cfg: Any) -> LossParams:
    """LossParams from a LossConfig."""
    return LossParams(
        beta=loss_cfg.beta,
        label_smoothing=loss_cfg.label_smoothing,
        simpo_gamma=loss_cfg.simpo_gamma,
        kto_desirable_weight=loss_cfg.kto_desirable_weight,
        kto_undesirable_weight=loss_cfg.kto_undesirable_weight,
    )


def micro_step(
    scorer: nn.Module,
    reference: Reference | None,
    examples: Sequence[TokenizedPair | TokenizedExample],
    positions: Sequence[int],
    loss_cfg: Any,
    *,
    pad_token_id: int,
    device: Any,
    split: str = "train",
    reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None = None,
    max_length: int | None = None,
    prefix_sharing: bool = False,
    pack: bool = False,
) -> tuple[StepOutput, int]:
    """Collate `examples` (dataset `positions`) and run the loss; returns (output, tokens).

    `pack`: with `prefix_sharing`, fill the rows' padding with whole pairs (`train.packing`).

    `prefix_sharing`: lay pairs out as shared-prefix rows (the scorer, and a model reference's
    scorer, must be `SharedPrefixLogprobModel`s); unpaired and SFT rows ignore it. Tokens count
    each prompt twice either way, so throughput and `tokens_seen` don't depend on the layout.
    """
    params = loss_params(loss_cfg)
    if is_sft_batch(examples):
        sft_batch = collate_sft(list(examples), pad_token_id=pad_token_id).to(device)  # type: ignore[arg-type]
        return sft_step(scorer, sft_batch), sft_batch.num_tokens
    if examples and isinstance(examples[0], TokenizedExample):
        assert reference is not None, "kto needs a reference"
        ex_batch = collate_examples(
            list(examples),  # type: ignore[arg-type]
            pad_token_id=pad_token_id,
            with_kl=True,
            max_length=max_length,  # mismatched KL rows can outgrow either source row
        ).to(device)
        out = unpaired_step(scorer, reference, ex_batch, positions, params, reduce_mean, split)
        return out, int(ex_batch.attention_mask.sum().item())
    pairs: list[TokenizedPair] = list(examples)  # type: ignore[arg-type]
    batch: PairBatch | SharedPrefixBatch
    if prefix_sharing:
        batch = collate_shared_prefix(pairs, pad_token_id=pad_token_id, pack=pack).to(device)
        tokens = batch.pair_tokens
    else:
        batch = collate_pairs(pairs, pad_token_id=pad_token_id).to(device)
        tokens = batch.num_tokens
    names = loss_cfg.names
    weights = loss_cfg.weights or [1.0] * len(names)
    out = paired_step(scorer, reference, batch, positions, names, weights, params, split)
    return out, tokens


@torch.no_grad()
def evaluate_dataset(
    scorer: nn.Module,
    reference: Reference | None,
    examples: Sequence[TokenizedPair] | Sequence[TokenizedExample],
    loss_cfg: Any,
    *,
    batch_size: int,
    pad_token_id: int,
    device: Any,
    split: str = "eval",
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    on_batch: Callable[[Sequence[int], StepOutput], None] | None = None,
    max_length: int | None = None,
    prefix_sharing: bool = False,
    pack: bool = False,
) -> dict[str, float]:
    """Mean metrics over `examples` in eval mode (no dropout), in order, batch by batch
    (`prefix_sharing`, `pack`: see `micro_step`).

    Besides the training metrics: `ref_logps/chosen` and `ref_logps/rejected` (with a
    reference; for KTO split by label like `logps/*`), and for pairs `length/margin_corr`
    (see the module docstring; over this process's pairs, `reduce` does not apply to it).
    `on_batch` sees each batch's output with the `ref_logps/*` values added.

    The reference log-probs come with each step's output, and the length gaps and margins
    stay tensors until the end: neither reads values back from the device per batch.
    """
    was_training = scorer.training
    scorer.eval()
    acc = MetricAccumulator()
    gaps: list[torch.Tensor] = []  # [B] per batch: chosen tokens − rejected tokens
    margins: list[torch.Tensor] = []  # [B] per batch
    try:
        for start in range(0, len(examples), batch_size):
            positions = list(range(start, min(start + batch_size, len(examples))))
            chunk = [examples[i] for i in positions]
            out, _ = micro_step(
                scorer, reference, chunk, positions, loss_cfg,
                pad_token_id=pad_token_id, device=device, split=split, max_length=max_length,
                prefix_sharing=prefix_sharing, pack=pack,
            )  # fmt: skip
            out = _with_reference_logps(out, chunk)
            acc.add(out.metrics)
            m = out.metrics
            if out.logps is not None and "tokens/chosen" in m and "tokens/rejected" in m:
                gaps.append(m["tokens/chosen"] - m["tokens/rejected"])
                margins.append(m["rewards/margins"])
            if on_batch is not None:
                on_batch(positions, out)
    finally:
        scorer.train(was_training)
    metrics = acc.compute(reduce)
    if sum(len(g) for g in gaps) >= 2:
        metrics["length/margin_corr"] = correlation(
            torch.cat(gaps).tolist(), torch.cat(margins).tolist()
        )
    metrics["num_pairs"] = float(len(examples))
    return metrics


def _with_reference_logps(
    out: StepOutput, chunk: Sequence[TokenizedPair | TokenizedExample]
) -> StepOutput:
    """`out` with per-row `ref_logps/chosen|rejected` metrics ([B]; NaN where a KTO row has
    the other label, as in `logps/*`); unchanged without reference log-probs (SFT, or a
    reference-free loss)."""
    ref = _reference_metrics(out, chunk)
    return out if ref is None else dataclasses.replace(out, metrics={**out.metrics, **ref})


def _reference_metrics(
    out: StepOutput, chunk: Sequence[TokenizedPair | TokenizedExample]
) -> dict[str, torch.Tensor] | None:
    if out.logps is not None:
        if out.logps.ref_chosen is None or out.logps.ref_rejected is None:
            return None
        return {
            "ref_logps/chosen": out.logps.ref_chosen,
            "ref_logps/rejected": out.logps.ref_rejected,
        }
    if out.ref_logps is None:
        return None
    values = out.ref_logps.float()  # [N]
    labels = torch.tensor([bool(e.label) for e in chunk], device=values.device)  # type: ignore[union-attr]
    nan = torch.full_like(values, float("nan"))
    return {
        "ref_logps/chosen": torch.where(labels, values, nan),
        "ref_logps/rejected": torch.where(labels, nan, values),
    }
