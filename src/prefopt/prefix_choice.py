"""Whether a run scores pairs with prefix sharing (`train.prefix_sharing`), and the check.

`choose_prefix_sharing` resolves the setting from static facts (the loss, the model's attention,
the data's lengths); `verify_prefix_sharing` then compares the shared and two-pass log-probs of
the first batch once, before training, and falls back (auto) or refuses (true) on a mismatch.
The mechanism itself lives in `prefix_sharing` and `prefix_collate`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn

from prefopt.errors import ConfigError, PrefoptError
from prefopt.prefix_sharing import shared_prefix_mismatch, supports_shared_prefix
from prefopt.tokenize import TokenizedPair

__all__ = [
    "AUTO_MIN_PROMPT_RATIO",
    "PrefixSharingChoice",
    "choose_prefix_sharing",
    "verify_prefix_sharing",
]

logger = logging.getLogger(__name__)

AUTO_MIN_PROMPT_RATIO = 1.0
"""`auto` turns sharing on when mean prompt tokens ≥ this × mean response tokens (the mean of
chosen and rejected).

Sharing saves the second copy of the prompt, P of the 2(P + R) tokens of a pair, but attends over
P + C + R keys through an arbitrary [B, 1, T, T] mask (no causal-kernel shortcuts; on GPUs no
flash SDPA kernel). Measured forward + backward, SmolLM2-135M shapes, CPU, fp32, sdpa, 4 pairs
(`bench/prefix_sharing.py`): 64-token prompts + 192-token responses (ratio 0.33) ran at 0.91× the
two-pass speed, 768 + 128 (ratio 6) at 1.64×. A FLOP count of the same shapes (linear layers per
token, attention per query-key pair) gives 1.64× and 1.03× for those cases: exact at ratio 6,
~12% optimistic at 0.33 (the mask's cost). With that overhead it predicts 1.05-1.07× at ratio 1
(responses of 192 or 128 tokens) and break-even near ratio 0.7; 1 is a round threshold on the
side where sharing pays. `bench/prefix_sharing.py --cases 128+128 192+96` measures the middle."""

# Per-token |Δ log p| the run-time check accepts: float rounding of a differently shaped
# forward (~1e-6 in float32; 16-bit logits of magnitude ~20 round by ~0.1). A mask the model
# ignores lets rejected tokens read the chosen response, which moves them by far more.
_CHECK_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-4}
_CHECK_TOLERANCE_16BIT = 0.1


@dataclass(frozen=True)
class PrefixSharingChoice:
    """Whether a run scores its pairs in the shared layout, and why.

    Attributes:
        enabled: Score pairs as [prompt | chosen | rejected] rows.
        reason: What decided it, for the log.
        forced: `train.prefix_sharing=true`: a failed run-time check is an error, not a fallback.
        checked: `verify_prefix_sharing` has compared it with the two-pass result.
    """

    enabled: bool
    reason: str
    forced: bool = False
    checked: bool = False

    def describe(self) -> str:
        return f"prefix sharing {'on' if self.enabled else 'off'} ({self.reason})"


def _mean_lengths(pairs: Sequence[TokenizedPair]) -> tuple[float, float]:
    """(mean prompt tokens, mean response tokens (chosen + rejected) / 2) of `pairs`."""
    n = max(len(pairs), 1)
    prompt = sum(len(p.prompt_ids) for p in pairs) / n
    response = sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs) / (2 * n)
    return prompt, response


def choose_prefix_sharing(
    setting: bool | Literal["auto"],
    model: nn.Module,
    pairs: Sequence[TokenizedPair],
    *,
    paired: bool,
    packing: bool = False,
) -> PrefixSharingChoice:
    """Resolve `train.prefix_sharing` for a model and its training pairs (static checks only).

    Args:
        setting: True (on, or ConfigError if impossible), False (off), "auto" (on where
            supported and mean prompt ≥ `AUTO_MIN_PROMPT_RATIO` × mean response tokens).
        model: The policy (a transformers causal LM or a peft model around one).
        pairs: The training pairs (their lengths decide "auto").
        paired: Whether the loss works on pairs (KTO and SFT don't: they keep the normal path).
        packing: `train.packing` asks for the shared layout: "auto" then skips the length rule.
    """
    if setting is False:
        return PrefixSharingChoice(False, "train.prefix_sharing=false")
    if not paired:
        if setting is True:
            raise ConfigError(
                "train.prefix_sharing=true applies to paired losses only; unpaired (KTO) and "
                "SFT rows have one response per prompt. Set train.prefix_sharing=auto or false"
            )
        return PrefixSharingChoice(False, "auto: not paired data (KTO/SFT)")
    ok, why = supports_shared_prefix(model)
    if not ok:
        if setting is True:
            raise ConfigError(
                f"train.prefix_sharing=true, but this model cannot share prefixes: {why}. "
                "Set train.prefix_sharing=auto (falls back by itself) or false"
            )
        return PrefixSharingChoice(False, f"auto: {why}")
    if setting is True:
        return PrefixSharingChoice(True, "train.prefix_sharing=true", forced=True)
    if packing:
        return PrefixSharingChoice(True, "auto: train.packing=true packs shared-prefix rows")
    prompt, response = _mean_lengths(pairs)
    on = prompt >= AUTO_MIN_PROMPT_RATIO * response
    relation = "≥" if on else "<"
    return PrefixSharingChoice(
        on,
        f"auto: mean prompt {prompt:.1f} tokens {relation} {AUTO_MIN_PROMPT_RATIO:g} × mean "
        f"response {response:.1f}",
    )


CHECK_PAIRS = 2
CHECK_PROMPT_TOKENS = 64
CHECK_RESPONSE_TOKENS = 32


def check_sample(pairs: Sequence[TokenizedPair]) -> list[TokenizedPair]:
    """What the run-time check scores: the first `CHECK_PAIRS` pairs, each cut to its last
    `CHECK_PROMPT_TOKENS` prompt tokens and first `CHECK_RESPONSE_TOKENS` of each response.

    Whether the attention honours the 4-D mask shows on any length; two pairs of different
    lengths also exercise the padding. On 900-token pairs the whole first batch took 30-40 s
    of setup on a 2-core CPU; this takes about a second.
    """
    return [
        replace(
            p,
            prompt_ids=p.prompt_ids[-CHECK_PROMPT_TOKENS:],
            chosen_ids=p.chosen_ids[:CHECK_RESPONSE_TOKENS],
            rejected_ids=p.rejected_ids[:CHECK_RESPONSE_TOKENS],
        )
        for p in pairs[:CHECK_PAIRS]
    ]


def verify_prefix_sharing(
    choice: PrefixSharingChoice,
    model: nn.Module,
    pairs: Sequence[TokenizedPair],
    *,
    pad_token_id: int,
    any_process: Callable[[bool], bool] = lambda failed: failed,
    scorer: nn.Module | None = None,
) -> PrefixSharingChoice:
    """Compare shared and two-pass log-probs on `pairs` (the first batch; see `check_sample`)
    before training.

    Only for an enabled, not yet checked choice; runs in eval mode (no dropout) and without
    gradient. On a mismatch beyond float rounding it raises PrefoptError for
    `train.prefix_sharing=true` and falls back to two-pass scoring (logged) for "auto".

    Args:
        any_process: Reduces "failed" across processes (all must agree on the layout).
        scorer: Score through this (possibly sharded) `SharedPrefixLogprobModel` of `model`.
    """
    if not choice.enabled or choice.checked or not pairs:
        return choice
    module = scorer if scorer is not None else model
    was_training = module.training
    module.eval()
    try:
        sample = check_sample(pairs)
        mismatch = shared_prefix_mismatch(model, sample, pad_token_id=pad_token_id, scorer=scorer)
    finally:
        module.train(was_training)
    dtype = next(model.parameters()).dtype
    tol = _CHECK_TOLERANCE.get(dtype, _CHECK_TOLERANCE_16BIT)
    if not any_process(not mismatch <= tol):  # NaN fails too
        logger.info(
            "%s; matches two-pass scoring on a sample of the first batch "
            "(max |Δ log p| %.2g per token)",
            choice.describe(), mismatch,
        )  # fmt: skip
        return replace(choice, checked=True)
    problem = (
        f"shared-prefix log-probs differ from two-pass ones by {mismatch:.3g} per token on a "
        f"sample of the first batch (tolerance {tol:g}): this model does not apply the 4-D "
        "attention mask"
    )
    if choice.forced:
        raise PrefoptError(f"train.prefix_sharing=true: {problem}. Set it to false (or auto)")
    logger.warning("%s; falling back to two-pass scoring", problem)
    return PrefixSharingChoice(False, "auto: failed the run-time check", checked=True)
