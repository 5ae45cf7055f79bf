"""Everything a training run needs before its first step: models, reference, optimizer.

Order matters for the user: config validated → tokenizer → data (fails fast on bad rows) →
models → reference (checked against the starting policy) → optimizer and schedule.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from prefopt.collate import collate_pairs
from prefopt.config import ExperimentConfig
from prefopt.deepspeed_state import deepspeed_launch, start_deepspeed_on_cpu
from prefopt.errors import ConfigError
from prefopt.malloc_tuning import keep_freed_memory
from prefopt.models import apply_lora, disable_dropout, freeze, load_causal_lm, load_tokenizer
from prefopt.pipeline import PreparedData, prepare_data
from prefopt.prefix_choice import (
    PrefixSharingChoice,
    choose_prefix_sharing,
    verify_prefix_sharing,
)
from prefopt.prefix_collate import collate_shared_prefix
from prefopt.prefix_sharing import SharedPrefixLogprobModel, supports_shared_prefix
from prefopt.reference import (
    ModelReference,
    PrecomputedReference,
    Reference,
    Rows,
    load_or_compute_table,
    model_fingerprint,
    rows_fingerprint,
)
from prefopt.sharding import (
    any_process,
    configure_accelerator,
    no_split_modules,
    shard_frozen,
    shards_weights,
)
from prefopt.step import pair_keys
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


def make_accelerator(cfg: ExperimentConfig) -> Accelerator:
    """An Accelerator for the configured device and precision."""
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    if cfg.train.keep_freed_memory:
        keep_freed_memory()
    cpu = cfg.train.device == "cpu" or not torch.cuda.is_available()
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA GPU is visible")
    if cpu and cfg.train.mixed_precision == "fp16":
        raise ConfigError("train.mixed_precision=fp16 needs a CUDA GPU; use no (or bf16) on CPU")
    _forget_other_precision(cfg.train.mixed_precision)
    if cpu and deepspeed_launch():
        start_deepspeed_on_cpu()  # otherwise accelerate would run the launch as DDP
        cpu = False
    accelerator = Accelerator(cpu=cpu, mixed_precision=cfg.train.mixed_precision)
    configure_accelerator(accelerator, cfg)
    return accelerator


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
    model = load_causal_lm(cfg.model, load_in_4bit=cfg.lora.enabled and cfg.lora.load_in_4bit)
    disable_dropout(model)
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora, gradient_checkpointing=cfg.model.gradient_checkpointing)
    model.train()
    return model


def _scorer(cfg: ExperimentConfig, model: nn.Module) -> SharedPrefixLogprobModel:
    # Scores both layouts (two-pass rows like its parent class, shared-prefix rows by keyword),
    # so one scorer serves every path whatever `train.prefix_sharing` resolves to.
    scorer = SharedPrefixLogprobModel(
        model,
        response_only=cfg.train.response_only_logits,
        chunk_size=cfg.train.logit_chunk_size,
    )
    # accelerate's FSDP auto-wrap reads the decoder-layer classes from the model it is given;
    # without this the wrapper would be one FSDP unit (the whole model gathered at once).
    scorer._no_split_modules = no_split_modules(model)  # type: ignore[assignment]
    return scorer


def build_reference(
    cfg: ExperimentConfig,
    model: nn.Module,
    scorer: nn.Module,
    data: PreparedData,
    device: Any,
    *,
    keep_on_cpu: bool = False,
    prefix_sharing: bool = False,
    autocast: Callable[[], contextlib.AbstractContextManager[object]] = contextlib.nullcontext,
) -> Reference | None:
    """The reference of the configured strategy (before any training step).

    `keep_on_cpu`: leave a copy/model reference in CPU memory (it is sharded onto the devices
    later, by `prepare_reference`). `prefix_sharing`: the reference will score shared-prefix
    rows (and a precomputed one is computed from them). `autocast`: what the prepared policy's
    forward runs under (`Accelerator.autocast`); the reference scores under it too.
    """
    strategy = cfg.reference_strategy()
    if strategy == "none":
        return None
    if strategy == "adapter":
        return ModelReference(scorer, "adapter", peft_model=model, autocast=autocast)
    if strategy in ("copy", "model"):
        if strategy == "copy":
            ref_model = freeze(_starting_copy(cfg, model))
        else:
            assert cfg.reference.model is not None
            ref_model = freeze(load_causal_lm(cfg.model, cfg.reference.model))
            _check_reference_shares(ref_model, prefix_sharing)
        ref_scorer = _scorer(cfg, ref_model)
        if not (keep_on_cpu or cfg.reference.offload):
            ref_scorer = ref_scorer.to(device)
        return ModelReference(
            ref_scorer, strategy, offload=cfg.reference.offload, autocast=autocast
        )
    return _precomputed(cfg, model, scorer, data, device, prefix_sharing, autocast)


def _starting_copy(cfg: ExperimentConfig, model: nn.Module) -> nn.Module:
    """A copy of the starting weights: a deepcopy, or under ZeRO-3 the same weights reloaded.

    Under ZeRO-3 transformers loads the weights already partitioned (deepspeed.zero.Init):
    each process holds empty placeholders plus its slice, so a deepcopy would copy nothing.
    Loading again partitions the reference the same way.
    """
    base = _base(model)
    if any(hasattr(p, "ds_id") for p in base.parameters()):
        return load_causal_lm(cfg.model)
    return copy.deepcopy(base)


def _check_reference_shares(ref_model: nn.Module, prefix_sharing: bool) -> None:
    """A separate reference model must score shared-prefix rows too (it may be another
    architecture than the policy, which is what `train.prefix_sharing` was resolved for)."""
    ok, why = supports_shared_prefix(ref_model) if prefix_sharing else (True, "")
    if not ok:
        raise ConfigError(
            f"prefix sharing is on for the policy, but the reference model cannot share "
            f"prefixes: {why}. Set train.prefix_sharing=false"
        )


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


def _base(model: nn.Module) -> nn.Module:
    """The starting weights without adapters (a fresh LoRA equals its base)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _precomputed(
    cfg: ExperimentConfig,
    model: nn.Module,
    scorer: nn.Module,
    data: PreparedData,
    device: Any,
    prefix_sharing: bool,
    autocast: Callable[[], contextlib.AbstractContextManager[object]],
) -> PrecomputedReference:
    """Score every train/eval pair once with the starting policy (or `reference.model`)."""
    with_model = cfg.reference.precompute_with == "model"
    ref_scorer: nn.Module = scorer
    if with_model:
        assert cfg.reference.model is not None
        ref_model = freeze(load_causal_lm(cfg.model, cfg.reference.model))
        _check_reference_shares(ref_model, prefix_sharing)
        ref_scorer = _scorer(cfg, ref_model).to(device)
    splits: list[tuple[str, list[TokenizedPair]]] = [("train", list(data.train))]  # type: ignore[arg-type]
    if data.eval:
        splits.append(("eval", list(data.eval)))  # type: ignore[arg-type]
    cache_root = Path(cfg.reference.cache_dir or Path.home() / ".cache" / "prefopt" / "ref_logps")
    fingerprint_model = model_fingerprint(_base(model) if not with_model else ref_scorer)
    reference = ModelReference(
        ref_scorer, "precompute-source", peft_model=_peft(model, with_model), autocast=autocast
    )
    table: dict[Hashable, float] = {}
    for split, pairs in splits:
        keys = [k for i in range(len(pairs)) for k in pair_keys([i], split)]
        rows = [p.prompt_ids + r for p in pairs for r in (p.chosen_ids, p.rejected_ids)]
        # The key names the computation path (LM head, dtype, layout) as well as weights and
        # rows: the paths agree only up to float rounding, and a cached table should be exactly
        # what this run would compute.
        layout = "shared" if prefix_sharing else "two-pass"
        extra = (
            f"{cfg.train.response_only_logits}|{cfg.model.dtype}|{cfg.train.mixed_precision}|"
            f"{split}|{layout}"
        )
        name = f"{fingerprint_model}-{rows_fingerprint(rows, extra)}.safetensors"
        score = functools.partial(_score_all, cfg, reference, pairs, device, prefix_sharing)
        table.update(load_or_compute_table(cache_root / name, keys, score))
    return PrecomputedReference(table, equals_initial_policy=not with_model)


def _peft(model: nn.Module, with_model: bool) -> nn.Module | None:
    """The peft model whose adapters must be off while precomputing, if any."""
    return None if with_model or not hasattr(model, "disable_adapter") else model


def _score_all(
    cfg: ExperimentConfig,
    reference: ModelReference,
    pairs: Sequence[TokenizedPair],
    device: Any,
    prefix_sharing: bool,
) -> torch.Tensor:
    """[2·len(pairs)] log-probs ordered (pair 0 chosen, pair 0 rejected, pair 1 chosen, …)."""
    from tqdm.auto import tqdm

    size = cfg.eval.batch_size or cfg.train.batch_size
    out: list[torch.Tensor] = []
    starts = range(0, len(pairs), size)
    for start in tqdm(starts, desc="reference log-probs", disable=not cfg.output.progress):
        chunk = pairs[start : start + size]
        if prefix_sharing:
            batch: Rows = collate_shared_prefix(chunk, pad_token_id=0).to(device)
        else:
            batch = collate_pairs(chunk, pad_token_id=0).to(device)
        logps = reference.row_logps(batch)  # [2b]: chosen rows then rejected rows
        b = len(chunk)
        out.append(torch.stack([logps[:b], logps[b:]], dim=1).reshape(-1).cpu())
    return torch.cat(out)


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
    _auto_precompute(cfg, data, total * accelerator.num_processes, sharded=sharded)
    model = build_policy(cfg)
    scorer = _scorer(cfg, model)
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


AUTO_PRECOMPUTE_PASSES = 2
"""`reference.strategy=auto` precomputes when training scores each pair at least this often."""


def _auto_precompute(
    cfg: ExperimentConfig, data: PreparedData, steps_all_processes: int, *, sharded: bool
) -> None:
    """Resolve `reference.strategy=auto` to precompute for multi-epoch paired runs.

    A copy or adapter reference runs one reference forward per pair per epoch; precompute runs
    one per pair in all (train and eval) and needs no reference weights in memory. From two
    passes over the data on, precomputing is the cheaper of the two. Not under FSDP/DeepSpeed
    (precompute scores with the whole model on each device, before sharding), not for KTO
    (its KL rows change with every batch). Sets the strategy in `cfg` (so the report and the
    checkpoints' config show it) and logs why.
    """
    if cfg.reference.strategy != "auto" or cfg.reference_strategy() not in ("copy", "adapter"):
        return
    paired = bool(data.train) and isinstance(data.train[0], TokenizedPair)
    scored = steps_all_processes * cfg.train.batch_size * cfg.train.grad_accum
    passes = scored / max(len(data.train), 1)
    if sharded or not paired or passes < AUTO_PRECOMPUTE_PASSES:
        return
    cfg.reference.strategy = "precompute"
    logger.info(
        "reference: precompute (auto: training scores each of the %d pairs %.1f times; "
        "their reference log-probs are computed once instead, and no reference weights are "
        "kept). Set reference.strategy=copy/adapter to keep a live reference",
        len(data.train), passes,
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
    paired = bool(data.train) and isinstance(data.train[0], TokenizedPair)
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
