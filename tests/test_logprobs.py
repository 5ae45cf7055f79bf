"""Tests for prefopt.logprobs: hand-built logits, the chunked hidden-state path, and tiny
randomly initialised transformers models wrapped by peft LoRA (no download)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from prefopt.logprobs import (
    SequenceLogprobModel,
    average_logps,
    response_logprobs,
    sequence_logprobs,
)

Tensor = torch.Tensor

# ---------------------------------------------------------------------------------------------
# sequence_logprobs on hand-built logits
# ---------------------------------------------------------------------------------------------


def hand_batch() -> tuple[Tensor, Tensor, Tensor]:
    """V = 4, T = 3, three rows. Position t's logits predict token t+1; the last position's
    logits are never read (filled with 99 to catch an off-by-one).

    Row 0: uniform logits, ids [0, 1, 2], mask [T, T, T]. Position 0 cannot be predicted, so
        two tokens are scored, each log(1/4) = −1.3862943611: total −2.7725887222, count 2.
    Row 1: position 0 logits log([1, 2, 3, 4]) → p = [0.1, 0.2, 0.3, 0.4];
        position 1 logits log([1, 1, 1, 5]) → p = [1/8, 1/8, 1/8, 5/8].
        ids [0, 3, 0], mask [F, T, T]: log 0.4 + log(1/8) = log 0.05 = −2.9957322736, count 2.
    Row 2: fully masked (prompt only), with huge logits: 0.0 and count 0.
    """
    logits = torch.full((3, 3, 4), 99.0)  # [N, T, V]
    logits[0, :2] = 0.0
    logits[1, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0]).log()
    logits[1, 1] = torch.tensor([1.0, 1.0, 1.0, 5.0]).log()
    logits[2, :2] = torch.tensor([50.0, -50.0, 0.0, 1e4])
    input_ids = torch.tensor([[0, 1, 2], [0, 3, 0], [1, 2, 3]])
    mask = torch.tensor([[True, True, True], [False, True, True], [False, False, False]])
    return logits, input_ids, mask


HAND_LOGPS = [-2.7725887222, -2.9957322736, 0.0]


def test_sequence_logprobs_hand_values() -> None:
    logits, ids, mask = hand_batch()
    logps, counts = sequence_logprobs(logits, ids, mask)
    assert logps.dtype == torch.float32 and counts.dtype == torch.long
    torch.testing.assert_close(logps, torch.tensor(HAND_LOGPS), rtol=0, atol=1e-6)
    assert counts.tolist() == [2, 2, 0]


def test_sequence_logprobs_single_token_rows() -> None:
    """Scoring only the last token of row 1: log(1/8) = −2.0794415417."""
    logits, ids, mask = hand_batch()
    mask[1, 1] = False
    logps, counts = sequence_logprobs(logits, ids, mask)
    assert logps[1].item() == pytest.approx(-2.0794415417, abs=1e-6)
    assert counts[1].item() == 1


def test_sequence_logprobs_bf16_inputs() -> None:
    logits, ids, mask = hand_batch()
    reference, _ = sequence_logprobs(logits, ids, mask)
    logps, counts = sequence_logprobs(logits.to(torch.bfloat16), ids, mask)
    assert logps.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa: log 3 ≈ 1.0986 is stored within ~4e-3.
    torch.testing.assert_close(logps, reference, rtol=0, atol=2e-2)
    assert counts.tolist() == [2, 2, 0]


def test_long_response_mask_is_treated_as_bool() -> None:
    logits, ids, mask = hand_batch()
    logps, counts = sequence_logprobs(logits, ids, mask.long())
    torch.testing.assert_close(logps, torch.tensor(HAND_LOGPS), rtol=0, atol=1e-6)
    head = nn.Linear(4, 4)
    hidden = torch.randn(3, 3, 4)
    expected, _ = sequence_logprobs(head(hidden), ids, mask)
    logps, counts = response_logprobs(hidden, head, ids, mask.long())
    torch.testing.assert_close(logps, expected)
    assert counts.tolist() == [2, 2, 0]


def test_average_logps_hand_values() -> None:
    """The hand batch's sums over their counts: −2.7725887222 / 2 = −1.3862943611,
    −2.9957322736 / 2 = −1.4978661368, and the fully masked row 0.0 / max(0, 1) = 0.0 (not NaN).
    A float count of 4 gives −6.0 / 4 = −1.5; long and float counts agree.
    """
    logits, ids, mask = hand_batch()
    logps, counts = sequence_logprobs(logits, ids, mask)
    avg = average_logps(logps, counts)
    assert avg.dtype == torch.float32
    torch.testing.assert_close(
        avg, torch.tensor([-1.3862943611, -1.4978661368, 0.0]), rtol=0, atol=1e-6
    )
    sums = torch.tensor([-6.0, -6.0, 0.0], dtype=torch.float64)
    for n in (torch.tensor([4, 4, 0]), torch.tensor([4.0, 4.0, 0.0])):
        out = average_logps(sums, n)
        assert out.dtype == torch.float64 and out.tolist() == [-1.5, -1.5, 0.0]


def test_average_logps_zero_count_has_finite_gradient() -> None:
    """d(avg)/d(logp) = 1 / max(n, 1): 1/2 for n = 2, and 1 (not inf or NaN) for n = 0."""
    logps = torch.tensor([-3.0, 0.0], requires_grad=True)
    average_logps(logps, torch.tensor([2, 0])).sum().backward()
    assert logps.grad is not None and logps.grad.tolist() == [0.5, 1.0]


# ---------------------------------------------------------------------------------------------
# response_logprobs against the full-logits oracle
# ---------------------------------------------------------------------------------------------


def random_case(seed: int = 0) -> tuple[nn.Linear, Tensor, Tensor, Tensor]:
    """A random head (H = 8, V = 11), hidden [4, 7, 8]; row 3 is fully masked."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = nn.Linear(8, 11)
    hidden = torch.randn(4, 7, 8, generator=g, requires_grad=True)
    ids = torch.randint(0, 11, (4, 7), generator=g)
    mask = torch.rand(4, 7, generator=g) > 0.4
    mask[0, 3:] = True  # at least a few response tokens
    mask[3] = False
    return head, hidden, ids, mask


def grads(loss: Tensor, params: list[Tensor]) -> list[Tensor]:
    return list(torch.autograd.grad(loss, params))


@pytest.mark.parametrize("checkpoint_chunks", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 3, 1000])
def test_response_logprobs_equals_full_logits(chunk_size: int, checkpoint_chunks: bool) -> None:
    head, hidden, ids, mask = random_case()
    params = [hidden, head.weight, head.bias]
    expected, expected_counts = sequence_logprobs(head(hidden), ids, mask)
    logps, counts = response_logprobs(
        hidden, head, ids, mask, chunk_size=chunk_size, checkpoint_chunks=checkpoint_chunks
    )
    torch.testing.assert_close(logps, expected, rtol=0, atol=1e-5)
    assert counts.tolist() == expected_counts.tolist()
    assert logps[3].item() == 0.0

    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])  # a non-uniform upstream gradient
    got = grads((logps * weights).sum(), params)
    want = grads((expected * weights).sum(), params)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)


def test_response_logprobs_softcap() -> None:
    head, hidden, ids, mask = random_case(1)
    with torch.no_grad():
        head.weight.mul_(10)  # large logits, so the cap matters
    uncapped, _ = sequence_logprobs(head(hidden), ids, mask)
    for chunk_size in (2, 1000):
        capped = torch.tanh(head(hidden) / 2.0) * 2.0  # [N, T, V] the cap applied to full logits
        expected, _ = sequence_logprobs(capped, ids, mask)
        assert not torch.allclose(expected, uncapped, atol=1e-3)
        logps, _ = response_logprobs(hidden, head, ids, mask, chunk_size=chunk_size, softcap=2.0)
        torch.testing.assert_close(logps, expected, rtol=0, atol=1e-5)
        (got,) = grads(logps.sum(), [hidden])
        (want,) = grads(expected.sum(), [hidden])
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_response_logprobs_no_grad_and_bf16() -> None:
    head, hidden, ids, mask = random_case(2)
    with torch.no_grad():
        expected, _ = sequence_logprobs(head(hidden), ids, mask)
        logps, _ = response_logprobs(hidden, head, ids, mask, chunk_size=2)
    torch.testing.assert_close(logps, expected, rtol=0, atol=1e-5)

    head_bf16 = head.to(torch.bfloat16)
    hidden_bf16 = hidden.detach().to(torch.bfloat16)
    logps, _ = response_logprobs(hidden_bf16, head_bf16, ids, mask, chunk_size=2)
    assert logps.dtype == torch.float32
    torch.testing.assert_close(logps, expected, rtol=0, atol=5e-2)


def test_response_logprobs_without_any_response_token() -> None:
    """All rows masked: zeros, and backward still runs (zero gradients, no error)."""
    head, hidden, ids, mask = random_case(3)
    logps, counts = response_logprobs(hidden, head, ids, torch.zeros_like(mask))
    assert logps.tolist() == [0.0] * 4 and counts.tolist() == [0] * 4
    (grad,) = grads(logps.sum(), [hidden])
    assert grad.abs().sum().item() == 0.0


# ---------------------------------------------------------------------------------------------
# SequenceLogprobModel on tiny transformers models with LoRA (also on the LM head)
# ---------------------------------------------------------------------------------------------

VOCAB = 64


def tiny_llama() -> PreTrainedModel:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def tiny_qwen2() -> PreTrainedModel:
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    return Qwen2ForCausalLM(config)


def tiny_gpt2() -> PreTrainedModel:
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=16,
        n_layer=2,
        n_head=2,
        n_inner=32,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def tiny_gemma2() -> PreTrainedModel:
    """Gemma 2 soft-caps its final logits: the response path must read the cap from config."""
    config = Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        query_pre_attn_scalar=8,
        max_position_embeddings=64,
        final_logit_softcapping=0.5,
        attn_implementation="eager",
    )
    return Gemma2ForCausalLM(config)


MODELS: dict[str, tuple[Callable[[], PreTrainedModel], list[str]]] = {
    "llama": (tiny_llama, ["q_proj", "v_proj", "lm_head"]),
    "qwen2": (tiny_qwen2, ["q_proj", "v_proj", "lm_head"]),
    "gpt2": (tiny_gpt2, ["c_attn", "lm_head"]),
    "gemma2": (tiny_gemma2, ["q_proj", "v_proj", "lm_head"]),
}


def lora_model(kind: str, dtype: torch.dtype = torch.float32) -> PeftModel:
    """A tiny model of `kind` with LoRA (dropout 0) on attention and the LM head; lora_B random,
    so the adapter changes the outputs."""
    torch.manual_seed(0)
    build, targets = MODELS[kind]
    model = build().to(dtype)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    assert hasattr(peft_model.get_base_model().get_output_embeddings(), "lora_A")
    return peft_model


def lm_batch() -> tuple[Tensor, Tensor, Tensor]:
    """Three rows of length 9: row 1 right-padded by 3, row 2 without a response token."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (3, 9), generator=g)
    attention = torch.ones(3, 9, dtype=torch.long)
    attention[1, 6:] = 0
    response = torch.zeros(3, 9, dtype=torch.bool)
    response[0, 4:] = True
    response[1, 3:6] = True
    return ids, attention, response


def lora_grads(model: nn.Module, loss: Tensor) -> dict[str, Tensor]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert any("lm_head" in n for n, _ in named)
    values = torch.autograd.grad(loss, [p for _, p in named])
    return {n: g for (n, _), g in zip(named, values, strict=True)}


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("kind", list(MODELS))
def test_response_only_equals_full_logits_with_lora(kind: str) -> None:
    model = lora_model(kind)
    ids, attention, response = lm_batch()
    fast = SequenceLogprobModel(model, response_only=True, chunk_size=4)
    full = SequenceLogprobModel(model, response_only=False)
    assert fast.response_only

    logps, counts = fast(ids, attention, response)
    expected, expected_counts = full(ids, attention, response)
    torch.testing.assert_close(logps, expected, rtol=0, atol=1e-5)
    assert counts.tolist() == expected_counts.tolist() == [5, 3, 0]
    assert logps[2].item() == 0.0

    weights = torch.tensor([1.0, -0.5, 2.0])
    got = lora_grads(model, (logps * weights).sum())
    want = lora_grads(model, (expected * weights).sum())
    assert any(g.abs().sum() > 0 for n, g in want.items() if "lm_head" in n)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)

    with torch.no_grad(), model.disable_adapter():
        ref_fast, _ = fast(ids, attention, response)
        ref_full, _ = full(ids, attention, response)
    torch.testing.assert_close(ref_fast, ref_full, rtol=0, atol=1e-5)
    assert not torch.allclose(ref_fast[:2], logps[:2].detach(), atol=1e-3)  # adapter matters


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_response_only_with_bf16_base_and_fp32_adapter() -> None:
    """peft keeps adapter weights in fp32 on a bf16 base (autocast_adapter_dtype): the LoRA
    head must still run, and agree with the full-logits path."""
    model = lora_model("llama", torch.bfloat16)
    head = model.get_base_model().get_output_embeddings()
    assert head.lora_A["default"].weight.dtype == torch.float32
    ids, attention, response = lm_batch()
    logps, _ = SequenceLogprobModel(model, response_only=True)(ids, attention, response)
    expected, _ = SequenceLogprobModel(model, response_only=False)(ids, attention, response)
    assert logps.dtype == torch.float32
    torch.testing.assert_close(logps, expected, rtol=0, atol=5e-2)


def test_plain_model_and_scaled_heads() -> None:
    """Without peft the response path also matches; a head that scales logits (Cohere's
    logit_scale) falls back to full logits."""
    torch.manual_seed(0)
    model = tiny_llama()
    ids, attention, response = lm_batch()
    fast = SequenceLogprobModel(model, chunk_size=2)
    assert fast.response_only
    logps, _ = fast(ids, attention, response)
    expected, _ = SequenceLogprobModel(model, response_only=False)(ids, attention, response)
    torch.testing.assert_close(logps, expected, rtol=0, atol=1e-5)
    assert all(math.isfinite(v) for v in logps.tolist())

    model.config.logit_scale = 0.5
    assert not SequenceLogprobModel(model).response_only
