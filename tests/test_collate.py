"""Collation against literal tensors, and the per-epoch batch order."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prefopt.collate import (
    ExampleBatch,
    PairBatch,
    collate_examples,
    collate_pairs,
    epoch_batches,
    sequence_length,
)
from prefopt.tokenize import TokenizedExample, TokenizedPair

PAIRS = [
    TokenizedPair(10, (2, 55), (78, 7, 3), (77, 3)),
    TokenizedPair(11, (2, 118, 55, 34), (300, 3), (143, 7, 3)),
]
EXAMPLES = [
    TokenizedExample(5, (2, 55), (78, 3), True),
    TokenizedExample(6, (2, 118, 34), (77, 7, 3), False),
    TokenizedExample(7, (2,), (300, 3), None),  # SFT-style: no label counts as desirable
]


def _long(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long)


def _bool(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def test_collate_pairs_literal_pad_equals_eos() -> None:
    """pad id 3 is also EOS: masks must come from lengths, so each final EOS stays real."""
    batch = collate_pairs(PAIRS, pad_token_id=3)
    assert torch.equal(
        batch.input_ids,
        _long(
            [
                [2, 55, 78, 7, 3, 3, 3],  # chosen 0
                [2, 118, 55, 34, 300, 3, 3],  # chosen 1
                [2, 55, 77, 3, 3, 3, 3],  # rejected 0
                [2, 118, 55, 34, 143, 7, 3],  # rejected 1
            ]
        ),
    )
    assert torch.equal(
        batch.attention_mask,
        _long(
            [
                [1, 1, 1, 1, 1, 0, 0],
                [1, 1, 1, 1, 1, 1, 0],
                [1, 1, 1, 1, 0, 0, 0],
                [1, 1, 1, 1, 1, 1, 1],
            ]
        ),
    )
    assert torch.equal(
        batch.response_mask,
        _bool(
            [
                [0, 0, 1, 1, 1, 0, 0],
                [0, 0, 0, 0, 1, 1, 0],
                [0, 0, 1, 1, 0, 0, 0],
                [0, 0, 0, 0, 1, 1, 1],
            ]
        ),
    )
    assert torch.equal(batch.indices, _long([[10, 11]])[0])
    assert batch.input_ids.dtype == torch.long and batch.response_mask.dtype == torch.bool
    assert batch.num_pairs == 2 and batch.num_tokens == 5 + 6 + 4 + 7


def test_collate_pairs_pad_to_multiple() -> None:
    batch = collate_pairs(PAIRS, pad_token_id=0, pad_to_multiple_of=4)
    assert batch.input_ids.shape == (4, 8)
    assert batch.input_ids[0].tolist() == [2, 55, 78, 7, 3, 0, 0, 0]
    assert batch.attention_mask[:, 7].tolist() == [0, 0, 0, 0]
    assert not batch.response_mask[:, 7].any()


def test_pair_batch_to() -> None:
    batch = collate_pairs(PAIRS, pad_token_id=0)
    moved = batch.to("cpu")
    assert isinstance(moved, PairBatch) and moved is not batch
    assert torch.equal(moved.input_ids, batch.input_ids)


def test_collate_empty_or_promptless_rejected() -> None:
    with pytest.raises(ValueError, match="empty batch"):
        collate_pairs([], pad_token_id=0)
    with pytest.raises(ValueError, match="empty prompt"):
        collate_pairs([TokenizedPair(0, (), (5,), (6,))], pad_token_id=0)


def test_collate_examples_literal_with_kl() -> None:
    batch = collate_examples(EXAMPLES, pad_token_id=0, with_kl=True)
    assert torch.equal(
        batch.input_ids, _long([[2, 55, 78, 3, 0, 0], [2, 118, 34, 77, 7, 3], [2, 300, 3, 0, 0, 0]])
    )
    assert torch.equal(
        batch.attention_mask, _long([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    )
    assert torch.equal(
        batch.response_mask, _bool([[0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1], [0, 1, 1, 0, 0, 0]])
    )
    assert batch.labels.tolist() == [True, False, True] and batch.labels.dtype == torch.bool
    assert batch.indices.tolist() == [5, 6, 7]
    # KL rows: prompt i + completion (i + 1) % 3.
    assert batch.kl_input_ids is not None and batch.kl_attention_mask is not None
    assert batch.kl_response_mask is not None
    assert torch.equal(
        batch.kl_input_ids, _long([[2, 55, 77, 7, 3], [2, 118, 34, 300, 3], [2, 78, 3, 0, 0]])
    )
    assert torch.equal(
        batch.kl_attention_mask, _long([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    )
    assert torch.equal(
        batch.kl_response_mask, _bool([[0, 0, 1, 1, 1], [0, 0, 0, 1, 1], [0, 1, 1, 0, 0]])
    )
    assert batch.num_examples == 3 and batch.num_tokens == 4 + 6 + 3


def test_collate_examples_kl_max_length() -> None:
    batch = collate_examples(EXAMPLES, pad_token_id=0, with_kl=True, max_length=4)
    assert batch.kl_input_ids is not None
    assert batch.kl_input_ids.tolist() == [[2, 55, 77, 7], [2, 118, 34, 300], [2, 78, 3, 0]]


def test_collate_examples_without_kl() -> None:
    batch = collate_examples(EXAMPLES, pad_token_id=0)
    assert batch.kl_input_ids is None and batch.kl_attention_mask is None
    single = collate_examples(EXAMPLES[:1], pad_token_id=0, with_kl=True)
    assert single.kl_input_ids is None and single.kl_response_mask is None
    moved = single.to("cpu")
    assert isinstance(moved, ExampleBatch) and moved.kl_input_ids is None


def test_sequence_length() -> None:
    assert [sequence_length(p) for p in PAIRS] == [5, 7]
    assert [sequence_length(e) for e in EXAMPLES] == [4, 6, 3]


# ---------------------------------------------------------------- epoch_batches


def _padded_tokens(batches: list[list[int]], lengths: list[int]) -> int:
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)


def test_sequential_without_shuffle_or_grouping() -> None:
    got = epoch_batches([1] * 7, 3, seed=0, epoch=0, shuffle=False, group_by_length=False)
    assert got == [[0, 1, 2], [3, 4, 5], [6]]
    got = epoch_batches(
        [1] * 7, 3, seed=0, epoch=0, shuffle=False, group_by_length=False, drop_last=True
    )
    assert got == [[0, 1, 2], [3, 4, 5]]


def test_grouping_without_shuffle_sorts_descending() -> None:
    assert epoch_batches([1, 5, 3, 2], 2, seed=0, epoch=0, shuffle=False) == [[1, 2], [3, 0]]


def test_deterministic_in_seed_and_epoch() -> None:
    lengths = list(range(100))
    a = epoch_batches(lengths, 4, seed=1, epoch=2)
    assert a == epoch_batches(lengths, 4, seed=1, epoch=2)
    assert a != epoch_batches(lengths, 4, seed=1, epoch=3)
    assert a != epoch_batches(lengths, 4, seed=2, epoch=2)


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 50), max_size=300),
    batch_size=st.integers(1, 9),
    seed=st.integers(0, 2**32),
    epoch=st.integers(0, 5),
    shuffle=st.booleans(),
    group=st.booleans(),
    drop_last=st.booleans(),
)
def test_every_index_once(
    lengths: list[int],
    batch_size: int,
    seed: int,
    epoch: int,
    shuffle: bool,
    group: bool,
    drop_last: bool,
) -> None:
    batches = epoch_batches(
        lengths,
        batch_size,
        seed=seed,
        epoch=epoch,
        shuffle=shuffle,
        group_by_length=group,
        drop_last=drop_last,
    )
    flat = [i for b in batches for i in b]
    assert len(flat) == len(set(flat))
    if drop_last:
        assert len(flat) == len(lengths) // batch_size * batch_size
        assert all(len(b) == batch_size for b in batches)
    else:
        assert sorted(flat) == list(range(len(lengths)))
        assert sum(len(b) < batch_size for b in batches) <= 1  # at most one incomplete batch


def test_longest_batch_first() -> None:
    lengths = np.random.default_rng(0).integers(1, 500, size=200).tolist()
    for epoch in range(5):
        batches = epoch_batches(lengths, 8, seed=0, epoch=epoch)
        assert int(np.argmax(lengths)) in batches[0]


def test_grouping_reduces_padding() -> None:
    lengths = np.random.default_rng(0).integers(10, 500, size=1000).tolist()
    grouped = epoch_batches(lengths, 8, seed=0, epoch=0)
    plain = epoch_batches(lengths, 8, seed=0, epoch=0, group_by_length=False)
    # Random batches pad to near the global max; grouped ones to their neighbours' length.
    assert _padded_tokens(grouped, lengths) < 0.7 * _padded_tokens(plain, lengths)
    assert _padded_tokens(grouped, lengths) >= sum(lengths)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        epoch_batches([1, 2], 0, seed=0, epoch=0)
    with pytest.raises(ValueError):
        epoch_batches([1, 2], 1, seed=-1, epoch=0)
