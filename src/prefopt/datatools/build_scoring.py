"""Judging a build's replies: a score that is not a finite number is a problem of its prompt
(`NonFiniteScore`: the build stops naming the prompt, or with on_error="skip" drops it); any
other judge error (a model that cannot load, a device error) stops the build as it is.

The judges check their scores themselves (`prefopt.judges.NonFiniteScore`); a batch with a
bad score is scored again prompt by prompt to find whose it is."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from prefopt import judges
from prefopt.data.records import Text
from prefopt.errors import DataError, PrefoptError
from prefopt.judges import Judge

if TYPE_CHECKING:
    from prefopt.datatools.sampling import Sample

__all__ = ["NonFiniteScore", "score_prompts"]


class NonFiniteScore(DataError):
    """A judge's score that is not a finite number (NaN, inf, not a number)."""


def score_prompts(
    judge: Judge, prompts: Sequence[Text], replies: Sequence[Sequence[Sample]]
) -> list[list[float] | NonFiniteScore]:
    """Scores of each prompt's distinct non-empty replies, in one judge batch; for a prompt
    with a score that is not a finite number, that error instead.

    Raises:
        PrefoptError: Any other error of the judge, unchanged (it is not the prompt's fault,
            so skipping the prompt would only record every prompt as done with no pair).
    """
    kept = [list(dict.fromkeys(x.text for x in rs if x.text)) for rs in replies]
    texts = [t for ks in kept for t in ks]
    try:
        flat = _scores(judge, [p for p, ks in zip(prompts, kept, strict=True) for _ in ks], texts)
    except judges.NonFiniteScore:
        return [_prompt_scores(judge, p, ks) for p, ks in zip(prompts, kept, strict=True)]
    out: list[list[float] | NonFiniteScore] = []
    pos = 0
    for ks in kept:
        out.append(flat[pos : pos + len(ks)])
        pos += len(ks)
    return out


def _prompt_scores(judge: Judge, prompt: Text, texts: list[str]) -> list[float] | NonFiniteScore:
    try:
        return _scores(judge, [prompt] * len(texts), texts)
    except judges.NonFiniteScore as error:
        return NonFiniteScore(str(error))


def _scores(judge: Judge, prompts: Sequence[Text], texts: Sequence[str]) -> list[float]:
    """The judge's checked scores, one per reply."""
    if not texts:
        return []
    scores = list(judge.score_batch(prompts, texts))
    if len(scores) != len(texts):
        raise PrefoptError(
            f"judge '{judge.name}' returned {len(scores)} scores for {len(texts)} replies"
        )
    # Judges outside prefopt.judges (any object with score_batch) may not check their scores.
    return [judges.check_score(judge.name, s) for s in scores]
