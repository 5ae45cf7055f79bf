"""Derived views of loaded examples: unpaired (KTO) examples from pairs, and a train/eval split."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar, Union

from prefopt.data.records import PreferencePair, Text, UnpairedExample
from prefopt.errors import ConfigError, DataError

ExampleT = TypeVar("ExampleT", bound=Union[PreferencePair, UnpairedExample])


def pairs_to_unpaired(pairs: Sequence[PreferencePair]) -> list[UnpairedExample]:
    """Two unpaired examples per pair: chosen labelled True, then rejected labelled False.

    Both keep the pair's source index.
    """
    examples: list[UnpairedExample] = []
    for pair in pairs:
        examples.append(UnpairedExample(pair.index, pair.prompt, pair.chosen, True))
        examples.append(UnpairedExample(pair.index, pair.prompt, pair.rejected, False))
    return examples


def split_eval(
    examples: Sequence[ExampleT], fraction: float, seed: int
) -> tuple[list[ExampleT], list[ExampleT]]:
    """Hold out about `fraction` of the examples for evaluation, deterministically.

    Examples are grouped by prompt, so one prompt never lands in both splits (otherwise eval
    would reward memorised prompts). Groups are shuffled with `seed` and moved to eval until it
    holds at least `max(1, round(fraction * len(examples)))` examples; the last group may
    overshoot, and at least one group always stays in train. Both splits keep source order.

    Args:
        examples: Pairs or unpaired examples.
        fraction: Share for eval, in [0, 1); 0 gives an empty eval split.
        seed: Shuffle seed.

    Returns:
        (train, eval).

    Raises:
        ConfigError: If `fraction` is outside [0, 1).
        DataError: If fraction > 0 but all examples share one prompt.
    """
    if not 0.0 <= fraction < 1.0:  # also rejects NaN
        raise ConfigError(f"eval fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0 or not examples:
        return list(examples), []
    groups: dict[object, list[int]] = {}
    for position, example in enumerate(examples):
        groups.setdefault(_prompt_key(example.prompt), []).append(position)
    if len(groups) < 2:
        raise DataError("cannot hold out an eval split: every example has the same prompt")
    order = list(groups.values())  # first-appearance order, then a seeded shuffle
    random.Random(seed).shuffle(order)
    target = max(1, round(fraction * len(examples)))
    held: set[int] = set()
    for group in order[:-1]:  # the last group always stays in train
        if len(held) >= target:
            break
        held.update(group)
    train = [ex for i, ex in enumerate(examples) if i not in held]
    evaluation = [ex for i, ex in enumerate(examples) if i in held]
    return train, evaluation


def _prompt_key(prompt: Text) -> object:
    if isinstance(prompt, str):
        return prompt
    return tuple((message["role"], message["content"]) for message in prompt)
