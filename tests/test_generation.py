"""Tests for prefopt.generation: seeded, batch-independent sampling on tiny random models, the
adapter-off reference, prompt encoding, and the JSONL/HTML writers (no download)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from prefopt.errors import ConfigError, DataError
from prefopt.generation import (
    Completion,
    GumbelSampler,
    PromptSamples,
    SamplingParams,
    _completion,
    _top_p_filter,
    encode_prompt,
    generate_completions,
    generate_side_by_side,
    load_prompts,
)
from prefopt.samples_output import write_html, write_samples_jsonl
from prefopt.tokenize import tokenize_sft
from toy import make_tokenizer
from toy_models import make_model, save_toy_model, write_jsonl

PROMPTS = [
    "hello",
    "what is the capital of france ?",
    (
        {"role": "system", "content": "you are kind ."},
        {"role": "user", "content": "tell me a story"},
    ),
    "is the sun hot ?",
    "say hello to the cat and the dog and the bird",
]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model():
    return make_model("llama", seed=0).eval()


def sample_ids(model, tok, params: SamplingParams, batch_size: int, prompts=PROMPTS):
    ids = [encode_prompt(tok, p) for p in prompts]
    seeds = [params.seed + i for i in range(len(prompts))]
    out = generate_completions(model, tok, ids, seeds, params, batch_size=batch_size)
    return [[c.token_ids for c in cs] for cs in out]


# ---------------------------------------------------------------------------------------------
# Prompt encoding


@pytest.mark.parametrize("bos", [True, False])
@pytest.mark.parametrize("template_adds_bos", [True, False])
def test_encode_prompt_equals_training_prompt_ids(bos: bool, template_adds_bos: bool) -> None:
    tok = make_tokenizer(bos=bos, template_adds_bos=template_adds_bos)
    for prompt in PROMPTS:
        expected = tokenize_sft(prompt, "yes .", tok, max_length=256).prompt_ids
        assert tuple(encode_prompt(tok, prompt)) == expected


def test_encode_prompt_plain_tokenizer() -> None:
    tok = make_tokenizer(chat_template=False)
    words = tok("say hello", add_special_tokens=False)["input_ids"]
    assert encode_prompt(tok, "say hello") == [2, *words]  # BOS, no template
    with pytest.raises(DataError, match="chat template"):
        encode_prompt(tok, ({"role": "user", "content": "hi"},))


# ---------------------------------------------------------------------------------------------
# Sampling


def test_sampling_is_deterministic_for_a_seed(model, tok) -> None:
    params = SamplingParams(max_new_tokens=10, num_samples=2, seed=3)
    first = sample_ids(model, tok, params, batch_size=2)
    assert first == sample_ids(model, tok, params, batch_size=2)
    other = sample_ids(model, tok, SamplingParams(max_new_tokens=10, num_samples=2, seed=4), 2)
    assert other != first
    assert all(len(s) == 2 and s[0] != s[1] for s in first)  # samples of a prompt differ


@pytest.mark.parametrize("sharpen", [1.0, 12.0])
def test_sampling_does_not_depend_on_batch_size(tok, sharpen: float) -> None:
    """Also with peaked next-token distributions (final norm scaled), where top-p cuts deep."""
    model = make_model("llama", seed=0).eval()
    with torch.no_grad():
        model.model.norm.weight.mul_(sharpen)
    params = SamplingParams(max_new_tokens=12, num_samples=2, temperature=1.0, top_p=0.9)
    alone = sample_ids(model, tok, params, batch_size=1)
    assert sample_ids(model, tok, params, batch_size=2) == alone
    assert sample_ids(model, tok, params, batch_size=len(PROMPTS)) == alone


def test_prompt_seed_is_base_seed_plus_index(model, tok) -> None:
    """Prompt 3 alone with seed 3 samples what it samples as the 4th prompt of seed 0."""
    params = SamplingParams(max_new_tokens=8)
    together = sample_ids(model, tok, params, batch_size=3)
    alone = sample_ids(model, tok, SamplingParams(max_new_tokens=8, seed=3), 1, [PROMPTS[3]])
    assert alone[0] == together[3]


def test_greedy_equals_transformers_greedy(model, tok) -> None:
    params = SamplingParams(temperature=0.0, max_new_tokens=6, num_samples=2)
    ours = sample_ids(model, tok, params, batch_size=2, prompts=["hello"])
    ids = torch.tensor([encode_prompt(tok, "hello")])
    ref = model.generate(ids, do_sample=False, max_new_tokens=6, pad_token_id=0, eos_token_id=5)
    assert ours[0][0] == ours[0][1] == tuple(ref[0, ids.shape[1] :].tolist())


def test_model_mode_is_restored(tok) -> None:
    m = make_model("llama", seed=0).train()
    sample_ids(m, tok, SamplingParams(max_new_tokens=2), 2, ["hello"])
    assert m.training


def test_top_p_filter_keeps_smallest_set_reaching_mass() -> None:
    """p = [0.5, 0.3, 0.15, 0.05] (given out of order): mass before token k is 0, 0.5, 0.8,
    0.95, so top_p 0.7 and 0.8 keep two tokens, 0.81 keeps three, 1.0 all four."""
    logits = torch.tensor([[0.15, 0.5, 0.05, 0.3]]).log()
    kept = {p: (_top_p_filter(logits, p) > float("-inf")).tolist()[0] for p in (0.7, 0.8, 0.81)}
    assert kept[0.7] == [False, True, False, True]
    assert kept[0.8] == [False, True, False, True]
    assert kept[0.81] == [True, True, False, True]
    assert torch.isfinite(_top_p_filter(logits, 0.999999)).sum() == 4
    assert (_top_p_filter(logits, 0.1) > float("-inf")).tolist()[0] == [False, True, False, False]


def test_gumbel_sampler_draws_from_the_tempered_distribution() -> None:
    """argmax(logits/T + Gumbel) is a draw from softmax(logits/T): check frequencies."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    n = 40_000
    sampler = GumbelSampler([11], n, temperature=0.5, top_p=1.0)
    picks = sampler(torch.zeros(n, 1), logits.expand(n, 4)).argmax(-1)
    freq = torch.bincount(picks, minlength=4).float() / n
    assert torch.allclose(freq, (logits / 0.5).softmax(-1), atol=0.01)


def test_completion_is_cut_after_first_eos(tok) -> None:
    hello = tok.convert_tokens_to_ids("hello")
    done = _completion([hello, 5, 0, 5], [5], tok)
    assert done == Completion("hello", (hello, 5), True)
    cut = _completion([hello, hello], [5], tok)
    assert cut.token_ids == (hello, hello) and not cut.finished


def test_sampling_params_are_checked() -> None:
    for bad in ({"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"max_new_tokens": 0},
                {"num_samples": 0}, {"seed": -1}):  # fmt: skip
        with pytest.raises(ConfigError):
            SamplingParams(**bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Policy vs reference


@pytest.fixture(scope="module")
def lora_policy(tmp_path_factory: pytest.TempPathFactory):
    """A LoRA policy whose adapter changes outputs (random B, not the zero init)."""
    base_dir = save_toy_model(tmp_path_factory.mktemp("base") / "model", "llama", seed=0)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return base_dir, get_peft_model(base, cfg).eval()


def test_adapter_off_reference_equals_base_model_samples(lora_policy, tok) -> None:
    base_dir, policy = lora_policy
    params = SamplingParams(max_new_tokens=10, num_samples=2)
    side = generate_side_by_side(policy, None, tok, PROMPTS, params, adapter_reference=True,
                                 batch_size=2)  # fmt: skip
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    expected = sample_ids(base, tok, params, batch_size=3)
    assert [[c.token_ids for c in s.reference] for s in side] == expected
    assert any(s.policy != s.reference for s in side)  # the adapter is really on for the policy
    assert all(s.seed == i and s.index == i for i, s in enumerate(side))


def test_separate_reference_and_no_reference(model, tok) -> None:
    params = SamplingParams(max_new_tokens=6)
    ref = make_model("llama", seed=1).eval()
    side = generate_side_by_side(model, ref, tok, PROMPTS[:2], params)
    assert [[c.token_ids for c in s.reference] for s in side] == sample_ids(
        ref, tok, params, 1, PROMPTS[:2]
    )
    alone = generate_side_by_side(model, None, tok, PROMPTS[:2], params)
    assert all(s.reference == [] for s in alone)
    assert [s.policy for s in alone] == [s.policy for s in side]


# ---------------------------------------------------------------------------------------------
# Files


def test_load_prompts_text_and_messages(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "hi"}, {"prompt": [{"role": "user", "content": "hey", "extra": 1}]},
    ])  # fmt: skip
    assert load_prompts(path) == ["hi", ({"role": "user", "content": "hey"},)]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "hi"}, {"question": "x"}])
    with pytest.raises(DataError, match=r"row 1.*prompt"):
        load_prompts(bad)


def test_bundled_heldout_prompts_load() -> None:
    path = Path(__file__).parents[1] / "data" / "heldout_prompts.jsonl"
    prompts = load_prompts(path)
    assert len(prompts) >= 10 and all(not isinstance(p, str) for p in prompts)


def test_jsonl_and_html_outputs_escape_text(tmp_path: Path) -> None:
    evil = "<script>alert('x')</script> & more"
    samples = [
        PromptSamples(0, evil, 0, (1,), [Completion(evil, (5,), True)],
                      [Completion("fine", (5,), False)], {"len": {"policy": [3.0],
                                                              "reference": [1.0]}}),
        PromptSamples(1, ({"role": "user", "content": "<b>hi</b>"},), 1, (1,),
                      [Completion("ok", (5,), True)]),
    ]  # fmt: skip
    write_samples_jsonl(samples, tmp_path / "s.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert rows[0] == {"index": 0, "prompt": evil, "seed": 0, "policy": [evil],
                       "reference": ["fine"], "scores": {"len": {"policy": [3.0],
                                                                  "reference": [1.0]}}}  # fmt: skip
    assert rows[1]["prompt"] == [{"role": "user", "content": "<b>hi</b>"}]
    write_html(samples, tmp_path / "s.html", title="<title>", meta=evil)
    page = (tmp_path / "s.html").read_text()
    assert "<script" not in page and "<b>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; more" in page
    assert "user: &lt;b&gt;hi&lt;/b&gt;" in page and "len 3.000" in page
