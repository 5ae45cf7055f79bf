"""Bad input through the real entry point: one clear line, exit 2, and before any model loads.

Every test runs `prefopt.cli.main(["train", ...])` on a tiny saved model (tokenizer included)
and checks what a user sees: exit status 2, exactly one `prefopt: error: ...` line naming the
file, row and field at fault, and no traceback. The `no_model_load` fixture makes loading the
model itself an assertion failure, so each bad-data test also proves the run fails fast (only
the tokenizer is loaded before the data is checked).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import prefopt.models
import prefopt.run_setup
from prefopt.cli import EXIT_ERROR, main
from prefopt.config_io import load_config
from prefopt.models import load_tokenizer
from prefopt.pipeline import prepare_data, write_data_summary
from toy import make_tokenizer
from toy_models import learnable_pairs, make_model, save_toy_model, write_jsonl

GOOD: list[dict[str, Any]] = [
    {"prompt": "what is the capital of france ?", "chosen": " paris .", "rejected": " the moon ."},
    {"prompt": "say hello", "chosen": " hello ! nice to see you .", "rejected": " no ."},
    {"prompt": "is the sun hot ?", "chosen": " yes , very hot .", "rejected": " no , it is cold ."},
    {"prompt": "tell me a story", "chosen": " a cat saw the moon .", "rejected": " no ."},
]
"""Valid standard-format rows over the toy vocabulary; a bad row appended to them is row 4."""
BAD_ROW = len(GOOD)

USER = {"role": "user", "content": "tell me a story"}
YES = {"role": "assistant", "content": "a cat saw the moon ."}
NO = {"role": "assistant", "content": "no ."}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_toy_model(tmp_path_factory.mktemp("model") / "llama")


@pytest.fixture(scope="module")
def plain_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model whose tokenizer has no chat template."""
    folder = tmp_path_factory.mktemp("plain") / "llama"
    make_model().save_pretrained(folder)
    make_tokenizer(chat_template=False).save_pretrained(folder)
    return folder


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading the model (not the tokenizer) fails the test: bad data must be found first."""

    def forbidden(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(prefopt.models, "load_causal_lm", forbidden)
    monkeypatch.setattr(prefopt.run_setup, "load_causal_lm", forbidden)


def train_cli(
    capsys: pytest.CaptureFixture[str],
    model: Path | str,
    data: Path | str,
    out: Path,
    *overrides: str,
) -> tuple[int, str]:
    """Run `prefopt train` in-process; returns (exit status, stderr)."""
    status = main(
        [
            "train",
            f"model.name_or_path={model}",
            f"data.train={data}",
            f"output.dir={out}",
            "output.progress=false",
            *overrides,
        ]
    )
    return status, capsys.readouterr().err


def assert_one_clear_error(status: int, err: str, *needles: str) -> str:
    """Exit 2, one `prefopt: error:` line holding every needle, no traceback; returns it."""
    assert status == EXIT_ERROR, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("prefopt: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def bad_data(tmp_path: Path, row: dict[str, Any], good: list[dict[str, Any]] | None = None) -> Path:
    return write_jsonl(tmp_path / "data.jsonl", [*(GOOD if good is None else good), row])


def where(path: Path, row: int, field: str | None = None) -> list[str]:
    """The location parts a DataError message must contain."""
    parts = [f"file {path}", f"row {row}"]
    return parts + [f"field '{field}'"] if field is not None else parts


# ---------------------------------------------------------------------------------------------
# Rows: columns, types, empty text, identical responses


pytestmark = pytest.mark.usefixtures("no_model_load")


@pytest.mark.parametrize("missing", ["prompt", "chosen", "rejected"])
def test_missing_column(model_dir: Path, tmp_path: Path, capsys, missing: str):
    row = {k: v for k, v in GOOD[0].items() if k != missing}
    data = bad_data(tmp_path, row)
    status, err = train_cli(capsys, model_dir, data, tmp_path / "out")
    assert_one_clear_error(status, err, *where(data, BAD_ROW, missing), "missing column")


@pytest.mark.parametrize(
    ("field", "value", "described"),
    [
        ("prompt", 5, "a number"),
        ("chosen", 2.5, "a number"),
        ("chosen", None, "null"),
        ("rejected", [["a", ["nested"]], "list"], "a list"),
        ("prompt", {"text": "hello"}, "an object"),
        ("rejected", True, "a boolean"),
    ],
)
def test_wrong_type_where_text_is_expected(
    model_dir: Path, tmp_path: Path, capsys, field: str, value: Any, described: str
):
    data = bad_data(tmp_path, {**GOOD[1], field: value})
    status, err = train_cli(capsys, model_dir, data, tmp_path / "out")
    assert_one_clear_error(
        status, err, *where(data, BAD_ROW, field), f"expected text, got {described}"
    )


@pytest.mark.parametrize("field", ["prompt", "chosen", "rejected"])
@pytest.mark.parametrize("blank", ["", "   \n\t"])
def test_empty_text(model_dir: Path, tmp_path: Path, capsys, field: str, blank: str):
    data = bad_data(tmp_path, {**GOOD[2], field: blank})
    status, err = train_cli(capsys, model_dir, data, tmp_path / "out")
    assert_one_clear_error(status, err, *where(data, BAD_ROW, field), "empty text")


def test_chosen_equals_rejected(model_dir: Path, tmp_path: Path, capsys):
    data = bad_data(tmp_path, {"prompt": "say hello", "chosen": " hello .", "rejected": " hello ."})
    status, err = train_cli(capsys, model_dir, data, tmp_path / "out")
    assert_one_clear_error(status, err, *where(data, BAD_ROW), "chosen and rejected")


def test_duplicate_rows_are_warned_not_fatal(
    model_dir: Path, tmp_path: Path, capsys, caplog, monkeypatch
):
    monkeypatch.undo()  # lift `no_model_load`: this run must reach the model and train
    data = write_jsonl(tmp_path / "data.jsonl", [*GOOD, GOOD[0], GOOD[0]])
    caplog.set_level(logging.INFO, logger="prefopt")
    status, err = train_cli(capsys, model_dir, data, tmp_path / "out", "train.max_steps=1")
    assert status == 0, err
    assert "warning 2 (exact duplicate of an earlier row (kept)): rows 4, 5" in caplog.text


# ---------------------------------------------------------------------------------------------
# Files: JSON, bytes, emptiness, formats, size


def test_invalid_json_line(model_dir: Path, tmp_path: Path, capsys):
    lines = [json.dumps(r) for r in GOOD] + [
        '{"prompt": "hi", "chosen": " yes",',
        json.dumps(GOOD[0]),
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    status, err = train_cli(capsys, model_dir, data, tmp_path / "out")
    assert_one_clear_error(
        status, err, *where(data, BAD_ROW), f"invalid JSON on line {BAD_ROW + 1}"
    )


def test_non_utf8_bytes(model_dir: Path, tmp_path: Path, capsys):
    data = tmp_path / "data.jsonl"
    good = "".join(json.dumps(r) + "\n" for r in GOOD).encode()
    data.write_bytes(good + b'{"prompt": "caf\xe9 ?", "chosen": " yes .", "rejected": " no ."}\n')
    status, err = train_cli(capsys, model_dir, data, tmp_path / "out")
    assert_one_clear_error(status, err, *where(data, BAD_ROW, "prompt"), "not valid UTF-8")


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(model_dir: Path, tmp_path: Path, capsys, content: str):
    data = tmp_path / "data.jsonl"
    data.write_text(content)
    status, err = train_cli(capsys, model_dir, data, tmp_path / "out")
    assert_one_clear_error(status, err, f"file {data}", "empty")


def test_mixed_formats_across_rows(model_dir: Path, tmp_path: Path, capsys):
    data = bad_data(tmp_path, {"prompt": [USER], "chosen": [YES], "rejected": [NO]})
    status, err = train_cli(capsys, model_dir, data, tmp_path / "out")
    assert_one_clear_error(
        status, err, *where(data, BAD_ROW, "prompt"), "'conversational' format", "'standard'"
    )


def test_text_and_messages_mixed_in_one_row(model_dir: Path, tmp_path: Path, capsys):
    data = bad_data(tmp_path, {"prompt": "tell me a story", "chosen": [YES], "rejected": " no ."})
    status, err = train_cli(capsys, model_dir, data, tmp_path / "out")
    assert_one_clear_error(status, err, *where(data, BAD_ROW, "chosen"), "cannot be mixed")


def test_prompt_longer_than_max_length(model_dir: Path, tmp_path: Path, capsys):
    long_prompt = " ".join(["the cat saw the dog"] * 10)  # 50 tokens
    data = bad_data(tmp_path, {**GOOD[0], "prompt": long_prompt})
    status, err = train_cli(capsys, model_dir, data, tmp_path / "out", "data.max_length=32")
    assert_one_clear_error(
        status, err, *where(data, BAD_ROW, "prompt"), "max_length=32", "max_prompt_length"
    )


def _five_megabyte_text() -> str:
    # 5 MB on one line, in ~5000 long words: each is one (unknown) token for the toy tokenizer,
    # which keeps tokenization to a second (see the slow test for 1 M real tokens).
    word = "abcdefghij" * 100
    return " ".join([word] * 5000)


def test_five_megabyte_prompt_is_a_clear_row_error(model_dir: Path, tmp_path: Path, capsys):
    data = bad_data(tmp_path, {**GOOD[0], "prompt": _five_megabyte_text()})
    assert data.stat().st_size > 5_000_000
    start = time.perf_counter()
    status, err = train_cli(capsys, model_dir, data, tmp_path / "out")
    line = assert_one_clear_error(status, err, *where(data, BAD_ROW, "prompt"), "max_length=512")
    assert len(line) < 500  # the message quotes no row text
    assert time.perf_counter() - start < 60


def test_five_megabyte_response_is_truncated_and_reported(
    model_dir: Path, tmp_path: Path, capsys, caplog, monkeypatch
):
    """A huge response is cut to max_length (the row stays usable) and the log names the row."""

    def reached(*args: Any, **kwargs: Any) -> None:
        from prefopt.errors import PrefoptError

        raise PrefoptError("model loading reached")

    monkeypatch.setattr(prefopt.run_setup, "load_causal_lm", reached)
    caplog.set_level(logging.INFO, logger="prefopt")
    data = bad_data(tmp_path, {**GOOD[0], "chosen": " " + _five_megabyte_text()})
    status, err = train_cli(capsys, model_dir, data, tmp_path / "out")
    assert_one_clear_error(status, err, "model loading reached")  # the data passed
    assert f"truncated: rows {BAD_ROW}" in caplog.text


def test_csv_field_over_the_csv_module_limit_is_read(
    model_dir: Path, tmp_path: Path, capsys, caplog, monkeypatch
):
    """A 200 KB CSV field (csv's default limit is 131072 characters) is an ordinary long row:
    the response is truncated and reported, not a parser traceback."""

    def reached(*args: Any, **kwargs: Any) -> None:
        from prefopt.errors import PrefoptError

        raise PrefoptError("model loading reached")

    monkeypatch.setattr(prefopt.run_setup, "load_causal_lm", reached)
    caplog.set_level(logging.INFO, logger="prefopt")
    data = tmp_path / "data.csv"
    with data.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, ["prompt", "chosen", "rejected"])
        writer.writeheader()
        writer.writerows([*GOOD, {**GOOD[0], "chosen": " paris" * 35_000}])  # 210 KB field
    assert data.stat().st_size > 200_000
    status, err = train_cli(capsys, model_dir, data, tmp_path / "out")
    assert_one_clear_error(status, err, "model loading reached")  # the data passed
    assert f"truncated: rows {BAD_ROW}" in caplog.text


@pytest.mark.slow
def test_five_megabyte_of_real_tokens(model_dir: Path, tmp_path: Path, capsys):
    """1 M tokens in one prompt: slow to tokenize (seconds), then the same clear row error."""
    data = bad_data(tmp_path, {**GOOD[0], "prompt": "good " * 1_000_000})
    status, err = train_cli(capsys, model_dir, data, tmp_path / "out")
    assert_one_clear_error(status, err, *where(data, BAD_ROW, "prompt"), "1000")


# ---------------------------------------------------------------------------------------------
# Conversations


@pytest.mark.parametrize(
    ("row", "field", "message"),
    [
        (
            {"prompt": [{"role": "wizard", "content": "hi"}], "chosen": [YES], "rejected": [NO]},
            "prompt[0].role",
            "unknown role 'wizard'",
        ),
        (
            {"prompt": [USER], "chosen": [{"role": "assistant"}], "rejected": [NO]},
            "chosen[0].content",
            "no 'content'",
        ),
        (
            {"prompt": [USER], "chosen": [YES], "rejected": [{"content": "no ."}]},
            "rejected[0].role",
            "no 'role'",
        ),
        (
            {"prompt": [USER], "chosen": [YES, USER], "rejected": [NO]},
            "chosen[1].role",
            "expected an assistant message",
        ),
    ],
    ids=["unknown-role", "missing-content", "missing-role", "ends-with-user"],
)
def test_bad_messages(
    model_dir: Path, tmp_path: Path, capsys, row: dict[str, Any], field: str, message: str
):
    good = learnable_pairs(4)  # conversational rows, so the bad row is not a format mismatch
    data = bad_data(tmp_path, row, good)
    status, err = train_cli(capsys, model_dir, data, tmp_path / "out")
    assert_one_clear_error(status, err, *where(data, BAD_ROW, field), message)


def test_implicit_conversation_not_ending_with_assistant(model_dir: Path, tmp_path: Path, capsys):
    good = [{"chosen": [USER, YES], "rejected": [USER, NO]}] * 2
    data = bad_data(tmp_path, {"chosen": [USER, YES, USER], "rejected": [USER, NO]}, good)
    status, err = train_cli(capsys, model_dir, data, tmp_path / "out")
    assert_one_clear_error(status, err, *where(data, 2, "chosen[2].role"), "assistant")


def test_hh_transcript_not_ending_with_assistant(model_dir: Path, tmp_path: Path, capsys):
    good = [
        {
            "chosen": "\n\nHuman: hi\n\nAssistant: hello",
            "rejected": "\n\nHuman: hi\n\nAssistant: no",
        }
    ]
    data = bad_data(
        tmp_path,
        {
            "chosen": "\n\nHuman: hi\n\nAssistant: yes\n\nHuman: why",
            "rejected": good[0]["rejected"],
        },
        good,
    )
    status, err = train_cli(capsys, model_dir, data, tmp_path / "out")
    assert_one_clear_error(status, err, *where(data, 1, "chosen"), "Assistant turn")


def test_chat_data_without_chat_template(plain_model_dir: Path, tmp_path: Path, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", learnable_pairs(4))
    status, err = train_cli(capsys, plain_model_dir, data, tmp_path / "out")
    assert_one_clear_error(status, err, *where(data, 0), "chat template")


# ---------------------------------------------------------------------------------------------
# Skipping bad rows


def test_on_error_skip_drops_and_counts_bad_rows(
    model_dir: Path, tmp_path: Path, capsys, caplog, monkeypatch
):
    monkeypatch.undo()  # lift `no_model_load`: this run must reach the model and train
    rows = [
        *GOOD,
        {"prompt": "say hello", "chosen": " hi ."},  # 4: missing column
        {**GOOD[0], "prompt": ""},  # 5: empty text
        *GOOD,
        {"prompt": "say hello", "chosen": " hello .", "rejected": " hello ."},  # 10: identical
        {**GOOD[1], "chosen": 7},  # 11: wrong type
    ]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    with data.open("ab") as fh:  # lines that cannot be parsed at all:
        fh.write(b'{"prompt": "say hello", "chosen": \n')  # 12: invalid JSON
        fh.write(b'{"prompt": "caf\xe9", "chosen": " a .", "rejected": " b ."}\n')  # 13: not UTF-8
        fh.write((json.dumps(GOOD[2]) + "\n").encode())  # 14: fine, and still called row 14
    caplog.set_level(logging.INFO, logger="prefopt")
    status, err = train_cli(
        capsys, model_dir, data, tmp_path / "out", "data.on_error=skip", "train.max_steps=1"
    )
    assert status == 0, err
    log = caplog.text
    # Reading drops rows 4, 5, 11, 12 and 13; tokenizing drops row 10 (rows 6-9 repeat 0-3).
    assert "15 rows read, 10 kept" in log
    assert "dropped 1 (rejected: missing column): rows 4" in log
    assert "dropped 1 (prompt: empty text): rows 5" in log
    assert "dropped 1 (chosen: expected text, got a number): rows 11" in log
    assert "dropped 1 (invalid JSON): rows 12" in log
    assert "dropped 1 (text is not valid UTF-8): rows 13" in log
    assert "tokenized 10 rows: 9 kept" in log
    assert "dropped 1 (identical_responses): rows 10" in log
    # The same counts, for the report: data_summary.json.
    cfg = load_config(None, [f"model.name_or_path={model_dir}", f"data.train={data}",
                             "data.on_error=skip", "data.eval_fraction=0.25"])  # fmt: skip
    summary = json.loads(
        write_data_summary(prepare_data(cfg, load_tokenizer(cfg.model)), tmp_path).read_text()
    )
    assert set(summary) == {"train", "eval"}
    train = summary["train"]
    assert (train["format"], train["rows_read"], train["truncated"]) == ("standard", 15, 0)
    assert train["pairs_kept"] + summary["eval"]["pairs_kept"] == 9  # held out, then tokenized
    dropped = {**train["dropped"]}
    for reason, count in summary["eval"]["dropped"].items():
        dropped[reason] = dropped.get(reason, 0) + count
    assert dropped == {
        "rejected: missing column": 1,
        "prompt: empty text": 1,
        "chosen: expected text, got a number": 1,
        "invalid JSON": 1,
        "text is not valid UTF-8": 1,
        "identical_responses": 1,
    }
    assert "15 rows read, 10 kept" in train["notes"][0]
    assert summary["eval"]["rows_read"] == 3  # a quarter of the 10 usable rows, held out


# ---------------------------------------------------------------------------------------------
# Config and model


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("loss.bta=0.2", ["unknown config key 'loss.bta'", "did you mean 'loss.beta'?"]),
        ("trian.max_steps=3", ["unknown config key 'trian'", "did you mean 'train'?"]),
        ("loss.name=dpo", ["unknown loss 'dpo'", "known:", "sigmoid"]),
        ("loss.name=[sigmoid, sigmod]", ["unknown loss 'sigmod'", "did you mean 'sigmoid'?"]),
        ("loss.beta=-1", ["loss.beta must be > 0"]),
        ("train.max_steps=many", ["train.max_steps", "expected an integer"]),
        ("train.seed=-1", ["train.seed must be >= 0"]),
        ("train.num_threads=" + "9" * 30, ["train.num_threads", "does not fit in 64 bits"]),
        ("loss.beta=" + "1" * 400, ["loss.beta: expected a finite number"]),
    ],
)
def test_config_mistakes(
    model_dir: Path, tmp_path: Path, capsys, override: str, needles: list[str]
):
    data = write_jsonl(tmp_path / "data.jsonl", GOOD)
    status, err = train_cli(capsys, model_dir, data, tmp_path / "out", override)
    assert_one_clear_error(status, err, *needles)


def test_reference_free_loss_with_a_reference_model(model_dir: Path, tmp_path: Path, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", GOOD)
    status, err = train_cli(
        capsys, model_dir, data, tmp_path / "out", "loss.name=simpo", f"reference.model={model_dir}"
    )
    assert_one_clear_error(status, err, "reference.model", "reference-free")


@pytest.mark.parametrize("path", ["/no/such/model", "./missing-model", "model.safetensors"])
def test_missing_model_path(tmp_path: Path, capsys, path: str):
    data = write_jsonl(tmp_path / "data.jsonl", GOOD)
    status, err = train_cli(capsys, path, data, tmp_path / "out")
    assert_one_clear_error(status, err, "model path not found", path)


def test_rerun_after_a_bad_input_failure_needs_no_overwrite(
    model_dir: Path, tmp_path: Path, capsys, monkeypatch
):
    """A run that failed before its first step leaves only config.yaml: the same command, with
    the input fixed, starts without output.overwrite=true."""
    data = write_jsonl(tmp_path / "data.jsonl", GOOD)
    status, err = train_cli(capsys, "/no/such/model", data, tmp_path / "out")
    assert_one_clear_error(status, err, "model path not found")
    monkeypatch.undo()  # lift `no_model_load`: the second run trains
    status, err = train_cli(capsys, model_dir, data, tmp_path / "out", "train.max_steps=1")
    assert status == 0, err


def test_missing_data_file(model_dir: Path, tmp_path: Path, capsys):
    missing = tmp_path / "nope.jsonl"
    status, err = train_cli(capsys, model_dir, missing, tmp_path / "out")
    assert_one_clear_error(status, err, f"file {missing}", "no such file")


OFFLINE_TIMEOUT_S = 90
"""Hang guard for the offline tests; an online retry loop would take about a minute."""


@pytest.mark.parametrize(
    "what",
    ["model", pytest.param("data", marks=pytest.mark.slow)],  # data: importing datasets
)
def test_offline_hub_id_fails_quickly(model_dir: Path, tmp_path: Path, what: str):
    """A Hub id with HF_HUB_OFFLINE=1: a clear 'offline / not found' error in seconds."""
    data = write_jsonl(tmp_path / "data.jsonl", GOOD)
    model, train_data = (
        ("nobody-xyz/no-such-model", data)
        if what == "model"
        else (model_dir, "nobody-xyz/no-such-data")
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "prefopt.cli", "train", f"model.name_or_path={model}",
         f"data.train={train_data}", f"output.dir={tmp_path / 'out'}", "output.progress=false"],
        capture_output=True, text=True, env=env, timeout=OFFLINE_TIMEOUT_S,
    )  # fmt: skip
    elapsed = time.perf_counter() - start
    line = assert_one_clear_error(proc.returncode, proc.stderr, "nobody-xyz/no-such-")
    assert "offline" in line or "not found" in line or "cannot be reached" in line, line
    assert elapsed < 45, f"took {elapsed:.0f} s"


def test_unreachable_hub_without_offline_flag_fails_quickly(model_dir: Path, tmp_path: Path):
    """No network and no HF_HUB_OFFLINE: one short Hub probe, then the cache, not a minute of
    retries (a mistyped relative folder name like `my-model` is a Hub id)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_HUB_OFFLINE", "HF_DATA"))}
    env.update(OMP_NUM_THREADS="1", HF_ENDPOINT="http://127.0.0.1:9")  # closed port: refused
    data = write_jsonl(tmp_path / "data.jsonl", GOOD)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "prefopt.cli", "train", "model.name_or_path=my-typo-model",
         f"data.train={data}", f"output.dir={tmp_path / 'out'}", "output.progress=false"],
        capture_output=True, text=True, env=env, timeout=OFFLINE_TIMEOUT_S,
    )  # fmt: skip
    elapsed = time.perf_counter() - start
    assert_one_clear_error(proc.returncode, proc.stderr, "'my-typo-model' is not a local path")
    assert elapsed < 45, f"took {elapsed:.0f} s"
