"""Where one prefopt optimizer step spends its time (used by `run_prefopt.py --profile`).

Two steps after warm-up: the first timed by phase with forward hooks (policy forward, its decoder
vs. LM head, reference forward, clipping, AdamW; backward is what remains), the second under
`torch.profiler` for the top operators by self CPU time.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from measure import BATCH
from torch import nn


class PhaseTimer:
    """Wall time per named phase, accumulated over calls."""

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)
        self._start: dict[str, float] = {}

    def start(self, name: str) -> None:
        self._start[name] = time.perf_counter()

    def stop(self, name: str) -> None:
        self.total[name] += time.perf_counter() - self._start.pop(name)

    def hook(self, module: nn.Module, name: Callable[[], str]) -> list[Any]:
        """Time every forward of `module` under the phase `name()` gives at call time."""
        current: list[str] = []

        def pre(*_: Any) -> None:
            current.append(name())
            self.start(current[-1])

        def post(*_: Any) -> None:
            self.stop(current.pop())

        return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]


def _decoder(scorer: nn.Module) -> nn.Module:
    """The decoder body inside a SequenceLogprobModel (through a peft wrapper if any)."""
    model: Any = scorer.model
    get_base = getattr(model, "get_base_model", None)
    lm = get_base() if callable(get_base) else model
    decoder: nn.Module = lm.base_model
    return decoder


def _timed_step(run: Any, prepared: Any, batch: list[int]) -> dict[str, float]:
    from prefopt.trainer import _train_step

    timer, calls = PhaseTimer(), [0]
    ref = getattr(run.reference, "scorer", None)
    shared = ref is run.scorer  # LoRA: the same module scores the reference, adapters off

    def scorer_phase() -> str:
        calls[0] += 1
        return "policy forward" if calls[0] == 1 or not shared else "reference forward"

    def decoder_phase() -> str:  # runs inside the scorer's forward: calls[0] is already set
        return "  decoder part of " + ("policy" if calls[0] == 1 or not shared else "reference")

    handles = timer.hook(run.scorer, scorer_phase) + timer.hook(_decoder(run.scorer), decoder_phase)
    if ref is not None and not shared:
        handles += timer.hook(ref, lambda: "reference forward")
        handles += timer.hook(_decoder(ref), lambda: "  decoder part of reference")
    clip = run.accelerator.clip_grad_norm_

    def timed_clip(*a: Any, **k: Any) -> Any:
        timer.start("clip grad norm")
        out = clip(*a, **k)
        timer.stop("clip grad norm")
        return out

    run.accelerator.clip_grad_norm_ = timed_clip
    t0 = time.perf_counter()
    _train_step(run, batch, prepared)
    train_step = time.perf_counter() - t0
    timer.start("AdamW step")
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    timer.stop("AdamW step")
    run.accelerator.clip_grad_norm_ = clip
    for h in handles:
        h.remove()
    phases = dict(timer.total)
    top = ("policy forward", "reference forward", "clip grad norm")
    phases["backward + loss + collate (rest)"] = train_step - sum(phases.get(k, 0.0) for k in top)
    phases["total"] = train_step + phases["AdamW step"]
    return phases


def profile_prefopt(run: Any, prepared: Any, first_row: int) -> None:
    """Print the phase split of one step, then the top operators of the next."""
    from prefopt.trainer import _train_step

    phases = _timed_step(run, prepared, list(range(first_row, first_row + BATCH)))
    total = phases["total"]
    print("\nphase split of one prefopt step:")
    for name, seconds in phases.items():
        print(f"  {name:40s} {seconds:7.2f} s  {100 * seconds / total:5.1f}%")
    batch = list(range(first_row + BATCH, first_row + 2 * BATCH))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _train_step(run, batch, prepared)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    print("\ntop operators of the next step (self CPU time):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
