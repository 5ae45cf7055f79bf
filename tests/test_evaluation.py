"""`prefopt eval`: same numbers as training, per-pair log-probs equal a by-hand computation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefopt.cli import main
from prefopt.config_io import load_config
from prefopt.trainer import train
from toy_models import learnable_pairs, save_toy_model, write_jsonl


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    return {
        "model": save_toy_model(root / "model", seed=0),
        "other": save_toy_model(root / "other", seed=1),
        "data": write_jsonl(root / "pairs.jsonl", learnable_pairs(4, seed=3)),
    }


def test_eval_equals_training_metrics_on_the_same_batch(assets, tmp_path: Path):
    """Step 1's logged train metrics are computed before the update, on all 4 pairs."""
    result = train(
        load_config(
            None,
            [
                f"model.name_or_path={assets['model']}",
                f"reference.model={assets['other']}",
                f"data.train={assets['data']}",
                f"output.dir={tmp_path / 'run'}",
                "train.batch_size=4",
                "train.max_steps=1",
                "output.progress=false",
                "loss.beta=0.3",
            ],
        )
    )
    assert result.state.step == 1
    logged = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    code = main(
        [
            "eval",
            "--model",
            str(assets["model"]),
            "--ref",
            str(assets["other"]),
            "--data",
            str(assets["data"]),
            "--beta",
            "0.3",
            "--output",
            str(tmp_path / "m.json"),
        ]
    )
    assert code == 0
    evaluated = json.loads((tmp_path / "m.json").read_text())
    assert evaluated["num_pairs"] == 4
    for key in (
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
    ):
        assert evaluated[key] == pytest.approx(logged[key], abs=1e-5), key


def _by_hand_logp(model, tokenizer, row: dict) -> tuple[float, float]:
    """Sum of log-softmax(logits)[next token] over the response, from full logits."""
    out = []
    prompt_text = tokenizer.apply_chat_template(
        row["prompt"], tokenize=False, add_generation_prompt=True
    )
    prompt_ids = tokenizer(prompt_text, add_special_tokens=True)["input_ids"]
    for side in ("chosen", "rejected"):
        full = tokenizer.apply_chat_template(row["prompt"] + row[side], tokenize=False)
        ids = tokenizer(full, add_special_tokens=True)["input_ids"]
        ids = ids[: len(ids) - 1] if tokenizer.decode(ids[-1:]) == "\n" else ids  # trailing \n
        assert ids[: len(prompt_ids)] == prompt_ids
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        out.append(sum(logp[t - 1, ids[t]].item() for t in range(len(prompt_ids), len(ids))))
    return out[0], out[1]


def test_per_pair_logps_match_hand_computation(assets, tmp_path: Path):
    code = main(
        [
            "eval",
            "--model",
            str(assets["model"]),
            "--ref",
            str(assets["other"]),
            "--data",
            str(assets["data"]),
            "--per-pair",
            str(tmp_path / "p.jsonl"),
        ]
    )
    assert code == 0
    rows = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    data = [json.loads(x) for x in assets["data"].read_text().splitlines()]
    policy = AutoModelForCausalLM.from_pretrained(assets["model"]).eval()
    ref = AutoModelForCausalLM.from_pretrained(assets["other"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(assets["model"])
    assert [r["index"] for r in rows] == [0, 1, 2, 3]
    for row in rows:
        pc, pr = _by_hand_logp(policy, tokenizer, data[row["index"]])
        rc, rr = _by_hand_logp(ref, tokenizer, data[row["index"]])
        assert row["policy_chosen_logps"] == pytest.approx(pc, abs=1e-5)
        assert row["policy_rejected_logps"] == pytest.approx(pr, abs=1e-5)
        assert row["ref_chosen_logps"] == pytest.approx(rc, abs=1e-5)
        assert row["ref_rejected_logps"] == pytest.approx(rr, abs=1e-5)
        assert row["chosen_tokens"] > 0 and row["rejected_tokens"] > 0


def test_reference_free_loss_needs_no_ref(assets, tmp_path: Path):
    code = main(
        [
            "eval",
            "--model",
            str(assets["model"]),
            "--data",
            str(assets["data"]),
            "--loss",
            "simpo",
            "--beta",
            "2.0",
            "--output",
            str(tmp_path / "m.json"),
        ]
    )
    assert code == 0
    assert "rewards/margins" in json.loads((tmp_path / "m.json").read_text())


def test_reference_loss_without_ref_is_a_clear_error(assets, capsys):
    code = main(["eval", "--model", str(assets["model"]), "--data", str(assets["data"])])
    assert code == 2
    assert "--ref" in capsys.readouterr().err
