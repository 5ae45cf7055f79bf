"""The reference model π_ref behind one interface, five strategies.

* copy       a frozen copy of the starting policy (full fine-tune default)
* model      a separate frozen checkpoint (e.g. the SFT model when the policy starts elsewhere)
* adapter    the policy's own weights with LoRA adapters disabled (LoRA default; no second copy)
* precompute reference log-probs computed once before training, cached on disk by fingerprint
* none       no reference (reference-free losses)

Every strategy answers `row_logps(rows, keys)`: the summed response log-prob of each row of a
batch under π_ref. `keys` name the rows ((dataset position, "chosen"|"rejected")) so the
precomputed strategy can look them up without a forward pass. A batch of pairs may come in
either layout (`PairBatch`, or `SharedPrefixBatch` with prefix sharing); both give [2B] values,
chosen rows first.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Callable, Hashable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from prefopt.errors import PrefoptError
from prefopt.prefix_sharing import SharedPrefixBatch, TwoPassRows, pair_row_logps

logger = logging.getLogger(__name__)
Tensor = torch.Tensor


Rows = TwoPassRows | SharedPrefixBatch
"""Rows to score: one sequence per row, or pairs in the shared-prefix layout."""


class Reference(Protocol):
    strategy: str
    equals_initial_policy: bool
    """True when π_ref should equal the starting policy exactly (checked at step 0)."""

    def row_logps(self, rows: Rows, keys: Sequence[Hashable]) -> Tensor:
        """[R] float32 summed reference log-prob of each row."""
        ...


class ModelReference:
    """π_ref computed by a forward pass: a frozen model, or the policy with adapters off.

    Args:
        scorer: A `SequenceLogprobModel` (or anything with its forward signature).
        strategy: "copy", "model" or "adapter".
        peft_model: For "adapter": the peft model whose adapters are disabled during the pass.
        offload: Keep the scorer on CPU and move it to the batch's device for each forward only
            (frees its accelerator memory between forwards, at the cost of copying all its
            weights there and back on every call).
        autocast: Context factory every forward runs under. Under mixed precision it must be
            the one the policy runs under (`Accelerator.autocast`): the reference's scores are
            compared with the policy's, and bf16 against fp32 arithmetic alone would show as a
            reward of ±0.1 at step 0.
    """

    def __init__(
        self,
        scorer: nn.Module,
        strategy: str,
        peft_model: nn.Module | None = None,
        *,
        offload: bool = False,
        autocast: Callable[[], contextlib.AbstractContextManager[object]] = contextlib.nullcontext,
    ):
        self.scorer = scorer
        self.strategy = strategy
        self.peft_model = peft_model
        self.offload = offload
        self.autocast = autocast
        self.equals_initial_policy = strategy in ("copy", "adapter")

    @contextlib.contextmanager
    def _mode(self) -> Iterator[None]:
        """Eval mode (no dropout) and, for "adapter", adapters off; restored afterwards."""
        was_training = self.scorer.training
        self.scorer.eval()
        try:
            if self.peft_model is not None:
                with self.peft_model.disable_adapter():  # type: ignore[operator]
                    yield
            else:
                yield
        finally:
            self.scorer.train(was_training)

    @contextlib.contextmanager
    def _placed(self, device: torch.device) -> Iterator[None]:
        """With `offload`: the scorer on `device` for the duration of one forward, then CPU."""
        if not self.offload:
            yield
            return
        self.scorer.to(device)
        try:
            yield
        finally:
            self.scorer.to("cpu")

    @torch.no_grad()
    def row_logps(self, rows: Rows, keys: Sequence[Hashable] = ()) -> Tensor:
        with self._mode(), self._placed(rows.input_ids.device), self.autocast():
            logps, _ = pair_row_logps(self.scorer, rows)  # [R]
        return logps.detach()


class PrecomputedReference:
    """π_ref log-probs looked up from a table computed once before training.

    Args:
        table: key -> log-prob.
        equals_initial_policy: Whether the table was computed with the starting policy.
    """

    strategy = "precompute"

    def __init__(self, table: dict[Hashable, float], equals_initial_policy: bool):
        self.table = table
        self.equals_initial_policy = equals_initial_policy

    def row_logps(self, rows: Rows, keys: Sequence[Hashable]) -> Tensor:
        try:
            values = [self.table[k] for k in keys]
        except KeyError as exc:
            raise PrefoptError(f"no precomputed reference log-prob for row {exc}") from None
        return torch.tensor(values, dtype=torch.float32, device=rows.input_ids.device)


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over every parameter's bytes and dtype: identical weights, identical key."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:24]


def rows_fingerprint(rows: Sequence[Sequence[int]], extra: str = "") -> str:
    """SHA-256 over tokenized rows (so data, template and truncation all enter the key)."""
    digest = hashlib.sha256(extra.encode())
    for ids in rows:
        digest.update(len(ids).to_bytes(4, "little"))
        digest.update(torch.tensor(list(ids), dtype=torch.int64).numpy().tobytes())
    return digest.hexdigest()[:24]


def load_or_compute_table(
    cache_file: Path,
    keys: Sequence[Hashable],
    compute: Callable[[], Tensor],
) -> dict[Hashable, float]:
    """Load a cached log-prob table, or compute it with `compute()` -> [len(keys)] and cache it.

    The file is written to a temporary name and renamed, so a crash never leaves a torn cache.
    """
    if cache_file.is_file():
        values = load_file(str(cache_file))["logps"]
        if values.shape[0] == len(keys):
            logger.info("reference log-probs: reusing cache %s", cache_file)
            return dict(zip(keys, values.tolist(), strict=True))
        logger.warning("reference cache %s has the wrong size; recomputing", cache_file)
    values = compute()  # [K] float32
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    # One temporary name per process: under torchrun every process computes the same table, and
    # a shared name let one process rename the file while another was still writing it.
    tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
    save_file({"logps": values.contiguous().cpu()}, str(tmp))
    tmp.replace(cache_file)
    logger.info("reference log-probs: computed %d rows, cached in %s", len(keys), cache_file)
    return dict(zip(keys, values.tolist(), strict=True))


def _low_precision(model: nn.Module, device: torch.device) -> bool:
    """Whether `model` computes in 16 bits here: 16-bit weights, or autocast active. (Its
    log-probs are float32 either way, so their dtype says nothing.)"""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return bool(dtypes - {torch.float32}) or torch.is_autocast_enabled(device.type)


@torch.no_grad()
def check_reference(
    policy_scorer: nn.Module,
    reference: Reference,
    rows: TwoPassRows,
    keys: Sequence[Hashable],
    *,
    loss_names: Sequence[str] = (),
) -> float:
    """Compare π_ref with the starting policy on one batch; returns max |Δ log π|.

    Args:
        loss_names: The run's losses; the log line names the starting loss ln 2 only for
            DPO's sigmoid loss alone (other losses, or sums with them, start elsewhere).

    Raises:
        PrefoptError: The reference should equal the starting policy but does not (a wrong
            reference silently biases every reward).
    """
    was_training = policy_scorer.training
    policy_scorer.eval()
    try:
        policy, _ = policy_scorer(rows.input_ids, rows.attention_mask, rows.response_mask)
    finally:
        policy_scorer.train(was_training)
    ref = reference.row_logps(rows, keys)
    diff = (policy.float() - ref.float()).abs().max().item()
    scale = max(1.0, policy.abs().max().item())
    tol = (2e-2 if _low_precision(policy_scorer, rows.input_ids.device) else 1e-4) * scale
    if reference.equals_initial_policy:
        if diff > tol:
            raise PrefoptError(
                f"reference ({reference.strategy}) differs from the starting policy by "
                f"{diff:.3g} nats (tolerance {tol:.3g}): the rewards would be biased from step 0"
            )
        # Equal log-probs make every implicit reward 0: -log σ(0) = ln 2 for the sigmoid loss.
        start = (
            "; DPO's sigmoid loss starts at ln 2 = 0.6931"
            if list(loss_names) == ["sigmoid"]
            else ""
        )
        logger.info(
            "step 0 check: reference (%s) equals the starting policy (max |Δ log π| = %.2g)%s",
            reference.strategy,
            diff,
            start,
        )
    else:
        logger.info(
            "step 0: reference (%s) differs from the starting policy by up to %.3g nats "
            "(expected: it is a different model)",
            reference.strategy,
            diff,
        )
    return diff
