"""Sequence log-probabilities of responses under a causal LM.

The quantity every DPO-family loss needs is log π(y|x) = Σ_t log p(y_t | x, y_<t), summed over
response tokens only. Two paths compute it:

* `sequence_logprobs`: from full logits [N, T, V] (the textbook path, used as the oracle in tests).
* `response_logprobs`: from the decoder's hidden states, running the LM head and the log-softmax
  only at positions that predict a response token, in chunks. Prompt and padding positions are
  never scored and [N, T, V] logits are never built, so memory does not grow with
  vocab × full sequence length.

Both accumulate in float32 even when the model runs in bf16/fp16. `average_logps` turns a sum
into the per-token average the length-normalised losses use.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

Tensor = torch.Tensor


def sequence_logprobs(
    logits: Tensor, input_ids: Tensor, response_mask: Tensor
) -> tuple[Tensor, Tensor]:
    """Sum of response-token log-probs per sequence, from full logits.

    Position t's logits predict token t+1, so logits[:, :-1] are scored against input_ids[:, 1:]
    where response_mask[:, 1:] is True.

    Args:
        logits: [N, T, V] any float dtype.
        input_ids: [N, T] long.
        response_mask: [N, T] bool, True on response tokens.

    Returns:
        (logps [N] float32, token_counts [N] long). A row with no response token gets 0.0 and 0.
    """
    targets = input_ids[:, 1:]  # [N, T-1]
    mask = response_mask[:, 1:].bool()  # [N, T-1]; a 0/1 long mask would index, not mask
    logits = logits[:, :-1].float()  # [N, T-1, V]
    token_logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    token_logps = torch.where(mask, token_logps, torch.zeros_like(token_logps))  # [N, T-1]
    return token_logps.sum(-1), mask.sum(-1)


def average_logps(logps: Tensor, counts: Tensor) -> Tensor:
    """Per-token average log-prob log π(y|x) / |y|, the length-normalised score.

    IPO, SimPO, ORPO and the SFT term read this instead of the sum. A row with no scored token
    (a fully masked or truncated-away response) averages to 0, never NaN: its sum is 0 too.

    Args:
        logps: [N] summed response log-probs (any float dtype; the result keeps it).
        counts: [N] response token counts (long or float), as returned next to `logps`.

    Returns:
        [N] logps / max(counts, 1), differentiable in `logps`.
    """
    return logps / counts.to(logps.dtype).clamp(min=1.0)


def _chunk_token_logps(
    hidden: Tensor, targets: Tensor, lm_head: nn.Module, softcap: float | None
) -> Tensor:
    """log p(target) for a chunk of positions: [M, H] hidden → [M] float32."""
    logits = lm_head(hidden).float()  # [M, V]
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def response_logprobs(
    hidden_states: Tensor,
    lm_head: nn.Module,
    input_ids: Tensor,
    response_mask: Tensor,
    *,
    chunk_size: int = 1024,
    softcap: float | None = None,
    checkpoint_chunks: bool = True,
) -> tuple[Tensor, Tensor]:
    """Sum of response-token log-probs per sequence, from hidden states.

    Args:
        hidden_states: [N, T, H] final (normed) decoder states.
        lm_head: The output projection (nn.Linear-like, possibly LoRA-wrapped). It is called as
            a module on each chunk, so a peft wrapper applies its own logic (disabled or merged
            adapters, dropout, DoRA, fp32 adapter weights on a bf16 base, modules_to_save) and
            ZeRO-3 style parameter-gathering hooks still run.
        input_ids: [N, T] long.
        response_mask: [N, T] bool, True on response tokens.
        chunk_size: Positions per LM-head chunk: bounds the [chunk, V] float32 logits.
        softcap: Final logit soft-capping (Gemma 2/3), None for none.
        checkpoint_chunks: Recompute each chunk's logits in backward instead of keeping them
            (saves chunk×V floats per chunk for ~one extra LM-head matmul on response positions).

    Returns:
        (logps [N] float32, token_counts [N] long).
    """
    n = input_ids.shape[0]
    mask = response_mask[:, 1:].bool()  # [N, T-1] positions predicting a response token
    rows = torch.arange(n, device=input_ids.device).unsqueeze(1).expand_as(mask)[mask]  # [M]
    hidden = hidden_states[:, :-1][mask]  # [M, H]
    targets = input_ids[:, 1:][mask]  # [M]
    token_logps = chunked_token_logps(
        hidden,
        targets,
        lm_head,
        chunk_size=chunk_size,
        softcap=softcap,
        checkpoint_chunks=checkpoint_chunks,
    )  # [M] float32
    logps = torch.zeros(n, dtype=torch.float32, device=input_ids.device)
    logps = logps.index_add(0, rows, token_logps)  # [N]
    return logps, mask.sum(-1)


def chunked_token_logps(
    hidden: Tensor,
    targets: Tensor,
    lm_head: nn.Module,
    *,
    chunk_size: int,
    softcap: float | None,
    checkpoint_chunks: bool,
) -> Tensor:
    """log p(target) for [M, H] gathered hidden states, LM head run chunk by chunk → [M] fp32.

    Shared by the two-pass and the prefix-shared paths, which differ only in how they gather.
    """
    pieces = []
    # At least one (possibly empty) chunk, so the result stays attached to the graph even when
    # no row has a response token (backward then gives zero gradients instead of failing).
    for start in range(0, max(hidden.shape[0], 1), chunk_size):
        args = (hidden[start : start + chunk_size], targets[start : start + chunk_size])
        if checkpoint_chunks and torch.is_grad_enabled():
            piece = checkpoint(_chunk_token_logps, *args, lm_head, softcap, use_reentrant=False)
        else:
            piece = _chunk_token_logps(*args, lm_head, softcap)
        pieces.append(piece)
    return torch.cat(pieces)  # [M]


class SequenceLogprobModel(nn.Module):
    """Wraps a causal LM so that forward() returns response log-probs, not logits.

    Wrapping (instead of calling the LM's sub-modules from outside) keeps the whole computation
    inside one module's forward, which is what DDP/FSDP wrappers need to synchronise gradients.

    Args:
        model: A transformers causal LM, or a peft model around one.
        response_only: Score only response positions from hidden states (see
            `response_logprobs`); falls back to full logits for heads it cannot reproduce.
        chunk_size: LM-head chunk size for the response-only path.
    """

    def __init__(self, model: nn.Module, *, response_only: bool = True, chunk_size: int = 1024):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.response_only = response_only and _plain_head(_causal_lm(model))

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        response_mask: Tensor,
        position_ids: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Args: [N, T] ids, attention mask (2-D, or 4-D additive/bool), response mask.

        Returns:
            (logps [N] float32, token_counts [N] long).
        """
        if not self.response_only:
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
            )
            return sequence_logprobs(out.logits, input_ids, response_mask)
        lm = _causal_lm(self.model)
        decoder, head = _decoder_and_head(lm)
        hidden = decoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state  # [N, T, H]
        softcap = getattr(lm.config, "final_logit_softcapping", None)
        return response_logprobs(
            hidden, head, input_ids, response_mask, chunk_size=self.chunk_size, softcap=softcap
        )


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (LoRA layers stay injected in it)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _decoder_and_head(lm: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The decoder body (`base_model`) and the output projection of a transformers causal LM."""
    decoder = getattr(lm, "base_model", None)
    get_head = getattr(lm, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(decoder, nn.Module) or not isinstance(head, nn.Module):
        raise TypeError(f"{type(lm).__name__} has no base_model and output embeddings to score")
    return decoder, head


def _plain_head(lm: nn.Module) -> bool:
    """True when logits = lm_head(base_model(...).last_hidden_state) (optionally soft-capped).

    Heads that scale logits (Cohere's logit_scale, Granite's logits_scaling) or models whose
    base_model is themselves are scored through full logits instead, so results stay exact.
    """
    config = getattr(lm, "config", None)
    if config is None or lm.base_model is lm:  # type: ignore[comparison-overlap]
        return False
    if getattr(config, "logit_scale", None) is not None:
        return False
    if getattr(config, "logits_scaling", None) not in (None, 1.0):
        return False
    get_head = getattr(lm, "get_output_embeddings", None)
    return callable(get_head) and isinstance(get_head(), nn.Module)
