"""What a training run does once, around the loop: the step-0 reference check, the health
monitor that watches every logged record, and at the end a reload of the saved model with plain
transformers/peft, the judge comparison of the saved model, health.json and the HTML report.
Failures of the judge and report are logged, never raised: by then the model is saved. A saved
model that does not load back is an error.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch

from prefopt.collate import collate_pairs
from prefopt.config import ExperimentConfig
from prefopt.errors import PrefoptError
from prefopt.final_judge import judge_after_training
from prefopt.health import HealthMonitor
from prefopt.output import adapter_base, base_gguf_file
from prefopt.reference import check_reference
from prefopt.report import HEALTH_FILE, write_report
from prefopt.run_setup import RunParts
from prefopt.step import pair_keys
from prefopt.tokenize import TokenizedPair
from prefopt.tracking import Tracker, read_metrics

__all__ = [
    "check_reference_at_start",
    "check_saved_model_loads",
    "judge_saved_model",
    "watch_health",
    "write_health_and_report",
]

logger = logging.getLogger(__name__)


def check_reference_at_start(run: RunParts, monitor: HealthMonitor) -> None:
    """Step 0: the reference must score the first batch as the starting policy does (where it
    should equal it); the monitor turns a difference into a finding."""
    if run.reference is None or not run.cfg.reference.verify or run.data.unpaired:
        return
    pairs: list[TokenizedPair] = list(run.data.train[: run.cfg.train.batch_size])  # type: ignore[arg-type]
    batch = collate_pairs(pairs, pad_token_id=run.tokenizer.pad_token_id).to(run.accelerator.device)
    # Under mixed precision both sides score as they will in training: under the autocast
    # the prepared policy runs under (the reference applies it itself).
    with run.accelerator.autocast():
        keys = pair_keys(list(range(len(pairs))))
        diff = check_reference(
            run.scorer, run.reference, batch, keys, loss_names=run.cfg.loss.names
        )
    for finding in monitor.reference_check(diff, run.reference.equals_initial_policy):
        logger.warning("health: %s", finding)


def watch_health(tracker: Tracker, out_dir: Path, *, resumed: bool) -> HealthMonitor:
    """A health monitor fed every logged record; warnings go to the log as they appear."""
    monitor = HealthMonitor()
    if resumed:  # continue the trends of the interrupted run
        for record in read_metrics(out_dir):
            monitor.update(record)

    def observe(record: dict[str, Any]) -> None:
        for finding in monitor.update(record):
            logger.warning("health: %s", finding)

    tracker.observers.append(observe)
    return monitor


def check_saved_model_loads(cfg: ExperimentConfig, model_dir: Path) -> None:
    """Load `model_dir` as the model card tells a user to (transformers; peft on the base the
    adapter names) and run one forward pass; logs "reloaded ... OK".

    Raises:
        PrefoptError: The folder does not load, lacks weights, or gives non-finite logits.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Never the network: the folder is local, and a Hub base is in the cache since training.
    remote: dict[str, Any] = {"local_files_only": True}
    if cfg.model.trust_remote_code:
        remote["trust_remote_code"] = True
    base = adapter_base(model_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, **remote)
        if base is None:
            loaded: Any = AutoModelForCausalLM.from_pretrained(
                model_dir, output_loading_info=True, **remote
            )
            model, info = loaded  # (model, {"missing_keys": [...], ...})
            if info["missing_keys"]:
                raise PrefoptError(f"weights missing from the folder: {info['missing_keys']}")
        else:
            from peft import PeftModel

            from prefopt.models import quiet_peft_wrapping

            extra = {"gguf_file": g} if (g := base_gguf_file(cfg)) else {}
            if cfg.model.revision and not Path(base).is_dir():
                extra["revision"] = cfg.model.revision
            base_model = AutoModelForCausalLM.from_pretrained(base, **extra, **remote)
            with quiet_peft_wrapping():
                model = PeftModel.from_pretrained(base_model, model_dir)
        ids = tokenizer("Hello", return_tensors="pt").input_ids
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        if not torch.isfinite(logits).all():
            raise PrefoptError("its logits on a test prompt are not finite")
    except Exception as exc:
        raise PrefoptError(
            f"the saved model {model_dir} does not load back with transformers"
            f"{' and peft' if base else ''}: {exc}"
        ) from exc
    logger.info("reloaded %s with transformers%s: OK", model_dir, " and peft" if base else "")


def judge_saved_model(cfg: ExperimentConfig, out_dir: Path) -> dict[str, Any] | None:
    """The held-out judge comparison of the final model; a judge failure must not fail a run
    whose model is saved (the error is logged with the command to retry)."""
    if not (out_dir / "model").is_dir():  # paused by train.stop_after_steps: nothing final yet
        return None
    try:
        return judge_after_training(cfg, out_dir)
    except Exception as exc:  # noqa: BLE001  (the model is saved; judging is a bonus)
        logger.warning(
            "could not judge the saved model (%s); retry with: prefopt eval --model %s "
            "--prompts %s --judge ...", exc, out_dir / "model", cfg.judge.prompts,
        )  # fmt: skip
        return None


def write_health_and_report(out_dir: Path, monitor: HealthMonitor, *, report: bool = True) -> None:
    """health.json and (if `report`) the HTML report; a plotting failure must not fail a
    finished run."""
    summary = monitor.summary()
    findings = [dataclasses.asdict(f) for f in summary]
    (out_dir / HEALTH_FILE).write_text(json.dumps(findings, indent=2))
    for finding in summary:  # an "info" note (e.g. a check that could not run) is
        level = logging.INFO if finding.severity == "info" else logging.WARNING  # no warning
        logger.log(level, "health summary: %s", finding)
    if not report:
        return
    try:
        path = write_report(out_dir)
        logger.info("report: %s", path)
    except Exception as exc:  # noqa: BLE001  (the model is saved; the report is a bonus)
        logger.warning("could not write the report: %s", exc)
