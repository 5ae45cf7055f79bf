"""`prefopt sft`: loss only on assistant tokens, learning happens, resume is exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prefopt.cli import main
from prefopt.collate import collate_examples
from prefopt.config_io import load_config
from prefopt.errors import ConfigError, DataError
from prefopt.pipeline import prepare_data
from prefopt.trainer import Interrupted, train
from toy import TOY_VOCAB, make_tokenizer
from toy_models import learnable_pairs, save_toy_model, write_jsonl


def ids(*pieces: str) -> list[int]:
    return [TOY_VOCAB.index(p) for p in pieces]


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sft")
    rows = [{"messages": r["prompt"] + r["chosen"]} for r in learnable_pairs(24)]
    return {
        "model": save_toy_model(root / "model"),
        "train": write_jsonl(root / "sft.jsonl", rows),
    }


def sft_cfg(assets: dict[str, Path], out: Path, *extra: str):
    return load_config(None, [
        f"model.name_or_path={assets['model']}", f"data.train={assets['train']}",
        f"output.dir={out}", "data.sft=true", "loss.name=sft", "optim.lr=1e-2",
        "optim.warmup_ratio=0", "train.batch_size=4", "output.progress=false", *extra,
    ])  # fmt: skip


def test_response_mask_covers_only_the_assistant_turn(assets: dict[str, Path], tmp_path: Path):
    cfg = sft_cfg(assets, tmp_path / "out")
    data = prepare_data(cfg, make_tokenizer())
    first = data.train[0]
    subject = json.loads(assets["train"].read_text().splitlines()[0])["messages"][0]["content"]
    word = subject.split()[-1]
    # <s><|im_start|>user\ntell me about the X<|im_end|>\n<|im_start|>assistant\n
    prompt = ids("<s>", "<|im_start|>", "user", "\n", "tell", "me", "about", "the", word,
                 "<|im_end|>", "\n", "<|im_start|>", "assistant", "\n")  # fmt: skip
    response = ids("the", word, "is", "good", "and", "nice", ".", "<|im_end|>")
    assert list(first.prompt_ids) == prompt and list(first.completion_ids) == response
    assert first.label is None
    batch = collate_examples([first], pad_token_id=0)
    expected = [False] * len(prompt) + [True] * len(response)
    assert batch.response_mask[0].tolist() == expected


def test_sft_loss_falls(assets: dict[str, Path], tmp_path: Path):
    result = train(sft_cfg(assets, tmp_path / "out", "data.eval_fraction=0.25", "train.epochs=3"))
    assert result.initial_eval is not None and result.final_eval is not None
    assert result.final_eval["loss"] < 0.6 * result.initial_eval["loss"]
    assert result.final_eval["perplexity"] < result.initial_eval["perplexity"]


def test_sft_resume_equals_uninterrupted(assets: dict[str, Path], tmp_path: Path):
    common = ("train.max_steps=5", "lora.enabled=true", "lora.dropout=0.1")
    train(sft_cfg(assets, tmp_path / "a", *common))
    with pytest.raises(Interrupted):
        train(sft_cfg(assets, tmp_path / "b", *common, "train.stop_after_steps=2"))
    train(sft_cfg(assets, tmp_path / "b", *common, "resume=latest"))
    a = load_file(str(tmp_path / "a/checkpoints/step-000005/trainable.safetensors"))
    b = load_file(str(tmp_path / "b/checkpoints/step-000005/trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sft_cli_and_bad_rows(assets: dict[str, Path], tmp_path: Path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    code = main(["sft", f"model.name_or_path={assets['model']}", f"data.train={bad}",
                 f"output.dir={tmp_path / 'o'}"])  # fmt: skip
    assert code == 2
    assert "row 0" in capsys.readouterr().err
    model, data, out = assets["model"], assets["train"], tmp_path / "ok"
    code = main(["sft", f"model.name_or_path={model}", f"data.train={data}", f"output.dir={out}",
                 "train.max_steps=2", "output.progress=false"])  # fmt: skip
    assert code == 0
    assert (tmp_path / "ok" / "model" / "config.json").is_file()


def test_sft_refuses_other_losses(assets: dict[str, Path], tmp_path: Path):
    with pytest.raises(ConfigError, match="sft"):
        load_config(None, ["data.sft=true", "loss.name=sigmoid"])


def test_preference_rows_train_on_chosen(assets: dict[str, Path], tmp_path: Path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", learnable_pairs(4))
    cfg = sft_cfg({**assets, "train": pairs}, tmp_path / "out")
    data = prepare_data(cfg, make_tokenizer())
    assert all(ids("good")[0] in ex.completion_ids for ex in data.train)
    missing = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "hi"}])
    with pytest.raises(DataError, match="response"):
        prepare_data(sft_cfg({**assets, "train": missing}, tmp_path / "o2"), make_tokenizer())
