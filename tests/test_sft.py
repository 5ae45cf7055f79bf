"""`prefopt sft`: loss only on assistant tokens (every assistant turn), learning happens, resume
is exact, data.columns/data.format apply, and the SFT -> DPO recipe in configs/ works end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prefopt.cli import main
from prefopt.collate import collate_examples
from prefopt.config_io import load_config
from prefopt.errors import ConfigError, DataError, TokenizationError
from prefopt.pipeline import prepare_data
from prefopt.sft import collate_sft, load_sft_rows
from prefopt.trainer import Interrupted, train
from toy import TOY_VOCAB, make_tokenizer
from toy_models import learnable_pairs, save_toy_model, train_lines, write_jsonl

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


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
    assert "== prefopt sft: done ==" in capsys.readouterr().out
    assert (out / "model" / "config.json").is_file()
    assert (out / "metrics.jsonl").is_file() and (out / "report" / "index.html").is_file()


@pytest.mark.parametrize(
    "setting", ["loss.name=sigmoid", "loss.name=[sigmoid, sft]", "data.sft=false"]
)
def test_the_sft_command_refuses_settings_it_would_replace(
    assets: dict[str, Path], tmp_path: Path, capsys, setting: str
):
    """`prefopt sft loss.name=sigmoid` must not train SFT silently: the setting is named."""
    key = setting.split("=")[0]
    code = main(["sft", f"model.name_or_path={assets['model']}", f"data.train={assets['train']}",
                 f"output.dir={tmp_path / 'o'}", setting])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert f"prefopt sft sets {key}=" in err and "the config asks for" in err
    assert not (tmp_path / "o" / "metrics.jsonl").exists()
    # Saying what the command says anyway is fine, in either spelling.
    from prefopt.config_io import load_config

    fixed = {"data.sft": True, "loss.name": "sft"}
    cfg = load_config(None, ["loss.name=[sft]", "data.sft=true"], fixed=fixed)
    assert cfg.loss.names == ["sft"] and cfg.data.sft
    # A config whose section is a plain value cannot take the imposed setting.
    with pytest.raises(ConfigError, match=r"'loss' must be a section \(a mapping\), got 'sft'"):
        load_config(None, ["loss=sft"], fixed=fixed)


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


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def prepared(tmp_path: Path, rows: list[dict], *extra: str, tokenizer=None):
    """prepare_data on `rows` with the toy chat tokenizer (or `tokenizer`)."""
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    cfg = sft_cfg({"model": Path("unused"), "train": data}, tmp_path / "out", *extra)
    return prepare_data(cfg, tokenizer or make_tokenizer())


def scored(tmp_path: Path, rows: list[dict], *extra: str, tokenizer=None) -> list[tuple[int, bool]]:
    """(token id, scored?) of the first example, as the training step sees it."""
    first = prepared(tmp_path, rows, *extra, tokenizer=tokenizer).train[0]
    batch = collate_sft([first], pad_token_id=0)
    return list(zip(batch.input_ids[0].tolist(), batch.response_mask[0].tolist(), strict=True))


def test_every_assistant_turn_is_scored_user_turns_are_not(tmp_path: Path):
    rows = [{"messages": [user("tell me about the cat"), assistant("the cat is good ."),
                          user("and the dog ?"), assistant("the dog is nice .")]}]  # fmt: skip
    # <s><|im_start|>user\ntell me about the cat<|im_end|>\n<|im_start|>assistant\n  (context)
    # the cat is good .<|im_end|>                                                  (scored)
    # \n<|im_start|>user\nand the dog ?<|im_end|>\n<|im_start|>assistant\n          (context)
    # the dog is nice .<|im_end|>                                                  (scored)
    out = ids("<s>", "<|im_start|>", "user", "\n", "tell", "me", "about", "the", "cat",
              "<|im_end|>", "\n", "<|im_start|>", "assistant", "\n")  # fmt: skip
    turn1 = ids("the", "cat", "is", "good", ".", "<|im_end|>")
    between = ids("\n", "<|im_start|>", "user", "\n", "and", "the", "dog", "?", "<|im_end|>",
                  "\n", "<|im_start|>", "assistant", "\n")  # fmt: skip
    turn2 = ids("the", "dog", "is", "nice", ".", "<|im_end|>")
    expected = [(t, False) for t in out] + [(t, True) for t in turn1]
    expected += [(t, False) for t in between] + [(t, True) for t in turn2]
    assert scored(tmp_path, rows) == expected
    # The same conversation as prompt + response columns is the same sequence.
    split = [{"prompt": rows[0]["messages"][:3], "response": rows[0]["messages"][3:]}]
    assert scored(tmp_path, split) == expected


def test_plain_text_row_scores_the_response_only(tmp_path: Path):
    rows = [{"prompt": "tell me about the cat", "response": "the cat is good ."}]
    # Through the chat template: the prompt becomes a user turn, the response the assistant's.
    prompt = ids("<s>", "<|im_start|>", "user", "\n", "tell", "me", "about", "the", "cat",
                 "<|im_end|>", "\n", "<|im_start|>", "assistant", "\n")  # fmt: skip
    response = ids("the", "cat", "is", "good", ".", "<|im_end|>")
    want = [(t, False) for t in prompt] + [(t, True) for t in response]
    assert scored(tmp_path, rows) == want
    # Without a template: the texts concatenated, EOS appended.
    plain = make_tokenizer(chat_template=False)
    want = [(t, False) for t in ids("<s>", "tell", "me", "about", "the", "cat")]
    want += [(t, True) for t in ids("the", "cat", "is", "good", ".", "</s>")]
    assert scored(tmp_path, rows, tokenizer=plain) == want


def test_multi_turn_truncation_keeps_the_mask_aligned(tmp_path: Path):
    rows = [{"messages": [user("hi"), assistant("hello ."), user("bye"), assistant("bye .")]}]
    got = scored(tmp_path, rows, "data.max_length=15")
    # <s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n = 10 prompt tokens, then 5 of
    # the rest: "hello .<|im_end|>" scored, the "\n<|im_start|>" after it not.
    kept = ids("hello", ".", "<|im_end|>", "\n", "<|im_start|>")
    assert got[10:] == list(zip(kept, [True, True, True, False, False], strict=True))
    assert prepared(tmp_path, rows, "data.max_length=15").train[0].truncated


def test_template_that_is_not_prefix_stable_is_refused(tmp_path: Path):
    tok = make_tokenizer()  # the assistant header differs between generation prompt and turn
    tok.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' }}"
        "{% if m['role'] == 'assistant' %}{{ 'bot' }}{% else %}{{ m['role'] }}{% endif %}"
        "{{ '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    rows = [{"messages": [user("hi"), assistant("hello ."), user("bye"), assistant("bye .")]}]
    with pytest.raises(TokenizationError, match="not prefix-stable") as info:
        prepared(tmp_path, rows, tokenizer=tok)
    assert "row 0" in str(info.value)
    data = prepared(tmp_path, rows * 2 + [{"prompt": "hi", "response": "hello ."}],
                    "data.on_error=skip", tokenizer=make_tokenizer())  # fmt: skip
    assert len(data.train) == 3  # the toy ChatML template is prefix-stable


def test_multi_turn_training_scores_both_turns(assets: dict[str, Path], tmp_path: Path):
    rows = [{"messages": [user(f"tell me about the {w}"), assistant(f"the {w} is good ."),
                          user("and the dog ?"), assistant("the dog is nice .")]}
            for w in ("cat", "bird", "fish", "tree")]  # fmt: skip
    data = write_jsonl(tmp_path / "mt.jsonl", rows)
    train(sft_cfg({**assets, "train": data}, tmp_path / "out", "train.max_steps=1"))
    (step,) = train_lines(tmp_path / "out")
    assert step["tokens/response"] == 12  # 6 + 6 per row, the user turns not counted


def test_columns_rename_the_prompt_and_response(tmp_path: Path):
    rows = [{"question": "tell me about the cat", "answer": "the cat is good ."}]
    response = ids("the", "cat", "is", "good", ".", "<|im_end|>")
    for column in ("chosen", "completion"):
        data = prepared(tmp_path, rows, "data.columns.prompt=question",
                        f"data.columns.{column}=answer")  # fmt: skip
        assert list(data.train[0].completion_ids) == response
    with pytest.raises(DataError, match="question"):  # the prompt column is not renamed
        prepared(tmp_path, rows, "data.columns.chosen=answer")
    # A renamed column wins over a default-named one in the same row.
    both = [{**rows[0], "response": "no ."}]
    data = prepared(tmp_path, both, "data.columns.prompt=question", "data.columns.chosen=answer")
    assert list(data.train[0].completion_ids) == response


def test_settings_that_cannot_apply_to_sft_are_refused(tmp_path: Path):
    rows = [{"prompt": "hi", "response": "hello ."}]
    for setting, match in [("data.columns.rejected=bad", "rejected"),
                           ("data.columns.label=ok", "label"),
                           ("data.format=unpaired", "unpaired"),
                           ("data.format=nonsense", "nonsense")]:  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            prepared(tmp_path, rows, setting)


def test_kto_rows_are_refused_not_imitated(tmp_path: Path):
    """prompt/completion/label rows read as prompt + completion would train on the undesirable
    completions too: the row and its label field are named instead."""
    rows = [{"prompt": "hi", "completion": "hello .", "label": True},
            {"prompt": "hi", "completion": "go away .", "label": False}]  # fmt: skip
    with pytest.raises(DataError, match=r"row 0, field 'label': .*as KTO data does"):
        prepared(tmp_path, rows)


def test_format_selects_how_rows_are_read(tmp_path: Path):
    text = [{"prompt": "hi", "response": "hello ."}]
    chat = [{"messages": [user("hi"), assistant("hello .")]}]
    assert prepared(tmp_path, text, "data.format=standard").train
    assert prepared(tmp_path, chat, "data.format=conversational").train
    with pytest.raises(DataError, match="standard"):
        prepared(tmp_path, chat, "data.format=standard")
    with pytest.raises(DataError, match="conversational"):
        prepared(tmp_path, text, "data.format=conversational")
    # A preference layout: SFT reads the pair and trains on its chosen side.
    human = "\n\nHuman: tell me about the cat\n\nAssistant: the cat is"
    hh = [{"chosen": f"{human} good .", "rejected": f"{human} bad ."}]
    data = prepared(tmp_path, hh, "data.format=hh")
    assert list(data.train[0].completion_ids) == ids("the", "cat", "is", "good", ".", "<|im_end|>")
    with pytest.raises(DataError, match="data.format=implicit_prompt or hh"):
        prepared(tmp_path, hh)


def test_sft_then_dpo_recipe(assets: dict[str, Path], tmp_path: Path):
    """configs/sft-then-dpo-*.yaml through the CLI: stage 2 starts from the merged SFT model and
    uses it as the reference, so its step-0 rewards are 0, its loss ln 2, and its chosen
    log-probs are SFT's final eval log-probs of the same responses."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", learnable_pairs(24))
    common = [f"data.train={pairs}", "optim.lr=1e-2", "output.progress=false",
              "data.max_length=64", "train.batch_size=4",
              "lora.target_modules=all-linear"]  # fmt: skip
    sft_out, dpo_out = tmp_path / "sft", tmp_path / "dpo"
    code = main(["sft", str(CONFIGS / "sft-then-dpo-1-sft.yaml"), *common,
                 f"model.name_or_path={assets['model']}", f"output.dir={sft_out}",
                 "train.max_steps=6"])  # fmt: skip
    assert code == 0
    assert (sft_out / "model" / "config.json").is_file()  # merged: a plain model folder
    assert not (sft_out / "model" / "adapter_config.json").exists()
    code = main(["train", str(CONFIGS / "sft-then-dpo-2-dpo.yaml"), *common,
                 f"model.name_or_path={sft_out / 'model'}", f"output.dir={dpo_out}",
                 "train.max_steps=1"])  # fmt: skip
    assert code == 0

    def records(out: Path, split: str) -> list[dict]:
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r.get("split") == split]

    sft_final = records(sft_out, "eval")[-1]
    dpo_start = records(dpo_out, "eval")[0]
    assert sft_final["step"] == 6 and dpo_start["step"] == 0
    assert dpo_start["rewards/chosen"] == dpo_start["rewards/rejected"] == 0.0
    assert dpo_start["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert dpo_start["logps/chosen"] == pytest.approx(sft_final["logps/response"], abs=1e-4)
    assert records(dpo_out, "train")[0]["rewards/margins"] == 0.0


def test_unreadable_jsonl_lines_are_skipped_with_on_error_skip(tmp_path: Path):
    """SFT reads with the same on_error as its rows: a line that is not JSON or not UTF-8 is
    skipped and counted (it used to stop SFT even under skip), later rows keep their index."""
    good = json.dumps({"prompt": "hi", "response": "hello ."}).encode()
    path = tmp_path / "broken.jsonl"
    path.write_bytes(b"\n".join([good, b'{"prompt": "cut', b'{"prompt": "caf\xe9"}', good]) + b"\n")
    with pytest.raises(DataError, match="row 1: invalid JSON on line 2"):
        load_sft_rows(str(path))
    rows, skipped = load_sft_rows(str(path), on_error="skip")
    assert [index for index, _, _ in rows] == [0, 3] and skipped == [1, 2]
    cfg = sft_cfg({"model": Path("unused"), "train": path}, tmp_path / "out", "data.on_error=skip")
    assert len(prepare_data(cfg, make_tokenizer()).train) == 2
