"""`prefopt eval --data`: the preference metrics of a saved policy against its reference, no
training, with one row per pair (or per KTO row). The policy is a model folder, a LoRA adapter
folder on its base, or a training checkpoint; the numbers come from the same step functions as
training's own evaluations (`prefopt.evaluation.evaluate_dataset`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from prefopt.evaluation import evaluate_dataset
from prefopt.reference import Reference
from prefopt.step import StepOutput
from prefopt.tokenize import TokenizedExample, TokenizedPair

if TYPE_CHECKING:
    from prefopt.config import ExperimentConfig

logger = logging.getLogger(__name__)


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


def load_policy(cfg: Any, location: str, run: ExperimentConfig | None) -> nn.Module:
    """A causal LM from a model folder, base + adapter from a peft adapter folder, or a
    training checkpoint: its run's starting model built as training built it (LoRA-wrapped if
    the run was), holding the checkpoint's trainable weights.

    `run`: `checkpoint_run(cfg, location)` (None: not a checkpoint), which the caller has read
    for the tokenizer already; passed in so the checkpoint's config.yaml is parsed once.
    """
    from prefopt.checkpoint import checkpoint_step, load_trainable
    from prefopt.models import disable_dropout, load_causal_lm, quiet_peft_wrapping
    from prefopt.output import adapter_base
    from prefopt.run_setup import build_policy

    model: nn.Module
    base_path = adapter_base(Path(location))
    if run is not None:
        model = build_policy(run)
        load_trainable(Path(location), model)
        logger.info("%s: step %d of the training run in %s (%s)", location,
                    checkpoint_step(Path(location)), Path(location).parent.parent,
                    "LoRA adapters" if run.lora.enabled else "full fine-tune")  # fmt: skip
    elif base_path is not None:
        from peft import PeftModel

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
        location = cfg.reference.model
        ref = freeze(load_policy(cfg, location, checkpoint_run(cfg, location)))
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
    from prefopt.run_setup import runs_on_cpu

    device = torch.device("cpu" if runs_on_cpu(cfg) else "cuda")
    run = checkpoint_run(cfg, model_location)
    tokenizer = load_tokenizer(cfg.model if run is None else run.model)
    data = prepare_data(cfg, tokenizer)
    policy = load_policy(cfg, model_location, run)
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
    """`train.prefix_sharing` for `prefopt eval` on pairs (KTO rows return before this),
    resolved and checked as in training."""
    from prefopt.prefix_choice import choose_prefix_sharing, verify_prefix_sharing

    choice = choose_prefix_sharing(cfg.train.prefix_sharing, policy, pairs, paired=True)
    if not choice.enabled:
        logger.info(choice.describe())
        return False
    return verify_prefix_sharing(choice, policy, pairs[:batch_size], pad_token_id=pad_id).enabled
