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


TRAIN_METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)


def _train_one_step(assets, out: Path, *overrides: str) -> dict:
    """Train one step on all of `assets['data']` (one batch); its logged train record."""
    result = train(
        load_config(
            None,
            [
                f"model.name_or_path={assets['model']}",
                f"data.train={assets['data']}",
                f"output.dir={out}",
                "train.batch_size=4",
                "train.max_steps=1",
                "output.progress=false",
                "output.report=false",
                *overrides,
            ],
        )
    )
    assert result.state.step == 1
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])


@pytest.mark.parametrize(
    "loss",
    ["sigmoid", "robust", "hinge", "ipo", "simpo", "orpo", "[sigmoid, sft]"],
)
def test_eval_equals_training_metrics_on_the_same_batch(assets, tmp_path: Path, loss: str):
    """Step 1's logged train metrics are computed before the update, on all 4 pairs."""
    reference_free = loss in ("simpo", "orpo")
    ref = [] if reference_free else [f"reference.model={assets['other']}"]
    smoothing = ["loss.label_smoothing=0.2"] if loss == "robust" else []
    logged = _train_one_step(
        assets, tmp_path / "run", f"loss.name={loss}", "loss.beta=0.3", *ref, *smoothing
    )
    argv = ["eval", "--model", str(assets["model"]), "--data", str(assets["data"])]
    argv += [] if reference_free else ["--ref", str(assets["other"])]
    argv += ["--loss", loss, "--beta", "0.3", "--output", str(tmp_path / "m.json"), *smoothing]
    assert main(argv) == 0
    evaluated = json.loads((tmp_path / "m.json").read_text())
    assert evaluated["num_pairs"] == 4
    for key in TRAIN_METRICS:
        assert evaluated[key] == pytest.approx(logged[key], abs=1e-5), key
    assert -1.0 <= evaluated["length/margin_corr"] <= 1.0
    assert ("ref_logps/chosen" in evaluated) == (not reference_free)


def _kto_rows(n: int, seed: int) -> list[dict]:
    rows = []
    for i, pair in enumerate(learnable_pairs(n, seed=seed)):
        side, label = ("chosen", True) if i % 2 == 0 else ("rejected", False)
        rows.append({"prompt": pair["prompt"], "completion": pair[side], "label": label})
    return rows


def test_kto_eval_equals_training_metrics(assets, tmp_path: Path):
    """KTO rows: the same per-example computation as training (`unpaired_step`), one batch of
    one desirable and one undesirable row. With two rows the mismatched KL pairs are the same
    whatever order training put them in."""
    data = write_jsonl(tmp_path / "kto.jsonl", _kto_rows(2, seed=5))
    logged = _train_one_step(
        {**assets, "data": data}, tmp_path / "run", "loss.name=kto", "loss.beta=0.3",
        f"reference.model={assets['other']}",
    )  # fmt: skip
    argv = ["eval", "--model", str(assets["model"]), "--ref", str(assets["other"])]
    argv += ["--data", str(data), "--loss", "kto", "--beta", "0.3", "--batch-size", "4"]
    argv += ["--output", str(tmp_path / "m.json"), "--per-pair", str(tmp_path / "rows.jsonl")]
    assert main(argv) == 0
    evaluated = json.loads((tmp_path / "m.json").read_text())
    assert evaluated["num_pairs"] == 2
    names = ["loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"]
    for key in [*names, "tokens/completion", "kl"]:
        assert evaluated[key] == pytest.approx(logged[key], abs=1e-5), key
    assert logged["kl"] != 0.0  # a different reference: the KL term is really compared
    rows = [json.loads(x) for x in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [(r["index"], r["label"]) for r in rows] == [(0, True), (1, False)]
    for r in rows:
        assert r["reward"] == pytest.approx(0.3 * (r["policy_logps"] - r["ref_logps"]), abs=1e-5)
        assert r["kl"] == pytest.approx(logged["kl"], abs=1e-5) and r["completion_tokens"] > 0
    assert evaluated["ref_logps/chosen"] == pytest.approx(rows[0]["ref_logps"], abs=1e-5)
    assert evaluated["ref_logps/rejected"] == pytest.approx(rows[1]["ref_logps"], abs=1e-5)
    assert "length/margin_corr" not in evaluated  # no pairs


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


def test_eval_reports_reference_means_and_length_correlation(assets, tmp_path: Path):
    """`ref_logps/*` are the means of the per-pair reference log-probs (the drift check's
    input); `length/margin_corr` is the per-pair r of length gap and margin."""
    from prefopt.series_stats import correlation

    argv = ["eval", "--model", str(assets["model"]), "--ref", str(assets["other"])]
    argv += ["--data", str(assets["data"]), "--output", str(tmp_path / "m.json")]
    assert main([*argv, "--per-pair", str(tmp_path / "p.jsonl")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    rows = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    for side in ("chosen", "rejected"):
        mean = sum(r[f"ref_{side}_logps"] for r in rows) / len(rows)
        assert metrics[f"ref_logps/{side}"] == pytest.approx(mean, abs=1e-5)
    gaps = [r["chosen_tokens"] - r["rejected_tokens"] for r in rows]
    margins = [r["reward_chosen"] - r["reward_rejected"] for r in rows]
    assert metrics["length/margin_corr"] == pytest.approx(correlation(gaps, margins), abs=1e-6)


def test_eval_logs_per_pair_length_bias(caplog: pytest.LogCaptureFixture):
    """`prefopt eval` hands its per-pair rows to `HealthMonitor.update_pairs`."""
    from prefopt.eval_command import _check_length_bias

    rows = [
        {"chosen_tokens": 20 + d, "rejected_tokens": 20, "reward_chosen": 0.1 * d + 0.01 * (d % 3),
         "reward_rejected": 0.0}
        for d in range(-12, 12)
    ]  # fmt: skip
    with caplog.at_level("WARNING", logger="prefopt.eval_command"):
        _check_length_bias(rows)
    assert "length_bias" in caplog.text and "24 pairs" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="prefopt.eval_command"):
        _check_length_bias([{**r, "reward_chosen": 0.0} for r in rows])
    assert caplog.text == ""


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


def test_ref_with_a_reference_free_loss_names_the_flag(assets, capsys):
    argv = ["eval", "--model", str(assets["model"]), "--data", str(assets["data"])]
    code = main([*argv, "--loss", "simpo", "--ref", str(assets["other"])])
    assert code == 2
    err = capsys.readouterr().err
    assert "--ref" in err and "simpo" in err
