"""`prefopt data convert`: each source format on a small literal fixture gives literal rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from prefopt.datatools.convert import convert_data
from prefopt.datatools.loader import load_data
from prefopt.errors import ConfigError


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def bot(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def convert(
    tmp_path: Path, rows: list[dict[str, Any]], to: str = "standard", **load: Any
) -> list[dict[str, Any]]:
    source = tmp_path / "source.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    convert_data(load_data(source, **load), out, to)  # type: ignore[arg-type]
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def test_anthropic_hh(tmp_path: Path) -> None:
    history = "\n\nHuman: hi\n\nAssistant: hello !\n\nHuman: how are you?\n\nAssistant:"
    rows = [{"chosen": history + " fine", "rejected": history + " go"}]
    assert convert(tmp_path, rows) == [
        {
            "prompt": [*user("hi"), *bot("hello !"), *user("how are you?")],
            "chosen": bot("fine"),
            "rejected": bot("go"),
            "source_index": 0,
        }
    ]


UF = [
    {
        "prompt": "p",
        "completions": [
            {"response": "a", "overall_score": 3},
            {"response": "b", "overall_score": 5},
            {"response": "c", "overall_score": 1},
            {"response": "d", "overall_score": 3},
        ],
    },
    {"instruction": "q", "responses": ["x", "y"], "scores": [1, 2]},
]


def test_ultrafeedback_best_worst(tmp_path: Path) -> None:
    assert convert(tmp_path, UF) == [
        {"prompt": "p", "chosen": "b", "rejected": "c", "source_index": 0},
        {"prompt": "q", "chosen": "y", "rejected": "x", "source_index": 1},
    ]


def test_ultrafeedback_all_ordered_pairs(tmp_path: Path) -> None:
    pairs = [
        (r["chosen"], r["rejected"], r["source_index"]) for r in convert(tmp_path, UF, pairs="all")
    ]
    # Completion order (i < j), higher score chosen; a and d tie, so they make no pair.
    assert pairs == [
        ("b", "a", 0),
        ("a", "c", 0),
        ("b", "c", 0),
        ("b", "d", 0),
        ("d", "c", 0),
        ("y", "x", 1),
    ]


def test_shp_labels_and_scores(tmp_path: Path) -> None:
    rows = [
        {
            "history": "h1",
            "human_ref_A": "A1",
            "human_ref_B": "B1",
            "labels": 0,
            "score_A": 9,
            "score_B": 1,
        },
        {"history": "h2", "human_ref_A": "A2", "human_ref_B": "B2", "labels": 1},
        {
            "history": "h3",
            "human_ref_A": "A3",
            "human_ref_B": "B3",
            "score_A": "10",
            "score_B": "3",
        },
        {"history": "h4", "human_ref_A": "A4", "human_ref_B": "B4", "score_A": 2, "score_B": 2},
    ]
    source = tmp_path / "shp.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_data(source)
    assert data.format == "shp"
    assert data.report.dropped == {"score_A equals score_B": [3]}
    assert convert(tmp_path, rows) == [
        {"prompt": "h1", "chosen": "B1", "rejected": "A1", "source_index": 0},  # labels decide
        {"prompt": "h2", "chosen": "A2", "rejected": "B2", "source_index": 1},
        {"prompt": "h3", "chosen": "A3", "rejected": "B3", "source_index": 2},
    ]


RANKED = [
    {"prompt": "p", "ranked": ["best", "mid", "worst"]},
    {"prompt": user("q"), "ranking": [{"content": "good"}, {"content": "bad"}]},
]


def test_ranked_lists(tmp_path: Path) -> None:
    assert convert(tmp_path, RANKED) == [
        {"prompt": "p", "chosen": "best", "rejected": "worst", "source_index": 0},
        {"prompt": user("q"), "chosen": bot("good"), "rejected": bot("bad"), "source_index": 1},
    ]
    assert convert(tmp_path, RANKED, pairs="all") == [
        {"prompt": "p", "chosen": "best", "rejected": "mid", "source_index": 0},
        {"prompt": "p", "chosen": "best", "rejected": "worst", "source_index": 0},
        {"prompt": "p", "chosen": "mid", "rejected": "worst", "source_index": 0},
        {"prompt": user("q"), "chosen": bot("good"), "rejected": bot("bad"), "source_index": 1},
    ]


def test_ranked_rows_without_two_different_responses_are_counted(tmp_path: Path) -> None:
    rows = [
        {"prompt": "p", "responses": ["a", "b"]},
        {"prompt": "q", "responses": ["a"]},
        {"prompt": "r", "responses": ["a", " a "]},
    ]
    source = tmp_path / "r.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_data(source)
    assert data.format == "ranked" and len(data.examples) == 1
    assert data.report.dropped == {
        "fewer than two ranked responses": [1],
        "the ranked responses are all the same": [2],
    }


def test_paired_to_unpaired(tmp_path: Path) -> None:
    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": user("q"), "chosen": bot("c"), "rejected": bot("d")},
    ]
    source = tmp_path / "pairs.jsonl"
    source.write_text(json.dumps(rows[0]) + "\n")
    assert convert(tmp_path, rows[:1], "unpaired") == [
        {"prompt": "p", "completion": "a", "label": True, "source_index": 0},
        {"prompt": "p", "completion": "b", "label": False, "source_index": 0},
    ]
    assert convert(tmp_path, rows[1:], "unpaired") == [
        {"prompt": user("q"), "completion": bot("c"), "label": True, "source_index": 0},
        {"prompt": user("q"), "completion": bot("d"), "label": False, "source_index": 0},
    ]


def test_explicit_source_format_and_unpaired_to_standard(tmp_path: Path) -> None:
    rows = [{"prompt": "p", "completion": "a", "label": "true"}]
    assert convert(tmp_path, rows, "unpaired", format="unpaired") == [
        {"prompt": "p", "completion": "a", "label": True, "source_index": 0}
    ]
    with pytest.raises(ConfigError, match="cannot be turned into pairs"):
        convert(tmp_path, rows, "standard")
