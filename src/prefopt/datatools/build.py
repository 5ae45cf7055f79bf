"""`prefopt data build`: on-policy preference pairs from a model's own samples and a judge.

For each prompt the model samples k replies (see `sampling`); the distinct, non-empty ones are
scored by the judge, and the best-scored becomes `chosen` against the worst-scored (or a random
lower-scored one) as `rejected`, kept when their score gap reaches `min_gap`. Ties go to the
earlier sample.

Files, next to OUT (e.g. `pairs.jsonl`):

* OUT: one pair per line, `{prompt, chosen, rejected, chosen_score, rejected_score,
  prompt_index}`; sorted by prompt index once the build is complete.
* `pairs.samples.jsonl`: one line per prompt done, pair or not: its replies, their scores and the
  outcome. Together with OUT it says which prompts are done.
* `pairs.build.json`: the settings (checked on resume) and, at the end, the counts.

Prompts come as a plain list or as `prompts.PromptRows` (from `load_prompt_rows`, which can skip
bad rows). A judge score that is not a finite number (NaN, inf, not a number) stops the build
with an error naming the prompt's source row, or with `on_error="skip"` drops that prompt
(outcome "bad_score", counted; see `build_scoring`). Any other judge error stops the build: it
is not the prompt's fault, and a prompt recorded as done would not be retried on resume.

Resuming: each prompt's pair and record are appended and flushed as soon as it is judged, so a
re-run with the same settings skips every prompt already in OUT or in the samples file (keyed by
prompt index and prompt text; a changed prompt is an error, not a silent mismatch).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TextIO

from prefopt.data.records import Text
from prefopt.datatools.build_resume import (
    append_line,
    build_paths,
    check_settings,
    done_prompts,
    finish_build,
    prompt_json,
)
from prefopt.datatools.build_scoring import NonFiniteScore, score_prompts
from prefopt.datatools.prompts import PromptRows
from prefopt.datatools.reader import OnError
from prefopt.errors import ConfigError, DataError
from prefopt.judges import Judge

if TYPE_CHECKING:  # torch and transformers load only when a build runs
    from torch import nn

    from prefopt.datatools.sampling import Sample
    from prefopt.generation import SamplingParams

__all__ = [
    "BUILD_PAIRINGS",
    "SAMPLINGS",
    "BuildPairing",
    "BuildReport",
    "BuildSettings",
    "NonFiniteScore",
    "build_pairs",
    "build_paths",
    "select_pair",
]

BuildPairing = Literal["best-worst", "best-random-lower"]
BUILD_PAIRINGS: tuple[BuildPairing, ...] = ("best-worst", "best-random-lower")

Sampling = Literal["per-prompt", "per-batch"]
SAMPLINGS: tuple[Sampling, ...] = ("per-prompt", "per-batch")
"""How replies are seeded (see `prefopt.datatools.sampling`)."""

Row = dict[str, Any]


@dataclass(frozen=True)
class BuildSettings:
    """Everything that decides a build's output (recorded, and checked when resuming).

    Attributes:
        judge: Judge spec (see `prefopt.judges.make_judge`).
        k: Replies sampled per prompt.
        min_gap: Smallest chosen - rejected score difference kept.
        pairing: best-worst, or best vs a random reply scored at least min_gap lower.
        seed: Base seed of sampling (and of the random pick).
        temperature: Sampling temperature (> 0).
        top_p: Nucleus sampling mass.
        max_new_tokens: Reply length cap in tokens.
        trim: Cut replies that hit max_new_tokens back to a sentence end.
        sampling: "per-prompt" or "per-batch" (see `prefopt.datatools.sampling`).
        batch_size: Prompts per generate call (changes the replies only with per-batch).
    """

    judge: str
    k: int = 4
    min_gap: float = 0.0
    pairing: BuildPairing = "best-worst"
    seed: int = 0
    temperature: float = 1.0
    top_p: float = 0.95
    max_new_tokens: int = 48
    trim: bool = False
    sampling: Sampling = "per-prompt"
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.k < 2:
            raise ConfigError(f"k must be at least 2 (a pair needs two replies), got {self.k}")
        if self.pairing not in BUILD_PAIRINGS:
            raise ConfigError(f"pairing must be one of {', '.join(BUILD_PAIRINGS)}")
        if not self.min_gap >= 0:
            raise ConfigError(f"min_gap must be >= 0, got {self.min_gap}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.sampling not in SAMPLINGS:
            raise ConfigError(f"sampling must be one of {', '.join(SAMPLINGS)}")
        if self.temperature <= 0:
            raise ConfigError("temperature must be > 0: greedy decoding gives k equal replies")

    @property
    def params(self) -> SamplingParams:
        from prefopt.generation import SamplingParams

        return SamplingParams(self.temperature, self.top_p, self.max_new_tokens, self.k, self.seed)

    def recorded(self) -> dict[str, Any]:
        """The settings a resumed build must share (batch size only matters per batch)."""
        out = asdict(self)
        if self.sampling == "per-prompt":
            del out["batch_size"]
        return out


@dataclass
class BuildReport:
    """What a build did, over all runs of it (counted from its files), and the prompt rows this
    run left out (`skipped_prompts`, reason -> source rows, with on_error="skip")."""

    prompts: int = 0
    done_before: int = 0
    sampled_now: int = 0
    replies: int = 0
    empty_replies: int = 0
    cut_off_replies: int = 0
    pairs: int = 0
    dropped_small_gap: int = 0
    dropped_too_few_replies: int = 0
    dropped_bad_score: int = 0
    skipped_prompts: dict[str, list[int]] = field(default_factory=dict)

    def summary(self) -> str:
        skipped = sum(len(rows) for rows in self.skipped_prompts.values())
        return (
            f"{self.prompts} prompts ({self.done_before} done before, {self.sampled_now} "
            f"sampled now): {self.pairs} pairs; dropped {self.dropped_small_gap} (score gap "
            f"below min_gap), {self.dropped_too_few_replies} (fewer than 2 distinct non-empty "
            f"replies), {self.dropped_bad_score} (judge score not a finite number); replies "
            f"{self.replies}, empty {self.empty_replies}, cut at max_new_tokens "
            f"{self.cut_off_replies}"
            + (
                f"; {skipped} prompt rows skipped (unreadable or no usable prompt)"
                if skipped
                else ""
            )
        )


def select_pair(
    scores: Sequence[float], min_gap: float, pairing: BuildPairing, rng: random.Random
) -> tuple[int, int] | None:
    """(chosen, rejected) positions in `scores`, or None when no pair reaches `min_gap`.

    The best is the first highest score; best-worst pairs it with the first lowest, best-random-
    lower with a uniformly drawn reply scored at least `min_gap` (and strictly) lower.
    """
    best = max(range(len(scores)), key=lambda i: scores[i])
    if pairing == "best-worst":
        worst = min(range(len(scores)), key=lambda i: scores[i])
        gap = scores[best] - scores[worst]
        return (best, worst) if gap > 0 and gap >= min_gap else None
    lower = [i for i, s in enumerate(scores) if s < scores[best] and scores[best] - s >= min_gap]
    return (best, rng.choice(lower)) if lower else None


def _response(prompt: Text, text: str) -> Any:
    return text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]


def _judge_prompt(
    index: int, prompt: Text, samples: list[Sample], scores: list[float], s: BuildSettings
) -> tuple[Row, Row | None]:
    """The samples record of one prompt and its pair row (None if dropped)."""
    texts = [x.text for x in samples]
    kept = list(dict.fromkeys(t for t in texts if t))  # non-empty, distinct, in sample order
    by_text = dict(zip(kept, scores, strict=True))
    record = _record_head(index, prompt, samples)
    record["scores"] = [by_text.get(t) for t in texts]  # None for an empty reply
    if len(kept) < 2:
        record["outcome"] = "too_few_replies"
        return record, None
    rng = random.Random(s.seed * 1_000_003 + index)
    picked = select_pair(scores, s.min_gap, s.pairing, rng)
    if picked is None:
        record["outcome"] = "small_gap"
        return record, None
    record["outcome"] = "pair"
    chosen, rejected = picked
    row = {
        "prompt": prompt_json(prompt),
        "chosen": _response(prompt, kept[chosen]),
        "rejected": _response(prompt, kept[rejected]),
        "chosen_score": scores[chosen],
        "rejected_score": scores[rejected],
        "prompt_index": index,
    }
    return record, row


def _bad_score_record(index: int, prompt: Text, samples: list[Sample], message: str) -> Row:
    record = _record_head(index, prompt, samples)
    record.update(scores=[None] * len(samples), outcome="bad_score", error=message)
    return record


def _record_head(index: int, prompt: Text, samples: list[Sample]) -> Row:
    """The fields every samples record starts with: which prompt, and what was sampled."""
    return {
        "prompt_index": index,
        "prompt": prompt_json(prompt),
        "replies": [x.text for x in samples],
        "cut_off": [x.cut_off for x in samples],
    }


def build_pairs(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Text] | PromptRows,
    judge: Judge,
    settings: BuildSettings,
    output: str | Path,
    *,
    model_name: str = "",
    prompts_file: str = "",
    progress: bool = False,
    on_error: OnError = "raise",
) -> BuildReport:
    """Sample, judge and pair every prompt not yet done, appending to `output` (resumable).

    Args:
        model: The causal LM sampling the replies (eval mode, on its device).
        tokenizer: Its tokenizer.
        prompts: The prompts (text or messages); prompt i is keyed by i and its content. As
            `PromptRows`, errors name their source rows and its skipped rows are reported.
        judge: Scores replies (higher is better).
        settings: Sampling, judging and pairing settings.
        output: The pairs file (see the module docstring for the files next to it).
        model_name: The model's location, recorded with the settings.
        prompts_file: The prompts' file, recorded with the settings.
        progress: Show a progress bar.
        on_error: A judge score that is not a finite number raises ("raise"), or drops the
            prompt, counted as `dropped_bad_score` ("skip").

    Returns:
        Counts over all runs of this build.

    Raises:
        ConfigError: When `output` was built with other settings.
        DataError: When `output` holds other prompts or is not a build's output, or (with
            on_error="raise") the judge's score for a reply is not a finite number.
        PrefoptError: Any other judge error, whatever `on_error` says.
    """
    loaded = None
    if isinstance(prompts, PromptRows):
        loaded, prompts_file, prompts = prompts, prompts_file or prompts.source, prompts.prompts
    paths = build_paths(output)
    done = done_prompts(paths, prompts)
    check_settings(paths[2], settings, model_name, prompts_file, prompts)
    report = BuildReport(prompts=len(prompts), done_before=len(done))
    run = _Run(model, tokenizer, prompts, judge, settings, on_error, done, report, prompts_file)
    if loaded is not None:
        report.skipped_prompts, run.rows = loaded.skipped, loaded.rows
    _run_batches(run, paths, progress)
    finish_build(paths, report, settings, len(done) == len(prompts))
    return report


@dataclass
class _Run:
    """What every batch of one `build_pairs` call needs."""

    model: nn.Module
    tokenizer: Any
    prompts: Sequence[Text]
    judge: Judge
    settings: BuildSettings
    on_error: OnError
    done: set[int]
    report: BuildReport
    prompts_file: str = ""
    rows: list[int] | None = None  # source row of each prompt, when known


def _run_batches(run: _Run, paths: tuple[Path, Path, Path], progress: bool) -> None:
    """Every batch of the sampling plan, appending to the pairs and samples files."""
    from tqdm import tqdm

    from prefopt.datatools.sampling import plan_batches

    s = run.settings
    plan = plan_batches(s.sampling, run.tokenizer, run.prompts, s.batch_size)
    total, done = len(run.prompts), len(run.done)
    with (
        tqdm(total=total, initial=done, desc="prompts", unit="prompt", disable=not progress) as bar,
        paths[0].open("a", encoding="utf-8") as out,
        paths[1].open("a", encoding="utf-8") as rec,
    ):
        for number, batch in enumerate(plan):
            bar.update(_build_batch(run, number, batch, out, rec))


def _build_batch(run: _Run, number: int, batch: list[int], out: TextIO, rec: TextIO) -> int:
    """Sample, judge and record the prompts of batch `number` not yet done; how many."""
    from prefopt.datatools.sampling import sample_replies

    todo = [i for i in batch if i not in run.done]
    if not todo:
        return 0
    # Per batch, a partly done batch is re-sampled whole: its seed covers all of it.
    s = run.settings
    indices = batch if s.sampling == "per-batch" else todo
    replies = sample_replies(
        s.sampling, run.model, run.tokenizer, run.prompts, indices, s.params,
        batch_number=number, trim=s.trim,
    )  # fmt: skip
    wanted = [(i, r) for i, r in zip(indices, replies, strict=True) if i not in run.done]
    scores = score_prompts(run.judge, [run.prompts[i] for i, _ in wanted], [r for _, r in wanted])
    for (i, samples), prompt_scores in zip(wanted, scores, strict=True):
        if isinstance(prompt_scores, NonFiniteScore):
            if run.on_error == "raise":
                raise DataError(
                    f"prompt_index {i}: {prompt_scores.reason} (--on-error skip drops such "
                    "prompts)",
                    file=run.prompts_file or None,
                    row=run.rows[i] if run.rows is not None else None,
                ) from None
            record = _bad_score_record(i, run.prompts[i], samples, prompt_scores.reason)
            row = None
        else:
            record, row = _judge_prompt(i, run.prompts[i], samples, prompt_scores, s)
        if row is not None:
            append_line(out, row)  # the pair first: a crash then loses no pair
        append_line(rec, record)
        run.done.add(i)
        run.report.sampled_now += 1
    return len(wanted)
