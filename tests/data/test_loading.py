"""Reading rows from JSON, JSONL, CSV, Parquet, `save_to_disk` folders and (mocked) Hub ids."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

import datasets
import huggingface_hub
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefopt.data import PreferencePair, load_preference_data, read_rows
from prefopt.data import hub as hub_module
from prefopt.data import loading as loading_module
from prefopt.errors import DataError

FIXTURES = Path(__file__).parent / "fixtures"
MALFORMED = FIXTURES / "malformed"

ROWS = [
    {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"},
    {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."},
]
PAIRS = [PreferencePair(0, "What is 2 + 2?", "4", "5"), PreferencePair(1, "Say hi.", "Hi!", "No.")]
CONVERSATION_ROW = {
    "prompt": [{"role": "user", "content": "hi"}],
    "chosen": [{"role": "assistant", "content": "hello"}],
    "rejected": [{"role": "assistant", "content": "go"}],
}


def test_read_json_list_and_data_key(tmp_path: Path) -> None:
    (tmp_path / "list.json").write_text(json.dumps(ROWS))
    assert read_rows(tmp_path / "list.json") == ROWS
    assert read_rows(FIXTURES / "standard_data_key.json") == ROWS


def test_read_jsonl_skips_blank_lines_and_accepts_jsonl_named_json(tmp_path: Path) -> None:
    text = "\n".join(json.dumps(row) for row in ROWS) + "\n\n"
    (tmp_path / "a.jsonl").write_text(text)
    (tmp_path / "b.json").write_text(text)
    assert read_rows(tmp_path / "a.jsonl") == ROWS
    assert read_rows(tmp_path / "b.json") == ROWS


def test_read_keeps_line_separator_characters_inside_text(tmp_path: Path) -> None:
    row = {"prompt": "a\u2028b", "chosen": "c", "rejected": "d"}
    (tmp_path / "a.jsonl").write_text(json.dumps(row, ensure_ascii=False) + "\n", "utf-8")
    assert read_rows(tmp_path / "a.jsonl") == [row]


def test_read_csv_keeps_values_as_text(tmp_path: Path) -> None:
    assert read_rows(FIXTURES / "unpaired.csv") == [
        {"prompt": "What is 2 + 2?", "completion": "4", "label": "true"},
        {"prompt": "What is 2 + 2?", "completion": "5", "label": "False"},
        {"prompt": "Write two lines.", "completion": "Line one,\nline two.", "label": "1"},
    ]
    # A byte-order mark (as Excel writes) is not part of the first column name.
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbfprompt,chosen,rejected\r\nq,a,b\r\n")
    assert read_rows(tmp_path / "bom.csv") == [{"prompt": "q", "chosen": "a", "rejected": "b"}]


def test_parquet_round_trip_with_messages(tmp_path: Path) -> None:
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "standard.parquet")
    examples, report = load_preference_data(tmp_path / "standard.parquet")
    assert (examples, report.format) == (PAIRS, "standard")
    pq.write_table(pa.Table.from_pylist([CONVERSATION_ROW]), tmp_path / "conv.parquet")
    examples, report = load_preference_data(tmp_path / "conv.parquet")
    assert report.format == "conversational"
    assert examples == [
        PreferencePair(
            0,
            ({"role": "user", "content": "hi"},),
            ({"role": "assistant", "content": "hello"},),
            ({"role": "assistant", "content": "go"},),
        )
    ]


def test_unreadable_parquet(tmp_path: Path) -> None:
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"bad\.parquet: cannot read Parquet"):
        read_rows(tmp_path / "bad.parquet")


def test_save_to_disk_dataset_round_trip(tmp_path: Path) -> None:
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    examples, report = load_preference_data(tmp_path / "ds")
    assert (examples, report.format, report.source) == (PAIRS, "standard", str(tmp_path / "ds"))


def test_save_to_disk_dataset_dict_splits(tmp_path: Path) -> None:
    folder = tmp_path / "dd"
    splits = {
        "train": datasets.Dataset.from_list(ROWS),
        "test": datasets.Dataset.from_list([CONVERSATION_ROW]),
    }
    datasets.DatasetDict(splits).save_to_disk(str(folder))
    assert read_rows(folder) == ROWS  # default split "train"
    assert read_rows(folder, split="test") == [CONVERSATION_ROW]
    with pytest.raises(DataError, match=r"no split 'dev' \(splits: train, test\)"):
        read_rows(folder, split="dev")


def test_folder_that_is_not_a_saved_dataset(tmp_path: Path) -> None:
    (tmp_path / "loose").mkdir()
    with pytest.raises(DataError, match="not a folder written by datasets' save_to_disk"):
        read_rows(tmp_path / "loose")


# Malformed files: (file, row or None, field or None, part of the message)
MALFORMED_FILES = [
    ("invalid_json.jsonl", 2, None, "invalid JSON on line 3"),
    ("non_utf8.jsonl", 1, "chosen", "not valid UTF-8"),
    ("non_utf8.csv", 1, "rejected", "not valid UTF-8"),
    ("empty.jsonl", None, None, "the file is empty"),
    ("blank_lines.jsonl", None, None, "the file is empty"),
    ("short_row.csv", 1, "rejected", "fewer values than header columns"),
    ("not_an_object.json", 1, None, "expected a row object"),
    ("unsupported.yaml", None, None, "unsupported file type '.yaml'"),
]


@pytest.mark.parametrize(("name", "row", "field", "fragment"), MALFORMED_FILES)
def test_malformed_file_names_file_and_row(
    name: str, row: int | None, field: str | None, fragment: str
) -> None:
    with pytest.raises(DataError) as caught:
        read_rows(MALFORMED / name)
    message = str(caught.value)
    assert name in message
    assert fragment in message
    assert (caught.value.row, caught.value.field) == (row, field)
    if row is not None:
        assert f"row {row}" in message


def test_other_json_problems(tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text('[{"prompt": "a",]')
    with pytest.raises(DataError, match=r"broken\.json: invalid JSON at line 1"):
        read_rows(tmp_path / "broken.json")
    (tmp_path / "scalar.json").write_text('{"rows": []}')
    with pytest.raises(DataError, match=r"expected a list of row objects"):
        read_rows(tmp_path / "scalar.json")
    (tmp_path / "none.json").write_text("[]")
    with pytest.raises(DataError, match="holds no rows"):
        read_rows(tmp_path / "none.json")
    (tmp_path / "long.csv").write_text("prompt,chosen\na,b,c\n")
    with pytest.raises(DataError, match="row 0: more values than the 2 header columns"):
        read_rows(tmp_path / "long.csv")


def test_csv_field_longer_than_the_csv_module_default(tmp_path: Path) -> None:
    """csv refuses fields over 131072 characters by default; prefopt lifts the limit."""
    long = "x" * 200_000
    (tmp_path / "long.csv").write_text(f"prompt,chosen,rejected\nq,{long},b\nq2,a,b\n")
    rows = read_rows(tmp_path / "long.csv")
    assert [len(r["chosen"]) for r in rows] == [200_000, 1]


def test_csv_parser_errors_become_data_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any csv.Error (here: a field over a limit left in place) names the file and row."""
    monkeypatch.setattr(loading_module, "allow_long_csv_fields", lambda: None)
    old = csv.field_size_limit(100)
    try:
        (tmp_path / "t.csv").write_text(f"prompt,chosen,rejected\nq,a,b\nq,{'x' * 200},b\n")
        with pytest.raises(DataError, match=r"t\.csv, row 1: invalid CSV: field larger"):
            read_rows(tmp_path / "t.csv")
    finally:
        csv.field_size_limit(old)


def test_csv_field_limit_falls_back_where_sys_maxsize_overflows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """64-bit Windows: the limit is a 32-bit C long, and sys.maxsize raises OverflowError."""
    current = [131072]

    def field_size_limit(*new: int) -> int:
        if new and new[0] > 2**31 - 1:
            raise OverflowError("Python int too large to convert to C long")
        old = current[0]
        current[:] = new or current
        return old

    monkeypatch.setattr(loading_module.csv, "field_size_limit", field_size_limit)
    loading_module.allow_long_csv_fields()
    assert 2**30 <= current[0] <= 2**31 - 1


def test_on_error_skip_drops_unreadable_jsonl_lines_and_keeps_row_indices(tmp_path: Path) -> None:
    good = [json.dumps(row).encode() for row in ROWS]
    lines = [good[0], b'{"prompt": "cut', b'{"prompt": "caf\xe9"}', b"[1, 2]", b"", good[1]]
    (tmp_path / "d.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError, match="row 1: invalid JSON on line 2"):
        load_preference_data(tmp_path / "d.jsonl")
    examples, report = load_preference_data(tmp_path / "d.jsonl", on_error="skip")
    assert examples == [PAIRS[0], PreferencePair(4, "Say hi.", "Hi!", "No.")]  # blank: no row
    assert (report.rows_read, report.rows_kept) == (5, 2)
    assert report.dropped == {
        "invalid JSON": [1],
        "text is not valid UTF-8": [2],
        "expected a row object, got a list": [3],
    }
    (tmp_path / "none.jsonl").write_bytes(b"{\n\xff\n")
    with pytest.raises(DataError, match="no rows to read .all 2 unreadable"):
        load_preference_data(tmp_path / "none.jsonl", on_error="skip")
    # One JSON document cannot be read in parts: a broken .json file still stops.
    (tmp_path / "broken.json").write_text('[{"prompt": "a",]')
    with pytest.raises(DataError, match="invalid JSON at line 1"):
        load_preference_data(tmp_path / "broken.json", on_error="skip")


def test_bad_bytes_inside_a_message_are_located(tmp_path: Path) -> None:
    line = json.dumps(CONVERSATION_ROW).replace("hello", "hel\\u00ffo").encode()
    (tmp_path / "m.jsonl").write_bytes(line.replace(b"\\u00ff", b"\xff") + b"\n")
    with pytest.raises(DataError, match=r"row 0, field 'chosen\[0\]\.content': text is not"):
        read_rows(tmp_path / "m.jsonl")


def test_missing_local_file_is_not_sent_to_the_hub() -> None:
    with pytest.raises(DataError, match=r"missing\.jsonl: no such file or folder"):
        read_rows("missing.jsonl")
    with pytest.raises(DataError, match="no such file or folder"):
        read_rows("./not/a/hub id")


def test_unreachable_hub_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    # Port 9 on localhost refuses connections: an offline machine, without touching a network.
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    start = time.monotonic()
    with pytest.raises(DataError, match=r"some-user/prefs: .*the Hub cannot be reached"):
        read_rows("some-user/prefs")
    assert time.monotonic() - start < 5


def test_offline_hub_load_failure_is_a_data_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("Couldn't reach 'some-user/prefs' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="offline, or not in the local cache"):
        read_rows("some-user/prefs")


def test_hub_dataset_is_loaded_with_its_split(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []

    def fake_load(name: str, *, split: str) -> datasets.Dataset:
        calls.append((name, split))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(hub_module, "_check_hub_dataset", lambda name: None)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    examples, report = load_preference_data("some-user/prefs", split="test_prefs")
    assert (examples, report.source) == (PAIRS, "some-user/prefs")
    assert read_rows("some-user/prefs") == ROWS
    assert calls == [("some-user/prefs", "test_prefs"), ("some-user/prefs", "train")]
