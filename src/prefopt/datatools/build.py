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
(outcome "bad_score", counted); the batch is then re-scored prompt by prompt to find it.

Resuming: each prompt's pair and record are appended and flushed as soon as it is judged, so a
re-run with the same settings skips every prompt already in OUT or in the samples file (keyed by
prompt index and prompt text; a changed prompt is an error, not a silent mismatch).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TextIO

from prefopt.data.records import Text
from prefopt.datatools.prompts import PromptRows
from prefopt.datatools.reader import OnError, write_jsonl
from prefopt.errors import ConfigError, DataError, PrefoptError
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


def build_paths(output: str | Path) -> tuple[Path, Path, Path]:
    """(pairs file, samples file, settings file) of a build writing `output`."""
    out = Path(output)
    stem = out.name[: -len(out.suffix)] if out.suffix else out.name
    return out, out.with_name(stem + ".samples.jsonl"), out.with_name(stem + ".build.json")


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


def _prompt_json(prompt: Text) -> Any:
    return prompt if isinstance(prompt, str) else [dict(m) for m in prompt]


def _response(prompt: Text, text: str) -> Any:
    return text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]


def _judge_prompt(
    index: int, prompt: Text, samples: list[Sample], scores: list[float], s: BuildSettings
) -> tuple[Row, Row | None]:
    """The samples record of one prompt and its pair row (None if dropped)."""
    texts = [x.text for x in samples]
    kept = list(dict.fromkeys(t for t in texts if t))  # non-empty, distinct, in sample order
    by_text = dict(zip(kept, scores, strict=True))
    record: Row = {
        "prompt_index": index,
        "prompt": _prompt_json(prompt),
        "replies": texts,
        "cut_off": [x.cut_off for x in samples],
        "scores": [by_text.get(t) for t in texts],  # None for an empty reply
    }
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
        "prompt": _prompt_json(prompt),
        "chosen": _response(prompt, kept[chosen]),
        "rejected": _response(prompt, kept[rejected]),
        "chosen_score": scores[chosen],
        "rejected_score": scores[rejected],
        "prompt_index": index,
    }
    return record, row


def _score(
    judge: Judge, prompts: Sequence[Text], replies: list[list[Sample]]
) -> list[list[float] | str]:
    """Scores of each prompt's distinct non-empty replies, in one judge batch; for a prompt
    with a score that is not a finite number, the judge's complaint instead.

    When the batch fails that way, its prompts are scored again one by one to find which.
    """
    kept = [list(dict.fromkeys(x.text for x in rs if x.text)) for rs in replies]
    try:
        flat = judge.score_batch(
            [p for p, ks in zip(prompts, kept, strict=True) for _ in ks],
            [t for ks in kept for t in ks],
        )
    except PrefoptError:  # the built-in judges refuse NaN, inf and non-numbers this way
        flat = None
    if flat is not None and all(_finite(s) for s in flat):
        out: list[list[float] | str] = []
        pos = 0
        for ks in kept:
            out.append(flat[pos : pos + len(ks)])
            pos += len(ks)
        return out
    return [_score_one(judge, p, ks) for p, ks in zip(prompts, kept, strict=True)]


def _finite(score: object) -> bool:
    return isinstance(score, (int, float)) and not isinstance(score, bool) and math.isfinite(score)


def _score_one(judge: Judge, prompt: Text, texts: list[str]) -> list[float] | str:
    try:
        scores = judge.score_batch([prompt] * len(texts), texts)
    except PrefoptError as error:
        return str(error)
    bad = next((s for s in scores if not _finite(s)), None)
    if bad is not None:
        return f"judge '{judge.name}' returned {bad!r}, expected a finite number"
    return scores


def _bad_score_record(index: int, prompt: Text, samples: list[Sample], message: str) -> Row:
    return {
        "prompt_index": index,
        "prompt": _prompt_json(prompt),
        "replies": [x.text for x in samples],
        "cut_off": [x.cut_off for x in samples],
        "scores": [None] * len(samples),
        "outcome": "bad_score",
        "error": message,
    }


def _read_records(path: Path) -> list[Row]:
    """The complete lines of a build's append-only JSONL file.

    A torn last line (a write cut short by an interrupt) is cut off the file, but only once
    every complete line has proved to be a build record: another file is never changed.
    """
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    rows = []
    for number, line in enumerate(data[:end].decode("utf-8").split("\n")[:-1]):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("prompt_index"), int):
            raise DataError(
                "not a `prefopt data build` record (no prompt_index); write to a new --output",
                file=str(path),
                row=number,
            )
        rows.append(row)
    if end < len(data):
        with path.open("r+b") as f:
            f.truncate(end)
    return rows


def _done(paths: tuple[Path, Path, Path], prompts: Sequence[Text]) -> set[int]:
    """Indices of prompts already done, after checking they are the same prompts."""
    done: set[int] = set()
    for path in paths[:2]:
        for number, row in enumerate(_read_records(path)):
            i = row["prompt_index"]
            if not 0 <= i < len(prompts) or row.get("prompt") != _prompt_json(prompts[i]):
                raise DataError(
                    f"prompt_index {i} does not match prompt {i} of the prompts file (the "
                    "prompts changed since this build started); write to a new --output",
                    file=str(path),
                    row=number,
                )
            done.add(i)
    return done


def _check_settings(
    path: Path, settings: BuildSettings, model: str, prompts_file: str, prompts: Sequence[Text]
) -> None:
    recorded = {**settings.recorded(), "model": model}
    if settings.sampling == "per-batch":
        # The batch plan, so every reply, depends on the whole prompt list: it must not change.
        listed = json.dumps([_prompt_json(p) for p in prompts], ensure_ascii=False)
        recorded["prompts_sha256"] = hashlib.sha256(listed.encode()).hexdigest()
    if path.exists():
        before = json.loads(path.read_text(encoding="utf-8")).get("settings", {})
        changed = {k: (before.get(k), v) for k, v in recorded.items() if before.get(k) != v}
        if changed:
            listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise ConfigError(
                f"{path} records a build with other settings ({listed}); resume with the same "
                "settings, or write to a new --output"
            )
    meta = {"settings": recorded, "prompts_file": prompts_file}  # where from: not checked
    path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _append(f: TextIO, row: Row) -> None:
    f.write(json.dumps(row, ensure_ascii=False) + "\n")
    f.flush()


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
    """
    from tqdm import tqdm

    from prefopt.datatools.sampling import plan_batches, sample_replies

    loaded = prompts if isinstance(prompts, PromptRows) else None
    if isinstance(prompts, PromptRows):
        prompts_file = prompts_file or prompts.source
        prompts = prompts.prompts
    paths = build_paths(output)
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    done = _done(paths, prompts)
    _check_settings(paths[2], settings, model_name, prompts_file, prompts)
    report = BuildReport(prompts=len(prompts), done_before=len(done))
    if loaded is not None:
        report.skipped_prompts = loaded.skipped
    plan = plan_batches(settings.sampling, tokenizer, prompts, settings.batch_size)
    with (
        tqdm(
            total=len(prompts),
            initial=len(done),
            desc="prompts",
            unit="prompt",
            disable=not progress,
        ) as bar,
        paths[0].open("a", encoding="utf-8") as out,
        paths[1].open("a", encoding="utf-8") as rec,
    ):
        for number, batch in enumerate(plan):
            todo = [i for i in batch if i not in done]
            if not todo:
                continue
            # Per batch, a partly done batch is re-sampled whole: its seed covers all of it.
            indices = batch if settings.sampling == "per-batch" else todo
            replies = sample_replies(
                settings.sampling,
                model,
                tokenizer,
                prompts,
                indices,
                settings.params,
                batch_number=number,
                trim=settings.trim,
            )
            wanted = [(i, r) for i, r in zip(indices, replies, strict=True) if i not in done]
            scores = _score(judge, [prompts[i] for i, _ in wanted], [r for _, r in wanted])
            for (i, samples), prompt_scores in zip(wanted, scores, strict=True):
                if isinstance(prompt_scores, str):  # the judge gave no usable score
                    if on_error == "raise":
                        row_number = loaded.rows[i] if loaded is not None else None
                        raise DataError(
                            f"prompt_index {i}: {prompt_scores} (--on-error skip drops such "
                            "prompts)",
                            file=prompts_file or None,
                            row=row_number,
                        )
                    record, row = _bad_score_record(i, prompts[i], samples, prompt_scores), None
                else:
                    record, row = _judge_prompt(i, prompts[i], samples, prompt_scores, settings)
                if row is not None:
                    _append(out, row)  # the pair first: a crash then loses no pair
                _append(rec, record)
                done.add(i)
                report.sampled_now += 1
            bar.update(len(wanted))
    _finish(paths, report, settings, len(done) == len(prompts))
    return report


def _finish(
    paths: tuple[Path, Path, Path], report: BuildReport, settings: BuildSettings, complete: bool
) -> None:
    """Count from the files, sort the pairs by prompt index, record the counts."""
    rows = _read_records(paths[0])
    records = _read_records(paths[1])
    report.pairs = len(rows)
    report.replies = sum(len(r["replies"]) for r in records)
    report.empty_replies = sum(1 for r in records for t in r["replies"] if not t)
    report.cut_off_replies = sum(sum(r["cut_off"]) for r in records)
    report.dropped_small_gap = sum(r["outcome"] == "small_gap" for r in records)
    report.dropped_too_few_replies = sum(r["outcome"] == "too_few_replies" for r in records)
    report.dropped_bad_score = sum(r["outcome"] == "bad_score" for r in records)
    if complete:
        write_jsonl(paths[0], sorted(rows, key=lambda r: r["prompt_index"]))
    meta = json.loads(paths[2].read_text(encoding="utf-8"))
    meta.update(complete=complete, counts=asdict(report))
    paths[2].write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
