"""The end of a training run: did the policy's output get better by a judge's measure?

With `judge.prompts` set, the saved model samples the held-out prompts next to its reference
(same seeds), the judges score both sides, and the win rate (95% interval), mean scores and KL
estimate go to `OUTPUT/judge.json`, the samples to `OUTPUT/samples.jsonl`; the report shows both.
This is `prefopt eval --model OUTPUT/model --prompts ... --judge ...`, run for the user, on the
saved folder, so it also proves that the saved model loads back.

The reference is the one training used: the adapter-off base for a LoRA adapter folder, else
`reference.model` when set, else the model training started from.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from prefopt.config import ExperimentConfig
from prefopt.errors import ConfigError

__all__ = ["JUDGE_FILE", "SAMPLES_FILE", "check_judge_setup", "judge_after_training"]

logger = logging.getLogger(__name__)

JUDGE_FILE = "judge.json"
SAMPLES_FILE = "samples.jsonl"


def check_judge_setup(cfg: ExperimentConfig) -> None:
    """Fail before any model loads: the prompts file must read and every judge must build.

    A reward-model judge is only checked for its folder (loading it is the expensive part).

    Raises:
        ConfigError / DataError: naming the setting, file or row at fault.
    """
    if not cfg.judge.prompts:
        return
    from prefopt.commands_judge import make_judges
    from prefopt.generation import load_prompts

    load_prompts(cfg.judge.prompts)
    cheap = [s for s in cfg.judge.judges if not s.startswith("reward-model:")]
    for spec in cfg.judge.judges:
        if spec.startswith("reward-model:") and not Path(spec.partition(":")[2]).exists():
            raise ConfigError(f"judge.judges: no reward model at {spec.partition(':')[2]}")
    if cheap:
        make_judges(cheap)
    if len(set(cfg.judge.judges)) < len(cfg.judge.judges):
        raise ConfigError("judge.judges: the same judge is given twice")


def reference_for(cfg: ExperimentConfig, model_dir: Path) -> str | None:
    """The reference training used, for the saved model in `model_dir`: None for an adapter
    folder (its base with the adapter off), else reference.model or the starting model."""
    if (model_dir / "adapter_config.json").is_file():
        return None  # the adapter's base, adapters off: what training used
    return cfg.reference.model or cfg.model.name_or_path


def _args(cfg: ExperimentConfig, model_dir: Path, out_dir: Path) -> argparse.Namespace:
    """The `prefopt eval --judge` arguments this run's config stands for."""
    j = cfg.judge
    return argparse.Namespace(
        model=str(model_dir), ref=reference_for(cfg, model_dir), prompts=j.prompts,
        max_prompts=j.max_prompts, temperature=j.temperature, top_p=j.top_p,
        max_new_tokens=j.max_new_tokens, num_samples=j.num_samples, seed=j.seed,
        dtype=cfg.model.dtype, device="auto", batch_size=j.batch_size,
        quiet=not cfg.output.progress, tie_eps=j.tie_eps,
        samples=str(out_dir / SAMPLES_FILE), html=None,
    )  # fmt: skip


def judge_after_training(cfg: ExperimentConfig, out_dir: Path) -> dict[str, Any] | None:
    """Judge the saved `OUTPUT/model` against its reference; None when `judge.prompts` is unset.

    Writes `judge.json` and `samples.jsonl` into `out_dir` and logs the table.
    """
    if not cfg.judge.prompts:
        return None
    from prefopt.commands_judge import judge_vs_reference, make_judges

    model_dir = out_dir / "model"
    logger.info("judging the saved model against its reference on %s", cfg.judge.prompts)
    report, lines = judge_vs_reference(
        _args(cfg, model_dir, out_dir), make_judges(cfg.judge.judges)
    )
    report["lines"] = lines
    (out_dir / JUDGE_FILE).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    for line in lines:
        logger.info("judge: %s", line)
    return report
