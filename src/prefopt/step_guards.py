"""What stops a run before its last step: a signal (`Interrupted`), non-finite numbers
(`NonFiniteError`: the loss and gradient norm of each step, the trainable weights before every
checkpoint), and early stopping on an eval metric."""

from __future__ import annotations

import logging
import math

import torch

from prefopt.checkpoint import TrainerState
from prefopt.errors import PrefoptError
from prefopt.run_setup import RunParts

logger = logging.getLogger(__name__)


class Interrupted(PrefoptError):
    """Training stopped by SIGINT/SIGTERM after saving a checkpoint."""


class NonFiniteError(PrefoptError):
    """Loss or gradient became NaN/Inf."""


def step_finite(values: dict[str, float]) -> bool:
    return all(math.isfinite(values.get(k, 0.0)) for k in ("loss", "grad_norm"))


def weights_finite(model: torch.nn.Module) -> bool:
    """Whether this process's part of the trainable weights is finite (FSDP2: its shards;
    ZeRO-3: its partitions, the parameters themselves being empty placeholders)."""
    for p in model.parameters():
        if not p.requires_grad:
            continue
        local = getattr(p, "ds_tensor", None)
        if local is None:
            local = p.to_local() if hasattr(p, "to_local") else p
        if not bool(torch.isfinite(local.detach()).all()):
            return False
    return True


def handle_non_finite(
    run: RunParts, state: TrainerState, batch: list[int], values: dict[str, float]
) -> None:
    rows = sorted({int(run.data.train[p].index) for p in batch})
    message = (
        f"step {state.step + 1}: non-finite loss={values.get('loss')} or "
        f"grad_norm={values.get('grad_norm')} on source rows {rows}"
    )
    if run.cfg.train.on_nan == "skip":
        state.skipped_steps += 1
        logger.warning("%s; step skipped (%d so far)", message, state.skipped_steps)
        return
    raise NonFiniteError(message + "; stopping (the last checkpoint is kept). "
                         "Set train.on_nan=skip to skip such steps")  # fmt: skip


def early_stop(run: RunParts, state: TrainerState, metrics: dict[str, float]) -> bool:
    """Update patience with the eval metric; True when training should stop."""
    name = run.cfg.eval.early_stopping_metric
    if name is None:
        return False
    if name not in metrics:  # validate_config checks the name; this would be a new metric name
        raise PrefoptError(
            f"eval.early_stopping_metric={name} is not among this evaluation's metrics "
            f"({', '.join(sorted(metrics))})"
        )
    value = metrics[name]
    better = state.best_metric is None or (
        value > state.best_metric if run.cfg.eval.early_stopping_mode == "max"
        else value < state.best_metric
    )  # fmt: skip
    if better:
        state.best_metric, state.bad_evals = value, 0
        return False
    state.bad_evals += 1
    return state.bad_evals >= run.cfg.eval.patience
