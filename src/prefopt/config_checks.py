"""Validation of an `ExperimentConfig`: every value and combination checked at start, before
any model loads, each failure a ConfigError naming the field."""

from __future__ import annotations

from prefopt.config import ExperimentConfig, LossConfig
from prefopt.errors import ConfigError
from prefopt.loss_registry import LOSSES

__all__ = ["EVAL_METRICS", "eval_metric_names", "validate_config"]

EVAL_METRICS: dict[str, tuple[str, ...]] = {
    "paired": (
        "loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
        "logps/chosen", "logps/rejected", "tokens/chosen", "tokens/rejected",
    ),
    "unpaired": (
        "loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected",
        "tokens/completion", "kl",
    ),
    "sft": ("loss", "logps/response", "tokens/response", "perplexity"),
}  # fmt: skip
"""The metrics an evaluation reports, by kind of data (`metrics.pair_metrics`,
`step._kto_metrics`, `sft.sft_step`; tests/test_config.py checks they agree)."""


def validate_config(cfg: ExperimentConfig) -> None:
    """Check values and combinations; raises ConfigError naming the field."""
    _validate_loss(cfg.loss)
    if cfg.data.sft and cfg.loss.names != ["sft"]:
        raise ConfigError(f"data.sft=true trains with loss 'sft' only, not {cfg.loss.names}")
    _validate_reference(cfg)
    _validate_numbers(cfg)
    _validate_early_stopping(cfg)
    _validate_prefix_sharing(cfg)
    _validate_qlora(cfg)


def _validate_qlora(cfg: ExperimentConfig) -> None:
    if not cfg.lora.load_in_4bit:
        return
    if not cfg.lora.enabled:
        raise ConfigError("lora.load_in_4bit=true needs lora.enabled=true (QLoRA)")
    if cfg.reference.strategy == "copy":
        # A deep copy of a 4-bit model is a second quantised base; the adapter reference
        # (the same base, adapters off) is exactly the starting policy at no memory cost.
        raise ConfigError(
            "reference.strategy=copy with lora.load_in_4bit=true: use reference.strategy=adapter "
            "(the default with LoRA), which scores the same 4-bit base with the adapters off"
        )


def _validate_loss(loss: LossConfig) -> None:
    names = loss.names
    if not names:
        raise ConfigError("loss.name: give at least one loss")
    for name in names:
        if name not in LOSSES:
            from difflib import get_close_matches

            hint = get_close_matches(name, list(LOSSES), n=1)
            extra = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ConfigError(
                f"loss.name: unknown loss '{name}'{extra}; known: {', '.join(sorted(LOSSES))}"
            )
    if len(names) > 1 and any(LOSSES[n].data == "unpaired" for n in names):
        raise ConfigError("loss.name: 'kto' works on unpaired data and cannot be combined")
    if loss.weights is not None and len(loss.weights) != len(names):
        raise ConfigError(f"loss.weights has {len(loss.weights)} values for {len(names)} losses")
    if loss.beta <= 0:
        raise ConfigError(f"loss.beta must be > 0, got {loss.beta}")
    if not 0 <= loss.label_smoothing < 0.5:
        raise ConfigError(f"loss.label_smoothing must be in [0, 0.5), got {loss.label_smoothing}")
    smoothing_users = {n for n in names if "label_smoothing" in LOSSES[n].uses}
    if loss.label_smoothing > 0 and not smoothing_users:
        raise ConfigError(
            f"loss.label_smoothing={loss.label_smoothing} has no effect on {names}: "
            "only 'sigmoid' (cDPO) and 'robust' use it"
        )


def _validate_reference(cfg: ExperimentConfig) -> None:
    needs = [n for n in cfg.loss.names if LOSSES[n].needs_reference]
    strategy = cfg.reference.strategy
    if not needs and strategy not in ("auto", "none"):
        raise ConfigError(
            f"reference.strategy={strategy}: the loss {cfg.loss.names} is reference-free; "
            "remove the reference (reference.strategy=none) or choose a reference-based loss"
        )
    if not needs and cfg.reference.model is not None:
        raise ConfigError(
            f"reference.model is set but the loss {cfg.loss.names} is reference-free and would "
            "ignore it; remove reference.model"
        )
    if needs and strategy == "none":
        raise ConfigError(f"reference.strategy=none, but loss {needs} needs a reference model")
    if strategy == "adapter" and not cfg.lora.enabled:
        raise ConfigError("reference.strategy=adapter needs lora.enabled=true")
    if strategy == "model" and not cfg.reference.model:
        raise ConfigError("reference.strategy=model needs reference.model=PATH")
    if strategy == "precompute" and any(LOSSES[n].data == "unpaired" for n in cfg.loss.names):
        raise ConfigError(
            "reference.strategy=precompute is not supported with kto: its KL estimate pairs "
            "rows differently in every batch; use copy, model or adapter"
        )
    uses_model = strategy == "precompute" and cfg.reference.precompute_with == "model"
    if uses_model and not cfg.reference.model:
        raise ConfigError("reference.precompute_with=model needs reference.model=PATH")


def eval_metric_names(cfg: ExperimentConfig) -> tuple[str, ...]:
    """The metric names the configured run's evaluations report."""
    if cfg.data.sft:
        return EVAL_METRICS["sft"]
    if any(LOSSES[n].data == "unpaired" for n in cfg.loss.names):
        return EVAL_METRICS["unpaired"]
    return EVAL_METRICS["paired"]


def _validate_early_stopping(cfg: ExperimentConfig) -> None:
    """An early-stopping metric the evaluations never report, or no evaluations to read it
    from, would leave early stopping silently off: refuse both."""
    name = cfg.eval.early_stopping_metric
    if name is None:
        return
    known = eval_metric_names(cfg)
    if name not in known:
        from difflib import get_close_matches

        hint = get_close_matches(name, known, n=1)
        extra = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise ConfigError(
            f"eval.early_stopping_metric: unknown metric '{name}'{extra}; "
            f"evaluations of this run report: {', '.join(known)}"
        )
    if cfg.data.eval is None and cfg.data.eval_fraction <= 0:
        raise ConfigError(
            f"eval.early_stopping_metric={name} needs evaluation data: set data.eval=FILE or "
            "data.eval_fraction (e.g. 0.1)"
        )
    if cfg.eval.every_steps <= 0:
        raise ConfigError(
            f"eval.early_stopping_metric={name} needs evaluations during training: set "
            "eval.every_steps=N (> 0)"
        )


def _validate_prefix_sharing(cfg: ExperimentConfig) -> None:
    """`train.prefix_sharing=true` where it cannot work, before any model loads (the model's
    own attention is checked once it is loaded: `prefix_choice.choose_prefix_sharing`)."""
    if cfg.train.packing is True and cfg.train.prefix_sharing is False:
        raise ConfigError(
            "train.packing=true packs shared-prefix rows: set train.prefix_sharing to auto or "
            "true (or train.packing=false)"
        )
    if cfg.train.prefix_sharing is not True:
        return
    unpaired = [n for n in cfg.loss.names if LOSSES[n].data == "unpaired"]
    if cfg.data.sft or unpaired:
        what = "SFT" if cfg.data.sft else f"loss {unpaired}"
        raise ConfigError(
            f"train.prefix_sharing=true applies to paired losses only, not {what} (one response "
            "per prompt); set train.prefix_sharing=auto or false"
        )
    impl = cfg.model.attn_implementation or ""
    if "flash" in impl or "flex" in impl:
        raise ConfigError(
            f"train.prefix_sharing=true needs an attention that takes a 4-D mask, not "
            f"model.attn_implementation={impl}; use sdpa or eager, or train.prefix_sharing=auto"
        )


def _validate_numbers(cfg: ExperimentConfig) -> None:
    checks: list[tuple[str, bool]] = [
        ("train.batch_size must be >= 1", cfg.train.batch_size >= 1),
        ("train.grad_accum must be >= 1", cfg.train.grad_accum >= 1),
        ("train.epochs must be > 0", cfg.train.epochs > 0),
        ("train.max_steps must be >= 1", cfg.train.max_steps is None or cfg.train.max_steps >= 1),
        ("optim.lr must be > 0", cfg.optim.lr > 0),
        ("optim.warmup_ratio must be in [0, 1)", 0 <= cfg.optim.warmup_ratio < 1),
        ("data.max_length must be >= 2", cfg.data.max_length >= 2),
        ("data.eval_fraction must be in [0, 1)", 0 <= cfg.data.eval_fraction < 1),
        ("lora.r must be >= 1", cfg.lora.r >= 1),
        ("lora.alpha must be > 0", cfg.lora.alpha > 0),
        ("lora.dropout must be in [0, 1)", 0 <= cfg.lora.dropout < 1),
        ("eval.patience must be >= 1", cfg.eval.patience >= 1),
        ("judge.max_new_tokens must be >= 1", cfg.judge.max_new_tokens >= 1),
        ("judge.num_samples must be >= 1", cfg.judge.num_samples >= 1),
        ("judge.batch_size must be >= 1", cfg.judge.batch_size >= 1),
        ("judge.temperature must be >= 0", cfg.judge.temperature >= 0),
        ("judge.top_p must be in (0, 1]", 0 < cfg.judge.top_p <= 1),
        ("judge.max_prompts must be >= 1", _at_least(cfg.judge.max_prompts, 1)),
        ("output.keep_checkpoints must be >= 1", cfg.output.keep_checkpoints >= 1),
        ("output.save_every must be >= 0", cfg.output.save_every >= 0),
        ("eval.every_steps must be >= 0", cfg.eval.every_steps >= 0),
        ("eval.batch_size must be >= 1", _at_least(cfg.eval.batch_size, 1)),
        ("data.max_pairs must be >= 1", _at_least(cfg.data.max_pairs, 1)),
        ("train.num_threads must be >= 1", _at_least(cfg.train.num_threads, 1)),
        ("train.logit_chunk_size must be >= 1", cfg.train.logit_chunk_size >= 1),
        ("optim.warmup_steps must be >= 0", cfg.optim.warmup_steps >= 0),
        ("optim.weight_decay must be >= 0", cfg.optim.weight_decay >= 0),
        ("optim.adam_eps must be > 0", cfg.optim.adam_eps > 0),
        ("optim.max_grad_norm must be > 0 (or null)", _above(cfg.optim.max_grad_norm, 0)),
        (
            "optim.adam_betas must be two values in [0, 1)",
            len(cfg.optim.adam_betas) == 2 and all(0 <= b < 1 for b in cfg.optim.adam_betas),
        ),
        ("train.stop_after_steps must be >= 1", _at_least(cfg.train.stop_after_steps, 1)),
        ("train.seed must be >= 0", cfg.train.seed >= 0),
    ]
    for message, ok in checks:
        if not ok:
            raise ConfigError(message)
    mpl = cfg.data.max_prompt_length
    if mpl is not None and not 1 <= mpl < cfg.data.max_length:
        raise ConfigError(f"data.max_prompt_length={mpl} must be in [1, data.max_length)")
    for name in cfg.output.report_to:
        if name not in ("jsonl", "tensorboard", "wandb"):
            raise ConfigError(
                f"output.report_to: unknown logger '{name}' (jsonl, tensorboard, wandb)"
            )


def _at_least(value: int | None, low: int) -> bool:
    """True for an unset optional number or one >= `low`."""
    return value is None or value >= low


def _above(value: float | None, low: float) -> bool:
    """True for an unset optional number or one > `low`."""
    return value is None or value > low
