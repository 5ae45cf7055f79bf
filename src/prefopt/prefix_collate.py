"""The shared-prefix layout: one [prompt | chosen | rejected] row per pair, with its 4-D mask.

Each pair is one row

    [prompt | chosen | rejected]            positions 0..P-1 | P..P+C-1 | P..P+R-1

with a 4-D attention mask in which rejected tokens see the prompt and earlier rejected tokens but
not the chosen tokens, and rejected positions restart after the prompt. Every rejected token
then sees exactly the keys and positions it sees in its own row of the two-pass layout
(`collate.collate_pairs`), so the log-probs are the same up to float rounding, with the prompt
computed once. Scoring these rows is `prefix_sharing`'s job.

The mask is additive (0 = attend, finfo(dtype).min = blocked), the convention of transformers'
eager attention, which SDPA accepts as well.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch

from prefopt.tokenize import TokenizedPair

__all__ = ["SharedPrefixBatch", "collate_shared_prefix", "pack_rows"]

Tensor = torch.Tensor

# Segment ids of the positions of a shared row.
_PAD, _PROMPT, _CHOSEN, _REJECTED = -1, 0, 1, 2


@dataclass
class SharedPrefixBatch:
    """B pairs, one [prompt | chosen | rejected] row each, right-padded.

    Attributes:
        input_ids: [B, T] long.
        attention_mask_4d: [B, 1, T, T] float additive mask: 0 where query t may attend key s,
            finfo(dtype).min where not. Pad queries attend to themselves only (no all-blocked
            softmax row, hence no NaN); their outputs are never read.
        position_ids: [B, T] long: prompt 0..P-1, chosen P..P+C-1, rejected P..P+R-1, pad 0.
        chosen_index: [3, Mc] long, one column per scored chosen token: (pair, source position
            in the pair's row whose hidden state predicts it, target id).
        rejected_index: [3, Mr] long, the same for rejected tokens.
        token_mask: [B, T] bool, True on real (non-pad) tokens.
        indices: [B] long, source row indices.
        pair_rows: [B] long, the row holding each pair: arange(B), or fewer rows than pairs
            when packed (then the tensors above have R <= B rows in place of B).
    """

    input_ids: Tensor
    attention_mask_4d: Tensor
    position_ids: Tensor
    chosen_index: Tensor
    rejected_index: Tensor
    token_mask: Tensor
    indices: Tensor
    pair_rows: Tensor

    def to(self, device: torch.device | str) -> SharedPrefixBatch:
        """A copy with every tensor on `device`."""
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    @property
    def num_pairs(self) -> int:
        return int(self.indices.numel())

    @property
    def num_tokens(self) -> int:
        """Real tokens in the shared rows (each prompt counted once)."""
        return int(self.token_mask.sum())

    @property
    def pair_tokens(self) -> int:
        """What `PairBatch.num_tokens` would be for the same pairs (each prompt counted twice)."""
        prompt = self.token_mask.sum() - self.chosen_index.shape[1] - self.rejected_index.shape[1]
        return int(self.token_mask.sum() + prompt)


def _gather_index(pair: int, sources: Tensor, targets: Sequence[int]) -> Tensor:
    """[3, M] (pair, source, target) columns for one response."""
    target_ids = torch.tensor(list(targets), dtype=torch.long)  # [M]
    return torch.stack([torch.full_like(target_ids, pair), sources, target_ids])


def _shared_mask(segment: Tensor, slot: Tensor | None, dtype: torch.dtype) -> Tensor:
    """[R, 1, T, T] additive mask from [R, T] segment ids and pair slots (see
    `SharedPrefixBatch`); a query sees only keys of its own pair (slot).

    `slot`: None when no row holds more than one pair. Then every real position of a row has
    the same slot, so the [R, T, T] slot comparison would change nothing and is skipped.
    """
    t = segment.shape[1]
    position = torch.arange(t)
    real = segment != _PAD  # [R, T]
    allowed = (position[None, :] <= position[:, None]).unsqueeze(0)  # [1, Tq, Tk] causal
    allowed = allowed & real[:, :, None] & real[:, None, :]  # [R, Tq, Tk]
    if slot is not None:
        allowed = allowed & (slot[:, :, None] == slot[:, None, :])  # packed pairs stay apart
    rejected_to_chosen = (segment[:, :, None] == _REJECTED) & (segment[:, None, :] == _CHOSEN)
    allowed = allowed & ~rejected_to_chosen
    # A pad query with every key blocked would softmax to NaN (and NaN * 0 stays NaN in
    # backward); attending to itself keeps it finite, and no real query ever attends to it.
    allowed = allowed | torch.eye(t, dtype=torch.bool).unsqueeze(0)
    mask = torch.zeros(allowed.shape, dtype=dtype)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min).unsqueeze(1)


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Pairs (by index) per row: first fit, in the given order, rows of at most `capacity`
    tokens (a pair longer than that gets a row of its own). Deterministic."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths):
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(capacity - n)
    return rows


def collate_shared_prefix(
    pairs: Sequence[TokenizedPair],
    *,
    pad_token_id: int,
    dtype: torch.dtype = torch.float32,
    pad_to_multiple_of: int | None = None,
    pack: bool = False,
) -> SharedPrefixBatch:
    """Lay B pairs out as [prompt | chosen | rejected] rows with their 4-D mask.

    Args:
        pairs: The pairs (B >= 1), each with a non-empty prompt.
        pad_token_id: Id written into padding (masked out, so any id works).
        dtype: Dtype of the additive mask; `shared_prefix_logps` converts it to the model's
            dtype if they differ, so float32 is always safe.
        pad_to_multiple_of: Round T up to a multiple of this.
        pack: Fill the padding with whole pairs: rows keep the width of the longest pair and
            shorter pairs share rows (`pack_rows`), each with its own positions (restarting at
            0) and attending only to itself. Never wider rows, only fewer of them. False: one
            row per pair.
    """
    if not pairs:
        raise ValueError("cannot collate an empty batch")
    lengths = [len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs]
    groups = pack_rows(lengths, max(lengths)) if pack else [[i] for i in range(len(pairs))]
    packed = any(len(g) > 1 for g in groups)  # pack=True may still leave one pair per row
    width = max(sum(lengths[i] for i in g) for g in groups)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    r = len(groups)
    input_ids = torch.full((r, width), pad_token_id, dtype=torch.long)  # [R, T]
    position_ids = torch.zeros((r, width), dtype=torch.long)  # [R, T]
    segment = torch.full((r, width), _PAD, dtype=torch.long)  # [R, T]
    slot = torch.full((r, width), -1, dtype=torch.long)  # [R, T] pair of each position
    pair_rows = torch.zeros(len(pairs), dtype=torch.long)  # [B]
    chosen: list[Tensor] = [torch.empty(0)] * len(pairs)  # gather columns, by pair
    rejected: list[Tensor] = [torch.empty(0)] * len(pairs)
    for row, group in enumerate(groups):
        start = 0
        for i in group:
            pair_rows[i] = row
            slot[row, start : start + lengths[i]] = i
            chosen[i], rejected[i] = _place_pair(
                pairs[i], i, row, start, input_ids, position_ids, segment
            )
            start += lengths[i]
    return SharedPrefixBatch(
        input_ids=input_ids,
        attention_mask_4d=_shared_mask(segment, slot if packed else None, dtype),
        position_ids=position_ids,
        chosen_index=torch.cat(chosen, dim=1),
        rejected_index=torch.cat(rejected, dim=1),
        token_mask=segment != _PAD,
        indices=torch.tensor([p.index for p in pairs], dtype=torch.long),
        pair_rows=pair_rows,
    )


def _place_pair(
    pair: TokenizedPair,
    i: int,
    row: int,
    start: int,
    input_ids: Tensor,
    position_ids: Tensor,
    segment: Tensor,
) -> tuple[Tensor, Tensor]:
    """Write pair `i` into `row` from column `start`; its (chosen, rejected) gather columns."""
    p, c = len(pair.prompt_ids), len(pair.chosen_ids)
    n = p + c + len(pair.rejected_ids)
    if p == 0:
        raise ValueError("a pair has an empty prompt: its first tokens can't be scored")
    ids = [*pair.prompt_ids, *pair.chosen_ids, *pair.rejected_ids]
    end = start + n
    input_ids[row, start:end] = torch.tensor(ids, dtype=torch.long)
    position_ids[row, start : start + p + c] = torch.arange(p + c)
    position_ids[row, start + p + c : end] = torch.arange(p, n - c)
    segment[row, start : start + p] = _PROMPT
    segment[row, start + p : start + p + c] = _CHOSEN
    segment[row, start + p + c : end] = _REJECTED
    chosen = _gather_index(i, torch.arange(start + p - 1, start + p - 1 + c), pair.chosen_ids)
    # Rejected token 0 is predicted from the last prompt token, like chosen token 0.
    sources = torch.arange(start + p + c - 1, end - 1)
    sources[:1] = start + p - 1
    return chosen, _gather_index(i, sources, pair.rejected_ids)
