"""Everything a training run needs before its first step: models, reference, optimizer.

Order matters for the user: config validated → tokenizer → data (fails fast on bad rows) →
models → reference (checked against the starting policy) → optimizer and schedule.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from prefopt.config import ExperimentConfig
from prefopt.deepspeed_state import deepspeed_launch, start_deepspeed_on_cpu
from prefopt.errors import ConfigError
from prefopt.malloc_tuning import keep_freed_memory
from prefopt.models import (
    apply_lora,
    disable_dropout,
    flex_attention_trains_on_cpu,
    load_causal_lm,
    load_tokenizer,
)
from prefopt.pipeline import PreparedData, prepare_data
from prefopt.prefix_choice import (
    PrefixSharingChoice,
    choose_prefix_sharing,
    verify_prefix_sharing,
)
from prefopt.reference import ModelReference, Reference
from prefopt.reference_setup import auto_precompute, build_reference, make_scorer
from prefopt.sharding import (
    any_process,
    configure_accelerator,
    shard_frozen,
    shards_weights,
)
from prefopt.tokenize import TokenizedPair

logger = logging.getLogger(__name__)


@dataclass
class RunParts:
    """The assembled pieces of a run (models unwrapped; `scorer` is what accelerate wraps)."""

    cfg: ExperimentConfig
    accelerator: Accelerator
    tokenizer: Any
    data: PreparedData
    model: nn.Module
    scorer: nn.Module
    reference: Reference | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    total_steps: int
    steps_per_epoch: int
    prefix_sharing: PrefixSharingChoice
    """Whether pairs are scored as [prompt | chosen | rejected] rows (`train.prefix_sharing`)."""


def runs_on_cpu(cfg: ExperimentConfig) -> bool:
    """Whether this run's models live on the CPU (`train.device`, or no GPU visible)."""
    return cfg.train.device == "cpu" or not torch.cuda.is_available()


def make_accelerator(cfg: ExperimentConfig) -> Accelerator:
    """An Accelerator for the configured device and precision."""
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    if cfg.train.keep_freed_memory:
        keep_freed_memory()
    cpu = runs_on_cpu(cfg)
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA GPU is visible")
    if cpu:
        _refuse_gpu_only_settings(cfg)
    _forget_other_precision(cfg.train.mixed_precision)
    if cpu and deepspeed_launch():
        start_deepspeed_on_cpu()  # otherwise accelerate would run the launch as DDP
        cpu = False
    accelerator = Accelerator(cpu=cpu, mixed_precision=cfg.train.mixed_precision)
    configure_accelerator(accelerator, cfg)
    return accelerator


def _refuse_gpu_only_settings(cfg: ExperimentConfig) -> None:
    """On the CPU: refuse, before any model loads, what would otherwise fail mid-run."""
    if cfg.train.mixed_precision == "fp16":
        raise ConfigError("train.mixed_precision=fp16 needs a CUDA GPU; use no (or bf16) on CPU")
    impl = cfg.model.attn_implementation or ""
    if impl.startswith("flash_attention"):
        raise ConfigError(
            f"model.attn_implementation={impl} runs on CUDA GPUs only; on the CPU leave it "
            "unset (sdpa) or use eager"
        )
    if impl == "flex_attention" and not flex_attention_trains_on_cpu():
        raise ConfigError(
            "model.attn_implementation=flex_attention cannot train on the CPU: torch "
            f"{torch.__version__}'s FlexAttention has no CPU backward. Use sdpa (leave "
            "model.attn_implementation unset) or train on a GPU"
        )


def _forget_other_precision(mixed_precision: str) -> None:
    """accelerate keeps one process-wide state and refuses an Accelerator whose precision
    differs from an earlier one's; a second `train()` in one process (a notebook, a sweep)
    may rightly ask for another. The distributed state (PartialState) is kept."""
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and str(state.get("_mixed_precision", mixed_precision)) != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)


def schedule_steps(cfg: ExperimentConfig, n_train: int, world: int) -> tuple[int, int]:
    """(total optimizer steps, steps per epoch) for `n_train` examples."""
    effective = cfg.train.batch_size * cfg.train.grad_accum * world
    per_epoch = n_train // effective if world > 1 else math.ceil(n_train / effective)
    if per_epoch == 0:
        raise ConfigError(
            f"{n_train} training examples are fewer than one effective batch ({effective} = "
            "batch_size × grad_accum × processes)"
        )
    total = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * per_epoch))
    return total, per_epoch


def make_optimizer(
    cfg: ExperimentConfig, params: list[nn.Parameter], *, sharded: bool
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; fused unless `optim.fused` says otherwise.

    The fused kernel updates each tensor in one pass: the foreach default builds grouped
    temporaries about half the size of the trainable weights. Under FSDP/DeepSpeed sharding
    (DTensor or flattened shards) torch's default implementation is kept.
    """
    fused = cfg.optim.fused if cfg.optim.fused is not None else not sharded
    return torch.optim.AdamW(
        params,
        lr=cfg.optim.lr,
        betas=(cfg.optim.adam_betas[0], cfg.optim.adam_betas[1]),
        eps=cfg.optim.adam_eps,
        weight_decay=cfg.optim.weight_decay,
        fused=fused or None,  # None, not False: let torch pick foreach
    )


def lr_lambda(cfg: ExperimentConfig, total: int) -> Any:
    """Warmup then linear/cosine/constant multiplier of the peak lr."""
    warmup = cfg.optim.warmup_steps or int(cfg.optim.warmup_ratio * total)
    kind = cfg.optim.scheduler

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1 - progress)

    return factor


def build_policy(cfg: ExperimentConfig) -> nn.Module:
    """The trainable policy: the loaded model, LoRA-wrapped if asked, dropout off."""
    qlora = cfg.lora.enabled and cfg.lora.load_in_4bit
    device = "cpu" if runs_on_cpu(cfg) else "cuda"
    model = load_causal_lm(cfg.model, quantize_on=device if qlora else None)
    disable_dropout(model)
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora, gradient_checkpointing=cfg.model.gradient_checkpointing)
    model.train()
    return model


def prepare_reference(run: RunParts) -> None:
    """Shard a copy/model reference like the policy (FSDP2, DeepSpeed); after `prepare`.

    Without sharding a frozen copy would sit whole on every GPU. With `reference.offload`, the
    shards live in CPU memory and are copied in layer by layer (FSDP2's CPUOffloadPolicy,
    ZeRO-3's offload_param) instead of moving the whole reference for each forward.
    """
    ref = run.reference
    if not isinstance(ref, ModelReference) or ref.strategy not in ("copy", "model"):
        if run.cfg.reference.offload:
            logger.warning("reference.offload only applies to reference strategies copy/model")
        return
    if shards_weights(run.accelerator):
        ref.scorer = shard_frozen(run.accelerator, ref.scorer, offload=ref.offload)
        ref.offload = False  # the sharding offloads (or not) shard by shard


def build_run(cfg: ExperimentConfig, accelerator: Accelerator | None = None) -> RunParts:
    """Assemble a run from a validated config."""
    accelerator = accelerator or make_accelerator(cfg)
    torch.manual_seed(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model)
    data = prepare_data(cfg, tokenizer)
    total, per_epoch = schedule_steps(cfg, len(data.train), accelerator.num_processes)
    # Under FSDP/DeepSpeed, accelerate.prepare moves the shards to the GPU; moving the whole
    # model there first would need its full size on every GPU. Precompute scores before that.
    sharded = shards_weights(accelerator)
    auto_precompute(cfg, data, total * accelerator.num_processes, sharded=sharded)
    model = build_policy(cfg)
    scorer = make_scorer(cfg, model)
    on_device = not sharded or cfg.reference_strategy() == "precompute"
    if on_device:
        scorer = scorer.to(accelerator.device)
    prefix = _choose_prefix_sharing(cfg, accelerator, model, data, tokenizer, check=on_device)
    reference = build_reference(
        cfg, model, scorer, data, accelerator.device, keep_on_cpu=sharded,
        prefix_sharing=prefix.enabled, autocast=accelerator.autocast,
    )  # fmt: skip
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, params, sharded=sharded)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total))
    return RunParts(
        cfg, accelerator, tokenizer, data, model, scorer, reference, optimizer, scheduler, total,
        per_epoch, prefix,
    )  # fmt: skip


def _choose_prefix_sharing(
    cfg: ExperimentConfig,
    accelerator: Accelerator,
    model: nn.Module,
    data: PreparedData,
    tokenizer: Any,
    *,
    check: bool,
) -> PrefixSharingChoice:
    """Resolve `train.prefix_sharing`; with `check` (the policy is on its device) also run the
    comparison with two-pass scoring now, before a precomputed reference is built from it.
    Logs one line, unless the check is left to `verify_run_prefix_sharing`."""
    paired = data.paired
    pairs: list[TokenizedPair] = list(data.train) if paired else []  # type: ignore[arg-type]
    choice = choose_prefix_sharing(
        cfg.train.prefix_sharing, model, pairs, paired=paired, packing=cfg.train.packing is True
    )
    if not choice.enabled:
        if cfg.train.packing is True and paired:
            raise ConfigError(
                f"train.packing=true needs prefix sharing, which is off here "
                f"({choice.describe()}); set train.packing=false"
            )
        logger.info(choice.describe())
        return choice
    if not check:
        return choice
    return verify_prefix_sharing(
        choice, model, pairs[: cfg.train.batch_size], pad_token_id=tokenizer.pad_token_id,
        any_process=functools.partial(any_process, accelerator),
    )  # fmt: skip


def verify_run_prefix_sharing(run: RunParts, prepared: nn.Module) -> None:
    """After `accelerate.prepare`: the check `build_run` could not run because the policy was
    not on its device yet (FSDP/DeepSpeed shard it in `prepare`); it scores through `prepared`,
    whose hooks gather the shards. A no-op otherwise. Call it after loading a checkpoint: the
    forward leaves FSDP2's root unit unsharded, and a load writes into the shards."""
    pairs: list[TokenizedPair] = list(run.data.train[: run.cfg.train.batch_size])  # type: ignore[arg-type]
    run.prefix_sharing = verify_prefix_sharing(
        run.prefix_sharing, run.model, pairs, pad_token_id=run.tokenizer.pad_token_id,
        any_process=functools.partial(any_process, run.accelerator), scorer=prepared,
    )  # fmt: skip
