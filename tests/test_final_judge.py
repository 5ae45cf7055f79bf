"""`judge.prompts`: after training, the saved model is judged against its reference on held-out
prompts, and the win rate, KL and samples land in judge.json, samples.jsonl and the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prefopt.config_io import load_config
from prefopt.errors import ConfigError, DataError
from prefopt.trainer import train
from toy_models import SUBJECTS, learnable_pairs, save_toy_model, write_jsonl


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("judge_assets")
    prompts = [{"prompt": [{"role": "user", "content": f"tell me about the {s}"}]}
               for s in SUBJECTS[:6]]  # fmt: skip
    return {
        "model": save_toy_model(root / "model", "llama", seed=0),
        "train": write_jsonl(root / "train.jsonl", learnable_pairs(24, seed=0)),
        "prompts": write_jsonl(root / "prompts.jsonl", prompts),
    }


def _config(assets: dict[str, Path], out: Path, *extra: str):
    return load_config(None, [
        f"model.name_or_path={assets['model']}", f"data.train={assets['train']}",
        f"output.dir={out}", "optim.lr=1e-2", "optim.warmup_ratio=0", "train.batch_size=4",
        "train.epochs=8", "output.progress=false", "loss.name=[sigmoid, sft]",
        f"judge.prompts={assets['prompts']}", "judge.judges=[keyword:good, length]",
        "judge.temperature=0", "judge.max_new_tokens=8", *extra,
    ])  # fmt: skip


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_trained_policy_wins_on_the_rewarded_word(assets, tmp_path: Path, lora: bool) -> None:
    """Chosen responses say "good"; a policy trained on them (DPO + NLL) says it more often than
    its reference, and the judge report says so."""
    extra = ["lora.enabled=true", "lora.r=8", "optim.lr=3e-2"] if lora else []
    result = train(_config(assets, tmp_path / "out", *extra))
    out = tmp_path / "out"
    report = json.loads((out / "judge.json").read_text())
    assert result.judge is not None and result.judge["judges"] == report["judges"]
    assert report["reference"] == ("adapter disabled" if lora else str(assets["model"]))
    good = report["judges"]["keyword:good"]
    assert good["wins"] + good["ties"] + good["losses"] == 6
    assert good["wins"] > good["losses"] and good["policy_mean"] > good["reference_mean"]
    assert report["kl"]["num_samples"] == 6
    if not lora:  # greedy samples of a barely-sharpened LoRA policy can read ~0 or below
        assert report["kl"]["per_token"] > 0  # the policy moved away from its reference
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and set(rows[0]["scores"]) == {"keyword:good", "length"}
    page = (out / "report" / "index.html").read_text()
    assert "Policy vs reference, judged" in page and "keyword:good" in page
    assert "tell me about the" in page  # the samples table


@pytest.mark.parametrize(
    ("override", "error", "message"),
    [
        ("judge.judges=[sentiment]", ConfigError, "sentiment"),
        ("judge.judges=[reward-model:/no/such/rm]", ConfigError, "/no/such/rm"),
        ("judge.top_p=0", ConfigError, "judge.top_p"),
    ],
)
def test_bad_judge_settings_fail_before_training(
    assets, tmp_path: Path, override: str, error: type, message: str
) -> None:
    with pytest.raises(error, match=message):
        train(_config(assets, tmp_path / "out", override))
    assert not (tmp_path / "out").exists()  # nothing started


def test_missing_prompts_file_fails_before_training(assets, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.jsonl"):
        train(_config(assets, tmp_path / "out", f"judge.prompts={tmp_path / 'nope.jsonl'}"))
    assert not (tmp_path / "out").exists()
