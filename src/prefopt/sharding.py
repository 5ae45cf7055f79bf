"""What changes when accelerate shards the model (FSDP2, DeepSpeed) instead of replicating it.

Under DDP every process holds whole weights, so the single-process code paths work as they are.
Under FSDP2 each parameter is a `DTensor` holding 1/N of the values, and under DeepSpeed the
engine owns partitioned weights and the optimizer step. This module gathers the few places that
must know: sharding the frozen reference like the policy, gathering whole tensors for
checkpoints and the final save (collective calls: every process must make them), and putting
whole tensors back into shards on resume.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from prefopt.config import ExperimentConfig
from prefopt.errors import ConfigError

logger = logging.getLogger(__name__)
Tensor = torch.Tensor


def shards_weights(accelerator: Accelerator) -> bool:
    """True when accelerate shards weights or optimizer state across processes."""
    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def any_process(accelerator: Accelerator, flag: bool) -> bool:
    """True when `flag` is set on any process. Collective: every process must call it."""
    if accelerator.num_processes == 1:
        return flag
    total = accelerator.reduce(torch.tensor(int(flag), device=accelerator.device), "sum")
    return bool(total.item() > 0)


def configure_accelerator(accelerator: Accelerator, cfg: ExperimentConfig) -> None:
    """Refuse unsupported sharding setups; fill the DeepSpeed values the loop relies on.

    (Checkpoints under DeepSpeed hold the engine's own partitioned state: deepspeed_state.)
    """
    if shards_weights(accelerator) and cfg.lora.enabled and cfg.lora.load_in_4bit:
        raise ConfigError(
            "lora.load_in_4bit=true (QLoRA) is not supported under FSDP or DeepSpeed: "
            "bitsandbytes places the whole 4-bit base on each process's device as it loads, "
            "which the sharding cannot split. Launch with DDP (configs/accelerate/ddp.yaml): "
            "each process holds its own 4-bit base and only the adapters' gradients are reduced"
        )
    if accelerator.distributed_type == DistributedType.FSDP:
        version = getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1)
        if version != 2:
            raise ConfigError(
                f"FSDP version {version} is not supported: prefopt's checkpoints and reference "
                "sharding use FSDP2 (set fsdp_version: 2, see configs/accelerate/fsdp.yaml)"
            )
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    if cfg.train.on_nan == "skip":
        raise ConfigError(
            "train.on_nan=skip does not work under DeepSpeed: the engine applies the update "
            "inside backward, before prefopt sees the loss, so a non-finite step cannot be "
            "skipped. Use train.on_nan=stop (the last checkpoint is kept)"
        )
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    # We feed no DataLoader to accelerate, so it cannot infer the micro-batch; and the loop does
    # its own accumulation (one backward per micro-batch, loss already divided by the global pair
    # count), so DeepSpeed must neither rescale the loss by 1/accum nor count micro-batches.
    ds["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
    ds["gradient_accumulation_steps"] = 1
    ds["train_batch_size"] = cfg.train.batch_size * accelerator.num_processes
    ds["gradient_clipping"] = cfg.optim.max_grad_norm or 0.0


def no_split_modules(model: nn.Module) -> list[str] | None:
    """The decoder-layer class names transformers marks as FSDP wrap units, if any."""
    names = getattr(model, "_no_split_modules", None)
    return list(names) if names else None


# ---------------------------------------------------------------------------------------------
# The frozen reference
# ---------------------------------------------------------------------------------------------


def shard_frozen(accelerator: Accelerator, scorer: nn.Module, *, offload: bool) -> nn.Module:
    """Shard a frozen scorer the way the policy is sharded (call after `accelerator.prepare`).

    `accelerator.prepare_model(m, evaluation_mode=True)` only moves a model to the device, so a
    frozen reference would stay whole on every GPU; this shards it explicitly.
    FSDP2: one unit per decoder layer plus the root, resharded after each forward.
    DeepSpeed: ZeRO-3 partitions it (stage < 3: a stage-0 engine, whole on each GPU).
    """
    if accelerator.distributed_type == DistributedType.FSDP:
        return _shard_fsdp2(accelerator, scorer, offload)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return _shard_deepspeed(accelerator, scorer, offload)
    return scorer


def _shard_fsdp2(accelerator: Accelerator, scorer: nn.Module, offload: bool) -> nn.Module:
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    plugin = accelerator.state.fsdp_plugin
    names = set(plugin.transformer_cls_names_to_wrap or no_split_modules(scorer) or [])
    kwargs: dict[str, Any] = {
        "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy(),
        # Pinned host memory needs an accelerator; on CPU-only runs the policy is a no-op anyway.
        "offload_policy": CPUOffloadPolicy(pin_memory=accelerator.device.type != "cpu")
        if offload
        else plugin.cpu_offload,
        "reshard_after_forward": True,  # frozen: nothing needs the weights after the forward
    }
    mesh = getattr(accelerator, "torch_device_mesh", None)
    if mesh is not None:
        kwargs["mesh"] = mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)]
    for module in list(scorer.modules())[1:]:
        if type(module).__name__ in names:
            fully_shard(module, **kwargs)
    fully_shard(scorer, **kwargs)
    return scorer


def _shard_deepspeed(accelerator: Accelerator, scorer: nn.Module, offload: bool) -> nn.Module:
    import deepspeed  # type: ignore[import-not-found]

    # The policy's config, with every "auto" already filled in by accelerate.prepare.
    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    zero = config.setdefault("zero_optimization", {})
    if zero.get("stage", 0) != 3:
        if offload:
            raise ConfigError("reference.offload under DeepSpeed needs ZeRO-3 (offload_param)")
        zero["stage"] = 0  # below ZeRO-3 weights are not partitioned: keep a whole copy
    elif offload:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    engine, *_ = deepspeed.initialize(model=scorer, config=config)
    engine.eval()
    return engine  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------------------------
# Whole tensors for checkpoints and the final save
# ---------------------------------------------------------------------------------------------


def is_dtensor(tensor: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_cpu(tensor: Tensor, keep: bool = True) -> Tensor | None:
    """The whole tensor on CPU (None when not `keep`); gathers a DTensor (collective)."""
    if is_dtensor(tensor):
        tensor = tensor.full_tensor()  # type: ignore[attr-defined]
    return tensor.detach().contiguous().cpu() if keep else None


def full_state(obj: Any, keep: bool) -> Any:
    """A copy of a (nested) state dict with every DTensor gathered whole onto CPU.

    Every process must call it under FSDP2 (each gather is a collective); only those with
    `keep` get the tensors back (others get None in their place, so memory stays flat).
    """
    if isinstance(obj, dict):
        return {k: full_state(v, keep) for k, v in obj.items()}
    if isinstance(obj, list):
        return [full_state(v, keep) for v in obj]
    if isinstance(obj, Tensor):
        return full_cpu(obj, keep)
    return obj


def _reshard(root: nn.Module) -> None:
    """Put every FSDP2 unit back in its sharded state (parameters are DTensors again).

    After a no-grad forward, units with reshard_after_forward=False (the root) keep plain
    unsharded parameters that are views into FSDP's gather buffers: not safe to save.
    """
    from torch.distributed.fsdp import FSDPModule

    for unit in root.modules():
        if isinstance(unit, FSDPModule):
            unit.reshard()


def gather_for_checkpoint(
    accelerator: Accelerator, root: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Under FSDP: (whole trainable weights of `model`, whole optimizer state) on main.

    Every process must call it (the gathers are collective); others get (None, None), and so
    does everyone when nothing is sharded (the checkpoint then reads the tensors directly).
    `root` is the prepared (outermost FSDP) module, `model` the one whose names are saved.
    """
    if accelerator.distributed_type != DistributedType.FSDP:
        return None, None
    _reshard(root)
    keep = accelerator.is_main_process
    weights = {n: full_cpu(p, keep) for n, p in model.named_parameters() if p.requires_grad}
    optim = full_state(optimizer.state_dict(), keep)
    return (weights, optim) if keep else (None, None)


def shard_like(full: Tensor, param: Tensor) -> Tensor:
    """`full` cut to this process's shard of `param` (unchanged when `param` is whole)."""
    if not is_dtensor(param):
        return full
    from torch.distributed.tensor import distribute_tensor

    # Every process holds the same whole tensor (read from the checkpoint), so each slices its
    # own shard locally: no broadcast.
    return distribute_tensor(
        full.to(param.device, param.dtype),
        param.device_mesh,  # type: ignore[attr-defined]
        param.placements,  # type: ignore[attr-defined]
        src_data_rank=None,
    )


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After loading whole tensors into an optimizer over DTensor params, shard them back."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    for group in inner.param_groups:
        for param in group["params"]:
            state = inner.state.get(param, {})
            if not is_dtensor(param):
                continue
            for key, value in state.items():
                # exp_avg/exp_avg_sq have the parameter's shape; scalars such as `step` stay whole
                if (
                    isinstance(value, Tensor)
                    and not is_dtensor(value)
                    and value.shape == param.shape
                ):
                    state[key] = shard_like(value, param)


@contextlib.contextmanager
def whole_weights(accelerator: Accelerator, root: nn.Module) -> Iterator[None]:
    """Every process must enter: whole weights in `root` for the duration (to save it).

    FSDP2: each sharded parameter is gathered one at a time into main's CPU memory and swapped
    in on the main process only (others keep their shards); the shards go back afterwards.
    ZeRO-3: DeepSpeed gathers its partitioned parameters on every GPU. A no-op otherwise.
    """
    if accelerator.distributed_type == DistributedType.FSDP:
        _reshard(root)
        swapped = _swap_in_whole(root, keep=accelerator.is_main_process)
        try:
            yield
        finally:
            accelerator.wait_for_everyone()
            for module, name, shard in swapped:
                module._parameters[name] = shard
        return
    if accelerator.distributed_type == DistributedType.DEEPSPEED and _zero3(accelerator):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(root.parameters()), modifier_rank=None):
            yield
            accelerator.wait_for_everyone()
        return
    yield


def _swap_in_whole(root: nn.Module, keep: bool) -> list[tuple[nn.Module, str, Any]]:
    """Replace each DTensor parameter by a whole CPU copy (when `keep`); returns what to undo.

    Collective: all processes walk the modules in the same order. A parameter shared by two
    modules (tied embeddings) is gathered once and stays shared.
    """
    whole: dict[int, nn.Parameter | None] = {}  # every process: gather each shared one once
    swapped: list[tuple[nn.Module, str, Any]] = []
    for module in root.modules():
        for name, param in list(module._parameters.items()):
            if param is None or not is_dtensor(param):
                continue
            if id(param) not in whole:
                full = full_cpu(param, keep)
                whole[id(param)] = None if full is None else nn.Parameter(full, param.requires_grad)
            if keep:
                swapped.append((module, name, param))
                module._parameters[name] = whole[id(param)]
    return swapped


def _zero3(accelerator: Accelerator) -> bool:
    plugin = accelerator.state.deepspeed_plugin
    return plugin is not None and plugin.zero_stage == 3
