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
    assert bias["ties"] == 1  # row 7; the share is over the other 5
    assert bias["share_chosen_longer"] == round(2 / 5, 4)
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


def test_length_bias_is_over_pairs_of_unequal_length(tmp_path: Path) -> None:
    def rows(chosen_longer: int, ties: int) -> list[dict[str, str]]:
        return [
            {"prompt": f"p{i}", "chosen": "a b c", "rejected": "x"} for i in range(chosen_longer)
        ] + [{"prompt": f"q{i}", "chosen": "a b", "rejected": "x y"} for i in range(ties)]

    # 3 of 8 pairs have the longer response chosen: 38% of all pairs looks unbiased, but every
    # pair that differs in length prefers the longer one.
    report = audit_data(load_data(write(tmp_path / "b.jsonl", rows(3, 5))))
    bias = report.length_bias()
    assert (bias["pairs"], bias["ties"], bias["share_chosen_longer"]) == (8, 5, 1.0)
    assert bias["share_chosen_shorter"] == 0.0 and bias["share_same_length"] == 0.625
    assert report.verdict() == (
        "usable, with warnings: length bias (chosen longer in 100% of 3 pairs of unequal length)"
    )
    assert "chosen longer in 100.0% of the 3 pairs of unequal length (5 ties)" in report.summary()
    # Every pair ties: no share, and no warning.
    report = audit_data(load_data(write(tmp_path / "t.jsonl", rows(0, 4))))
    assert report.length_bias()["share_chosen_longer"] is None
    assert report.verdict() == "looks clean"
    assert "every pair's responses have the same length (4 ties)" in report.summary()


def test_distinct_prompts_counts_every_usable_row(tmp_path: Path) -> None:
    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "x", "rejected": "x"},  # identical responses, same prompt
        {"prompt": "q", "chosen": "one", "rejected": "two"},
        {"prompt": "q", "chosen": "one", "rejected": "two"},  # exact duplicate
        {"prompt": "r", "chosen": "y", "rejected": "y"},  # identical, a prompt of its own
    ]
    report = audit_data(load_data(write(tmp_path / "d.jsonl", rows)))
    assert (report.usable, report.distinct_prompts) == (5, 3)
    assert report.to_json()["distinct_prompts"] == 3
    assert audit_data(load_data(write(tmp_path / "two.jsonl", rows[:3]))).distinct_prompts == 2


def test_max_prompt_length_predicts_trainings_cut(tmp_path: Path) -> None:
    rows = [
        {"prompt": "one two three four five six", "chosen": "yes .", "rejected": "no ."},
        {"prompt": " ".join(["word"] * 10), "chosen": "yes .", "rejected": "no ."},
        {"prompt": "hi", "chosen": "yes .", "rejected": "no ."},
    ]
    data = load_data(write(tmp_path / "p.jsonl", rows))
    plain = audit_data(data, max_length=8)  # 6 + 2 fits; 10 leaves no room
    assert (plain.findings["truncated"], plain.findings["length_dropped"]) == ([], [1])
    # The prompt is cut to 4 first (both long prompts are truncated, none dropped).
    cut = audit_data(data, max_length=8, max_prompt_length=4)
    assert (cut.findings["truncated"], cut.findings["length_dropped"]) == ([0, 1], [])
    assert "max_length 8, max_prompt_length 4: truncates 2 rows, drops 0" in cut.summary()
    assert cut.to_json()["max_prompt_length"] == 4
    with pytest.raises(ConfigError, match="max_prompt_length"):
        audit_data(data, max_length=8, max_prompt_length=8)


def test_max_prompt_length_with_a_tokenizer(tmp_path: Path) -> None:
    # <s> say hello to the cat | yes . </s> | no . </s>: prompt 6 tokens, responses 3.
    rows = [{"prompt": "say hello to the cat", "chosen": " yes .", "rejected": " no ."}]
    tok = make_tokenizer(chat_template=False)
    data = load_data(write(tmp_path / "t.jsonl", rows))
    report = audit_data(data, tokenizer=tok, max_length=9)
    assert report.lengths == {0: (6, 3, 3)} and not report.findings["truncated"]
    report = audit_data(data, tokenizer=tok, max_length=9, max_prompt_length=3)
    assert report.findings["truncated"] == [0] and not report.findings["length_dropped"]


def test_clean_applies_the_tokenizer_rules(tmp_path: Path) -> None:
    rows = [
        {"prompt": "say hello", "chosen": " to the cat .", "rejected": " no ."},  # 0 truncated
        {"prompt": "say hello", "chosen": "s .", "rejected": " no ."},  # 1 "hellos" merges
        {"prompt": "say hi", "chosen": " qqq", "rejected": " zzz"},  # 2 both <unk>
        # 3: <s> please say | the cat is good </s>: 3 + 5 > 6, and cut to 3 tokens both
        # responses read "the cat is": identical once cut.
        {"prompt": "please say", "chosen": " the cat is good", "rejected": " the cat is bad"},
        {"prompt": "is the sun hot ?", "chosen": " yes .", "rejected": " no ."},  # 4 6 tokens
    ]
    data = load_data(write(tmp_path / "t.jsonl", rows))
    tok = make_tokenizer(chat_template=False)
    audit = audit_data(data, tokenizer=tok, max_length=6)
    assert audit.findings["tokenization"] == [2]
    assert audit.findings["boundary_fixed"] == [1]
    assert audit.findings["length_dropped"] == [3, 4]  # identical once cut; no room at all
    assert audit.findings["truncated"] == [0]
    report = clean_data(data, audit, tmp_path / "c.jsonl")
    assert report.removed == {2: ["tokenization"], 3: ["length_dropped"], 4: ["length_dropped"]}
    written = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert written == rows[:2]
    report = clean_data(
        data, audit, tmp_path / "c.jsonl", {"boundary_fixed": True, "truncated": True}
    )
    assert sorted(report.removed) == [0, 1, 2, 3, 4]
    assert report.removed[1] == ["boundary_fixed"] and report.removed[0] == ["truncated"]
