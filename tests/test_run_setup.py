"""Run setup pieces on their own: the learning-rate schedule's exact values."""

from __future__ import annotations

import math

import pytest

from prefopt.config_io import load_config
from prefopt.run_setup import lr_lambda


def _factors(total: int, *overrides: str) -> list[float]:
    factor = lr_lambda(load_config(None, list(overrides)), total)
    return [factor(step) for step in range(total + 1)]


COS_QUARTER = 0.5 * (1 + math.cos(math.pi / 4))  # cosine decay a quarter of the way: 0.8536


@pytest.mark.parametrize(
    ("scheduler", "expected"),
    [
        # warm-up (step + 1) / (warmup + 1) over steps 0, 1; then decay over the 8 steps left
        ("linear", [1 / 3, 2 / 3, 1, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0]),
        ("cosine", [1 / 3, 2 / 3, 1, None, COS_QUARTER, None, 0.5, None, 1 - COS_QUARTER, None, 0]),
        ("constant", [1 / 3, 2 / 3, 1, 1, 1, 1, 1, 1, 1, 1, 1]),
    ],
)
def test_warmup_then_schedule(scheduler: str, expected: list[float | None]) -> None:
    got = _factors(10, f"optim.scheduler={scheduler}", "optim.warmup_steps=2")
    for step, (value, want) in enumerate(zip(got, expected, strict=True)):
        if want is not None:
            assert value == pytest.approx(want, abs=1e-12), step


def test_warmup_ratio_and_steps() -> None:
    """warmup_ratio × total steps (rounded down) unless warmup_steps is set, which wins."""
    assert _factors(20, "optim.warmup_ratio=0.1")[:3] == pytest.approx([1 / 3, 2 / 3, 1])
    assert _factors(20, "optim.warmup_ratio=0.1", "optim.warmup_steps=4")[:5] == pytest.approx(
        [0.2, 0.4, 0.6, 0.8, 1]
    )
    no_warmup = _factors(4, "optim.warmup_ratio=0")
    assert no_warmup == pytest.approx([1, 0.75, 0.5, 0.25, 0])  # linear from the peak at once
