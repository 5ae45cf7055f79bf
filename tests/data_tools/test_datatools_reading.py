"""Bad inputs for the data tools: each raises a DataError naming file, row (and field), or with
on_error="skip" is left out and counted. Fixtures are tiny files written in tmp_path."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

import pytest

from prefopt.datatools import reader_csv
from prefopt.datatools.loader import EMPTY_FIELD, OTHER_FORMAT, load_data
from prefopt.datatools.reader import read_raw_rows
from prefopt.errors import DataError

GOOD = {"prompt": "p", "chosen": "a", "rejected": "b"}


def write_lines(path: Path, lines: list[Any]) -> Path:
    """Rows as JSON lines; bytes are written as they are (for broken lines)."""
    data = b"".join(
        (line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines
    )
    path.write_bytes(data)
    return path


HH = {"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant: b"}
SHP = {"history": "h", "human_ref_A": "a", "human_ref_B": "b", "labels": 1}


def test_mixed_formats_name_the_row_or_are_skipped(tmp_path: Path) -> None:
    chat = {
        "prompt": [{"role": "user", "content": "p"}],
        "chosen": [{"role": "assistant", "content": "a"}],
        "rejected": [{"role": "assistant", "content": "b"}],
    }
    unpaired = {"prompt": "p", "completion": "a", "label": True}
    half = {"prompt": "q", "chosen": "c"}  # lacks a column, but is no other format
    path = write_lines(tmp_path / "mixed.jsonl", [GOOD, GOOD, chat, GOOD, chat, unpaired, half])
    with pytest.raises(DataError) as info:
        load_data(path)
    assert (info.value.file, info.value.row) == (str(path), 2)
    assert "row is in another format (conversational) than row 0 (standard)" in str(info.value)
    data = load_data(path, on_error="skip")
    assert data.report.dropped == {"rejected: missing column": [6], OTHER_FORMAT: [2, 4, 5]}
    assert [e.index for e in data.examples] == [0, 1, 3]


@pytest.mark.parametrize(
    ("first", "then", "names"),
    [
        (GOOD, HH, "(hh) than row 0 (standard)"),  # HH rows lack the prompt column
        (HH, GOOD, "(standard) than row 0 (hh)"),
        (GOOD, SHP, "(shp) than row 0 (standard)"),
        (SHP, GOOD, "(standard) than row 0 (shp)"),
        (SHP, HH, "(hh) than row 0 (shp)"),
    ],
)
def test_hh_and_shp_rows_among_others_name_both_formats(
    tmp_path: Path, first: dict[str, Any], then: dict[str, Any], names: str
) -> None:
    path = write_lines(tmp_path / "mixed.jsonl", [first, first, then, first])
    with pytest.raises(DataError) as info:
        load_data(path)
    assert info.value.row == 2 and f"row is in another format {names}" in str(info.value)
    data = load_data(path, on_error="skip")
    assert data.report.dropped == {OTHER_FORMAT: [2]}
    assert [e.index for e in data.examples] == [0, 1, 3]


def test_a_given_format_also_names_rows_in_another(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "mixed.jsonl", [GOOD, SHP])
    with pytest.raises(DataError, match=r"another format \(shp\) than the given format"):
        load_data(path, format="standard")
    assert load_data(path, format="standard", on_error="skip").report.dropped == {OTHER_FORMAT: [1]}


def test_non_utf8_bytes_name_row_and_field(tmp_path: Path) -> None:
    bad = b'{"prompt": "p", "chosen": "caf\xe9", "rejected": "b"}'
    path = write_lines(tmp_path / "latin1.jsonl", [GOOD, bad, GOOD])
    with pytest.raises(DataError) as info:
        load_data(path)
    assert (info.value.row, info.value.field) == (1, "chosen")
    assert "not valid UTF-8" in str(info.value) and str(path) in str(info.value)
    data = load_data(path, on_error="skip")
    assert data.report.dropped == {"line not valid UTF-8": [1]}
    assert data.rows[1] is None and [e.index for e in data.examples] == [0, 2]


def test_a_100_mb_line_is_refused_fast(tmp_path: Path) -> None:
    path = tmp_path / "huge.jsonl"
    with path.open("wb") as f:
        f.write(json.dumps(GOOD).encode() + b"\n")
        f.write(b'{"prompt": "')
        # A 100 MB hole: the file system stores no data for it (it reads as zero bytes), so
        # the fixture costs nothing to write; the reader must still get past 100 MB of line.
        f.seek(100_000_000, 1)
        f.write(b'", "chosen": "a", "rejected": "b"}\n')
        f.write(json.dumps(GOOD).encode() + b"\n")
    assert path.stat().st_size > 100_000_000
    start = time.perf_counter()
    with pytest.raises(DataError) as info:
        read_raw_rows(path)
    assert info.value.row == 1 and "longer than" in str(info.value)
    raw = read_raw_rows(path, on_error="skip")
    assert raw.rows[0] == raw.rows[2] == GOOD and raw.rows[1] is None
    assert list(raw.skipped) == [f"line longer than {16 * 2**20} bytes"]
    assert time.perf_counter() - start < 5  # bounded reads; never parsed


def test_nan_and_infinite_scores_name_row_and_field(tmp_path: Path) -> None:
    ok = {
        "prompt": "p",
        "completions": [{"response": "a", "score": 2}, {"response": "b", "score": 1}],
    }
    nan = {
        "prompt": "q",
        "completions": [{"response": "a", "score": 1}, {"response": "b", "score": float("nan")}],
    }
    path = write_lines(tmp_path / "uf.jsonl", [ok, nan])  # json.dumps writes NaN, json reads it
    with pytest.raises(DataError) as info:
        load_data(path)
    assert (info.value.row, info.value.field) == (1, "completions[1].score")
    assert "NaN" in str(info.value)
    data = load_data(path, on_error="skip")
    assert data.report.dropped == {"completions[1].score: score is NaN": [1]}
    shp = {
        "history": "h",
        "human_ref_A": "a",
        "human_ref_B": "b",
        "score_A": float("nan"),
        "score_B": 1,
    }
    infinite = b'{"prompt": "q", "responses": ["a", "b"], "scores": [1, Infinity]}'
    path = write_lines(tmp_path / "inf.jsonl", [ok, infinite, {**ok, "prompt": "r"}])
    with pytest.raises(DataError) as info:
        load_data(path)
    assert (info.value.row, info.value.field) == (1, "scores[1]")
    assert "score is infinite" in str(info.value)
    data = load_data(path, on_error="skip", pairs="all")  # the all-pairs path checks it too
    assert data.report.dropped == {"scores[1]: score is infinite": [1]}
    path = write_lines(tmp_path / "shp.jsonl", [shp])
    with pytest.raises(DataError) as info:
        load_data(path)
    assert (info.value.row, info.value.field) == (0, "score_A")


def test_invalid_json_and_non_objects(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "broken.jsonl", [GOOD, b"{not json", b"[1, 2]", GOOD])
    with pytest.raises(DataError, match="invalid JSON on line 2") as info:
        load_data(path)
    assert info.value.row == 1
    data = load_data(path, on_error="skip")
    assert data.report.dropped == {
        "invalid JSON": [1],
        "expected a row object (column -> value), got a list": [2],
    }


def test_unreadable_first_row_does_not_hide_the_format(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "first_bad.jsonl", [b"{oops", GOOD, {"prompt": "q", "chosen": "c"}]
    )
    data = load_data(path, on_error="skip")
    assert data.format == "standard"
    assert data.report.dropped == {"invalid JSON": [0], "rejected: missing column": [2]}


def test_empty_fields_are_counted_not_raised(tmp_path: Path) -> None:
    rows = [
        GOOD,
        {"prompt": " ", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": None, "rejected": "b"},
        {"prompt": "p", "chosen": "a", "rejected": 3},  # a type error, not an empty field
    ]
    path = write_lines(tmp_path / "empty.jsonl", rows)
    with pytest.raises(DataError) as info:
        load_data(path)
    assert (info.value.row, info.value.field) == (3, "rejected")  # the empties did not raise
    data = load_data(path, on_error="skip")
    assert data.empty_fields == {1: "prompt", 2: "chosen"}
    assert data.report.dropped[EMPTY_FIELD] == [1, 2]
    assert data.report.dropped["rejected: expected text, got a number"] == [3]


def test_csv_rows_are_read_one_by_one_and_skippable(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes(b'prompt,chosen,rejected\np,a,b\nq,caf\xe9,d\nr,c,d,extra\ns,"two\nlines",e\n')
    with pytest.raises(DataError) as info:
        load_data(path)
    assert (info.value.file, info.value.row, info.value.field) == (str(path), 1, "chosen")
    assert "not valid UTF-8" in str(info.value)
    data = load_data(path, on_error="skip")
    assert data.report.dropped == {
        "row not valid UTF-8": [1],
        "more values than the 3 header columns": [2],
    }
    assert data.rows[1] is None and data.rows[2] is None
    assert [(e.index, e.chosen) for e in data.examples] == [(0, "a"), (3, "two\nlines")]


def test_a_long_csv_line_is_refused_as_a_whole_file_problem(tmp_path: Path) -> None:
    path = tmp_path / "long.csv"
    path.write_text("prompt,chosen,rejected\np,a,b\nq," + "x" * 300 + ",d\n")
    assert len(read_raw_rows(path).rows) == 2  # within the default limit
    with pytest.raises(DataError, match="cannot skip this") as info:
        read_raw_rows(path, on_error="skip", max_line_bytes=100)
    assert info.value.row is None and "line 3 is longer than 100 bytes" in str(info.value)


def test_json_lines_named_json_are_read_line_by_line(tmp_path: Path) -> None:
    path = tmp_path / "lines.json"
    long_row = {**GOOD, "chosen": "x" * 300}
    write_lines(path, [GOOD, long_row, b"[1]", GOOD])
    with pytest.raises(DataError) as info:
        load_data(path, max_line_bytes=100)
    assert info.value.row == 1 and "line 2 is longer than 100 bytes" in str(info.value)
    raw = read_raw_rows(path, on_error="skip", max_line_bytes=100)
    assert raw.skipped == {
        "line longer than 100 bytes": [1],
        "expected a row object (column -> value), got a list": [2],
    }
    assert raw.rows == [GOOD, None, None, GOOD]
    # The over-long line is the first one: still recognised as JSON Lines, still refused.
    write_lines(path, [long_row, GOOD])
    assert read_raw_rows(path, on_error="skip", max_line_bytes=100).rows == [None, GOOD]


def test_json_arrays_skip_bad_items_but_not_broken_json(tmp_path: Path) -> None:
    path = tmp_path / "rows.json"
    path.write_bytes(
        b'{"data": [{"prompt": "p", "chosen": "caf\xe9", "rejected": "b"}, 3, '
        + json.dumps(GOOD).encode()
        + b"]}"
    )
    with pytest.raises(DataError) as info:
        load_data(path)
    assert (info.value.row, info.value.field) == (0, "chosen")
    data = load_data(path, on_error="skip")
    assert data.report.dropped == {
        "row not valid UTF-8": [0],
        "expected a row object (column -> value), got a number": [1],
    }
    assert [e.index for e in data.examples] == [2]
    path.write_text('[{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": oops}]')
    with pytest.raises(DataError, match="cannot skip this") as info:
        load_data(path, on_error="skip")
    assert info.value.row is None and "invalid JSON at line 1, column 62" in str(info.value)


def test_csv_header_errors_are_data_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The header is read under the same error handling as the records: a csv.Error or an
    over-long quoted field in it is a whole-file DataError, never a raw _csv.Error."""
    path = tmp_path / "h.csv"
    path.write_text('"prompt\n' + "x" * 80 + "\n" + "x" * 80 + '",chosen,rejected\np,a,b\n')
    with pytest.raises(DataError, match="CSV record runs past 100 bytes at line 3") as info:
        read_raw_rows(path, on_error="skip", max_line_bytes=100)
    assert info.value.row is None and "cannot skip this" in str(info.value)
    assert len(read_raw_rows(path).rows) == 1  # within the default limit
    path.write_bytes(b"pro\rmpt,chosen,rejected\np,a,b\n")  # csv refuses a bare CR
    with pytest.raises(DataError, match=r"CSV syntax error in the header \(line 1\)"):
        read_raw_rows(path, on_error="skip")
    # A csv module field limit (lifted by prefopt; here left in place) is caught the same way.
    monkeypatch.setattr(reader_csv, "allow_long_csv_fields", lambda: None)
    old = csv.field_size_limit(10)
    try:
        path.write_text('"' + "p" * 20 + '",chosen,rejected\np,a,b\n')
        with pytest.raises(DataError, match="CSV syntax error in the header .*field larger"):
            read_raw_rows(path, on_error="skip")
    finally:
        csv.field_size_limit(old)


def test_csv_fields_over_the_csv_module_default_are_read(tmp_path: Path) -> None:
    """One field-limit policy with training's reader: lifted for good, records bounded by
    max_line_bytes instead (a multi-line record included)."""
    path = tmp_path / "long.csv"
    half = "x" * 100_000
    path.write_text(f'prompt,chosen,rejected\np,"{half}\n{half}",b\n')
    (row,) = read_raw_rows(path).rows
    assert row is not None and len(row["chosen"]) == 200_001
    assert csv.field_size_limit() >= 2**31 - 1
    with pytest.raises(DataError, match="CSV record runs past 150000 bytes at line 3"):
        read_raw_rows(path, max_line_bytes=150_000)
