"""How a run ends when it does not end well: a signal outside the loop (setup, the final
evaluation), an update that overflows the weights, and non-finite steps that must reach
health.json and the report. In-process runs on a tiny model; signals are sent to this process.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import prefopt.trainer as trainer_mod
from prefopt.checkpoint import list_checkpoints
from prefopt.cli import EXIT_INTERRUPTED, main
from prefopt.config_io import load_config
from prefopt.trainer import Interrupted, NonFiniteError, TrainResult, train
from toy_models import learnable_pairs, save_toy_model, write_jsonl

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stop-assets")
    return {
        "model": save_toy_model(root / "model"),
        "train": write_jsonl(root / "train.jsonl", learnable_pairs(24, seed=0)),
    }


def args(assets: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        f"model.name_or_path={assets['model']}",
        f"data.train={assets['train']}",
        f"output.dir={out}",
        "optim.warmup_ratio=0",
        "train.batch_size=4",
        "train.num_threads=1",
        "output.progress=false",
        *extra,
    ]


def run(assets: dict[str, Path], out: Path, *extra: str) -> TrainResult:
    return train(load_config(None, args(assets, out, *extra)))


def health(out: Path) -> list[dict[str, Any]]:
    return json.loads((out / "health.json").read_text())


def test_signal_during_the_final_eval_keeps_checkpoint_and_model(
    assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Ctrl-C while the final evaluation runs (default save_every=0: no checkpoint yet) must
    not lose the run: the checkpoint is written before the eval, the model after it, and
    resume=latest completes the run without training again."""
    out = tmp_path / "out"
    real_finish = trainer_mod._Loop.finish

    def finish_with_ctrl_c(self: Any, stopped_early: bool) -> Any:
        os.kill(os.getpid(), signal.SIGINT)  # arrives as the final phase starts
        return real_finish(self, stopped_early)

    monkeypatch.setattr(trainer_mod._Loop, "finish", finish_with_ctrl_c)
    common = ("train.max_steps=3", "data.eval_fraction=0.25")
    with pytest.raises(Interrupted, match="interrupted at the end of training .step 3.") as err:
        run(assets, out, *common)
    assert "and the final model in" in str(err.value)
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-000003"]
    assert (out / "model").is_dir()
    monkeypatch.undo()
    resumed = run(assets, out, *common, "resume=latest", "output.overwrite=true")
    assert resumed.state.step == 3 and resumed.final_eval is not None
    train_steps = [
        r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        if r.get("split") == "train"
    ]  # fmt: skip
    assert train_steps == [1, 2, 3]  # nothing trained twice


def test_signal_during_setup_stops_at_once(
    assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    """SIGTERM while the model loads: nothing to save, so the command stops at once with
    prefopt's "interrupted" line (exit 130), not a silent kill or a finished step."""
    real_build = trainer_mod.build_run

    def build_with_sigterm(*a: Any, **k: Any) -> Any:
        os.kill(os.getpid(), signal.SIGTERM)
        return real_build(*a, **k)

    monkeypatch.setattr(trainer_mod, "build_run", build_with_sigterm)
    code = main(["train", *args(assets, tmp_path / "out", "train.max_steps=3")])
    assert code == EXIT_INTERRUPTED
    assert "prefopt: interrupted" in capsys.readouterr().err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def test_an_update_that_overflows_the_weights_is_never_checkpointed(
    assets: dict[str, Path], tmp_path: Path
):
    """lr × weight decay overflows: the loss and gradient of step 1 were finite, the weights
    after it are not. Saving them would make the "last good checkpoint" a bad one."""
    out = tmp_path / "out"
    with pytest.raises(NonFiniteError, match="step 1: the update made some trainable weights"):
        run(assets, out, "optim.lr=3e38", "optim.weight_decay=10", "output.save_every=1",
            "train.max_steps=3")  # fmt: skip
    for ckpt in list_checkpoints(out / "checkpoints"):
        weights = load_file(str(ckpt / "trainable.safetensors"))
        assert all(bool(torch.isfinite(t).all()) for t in weights.values()), ckpt


@pytest.mark.parametrize("on_nan", ["skip", "stop"])
def test_non_finite_steps_reach_health_and_report(
    assets: dict[str, Path], tmp_path: Path, on_nan: str
):
    """A huge lr makes the loss non-finite from step 2: skipped or stopping, the step is in
    metrics.jsonl, health.json carries a non_finite error and the report is written."""
    out = tmp_path / on_nan
    extra = ("optim.lr=1e30", f"train.on_nan={on_nan}", "train.max_steps=4")
    if on_nan == "stop":
        with pytest.raises(NonFiniteError, match="non-finite loss"):
            run(assets, out, *extra)
    else:
        result = run(assets, out, *extra)
        assert result.state.skipped_steps >= 1
    kinds = {f["kind"]: f for f in health(out)}
    assert kinds["non_finite"]["severity"] == "error"
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("non_finite_step") == 1.0 for r in records)
    page = (out / "report" / "index.html").read_text()
    assert "non-finite training step(s)" in page


class _InfiniteGradient(torch.autograd.Function):
    """Identity forward, infinite backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("inf")


@pytest.mark.parametrize("on_nan", ["stop", "skip"])
def test_a_finite_loss_with_an_infinite_gradient_is_caught(
    assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, on_nan: str
):
    """The check looks at the gradient norm too: step 2's loss is finite, its gradient is not."""
    import prefopt.evaluation as evaluation
    from prefopt.step import StepOutput

    real, calls = evaluation.paired_step, []

    def infinite_gradient_at_step_2(*a: Any, **k: Any) -> StepOutput:
        out = real(*a, **k)
        calls.append(1)
        if len(calls) != 2:
            return out
        return StepOutput(_InfiniteGradient.apply(out.losses), out.metrics)

    monkeypatch.setattr(evaluation, "paired_step", infinite_gradient_at_step_2)
    extra = ("train.max_steps=3", f"train.on_nan={on_nan}", "optim.lr=1e-3")
    if on_nan == "stop":
        with pytest.raises(
            NonFiniteError, match=r"step 2: non-finite loss=0\.\d+ or grad_norm=(inf|nan)"
        ):
            run(assets, tmp_path / "out", *extra)
        return
    result = run(assets, tmp_path / "out", *extra)
    assert result.state.skipped_steps == 1 and result.state.step == 3
    records = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in records if r.get("non_finite_step")]
    assert [r["step"] for r in skipped] == [2] and skipped[0]["grad_norm"] in ("inf", "nan")
