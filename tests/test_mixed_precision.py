"""train.mixed_precision=bf16 on CPU (torch's CPU autocast): the reference scores under the same
autocast as the policy, for every reference strategy, so step-0 rewards are exactly zero."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from prefopt.trainer import TrainResult
from toy_models import toy_assets, toy_train

LN2 = math.log(2.0)


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return toy_assets(tmp_path_factory.mktemp("mp"), n_train=8)


def run(assets: dict[str, Path], out: Path, *overrides: str) -> TrainResult:
    return toy_train(
        assets, out, "train.max_steps=2", "train.device=cpu", "output.report=false", *overrides
    )


def health_kinds(out: Path) -> list[str]:
    return [f["kind"] for f in json.loads((out / "health.json").read_text())]


@pytest.mark.parametrize(
    "strategy",
    [
        ["reference.strategy=copy"],
        ["lora.enabled=true", "lora.r=4", "lora.dropout=0.0"],  # adapter reference
        ["reference.strategy=precompute", "reference.cache_dir={tmp}"],
    ],
    ids=["copy", "adapter", "precompute"],
)
def test_bf16_autocast_reference_equals_policy_at_step0(
    strategy: list[str], assets: dict[str, Path], tmp_path: Path
) -> None:
    """Without the reference under the policy's autocast, bf16-vs-fp32 rounding alone showed as
    nonzero step-0 rewards (margins ~0.1, accuracy 0.75) and a false reference_drift."""
    out = tmp_path / "out"
    overrides = [s.format(tmp=tmp_path / "cache") for s in strategy]
    result = run(assets, out, "train.mixed_precision=bf16", *overrides)
    assert result.initial_eval is not None
    assert result.initial_eval["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert result.initial_eval["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert result.initial_eval["loss"] == pytest.approx(LN2, abs=1e-6)
    assert "reference_drift" not in health_kinds(out)


def test_second_run_in_process_may_change_precision(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    """A notebook or sweep trains twice in one process with different precisions; accelerate's
    process-wide state used to refuse the second."""
    first = run(assets, tmp_path / "a", "train.mixed_precision=no")
    second = run(assets, tmp_path / "b", "train.mixed_precision=bf16")
    third = run(assets, tmp_path / "c", "train.mixed_precision=no")
    for result in (first, second, third):
        assert result.initial_eval is not None
        assert result.initial_eval["loss"] == pytest.approx(LN2, abs=1e-6)
