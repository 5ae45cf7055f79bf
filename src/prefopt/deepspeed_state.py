"""DeepSpeed specifics: running it on CPU processes, and its partitioned checkpoint state.

Under ZeRO each process holds only its partition of the optimizer state (and, at stage 3, of
the weights), so one whole `optimizer.pt` cannot describe a run. A prefopt checkpoint taken
under DeepSpeed therefore keeps the usual files (whole trainable weights, scheduler, RNG,
trainer state, config) and replaces `optimizer.pt` with a `deepspeed/` folder written by the
engine itself (`DeepSpeedEngine.save_checkpoint`: one file per process and partition).
Resuming needs the same DeepSpeed launch with the same number of processes; the trainer state
records it, and anything else is refused with that message.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from prefopt.errors import ConfigError, PrefoptError

ENGINE_DIR = "deepspeed"
"""The engine's own checkpoint folder inside a prefopt checkpoint."""
TAG = "zero"
"""The tag (sub-folder) DeepSpeed writes its files under."""


def deepspeed_launch() -> bool:
    """Whether `accelerate launch` was asked for DeepSpeed (it exports this for the workers)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def start_deepspeed_on_cpu() -> None:
    """Let a DeepSpeed launch run on CPU processes (gloo), instead of silently as DDP.

    accelerate turns DeepSpeed on only for GPU-like devices: with `cpu=True` it ignores
    ACCELERATE_USE_DEEPSPEED and runs plain multi-process DDP. DeepSpeed itself has a CPU
    accelerator. Creating the process-wide PartialState with `cpu=False` and the gloo backend
    first makes the Accelerator built next (with `cpu=False`) a real DeepSpeed one, whose
    device is still the CPU. Used by CPU runs and by prefopt's CI test of ZeRO-2/3.
    """
    if torch.cuda.is_available():
        raise ConfigError(
            "train.device=cpu under a DeepSpeed launch on a machine with GPUs: DeepSpeed would "
            "pick the GPUs. Hide them (CUDA_VISIBLE_DEVICES=) or drop train.device=cpu"
        )
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from accelerate import PartialState

    PartialState(cpu=False, backend="gloo")


@contextlib.contextmanager
def single_process_loading() -> Iterator[None]:
    """Load models as one plain process inside a DeepSpeed run (the main process's reload
    check, judge and samples after training): under ZeRO-3, transformers would otherwise
    load them partitioned (deepspeed.zero.Init), a collective the other processes never join,
    and the run would hang."""
    from transformers.integrations import deepspeed as hf_ds

    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def engine_dir(checkpoint: Path) -> Path:
    return checkpoint / ENGINE_DIR


def is_deepspeed_checkpoint(checkpoint: Path) -> bool:
    return engine_dir(checkpoint).is_dir()


def save_engine_state(engine: Any, staging: Path, *, main: bool) -> None:
    """Every process: write the engine's partitions into `staging` (collective).

    `staging` is a name every process computes alike (the trainer's own temporary folder is
    per process id); the main process moves it into the checkpoint when the rest is written.
    """
    if main:
        shutil.rmtree(staging, ignore_errors=True)
    torch.distributed.barrier()  # no process writes into a folder main is still removing
    engine.save_checkpoint(str(staging), tag=TAG, save_latest=False)
    torch.distributed.barrier()  # every partition is on disk before main moves the folder


def load_engine_state(engine: Any, checkpoint: Path, saved_world: int | None) -> None:
    """Every process: restore its weights and optimizer partitions from `checkpoint`."""
    world = torch.distributed.get_world_size()
    if saved_world is not None and saved_world != world:
        raise PrefoptError(
            f"checkpoint {checkpoint} was written by {saved_world} DeepSpeed processes and this "
            f"launch has {world}: ZeRO partitions only load into the same number of processes"
        )
    path, _ = engine.load_checkpoint(
        str(engine_dir(checkpoint)), tag=TAG,
        load_optimizer_states=True, load_lr_scheduler_states=False,
    )  # fmt: skip
    if path is None:
        raise PrefoptError(f"DeepSpeed found no engine state in {engine_dir(checkpoint)}")


def check_resume_matches(checkpoint: Path, engine: Any | None) -> None:
    """Refuse a checkpoint whose optimizer state this launch cannot read."""
    if is_deepspeed_checkpoint(checkpoint) and engine is None:
        raise PrefoptError(
            f"checkpoint {checkpoint} was written under DeepSpeed (its optimizer state is "
            "partitioned per process): resume it under the same DeepSpeed launch"
        )
    if engine is not None and not is_deepspeed_checkpoint(checkpoint):
        raise PrefoptError(
            f"checkpoint {checkpoint} has no DeepSpeed state (it was written without "
            "DeepSpeed): resume it with the launch that wrote it"
        )
