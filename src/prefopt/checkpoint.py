"""Checkpoints that resume exactly and are never torn.

A checkpoint folder `checkpoints/step-000010/` holds the trainable weights (safetensors), the
optimizer and scheduler states, every RNG state, the trainer's position in the data and the
config. It is written under a temporary name and renamed when complete, so `resume=latest`
only ever sees finished checkpoints; saving a step that exists renames the old folder aside
before the new one takes its name, and deletes it last. A write that fails (disk full, file size
limit) removes the temporary folder and raises one `PrefoptError` naming the cause. Everything
loads with `weights_only=True`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from prefopt.config import ExperimentConfig
from prefopt.config_io import load_config
from prefopt.deepspeed_state import (
    check_resume_matches,
    engine_dir,
    is_deepspeed_checkpoint,
    load_engine_state,
)
from prefopt.errors import PrefoptError
from prefopt.sharding import shard_like, shard_optimizer_state

logger = logging.getLogger(__name__)

_PREFIX = "step-"
_OLD = ".old-"
_NAME = re.compile(r"step-(\d+)")


@dataclass
class TrainerState:
    """Where training stands; enough to continue exactly.

    Attributes:
        step: Optimizer steps done.
        epoch: Current epoch (0-based).
        batch_in_epoch: Effective batches of `epoch` already consumed.
        best_metric: Best early-stopping metric so far.
        bad_evals: Evaluations without improvement.
        skipped_steps: Steps skipped for non-finite values.
        tokens_seen: Non-pad tokens processed.
    """

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_metric: float | None = None
    bad_evals: int = 0
    skipped_steps: int = 0
    tokens_seen: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters (all weights for full fine-tune, adapters for LoRA)."""
    return {
        n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad
    }


def _rng_state() -> dict[str, Any]:
    # Plain tensors/lists/numbers only, so the file loads with weights_only=True.
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(internal), gauss],
        "numpy": [
            name,
            torch.from_numpy(np.asarray(keys).astype(np.int64)),
            pos,
            has_gauss,
            cached,
        ],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    root: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainerState,
    config_yaml: str,
    *,
    keep: int,
    weights: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
    engine_state: Path | None = None,
) -> Path:
    """Write a complete checkpoint atomically and prune old ones; returns its folder.

    `weights` / `optimizer_state`: already gathered whole (FSDP, see
    `sharding.gather_for_checkpoint`); by default read from `model` / `optimizer`.
    `engine_state`: a folder the DeepSpeed engine wrote its partitions into; it is moved in
    as `deepspeed/` and takes the place of `optimizer.pt` (see `deepspeed_state`).
    """
    root.mkdir(parents=True, exist_ok=True)
    _check_free_space(root, model)
    final = root / f"{_PREFIX}{state.step:06d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(
            weights if weights is not None else trainable_state(model),
            str(tmp / "trainable.safetensors"),
        )
        if engine_state is not None:
            shutil.move(str(engine_state), str(engine_dir(tmp)))
        else:
            torch.save(
                optimizer_state if optimizer_state is not None else optimizer.state_dict(),
                tmp / "optimizer.pt",
            )
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(_rng_state(), tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=2))
        (tmp / "config.yaml").write_text(config_yaml)
        _fsync_dir(tmp)
    except (OSError, SafetensorError, RuntimeError) as exc:
        # safetensors and torch.save report a full disk as their own types (SafetensorError
        # "File too large (os error 27)", RuntimeError "[enforce fail ...] unexpected pos");
        # any other RuntimeError (a CUDA error, a serialisation bug) is not a disk problem.
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, RuntimeError) and not _is_write_error(exc):
            raise
        raise PrefoptError(
            f"could not write checkpoint {final}: {write_failure(exc, root)}"
        ) from exc
    _replace(tmp, final)
    _prune(root, keep)
    logger.info("checkpoint saved: %s", final)
    return final


_WRITE_ERROR_TEXT = ("unexpected pos", "os error", "file write failed", "No space left")
"""What torch.save's RuntimeError says when the write itself failed (PyTorch's zip writer)."""


def _is_write_error(exc: RuntimeError) -> bool:
    return any(text in str(exc) for text in _WRITE_ERROR_TEXT)


def _replace(tmp: Path, final: Path) -> None:
    """Move the finished `tmp` to `final`; an existing `final` (a step saved again after a
    resume) is renamed aside first and deleted last, so a crash at any point leaves a complete
    step folder, or the old one under `.old-*` that `list_checkpoints` puts back."""
    old = final.with_name(f"{_OLD}{final.name}-{os.getpid()}")
    try:
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():
            old.rename(final)
        raise PrefoptError(f"could not write checkpoint {final}: {exc}") from None
    shutil.rmtree(old, ignore_errors=True)


def write_failure(exc: BaseException, folder: Path) -> str:
    """Why a write into `folder` failed, in words: the cause (disk full, file size limit,
    quota) where the error says it, else the error's text with the likely causes."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    code = getattr(exc, "errno", None)
    found = re.search(r"os error (\d+)", text)
    if found:
        code = int(found[1])
    causes = {
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is exceeded",
        errno.EFBIG: "a file exceeds the file size limit (ulimit -f)",
    }
    if code in causes:
        return f"{causes[code]} ({text})"
    limit = _file_size_limit()
    if limit is not None:  # torch.save's short write says only "unexpected pos"
        return f"a file may exceed the file size limit (ulimit -f: {limit} bytes) ({text})"
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    if free is not None and free < 1 << 20:
        return f"the disk is full ({text})"
    return f"{text} (disk full, quota or file size limit?)"


def _file_size_limit() -> int | None:
    """This process's file size limit in bytes (RLIMIT_FSIZE), or None when unlimited."""
    try:
        import resource  # POSIX only
    except ImportError:
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else soft


def _fsync_dir(path: Path) -> None:
    for child in path.rglob("*"):
        if child.is_file():
            with open(child, "rb") as fh:
                os.fsync(fh.fileno())


def _check_free_space(root: Path, model: nn.Module) -> None:
    """Refuse to start a checkpoint that cannot fit (weights + ~2× for Adam moments)."""
    need = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) * 3
    free = shutil.disk_usage(root).free
    if free < need * 1.1:
        raise PrefoptError(
            f"not enough disk space for a checkpoint in {root}: {free / 1e9:.2f} GB free, "
            f"~{need / 1e9:.2f} GB needed"
        )


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints in `root`, oldest first (temporary folders are ignored)."""
    if not root.is_dir():
        return []
    _restore_replaced(root)
    # Only exact "step-<digits>" names: a copied "step-000010-backup" must not crash the sort.
    done = [p for p in root.iterdir() if _NAME.fullmatch(p.name) and _complete(p)]
    return sorted(done, key=lambda p: int(p.name[len(_PREFIX) :]))


def _restore_replaced(root: Path) -> None:
    """Undo a replacement cut short between its two renames (see `_replace`): a complete
    `.old-step-N-PID` without its `step-N` goes back; one whose step was replaced is stale."""
    for old in root.glob(f"{_OLD}{_PREFIX}*"):
        name = old.name[len(_OLD) :].rpartition("-")[0]
        if not _NAME.fullmatch(name):
            continue
        final = root / name
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        elif _complete(old):
            try:
                old.rename(final)
            except OSError:
                continue  # another process put it back first
            logger.warning("%s: restored from %s (a save replacing it was cut short)", final, old)


def _complete(path: Path) -> bool:
    names = ("trainable.safetensors", "scheduler.pt", "rng.pt", "trainer_state.json")
    optimizer = (path / "optimizer.pt").is_file() or is_deepspeed_checkpoint(path)
    return optimizer and all((path / n).is_file() for n in names)


def _prune(root: Path, keep: int) -> None:
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def resolve_resume(root: Path, resume: str) -> Path:
    """The checkpoint folder named by `resume` ("latest" or a path)."""
    if resume == "latest":
        found = list_checkpoints(root)
        if not found:
            raise PrefoptError(f"resume=latest: no complete checkpoint in {root}")
        return found[-1]
    path = Path(resume)
    if not _complete(path):
        raise PrefoptError(f"resume={resume}: not a complete prefopt checkpoint folder")
    return path


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    engine: Any | None = None,
) -> TrainerState:
    """Restore weights, optimizer, scheduler and RNG from `path`; returns the trainer state.

    `engine`: the DeepSpeed engine when running under DeepSpeed; it restores the weights and
    its optimizer partitions from the checkpoint's `deepspeed/` folder itself.
    """
    check_resume_matches(path, engine)
    state = TrainerState(**json.loads((path / "trainer_state.json").read_text()))
    if engine is not None:
        load_engine_state(engine, path, state.extra.get("world_size"))
    else:
        _load_weights_and_optimizer(path, model, optimizer)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    _set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    logger.info("resumed from %s (step %d)", path, state.step)
    return state


def _load_weights_and_optimizer(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    load_trainable(path, model)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    shard_optimizer_state(optimizer)


def load_trainable(path: Path, model: nn.Module) -> None:
    """Copy checkpoint `path`'s trainable weights into `model`, built as its run built it.

    Raises:
        PrefoptError: A trainable parameter of `model` missing from the checkpoint, or a
            checkpoint tensor that is no parameter of `model` or has another shape.
    """
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    unknown = [n for n in weights if n not in params]
    resized = [n for n, t in weights.items() if n in params and t.shape != params[n].shape]
    if missing or unknown or resized:
        raise PrefoptError(
            f"checkpoint {path} does not match the model: missing {missing[:3]}, "
            f"unknown {unknown[:3]}, different shape {resized[:3]} (first 3 of each)"
        )
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(shard_like(tensor, params[name]))  # FSDP: this process's shard


def checkpoint_run_config(location: str | Path) -> ExperimentConfig | None:
    """The config of the run that wrote checkpoint folder `location` (its `config.yaml`), or
    None when `location` is not a checkpoint (no trainable.safetensors and config.yaml)."""
    path = Path(location)
    if not ((path / "trainable.safetensors").is_file() and (path / "config.yaml").is_file()):
        return None
    return load_config(path / "config.yaml")


def checkpoint_step(path: Path) -> int:
    """The optimizer steps done when checkpoint `path` was saved."""
    return int(json.loads((path / "trainer_state.json").read_text())["step"])
