"""Small statistics over metric records and series (pure Python): what the health checks and
the report's plots read from `metrics.jsonl`."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

_BOOKKEEPING = frozenset({"step", "split", "epoch", "num_pairs"})


def as_float(value: Any) -> float | None:
    """A metric value as a float; "nan"/"inf" strings and 0-d tensors too; else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)  # float() accepts "nan", "inf", "-Infinity", ...
        except ValueError:
            return None
    item = getattr(value, "item", None)  # a 0-d tensor or numpy scalar, without importing them
    if callable(item):
        try:
            return as_float(item())
        except (TypeError, ValueError, RuntimeError):
            return None
    return None


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float]:
    """Least-squares line through (xs, ys): (slope, intercept, Pearson r); r is 0 if flat."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    if sxx == 0:
        return 0.0, my, 0.0
    slope = sxy / sxx
    r = sxy / math.sqrt(sxx * syy) if syy > 0 else 0.0
    return slope, my - slope * mx, r


def correlation(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Pearson r of two equally long series (0 when either is constant)."""
    return linear_fit(xs, ys)[2]


def metric_numbers(record: Mapping[str, Any]) -> dict[str, float]:
    """The metric values of a record as floats (strings like "nan" included)."""
    out = {}
    for key, value in record.items():
        if key in _BOOKKEEPING:
            continue
        number = as_float(value)
        if number is not None:
            out[key] = number
    return out


def series_mean(values: Iterable[float]) -> float:
    """Arithmetic mean; NaN for no values."""
    items = list(values)
    return sum(items) / len(items) if items else math.nan
