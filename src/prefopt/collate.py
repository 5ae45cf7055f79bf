"""Batching: padded tensors from tokenized rows, and the per-epoch order of batches.

Sequences are right-padded. Masks are built from lengths, never from `input_ids == pad`: the
pad id is often the EOS id (SmolLM2), and EOS is a real, scored token.

`response_mask[b, t]` is True where token `t` is a response token, i.e. a token whose
log-probability is scored (predicted from the logits at `t - 1`). Every prompt has at least one
token (tokenization guarantees it), so position 0 is never scored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, TypeVar

import numpy as np
import torch

from prefopt.tokenize import TokenizedExample, TokenizedPair

__all__ = [
    "ExampleBatch",
    "TensorBatch",
    "PairBatch",
    "collate_examples",
    "collate_pairs",
    "epoch_batches",
    "sequence_length",
]


_B = TypeVar("_B", bound="TensorBatch")


class TensorBatch:
    """What every batch dataclass shares: moving its tensors, and counting its real tokens."""

    attention_mask: torch.Tensor

    def to(self: _B, device: torch.device | str) -> _B:
        """A copy with every tensor field on `device` (fields that are None stay None)."""
        moved: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]  # subclasses are dataclasses
            value = getattr(self, f.name)
            moved[f.name] = value.to(device) if isinstance(value, torch.Tensor) else value
        return replace(self, **moved)  # type: ignore[type-var]

    @property
    def num_tokens(self) -> int:
        """Non-pad tokens: ones in the attention mask (a KTO batch's KL rows not counted)."""
        return int(self.attention_mask.sum())


@dataclass
class PairBatch(TensorBatch):
    """Chosen and rejected sequences of B pairs, stacked for one forward pass.

    Attributes:
        input_ids: [2B, T] long; rows 0..B-1 chosen, rows B..2B-1 rejected, same pair order.
        attention_mask: [2B, T] long, 1 on real tokens, 0 on padding.
        response_mask: [2B, T] bool, True on response tokens (the tokens scored).
        indices: [B] long, source row indices.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    indices: torch.Tensor

    @property
    def num_pairs(self) -> int:
        return int(self.indices.numel())


@dataclass
class ExampleBatch(TensorBatch):
    """N single sequences: unpaired (KTO) or SFT examples.

    Attributes:
        input_ids: [N, T] long.
        attention_mask: [N, T] long, 1 on real tokens.
        response_mask: [N, T] bool, True on completion tokens.
        labels: [N] bool, True for desirable completions (all True for SFT).
        indices: [N] long, source row indices.
        kl_input_ids: [N, T'] long or None. KTO's mismatched rows: prompt i followed by the
            completion of example (i + 1) % N, used to estimate the KL reference point. None
            unless asked for, or when N == 1 (no other completion to borrow).
        kl_attention_mask: [N, T'] long or None.
        kl_response_mask: [N, T'] bool or None.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    kl_input_ids: torch.Tensor | None = None
    kl_attention_mask: torch.Tensor | None = None
    kl_response_mask: torch.Tensor | None = None

    @property
    def num_examples(self) -> int:
        return int(self.indices.numel())


def sequence_length(item: TokenizedPair | TokenizedExample) -> int:
    """Tokens in the longest sequence a row contributes (its batching length)."""
    if isinstance(item, TokenizedPair):
        return len(item.prompt_ids) + max(len(item.chosen_ids), len(item.rejected_ids))
    return len(item.prompt_ids) + len(item.completion_ids)


def _pad(
    rows: Sequence[tuple[Sequence[int], Sequence[int]]],
    pad_token_id: int,
    pad_to_multiple_of: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad (prompt, response) rows into input ids, attention mask and response mask."""
    if not rows:
        raise ValueError("cannot collate an empty batch")
    lengths = [len(p) + len(r) for p, r in rows]
    width = max(lengths)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)  # [R, T]
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # [R, T]
    response_mask = torch.zeros((len(rows), width), dtype=torch.bool)  # [R, T]
    for i, ((prompt, response), length) in enumerate(zip(rows, lengths, strict=True)):
        if not prompt:
            raise ValueError("a row has an empty prompt: its first response token can't be scored")
        input_ids[i, :length] = torch.tensor([*prompt, *response], dtype=torch.long)
        attention_mask[i, :length] = 1
        response_mask[i, len(prompt) : length] = True
    return input_ids, attention_mask, response_mask


def collate_pairs(
    pairs: Sequence[TokenizedPair], *, pad_token_id: int, pad_to_multiple_of: int | None = None
) -> PairBatch:
    """Stack B pairs into a `PairBatch`: chosen rows first, then rejected rows, right-padded.

    Args:
        pairs: The pairs (B >= 1).
        pad_token_id: Id written into padding (it is masked out, so any id works).
        pad_to_multiple_of: Round T up to a multiple of this (e.g. 8 for tensor cores).
    """
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs]
    rows += [(p.prompt_ids, p.rejected_ids) for p in pairs]
    input_ids, attention_mask, response_mask = _pad(rows, pad_token_id, pad_to_multiple_of)
    indices = torch.tensor([p.index for p in pairs], dtype=torch.long)  # [B]
    return PairBatch(input_ids, attention_mask, response_mask, indices)


def collate_examples(
    examples: Sequence[TokenizedExample],
    *,
    pad_token_id: int,
    with_kl: bool = False,
    pad_to_multiple_of: int | None = None,
    max_length: int | None = None,
) -> ExampleBatch:
    """Stack N examples into an `ExampleBatch`, right-padded.

    Args:
        examples: The examples (N >= 1). A label of None (SFT) counts as desirable.
        pad_token_id: Id written into padding.
        with_kl: Also build KTO's mismatched KL rows (prompt i + completion (i + 1) % N).
        pad_to_multiple_of: Round T (and T') up to a multiple of this.
        max_length: If given, KL rows are cut from the right to this many tokens (a mismatched
            prompt and completion can be longer than either source row).
    """
    rows = [(e.prompt_ids, e.completion_ids) for e in examples]
    input_ids, attention_mask, response_mask = _pad(rows, pad_token_id, pad_to_multiple_of)
    labels = torch.tensor([e.label is not False for e in examples], dtype=torch.bool)  # [N]
    indices = torch.tensor([e.index for e in examples], dtype=torch.long)  # [N]
    batch = ExampleBatch(input_ids, attention_mask, response_mask, labels, indices)
    n = len(examples)
    if with_kl and n > 1:
        kl_rows = []
        for i, ex in enumerate(examples):
            completion = examples[(i + 1) % n].completion_ids
            if max_length is not None:
                # Tokenization keeps prompts shorter than max_length, so >= 1 token stays.
                completion = completion[: max(max_length - len(ex.prompt_ids), 1)]
            kl_rows.append((ex.prompt_ids, completion))
        kl = _pad(kl_rows, pad_token_id, pad_to_multiple_of)
        batch.kl_input_ids, batch.kl_attention_mask, batch.kl_response_mask = kl
    return batch


def _check_batching(batch_size: int, seed: int, epoch: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be non-negative, got seed={seed}, epoch={epoch}")


def epoch_batches(
    lengths: Sequence[int],
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    group_by_length: bool = True,
    drop_last: bool = False,
) -> list[list[int]]:
    """The batches of one epoch, as lists of positions into the dataset.

    Deterministic in (seed, epoch). With `group_by_length`, rows of similar length share a batch
    to cut padding: shuffle, cut into mega-batches of 16 * batch_size, sort each by length
    descending, cut into batches, shuffle the batch order, then move the batch holding the
    longest row to the front, so an out-of-memory error shows at the first step. Without
    `shuffle`, rows keep dataset order (grouping still sorts within each mega-batch) and batches
    keep theirs.

    Args:
        lengths: Batching length of every row (see `sequence_length`).
        batch_size: Rows per batch.
        seed: Base seed of the run.
        epoch: Epoch number (0-based); each epoch gets its own order.
        shuffle: Shuffle rows and batches.
        group_by_length: Group rows of similar length.
        drop_last: Drop the one incomplete batch, if any.

    Returns:
        Batches covering every position exactly once (less the incomplete batch with drop_last).
    """
    _check_batching(batch_size, seed, epoch)
    rng = np.random.default_rng([seed, epoch])
    n = len(lengths)
    order = rng.permutation(n).tolist() if shuffle else list(range(n))
    if group_by_length:
        mega = 16 * batch_size
        chunks = [order[i : i + mega] for i in range(0, n, mega)]
        # Stable sort: ties keep their (shuffled) order, so equal lengths still mix across epochs.
        order = [i for chunk in chunks for i in sorted(chunk, key=lambda j: -lengths[j])]
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
        if group_by_length and batches:
            longest = max(range(len(batches)), key=lambda b: max(lengths[j] for j in batches[b]))
            batches[0], batches[longest] = batches[longest], batches[0]
    return batches
