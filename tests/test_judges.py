"""Tests for prefopt.judges: each built-in on crafted text, user callables, a tiny reward
model, and the errors a user sees."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from prefopt.errors import ConfigError, PrefoptError
from prefopt.generation import Completion, PromptSamples
from prefopt.judges import (
    FunctionJudge,
    Judge,
    RewardModelJudge,
    _positive_label,
    judge_samples,
    make_judge,
    prompt_text,
)
from toy import make_tokenizer

MESSAGES = (
    {"role": "system", "content": "be kind"},
    {"role": "user", "content": "first"},
    {"role": "assistant", "content": "ok"},
    {"role": "user", "content": "second question"},
)


def test_vader_scores_positive_above_negative() -> None:
    pytest.importorskip("vaderSentiment")
    judge = make_judge("vader")
    good = judge("how are you?", "I love this, it is wonderful and great!")
    bad = judge("how are you?", "I hate this, it is terrible and awful.")
    assert -1 <= bad < 0 < good <= 1
    assert isinstance(judge, Judge) and judge.name == "vader"


def test_vader_missing_gives_pip_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vaderSentiment", None)
    monkeypatch.setitem(sys.modules, "vaderSentiment.vaderSentiment", None)
    with pytest.raises(PrefoptError, match="pip install vaderSentiment"):
        make_judge("vader")


def test_length_counts_words() -> None:
    assert make_judge("length")("p", "one two  three\nfour") == 4.0
    assert make_judge("length:neg")("p", "one two") == -2.0
    assert make_judge("length")("p", "") == 0.0
    with pytest.raises(ConfigError, match="length:neg"):
        make_judge("length:chars")


def test_regex_counts_matches() -> None:
    judge = make_judge(r"regex:\d+")
    assert judge("p", "1 apple, 22 pears and 333") == 3.0
    assert judge("p", "none") == 0.0
    assert make_judge("regex:(?i)yes")("p", "Yes yes YES no") == 3.0
    with pytest.raises(ConfigError, match="invalid pattern"):
        make_judge("regex:(unclosed")


def test_keyword_counts_whole_words_case_insensitive() -> None:
    judge = make_judge("keyword:thanks,please")
    assert judge("p", "Thanks! PLEASE, thanks-giving; thanksgiving pleased") == 3.0
    assert make_judge("keyword:c++")("p", "I like C++ and c++.") == 2.0
    with pytest.raises(ConfigError, match="needs words"):
        make_judge("keyword:, ,")


def test_module_function_judge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_judges.py").write_text(
        "def polite(prompt, response):\n"
        "    return float(response.count('please')) + len(prompt) / 100\n"
        "def broken(prompt, response):\n"
        "    return 'high'\n"
        "def infinite(prompt, response):\n"
        "    return float('inf')\n"
        "class Holder:\n"
        "    @staticmethod\n"
        "    def score(prompt, response):\n"
        "        return 7\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    judge = make_judge("my_judges:polite")
    assert judge("abcd", "please, please") == pytest.approx(2.04)
    # A message prompt reaches the function as its last user turn.
    assert judge(MESSAGES, "") == pytest.approx(len("second question") / 100)
    assert judge.score_batch(["", "ab"], ["please", "x"]) == pytest.approx([1.0, 0.02])
    assert make_judge("my_judges:Holder.score")("p", "r") == 7.0
    assert make_judge(f"{tmp_path / 'my_judges.py'}:polite")("", "please") == 1.0
    with pytest.raises(PrefoptError, match="returned str"):
        make_judge("my_judges:broken")("p", "r")
    with pytest.raises(PrefoptError, match="finite"):
        make_judge("my_judges:infinite")("p", "r")
    with pytest.raises(ConfigError, match="no callable 'missing'"):
        make_judge("my_judges:missing")
    with pytest.raises(ConfigError, match="cannot import"):
        make_judge("no_such_module_xyz:fn")


def test_unknown_judge_lists_builtins() -> None:
    with pytest.raises(ConfigError) as err:
        make_judge("sentiment")
    message = str(err.value)
    for spec in ("vader", "length", "regex:PATTERN", "keyword:", "reward-model:PATH", "module:"):
        assert spec in message


def test_prompt_text() -> None:
    assert prompt_text("plain") == "plain"
    assert prompt_text(MESSAGES) == "second question"
    assert prompt_text(({"role": "system", "content": "s"},)) == "s"


# ---------------------------------------------------------------------------------------------
# Reward model


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("rm") / "rm"
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=0,
    )  # fmt: skip
    LlamaForSequenceClassification(config).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def test_reward_model_judge_scores_scalar_head(reward_model_dir: Path) -> None:
    judge = make_judge(f"reward-model:{reward_model_dir}", device="cpu", batch_size=2)
    assert isinstance(judge, RewardModelJudge)
    prompts = ["hello", MESSAGES[:2], "is the sun hot ?"]
    responses = ["hi there , friend !", "ok", "yes , very hot ."]
    batched = judge.score_batch(prompts, responses)
    singles = [judge(p, r) for p, r in zip(prompts, responses, strict=True)]
    assert batched == pytest.approx(singles, abs=1e-5)
    # By hand: the chat-rendered conversation, last token's logit.
    tok = make_tokenizer()
    model = LlamaForSequenceClassification.from_pretrained(reward_model_dir).eval()
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hello"}, {"role": "assistant", "content": responses[0]}],
        tokenize=False,
    )
    with torch.no_grad():
        logits = model(**tok(text, return_tensors="pt")).logits
    assert batched[0] == pytest.approx(logits[0, 0].item(), abs=1e-5)
    assert len(set(batched)) == 3


def test_make_judges_runs_a_reward_model_where_asked(reward_model_dir: Path) -> None:
    """`--device` reaches the reward model ("auto": CUDA if available, else CPU)."""
    from prefopt.commands_judge import make_judges

    (judge,) = make_judges([f"reward-model:{reward_model_dir}"], device="meta")
    assert isinstance(judge, RewardModelJudge) and judge.device == torch.device("meta")
    assert next(judge.model.parameters()).device == torch.device("meta")
    (auto,) = make_judges([f"reward-model:{reward_model_dir}"], device="auto")
    assert isinstance(auto, RewardModelJudge)
    assert auto.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("command", ["judge", "eval"])
def test_judge_commands_pass_device_to_the_judges(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import prefopt.commands_judge
    from prefopt.cli import main

    seen: list[str | None] = []

    def record(spec: str, *, device: str | None = None, batch_size: int = 16) -> Judge:
        seen.append(device)
        raise ConfigError("stop here")  # before any model loads

    monkeypatch.setattr(prefopt.commands_judge, "make_judge", record)
    argv = [command, "--model", "m", "--prompts", "p.jsonl", "--judge", "reward-model:rm"]
    assert main([*argv, "--output", "o.json", "--device", "cpu"]) == 2
    assert "stop here" in capsys.readouterr().err
    assert seen == ["cpu"]


def test_positive_label_choice() -> None:
    def cfg(n: int, labels: dict[int, str]) -> SimpleNamespace:
        return SimpleNamespace(num_labels=n, id2label=labels)

    assert _positive_label(cfg(1, {0: "LABEL_0"}), "x") == 0
    assert _positive_label(cfg(2, {0: "POSITIVE", 1: "NEGATIVE"}), "x") == 0
    assert _positive_label(cfg(2, {0: "LABEL_0", 1: "LABEL_1"}), "x") == 1
    assert _positive_label(cfg(3, {0: "neg", 1: "neutral", 2: "pos"}), "x") == 2
    with pytest.raises(ConfigError, match="3 classes"):
        _positive_label(cfg(3, {0: "a", 1: "b", 2: "c"}), "x")


def test_reward_model_bad_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot load"):
        make_judge(f"reward-model:{tmp_path}")
    with pytest.raises(ConfigError, match="needs a path"):
        make_judge("reward-model:")


# ---------------------------------------------------------------------------------------------
# Scoring samples


def test_judge_samples_fills_scores_per_side() -> None:
    def c(text: str) -> Completion:
        return Completion(text, (5,), True)

    samples = [
        PromptSamples(0, "a", 0, (1,), [c("one two"), c("x")], [c("one")]),
        PromptSamples(1, "b", 1, (1,), [c("")], [c("a b c"), c("d")]),
    ]
    judge_samples(FunctionJudge("words", lambda p, r: float(len(r.split()))), samples)
    assert samples[0].scores == {"words": {"policy": [2.0, 1.0], "reference": [1.0]}}
    assert samples[1].scores == {"words": {"policy": [0.0], "reference": [3.0, 1.0]}}


def test_module_judge_found_in_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As from the `prefopt` console script, whose sys.path lacks the working directory."""
    (tmp_path / "cwd_judge.py").write_text("def score(prompt, response):\n    return 1.5\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert make_judge("cwd_judge:score")("p", "r") == 1.5
    assert str(tmp_path) not in sys.path
