"""`prefopt data build` on a tiny random model with a deterministic judge: the expected pairs,
and resuming without sampling done prompts again (no download)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

import prefopt.datatools.sampling as sampling
from prefopt.datatools.build import BuildSettings, build_pairs, build_paths, select_pair
from prefopt.datatools.sampling import trim_to_sentence
from prefopt.errors import ConfigError, DataError
from prefopt.generation import SamplingParams, encode_prompt, generate_completions
from prefopt.judges import make_judge
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
