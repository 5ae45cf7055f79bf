"""Prefix sharing: score a pair's chosen and rejected responses in one sequence.

The two-pass layout (`collate_pairs`) runs the prompt twice, once in the chosen row and once in
the rejected row; the shared layout (`prefix_collate.collate_shared_prefix`) runs it once, in a
[prompt | chosen | rejected] row whose 4-D mask hides chosen from rejected.

Scoring generalises the shift-by-one gather: each scored token is a (row, source position,
target id) triple. Chosen token j is predicted from position P-1+j. Rejected token 0 is predicted
from the last prompt token too (position P-1: the hidden state there is shared), rejected token
j >= 1 from position P+C+j-1. The LM head runs only on those source positions, in chunks.

transformers 5 passes a 4-D mask to the attention functions unchanged
(`masking_utils._preprocess_mask_arguments`), so this works with "eager" and "sdpa" attention
but not with kernels that only take padding (flash attention) or need a BlockMask (flex
attention): `supports_shared_prefix` says which. Whether a run uses it (`train.prefix_sharing`)
is decided in `prefix_choice`.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn

from prefopt.collate import collate_pairs
from prefopt.logprobs import (
    SequenceLogprobModel,
    _causal_lm,
    _decoder_and_head,
    _plain_head,
    chunked_token_logps,
)
from prefopt.prefix_collate import SharedPrefixBatch, collate_shared_prefix
from prefopt.tokenize import TokenizedPair

__all__ = [
    "SharedPrefixBatch",
    "SharedPrefixLogprobModel",
    "TwoPassRows",
    "collate_shared_prefix",
    "gathered_token_logps",
    "pair_row_logps",
    "shared_prefix_logps",
    "shared_prefix_mismatch",
    "supports_shared_prefix",
]

Tensor = torch.Tensor

# Attention kernels that add a custom 4-D float mask to the scores as given.
_MASK_HONOURING = ("eager", "sdpa")
# Models whose attention bias (ALiBi) is built from a 2-D padding mask, not from position ids.
_ALIBI_MODEL_TYPES = ("bloom", "mpt", "baichuan")


def gathered_token_logps(
    hidden_states: Tensor,
    lm_head: nn.Module,
    rows: Tensor,
    sources: Tensor,
    targets: Tensor,
    *,
    chunk_size: int = 1024,
    softcap: float | None = None,
    checkpoint_chunks: bool = True,
) -> Tensor:
    """log p(target) predicted from hidden_states[row, source], for M scored tokens.

    The generalised gather behind `logprobs.response_logprobs` (which scores source t - 1 for
    target t): the LM head runs per chunk of sources as a module call (so peft LoRA heads and
    parameter-gathering hooks apply), each chunk checkpointed so its [chunk, V] float32 logits
    are recomputed in backward instead of kept.

    Args:
        hidden_states: [N, T, H] final (normed) decoder states.
        lm_head: The output projection.
        rows: [M] long row of each scored token.
        sources: [M] long position whose hidden state predicts it.
        targets: [M] long target ids.
        chunk_size: Positions per LM-head chunk.
        softcap: Final logit soft-capping, None for none.
        checkpoint_chunks: Recompute each chunk's logits in backward.

    Returns:
        [M] float32 token log-probs.
    """
    hidden = hidden_states[rows, sources]  # [M, H]
    return chunked_token_logps(
        hidden,
        targets,
        lm_head,
        chunk_size=chunk_size,
        softcap=softcap,
        checkpoint_chunks=checkpoint_chunks,
    )  # [M]


def _additive_mask(mask: Tensor, lm: nn.Module) -> Tensor:
    """The additive mask in the dtype of the model's embeddings (SDPA wants the query dtype;
    under autocast SDPA casts it itself). Blocked entries become that dtype's minimum."""
    get_embeddings = getattr(lm, "get_input_embeddings", None)
    weight = getattr(get_embeddings(), "weight", None) if callable(get_embeddings) else None
    dtype = weight.dtype if isinstance(weight, Tensor) and weight.is_floating_point() else None
    if dtype is None or mask.dtype == dtype:
        return mask
    out = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return out.masked_fill_(mask != 0, torch.finfo(dtype).min)


def _shared_row_logps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask_4d: Tensor,
    position_ids: Tensor,
    chosen_index: Tensor,
    rejected_index: Tensor,
    pair_rows: Tensor | None = None,
    *,
    chunk_size: int,
    response_only: bool,
) -> tuple[Tensor, Tensor]:
    """([2B] float32 log-probs, [2B] long token counts): chosen of pair i at i, rejected at B+i.

    `pair_rows`: [B] row of each pair when packed; None means pair i is row i."""
    lm = _causal_lm(model)
    b = input_ids.shape[0] if pair_rows is None else pair_rows.numel()
    mask = _additive_mask(attention_mask_4d, lm)
    inputs = {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids}
    pairs, sources, targets = torch.cat([chosen_index, rejected_index], dim=1)  # [M] each
    rows = pairs if pair_rows is None else pair_rows[pairs]  # [M]
    if response_only and _plain_head(lm):
        decoder, head = _decoder_and_head(lm)
        hidden = decoder(**inputs, use_cache=False).last_hidden_state  # [B, T, H]
        softcap = getattr(lm.config, "final_logit_softcapping", None)
        token_logps = gathered_token_logps(
            hidden, head, rows, sources, targets, chunk_size=chunk_size, softcap=softcap
        )  # [M]
    else:
        logits = model(**inputs, use_cache=False).logits[rows, sources].float()  # [M, V]
        token_logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    slots = torch.cat([chosen_index[0], rejected_index[0] + b])  # [M] place in [2B]
    logps = torch.zeros(2 * b, dtype=torch.float32, device=input_ids.device)
    return logps.index_add(0, slots, token_logps), torch.bincount(slots, minlength=2 * b)


class SharedPrefixLogprobModel(SequenceLogprobModel):
    """A `SequenceLogprobModel` that also scores shared-prefix rows, in one module forward
    (what DDP/FSDP wrappers need).

    Called like its parent (2-D mask and response mask) it scores two-pass rows, so it can
    replace the parent everywhere (evaluation, reference checks); called with the fields of a
    `SharedPrefixBatch` it scores shared rows. Either way it returns [2B] values ordered as a
    `PairBatch`'s rows (chosen rows, then rejected), which `paired_logps` and reference keys
    already expect.

    Args:
        model: A transformers causal LM, or a peft model around one.
        response_only: Run the LM head only on scored positions; heads it cannot reproduce
            (scaled logits) fall back to full logits.
        chunk_size: LM-head chunk size.
    """

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        response_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        chosen_index: Tensor | None = None,
        rejected_index: Tensor | None = None,
        pair_rows: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Args: two-pass rows (`input_ids`, `attention_mask`, `response_mask`), or a
        `SharedPrefixBatch`'s `input_ids`, `attention_mask_4d`, `position_ids`, `chosen_index`
        and `rejected_index` (by keyword).

        Returns:
            (logps [R] float32, token_counts [R] long); R = 2B for pairs.
        """
        if chosen_index is None or rejected_index is None:
            if response_mask is None:
                raise TypeError("pass response_mask (two-pass rows) or the shared-prefix indices")
            return super().forward(input_ids, attention_mask, response_mask, position_ids)
        if position_ids is None:
            raise TypeError("shared-prefix rows need their position_ids")
        return _shared_row_logps(
            self.model, input_ids, attention_mask, position_ids, chosen_index, rejected_index,
            pair_rows, chunk_size=self.chunk_size, response_only=self.response_only,
        )  # fmt: skip


class TwoPassRows(Protocol):
    """One sequence per row: a `PairBatch`, an `ExampleBatch`, KTO's mismatched KL rows."""

    input_ids: Tensor  # [R, T] long
    attention_mask: Tensor  # [R, T]
    response_mask: Tensor  # [R, T] bool


def pair_row_logps(
    scorer: nn.Module, batch: TwoPassRows | SharedPrefixBatch
) -> tuple[Tensor, Tensor]:
    """Score a batch in either layout: ([R] logps, [R] token counts). For pairs R = 2B, chosen
    rows first. A `SharedPrefixBatch` needs a `SharedPrefixLogprobModel` (possibly wrapped by
    DDP/FSDP); two-pass rows work with any `SequenceLogprobModel`."""
    if isinstance(batch, SharedPrefixBatch):
        return scorer(  # type: ignore[no-any-return]
            batch.input_ids, batch.attention_mask_4d, position_ids=batch.position_ids,
            chosen_index=batch.chosen_index, rejected_index=batch.rejected_index,
            pair_rows=batch.pair_rows,
        )  # fmt: skip
    return scorer(batch.input_ids, batch.attention_mask, batch.response_mask)  # type: ignore[no-any-return]


def shared_prefix_logps(
    model: nn.Module, batch: SharedPrefixBatch, *, chunk_size: int = 1024
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Chosen and rejected log-probs of a `SharedPrefixBatch` in one forward pass.

    Args:
        model: A transformers causal LM or a peft model around one; its attention must honour
            custom 4-D masks (check `supports_shared_prefix`).
        batch: The batch, on the model's device.
        chunk_size: LM-head chunk size.

    Returns:
        (chosen_logps [B] float32, rejected_logps [B] float32, chosen_tokens [B] long,
        rejected_tokens [B] long).
    """
    logps, counts = _shared_row_logps(
        model, batch.input_ids, batch.attention_mask_4d, batch.position_ids,
        batch.chosen_index, batch.rejected_index, batch.pair_rows,
        chunk_size=chunk_size, response_only=True,
    )  # fmt: skip
    b = batch.num_pairs
    return logps[:b], logps[b:], counts[:b], counts[b:]


def supports_shared_prefix(model: nn.Module) -> tuple[bool, str]:
    """Whether the model's attention honours the custom 4-D mask, and why not if it doesn't.

    A static check of the config: known-good are decoder-only models with full (global)
    attention on every layer, rotary or learned absolute positions taken from `position_ids`,
    and "eager" or "sdpa" attention. For other architectures, also compare against the two-pass
    result once with `shared_prefix_mismatch`.

    Returns:
        (True, "") or (False, the reason).
    """
    lm = _causal_lm(model)
    config = getattr(lm, "config", None)
    if config is None:
        return False, f"{type(lm).__name__} has no transformers config"
    if getattr(config, "is_encoder_decoder", False):
        return False, "encoder-decoder models are not supported"
    impl = getattr(config, "_attn_implementation", None)
    if impl not in _MASK_HONOURING:
        return False, (
            f"attn_implementation={impl!r} does not take an arbitrary 4-D mask "
            "(flash attention only masks padding, flex attention needs a BlockMask); "
            "use 'sdpa' or 'eager'"
        )
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        other = sorted({t for t in layer_types if t != "full_attention"})
        if other:
            return False, f"layers of type {other} build their own masks (only full attention)"
    else:
        for name in ("sliding_window", "attention_chunk_size"):
            if getattr(config, name, None) is not None:
                return False, f"{name}={getattr(config, name)} is not reproduced by the 4-D mask"
    if getattr(config, "alibi", False) or getattr(config, "model_type", "") in _ALIBI_MODEL_TYPES:
        return False, "ALiBi biases are built from a 2-D padding mask, not from position_ids"
    try:
        decoder, _ = _decoder_and_head(lm)
    except TypeError as exc:
        return False, str(exc)
    if "position_ids" not in inspect.signature(decoder.forward).parameters:
        return False, f"{type(decoder).__name__}.forward takes no position_ids"
    return True, ""


@torch.no_grad()
def shared_prefix_mismatch(
    model: nn.Module,
    pairs: Sequence[TokenizedPair],
    *,
    pad_token_id: int,
    scorer: nn.Module | None = None,
) -> float:
    """Largest per-token difference between shared-prefix and two-pass log-probs.

    max over pairs and over chosen/rejected of |Δ log π(y|x)| / (tokens of y). A run-time check
    for a model `supports_shared_prefix` accepts: only float rounding should remain (~1e-6 in
    float32, more in bf16); a mask the model ignores lets rejected tokens see the chosen
    response, which on a trained model moves log-probs by far more. Runs without gradient, in
    the model's current train/eval mode.

    Args:
        scorer: Score through this `SharedPrefixLogprobModel` of `model` instead of a new one;
            it must be the FSDP2 root when the weights are sharded (the root's hooks gather the
            parameters that no inner unit owns).
    """
    device = next(model.parameters()).device
    scorer = scorer if scorer is not None else SharedPrefixLogprobModel(model)
    shared, _ = pair_row_logps(
        scorer, collate_shared_prefix(pairs, pad_token_id=pad_token_id).to(device)
    )
    two_pass, counts = pair_row_logps(
        scorer, collate_pairs(pairs, pad_token_id=pad_token_id).to(device)
    )
    return float(((shared - two_pass).abs() / counts.clamp(min=1)).max())  # [2B] → max
