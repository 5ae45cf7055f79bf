"""Metrics tracking: JSONL lines (NaN kept visible), reading back, TensorBoard and W&B (a
stand-in module, offline), each falling back to JSONL alone when not installed."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest

from prefopt.tracking import Progress, Tracker, read_metrics

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


def test_jsonl_lines_and_read_back(tmp_path: Path) -> None:
    tracker = Tracker(tmp_path, ["jsonl"], config={})
    tracker.log({"step": 1, "split": "train", "loss": 0.69, "rewards/accuracies": 0.5})
    tracker.log({"step": 2, "split": "eval", "loss": float("nan"), "grad_norm": float("inf"),
                 "note": "spike"})  # fmt: skip
    tracker.close()
    lines = (tmp_path / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2
    for line in lines:
        json.loads(line, parse_constant=_no_bare_constants)  # strict JSON: no NaN/Infinity
    records = read_metrics(tmp_path)
    assert records[0] == {"step": 1, "split": "train", "loss": 0.69, "rewards/accuracies": 0.5}
    assert records[1]["loss"] == "nan"
    assert records[1]["grad_norm"] == "inf"
    assert math.isnan(float(records[1]["loss"]))  # still readable as a number
    assert records[1]["note"] == "spike"


def _no_bare_constants(name: str) -> float:
    raise AssertionError(f"bare {name} in metrics.jsonl is not valid JSON")


def test_a_resumed_run_appends(tmp_path: Path) -> None:
    Tracker(tmp_path, ["jsonl"], config={}).log({"step": 1, "loss": 1.0})
    Tracker(tmp_path, ["jsonl"], config={}).log({"step": 2, "loss": 0.5})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_disabled_tracker_writes_nothing(tmp_path: Path) -> None:
    tracker = Tracker(tmp_path, ["jsonl", "tensorboard"], config={}, enabled=False)
    tracker.log({"step": 1, "loss": 1.0})
    tracker.close()
    assert not (tmp_path / "metrics.jsonl").exists()
    assert not (tmp_path / "tensorboard").exists()
    assert read_metrics(tmp_path) == []


def test_read_metrics_of_an_empty_run(tmp_path: Path) -> None:
    assert read_metrics(tmp_path) == []
    (tmp_path / "metrics.jsonl").write_text("", encoding="utf-8")
    assert read_metrics(tmp_path) == []


def test_tensorboard_missing_warns_and_keeps_jsonl(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    with caplog.at_level(logging.WARNING, logger="prefopt.tracking"):
        tracker = Tracker(tmp_path, ["jsonl", "tensorboard"], config={})
    assert "pip install tensorboard" in caplog.text
    tracker.log({"step": 1, "loss": 1.0})
    tracker.close()
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}]
    assert not (tmp_path / "tensorboard").exists()


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed")
def test_tensorboard_writes_event_files(tmp_path: Path) -> None:
    tracker = Tracker(tmp_path, ["jsonl", "tensorboard"], config={})
    tracker.log({"step": 3, "split": "train", "loss": 0.5, "note": "text is skipped"})
    tracker.close()
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert acc.Tags()["scalars"] == ["train/loss"]
    (event,) = acc.Scalars("train/loss")
    assert (event.step, event.value) == (3, 0.5)


def test_progress_without_bar_logs_every_tenth_of_the_run(caplog: pytest.LogCaptureFixture) -> None:
    """No bar (logs to a file): eval lines and a step line every tenth of the run go to the log."""
    progress = Progress(total=25, initial=0, enabled=False)
    with caplog.at_level(logging.INFO, logger="prefopt.tracking"):
        for i in range(25):
            progress.update({"loss": 0.5 - i / 100, "rewards/accuracies": 0.75})
        progress.write("eval at step 25")
    progress.close()
    steps = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [s.split()[1] for s in steps] == [f"{k}/25" for k in (2, 4, 6, 8, 10, 12, 14, 16, 18,
                                                                  20, 22, 24, 25)]  # fmt: skip
    assert "loss 0.2600  acc 0.75" in steps[-1] and "s left" in steps[-1]
    assert "eval at step 25" in caplog.text


def test_progress_bar_counts_steps(capsys: pytest.CaptureFixture[str]) -> None:
    progress = Progress(total=4, initial=1, enabled=True)
    progress.update({"loss": 0.25, "rewards/accuracies": 1.0, "rewards/margins": 0.5})
    progress.close()
    err = capsys.readouterr().err
    assert "2/4" in err and "loss=0.2500" in err and "acc=1.00" in err


def test_progress_shows_only_the_metrics_the_loss_logs(caplog: pytest.LogCaptureFixture) -> None:
    """SFT logs no rewards: its step line shows loss and perplexity, never "acc nan"."""
    progress = Progress(total=1, initial=0, enabled=False)
    with caplog.at_level(logging.INFO, logger="prefopt.tracking"):
        progress.update({"loss": 0.5, "perplexity": 1.6487})
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("step "))
    assert line.startswith("step 1/1  loss 0.5000  ppl 1.65  (")
    assert "nan" not in line and "acc" not in line


def test_wandb_gets_the_config_every_record_and_finish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stand-in `wandb` module (offline, no account) records what the tracker sends."""
    import sys
    import types

    calls: list[tuple[str, Any]] = []

    class FakeRun:
        def log(self, data: dict[str, float], step: int) -> None:
            calls.append(("log", (data, step)))

        def finish(self) -> None:
            calls.append(("finish", None))

    def init(**kwargs: Any) -> FakeRun:
        calls.append(("init", kwargs))
        return FakeRun()

    fake = types.ModuleType("wandb")
    fake.init = init  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "wandb", fake)
    config = {"loss": {"name": "sigmoid", "beta": 0.1}}
    tracker = Tracker(tmp_path, ["jsonl", "wandb"], config=config)
    tracker.log({"step": 1, "split": "train", "loss": 0.69, "note": "text is skipped"})
    tracker.log({"step": 2, "split": "eval", "rewards/accuracies": 0.75})
    tracker.close()
    assert calls == [
        ("init", {"project": "prefopt", "dir": str(tmp_path), "config": config}),
        ("log", ({"train/loss": 0.69}, 1)),
        ("log", ({"eval/rewards/accuracies": 0.75}, 2)),
        ("finish", None),
    ]
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]  # the JSONL file as always


def test_wandb_missing_warns_and_keeps_jsonl(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with caplog.at_level(logging.WARNING, logger="prefopt.tracking"):
        tracker = Tracker(tmp_path, ["jsonl", "wandb"], config={})
    assert "pip install wandb" in caplog.text
    tracker.log({"step": 1, "loss": 1.0})
    tracker.close()
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}]
