"""End-to-end tests of `prefopt generate`, `prefopt judge` and `prefopt score` on tiny saved
models and training checkpoints, through `prefopt.cli.main` (no download)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefopt.cli import main
from prefopt.cli_models import load_models
from prefopt.errors import ConfigError
from prefopt.logprobs import SequenceLogprobModel
from prefopt.tokenize import tokenize_sft
from toy_models import learnable_pairs, save_toy_model, toy_train, write_jsonl

SAMPLING = ["--max-new-tokens", "8", "--num-samples", "2", "--batch-size", "2", "--quiet"]
PROMPTS = [
    {"prompt": "hello <script>alert(1)</script>"},
    {"prompt": [{"role": "user", "content": "tell me about the cat"}]},
    {"prompt": "is the sun hot ?"},
]


def _adapter(base: Path, folder: Path) -> Path:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base)
    cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    return folder


def _prefers_good(base: Path, folder: Path) -> Path:
    """The base model, fine-tuned a little to make "the cat is good ." likely after "hello"."""
    model = AutoModelForCausalLM.from_pretrained(base)
    tok = AutoTokenizer.from_pretrained(base)
    row = tokenize_sft("hello", "the cat is good .", tok, max_length=64)
    ids = torch.tensor([[*row.prompt_ids, *row.completion_ids]])
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, len(row.prompt_ids) :] = True
    scorer = SequenceLogprobModel(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(10):
        logps, _ = scorer(ids, torch.ones_like(ids), mask)
        opt.zero_grad()
        (-logps.sum()).backward()
        opt.step()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _other_vocab(folder: Path) -> Path:
    tok = AutoTokenizer.from_pretrained(folder)
    tok.add_tokens(["zebra"])
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval_assets")
    base = save_toy_model(root / "base", "llama", seed=0)
    return {
        "base": base,
        "other": save_toy_model(root / "other", "llama", seed=1),
        "qwen": save_toy_model(root / "qwen", "qwen2", seed=2),
        "other_vocab": _other_vocab(save_toy_model(root / "other_vocab", "llama", seed=3)),
        "adapter": _adapter(base, root / "adapter"),
        "good": _prefers_good(base, root / "good"),
        "prompts": write_jsonl(root / "prompts.jsonl", PROMPTS),
    }


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generate_writes_side_by_side_jsonl_and_html(assets, tmp_path: Path, capsys) -> None:
    out, page = tmp_path / "g.jsonl", tmp_path / "g.html"
    args = [
        *("generate", "--model", str(assets["base"]), "--ref", str(assets["other"])),
        *("--prompts", str(assets["prompts"]), "--output", str(out), "--html", str(page)),
    ]
    assert main(args + SAMPLING) == 0
    rows = _jsonl(out)
    assert [r["index"] for r in rows] == [0, 1, 2] and [r["seed"] for r in rows] == [0, 1, 2]
    assert rows[1]["prompt"] == PROMPTS[1]["prompt"]
    assert all(len(r["policy"]) == len(r["reference"]) == 2 for r in rows)
    html = page.read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script" not in html
    assert "3 prompts × 2 samples" in capsys.readouterr().out
    assert main(args + SAMPLING) == 0 and _jsonl(out) == rows  # same seed, same samples


def test_generate_adapter_reference_is_the_base_model(assets, tmp_path: Path) -> None:
    common = ["--prompts", str(assets["prompts"]), *SAMPLING]
    adapter_out, base_out = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    pages = tmp_path / "a.html", tmp_path / "b.html"
    assert main(["generate", "--model", str(assets["adapter"]), "--output", str(adapter_out),
                 "--html", str(pages[0]), *common]) == 0  # fmt: skip
    assert main(["generate", "--model", str(assets["base"]), "--output", str(base_out),
                 "--html", str(pages[1]), "--batch-size", "3", *common]) == 0  # fmt: skip
    assert "reference: the adapter&#x27;s base" in pages[0].read_text()
    assert "reference: none" in pages[1].read_text()
    adapter_rows, base_rows = _jsonl(adapter_out), _jsonl(base_out)
    assert [r["reference"] for r in adapter_rows] == [r["policy"] for r in base_rows]
    assert [r["policy"] for r in adapter_rows] != [r["policy"] for r in base_rows]
    assert all(r["reference"] == [] for r in base_rows)  # full model, no --ref: policy only


def test_judge_policy_vs_reference(assets, tmp_path: Path, capsys) -> None:
    report_path, samples_path = tmp_path / "w.json", tmp_path / "s.jsonl"
    args = [
        *("judge", "--model", str(assets["adapter"]), "--prompts", str(assets["prompts"])),
        *("--judge", "length", "--judge", "keyword:cat,the", "--output", str(report_path)),
        *("--samples", str(samples_path), "--html", str(tmp_path / "j.html"), *SAMPLING),
    ]
    assert main(args) == 0
    report = json.loads(report_path.read_text())
    assert set(report["judges"]) == {"length", "keyword:cat,the"}
    length = report["judges"]["length"]
    assert length["wins"] + length["ties"] + length["losses"] == 3
    assert {"rate", "ci_low", "ci_high", "rate_ties_half", "policy_mean"} <= set(length)
    assert report["kl"]["num_samples"] == 6 and report["kl"]["per_token"] is not None
    rows = _jsonl(samples_path)
    scores = rows[0]["scores"]["length"]
    assert scores["policy"] == [len(t.split()) for t in rows[0]["policy"]]
    per_prompt = [sum(r["scores"]["length"]["policy"]) / 2 for r in rows]
    assert length["policy_mean"] == pytest.approx(sum(per_prompt) / 3)
    out = capsys.readouterr().out
    assert "KL(policy ‖ reference)" in out and "95% CI" in out


def test_judge_identical_models_tie_with_zero_kl(assets, tmp_path: Path) -> None:
    report_path = tmp_path / "w.json"
    assert main(["judge", "--model", str(assets["base"]), "--ref", str(assets["base"]),
                 "--prompts", str(assets["prompts"]), "--judge", "length",
                 "--output", str(report_path), *SAMPLING]) == 0  # fmt: skip
    report = json.loads(report_path.read_text())
    assert report["judges"]["length"]["ties"] == 3 and report["judges"]["length"]["rate"] is None
    assert report["kl"]["per_token"] == 0.0 and report["kl"]["per_sequence"] == 0.0


def test_judge_ranks_several_models(assets, tmp_path: Path, capsys) -> None:
    report_path, samples_path = tmp_path / "bt.json", tmp_path / "bt.jsonl"
    models = [str(assets["base"]), str(assets["other"]), str(assets["qwen"])]
    assert main(["judge", "--models", *models, "--prompts", str(assets["prompts"]),
                 "--judge", "length", "--output", str(report_path), "--samples",
                 str(samples_path), *SAMPLING]) == 0  # fmt: skip
    report = json.loads(report_path.read_text())["judges"]["length"]
    ranking = report["ranking"]
    assert sorted(r["model"] for r in ranking) == sorted(models)
    strengths = [r["strength"] for r in ranking]
    assert strengths == sorted(strengths, reverse=True)
    assert len(report["pairwise"]) == 3
    assert set(_jsonl(samples_path)[0]["samples"]) == set(models)
    assert "Bradley–Terry ranking" in capsys.readouterr().out


def test_score_ranks_what_the_policy_made_likely(assets, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "hello", "response": "the cat is bad ."},
        {"prompt": "hello", "response": "the cat is good ."},
        {"prompt": [{"role": "user", "content": "hi"}],
         "completion": [{"role": "assistant", "content": "hello !"}]},
    ])  # fmt: skip
    out = tmp_path / "scores.jsonl"
    assert main(["score", "--model", str(assets["good"]), "--ref", str(assets["base"]),
                 "--data", str(data), "--beta", "0.5", "--output", str(out)]) == 0  # fmt: skip
    rows = _jsonl(out)
    bad, good, other = rows
    assert good["rank"] == 1 and bad["rank"] == 2 and good["candidates"] == 2
    assert good["reward"] > bad["reward"] and good["reward"] > 0
    assert good["reward"] == pytest.approx(0.5 * (good["policy_logps"] - good["ref_logps"]))
    assert good["reward_per_token"] == pytest.approx(good["reward"] / good["tokens"])
    assert other["rank"] == 1 and other["candidates"] == 1
    assert other["response"] == [{"role": "assistant", "content": "hello !"}]


def test_score_identical_policy_and_reference_gives_zero(assets, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "hello", "response": "hi !"}])
    out = tmp_path / "s.jsonl"
    for extra in ([], ["--normalize"]):
        assert main(["score", "--model", str(assets["base"]), "--ref", str(assets["base"]),
                     "--data", str(data), "--output", str(out), *extra]) == 0  # fmt: skip
        row = _jsonl(out)[0]
        assert row["reward"] == 0.0 and row["reward_per_token"] == 0.0
    # An adapter's reference is its base with the adapter off: no --ref needed.
    assert main(["score", "--model", str(assets["adapter"]), "--data", str(data),
                 "--output", str(out)]) == 0  # fmt: skip
    assert _jsonl(out)[0]["reward"] != 0.0


def test_score_normalize_ranks_by_reward_per_token(assets, tmp_path: Path) -> None:
    """A long and a short response the policy both made likelier: the long one gains more in
    total, the short one more per token, so --normalize flips their ranks."""
    short, long = "the cat is good .", " ".join(["the cat is good ."] * 3)
    data = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "hello", "response": short}, {"prompt": "hello", "response": long},
    ])  # fmt: skip
    ranked = {}
    for extra in ([], ["--normalize"]):
        out = tmp_path / f"s{len(extra)}.jsonl"
        assert main(["score", "--model", str(assets["good"]), "--ref", str(assets["base"]),
                     "--data", str(data), "--output", str(out), *extra]) == 0  # fmt: skip
        ranked[bool(extra)] = rows = _jsonl(out)
        for row in rows:
            assert row["reward_per_token"] == pytest.approx(row["reward"] / row["tokens"])
    by_total, by_token = ranked[False], ranked[True]
    assert by_total[1]["tokens"] > by_total[0]["tokens"]
    assert by_total[1]["reward"] > by_total[0]["reward"] > 0
    assert by_total[0]["reward_per_token"] > by_total[1]["reward_per_token"]
    assert [r["rank"] for r in by_total] == [2, 1]
    assert [r["rank"] for r in by_token] == [1, 2]
    # Only the ranking changes with --normalize, not the scores.
    assert [r["reward"] for r in by_token] == [r["reward"] for r in by_total]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two 2-step toy training runs, full fine-tune and LoRA, checkpointed after each step."""
    root = tmp_path_factory.mktemp("runs")
    assets = {
        "model": save_toy_model(root / "model", "llama", seed=0),
        "train": write_jsonl(root / "train.jsonl", learnable_pairs(8, seed=0)),
        "eval": write_jsonl(root / "eval.jsonl", learnable_pairs(4, seed=1)),
    }
    lora = ["lora.enabled=true", "lora.r=4", "lora.target_modules=[q_proj, v_proj]"]
    for name, extra in {"full": [], "lora": lora}.items():
        toy_train(assets, root / name, "train.max_steps=2", "output.save_every=1",
                  "output.report=false", "judge.report_samples=0", *extra)  # fmt: skip
    return {"full": root / "full", "lora": root / "lora", "start": assets["model"]}


def _steps(out: Path) -> list[str]:
    found = sorted((out / "checkpoints").glob("step-*"))
    assert [p.name for p in found] == ["step-000001", "step-000002"]
    return [str(p) for p in found]


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_judge_ranks_training_checkpoints(
    assets, runs, kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`judge --models step-1 step-2 OUTPUT/model`: checkpoints load like model folders."""
    models = [*_steps(runs[kind]), str(runs[kind] / "model")]
    report_path = tmp_path / "bt.json"
    with caplog.at_level(logging.INFO, logger="prefopt.eval_command"):
        assert main(["judge", "--models", *models, "--prompts", str(assets["prompts"]), "--judge",
                     "length", "--output", str(report_path), *SAMPLING]) == 0  # fmt: skip
    ranking = json.loads(report_path.read_text())["judges"]["length"]["ranking"]
    assert sorted(r["model"] for r in ranking) == sorted(models)
    assert f"step 1 of the training run in {runs[kind]}" in caplog.text
    assert f"step 2 of the training run in {runs[kind]}" in caplog.text


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_last_checkpoint_scores_like_the_final_model(runs, kind: str) -> None:
    """The step-2 checkpoint of a 2-step run gives the saved model's logits; step 1 does not.
    A LoRA checkpoint's reference is its starting model (adapters off), as for its model
    folder; a full fine-tune's needs --ref, as for a model folder."""
    first, last = _steps(runs[kind])
    final = str(runs[kind] / "model")
    loaded = {
        name: load_models(location, None, device="cpu", need_reference=False)
        for name, location in [("first", first), ("last", last), ("final", final)]
    }
    ids = torch.tensor([loaded["final"].tokenizer("tell me about the cat").input_ids])
    with torch.no_grad():
        logits = {name: m.policy(ids).logits for name, m in loaded.items()}
        assert torch.equal(logits["last"], logits["final"])
        assert not torch.equal(logits["first"], logits["last"])
        start = AutoModelForCausalLM.from_pretrained(runs["start"])(ids).logits
        assert not torch.equal(logits["first"], start)
        if kind == "lora":
            assert loaded["last"].adapter_reference
            with loaded["last"].as_reference() as ref:
                assert torch.equal(ref(ids).logits, start)
    if kind == "full":
        with pytest.raises(ConfigError, match="pass --ref"):
            load_models(last, None, device="cpu")


def _count_config_reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The config.yaml paths `checkpoint_run_config` parses from now on, in order."""
    import prefopt.checkpoint as checkpoint

    reads: list[Path] = []
    real = checkpoint.load_config

    def counting(path: Any, *args: Any, **kwargs: Any) -> Any:
        reads.append(Path(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "load_config", counting)
    return reads


def test_a_checkpoint_config_is_parsed_once_per_load(
    runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading a checkpoint (tokenizer, adapter check, weights) reads its config.yaml once:
    for generate/judge/score (`load_models`) and for `prefopt eval`, the reference included."""
    reads = _count_config_reads(monkeypatch)
    first, last = _steps(runs["lora"])
    load_models(last, None, device="cpu")  # the LoRA checkpoint implies its reference
    assert reads == [Path(last) / "config.yaml"]
    reads.clear()
    load_models(last, first, device="cpu")
    assert reads == [Path(last) / "config.yaml", Path(first) / "config.yaml"]
    reads.clear()
    data = write_jsonl(tmp_path / "pairs.jsonl", learnable_pairs(2, seed=4))
    argv = ["eval", "--model", last, "--ref", first, "--data", str(data)]
    assert main([*argv, "--output", str(tmp_path / "m.json")]) == 0
    assert reads == [Path(last) / "config.yaml", Path(first) / "config.yaml"]


def test_checkpoint_that_does_not_fit_its_config_is_refused(
    assets, runs, tmp_path: Path, capsys
) -> None:
    """LoRA weights under a config that says full fine-tune: refused, naming what differs."""
    ckpt = Path(shutil.copytree(_steps(runs["lora"])[-1], tmp_path / "step-000002"))
    run_cfg = yaml.safe_load((ckpt / "config.yaml").read_text())
    run_cfg["lora"]["enabled"] = False
    (ckpt / "config.yaml").write_text(yaml.safe_dump(run_cfg))
    assert main(["generate", "--model", str(ckpt), "--prompts", str(assets["prompts"]),
                 "--output", str(tmp_path / "g.jsonl"), *SAMPLING]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "does not match the model" in err and "lora_A" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["judge", "--prompts", "{prompts}", "--model", "{base}", "--judge", "length"],
         "--ref"),
        (["judge", "--prompts", "{prompts}", "--model", "{adapter}", "--judge", "nope"],
         "unknown judge 'nope'"),
        (["judge", "--prompts", "{prompts}", "--judge", "length"], "either --model"),
        (["score", "--model", "{base}", "--data", "{prompts}"], "missing column"),
        (["generate", "--model", "{base}", "--ref", "{other_vocab}", "--prompts", "{prompts}"],
         "different tokenizer"),
    ],
)  # fmt: skip
def test_errors_print_one_line(assets, tmp_path: Path, capsys, argv, message: str) -> None:
    filled = [a.format(**{k: str(v) for k, v in assets.items()}) for a in argv]
    assert main([*filled, "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "prefopt: error:" in err and message in err and "Traceback" not in err


def test_eval_judges_and_scores_pairs_in_one_report(assets, tmp_path: Path, capsys) -> None:
    """`eval --data --prompts`: preference metrics and the judge report side by side; the judge
    part equals what `prefopt judge` reports for the same seeds."""
    data = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "hello", "chosen": "the cat is good .", "rejected": "the sun ."},
        {"prompt": "is the sun hot ?", "chosen": "yes .", "rejected": "the cat"},
    ])  # fmt: skip
    common = [
        *("--model", str(assets["adapter"]), "--prompts", str(assets["prompts"])),
        *("--judge", "length", *SAMPLING),
    ]
    both, alone = tmp_path / "m.json", tmp_path / "j.json"
    assert main(["eval", "--data", str(data), "--output", str(both), *common]) == 0
    assert main(["judge", "--output", str(alone), *common]) == 0
    report = json.loads(both.read_text())
    assert report["num_pairs"] == 2 and {"loss", "rewards/accuracies"} <= set(report)
    assert report["judge"] == json.loads(alone.read_text())
    assert "policy vs reference" in capsys.readouterr().out


def test_eval_needs_data_or_prompts(assets, capsys) -> None:
    assert main(["eval", "--model", str(assets["base"])]) == 2
    assert "--data" in capsys.readouterr().err
