"""Tests for prefopt.prefix_sharing: the shared [prompt | chosen | rejected] layout must give the
two-pass log-probs (SequenceLogprobModel on collate_pairs) and gradients, on tiny random Llama,
Qwen2 and GPT-2 models with "sdpa" and "eager" attention, with and without LoRA."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from prefopt.collate import collate_pairs
from prefopt.logprobs import SequenceLogprobModel
from prefopt.prefix_sharing import (
    SharedPrefixBatch,
    SharedPrefixLogprobModel,
    collate_shared_prefix,
    pair_row_logps,
    shared_prefix_logps,
    shared_prefix_mismatch,
    supports_shared_prefix,
)
from prefopt.tokenize import TokenizedPair, tokenize_pairs
from toy import make_tokenizer, toy_pairs
from toy_models import make_config, make_model

Tensor = torch.Tensor
FAMILIES = ["llama", "qwen2", "gpt2"]
IMPLEMENTATIONS = ["sdpa", "eager"]
MIN = torch.finfo(torch.float32).min
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def pairs() -> list[TokenizedPair]:
    """The five toy pairs: prompts of 9-27 tokens, responses of 3-8, all lengths different."""
    out, _ = tokenize_pairs(toy_pairs(), make_tokenizer(), max_length=128)
    assert len({len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in out}) > 1
    return out


def model(family: str, impl: str) -> PreTrainedModel:
    m = make_model(family)
    m.set_attn_implementation(impl)
    assert m.config._attn_implementation == impl
    return m


def two_pass(m: nn.Module, rows: list[TokenizedPair]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The oracle: chosen and rejected rows scored separately."""
    batch = collate_pairs(rows, pad_token_id=0)
    logps, counts = SequenceLogprobModel(m, chunk_size=4)(
        batch.input_ids, batch.attention_mask, batch.response_mask
    )
    b = len(rows)
    return logps[:b], logps[b:], counts[:b], counts[b:]


def weighted(chosen: Tensor, rejected: Tensor) -> Tensor:
    """A loss with distinct upstream gradients for every log-prob."""
    w = torch.arange(1, chosen.numel() + 1, dtype=torch.float32)
    return (w * chosen).sum() - (0.5 * w.flip(0) * rejected).sum()


def param_grads(m: nn.Module, loss: Tensor) -> dict[str, Tensor]:
    named = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    values = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return {
        n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(named, values, strict=True)
    }


def assert_same_grads(got: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    """Equal within 1e-5 of each tensor's largest entry (at least 1e-5 absolute): the shared
    layout sums the prompt's gradient contributions in another order, and LoRA gradients here
    reach ~2e2, where one float32 ulp is already 1.5e-5."""
    assert got.keys() == want.keys()
    assert any(g.abs().sum() > 0 for g in want.values())
    for name, w in want.items():
        tol = 1e-5 * max(1.0, w.abs().max().item())
        torch.testing.assert_close(
            got[name], w, rtol=0, atol=tol, msg=lambda m, n=name: f"{n}: {m}"
        )


# ---------------------------------------------------------------------------------------------
# Layout, by hand
# ---------------------------------------------------------------------------------------------

HAND = [
    TokenizedPair(7, prompt_ids=(10, 11, 12), chosen_ids=(20, 21), rejected_ids=(30,)),
    TokenizedPair(9, prompt_ids=(13,), chosen_ids=(22,), rejected_ids=(31, 32)),
]


def test_collate_layout_by_hand() -> None:
    """Pair 0: prompt 3, chosen 2, rejected 1 → 6 tokens; pair 1: 1 + 1 + 2 = 4, padded by 2."""
    batch = collate_shared_prefix(HAND, pad_token_id=99)
    assert batch.input_ids.tolist() == [[10, 11, 12, 20, 21, 30], [13, 22, 31, 32, 99, 99]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 1, 2, 0, 0]]
    # (row, source, target): chosen j from P-1+j; rejected 0 from P-1, rejected j from P+C+j-1.
    assert batch.chosen_index.tolist() == [[0, 0, 1], [2, 3, 0], [20, 21, 22]]
    assert batch.rejected_index.tolist() == [[0, 1, 1], [2, 0, 2], [30, 31, 32]]
    assert batch.indices.tolist() == [7, 9]
    assert batch.num_pairs == 2 and batch.num_tokens == 10
    assert batch.pair_tokens == collate_pairs(HAND, pad_token_id=99).num_tokens == 14

    mask = batch.attention_mask_4d
    assert mask.shape == (2, 1, 6, 6) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) == {0.0, MIN}
    allowed = (mask[:, 0] == 0).int().tolist()
    assert allowed[0] == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 0, 0, 1],  # rejected: prompt and itself, not chosen
    ]
    assert allowed[1] == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],
        [1, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 0],  # pad queries attend to themselves only (no NaN row)
        [0, 0, 0, 0, 0, 1],
    ]


def test_collate_options_and_errors() -> None:
    batch = collate_shared_prefix(HAND, pad_token_id=0, dtype=torch.bfloat16, pad_to_multiple_of=8)
    assert batch.input_ids.shape == (2, 8) and batch.attention_mask_4d.shape == (2, 1, 8, 8)
    assert batch.attention_mask_4d.dtype == torch.bfloat16
    assert batch.attention_mask_4d.min().item() == torch.finfo(torch.bfloat16).min
    assert batch.num_tokens == 10
    moved = batch.to("cpu")
    assert isinstance(moved, SharedPrefixBatch) and moved is not batch
    with pytest.raises(ValueError, match="empty batch"):
        collate_shared_prefix([], pad_token_id=0)
    with pytest.raises(ValueError, match="empty prompt"):
        collate_shared_prefix([replace(HAND[0], prompt_ids=())], pad_token_id=0)


# ---------------------------------------------------------------------------------------------
# Equal to the two-pass result
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_equals_two_pass_with_gradients(family: str, impl: str) -> None:
    m, rows = model(family, impl), pairs()
    batch = collate_shared_prefix(rows, pad_token_id=0)
    chosen, rejected, chosen_n, rejected_n = shared_prefix_logps(m, batch, chunk_size=5)
    want = two_pass(m, rows)
    torch.testing.assert_close(chosen, want[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(rejected, want[1], rtol=0, atol=1e-5)
    assert chosen_n.tolist() == want[2].tolist() == [len(p.chosen_ids) for p in rows]
    assert rejected_n.tolist() == want[3].tolist() == [len(p.rejected_ids) for p in rows]
    assert chosen.dtype == torch.float32 and chosen_n.dtype == torch.long
    assert_same_grads(
        param_grads(m, weighted(chosen, rejected)), param_grads(m, weighted(*want[:2]))
    )


def test_rejected_seeing_chosen_would_be_caught() -> None:
    """The comparison is sensitive: a plain causal mask (rejected sees chosen) or running
    positions (rejected continues after chosen) changes the rejected log-probs."""
    m, rows = model("llama", "sdpa"), pairs()
    batch = collate_shared_prefix(rows, pad_token_id=0)
    _, want, _, _ = two_pass(m, rows)
    b, t = batch.input_ids.shape
    causal = torch.zeros(t, t).masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), MIN)
    running = torch.arange(t).expand(b, t).clone()
    for broken in (
        replace(batch, attention_mask_4d=causal.expand(b, 1, t, t).clone()),
        replace(batch, position_ids=running),
    ):
        with torch.no_grad():
            _, rejected, _, _ = shared_prefix_logps(m, broken)
        assert (rejected - want).abs().max() > 1e-4


def test_module_forward_fallback_and_two_pass_mode() -> None:
    """SharedPrefixLogprobModel (no grad, one chunk, and the full-logits fallback) returns
    [2B] values in PairBatch row order for either layout, so it replaces SequenceLogprobModel."""
    m, rows = model("qwen2", "sdpa"), pairs()
    shared = collate_shared_prefix(rows, pad_token_id=0)
    two_rows = collate_pairs(rows, pad_token_id=0)
    oracle = two_pass(m, rows)
    want, want_counts = torch.cat(oracle[:2]).detach(), torch.cat(oracle[2:])  # [2B] each
    with torch.no_grad():
        for scorer in (
            SharedPrefixLogprobModel(m, chunk_size=10_000),
            SharedPrefixLogprobModel(m, response_only=False),
        ):
            for batch in (shared, two_rows):
                logps, counts = pair_row_logps(scorer, batch)
                torch.testing.assert_close(logps, want, rtol=0, atol=1e-5)
                assert counts.tolist() == want_counts.tolist()
    assert shared_prefix_mismatch(m, rows, pad_token_id=0) < 1e-6
    scorer = SharedPrefixLogprobModel(m)
    with pytest.raises(TypeError, match="response_mask"):
        scorer(shared.input_ids, shared.attention_mask_4d)
    with pytest.raises(TypeError, match="position_ids"):
        scorer(
            shared.input_ids, shared.attention_mask_4d,
            chosen_index=shared.chosen_index, rejected_index=shared.rejected_index,
        )  # fmt: skip


def test_bf16_model_with_float32_mask() -> None:
    """The fp32 mask is converted to the model's dtype (SDPA requires it), results stay finite
    and close to the bf16 two-pass result."""
    m, rows = model("llama", "sdpa").to(torch.bfloat16), pairs()
    batch = collate_shared_prefix(rows, pad_token_id=0)
    with torch.no_grad():
        chosen, rejected, _, _ = shared_prefix_logps(m, batch)
        want = two_pass(m, rows)
    assert torch.isfinite(chosen).all() and torch.isfinite(rejected).all()
    torch.testing.assert_close(chosen, want[0], rtol=0.02, atol=0.5)
    torch.testing.assert_close(rejected, want[1], rtol=0.02, atol=0.5)


# ---------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------

LORA_TARGETS = {"llama": ["q_proj", "v_proj", "lm_head"], "gpt2": ["c_attn", "lm_head"]}


def lora(family: str, impl: str) -> PeftModel:
    """LoRA (dropout 0) on attention and the LM head, lora_B random so the adapter matters."""
    base = model(family, impl)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS[family])
    peft_model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    return peft_model


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", list(LORA_TARGETS))
def test_lora_and_disabled_adapter(family: str, impl: str) -> None:
    m, rows = lora(family, impl), pairs()
    assert supports_shared_prefix(m) == (True, "")
    batch = collate_shared_prefix(rows, pad_token_id=0)
    chosen, rejected, _, _ = shared_prefix_logps(m, batch, chunk_size=7)
    want = two_pass(m, rows)
    torch.testing.assert_close(chosen, want[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(rejected, want[1], rtol=0, atol=1e-5)
    got_grads = param_grads(m, weighted(chosen, rejected))
    assert any("lm_head" in n for n in got_grads) and all("lora" in n for n in got_grads)
    assert_same_grads(got_grads, param_grads(m, weighted(*want[:2])))

    with torch.no_grad(), m.disable_adapter():
        ref_chosen, ref_rejected, _, _ = shared_prefix_logps(m, batch)
        ref_want = two_pass(m, rows)
    torch.testing.assert_close(ref_chosen, ref_want[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(ref_rejected, ref_want[1], rtol=0, atol=1e-5)
    assert not torch.allclose(ref_rejected, rejected.detach(), atol=1e-3)  # the adapter matters


# ---------------------------------------------------------------------------------------------
# supports_shared_prefix
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_supported_families(family: str) -> None:
    for impl in IMPLEMENTATIONS:
        assert supports_shared_prefix(model(family, impl)) == (True, "")


def test_unsupported_attention_and_layers() -> None:
    m = make_model("llama")
    m.config._attn_implementation = "flash_attention_2"  # set directly: not installed on CPU
    ok, why = supports_shared_prefix(m)
    assert not ok and "flash_attention_2" in why
    m.config._attn_implementation = "flex_attention"
    assert not supports_shared_prefix(m)[0]

    config = make_config("qwen2")
    config.layer_types = ["full_attention", "sliding_attention"]
    ok, why = supports_shared_prefix(AutoModelForCausalLM.from_config(config))
    assert not ok and "sliding_attention" in why

    config = make_config("llama")
    config.sliding_window = 16
    ok, why = supports_shared_prefix(AutoModelForCausalLM.from_config(config))
    assert not ok and "sliding_window=16" in why

    assert supports_shared_prefix(nn.Linear(2, 2)) == (False, "Linear has no transformers config")
