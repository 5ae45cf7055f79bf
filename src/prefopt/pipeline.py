"""Data for a run: load → normalise → split → tokenize, with every drop reported.

Runs before any model loads (it needs only the tokenizer), so a bad row stops the run in
seconds rather than after minutes of model loading.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from prefopt.config import ExperimentConfig
from prefopt.data import ColumnMap, load_preference_data, split_eval
from prefopt.data.records import PreferencePair, UnpairedExample
from prefopt.errors import ConfigError, TokenizationError
from prefopt.loss_registry import LOSSES
from prefopt.sft import load_sft_rows, tokenize_sft_rows
from prefopt.tokenize import (
    TokenizedExample,
    TokenizedPair,
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
    """

    train: Tokenized
    eval: Tokenized | None
    unpaired: bool
    format: str
    notes: list[str] = field(default_factory=list)

    @property
    def paired(self) -> bool:
        """Whether the training examples are preference pairs (not KTO rows or SFT examples)."""
        return bool(self.train) and isinstance(self.train[0], TokenizedPair)


def _columns(cfg: ExperimentConfig) -> ColumnMap:
    c = cfg.data.columns
    return ColumnMap(
        prompt=c.prompt,
        chosen=c.chosen,
        rejected=c.rejected,
        completion=c.completion,
        label=c.label,
    )


def _load(cfg: ExperimentConfig, source: str) -> tuple[list[Any], str, str]:
    examples, report = load_preference_data(
        source,
        format=cfg.data.format,
        columns=_columns(cfg),
        split=cfg.data.split,
        on_error=cfg.data.on_error,
    )
    return list(examples), report.format, report.summary()


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
) -> tuple[Tokenized, str]:
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
) -> tuple[Tokenized, str]:
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
        return tokens, report.summary()
    pairs: list[PreferencePair] = examples
    tok_pairs, report = tokenize_pairs(pairs, tokenizer, **kwargs)
    return tok_pairs, report.summary()


def _load_sft(cfg: ExperimentConfig, source: str) -> tuple[list[Any], str, str]:
    """SFT rows as UnpairedExample(label=True) so splitting/tokenizing reuse the same code."""
    rows, skipped = load_sft_rows(
        source, split=cfg.data.split, on_error=cfg.data.on_error, columns=_columns(cfg),
        format=cfg.data.format,
    )  # fmt: skip
    examples = [UnpairedExample(i, p, r, True) for i, p, r in rows]
    note = f"{source}: format 'sft', {len(rows) + len(skipped)} rows read, {len(rows)} kept"
    if skipped:
        note += f"; skipped {len(skipped)} bad rows: {skipped[:10]}"
    return examples, "sft", note


def prepare_data(cfg: ExperimentConfig, tokenizer: Any) -> PreparedData:
    """Load, split and tokenize the train (and eval) data of `cfg`."""
    if cfg.data.sft:
        return _prepare(cfg, tokenizer, _load_sft)
    return _prepare(cfg, tokenizer, _load)


def _prepare(cfg: ExperimentConfig, tokenizer: Any, load: Any) -> PreparedData:
    train_ex, fmt, load_note = load(cfg, cfg.data.train)
    if cfg.data.max_pairs is not None:
        train_ex = train_ex[: cfg.data.max_pairs]
    unpaired = bool(train_ex) and isinstance(train_ex[0], UnpairedExample)
    if not cfg.data.sft:
        _check_loss_fits(cfg, unpaired, fmt)
    notes = [load_note]
    eval_ex: list[Any] | None = None
    if cfg.data.eval is not None:
        eval_ex, _, eval_note = load(cfg, cfg.data.eval)
        notes.append(eval_note)
    elif cfg.data.eval_fraction > 0:
        train_ex, eval_ex = split_eval(train_ex, cfg.data.eval_fraction, cfg.train.seed)
        notes.append(f"held out {len(eval_ex)} of the training rows for evaluation")
    train_tok, train_note = _tokenize(cfg, tokenizer, train_ex, cfg.data.train)
    notes.append("train: " + train_note)
    eval_tok: Tokenized | None = None
    if eval_ex:
        eval_tok, eval_note = _tokenize(cfg, tokenizer, eval_ex, cfg.data.eval or cfg.data.train)
        notes.append("eval: " + eval_note)
    if not train_tok:
        raise ConfigError(f"no usable training rows in {cfg.data.train}:\n" + "\n".join(notes))
    for line in notes:
        logger.info(line)
    return PreparedData(train_tok, eval_tok, unpaired, fmt, notes)


def example_length(example: TokenizedPair | TokenizedExample) -> int:
    """Tokens an example puts in a batch row (the longer of chosen/rejected for pairs)."""
    if isinstance(example, TokenizedPair):
        return len(example.prompt_ids) + max(len(example.chosen_ids), len(example.rejected_ids))
    return len(example.prompt_ids) + len(example.completion_ids)
