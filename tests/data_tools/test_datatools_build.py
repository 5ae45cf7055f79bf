"""`prefopt data build` on a tiny random model with a deterministic judge: the expected pairs,
and resuming without sampling done prompts again (no download)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

import prefopt.datatools.sampling as sampling
from prefopt.datatools.build import (
    BuildSettings,
    NonFiniteScore,
    build_pairs,
    build_paths,
    select_pair,
)
from prefopt.datatools.prompts import load_prompt_rows
from prefopt.datatools.sampling import trim_to_sentence
from prefopt.errors import ConfigError, DataError, PrefoptError
from prefopt.generation import SamplingParams, encode_prompt, generate_completions
from prefopt.judges import FunctionJudge, make_judge
from toy import make_tokenizer
from toy_models import make_model

PROMPTS: list[Any] = [
    "hello",
    "what is the capital of france ?",
    ({"role": "user", "content": "tell me a story"},),
    "is the sun hot ?",
    "say hello to the cat",
]
SETTINGS = BuildSettings(judge="length", k=3, max_new_tokens=6, seed=5, batch_size=2)


@pytest.fixture(scope="module")
def tok() -> Any:
    return make_tokenizer()


@pytest.fixture(scope="module")
def model() -> Any:
    return make_model("llama", seed=0).eval()


def read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def expected_rows(model: Any, tok: Any, settings: BuildSettings) -> list[dict[str, Any]]:
    """The pairs by hand: sample with generation's own API (prompt i seeded seed + i), score
    replies by word count, best (first max) vs worst (first min) of the distinct ones."""
    params = SamplingParams(1.0, 0.95, settings.max_new_tokens, settings.k, settings.seed)
    ids = [encode_prompt(tok, p) for p in PROMPTS]
    seeds = [settings.seed + i for i in range(len(PROMPTS))]
    rows = []
    for i, samples in enumerate(generate_completions(model, tok, ids, seeds, params)):
        kept = list(dict.fromkeys(c.text.strip() for c in samples if c.text.strip()))
        scores = [float(len(t.split())) for t in kept]
        best, worst = scores.index(max(scores)), scores.index(min(scores))
        if len(kept) < 2 or scores[best] == scores[worst]:
            continue
        chat = not isinstance(PROMPTS[i], str)
        wrap = (lambda t: [{"role": "assistant", "content": t}]) if chat else (lambda t: t)
        rows.append(
            {
                "prompt": [dict(m) for m in PROMPTS[i]] if chat else PROMPTS[i],
                "chosen": wrap(kept[best]),
                "rejected": wrap(kept[worst]),
                "chosen_score": scores[best],
                "rejected_score": scores[worst],
                "prompt_index": i,
            }
        )
    return rows


def test_build_gives_the_expected_pairs(model: Any, tok: Any, tmp_path: Path) -> None:
    out = tmp_path / "pairs.jsonl"
    report = build_pairs(model, tok, PROMPTS, make_judge("length"), SETTINGS, out)
    expected = expected_rows(model, tok, SETTINGS)
    assert len(expected) >= 3  # the fixture must exercise pairing, not only drops
    assert read(out) == expected
    _, samples_file, meta_file = build_paths(out)
    records = read(samples_file)
    assert sorted(r["prompt_index"] for r in records) == list(range(len(PROMPTS)))
    assert all(len(r["replies"]) == 3 == len(r["scores"]) for r in records)
    assert report.pairs == len(expected) and report.sampled_now == len(PROMPTS)
    assert report.pairs + report.dropped_small_gap + report.dropped_too_few_replies == 5
    meta = json.loads(meta_file.read_text())
    assert meta["complete"] and meta["settings"]["judge"] == "length"


LITERAL_PROMPTS = ["hello", "is the sun hot ?", "say hi"]
LITERAL_SETTINGS = BuildSettings(judge="length", k=3, max_new_tokens=4, seed=1, batch_size=2)
LITERAL_PAIRS = [
    # replies "cat might also", "word tomorrow", "go can 5": the first of the two 3-word
    # replies wins the tie; the worst is the 2-word one.
    {
        "prompt": "hello",
        "chosen": "cat might also",
        "rejected": "word tomorrow",
        "chosen_score": 3.0,
        "rejected_score": 2.0,
        "prompt_index": 0,
    },
    # prompt 1's replies all have 3 words: no preference, no pair ("small_gap").
    {
        "prompt": "say hi",
        "chosen": "dog if paris two",
        "rejected": "its",
        "chosen_score": 4.0,
        "rejected_score": 1.0,
        "prompt_index": 2,
    },
]


def test_build_gives_literal_pairs(model: Any, tok: Any, tmp_path: Path) -> None:
    """The toy model (seed 0) sampled with seed 1 + prompt index, written out by hand."""
    out = tmp_path / "pairs.jsonl"
    report = build_pairs(model, tok, LITERAL_PROMPTS, make_judge("length"), LITERAL_SETTINGS, out)
    assert read(out) == LITERAL_PAIRS
    records = {r["prompt_index"]: r for r in read(build_paths(out)[1])}
    assert records[0]["replies"] == ["cat might also", "word tomorrow", "go can 5"]
    assert records[1]["outcome"] == "small_gap" and records[1]["scores"] == [3.0, 3.0, 3.0]
    assert (report.pairs, report.dropped_small_gap, report.cut_off_replies) == (2, 1, 9)


def nan_on_sun(prompt: str, response: str) -> float:
    return float("nan") if "sun" in prompt else float(len(response.split()))


class SilentNaNJudge:
    """A judge object that returns NaN instead of raising (the built-ins raise)."""

    name = "silent"

    def __call__(self, prompt: Any, response: str) -> float:
        return nan_on_sun(str(prompt), response)

    def score_batch(self, prompts: Any, responses: Any) -> list[float]:
        return [self(p, r) for p, r in zip(prompts, responses, strict=True)]


@pytest.mark.parametrize("judge", [FunctionJudge("nan-on-sun", nan_on_sun), SilentNaNJudge()])
def test_a_nan_score_names_the_prompt_or_drops_it(
    model: Any, tok: Any, tmp_path: Path, judge: Any
) -> None:
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text(
        '{"prompt": "hello"}\n{"question": "x"}\n{"prompt": "is the sun hot ?"}\n'
        '{"prompt": "say hi"}\n'
    )
    prompts = load_prompt_rows(prompts_file, on_error="skip")
    assert prompts.rows == [0, 2, 3] and prompts.prompts == LITERAL_PROMPTS
    out = tmp_path / "pairs.jsonl"
    with pytest.raises(DataError) as info:
        build_pairs(model, tok, prompts, judge, LITERAL_SETTINGS, out)
    assert (info.value.file, info.value.row) == (str(prompts_file), 2)  # the source row
    assert "prompt_index 1:" in str(info.value) and "nan" in str(info.value)
    skipped = tmp_path / "skipped.jsonl"
    report = build_pairs(model, tok, prompts, judge, LITERAL_SETTINGS, skipped, on_error="skip")
    assert read(skipped) == LITERAL_PAIRS  # the other prompts are untouched
    assert report.dropped_bad_score == 1 and report.dropped_small_gap == 0
    assert report.skipped_prompts == {"prompt: missing column": [1]}
    assert "1 (judge score not a finite number)" in report.summary()
    assert "1 prompt rows skipped" in report.summary()
    record = next(r for r in read(build_paths(skipped)[1]) if r["prompt_index"] == 1)
    assert record["outcome"] == "bad_score" and record["scores"] == [None] * 3


def test_prompt_rows_are_checked_and_skippable(tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(
        b'{"prompt": "hello"}\n{"prompt": " "}\n{"prompt": "caf\xe9"}\n'
        b'{"prompt": [{"role": "user", "content": "hi"}]}\n{"prompt": 3}\n{"prompt": "bye"}\n'
    )
    with pytest.raises(DataError) as info:
        load_prompt_rows(path)  # the file is read before prompts are checked: row 2 first
    assert (info.value.row, info.value.field) == (2, "prompt") and "UTF-8" in str(info.value)
    with pytest.raises(DataError) as info:
        load_prompt_rows(write_prompt(tmp_path / "blank.jsonl", '{"prompt": "a"}\n{"prompt": ""}'))
    assert (info.value.row, info.value.field) == (1, "prompt") and "empty text" in str(info.value)
    prompts = load_prompt_rows(path, on_error="skip")
    assert prompts.prompts == ["hello", ({"role": "user", "content": "hi"},), "bye"]
    assert prompts.rows == [0, 3, 5]
    assert prompts.skipped == {
        "prompt: empty text": [1],
        "line not valid UTF-8": [2],
        "prompt: expected text, got a number": [4],
    }
    first_two = prompts.head(2)
    assert first_two.rows == [0, 3] and first_two.skipped_count == 2  # rows 1 and 2
    with pytest.raises(DataError, match="no usable prompts"):
        load_prompt_rows(write_prompt(tmp_path / "none.jsonl", '{"q": "x"}'), on_error="skip")


def write_prompt(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    return path


def test_resume_skips_done_prompts(model: Any, tok: Any, tmp_path: Path, monkeypatch) -> None:
    calls: list[list[int]] = []  # prompt indices of each generate call
    stop_after: list[int | None] = [1]
    real = sampling.generate_completions

    def counting(model: Any, tok: Any, ids: Any, seeds: Any, *args: Any, **kwargs: Any) -> Any:
        if stop_after[0] is not None and len(calls) >= stop_after[0]:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C
        calls.append([s - SETTINGS.seed for s in seeds])
        return real(model, tok, ids, seeds, *args, **kwargs)

    monkeypatch.setattr(sampling, "generate_completions", counting)
    out = tmp_path / "pairs.jsonl"
    with pytest.raises(KeyboardInterrupt):
        build_pairs(model, tok, PROMPTS, make_judge("length"), SETTINGS, out)
    (first,) = calls
    assert len(first) == 2  # one batch sampled and written before the interrupt
    assert {r["prompt_index"] for r in read(build_paths(out)[1])} == set(first)
    with build_paths(out)[1].open("a") as f:
        f.write('{"prompt_index": 4, "pro')  # a torn line, as a kill mid-write leaves
    calls.clear()
    stop_after[0] = None
    report = build_pairs(model, tok, PROMPTS, make_judge("length"), SETTINGS, out)
    resumed = sorted(i for batch in calls for i in batch)
    assert resumed == sorted(set(range(len(PROMPTS))) - set(first))  # nothing sampled twice
    assert (report.done_before, report.sampled_now) == (2, 3)
    assert read(out) == expected_rows(model, tok, SETTINGS)  # = an uninterrupted build
    calls.clear()
    again = build_pairs(model, tok, PROMPTS, make_judge("length"), SETTINGS, out)
    assert calls == [] and again.sampled_now == 0  # a finished build samples nothing
    assert read(out) == expected_rows(model, tok, SETTINGS)


def test_resume_refuses_other_settings_or_prompts(model: Any, tok: Any, tmp_path: Path) -> None:
    out = tmp_path / "pairs.jsonl"
    few = PROMPTS[:2]
    build_pairs(model, tok, few, make_judge("length"), SETTINGS, out)
    other = BuildSettings(judge="length", k=2, max_new_tokens=6, seed=5)
    with pytest.raises(ConfigError, match="k: 3 -> 2"):
        build_pairs(model, tok, few, make_judge("length"), other, out)
    with pytest.raises(DataError, match="prompts changed"):
        build_pairs(model, tok, ["bye", *few[1:]], make_judge("length"), SETTINGS, out)
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(DataError, match="not a `prefopt data build` record"):
        build_pairs(model, tok, few, make_judge("length"), SETTINGS, foreign)


def test_per_batch_sampling_is_seeded_and_resumes_whole_batches(
    model: Any, tok: Any, tmp_path: Path
) -> None:
    settings = BuildSettings(
        judge="length:neg", k=2, max_new_tokens=5, sampling="per-batch", batch_size=2
    )
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    build_pairs(model, tok, PROMPTS, make_judge("length:neg"), settings, a)
    # b: one prompt of the first planned batch is done already; its batch is re-sampled whole,
    # so the other prompt gets the same replies as in a.
    first_batch = sampling.plan_batches("per-batch", tok, PROMPTS, 2)[0]
    records = {r["prompt_index"]: r for r in read(build_paths(a)[1])}
    build_paths(b)[1].write_text(json.dumps(records[first_batch[0]]) + "\n")
    build_pairs(model, tok, PROMPTS, make_judge("length:neg"), settings, b)
    assert read(a) == read(b)


def test_select_pair_rules() -> None:
    rng = random.Random(0)
    assert select_pair([1.0, 3.0, 0.0, 3.0], 0.0, "best-worst", rng) == (1, 2)
    assert select_pair([1.0, 1.0], 0.0, "best-worst", rng) is None  # no preference
    assert select_pair([1.0, 1.2], 0.3, "best-worst", rng) is None  # gap below min_gap
    picks = {select_pair([5.0, 1.0, 4.9, 2.0], 1.0, "best-random-lower", rng) for _ in range(50)}
    assert picks == {(0, 1), (0, 3)}  # 4.9 is not min_gap lower


def test_trim_to_sentence() -> None:
    assert trim_to_sentence("Hi there. I think that the") == "Hi there."
    assert trim_to_sentence("Steps:\n1. Open the") == "Steps:\n1. Open the"  # "1." is no end
    assert trim_to_sentence("def f(x):\n    return") == "def f(x):\n    return"


def test_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="k must be at least 2"):
        BuildSettings(judge="length", k=1)
    with pytest.raises(ConfigError, match="temperature"):
        BuildSettings(judge="length", temperature=0)


JUDGE_MODULE = """\
from prefopt.errors import PrefoptError

def broken(prompt, response):  # loads its model on first use, and that fails
    raise PrefoptError("cannot load the scoring model ./rm: no such folder")

def nan_on_sun(prompt, response):
    return float("nan") if "sun" in prompt else float(len(response.split()))
"""


def test_only_a_non_finite_score_is_a_bad_score(
    model: Any, tok: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A module judge that fails to load stops the build even with on_error="skip" (before,
    every prompt was saved as a done "bad_score" that resuming never retried); a NaN score
    drops just its prompt."""
    (tmp_path / "judge_for_build_test.py").write_text(JUDGE_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "pairs.jsonl"
    broken = make_judge("judge_for_build_test:broken")
    for on_error in ("raise", "skip"):
        with pytest.raises(PrefoptError, match="cannot load the scoring model") as info:
            build_pairs(
                model, tok, LITERAL_PROMPTS, broken, LITERAL_SETTINGS, out, on_error=on_error
            )
        assert not isinstance(info.value, NonFiniteScore)
        assert not build_paths(out)[1].read_text()  # no prompt recorded as done
    # With a judge that works, the resumed build judges every prompt.
    report = build_pairs(model, tok, LITERAL_PROMPTS, make_judge("length"), LITERAL_SETTINGS, out)
    assert (report.done_before, report.sampled_now, report.dropped_bad_score) == (0, 3, 0)
    assert read(out) == LITERAL_PAIRS
    nan = make_judge("judge_for_build_test:nan_on_sun")
    skipped = tmp_path / "nan.jsonl"
    report = build_pairs(
        model, tok, LITERAL_PROMPTS, nan, LITERAL_SETTINGS, skipped, on_error="skip"
    )
    assert report.dropped_bad_score == 1 and read(skipped) == LITERAL_PAIRS
    record = next(r for r in read(build_paths(skipped)[1]) if r["outcome"] == "bad_score")
    assert (
        record["prompt_index"] == 1 and "returned nan, expected a finite number" in record["error"]
    )
