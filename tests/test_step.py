"""Tests for prefopt.step: KTO's batch KL estimate inside `unpaired_step`.

Most tests use a policy whose log-prob is w·(number of completion tokens) and a reference that
scores every row 0, so the KL estimate and its gradient can be written down by hand. Three
examples share the prompt [2, 30]; their completions have 1, 2 and 4 tokens, labels
[desirable, undesirable, desirable]. The KL rows pair prompt i with completion (i + 1) % 3,
so their completions have 2, 4 and 1 tokens: KL̂ = w·(2 + 4 + 1)/3 = 7w/3.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Hashable, Sequence

import pytest
import torch
from torch import nn

from prefopt.collate import ExampleBatch, collate_examples
from prefopt.logprobs import SequenceLogprobModel
from prefopt.loss_registry import LossParams
from prefopt.reference import ModelReference, Rows
from prefopt.step import _warn_no_kl_rows, kl_estimate, unpaired_step
from prefopt.tokenized import TokenizedExample
from toy_models import make_model

Tensor = torch.Tensor

EXAMPLES = [
    TokenizedExample(0, (2, 30), (5,), label=True),
    TokenizedExample(1, (2, 30), (7, 5), label=False),
    TokenizedExample(2, (2, 30), (32, 174, 7, 5), label=True),
]


class CountScaledPolicy(nn.Module):
    """log π(y|x) = w·|y|; records whether autograd was on at each call."""

    def __init__(self, w: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))
        self.grad_enabled: list[bool] = []

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        self.grad_enabled.append(torch.is_grad_enabled())
        counts = response_mask.sum(-1)  # [N]
        return self.w * counts.float(), counts


class ZeroReference:
    """log π_ref = 0 for every row."""

    strategy = "test"
    equals_initial_policy = False

    def row_logps(self, rows: Rows, keys: Sequence[Hashable]) -> Tensor:
        return torch.zeros(rows.input_ids.shape[0])


class CountReference:
    """log π_ref = −|y| for every row (completion and KL rows alike)."""

    strategy = "test"
    equals_initial_policy = False

    def row_logps(self, rows: Rows, keys: Sequence[Hashable]) -> Tensor:
        return -rows.response_mask.sum(-1).float()


def batch_of(examples: list[TokenizedExample]) -> ExampleBatch:
    return collate_examples(examples, pad_token_id=0, with_kl=True)


def test_policy_equal_to_reference_gives_zero_kl_and_half_losses() -> None:
    """π = π_ref (a tiny Llama and its copy): every log-ratio and the KL estimate are 0, so
    z₀ = 0 and each loss is λ·(1 − σ(0)) = λ/2: 0.5 (desirable, λ_D = 1), 1.0 (undesirable,
    λ_U = 2), 0.5."""
    model = make_model("llama")
    policy = SequenceLogprobModel(model)
    reference = ModelReference(SequenceLogprobModel(copy.deepcopy(model)), "copy")
    params = LossParams(beta=0.1, kto_desirable_weight=1.0, kto_undesirable_weight=2.0)
    out = unpaired_step(policy, reference, batch_of(EXAMPLES), [0, 1, 2], params)
    torch.testing.assert_close(out.metrics["kl"], torch.zeros(3), rtol=0, atol=1e-6)
    torch.testing.assert_close(out.losses, torch.tensor([0.5, 1.0, 0.5]), rtol=0, atol=1e-6)


def test_unpaired_step_carries_its_examples_reference_logps() -> None:
    """Evaluation's `ref_logps/*` come from the step's output: the examples' own rows
    (|y| = 1, 2, 4), not the mismatched KL rows (2, 4, 1)."""
    params = LossParams(1.0)
    out = unpaired_step(
        CountScaledPolicy(0.5), CountReference(), batch_of(EXAMPLES), [0, 1, 2], params
    )
    assert out.ref_logps is not None and out.ref_logps.tolist() == [-1.0, -2.0, -4.0]


def test_kl_estimate_is_the_mean_over_mismatched_rows() -> None:
    """w = 0.5: KL̂ = 7·0.5/3 = 7/6."""
    kl = kl_estimate(CountScaledPolicy(0.5), ZeroReference(), batch_of(EXAMPLES), [0, 1, 2])
    assert kl.item() == pytest.approx(7 / 6)
    assert not kl.requires_grad


def test_kl_term_passes_no_gradient() -> None:
    """β = 1, w = 0.5: log-ratios r = 0.5·[1, 2, 4] = [0.5, 1, 2], z₀ = 7/6.
        desirable    1 − σ(0.5 − 7/6)  = 0.6607563688
        undesirable  1 − σ(7/6 − 1.0)  = 0.4584295168
        desirable    1 − σ(2.0 − 7/6)  = 0.3029407160
    With z₀ a constant, dΣL/dw = Σ ±σ'(·)·|y_i| = −0.5722841545. Were z₀ = 7w/3 differentiated,
    each |y_i| would become |y_i| − 7/3 and the gradient −0.1358268428.
    The KL rows are scored with autograd off (the second policy call).
    """
    policy = CountScaledPolicy(0.5)
    out = unpaired_step(policy, ZeroReference(), batch_of(EXAMPLES), [0, 1, 2], LossParams(1.0))
    torch.testing.assert_close(
        out.losses, torch.tensor([0.6607563688, 0.4584295168, 0.3029407160]), rtol=0, atol=1e-6
    )
    assert out.metrics["kl"].tolist() == pytest.approx([7 / 6] * 3)
    assert not out.metrics["kl"].requires_grad
    out.losses.sum().backward()
    assert policy.w.grad is not None
    assert policy.w.grad.item() == pytest.approx(-0.5722841545, abs=1e-6)
    assert policy.grad_enabled == [True, False]


def test_single_example_has_no_kl_rows_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    """N = 1: no mismatched pair exists, so KL̂ = 0 (z₀ = 0): the loss is 1 − σ(β·r) with
    r = 0.5·1, β = 1: 1 − σ(0.5) = 0.3775406688. The warning comes once, not every step."""
    _warn_no_kl_rows.cache_clear()
    single = batch_of(EXAMPLES[:1])
    assert single.kl_input_ids is None
    with caplog.at_level(logging.WARNING, logger="prefopt.step"):
        for _ in range(2):
            out = unpaired_step(
                CountScaledPolicy(0.5), ZeroReference(), single, [0], LossParams(1.0)
            )
            assert out.metrics["kl"].tolist() == [0.0]
            assert out.losses.item() == pytest.approx(0.3775406688)
    warnings = [r for r in caplog.records if "no mismatched" in r.getMessage()]
    assert len(warnings) == 1


def test_single_example_still_joins_the_cross_process_mean() -> None:
    """This process has no KL rows; another has 2 rows summing to 3. The reduction is still
    called (a collective every process must enter), and the estimate is the other process's
    mean 3/2, not that halved by a 0 from this one: (0 + 3)/2 over (0 + 2)/2 = 1.5."""
    other = torch.tensor([3.0, 2.0])  # [Σ(π − ρ), rows] on the other process
    calls: list[Tensor] = []

    def reduce_mean(t: Tensor) -> Tensor:
        calls.append(t)
        return (t + other) / 2

    kl = kl_estimate(
        CountScaledPolicy(0.5), ZeroReference(), batch_of(EXAMPLES[:1]), [0], reduce_mean
    )
    assert len(calls) == 1 and calls[0].tolist() == [0.0, 0.0]
    assert kl.item() == pytest.approx(1.5)
