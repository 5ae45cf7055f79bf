"""Tests for prefopt.loss_registry: lookup, flags and combined losses."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

from prefopt import losses
from prefopt.loss_registry import (
    LOSSES,
    REFERENCE_INPUTS,
    LossParams,
    check_inputs,
    combined_loss,
    get_loss,
    missing_inputs,
)
from prefopt.losses import PairLogps


def example_logps(with_reference: bool = True, with_counts: bool = True) -> PairLogps:
    """One pair: π_c = −1.0, π_r = −3.0, ρ_c = −1.5, ρ_r = −2.0, n_c = 2, n_r = 4."""
    return PairLogps(
        policy_chosen=torch.tensor([-1.0], requires_grad=True),
        policy_rejected=torch.tensor([-3.0], requires_grad=True),
        chosen_tokens=torch.tensor([2]) if with_counts else None,
        rejected_tokens=torch.tensor([4]) if with_counts else None,
        ref_chosen=torch.tensor([-1.5]) if with_reference else None,
        ref_rejected=torch.tensor([-2.0]) if with_reference else None,
    )


def test_every_registered_name_resolves() -> None:
    assert set(LOSSES) == {"sigmoid", "robust", "hinge", "ipo", "simpo", "orpo", "sft", "kto"}
    for name, spec in LOSSES.items():
        assert get_loss(name) is spec
        assert spec.name == name
        assert spec.data in ("paired", "unpaired")
        assert set(spec.uses) <= set(LossParams.__dataclass_fields__)


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(ValueError, match="unknown loss 'dpo'") as info:
        get_loss("dpo")
    for name in LOSSES:
        assert name in str(info.value)


@pytest.mark.parametrize(
    ("name", "needs_reference"),
    [
        ("sigmoid", True),
        ("robust", True),
        ("hinge", True),
        ("ipo", True),
        ("kto", True),
        ("simpo", False),
        ("orpo", False),
        ("sft", False),
    ],
)
def test_needs_reference_flags(name: str, needs_reference: bool) -> None:
    assert get_loss(name).needs_reference is needs_reference


LOSS_FUNCTIONS = {
    "sigmoid": losses.sigmoid_loss,
    "robust": losses.robust_loss,
    "hinge": losses.hinge_loss,
    "ipo": losses.ipo_loss,
    "simpo": losses.simpo_loss,
    "orpo": losses.orpo_loss,
    "sft": losses.sft_loss,
    "kto": losses.kto_loss,
}


def test_declared_inputs_are_the_loss_functions_tensor_arguments() -> None:
    """`inputs` lists each function's positional (tensor) parameters in order; for paired
    losses they are PairLogps fields, so the registry can hand them over by name."""
    fields = {f.name for f in dataclasses.fields(PairLogps)}
    assert set(LOSS_FUNCTIONS) == set(LOSSES)
    for name, spec in LOSSES.items():
        params = inspect.signature(LOSS_FUNCTIONS[name]).parameters.values()
        positional = [p for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        assert len(positional) == len(spec.inputs), name
        if spec.data == "paired":
            assert set(spec.inputs) <= fields, name


@pytest.mark.parametrize(
    ("name", "counts"),
    [("ipo", True), ("simpo", True), ("orpo", True), ("sft", True), ("sigmoid", False)],
)
def test_token_counts_declared_where_read(name: str, counts: bool) -> None:
    declared = {"chosen_tokens", "rejected_tokens"} & set(get_loss(name).inputs)
    assert bool(declared) is counts


def test_needs_reference_follows_declared_inputs() -> None:
    for spec in LOSSES.values():
        assert spec.needs_reference is bool(REFERENCE_INPUTS & set(spec.inputs)), spec.name


@pytest.mark.parametrize("name", ["ipo", "simpo", "orpo", "sft"])
def test_missing_token_counts_are_refused_by_name(name: str) -> None:
    logps = example_logps(with_counts=False)
    assert "chosen_tokens" in missing_inputs(get_loss(name), logps)
    with pytest.raises(ValueError, match=f"'{name}' needs response token counts") as info:
        combined_loss([name], [1.0], logps, LossParams())
    assert "chosen_tokens" in str(info.value) and "SequenceLogprobModel" in str(info.value)


def test_losses_on_sums_run_without_token_counts() -> None:
    logps = example_logps(with_counts=False)
    for name in ("sigmoid", "robust", "hinge"):
        check_inputs(get_loss(name), logps)
        out = combined_loss([name], [1.0], logps, LossParams())
        assert torch.isfinite(out.losses).all(), name


def test_combined_checks_every_loss_before_computing() -> None:
    """sigmoid alone would run; with sft (which reads counts) the whole call is refused."""
    logps = example_logps(with_counts=False)
    with pytest.raises(ValueError, match=r"'sft' needs .* \(chosen_tokens\), none were given"):
        combined_loss(["sigmoid", "sft"], [1.0, 0.2], logps, LossParams())


def test_missing_reference_and_counts_are_both_named() -> None:
    logps = example_logps(with_reference=False, with_counts=False)
    with pytest.raises(ValueError) as info:
        combined_loss(["ipo"], [1.0], logps, LossParams())
    message = str(info.value)
    assert "reference log-probs (ref_chosen, ref_rejected)" in message
    assert "response token counts (chosen_tokens, rejected_tokens)" in message
    assert "reference-free loss" in message


def test_every_paired_loss_computes_through_the_registry() -> None:
    for name, spec in LOSSES.items():
        if spec.data == "unpaired":
            assert spec.compute is None, name
            continue
        assert spec.compute is not None, name
        out = spec.compute(example_logps(), LossParams())
        assert out.losses.shape == (1,) and torch.isfinite(out.losses).all(), name


def test_reference_free_losses_run_without_reference() -> None:
    for name in ("simpo", "orpo", "sft"):
        out = combined_loss([name], [1.0], example_logps(with_reference=False), LossParams())
        assert torch.isfinite(out.losses).all(), name


def test_reference_losses_refuse_missing_reference() -> None:
    with pytest.raises(ValueError, match="'ipo' needs reference"):
        combined_loss(["ipo"], [1.0], example_logps(with_reference=False), LossParams())


def test_registry_passes_params_through() -> None:
    """sigmoid with β = 0.1, ε = 0.1 (β·h = 0.15): 0.6209570478 + 0.1·0.15 = 0.6359570478.
    simpo with β = 2, γ = 1: softplus(0.5) = 0.9740769842 (see test_losses for both).
    """
    logps = example_logps()
    params = LossParams(beta=0.1, label_smoothing=0.1)
    sigmoid = combined_loss(["sigmoid"], [1.0], logps, params)
    assert sigmoid.losses.item() == pytest.approx(0.6359570478, abs=1e-6)
    simpo = combined_loss(["simpo"], [1.0], logps, LossParams(beta=2.0, simpo_gamma=1.0))
    assert simpo.losses.item() == pytest.approx(0.9740769842, abs=1e-6)


def test_combined_sigmoid_and_sft_is_the_weighted_hand_sum() -> None:
    """β = 0.1: sigmoid L = softplus(−0.15) = 0.6209570478 (rewards 0.05, −0.1);
    sft L = −(−1.0)/2 = 0.5.  1·0.6209570478 + 0.2·0.5 = 0.7209570478.
    The rewards reported are sigmoid's (sft defines none).
    """
    logps = example_logps()
    out = combined_loss(["sigmoid", "sft"], [1.0, 0.2], logps, LossParams(beta=0.1))
    assert out.losses.item() == pytest.approx(0.7209570478, abs=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(0.05)
    assert out.rejected_rewards.item() == pytest.approx(-0.1)
    assert out.losses.requires_grad and not out.chosen_rewards.requires_grad

    # The order does not matter for the rewards: sft defines none, so sigmoid's are reported.
    reordered = combined_loss(["sft", "sigmoid"], [0.2, 1.0], logps, LossParams(beta=0.1))
    torch.testing.assert_close(reordered.losses, out.losses)
    torch.testing.assert_close(reordered.chosen_rewards, out.chosen_rewards)


def test_combined_sft_alone_reports_zero_rewards() -> None:
    out = combined_loss(["sft"], [2.0], example_logps(), LossParams())
    assert out.losses.item() == pytest.approx(1.0)  # 2·0.5
    assert out.chosen_rewards.item() == 0.0 and out.rejected_rewards.item() == 0.0


def test_combined_mismatched_weights_length() -> None:
    with pytest.raises(ValueError, match="2 losses but 1 loss_weights"):
        combined_loss(["sigmoid", "sft"], [1.0], example_logps(), LossParams())


def test_combined_refuses_kto() -> None:
    with pytest.raises(ValueError, match="'kto' works on unpaired data"):
        combined_loss(["sigmoid", "kto"], [1.0, 1.0], example_logps(), LossParams())


def test_combined_refuses_empty_and_unknown() -> None:
    with pytest.raises(ValueError, match="no loss given"):
        combined_loss([], [], example_logps(), LossParams())
    with pytest.raises(ValueError, match="known losses"):
        combined_loss(["nope"], [1.0], example_logps(), LossParams())
