"""Data for a run: load → normalise → split → tokenize, with every drop reported.

Runs before any model loads (it needs only the tokenizer), so a bad row stops the run in
seconds rather than after minutes of model loading.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefopt.config import ExperimentConfig
from prefopt.data import ColumnMap, load_preference_data, split_eval
from prefopt.data.records import PreferencePair, UnpairedExample
from prefopt.errors import ConfigError, PrefoptError, TokenizationError
from prefopt.loss_registry import LOSSES
from prefopt.report_data import DATA_SUMMARY_FILE
from prefopt.sft import load_sft_rows, tokenize_sft_rows
from prefopt.tokenize import (
    TokenizedExample,
    TokenizedPair,
    TokenizeReport,
    tokenize_examples,
    tokenize_pairs,
)

logger = logging.getLogger(__name__)

Tokenized = list[TokenizedPair] | list[TokenizedExample]


@dataclass
class PreparedData:
    """Tokenized train/eval examples and what happened on the way.

    Attributes:
        train: Tokenized training pairs (or unpaired examples for KTO).
        eval: Tokenized eval examples, or None.
        unpaired: True for unpaired (KTO) data.
        format: Detected format of the training file.
        notes: Human-readable lines about loading/tokenization (drops, truncation).
        summary: The same as counts per split, what `write_data_summary` writes.
    """

    train: Tokenized
    eval: Tokenized | None
    unpaired: bool
    format: str
    notes: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def paired(self) -> bool:
        """Whether the training examples are preference pairs (not KTO rows or SFT examples)."""
        return bool(self.train) and isinstance(self.train[0], TokenizedPair)


def columns_of(cfg: ExperimentConfig) -> ColumnMap:
    """`data.columns` as the data layer's ColumnMap."""
    c = cfg.data.columns
    return ColumnMap(
        prompt=c.prompt,
        chosen=c.chosen,
        rejected=c.rejected,
        completion=c.completion,
        label=c.label,
    )


def _load(cfg: ExperimentConfig, source: str) -> tuple[list[Any], str, str, dict[str, Any]]:
    examples, report = load_preference_data(
        source,
        format=cfg.data.format,
        columns=columns_of(cfg),
        split=cfg.data.split,
        on_error=cfg.data.on_error,
    )
    counts = _counts(report.format, report.rows_read, report.dropped)
    return list(examples), report.format, report.summary(), counts


def _counts(fmt: str, rows_read: int, dropped: dict[str, list[int]]) -> dict[str, Any]:
    """A split's entry of data_summary.json so far (see `write_data_summary`)."""
    return {
        "format": fmt,
        "rows_read": rows_read,
        "pairs_kept": 0,
        "dropped": {reason: len(rows) for reason, rows in dropped.items()},
        "truncated": 0,
        "notes": [],
    }


def _add_tokenized(counts: dict[str, Any], report: TokenizeReport, kept: int, note: str) -> None:
    for reason, rows in report.dropped.items():
        counts["dropped"][reason] = counts["dropped"].get(reason, 0) + len(rows)
    counts["pairs_kept"], counts["truncated"] = kept, len(report.truncated)
    counts["notes"].append(note)


def _check_loss_fits(cfg: ExperimentConfig, unpaired: bool, fmt: str) -> None:
    kinds = {LOSSES[n].data for n in cfg.loss.names}
    if unpaired and "paired" in kinds:
        raise ConfigError(
            f"loss {cfg.loss.names} needs paired data (prompt/chosen/rejected), but "
            f"{cfg.data.train} holds unpaired rows (format '{fmt}'); use loss.name=kto"
        )
    if not unpaired and "unpaired" in kinds:
        raise ConfigError(
            f"loss 'kto' needs unpaired rows (prompt/completion/label), but {cfg.data.train} "
            f"holds pairs (format '{fmt}'); convert it first with "
            "`prefopt data convert --to unpaired` (each pair gives one desirable and one "
            "undesirable row)"
        )


def _tokenize(
    cfg: ExperimentConfig, tokenizer: Any, examples: list[Any], source: str
) -> tuple[Tokenized, TokenizeReport]:
    try:
        return _tokenize_rows(cfg, tokenizer, examples)
    except TokenizationError as error:
        if error.file is not None:
            raise
        # The tokenizer sees rows, not files: name the file so the message locates the row.
        raise TokenizationError(
            error.reason, file=source, row=error.row, field=error.field
        ) from None


def _tokenize_rows(
    cfg: ExperimentConfig, tokenizer: Any, examples: list[Any]
) -> tuple[Tokenized, TokenizeReport]:
    kwargs: dict[str, Any] = {
        "max_length": cfg.data.max_length,
        "max_prompt_length": cfg.data.max_prompt_length,
        "on_error": cfg.data.on_error,
        "progress": cfg.output.progress and len(examples) > 2000,
    }
    if examples and isinstance(examples[0], UnpairedExample):
        # SFT: label None marks the rows for the step function; every assistant turn is scored.
        tokenize = tokenize_sft_rows if cfg.data.sft else tokenize_examples
        tokens, report = tokenize(examples, tokenizer, **kwargs)
        return tokens, report
    pairs: list[PreferencePair] = examples
    tok_pairs, report = tokenize_pairs(pairs, tokenizer, **kwargs)
    return tok_pairs, report


def _load_sft(cfg: ExperimentConfig, source: str) -> tuple[list[Any], str, str, dict[str, Any]]:
    """SFT rows as UnpairedExample(label=True) so splitting/tokenizing reuse the same code."""
    rows, skipped = load_sft_rows(
        source, split=cfg.data.split, on_error=cfg.data.on_error, columns=columns_of(cfg),
        format=cfg.data.format,
    )  # fmt: skip
    examples = [UnpairedExample(i, p, r, True) for i, p, r in rows]
    note = f"{source}: format 'sft', {len(rows) + len(skipped)} rows read, {len(rows)} kept"
    if skipped:
        note += f"; skipped {len(skipped)} bad rows: {skipped[:10]}"
    counts = _counts("sft", len(rows) + len(skipped), {"bad row": skipped} if skipped else {})
    return examples, "sft", note, counts


def prepare_data(cfg: ExperimentConfig, tokenizer: Any) -> PreparedData:
    """Load, split and tokenize the train (and eval) data of `cfg`."""
    if cfg.data.sft:
        return _prepare(cfg, tokenizer, _load_sft)
    return _prepare(cfg, tokenizer, _load)


def _prepare(cfg: ExperimentConfig, tokenizer: Any, load: Any) -> PreparedData:
    train_ex, fmt, load_note, train_counts = load(cfg, cfg.data.train)
    train_counts["notes"].append(load_note)
    if cfg.data.max_pairs is not None and len(train_ex) > cfg.data.max_pairs:
        train_counts["notes"].append(
            f"data.max_pairs={cfg.data.max_pairs}: used the first {cfg.data.max_pairs} of "
            f"{len(train_ex)} usable rows"
        )
        train_ex = train_ex[: cfg.data.max_pairs]
    unpaired = bool(train_ex) and isinstance(train_ex[0], UnpairedExample)
    if not cfg.data.sft:
        _check_loss_fits(cfg, unpaired, fmt)
    notes = [load_note]
    eval_ex: list[Any] | None = None
    eval_counts: dict[str, Any] | None = None
    if cfg.data.eval is not None:
        eval_ex, _, eval_note, eval_counts = load(cfg, cfg.data.eval)
        eval_counts["notes"].append(eval_note)
        notes.append(eval_note)
    elif cfg.data.eval_fraction > 0:
        train_ex, eval_ex = split_eval(train_ex, cfg.data.eval_fraction, cfg.train.seed)
        held = f"held out {len(eval_ex)} of the training rows for evaluation"
        notes.append(held)
        train_counts["notes"].append(held)
        eval_counts = _counts(fmt, len(eval_ex), {})
        eval_counts["notes"].append(f"{held} (from {cfg.data.train})")
    train_tok, train_report = _tokenize(cfg, tokenizer, train_ex, cfg.data.train)
    notes.append("train: " + train_report.summary())
    _add_tokenized(train_counts, train_report, len(train_tok), notes[-1])
    eval_tok: Tokenized | None = None
    if eval_ex:
        eval_source = cfg.data.eval or cfg.data.train
        eval_tok, eval_report = _tokenize(cfg, tokenizer, eval_ex, eval_source)
        notes.append("eval: " + eval_report.summary())
        assert eval_counts is not None
        _add_tokenized(eval_counts, eval_report, len(eval_tok), notes[-1])
    if not train_tok:
        raise ConfigError(f"no usable training rows in {cfg.data.train}:\n" + "\n".join(notes))
    for line in notes:
        logger.info(line)
    summary = {"train": train_counts, "eval": eval_counts}
    return PreparedData(train_tok, eval_tok, unpaired, fmt, notes, summary)


def write_data_summary(data: PreparedData, out_dir: Path) -> Path:
    """Write what data preparation read, kept and dropped to `out_dir/data_summary.json`.

    Schema (`"eval"` is null without eval data)::

        {"train": {"format": str,          # detected format ("standard", "sft", ...)
                   "rows_read": int,       # rows in the source file
                   "pairs_kept": int,      # examples (pairs, or KTO/SFT rows) after tokenizing
                   "dropped": {reason: int},   # rows dropped per reason (data.on_error=skip):
                                               # reading, normalising and tokenizing together
                   "truncated": int,       # kept rows cut to data.max_length
                   "notes": [str]},        # the log lines about loading and tokenizing
         "eval": {...the same...} | null}

    For eval held out of the training file (data.eval_fraction), `rows_read` counts the rows
    held out, and the training rows counted as read include them. The file is replaced
    atomically; a failed write is a `PrefoptError`.
    """
    path = out_dir / DATA_SUMMARY_FILE
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data.summary, indent=2, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise PrefoptError(f"could not write {path}: {exc}") from None
    return path


def example_length(example: TokenizedPair | TokenizedExample) -> int:
    """Tokens an example puts in a batch row (the longer of chosen/rejected for pairs)."""
    if isinstance(example, TokenizedPair):
        return len(example.prompt_ids) + max(len(example.chosen_ids), len(example.rejected_ids))
    return len(example.prompt_ids) + len(example.completion_ids)
