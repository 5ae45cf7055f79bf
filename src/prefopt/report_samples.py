"""Sample generations for the report of a run that was not judged.

With `judge.prompts` set, the judge writes `samples.jsonl` and the report shows it. Without,
`sample_for_report` has the saved policy and its reference answer the first
`judge.report_samples` held-out prompts (data.eval, or the data.eval_fraction split), with the
same seeds and the judge's sampling settings, and writes the same `samples.jsonl`, unjudged: the
report then still shows what training changed. A few prompts and short answers: seconds on a
small model. Like the judge, it loads the saved `OUTPUT/model`, so it needs no training state.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from prefopt.config import ExperimentConfig
from prefopt.data.records import PreferencePair, Text, UnpairedExample
from prefopt.final_judge import SAMPLES_FILE, reference_for  # one samples file for the report

__all__ = ["heldout_prompts", "sample_for_report"]

logger = logging.getLogger(__name__)


def heldout_prompts(cfg: ExperimentConfig, limit: int) -> list[Text]:
    """The first `limit` distinct prompts of the run's held-out data, in file order: data.eval,
    or the rows `data.eval_fraction` held out of data.train (the same split training made);
    empty without held-out data."""
    from prefopt.data import split_eval

    if cfg.data.eval is not None:
        examples = _prompts_of(cfg, cfg.data.eval)
    elif cfg.data.eval_fraction > 0:
        rows = _prompts_of(cfg, cfg.data.train)
        if cfg.data.max_pairs is not None:
            rows = rows[: cfg.data.max_pairs]
        _, examples = split_eval(rows, cfg.data.eval_fraction, cfg.train.seed)
    else:
        return []
    prompts: dict[str, Text] = {}
    for example in examples:
        prompts.setdefault(json.dumps(example.prompt, sort_keys=True), example.prompt)
        if len(prompts) == limit:
            break
    return list(prompts.values())


def _prompts_of(cfg: ExperimentConfig, source: str) -> list[PreferencePair | UnpairedExample]:
    """The rows of `source` as training read them (in file order; each has `.prompt`)."""
    from prefopt.pipeline import columns_of

    if cfg.data.sft:
        from prefopt.sft import load_sft_rows

        rows, _ = load_sft_rows(
            source, split=cfg.data.split, on_error="skip", columns=columns_of(cfg),
            format=cfg.data.format,
        )  # fmt: skip
        return [UnpairedExample(i, p, r, True) for i, p, r in rows]
    from prefopt.data import load_preference_data

    examples, _ = load_preference_data(
        source,
        format=cfg.data.format,
        columns=columns_of(cfg),
        split=cfg.data.split,
        on_error="skip",  # training already reported bad rows; the report just needs prompts
    )
    return list(examples)


def sample_for_report(cfg: ExperimentConfig, out_dir: Path) -> Path | None:
    """Write `out_dir/samples.jsonl` for the report when no judge does; its path, or None.

    Nothing happens when `judge.prompts` is set (the judge samples), `judge.report_samples`
    is 0, the report is off, there is no saved `model/` (a paused run) or no held-out data.
    A failure is logged, never raised: the model is saved by then, and samples are a bonus.
    """
    n = cfg.judge.report_samples
    model_dir = out_dir / "model"
    if cfg.judge.prompts or n <= 0 or not cfg.output.report or not model_dir.is_dir():
        return None
    try:
        prompts = heldout_prompts(cfg, n)
        if not prompts:
            logger.info("no held-out prompts: the report shows no samples")
            return None
        return _sample(cfg, model_dir, prompts, out_dir / SAMPLES_FILE)
    except Exception as exc:  # noqa: BLE001  (the model is saved; samples are a bonus)
        logger.warning(
            "could not sample the saved model for the report (%s); try: prefopt generate "
            "--model %s --prompts FILE --output samples.jsonl", exc, model_dir,
        )  # fmt: skip
        return None


def _sample(cfg: ExperimentConfig, model_dir: Path, prompts: list[Text], path: Path) -> Path:
    from prefopt.cli_models import load_models
    from prefopt.generation import SamplingParams, generate_side_by_side
    from prefopt.samples_output import write_samples_jsonl

    j = cfg.judge
    params = SamplingParams(
        temperature=j.temperature, top_p=j.top_p, max_new_tokens=j.max_new_tokens, seed=j.seed
    )
    models = load_models(
        str(model_dir), reference_for(cfg, model_dir), dtype=cfg.model.dtype,
        device="cpu" if cfg.train.device == "cpu" else "auto", need_reference=False,
    )  # fmt: skip
    samples = generate_side_by_side(
        models.policy, models.reference, models.tokenizer, prompts, params,
        adapter_reference=models.adapter_reference, batch_size=j.batch_size,
    )  # fmt: skip
    write_samples_jsonl(samples, path)
    logger.info("report samples: policy and reference on %d held-out prompts -> %s",
                len(samples), path)  # fmt: skip
    return path
