"""Building the reference a run compares its policy with (`reference.strategy`).

`build_reference` makes the frozen copy, the separate model, the adapters-off view of a LoRA
policy, or the precomputed log-prob table (computed here, cached on disk); `auto_precompute`
resolves "auto" to precompute for multi-epoch runs. Sharding the reference like the policy
happens after `accelerate.prepare` (`run_setup.prepare_reference`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prefopt.collate import collate_pairs
from prefopt.config import ExperimentConfig
from prefopt.errors import ConfigError
from prefopt.models import freeze, load_causal_lm
from prefopt.pipeline import PreparedData
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
from prefopt.sharding import no_split_modules
from prefopt.step import pair_keys
from prefopt.tokenize import TokenizedPair

logger = logging.getLogger(__name__)


def make_scorer(cfg: ExperimentConfig, model: nn.Module) -> SharedPrefixLogprobModel:
    """The log-prob scorer around `model` that accelerate wraps (and a reference's scorer)."""
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
        ref_scorer = make_scorer(cfg, ref_model)
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
        ref_scorer = make_scorer(cfg, ref_model).to(device)
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


AUTO_PRECOMPUTE_PASSES = 2
"""`reference.strategy=auto` precomputes when training scores each pair at least this often."""


def auto_precompute(
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
    paired = data.paired
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
