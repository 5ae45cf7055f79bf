"""Fuzzing the input boundaries: any row, any override, any YAML gives a result or a PrefoptError.

The user controls data rows and configs, so nothing they write may escape as a KeyError,
TypeError, RecursionError or similar. Each test is bounded (max_examples=200, no deadline) so
the whole file runs in seconds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
import typing
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from prefopt.config import ExperimentConfig
from prefopt.config_io import ALIASES, load_config
from prefopt.data import FORMATS, ROLES, ColumnMap, PreferencePair, UnpairedExample, normalize_rows
from prefopt.data.loading import load_preference_data, read_rows
from prefopt.errors import DataError, PrefoptError
from prefopt.tokenize import tokenize_examples, tokenize_pairs
from toy import TOY_VOCAB, WORDS, make_tokenizer

FUZZ = settings(
    max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
CHAT_TOKENIZER = make_tokenizer()
PLAIN_TOKENIZER = make_tokenizer(chat_template=False)

# ---------------------------------------------------------------------------------------------
# Rows

COLUMNS = ["prompt", "chosen", "rejected", "completion", "label", "completions", "responses",
           "scores", "instruction", "response", "overall_score", "score", "role",
           "content"]  # fmt: skip
"""Keys the formats read, so random rows often look almost right."""

VOCAB = [*WORDS, *TOY_VOCAB[: len(TOY_VOCAB) - len(WORDS)]]  # words first: what shrinking picks
words = st.lists(st.sampled_from(VOCAB), min_size=0, max_size=6).map(" ".join)
some_words = st.lists(st.sampled_from(WORDS), min_size=1, max_size=6).map(" ".join)
texts = st.one_of(words, st.text(max_size=8), st.sampled_from(["", " ", "\n", "Human:"]))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    texts,
)
any_message = st.fixed_dictionaries(
    {}, optional={"role": st.one_of(st.sampled_from(ROLES), scalars), "content": scalars}
)
values = st.recursive(
    st.one_of(scalars, st.lists(any_message, max_size=3)),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(COLUMNS), inner, max_size=3)
    ),
    max_leaves=6,
)
random_rows = st.dictionaries(st.sampled_from(COLUMNS) | st.text(max_size=6), values, max_size=5)


def mostly(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`valid` seven times in eight, anything otherwise."""
    return st.sampled_from([True] * 7 + [False]).flatmap(lambda ok: valid if ok else values)


text_field = mostly(some_words)
message = mostly(st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": some_words}))
reply = mostly(st.fixed_dictionaries({"role": st.just("assistant"), "content": some_words}))
conversation = mostly(st.lists(message, min_size=1, max_size=3))
replies = mostly(st.lists(reply, min_size=1, max_size=2))
label = st.one_of(st.booleans(), st.sampled_from([0, 1, 2, "true", "FALSE", "yes", None, 0.5]))
hh_history = st.lists(
    st.tuples(st.sampled_from(["\n\nHuman:", "\n\nAssistant:", "Human:", "\n\n"]), words),
    min_size=1, max_size=3,
).map(lambda turns: "".join(f"{tag} {text}" for tag, text in turns))  # fmt: skip
FAMILIES = {
    "standard": st.fixed_dictionaries(
        {"prompt": text_field, "chosen": text_field, "rejected": text_field}
    ),
    "conversational": st.fixed_dictionaries(
        {"prompt": conversation, "chosen": replies, "rejected": replies}
    ),
    "unpaired": st.fixed_dictionaries(
        {
            "prompt": st.one_of(text_field, conversation),
            "completion": st.one_of(text_field, replies),
            "label": label,
        }  # fmt: skip
    ),
    "implicit_text": st.builds(
        lambda p, a, b: {"chosen": f"{p} {a}", "rejected": f"{p} {b}"}, some_words, words, words
    ),
    "implicit_messages": st.builds(
        lambda p, a, b: {"chosen": [*p, *a], "rejected": [*p, *b]},
        st.lists(message, min_size=1, max_size=2),
        st.lists(reply, max_size=2),
        st.lists(reply, max_size=2),
    ),  # fmt: skip
    "hh": st.builds(
        lambda h, a, b: {"chosen": f"{h}\n\nAssistant: {a}", "rejected": f"{h}\n\nAssistant: {b}"},
        hh_history,
        words,
        words,
    ),  # fmt: skip
    "ultrafeedback": st.fixed_dictionaries(
        {
            "instruction": text_field,
            "completions": mostly(
                st.lists(
                    mostly(
                        st.fixed_dictionaries(
                            {
                                "response": text_field,
                                "overall_score": st.one_of(
                                    st.integers(0, 3), st.floats(allow_nan=True), scalars
                                ),
                            }  # fmt: skip
                        )
                    ),
                    max_size=4,
                )
            ),
        }
    ),
}
datasets = st.one_of(
    *(st.lists(family, min_size=1, max_size=4) for family in FAMILIES.values()),
    st.lists(st.one_of(*FAMILIES.values(), random_rows, values), max_size=4),
)


@FUZZ
@given(
    data=datasets,
    fmt=st.sampled_from(["auto"] * 6 + [*FORMATS, "bogus"]),
    on_error=st.sampled_from(["raise", "skip", "skip"]),
    chat=st.booleans(),
    max_length=st.integers(min_value=2, max_value=48),
    max_prompt_length=st.none() | st.integers(min_value=1, max_value=8),
)
def test_random_rows_normalize_and_tokenize_or_raise_prefopt_errors(
    data: list[Any], fmt: str, on_error: Any, chat: bool, max_length: int, max_prompt_length: Any
):
    try:
        examples, report = normalize_rows(data, format=fmt, on_error=on_error, source="fuzz")
    except PrefoptError as error:
        event(f"rows refused: {type(error).__name__}")
        return
    event(f"normalized: {report.format}")
    assert report.rows_kept == len(examples) > 0
    assert all(0 <= e.index < len(data) for e in examples)
    tokenizer = CHAT_TOKENIZER if chat else PLAIN_TOKENIZER
    limits: dict[str, Any] = {"max_length": max_length, "max_prompt_length": max_prompt_length}
    try:
        if isinstance(examples[0], PreferencePair):
            pairs = [e for e in examples if isinstance(e, PreferencePair)]
            out: list[Any] = tokenize_pairs(pairs, tokenizer, on_error=on_error, **limits)[0]
        else:
            unpaired = [e for e in examples if isinstance(e, UnpairedExample)]
            out = tokenize_examples(unpaired, tokenizer, on_error=on_error, **limits)[0]
    except PrefoptError as error:
        event(f"tokenization refused: {type(error).__name__}")
        return
    event("tokenized" if out else "tokenized: all rows dropped")
    for item in out:
        assert item.prompt_ids  # never an empty prompt


@FUZZ
@given(
    data=datasets,
    columns=st.builds(
        ColumnMap,
        prompt=st.sampled_from(COLUMNS),
        chosen=st.sampled_from(COLUMNS),
        rejected=st.sampled_from(COLUMNS),
    ),
)
def test_random_column_maps_raise_prefopt_errors(data: list[Any], columns: ColumnMap):
    with contextlib.suppress(PrefoptError):
        normalize_rows(data, columns=columns, on_error="skip")


# ---------------------------------------------------------------------------------------------
# Files: damaged bytes

_PAIR_ROWS = [
    {"prompt": "hi", "chosen": " a", "rejected": " b"},
    {"prompt": [{"role": "user", "content": "yo"}], "chosen": " c, d", "rejected": " e"},
]
GOOD_FILES = {
    ".jsonl": "".join(json.dumps(row) + "\n" for row in _PAIR_ROWS).encode(),
    ".json": json.dumps(_PAIR_ROWS).encode(),
    ".csv": b'prompt,chosen,rejected\r\nhi,a,b\r\n"y\no","c, ""d""",e\r\n',
}
"""Small valid files of each text format, to be damaged."""
SPECIAL_BYTES = [b"\x00", b'"', b"{", b"[", b"\n", b"\r", b",", b"\xef\xbb\xbf", b"\xff\xfe",
                 b"\xc3", b"\xed\xa0\x80", b"1e999", b"NaN", b"\\u", b"\\ud800", b"]"]  # fmt: skip
edits = st.lists(
    st.tuples(
        st.sampled_from(["replace", "insert", "delete"]),
        st.floats(min_value=0, max_value=1),  # where, as a fraction of the length
        st.binary(min_size=1, max_size=4) | st.sampled_from(SPECIAL_BYTES),
    ),
    min_size=1,
    max_size=6,
)


def _damage(data: bytes, changes: list[tuple[str, float, bytes]]) -> bytes:
    out = bytearray(data)
    for kind, where, chunk in changes:
        at = int(where * len(out))
        if kind == "replace":
            out[at : at + len(chunk)] = chunk
        elif kind == "insert":
            out[at:at] = chunk
        else:
            del out[at : at + len(chunk)]
    return bytes(out)


@FUZZ
@given(
    suffix=st.sampled_from(sorted(GOOD_FILES)),
    changes=edits,
    on_error=st.sampled_from(["raise", "skip"]),
)
def test_damaged_files_read_or_raise_data_errors(
    suffix: str, changes: list[tuple[str, float, bytes]], on_error: Any
):
    """Random byte damage (flips, inserts, cuts; quotes, NULs, BOMs, bad UTF-8) to JSONL, JSON
    and CSV files: `read_rows` returns row objects or raises DataError, nothing else; so does
    `load_preference_data` after it."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"data{suffix}"
        path.write_bytes(_damage(GOOD_FILES[suffix], changes))
        try:
            rows = read_rows(path, on_error=on_error)
        except DataError as error:
            event(f"{suffix}: refused ({error.reason.split(':')[0][:30]})")
            return
        assert rows and all(isinstance(row, dict) for row in rows)
        event(f"{suffix}: read")
        with contextlib.suppress(PrefoptError):
            load_preference_data(path, on_error=on_error)


# ---------------------------------------------------------------------------------------------
# Configs


def _field_paths(cls: Any, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    paths = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            paths += _field_paths(tp, f"{prefix}{f.name}.")
        else:
            paths.append(f"{prefix}{f.name}")
    return paths


FIELD_PATHS = _field_paths(ExperimentConfig)
SECTIONS = [f.name for f in dataclasses.fields(ExperimentConfig)]


def _typo(path: str, data: st.DataObject) -> str:
    if not path:
        return path
    i = data.draw(st.integers(0, len(path) - 1))
    return path[:i] + path[i + 1 :]


keys = st.one_of(
    st.sampled_from(FIELD_PATHS),
    st.sampled_from(FIELD_PATHS),
    st.sampled_from(SECTIONS + list(ALIASES)),
    st.lists(st.sampled_from([*SECTIONS, "beta", "name", "", "x"]), min_size=1, max_size=4).map(
        ".".join
    ),
    st.text(max_size=10),
)
PLAUSIBLE = ["1", "2", "0.1", "0.5", "true", "false", "null", "sigmoid", "[sigmoid, sft]", "kto",
             "simpo", "cpu", "auto", "latest", "linear", "float32", "[jsonl]", "copy", "none",
             "max", "skip", "raise", "[0.9, 0.99]", "x.jsonl"]  # fmt: skip
"""Values that fit some field, so that random overrides are sometimes accepted."""

yaml_values = st.one_of(
    st.sampled_from(PLAUSIBLE),
    st.sampled_from(PLAUSIBLE),
    st.sampled_from(
        [
            "",
            "true",
            "null",
            "~",
            "[a, b]",
            "[]",
            "{}",
            "{a: 1}",
            "1e-6",
            "1.0e-6",
            "nan",
            ".nan",
            ".inf",
            "-.inf",
            "-1",
            "0",
            "1",
            "1" * 400,
            "1" * 400 + ".0",
            "[1, [2]]",
            "[sigmoid, sft]",
            "&a [*a]",
            "!!python/object/apply:os.system [echo]",
            "'quoted'",
            "a: b: c",
            "[",
            "{",
            "2024-01-01",
            "0x10",
            "yes",
            "no",
            "- a",
            "|\n  text",
        ]  # fmt: skip
    ),
    st.integers().map(str),
    st.floats().map(str),
    st.text(max_size=12),
)
overrides = st.lists(
    st.one_of(st.builds(lambda k, v: f"{k}={v}", keys, yaml_values), st.text(max_size=10)),
    max_size=5,
)


def _check_config(path: Path | None, items: list[str]) -> str:
    """ "accepted" or "refused: <error type>"; any other exception fails the test."""
    try:
        cfg = load_config(path, items)
    except PrefoptError as error:
        return f"refused: {type(error).__name__}"
    assert isinstance(cfg, ExperimentConfig)
    cfg.validate()  # a returned config is a valid one
    return "accepted"


@FUZZ
@given(items=overrides)
def test_random_overrides_give_a_config_or_a_prefopt_error(items: list[str]):
    event(_check_config(None, items))


yaml_docs = st.recursive(
    scalars | st.sampled_from(FIELD_PATHS),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(SECTIONS + FIELD_PATHS) | st.text(max_size=6), inner, max_size=4
        )
    ),
    max_leaves=10,
)
sectioned = st.dictionaries(
    st.sampled_from(SECTIONS),
    st.dictionaries(
        st.sampled_from([p.split(".", 1)[-1] for p in FIELD_PATHS]), scalars, max_size=4
    )
    | scalars,
    max_size=4,
)


@FUZZ
@given(doc=st.one_of(yaml_docs, sectioned), raw=st.none() | st.text(max_size=40), items=overrides)
def test_random_yaml_files_give_a_config_or_a_prefopt_error(doc: Any, raw: Any, items: list[str]):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_text(raw if raw is not None else yaml.safe_dump(doc), encoding="utf-8")
        event(_check_config(path, items))


AWKWARD = ["1" * 400, "-" + "1" * 400, "1" * 400 + ".0", str(2**63), str(2**64), "-1", "0",
           "-0.0", "1e308", "1.0e309", ".nan", ".inf", "-.inf", "null", "[]", "{}", "true", "''",
           "[1, 2, 3]", "&a [*a]", "{a: &b [*b]}"]  # fmt: skip


def test_every_field_with_every_awkward_value():
    """Exhaustive sweep: each config field set to each awkward value (beyond the fuzzer's luck)."""
    for path in FIELD_PATHS:
        for value in AWKWARD:
            _check_config(None, [f"{path}={value}"])
