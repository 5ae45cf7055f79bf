"""Preference metrics of a policy over a whole dataset, without training.

Uses the same step functions as training, so `eval` numbers equal the training loop's own
metrics on the same batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from prefopt.collate import collate_examples, collate_pairs
from prefopt.loss_registry import LossParams
from prefopt.metrics import MetricAccumulator
from prefopt.reference import Reference
from prefopt.step import StepOutput, paired_step, unpaired_step
from prefopt.tokenize import TokenizedExample, TokenizedPair


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
    examples: Sequence[TokenizedPair] | Sequence[TokenizedExample],
    positions: Sequence[int],
    loss_cfg: Any,
    *,
    pad_token_id: int,
    device: Any,
    split: str = "train",
    reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[StepOutput, int]:
    """Collate `examples` (dataset `positions`) and run the loss; returns (output, tokens)."""
    params = loss_params(loss_cfg)
    if examples and isinstance(examples[0], TokenizedExample):
        assert reference is not None, "kto needs a reference"
        ex_batch = collate_examples(
            list(examples),  # type: ignore[arg-type]
            pad_token_id=pad_token_id,
            with_kl=True,
        ).to(device)
        out = unpaired_step(scorer, reference, ex_batch, positions, params, reduce_mean, split)
        return out, int(ex_batch.attention_mask.sum().item())
    batch = collate_pairs(list(examples), pad_token_id=pad_token_id).to(device)  # type: ignore[arg-type]
    names = loss_cfg.names
    weights = loss_cfg.weights or [1.0] * len(names)
    out = paired_step(scorer, reference, batch, positions, names, weights, params, split)
    return out, batch.num_tokens


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
) -> dict[str, float]:
    """Mean metrics over `examples` in eval mode (no dropout), in order, batch by batch."""
    was_training = scorer.training
    scorer.eval()
    acc = MetricAccumulator()
    try:
        for start in range(0, len(examples), batch_size):
            positions = list(range(start, min(start + batch_size, len(examples))))
            chunk = [examples[i] for i in positions]
            out, _ = micro_step(
                scorer, reference, chunk, positions, loss_cfg,
                pad_token_id=pad_token_id, device=device, split=split,
            )  # fmt: skip
            acc.add(out.metrics)
            if on_batch is not None:
                on_batch(positions, out)
    finally:
        scorer.train(was_training)
    metrics = acc.compute(reduce)
    metrics["num_pairs"] = float(len(examples))
    return metrics
