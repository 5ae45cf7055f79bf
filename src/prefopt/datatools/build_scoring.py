"""Judging a build's replies: a score that is not a finite number is a problem of its prompt
(`NonFiniteScore`: the build stops naming the prompt, or with on_error="skip" drops it); any
other judge error (a model that cannot load, a device error) stops the build as it is."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from prefopt.data.records import Text
from prefopt.errors import DataError, PrefoptError
from prefopt.judges import FunctionJudge, Judge, prompt_text

if TYPE_CHECKING:
    from prefopt.datatools.sampling import Sample

__all__ = ["NonFiniteScore", "check_scores", "score_prompts"]


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
    flat = _raw_scores(judge, [p for p, ks in zip(prompts, kept, strict=True) for _ in ks], texts)
    out: list[list[float] | NonFiniteScore] = []
    pos = 0
    for ks in kept:
        try:
            out.append(check_scores(judge.name, flat[pos : pos + len(ks)]))
        except NonFiniteScore as error:
            out.append(error)
        pos += len(ks)
    return out


def check_scores(name: str, scores: Sequence[Any]) -> list[float]:
    """The scores as floats (converted as `prefopt.judges` does), or `NonFiniteScore` for the
    first that is not a finite number."""
    out = []
    for value in scores:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise NonFiniteScore(
                    f"judge '{name}' returned {type(value).__name__}, expected a number"
                ) from None
        if not math.isfinite(value):
            raise NonFiniteScore(f"judge '{name}' returned {value!r}, expected a finite number")
        out.append(float(value))
    return out


def _raw_scores(judge: Judge, prompts: Sequence[Text], texts: Sequence[str]) -> list[Any]:
    """The judge's scores, unchecked. A `FunctionJudge`'s function is called directly: the
    judge's own check raises the same PrefoptError for NaN as for any other problem, so the
    two could not be told apart."""
    if isinstance(judge, FunctionJudge):
        return [judge.fn(prompt_text(p), t) for p, t in zip(prompts, texts, strict=True)]
    scores = list(judge.score_batch(prompts, texts))
    if len(scores) != len(texts):
        raise PrefoptError(
            f"judge '{judge.name}' returned {len(scores)} scores for {len(texts)} replies"
        )
    return scores
