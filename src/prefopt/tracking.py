"""Where metrics go: a JSONL file (always), TensorBoard and W&B through accelerate's trackers
(when asked), a progress bar."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefopt.errors import PrefoptError

logger = logging.getLogger(__name__)


class Tracker:
    """Writes each step's metrics to `metrics.jsonl` and to any optional loggers.

    Args:
        output_dir: Run folder (metrics.jsonl is appended to, so a resumed run continues it).
        report_to: Logger names: "jsonl", "tensorboard", "wandb".
        config: Resolved config as a dict (sent to W&B).
        enabled: False on non-main processes.
    """

    def __init__(
        self, output_dir: Path, report_to: list[str], config: dict[str, Any], enabled: bool = True
    ):
        self.enabled = enabled
        self.path = output_dir / "metrics.jsonl"
        self._tb: Any = None
        self._wandb: Any = None
        self.observers: list[Callable[[dict[str, Any]], None]] = []
        """Called with every logged record (e.g. the health monitor)."""
        if not enabled:
            return
        _end_torn_line(self.path)
        if "tensorboard" in report_to:  # events in output_dir/tensorboard
            self._tb = _start_tracker("tensorboard", "tensorboard", output_dir)
        if "wandb" in report_to:
            self._wandb = _start_tracker("wandb", "prefopt", dir=str(output_dir), config=config)

    def log(self, record: dict[str, Any]) -> None:
        """Append one record ({"step": n, "split": "train"|"eval", metric: value, ...})."""
        if not self.enabled:
            return
        for observe in self.observers:
            observe(record)
        clean = {k: _jsonable(v) for k, v in record.items()}
        try:
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(clean) + "\n")
        except OSError as exc:  # disk full, file size limit: one clear line, not a traceback
            raise PrefoptError(f"could not append to {self.path}: {exc}") from None
        split, step = record.get("split", "train"), int(record.get("step", 0))
        numbers = {
            f"{split}/{k}": float(v)
            for k, v in record.items()
            if isinstance(v, (int, float)) and k not in ("step", "split")
        }
        for tracker in (self._tb, self._wandb):
            if tracker is not None:
                tracker.log(numbers, step=step)

    def close(self) -> None:
        for tracker in (self._tb, self._wandb):
            if tracker is not None:
                tracker.finish()


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf; keep them visible as strings
    return value


def _start_tracker(kind: str, *args: Any, **kwargs: Any) -> Any:
    """accelerate's tracker of `kind` ("tensorboard": TensorBoardTracker(run_name,
    logging_dir); "wandb": WandBTracker(project, **wandb.init kwargs)), started; None with a
    warning when its package is not installed."""
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    tracker = TensorBoardTracker(*args, **kwargs) if kind == "tensorboard" else WandBTracker(
        *args, **kwargs
    )  # fmt: skip
    try:
        tracker.start()
    except ImportError:
        logger.warning("report_to has %s but it is not installed: pip install %s", kind, kind)
        return None
    return tracker


def read_metrics(output_dir: Path) -> list[dict[str, Any]]:
    """All records of a run's metrics.jsonl (a line cut short by a crash is skipped)."""
    path = output_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning(
                "%s, line %d: not a complete record (cut by a crash?); skipped", path, number
            )
    return records


def _end_torn_line(path: Path) -> None:
    """Finish a last line cut short by a crash, so the next record starts on a line of its own."""
    if path.is_file() and path.stat().st_size > 0:
        with path.open("rb") as fh:
            fh.seek(-1, 2)
            torn = fh.read(1) != b"\n"
        if torn:
            with path.open("a", encoding="utf-8") as fh:
                fh.write("\n")


_SHOWN = (
    ("loss", "loss", "%.4f"),
    ("rewards/accuracies", "acc", "%.2f"),
    ("rewards/margins", "margin", "%.3f"),
    ("kl", "kl", "%.3f"),
    ("perplexity", "ppl", "%.2f"),
)
"""(metric, short name, format) shown per step, where the loss logs that metric: preference
losses log rewards, KTO its KL estimate, SFT a perplexity; a missing one is left out, not nan."""


class Progress:
    """A tqdm bar over optimizer steps showing loss, accuracy, margin and ETA. Without the bar
    (`output.progress=false`, logs to a file) the same goes to the log every tenth of the run."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self._bar: Any = None
        self.start = time.perf_counter()
        self.total, self.initial, self.step = total, initial, initial
        self.log_every = max(1, total // 10)
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc="train", unit="step", leave=True)

    def update(self, metrics: dict[str, float]) -> None:
        self.step += 1
        if self._bar is None:
            if self.step % self.log_every == 0 or self.step == self.total:
                self._log_line(metrics)
            return
        self._bar.set_postfix(
            {name: fmt % metrics[key] for key, name, fmt in _SHOWN if key in metrics},
            refresh=False,
        )
        self._bar.update(1)

    def _log_line(self, metrics: dict[str, float]) -> None:
        per_step = (time.perf_counter() - self.start) / max(1, self.step - self.initial)
        shown = "  ".join(f"{name} {fmt % metrics[key]}" for key, name, fmt in _SHOWN
                          if key in metrics)  # fmt: skip
        logger.info(
            "step %d/%d  %s  (%.1f s/step, %.0f s left)", self.step, self.total, shown,
            per_step, per_step * (self.total - self.step),
        )  # fmt: skip

    def write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text)
        else:
            logger.info(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
