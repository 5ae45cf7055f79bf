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
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from prefopt.collate import PairBatch, collate_examples, collate_pairs
from prefopt.loss_registry import LossParams
from prefopt.metrics import MetricAccumulator
from prefopt.prefix_collate import SharedPrefixBatch, collate_shared_prefix
from prefopt.reference import Reference, Rows
from prefopt.series_stats import correlation
from prefopt.sft import collate_sft, is_sft_batch, sft_step
from prefopt.step import StepOutput, paired_step, unpaired_step
from prefopt.tokenize import TokenizedExample, TokenizedPair

if TYPE_CHECKING:
    from prefopt.config import ExperimentConfig

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
    """
    was_training = scorer.training
    scorer.eval()
    acc = MetricAccumulator()
    gaps: list[float] = []  # per pair: chosen tokens − rejected tokens
    margins: list[float] = []
    recorder = _RecordingReference(reference) if reference is not None else None
    try:
        for start in range(0, len(examples), batch_size):
            positions = list(range(start, min(start + batch_size, len(examples))))
            chunk = [examples[i] for i in positions]
            if recorder is not None:
                recorder.values.clear()
            out, _ = micro_step(
                scorer, recorder, chunk, positions, loss_cfg,
                pad_token_id=pad_token_id, device=device, split=split, max_length=max_length,
                prefix_sharing=prefix_sharing, pack=pack,
            )  # fmt: skip
            out = _with_reference_logps(out, chunk, positions, recorder, split)
            acc.add(out.metrics)
            m = out.metrics
            if out.logps is not None and "tokens/chosen" in m and "tokens/rejected" in m:
                gaps += (m["tokens/chosen"] - m["tokens/rejected"]).tolist()
                margins += m["rewards/margins"].tolist()
            if on_batch is not None:
                on_batch(positions, out)
    finally:
        scorer.train(was_training)
    metrics = acc.compute(reduce)
    if len(gaps) >= 2:
        metrics["length/margin_corr"] = correlation(gaps, margins)
    metrics["num_pairs"] = float(len(examples))
    return metrics


class _RecordingReference:
    """A reference that keeps what it returned per row key: KTO's step returns metrics only,
    and its per-example rows and `ref_logps/*` need the reference's values."""

    def __init__(self, inner: Reference) -> None:
        self.inner = inner
        self.strategy = inner.strategy
        self.equals_initial_policy = inner.equals_initial_policy
        self.values: dict[Hashable, float] = {}

    def row_logps(self, rows: Rows, keys: Sequence[Hashable]) -> torch.Tensor:
        logps = self.inner.row_logps(rows, keys)
        if keys:
            self.values.update(zip(keys, logps.tolist(), strict=True))
        return logps


def _with_reference_logps(
    out: StepOutput,
    chunk: Sequence[TokenizedPair | TokenizedExample],
    positions: Sequence[int],
    recorder: _RecordingReference | None,
    split: str,
) -> StepOutput:
    """`out` with per-row `ref_logps/chosen|rejected` metrics ([B]; NaN where a KTO row has
    the other label, as in `logps/*`)."""
    if out.logps is not None:
        if out.logps.ref_chosen is None or out.logps.ref_rejected is None:
            return out
        ref = {
            "ref_logps/chosen": out.logps.ref_chosen,
            "ref_logps/rejected": out.logps.ref_rejected,
        }
    elif recorder is not None and chunk and isinstance(chunk[0], TokenizedExample):
        keys = [(split, p, "completion") for p in positions]
        if not all(k in recorder.values for k in keys):
            return out  # an SFT batch: no reference
        values = torch.tensor([recorder.values[k] for k in keys])  # [N]
        labels = torch.tensor([bool(e.label) for e in chunk])  # type: ignore[union-attr]
        nan = torch.full_like(values, float("nan"))
        ref = {
            "ref_logps/chosen": torch.where(labels, values, nan),
            "ref_logps/rejected": torch.where(labels, nan, values),
        }
    else:
        return out
    return dataclasses.replace(out, metrics={**out.metrics, **ref})


# ---------------------------------------------------------------------------------------------
# `prefopt eval`: metrics of a saved policy against a reference, no training
# ---------------------------------------------------------------------------------------------


def checkpoint_run(cfg: Any, location: str) -> ExperimentConfig | None:
    """The config of the training run whose checkpoint folder `location` is (None: another
    kind of folder), its model settings as this command loads models.

    The command's dtype and trust_remote_code replace the run's: a folder handed to `judge`
    must not turn on remote code by itself. Gradient checkpointing goes off (it disables the
    generation cache).
    """
    from prefopt.checkpoint import checkpoint_run_config

    run = checkpoint_run_config(location)
    if run is not None:
        run.model = dataclasses.replace(
            run.model, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code,
            gradient_checkpointing=False,
        )  # fmt: skip
    return run


def load_policy(cfg: Any, location: str) -> nn.Module:
    """A causal LM from a model folder, base + adapter from a peft adapter folder, or a
    training checkpoint: its run's starting model built as training built it (LoRA-wrapped if
    the run was), holding the checkpoint's trainable weights."""
    import json
    from pathlib import Path

    from prefopt.checkpoint import checkpoint_step, load_trainable
    from prefopt.models import disable_dropout, load_causal_lm, quiet_peft_wrapping
    from prefopt.run_setup import build_policy

    model: nn.Module
    adapter_cfg = Path(location) / "adapter_config.json"
    run = checkpoint_run(cfg, location)
    if run is not None:
        model = build_policy(run)
        load_trainable(Path(location), model)
        logger.info("%s: step %d of the training run in %s (%s)", location,
                    checkpoint_step(Path(location)), Path(location).parent.parent,
                    "LoRA adapters" if run.lora.enabled else "full fine-tune")  # fmt: skip
    elif adapter_cfg.is_file():
        from peft import PeftModel

        base_path = json.loads(adapter_cfg.read_text())["base_model_name_or_path"]
        base = load_causal_lm(cfg.model, base_path)
        with quiet_peft_wrapping():
            model = PeftModel.from_pretrained(base, location)
    else:
        model = load_causal_lm(cfg.model, location)
    disable_dropout(model)
    return model.eval()


def eval_reference(cfg: Any, policy: nn.Module, scorer: nn.Module, device: Any) -> Reference | None:
    """The reference for `prefopt eval`: --ref if given, else the adapter-off policy."""
    from prefopt.errors import ConfigError
    from prefopt.loss_registry import get_loss
    from prefopt.models import freeze
    from prefopt.prefix_sharing import SharedPrefixLogprobModel
    from prefopt.reference import ModelReference

    if not any(get_loss(n).needs_reference for n in cfg.loss.names):
        return None
    if cfg.reference.model:
        ref = freeze(load_policy(cfg, cfg.reference.model))
        return ModelReference(SharedPrefixLogprobModel(ref).to(device), "model")
    if hasattr(policy, "disable_adapter"):
        return ModelReference(scorer, "adapter", peft_model=policy)
    raise ConfigError(
        f"loss {cfg.loss.names} needs a reference: pass --ref PATH (or a LoRA adapter folder as "
        "--model, whose base then serves as the reference)"
    )


def per_pair_rows(
    examples: Sequence[TokenizedPair], positions: Sequence[int], out: StepOutput
) -> list[dict[str, Any]]:
    """One JSON-able dict per pair of a batch, with its source row index and log-probs."""
    assert out.logps is not None
    lp = out.logps
    rows = []
    for j, pos in enumerate(positions):
        rows.append(
            {
                "index": int(examples[pos].index),
                "policy_chosen_logps": lp.policy_chosen[j].item(),
                "policy_rejected_logps": lp.policy_rejected[j].item(),
                "ref_chosen_logps": None if lp.ref_chosen is None else lp.ref_chosen[j].item(),
                "ref_rejected_logps": None
                if lp.ref_rejected is None
                else lp.ref_rejected[j].item(),
                "chosen_tokens": _item(lp.chosen_tokens, j),
                "rejected_tokens": _item(lp.rejected_tokens, j),
                "loss": out.losses[j].item(),
                "reward_chosen": out.metrics["rewards/chosen"][j].item(),
                "reward_rejected": out.metrics["rewards/rejected"][j].item(),
            }
        )
    return rows


def _item(counts: torch.Tensor | None, j: int) -> int | None:
    return None if counts is None else int(counts[j].item())


def per_example_rows(
    examples: Sequence[TokenizedExample], positions: Sequence[int], out: StepOutput
) -> list[dict[str, Any]]:
    """One JSON-able dict per unpaired (KTO) row of a batch: its source row index, label,
    log-probs, loss, reward and the batch's KL estimate z₀ (`out` from `evaluate_dataset`,
    which adds the reference's log-probs)."""
    m = out.metrics
    rows = []
    for j, pos in enumerate(positions):
        side = "chosen" if examples[pos].label else "rejected"
        rows.append(
            {
                "index": int(examples[pos].index),
                "label": bool(examples[pos].label),
                "policy_logps": m[f"logps/{side}"][j].item(),
                "ref_logps": m[f"ref_logps/{side}"][j].item(),
                "completion_tokens": int(m["tokens/completion"][j].item()),
                "loss": out.losses[j].item(),
                "reward": m[f"rewards/{side}"][j].item(),
                "kl": m["kl"][j].item(),
            }
        )
    return rows


def run_eval(cfg: Any, model_location: str) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Metrics (means over pairs, or over KTO rows) and per-pair (per-row) dicts of
    `model_location` on `cfg.data.train`.

    Pairs are judged for length bias (`HealthMonitor.update_pairs`); a finding is logged.
    KTO rows are scored in file order, `train.batch_size` at a time: their KL estimate z₀ is a
    batch statistic, so it equals training's where the batches hold the same rows.
    """
    from prefopt.models import load_tokenizer
    from prefopt.pipeline import prepare_data
    from prefopt.prefix_sharing import SharedPrefixLogprobModel

    device = torch.device(
        "cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu"
    )
    run = checkpoint_run(cfg, model_location)
    tokenizer = load_tokenizer(cfg.model if run is None else run.model)
    data = prepare_data(cfg, tokenizer)
    policy = load_policy(cfg, model_location)
    scorer = SharedPrefixLogprobModel(
        policy, response_only=cfg.train.response_only_logits, chunk_size=cfg.train.logit_chunk_size
    ).to(device)
    reference = eval_reference(cfg, policy, scorer, device)
    batch_size = cfg.eval.batch_size or cfg.train.batch_size
    rows: list[dict[str, Any]] = []
    if data.unpaired:
        kto: list[TokenizedExample] = list(data.train)  # type: ignore[arg-type]
        metrics = evaluate_dataset(
            scorer, reference, kto, cfg.loss, batch_size=batch_size,
            pad_token_id=tokenizer.pad_token_id, device=device, split="train",
            on_batch=lambda pos, out: rows.extend(per_example_rows(kto, pos, out)),
            max_length=cfg.data.max_length,
        )  # fmt: skip
        return metrics, rows
    examples: list[TokenizedPair] = list(data.train)  # type: ignore[arg-type]
    shared = _eval_prefix_sharing(cfg, policy, examples, batch_size, tokenizer.pad_token_id)
    metrics = evaluate_dataset(
        scorer, reference, examples, cfg.loss, batch_size=batch_size,
        pad_token_id=tokenizer.pad_token_id, device=device, split="train",
        on_batch=lambda pos, out: rows.extend(per_pair_rows(examples, pos, out)),
        max_length=cfg.data.max_length, prefix_sharing=shared,
    )  # fmt: skip
    _check_length_bias(rows)
    return metrics, rows


def _check_length_bias(rows: Sequence[dict[str, Any]]) -> None:
    """Per-pair length bias of the evaluated pairs (`HealthMonitor.update_pairs`), logged."""
    from prefopt.health import HealthMonitor

    pairs = [
        (r["chosen_tokens"] - r["rejected_tokens"], r["reward_chosen"] - r["reward_rejected"])
        for r in rows
        if r["chosen_tokens"] is not None and r["rejected_tokens"] is not None
    ]
    for finding in HealthMonitor().update_pairs(pairs):
        logger.warning("health: %s", finding)


def _eval_prefix_sharing(
    cfg: Any, policy: nn.Module, pairs: Sequence[TokenizedPair], batch_size: int, pad_id: int
) -> bool:
    """`train.prefix_sharing` for `prefopt eval`, resolved and checked as in training."""
    from prefopt.prefix_choice import choose_prefix_sharing, verify_prefix_sharing

    paired = bool(pairs) and isinstance(pairs[0], TokenizedPair)
    choice = choose_prefix_sharing(cfg.train.prefix_sharing, policy, pairs, paired=paired)
    if not choice.enabled:
        logger.info(choice.describe())
        return False
    return verify_prefix_sharing(choice, policy, pairs[:batch_size], pad_token_id=pad_id).enabled
