"""Format detection and normalisation: one fixture per format, malformed rows, skip mode."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from prefopt.data import (
    ColumnMap,
    PreferencePair,
    UnpairedExample,
    detect_format,
    load_preference_data,
    normalize_rows,
)
from prefopt.data.converters import shared_prompt_length
from prefopt.errors import ConfigError, DataError

FIXTURES = Path(__file__).parent / "fixtures"


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def bot(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


def system(content: str) -> dict[str, str]:
    return {"role": "system", "content": content}


def pair(index: int, prompt: Any, chosen: Any, rejected: Any) -> PreferencePair:
    return PreferencePair(index, prompt, chosen, rejected)


EXPECTED = {
    "standard.jsonl": (
        "standard",
        [
            pair(0, "What is 2 + 2?", "4", "5"),
            pair(1, "Name a colour.", "Blue.", "Seven."),
            pair(2, "Say hi.", "Hi!", "No."),  # the blank line before it is not a row
        ],
        {},
    ),
    "standard_data_key.json": (
        "standard",
        [pair(0, "What is 2 + 2?", "4", "5"), pair(1, "Say hi.", "Hi!", "No.")],
        {},
    ),
    "conversational.json": (
        "conversational",
        [
            pair(
                0,
                (
                    system("Be brief."),
                    user("Hi."),
                    bot("Hello! How can I help?"),
                    user("What is 2 + 2?"),  # "name" key dropped
                ),
                (bot("4"),),
                (bot("5"),),  # "tool_calls" key dropped
            ),
            pair(1, (user("Say hi."),), (bot("Hi!"),), (bot("No."), bot("Go away."))),
        ],
        {},
    ),
    "implicit_text.jsonl": (
        "implicit_prompt",
        [
            pair(0, "Question: what is 2 + 2?\nAnswer: ", "4", "5"),
            # Common prefix "The sky is blu" is cut back to the last whitespace.
            pair(1, "The sky is ", "blue today.", "bluish grey."),
        ],
        {},
    ),
    "implicit_conversation.jsonl": (
        "implicit_prompt",
        [
            pair(0, (system("Be brief."), user("What is 2 + 2?")), (bot("4"),), (bot("5"),)),
            pair(
                1,
                (user("Hi."), bot("Hello."), user("Bye.")),
                (bot("Goodbye!"),),
                (bot("Whatever."), bot("Leave.")),
            ),
        ],
        {},
    ),
    "hh.jsonl": (
        "hh",
        [
            pair(0, (user("What is 2 + 2?"),), (bot("4"),), (bot("5"),)),
            pair(
                1,
                (user("Hi."), bot("Hello! How can I help?"), user("Tell me a colour.")),
                (bot("Blue."),),
                (bot("Seven."),),
            ),
        ],
        {},
    ),
    "ultrafeedback.jsonl": (
        "ultrafeedback",
        [
            pair(0, "What is 2 + 2?", "4", "5"),  # overall_score 9.5 vs 2.0
            pair(2, "Name a colour.", "Blue.", "Seven."),  # only fine-grained_score
        ],
        {"all completions have the same score": [1]},  # overall_score 7.0 twice
    ),
    "ultrafeedback_generic.jsonl": (
        "ultrafeedback",
        [
            pair(0, "What is 2 + 2?", "4", "5"),  # tie for best: the first wins
            pair(1, "Say hi.", "Hi!", "No."),  # responses + scores
        ],
        {"fewer than two completions": [2]},
    ),
    "unpaired.csv": (
        "unpaired",
        [
            UnpairedExample(0, "What is 2 + 2?", "4", True),
            UnpairedExample(1, "What is 2 + 2?", "5", False),
            UnpairedExample(2, "Write two lines.", "Line one,\nline two.", True),
        ],
        {},
    ),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_is_detected_and_normalised(name: str) -> None:
    fmt, expected, dropped = EXPECTED[name]
    examples, report = load_preference_data(FIXTURES / name)
    assert report.format == fmt
    assert examples == expected
    assert report.dropped == dropped
    assert report.rows_kept == len(expected)
    assert report.source == str(FIXTURES / name)


def test_every_fixture_is_covered() -> None:
    assert {p.name for p in FIXTURES.glob("*.*")} == set(EXPECTED)


# Malformed rows: (file, row, field, part of the message)
MALFORMED_ROWS = [
    ("missing_column.jsonl", 1, "rejected", "missing column"),
    ("type_number.jsonl", 1, "chosen", "expected text, got a number"),
    ("type_null.jsonl", 2, "prompt", "expected text, got null"),
    ("type_nested_list.jsonl", 1, "rejected", "expected text, got a list"),
    ("empty_strings.jsonl", 1, "chosen", "empty text"),
    ("mixed_formats.jsonl", 7, "prompt", "'conversational' format"),
    ("unknown_role.jsonl", 1, "prompt[0].role", "unknown role 'bot'"),
    ("missing_content.jsonl", 0, "chosen[0].content", "no 'content'"),
    ("chosen_not_assistant.jsonl", 1, "rejected[0].role", "expected an assistant message"),
    ("mixed_row_types.jsonl", 0, "chosen", "cannot be mixed"),
    ("implicit_no_prefix.jsonl", 1, "chosen", "no shared prompt"),
    ("implicit_not_assistant.jsonl", 0, "rejected[1].role", "expected an assistant message"),
    ("hh_no_final_assistant.jsonl", 1, "chosen", "does not end with an Assistant turn"),
    ("ultrafeedback_bad_score.jsonl", 0, "completions[1].overall_score", "numeric score"),
    ("bad_label.csv", 1, "label", "expected a boolean label"),
]


@pytest.mark.parametrize(("name", "row", "field", "fragment"), MALFORMED_ROWS)
def test_malformed_row_names_file_row_and_field(
    name: str, row: int, field: str, fragment: str
) -> None:
    with pytest.raises(DataError) as caught:
        load_preference_data(FIXTURES / "malformed" / name)
    message = str(caught.value)
    assert name in message
    assert f"row {row}," in message
    assert f"field '{field}'" in message
    assert fragment in message
    assert (caught.value.row, caught.value.field) == (row, field)


def test_skip_mode_drops_and_counts_bad_rows() -> None:
    examples, report = load_preference_data(
        FIXTURES / "malformed" / "empty_strings.jsonl", on_error="skip"
    )
    assert examples == [pair(0, "What is 2 + 2?", "4", "5")]
    assert report.dropped == {
        "chosen: empty text": [1],
        "prompt: empty text": [2],
        "rejected: empty text": [3],
    }
    assert (report.rows_read, report.rows_kept) == (4, 1)
    assert "dropped 1 (prompt: empty text): rows 2" in report.summary()


def test_skip_mode_groups_details_under_one_reason() -> None:
    rows: list[dict[str, Any]] = [
        {"prompt": "a b", "chosen": "x", "rejected": "y"},
        {"prompt": "c d", "chosen": "x"},
        {"prompt": "e f", "chosen": "x", "other": 1},
    ]
    _, report = normalize_rows(rows, on_error="skip")
    assert report.dropped == {"rejected: missing column": [1, 2]}


def test_skip_mode_still_raises_on_mixed_formats() -> None:
    with pytest.raises(DataError, match="row 7"):
        load_preference_data(FIXTURES / "malformed" / "mixed_formats.jsonl", on_error="skip")


def test_all_rows_dropped_is_an_error() -> None:
    rows = [{"prompt": "a", "chosen": "", "rejected": "b"}]
    with pytest.raises(DataError, match="no usable rows"):
        normalize_rows(rows, on_error="skip")


def test_duplicates_are_kept_and_reported_as_warnings() -> None:
    row = {"prompt": "p", "chosen": "a", "rejected": "b"}
    rows = [row, {**row, "chosen": "c"}, dict(row), dict(row)]
    examples, report = normalize_rows(rows)
    assert [e.index for e in examples] == [0, 1, 2, 3]
    assert report.warnings == {"exact duplicate of an earlier row (kept)": [2, 3]}
    assert report.dropped == {}
    assert "warning 2 (exact duplicate of an earlier row (kept)): rows 2, 3" in report.summary()


def test_chosen_equal_to_rejected_is_kept() -> None:
    examples, _ = normalize_rows([{"prompt": "p", "chosen": "a", "rejected": "a"}])
    assert examples == [pair(0, "p", "a", "a")]


def test_detect_format_from_rows() -> None:
    conversational = {"prompt": [user("hi")], "chosen": [bot("a")], "rejected": [bot("b")]}
    assert detect_format([{"prompt": "p", "chosen": "a", "rejected": "b"}]) == "standard"
    assert detect_format([conversational]) == "conversational"
    assert detect_format([{"chosen": "a b", "rejected": "a c"}]) == "implicit_prompt"
    assert detect_format([{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "x"}]) == "hh"
    assert detect_format([{"instruction": "p", "completions": []}]) == "ultrafeedback"
    assert detect_format([{"prompt": "p", "responses": [], "scores": []}]) == "ultrafeedback"
    assert detect_format([{"prompt": "p", "completion": "c", "label": True}]) == "unpaired"


def test_detect_format_rejects_unknown_columns_and_no_rows() -> None:
    with pytest.raises(DataError, match=r"row 0: cannot detect the data format from columns \["):
        detect_format([{"question": "q", "answer": "a"}], source="x.jsonl")
    with pytest.raises(DataError, match="no rows"):
        detect_format([], source="x.jsonl")


def test_detect_format_names_the_mixed_row() -> None:
    rows = [{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}]
    rows += [{"chosen": "plain text", "rejected": "plain words"}]
    with pytest.raises(DataError, match=r"row 1, field 'chosen': row is in 'implicit_prompt'"):
        detect_format(rows, source="x.jsonl")


def test_column_map_renames_columns() -> None:
    columns = ColumnMap(prompt="question", chosen="good", rejected="bad")
    rows = [{"question": "q", "good": "a", "bad": "b"}]
    examples, report = normalize_rows(rows, columns=columns)
    assert (examples, report.format) == ([pair(0, "q", "a", "b")], "standard")
    with pytest.raises(DataError, match="field 'bad': missing column"):
        normalize_rows([{"question": "q", "good": "a"}], columns=columns)


def test_explicit_format_skips_detection() -> None:
    rows = [{"chosen": "Hello there friend", "rejected": "Hello there enemy"}]
    examples, report = normalize_rows(rows, format="implicit_prompt")
    assert report.format == "implicit_prompt"
    assert examples == [pair(0, "Hello there ", "friend", "enemy")]
    with pytest.raises(DataError, match="expected a list of messages, got text"):
        normalize_rows([{"prompt": "p", "chosen": "a", "rejected": "b"}], format="conversational")


def test_text_prompt_with_conversation_responses() -> None:
    # The UltraFeedback-binarized layout: a text prompt and whole conversations as responses.
    row = {
        "prompt": "hi",
        "chosen": [user("hi"), bot("a")],
        "rejected": [user("hi"), bot("b")],
        "score_chosen": 8.0,
    }
    with pytest.raises(DataError, match="field 'chosen': .*pass format='implicit_prompt'"):
        normalize_rows([row])
    examples, _ = normalize_rows([row], format="implicit_prompt")
    assert examples == [pair(0, (user("hi"),), (bot("a"),), (bot("b"),))]


def test_bad_options_are_config_errors() -> None:
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}]
    with pytest.raises(ConfigError, match="unknown data format"):
        normalize_rows(rows, format="sharegpt")
    with pytest.raises(ConfigError, match="on_error"):
        normalize_rows(rows, on_error="ignore")  # type: ignore[arg-type]


def test_row_that_is_not_an_object() -> None:
    rows: list[Any] = [{"prompt": "p", "chosen": "a", "rejected": "b"}, ["p", "a", "b"]]
    with pytest.raises(DataError, match="row 1: expected a row object"):
        normalize_rows(rows, source="x.json")


@pytest.mark.parametrize(
    ("value", "expected"),
    [(True, True), (False, False), (1, True), (0, False), ("true", True), ("FALSE", False)]
    + [(" True ", True), ("1", True), ("0", False)],
)
def test_unpaired_labels_parse(value: Any, expected: bool) -> None:
    examples, _ = normalize_rows([{"prompt": "p", "completion": "c", "label": value}])
    assert examples == [UnpairedExample(0, "p", "c", expected)]


@pytest.mark.parametrize("value", ["yes", "", 2, None, 0.5, ["true"]])
def test_unpaired_bad_labels_fail(value: Any) -> None:
    with pytest.raises(DataError, match="field 'label': expected a boolean label"):
        normalize_rows([{"prompt": "p", "completion": "c", "label": value}])


def test_unpaired_conversational() -> None:
    row = {"prompt": [user("hi")], "completion": [bot("hello")], "label": False}
    examples, report = normalize_rows([row])
    assert report.format == "unpaired"
    assert examples == [UnpairedExample(0, (user("hi"),), (bot("hello"),), False)]
    with pytest.raises(DataError, match="field 'completion': expected a list of assistant"):
        normalize_rows([{**row, "completion": "hello"}])


@pytest.mark.parametrize(
    ("chosen", "rejected", "prompt"),
    [
        ("The answer is yes", "The answer is yellow", "The answer is "),
        ("Hi there", "Hi there friend", "Hi "),  # one is a prefix of the other
        ("Q: a\n\nA: x", "Q: a\n\nA: y", "Q: a\n\nA: "),
        ("Yes.", "Yes!", ""),  # no whitespace in the common prefix
        ("  foo", "  bar", ""),  # whitespace-only prefix
        ("abc", "xyz", ""),
    ],
)
def test_shared_text_prompt_ends_at_whitespace(chosen: str, rejected: str, prompt: str) -> None:
    assert chosen[: shared_prompt_length(chosen, rejected)] == prompt


def test_implicit_text_empty_response_fails() -> None:
    rows = [{"chosen": "same words ", "rejected": "same words "}]
    with pytest.raises(DataError, match="field 'chosen': empty response"):
        normalize_rows(rows)


def test_implicit_identical_conversations_keep_the_last_turn() -> None:
    conversation = [user("hi"), bot("hello")]
    examples, _ = normalize_rows([{"chosen": conversation, "rejected": list(conversation)}])
    assert examples == [pair(0, (user("hi"),), (bot("hello"),), (bot("hello"),))]


def test_implicit_conversation_with_text_rejected_fails() -> None:
    with pytest.raises(DataError, match="field 'rejected': expected a list of messages"):
        normalize_rows([{"chosen": [user("hi"), bot("a")], "rejected": "hi a"}])


def test_hh_without_leading_blank_line_and_with_differing_history() -> None:
    rows = [{"chosen": "Human: hi\n\nAssistant: hello", "rejected": "Human: hi\n\nAssistant: go"}]
    examples, report = normalize_rows(rows)
    assert report.format == "hh"
    assert examples == [pair(0, (user("hi"),), (bot("hello"),), (bot("go"),))]
    rows = [{"chosen": "Human: hi\n\nAssistant: a", "rejected": "Human: yo\n\nAssistant: b"}]
    with pytest.raises(DataError, match="field 'rejected': the conversation before"):
        normalize_rows(rows)


def test_hh_empty_final_turn_fails() -> None:
    rows = [{"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant:"}]
    with pytest.raises(DataError, match="field 'rejected': empty Assistant turn"):
        normalize_rows(rows)


@pytest.mark.parametrize(
    ("row", "field", "fragment"),
    [
        ({"prompt": "p", "responses": ["a", "b"], "scores": [1]}, "scores", "1 scores for 2"),
        ({"prompt": "p", "responses": ["a", ""], "scores": [1, 2]}, "responses[1]", "empty"),
        ({"prompt": "p", "responses": "a", "scores": [1]}, "responses", "expected a list"),
        ({"prompt": "p", "completions": [{"text": "a"}]}, "completions", "no score key"),
        ({"prompt": "p", "completions": ["a", "b"]}, "completions[0]", "completion object"),
        (
            {"instruction": "p", "completions": [{"response": "a", "score": 1}, {"score": 2}]},
            "completions[1].response",
            "has no 'response'",
        ),
        (
            {"instruction": "p", "responses": ["a", "b"], "scores": [1, float("nan")]},
            "scores[1]",
            "NaN",
        ),
        (
            {"instruction": 3, "responses": ["a", "b"], "scores": [1, 2]},
            "instruction",
            "got a number",
        ),
    ],
)
def test_ultrafeedback_malformed(row: dict[str, Any], field: str, fragment: str) -> None:
    with pytest.raises(DataError) as caught:
        normalize_rows([row], source="uf.jsonl")
    assert caught.value.field == field
    assert fragment in str(caught.value)
