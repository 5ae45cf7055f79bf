"""`train.prefix_sharing` wired into training, evaluation and the reference: the shared
[prompt | chosen | rejected] layout must train, evaluate and precompute exactly like two-pass
scoring (fp32, 1e-4), and the auto/true/false choice and its run-time check must say what they do.

The toy pairs have 14-token prompts and 8-token responses, so `auto` turns sharing on for them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from prefopt.config_io import load_config
from prefopt.errors import ConfigError, PrefoptError
from prefopt.eval_command import run_eval
from prefopt.evaluation import evaluate_dataset
from prefopt.models import freeze
from prefopt.prefix_choice import (
    PrefixSharingChoice,
    choose_prefix_sharing,
    verify_prefix_sharing,
)
from prefopt.prefix_sharing import SharedPrefixLogprobModel
from prefopt.reference import ModelReference
from prefopt.run_setup import build_run
from prefopt.tokenize import TokenizedPair, tokenize_pairs
from prefopt.trainer import TrainResult, train
from toy import make_tokenizer, toy_pairs
from toy_models import learnable_pairs, make_model, save_toy_model, train_lines, write_jsonl

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
           "rewards/accuracies", "logps/chosen", "logps/rejected", "grad_norm")  # fmt: skip
EVAL_METRICS = METRICS[:-1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prefix")
    long_responses = [
        {
            "prompt": [{"role": "user", "content": "hi"}],
            "chosen": [{"role": "assistant", "content": "the cat is good and nice . " * 4}],
            "rejected": [{"role": "assistant", "content": "the dog is bad and rude . " * 4}],
        }
        for _ in range(8)
    ]
    return {
        "model": save_toy_model(root / "model", "llama", seed=0),
        "other": save_toy_model(root / "other", "llama", seed=1),
        "train": write_jsonl(root / "train.jsonl", learnable_pairs(24, seed=0)),
        "eval": write_jsonl(root / "eval.jsonl", learnable_pairs(8, seed=1)),
        "long_responses": write_jsonl(root / "long.jsonl", long_responses),
    }


def overrides(assets: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        f"model.name_or_path={assets['model']}",
        f"data.train={assets['train']}",
        f"data.eval={assets['eval']}",
        f"output.dir={out}",
        "optim.lr=1e-3",  # Adam turns float noise on ~0 gradients into lr-sized steps
        "optim.warmup_ratio=0",
        "train.batch_size=4",
        "train.max_steps=5",
        "output.progress=false",
        *extra,
    ]


def run(assets: dict[str, Path], out: Path, *extra: str) -> TrainResult:
    return train(load_config(None, overrides(assets, out, *extra)))


def assert_same_runs(shared: Path, two_pass: Path, a: TrainResult, b: TrainResult) -> None:
    """Every logged train metric of every step, and the eval before and after, within 1e-4."""
    lines_a, lines_b = train_lines(shared), train_lines(two_pass)
    assert [r["step"] for r in lines_a] == [r["step"] for r in lines_b] == [1, 2, 3, 4, 5]
    for ra, rb in zip(lines_a, lines_b, strict=True):
        for key in METRICS:
            assert ra[key] == pytest.approx(rb[key], abs=1e-4), (ra["step"], key)
    for ev_a, ev_b in ((a.initial_eval, b.initial_eval), (a.final_eval, b.final_eval)):
        assert ev_a is not None and ev_b is not None
        for key in EVAL_METRICS:
            assert ev_a[key] == pytest.approx(ev_b[key], abs=1e-4), key
    assert a.state.tokens_seen == b.state.tokens_seen  # the prompt counts twice either way


def tokenized() -> list[TokenizedPair]:
    out, _ = tokenize_pairs(toy_pairs(), make_tokenizer(), max_length=128)
    return out


# ---------------------------------------------------------------------------------------------
# Training: the first 5 steps equal the two-pass run
# ---------------------------------------------------------------------------------------------


def test_training_equals_two_pass_for_five_steps(
    assets: dict[str, Path], tmp_path: Path, caplog, monkeypatch: pytest.MonkeyPatch
):
    import prefopt.evaluation as evaluation

    calls: list[int] = []
    real = evaluation.collate_shared_prefix

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "collate_shared_prefix", counted)
    caplog.set_level(logging.INFO, logger="prefopt")
    shared = run(assets, tmp_path / "shared", "train.prefix_sharing=true")
    assert "prefix sharing on (train.prefix_sharing=true); matches two-pass" in caplog.text
    assert len(calls) == 5 + 2 * 2  # 5 train steps, 2 eval batches before and after
    caplog.clear()
    two_pass = run(assets, tmp_path / "two", "train.prefix_sharing=false")
    assert "prefix sharing off (train.prefix_sharing=false)" in caplog.text
    assert len(calls) == 9
    assert_same_runs(tmp_path / "shared", tmp_path / "two", shared, two_pass)


def test_every_optimisation_equals_the_unoptimised_path(assets: dict[str, Path], tmp_path: Path):
    """Issue 6's correctness target: prefix sharing, packing, the response-only chunked LM head
    (chunks of 16 positions, so several per batch) and kept freed memory, all on, give the same
    first 5 steps as the plain path with all of them off (fp32, 1e-4)."""
    fast = run(assets, tmp_path / "fast", "train.prefix_sharing=true", "train.packing=true",
               "train.response_only_logits=true", "train.logit_chunk_size=16",
               "train.keep_freed_memory=true")  # fmt: skip
    plain = run(assets, tmp_path / "plain", "train.prefix_sharing=false", "train.packing=false",
                "train.response_only_logits=false", "train.keep_freed_memory=false")  # fmt: skip
    assert_same_runs(tmp_path / "fast", tmp_path / "plain", fast, plain)


def test_lora_checkpointing_accumulation_equal_two_pass(assets: dict[str, Path], tmp_path: Path):
    """LoRA (adapter-disabled reference; dropout 0, else the two layouts draw different dropout
    masks), gradient checkpointing and 2 micro-batches per step."""
    common = ("lora.enabled=true", "lora.r=8", "lora.dropout=0.0", "optim.lr=1e-2",
              "model.gradient_checkpointing=true", "train.batch_size=2",
              "train.grad_accum=2")  # fmt: skip
    shared = run(assets, tmp_path / "shared", *common, "train.prefix_sharing=true")
    two_pass = run(assets, tmp_path / "two", *common, "train.prefix_sharing=false")
    assert_same_runs(tmp_path / "shared", tmp_path / "two", shared, two_pass)
    assert shared.final_eval is not None and shared.initial_eval is not None
    assert shared.final_eval["loss"] < shared.initial_eval["loss"]  # the adapters learn


def test_precomputed_reference_per_layout(assets: dict[str, Path], tmp_path: Path):
    """The cache key names the layout (a table is what this run would compute), and the two
    layouts' tables agree within float rounding."""
    cache = tmp_path / "cache"
    common = ("reference.strategy=precompute", f"reference.cache_dir={cache}")
    tables = {}
    for flag in ("true", "false"):
        parts = build_run(load_config(None, overrides(assets, tmp_path / flag, *common,
                                                      f"train.prefix_sharing={flag}")))  # fmt: skip
        assert parts.prefix_sharing.enabled == (flag == "true")
        tables[flag] = parts.reference.table  # type: ignore[union-attr]
    assert len(list(cache.glob("*.safetensors"))) == 4  # (train, eval) × (shared, two-pass)
    assert tables["true"].keys() == tables["false"].keys()
    for key, value in tables["true"].items():
        assert value == pytest.approx(tables["false"][key], abs=1e-5), key
    shared = run(assets, tmp_path / "a", *common, "train.prefix_sharing=true")
    two_pass = run(assets, tmp_path / "b", *common, "train.prefix_sharing=false")
    assert_same_runs(tmp_path / "a", tmp_path / "b", shared, two_pass)


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def test_eval_equals_two_pass() -> None:
    """evaluate_dataset in both layouts: a separate reference model, then LoRA (random lora_B)
    against its adapter-disabled base."""
    from peft import LoraConfig, get_peft_model

    pairs = tokenized()
    loss_cfg = load_config(None, ["loss.beta=0.3"]).loss
    policy = make_model("llama", seed=0)
    reference = ModelReference(SharedPrefixLogprobModel(freeze(make_model("llama", 1))), "model")
    lora = get_peft_model(make_model("llama", seed=2), LoraConfig(r=4, lora_dropout=0.0))
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    lora_scorer = SharedPrefixLogprobModel(lora, chunk_size=3)
    cases = [
        (SharedPrefixLogprobModel(policy), reference),
        (lora_scorer, ModelReference(lora_scorer, "adapter", peft_model=lora)),
    ]
    for scorer, ref in cases:
        got, want = (
            evaluate_dataset(
                scorer,
                ref,
                pairs,
                loss_cfg,
                batch_size=2,
                pad_token_id=0,
                device="cpu",
                prefix_sharing=shared,
            )  # fmt: skip
            for shared in (True, False)
        )
        assert got.keys() == want.keys()
        assert got["rewards/margins"] != 0  # the reference differs from the policy
        for key in EVAL_METRICS:
            assert got[key] == pytest.approx(want[key], abs=1e-5), key


def test_prefopt_eval_equals_two_pass(assets: dict[str, Path]) -> None:
    """`prefopt eval` (run_eval): metrics and per-pair log-probs in both layouts."""
    results = {}
    for flag in ("true", "false"):
        cfg = load_config(None, [f"model.name_or_path={assets['model']}", "train.batch_size=3",
                                 f"data.train={assets['eval']}",
                                 f"reference.model={assets['other']}",
                                 f"train.prefix_sharing={flag}"])  # fmt: skip
        results[flag] = run_eval(cfg, str(assets["model"]))
    (metrics, rows), (want_metrics, want_rows) = results["true"], results["false"]
    for key in EVAL_METRICS:
        assert metrics[key] == pytest.approx(want_metrics[key], abs=1e-5), key
    assert len(rows) == len(want_rows) == 8
    for row, want in zip(rows, want_rows, strict=True):
        assert row.keys() == want.keys() and row["index"] == want["index"]
        for key, value in want.items():
            assert row[key] == pytest.approx(value, abs=1e-5), key


# ---------------------------------------------------------------------------------------------
# Choosing: auto / true / false, and the run-time check
# ---------------------------------------------------------------------------------------------


def pairs_of(prompt: int, chosen: int, rejected: int, n: int = 2) -> list[TokenizedPair]:
    return [
        TokenizedPair(i, tuple(range(1, prompt + 1)), (7,) * chosen, (8,) * rejected)
        for i in range(n)
    ]


def test_auto_rule() -> None:
    """On when mean prompt ≥ mean (chosen + rejected) / 2; off otherwise; off for KTO/SFT."""
    model = make_model("llama")
    on = choose_prefix_sharing("auto", model, pairs_of(10, 12, 8), paired=True)
    assert on == PrefixSharingChoice(True, on.reason) and not on.forced
    assert "mean prompt 10.0 tokens ≥ 1 × mean response 10.0" in on.reason
    off = choose_prefix_sharing("auto", model, pairs_of(9, 12, 8), paired=True)
    assert not off.enabled and "mean prompt 9.0 tokens < 1 × mean response 10.0" in off.reason
    assert off.describe().startswith("prefix sharing off (auto: ")
    assert not choose_prefix_sharing("auto", model, [], paired=False).enabled
    assert not choose_prefix_sharing(False, model, pairs_of(50, 1, 1), paired=True).enabled
    forced = choose_prefix_sharing(True, model, pairs_of(1, 50, 50), paired=True)
    assert forced.enabled and forced.forced


def test_auto_logs_its_choice_in_a_run(assets: dict[str, Path], tmp_path: Path, caplog):
    caplog.set_level(logging.INFO, logger="prefopt")
    parts = build_run(load_config(None, overrides(assets, tmp_path / "a")))
    assert parts.cfg.train.prefix_sharing == "auto" and parts.prefix_sharing.enabled
    assert parts.prefix_sharing.checked
    line = "prefix sharing on (auto: mean prompt 14.0 tokens ≥ 1 × mean response 8.0); matches"
    assert line in caplog.text
    caplog.clear()
    long_responses = f"data.train={assets['long_responses']}"
    parts = build_run(load_config(None, overrides(assets, tmp_path / "b", long_responses)))
    assert not parts.prefix_sharing.enabled
    assert "prefix sharing off (auto: mean prompt" in caplog.text
    assert caplog.text.count("prefix sharing") == 1  # one line says which and why


def test_unsupported_attention(assets: dict[str, Path]) -> None:
    """true is refused (before loading, for a known flash/flex setting; once loaded, for any
    model that can't); auto falls back with the reason."""
    with pytest.raises(ConfigError, match="4-D mask, not model.attn_implementation=flash_"):
        load_config(None, ["model.attn_implementation=flash_attention_2",
                           "train.prefix_sharing=true"])  # fmt: skip
    load_config(None, ["model.attn_implementation=flash_attention_2"])  # auto: fine
    model = make_model("llama")
    model.config._attn_implementation = "flex_attention"  # set directly: needs no kernel here
    with pytest.raises(ConfigError, match="cannot share prefixes: attn_implementation='flex_"):
        choose_prefix_sharing(True, model, pairs_of(10, 1, 1), paired=True)
    auto = choose_prefix_sharing("auto", model, pairs_of(10, 1, 1), paired=True)
    assert not auto.enabled and "flex_attention" in auto.reason


def test_unpaired_losses_refuse_true() -> None:
    with pytest.raises(ConfigError, match="paired losses only, not loss \\['kto'\\]"):
        load_config(None, ["loss.name=kto", "train.prefix_sharing=true"])
    with pytest.raises(ConfigError, match="paired losses only, not SFT"):
        load_config(None, ["data.sft=true", "loss.name=sft", "train.prefix_sharing=true"])
    with pytest.raises(ConfigError, match="paired losses only"):
        choose_prefix_sharing(True, make_model("llama"), [], paired=False)
    with pytest.raises(ConfigError, match="does not fit"):
        load_config(None, ["train.prefix_sharing=sometimes"])


def test_failed_check_falls_back_or_stops(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    """A model that ignores the mask (simulated: the comparison reports 0.5 nats per token, or
    NaN): auto falls back to two-pass scoring with a warning, true stops."""
    import prefopt.prefix_choice as choice_module

    model, pairs = make_model("llama"), tokenized()
    auto = choose_prefix_sharing("auto", model, pairs, paired=True)
    forced = choose_prefix_sharing(True, model, pairs, paired=True)
    assert auto.enabled
    passed = verify_prefix_sharing(auto, model, pairs, pad_token_id=0)
    assert passed.enabled and passed.checked
    assert verify_prefix_sharing(passed, model, [], pad_token_id=0) is passed  # checked once
    for bad in (0.5, float("nan")):
        monkeypatch.setattr(choice_module, "shared_prefix_mismatch", lambda *a, b=bad, **k: b)
        caplog.clear()
        fallback = verify_prefix_sharing(auto, model, pairs, pad_token_id=0)
        assert not fallback.enabled and fallback.checked
        assert "falling back to two-pass scoring" in caplog.text
        with pytest.raises(PrefoptError, match="does not apply the 4-D attention mask"):
            verify_prefix_sharing(forced, model, pairs, pad_token_id=0)
    assert model.training  # the check ran in eval mode and restored the mode


def test_run_time_check_scores_a_short_sample() -> None:
    """Two pairs of the batch, prompts cut to their end and responses to their start."""
    from prefopt.prefix_choice import check_sample

    long = TokenizedPair(3, tuple(range(100, 300)), tuple(range(300, 350)), tuple(range(400, 440)))
    short = TokenizedPair(4, (1, 2), (3,), (4, 5))
    sample = check_sample([long, short, long])
    assert [p.index for p in sample] == [3, 4]
    assert sample[0].prompt_ids == tuple(range(236, 300))  # the last 64: next to the responses
    assert sample[0].chosen_ids == tuple(range(300, 332))
    assert sample[0].rejected_ids == tuple(range(400, 432))
    assert sample[1] == short
