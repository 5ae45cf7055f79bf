"""pairs_to_unpaired and the prompt-grouped, seeded train/eval split."""

from __future__ import annotations

import pytest

from prefopt.data import PreferencePair, UnpairedExample, pairs_to_unpaired, split_eval
from prefopt.errors import ConfigError, DataError

USER = ({"role": "user", "content": "hi"},)
HELLO = ({"role": "assistant", "content": "hello"},)
GO = ({"role": "assistant", "content": "go"},)


def test_pairs_to_unpaired_keeps_index_and_order() -> None:
    pairs = [PreferencePair(3, "p", "a", "b"), PreferencePair(7, USER, HELLO, GO)]
    assert pairs_to_unpaired(pairs) == [
        UnpairedExample(3, "p", "a", True),
        UnpairedExample(3, "p", "b", False),
        UnpairedExample(7, USER, HELLO, True),
        UnpairedExample(7, USER, GO, False),
    ]


def _pairs() -> list[PreferencePair]:
    # 20 prompts; prompt k has 1 + k % 3 pairs (so groups have different sizes).
    return [
        PreferencePair(index, f"prompt {k}", f"good {j}", f"bad {j}")
        for index, (k, j) in enumerate((k, j) for k in range(20) for j in range(1 + k % 3))
    ]


def test_split_eval_is_deterministic_grouped_and_ordered() -> None:
    examples = _pairs()
    train, evaluation = split_eval(examples, 0.25, seed=0)
    assert split_eval(examples, 0.25, seed=0) == (train, evaluation)
    assert sorted(train + evaluation, key=lambda e: e.index) == examples
    assert {e.prompt for e in train}.isdisjoint({e.prompt for e in evaluation})
    assert train == sorted(train, key=lambda e: e.index)
    assert evaluation == sorted(evaluation, key=lambda e: e.index)
    # At least the target, overshooting by less than one group (at most 3 pairs).
    target = round(0.25 * len(examples))
    assert target <= len(evaluation) < target + 3
    assert any(split_eval(examples, 0.25, seed=s)[1] != evaluation for s in range(1, 5))


def test_split_eval_groups_conversational_and_unpaired_prompts() -> None:
    examples = pairs_to_unpaired(
        [PreferencePair(i, USER if i % 2 else "p", HELLO, GO) for i in range(6)]
    )
    train, evaluation = split_eval(examples, 0.1, seed=1)
    assert len(evaluation) == 6 and len(train) == 6
    assert len({str(e.prompt) for e in evaluation}) == 1


def test_split_eval_edge_cases() -> None:
    examples = _pairs()
    assert split_eval(examples, 0.0, seed=0) == (examples, [])
    assert split_eval([], 0.5, seed=0) == ([], [])
    # A tiny fraction still holds out one group; a huge one keeps one group in train.
    assert len(split_eval(examples, 0.001, seed=0)[1]) >= 1
    train, evaluation = split_eval(examples, 0.999, seed=0)
    assert train and len({e.prompt for e in train}) == 1
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ConfigError, match="eval fraction"):
            split_eval(examples, bad, seed=0)
    with pytest.raises(DataError, match="same prompt"):
        split_eval([PreferencePair(i, "p", "a", "b") for i in range(3)], 0.5, seed=0)
