"""Audit findings, each triggered by a crafted row and counted exactly, and `clean` removing
exactly what the audit flagged (nothing more, nothing silently)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from prefopt.datatools.audit import DEFAULT_MAX_LENGTH, FINDINGS, audit_data
from prefopt.datatools.clean import CLEAN_DEFAULTS, clean_data
from prefopt.datatools.loader import load_data
from prefopt.errors import ConfigError
from toy import make_tokenizer

FRANCE = "what is the capital of france ?"  # 7 words
LONG_ANSWER = "a cat saw the moon and the sun and the big sea ."  # 13 words

ROWS: list[Any] = [
    {"prompt": FRANCE, "chosen": "paris .", "rejected": "the moon ."},  # 0 fine
    {"prompt": FRANCE, "chosen": "paris .", "rejected": "the moon ."},  # 1 exact duplicate of 0
    {"prompt": FRANCE, "chosen": "paris is the capital .", "rejected": "no ."},  # 2 same prompt
    {"prompt": "say hello", "chosen": "hello !", "rejected": " hello ! "},  # 3 identical
    {"prompt": "say hi", "chosen": "  ", "rejected": "no ."},  # 4 empty field
    {"prompt": "say hi", "chosen": 5, "rejected": "no ."},  # 5 unusable (a number)
    {"prompt": "tell me a story", "chosen": LONG_ANSWER, "rejected": "no ."},  # 6 long, gap 6.5x
    {"prompt": " ".join(["one two three four"] * 3), "chosen": "yes .", "rejected": "no ."},  # 7
    {"prompt": "is the sun hot ?", "chosen": "yes , very hot .", "rejected": "no , it is cold ."},
    "{not json",  # 9 unreadable
]
EXPECTED = {
    "unreadable": [9],
    "unusable": [5],
    "empty_field": [4],
    "identical": [3],
    "exact_duplicate": [1],
    "prompt_duplicate": [2],
    "tokenization": [],
    "boundary_fixed": [],
    "length_dropped": [7],  # 12 prompt words leave no room within 12
    "truncated": [6],  # 4 + 13 > 12
    "length_gap": [6],  # 13 words vs 2 > 3x
}


def write(path: Path, rows: list[Any]) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture()
def crafted(tmp_path: Path) -> Path:
    return write(tmp_path / "crafted.jsonl", ROWS)


def test_every_finding_is_counted_exactly(crafted: Path) -> None:
    assert set(EXPECTED) == set(FINDINGS)
    report = audit_data(load_data(crafted, on_error="skip"), max_length=12, max_length_ratio=3)
    assert report.findings == EXPECTED
    assert (report.rows, report.usable, report.unit, report.format) == (10, 7, "words", "standard")
    assert report.empty_fields == {4: "chosen"}
    assert report.reasons["unusable"] == {"chosen: expected text, got a number": [5]}
    assert report.reasons["unreadable"] == {"invalid JSON": [9]}
    assert report.verdict().startswith("needs cleaning: 1 unreadable, 1 unusable, 1 empty_field")
    payload = report.to_json()
    assert payload["findings"]["truncated"] == {
        "count": 1,
        "rows": [6],
        "description": FINDINGS["truncated"],
    }
    json.dumps(payload)  # JSON-able


def test_length_statistics_and_bias_in_words(crafted: Path) -> None:
    report = audit_data(load_data(crafted, on_error="skip"))
    assert report.max_length == DEFAULT_MAX_LENGTH and not report.findings["truncated"]
    # Rows 0, 1, 2, 6, 7, 8 have lengths (3, the identical pair, is left out of them).
    assert report.lengths == {
        0: (7, 2, 3),
        1: (7, 2, 3),
        2: (7, 5, 2),
        6: (4, 13, 2),
        7: (12, 2, 2),
        8: (5, 5, 6),
    }
    bias = report.length_bias()
    assert bias["share_chosen_longer"] == round(2 / 6, 4)
    assert bias["share_same_length"] == round(1 / 6, 4)
    assert bias["mean_gap"] == round((29 - 18) / 6, 2)
    assert report.length_stats()["chosen"] == {
        "min": 2,
        "mean": 4.83,
        "median": 3.5,
        "p95": 13,
        "max": 13,
    }


def test_default_max_length_is_prefopts_default() -> None:
    from prefopt.config import DataConfig

    assert DataConfig().max_length == DEFAULT_MAX_LENGTH


def test_tokenizer_counts_tokens_and_checks_every_boundary(tmp_path: Path) -> None:
    rows = [
        {"prompt": "say hello", "chosen": " to the cat .", "rejected": " no ."},  # 0 fine
        {"prompt": "say hello", "chosen": "s .", "rejected": " no ."},  # 1 "hellos" merges
        {"prompt": "say hi", "chosen": " qqq", "rejected": " zzz"},  # 2 both <unk>: same ids
    ]
    tok = make_tokenizer(chat_template=False)  # plain text: "<s> prompt" + "response </s>"
    report = audit_data(load_data(write(tmp_path / "t.jsonl", rows)), tokenizer=tok, max_length=6)
    assert report.unit == "tokens"
    assert report.findings["boundary_fixed"] == [1]
    assert report.findings["tokenization"] == [2]
    assert report.reasons["tokenization"] == {"identical_responses": [2]}
    # <s> say hello | to the cat . </s> | no . </s>: 3 + 5 > 6, so row 0 is truncated.
    assert report.lengths == {0: (3, 5, 3), 1: (3, 3, 3)}
    assert report.findings["truncated"] == [0]
    assert report.tokenizer == {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "chat_template": False,
        "rows_tokenized": 2,
    }


def test_rows_identical_after_truncation_are_dropped_by_max_length(tmp_path: Path) -> None:
    rows = [{"prompt": "say", "chosen": " the cat is good", "rejected": " the cat is bad"}]
    tok = make_tokenizer(chat_template=False)
    report = audit_data(load_data(write(tmp_path / "t.jsonl", rows)), tokenizer=tok, max_length=4)
    assert report.findings["length_dropped"] == [0] and not report.findings["truncated"]


def test_clean_removes_exactly_what_the_audit_flagged(crafted: Path, tmp_path: Path) -> None:
    data = load_data(crafted, on_error="skip")
    audit = audit_data(data, max_length=12, max_length_ratio=3)
    out = tmp_path / "clean.jsonl"
    report = clean_data(data, audit, out)
    applied = [rule for rule, on in CLEAN_DEFAULTS.items() if on]
    flagged = sorted({row for rule in applied for row in audit.findings[rule]})
    assert sorted(report.removed) == flagged == [1, 3, 4, 5, 6, 7, 9]
    assert report.removed[6] == ["length_gap"]  # truncation is kept by default
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert written == [ROWS[i] for i in (0, 2, 8)]
    assert report.rows_out == 3 and report.rows_in == 10
    assert report.by_rule()["exact_duplicate"] == [1]


def test_clean_rules_switch_on_and_off(crafted: Path, tmp_path: Path) -> None:
    data = load_data(crafted, on_error="skip")
    audit = audit_data(data, max_length=12)  # no ratio: length_gap flags nothing
    rules = {
        "prompt_duplicate": True,
        "truncated": True,
        "exact_duplicate": False,
        "unusable": False,
    }
    report = clean_data(data, audit, tmp_path / "c.jsonl", rules)
    assert report.removed == {
        2: ["prompt_duplicate"],
        3: ["identical"],
        4: ["empty_field"],
        6: ["truncated"],
        7: ["length_dropped"],
        9: ["unreadable"],
    }
    written = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert written == [ROWS[i] for i in (0, 1, 5, 8)]  # the unusable row 5 kept as it was
    with pytest.raises(ConfigError, match="unreadable"):
        clean_data(data, audit, tmp_path / "x.jsonl", {"unreadable": False})
    with pytest.raises(ConfigError, match="unknown clean rule"):
        clean_data(data, audit, tmp_path / "x.jsonl", {"typo": True})


def test_audit_refuses_unpaired_data(tmp_path: Path) -> None:
    path = write(tmp_path / "kto.jsonl", [{"prompt": "p", "completion": "a", "label": True}])
    with pytest.raises(ConfigError, match="paired"):
        audit_data(load_data(path))
