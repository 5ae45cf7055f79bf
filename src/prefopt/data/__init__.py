"""Preference data: read files, recognise their format, normalise rows into examples.

Typical use::

    examples, report = load_preference_data("prefs.jsonl")
    print(report.summary())
    train, evaluation = split_eval(examples, fraction=0.1, seed=0)
"""

from prefopt.data.fields import ROLES, ColumnMap
from prefopt.data.formats import FORMATS, detect_format, normalize_rows
from prefopt.data.loading import load_preference_data, read_rows
from prefopt.data.records import (
    LoadReport,
    Message,
    PreferencePair,
    Text,
    UnpairedExample,
    is_conversational,
)
from prefopt.data.splits import pairs_to_unpaired, split_eval

__all__ = [
    "FORMATS",
    "ROLES",
    "ColumnMap",
    "LoadReport",
    "Message",
    "PreferencePair",
    "Text",
    "UnpairedExample",
    "detect_format",
    "is_conversational",
    "load_preference_data",
    "normalize_rows",
    "pairs_to_unpaired",
    "read_rows",
    "split_eval",
]
