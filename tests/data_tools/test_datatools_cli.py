"""`prefopt data ...` through `prefopt.cli.main`: smoke tests of every sub-command, the split
that never shares a prompt, and bad input as one error line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from prefopt.cli import main
from prefopt.errors import DataError
from toy import make_tokenizer
from toy_models import save_toy_model, write_jsonl


def pairs(n_prompts: int, per_prompt: int) -> list[dict[str, Any]]:
    return [
        {"prompt": f"say {k}", "chosen": f"yes {j} .", "rejected": "no .", "extra": k * 10 + j}
        for k in range(n_prompts)
        for j in range(per_prompt)
    ]


def read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_audit_text_json_and_plot(tmp_path: Path, capsys, monkeypatch) -> None:
    (tmp_path / "data").mkdir()
    data = write_jsonl(tmp_path / "data" / "d.jsonl", [*pairs(3, 1), pairs(3, 1)[0]])
    monkeypatch.chdir(tmp_path)
    assert main(["data", "audit", str(data)]) == 0
    text = capsys.readouterr().out
    assert "format standard: 4 rows, 4 usable" in text
    assert "verdict: needs cleaning: 1 exact_duplicate" in text
    # The histogram goes to ./outputs, not next to the data (often a checkout's data/ folder).
    assert "histogram: outputs/d.audit.png" in text
    assert (tmp_path / "outputs" / "d.audit.png").stat().st_size > 1000
    assert not list((tmp_path / "data").glob("*.png"))
    assert main(["data", "audit", str(data), "--json", "--no-plot"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["findings"]["exact_duplicate"]["rows"] == [3] and "plot" not in payload


def test_audit_with_a_tokenizer_folder(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "tok"
    make_tokenizer().save_pretrained(folder)
    data = write_jsonl(tmp_path / "d.jsonl", pairs(2, 1))
    args = [
        "data",
        "audit",
        str(data),
        "--model",
        str(folder),
        "--max-length",
        "14",
        "--json",
        "--no-plot",
    ]
    assert main(args) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["unit"] == "tokens" and payload["tokenizer"]["chat_template"]
    # <s> + ChatML "<|im_start|>user\nsay 0<|im_end|>\n<|im_start|>assistant\n": 11 tokens;
    # "yes 0 ." + <|im_end|>: 4, more than the 3 that max_length 14 leaves.
    assert payload["lengths"]["prompt"]["max"] == 11
    assert payload["lengths"]["chosen"]["max"] == 4
    assert payload["findings"]["truncated"]["rows"] == [0, 1]


def test_clean_writes_file_and_report(tmp_path: Path, capsys) -> None:
    rows = [*pairs(2, 2), {"prompt": "x", "chosen": "same", "rejected": "same"}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "clean.jsonl"
    assert main(["data", "clean", str(data), "--output", str(out), "--drop-prompt-duplicate"]) == 0
    assert "5 rows -> 2 written" in capsys.readouterr().out
    assert read(out) == [rows[0], rows[2]]  # rows as read: extra columns kept
    report = json.loads((tmp_path / "clean.clean.json").read_text())
    assert report["removed"] == {
        "1": ["prompt_duplicate"],
        "3": ["prompt_duplicate"],
        "4": ["identical"],
    }
    assert main(["data", "clean", str(data), "--output", str(out), "--no-drop-identical"]) == 0
    assert len(read(out)) == 5


def test_audit_max_prompt_length(tmp_path: Path, capsys) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", pairs(2, 1))  # "say k": 2 words; 3 and 2 words
    args = ["data", "audit", str(data), "--max-length", "5", "--json", "--no-plot"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["findings"]["truncated"]["rows"] == []
    assert main([*args, "--max-prompt-length", "1"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["max_prompt_length"] == 1
    assert payload["findings"]["truncated"]["rows"] == [0, 1]


BAD_BYTES_CSV = (
    b"prompt,chosen,rejected\nsay 0,yes 0 .,no .\nsay 1,caf\xe9,no .\nsay 2,yes .,no .\n"
)


def test_audit_and_clean_skip_unreadable_rows(tmp_path: Path, capsys) -> None:
    data = tmp_path / "latin1.csv"
    data.write_bytes(BAD_BYTES_CSV)
    assert main(["data", "audit", str(data), "--no-plot"]) == 2
    err = capsys.readouterr().err
    assert f"file {data}, row 1, field 'chosen': text is not valid UTF-8" in err
    assert "--on-error skip" in err
    args = ["data", "audit", str(data), "--no-plot", "--json", "--on-error", "skip"]
    assert main(args) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["findings"]["unreadable"]["rows"] == [1]
    assert payload["reasons"]["unreadable"] == {"row not valid UTF-8": [1]}
    out = tmp_path / "clean.jsonl"
    args = ["data", "clean", str(data), "--output", str(out), "--on-error", "skip"]
    assert main(args) == 0
    assert "3 rows -> 2 written" in capsys.readouterr().out
    assert read(out) == [
        {"prompt": "say 0", "chosen": "yes 0 .", "rejected": "no ."},
        {"prompt": "say 2", "chosen": "yes .", "rejected": "no ."},
    ]
    report = json.loads((tmp_path / "clean.clean.json").read_text())
    assert report["removed"] == {"1": ["unreadable"]}


def test_clean_max_length_ratio(tmp_path: Path, capsys) -> None:
    rows = [
        {"prompt": "p", "chosen": "one two three four", "rejected": "no"},  # 4x
        {"prompt": "q", "chosen": "one two", "rejected": "no"},  # 2x
        {"prompt": "r", "chosen": "no", "rejected": "one two three"},  # 3x, either way round
    ]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "clean.jsonl"
    args = ["data", "clean", str(data), "--output", str(out), "--max-length-ratio", "2.5"]
    assert main(args) == 0
    assert "3 rows -> 1 written" in capsys.readouterr().out
    assert read(out) == [rows[1]]
    report = json.loads((tmp_path / "clean.clean.json").read_text())
    assert report["removed_by_rule"]["length_gap"] == [0, 2]
    assert main([*args, "--no-drop-length-gap"]) == 0  # flagged, but kept
    assert read(out) == rows


def test_convert(tmp_path: Path, capsys) -> None:
    data = write_jsonl(
        tmp_path / "uf.jsonl", [{"prompt": "p", "responses": ["a", "b", "c"], "scores": [2, 3, 1]}]
    )
    out = tmp_path / "o.jsonl"
    base = ["data", "convert", str(data), "--output", str(out)]
    assert main([*base, "--to", "standard", "--pairs", "all"]) == 0
    assert "wrote 3 standard rows" in capsys.readouterr().out
    assert [(r["chosen"], r["rejected"]) for r in read(out)] == [("b", "a"), ("a", "c"), ("b", "c")]
    assert main([*base, "--to", "unpaired", "--from", "ultrafeedback"]) == 0
    assert [(r["completion"], r["label"]) for r in read(out)] == [("b", True), ("c", False)]


def test_split_never_shares_a_prompt(tmp_path: Path, capsys) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", pairs(10, 3))
    train, held = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    args = [
        "data",
        "split",
        str(data),
        "--eval-fraction",
        "0.2",
        "--seed",
        "1",
        "--train-out",
        str(train),
        "--eval-out",
        str(held),
    ]
    assert main(args) == 0
    assert "no prompt in both" in capsys.readouterr().out
    train_rows, eval_rows = read(train), read(held)
    assert len(eval_rows) == 6 and len(train_rows) == 24
    assert {r["prompt"] for r in train_rows}.isdisjoint({r["prompt"] for r in eval_rows})
    assert sorted(train_rows + eval_rows, key=lambda r: r["extra"]) == pairs(10, 3)
    assert main(args) == 0 and read(held) == eval_rows  # seeded: the same split again


def build_args(model: Path, prompts: Path, judge: str, out: Path) -> list[str]:
    """`prefopt data build` on the toy model: 3 samples of at most 5 tokens per prompt, CPU."""
    return ["data", "build", "--model", str(model), "--prompts", str(prompts), "--judge", judge,
            "--output", str(out), "--k", "3", "--max-new-tokens", "5", "--device", "cpu",
            "--quiet"]  # fmt: skip


def test_build_and_resume(tmp_path: Path, capsys) -> None:
    model = save_toy_model(tmp_path / "model")
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl",
        [{"prompt": "hello"}, {"prompt": "say hi"}, {"prompt": "is the sun hot ?"}],
    )
    out = tmp_path / "pairs.jsonl"
    args = build_args(model, prompts, "length", out)
    assert main(args) == 0
    assert "3 prompts (0 done before, 3 sampled now)" in capsys.readouterr().out
    rows = read(out)
    assert rows and all(r["chosen_score"] > r["rejected_score"] for r in rows)
    assert main(args) == 0
    assert "3 prompts (3 done before, 0 sampled now)" in capsys.readouterr().out
    assert read(out) == rows
    assert main([*args, "--k", "2"]) == 2
    assert "other settings (k: 3 -> 2)" in capsys.readouterr().err


def test_build_with_a_module_judge_and_skipped_prompts(tmp_path: Path, capsys, monkeypatch) -> None:
    (tmp_path / "words_judge_for_test.py").write_text(
        "def score(prompt, response):\n"
        "    return float('nan') if 'sun' in prompt else float(len(response.split()))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = save_toy_model(tmp_path / "model")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes(
        b'{"prompt": "hello"}\n{"prompt": "caf\xe9"}\n{"prompt": "is the sun hot ?"}\n'
        b'{"prompt": ""}\n{"prompt": "say hi"}\n'
    )
    out = tmp_path / "pairs.jsonl"
    args = build_args(model, prompts, "words_judge_for_test:score", out)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"file {prompts}, row 1, field 'prompt': line 2 is not valid UTF-8" in err
    assert "--on-error skip" in err and not out.exists()
    assert main([*args, "--on-error", "skip"]) == 0
    text = capsys.readouterr().out
    assert "3 prompts (0 done before, 3 sampled now)" in text
    assert "1 (judge score not a finite number)" in text and "2 prompt rows skipped" in text
    rows = read(out)
    assert [r["prompt"] for r in rows] == ["hello", "say hi"]  # scored by the module's judge
    assert all(r["chosen_score"] == len(r["chosen"].split()) for r in rows)
    meta = json.loads((tmp_path / "pairs.build.json").read_text())
    assert meta["counts"]["skipped_prompts"] == {
        "line not valid UTF-8": [1],
        "prompt: empty text": [3],
    }
    # Without skip, the judge's NaN names the prompt's row in the prompts file.
    prompts.write_text('{"prompt": "hello"}\n{"prompt": "is the sun hot ?"}\n')
    args[args.index(str(out))] = str(tmp_path / "strict.jsonl")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"file {prompts}, row 1: prompt_index 1: judge 'words_judge_for_test:score'" in err


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            '{"prompt": "p", "responses": ["a", "b"], "scores": [1, NaN]}',
            "row 1, field 'scores[1]': score is NaN",
        ),
        (
            '{"prompt": [{"role": "user", "content": "p"}], "chosen": [], "rejected": []}',
            "row 1: row is in another format (conversational) than row 0 (standard)",
        ),
    ],
)
def test_bad_input_is_one_error_line(tmp_path: Path, capsys, line: str, message: str) -> None:
    first = '{"prompt": "p", "responses": ["a", "b"], "scores": [1, 2]}'
    if "chosen" in line:
        first = '{"prompt": "p", "chosen": "a", "rejected": "b"}'
    data, out = tmp_path / "bad.jsonl", tmp_path / "o.jsonl"
    data.write_text(first + "\n" + line + "\n")
    args = ["data", "convert", str(data), "--to", "standard", "--output", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"prefopt: error: file {data}, ") and message in err
    assert err.count("\n") == 1 and not out.exists()
    assert main([*args, "--on-error", "skip"]) == 0
    assert len(read(out)) == 1 and "dropped 1" in capsys.readouterr().out


def test_json_lines_named_json_skip_the_same_line_in_training_and_clean(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Training's loader and `prefopt data clean` share the rule that a .json file holds JSON
    Lines, so with on_error=skip both skip the broken line and count it (training used to stop
    at it)."""
    from prefopt.data import PreferencePair, load_preference_data

    rows = pairs(3, 1)
    lines = [json.dumps(rows[0]), '{"prompt": "say 1", "chosen": "cut', json.dumps(rows[2])]
    data = tmp_path / "lines.json"
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="row 1: invalid JSON on line 2"):
        load_preference_data(data)
    examples, report = load_preference_data(data, on_error="skip")
    assert examples == [
        PreferencePair(0, "say 0", "yes 0 .", "no ."),
        PreferencePair(2, "say 2", "yes 0 .", "no ."),
    ]
    assert (report.rows_read, report.rows_kept, report.dropped) == (3, 2, {"invalid JSON": [1]})
    out = tmp_path / "clean.jsonl"
    assert main(["data", "clean", str(data), "--output", str(out), "--on-error", "skip"]) == 0
    assert "3 rows -> 2 written" in capsys.readouterr().out
    assert [r["prompt"] for r in read(out)] == ["say 0", "say 2"]
    removed = json.loads((tmp_path / "clean.clean.json").read_text())["removed"]
    assert removed == {"1": ["unreadable"]}
