"""Tokenization of pairs/examples: literal ids from the toy vocabulary, BOS/EOS rules, boundary
fixes, truncation and row errors.

Ids used below, read off `toy.TOY_VOCAB` (positions in the list):
    0 <pad>  1 <unk>  2 <s>  3 </s>  4 <|im_start|>  5 <|im_end|>  6 "\\n"  7 .  8 ,  10 ?
    29 system  30 user  31 assistant  32 a  34 the  41 i  42 me  55 is  56 are  77 no  78 yes
    79 and  86 of  105 very  118 what  143 bad  145 nice  164 hot  165 cold  174 cat
    175 cats  177 dogs  182 sun  183 moon  201 story  246 saw  259 tell  298 capital
    299 france  300 paris
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from prefopt.data import load_preference_data
from prefopt.data.records import PreferencePair, UnpairedExample
from prefopt.errors import ConfigError, TokenizationError
from prefopt.tokenize import (
    TokenizedExample,
    TokenizedPair,
    tokenize_example,
    tokenize_examples,
    tokenize_pair,
    tokenize_pairs,
    tokenize_sft,
)
from toy import CHATML_TEMPLATE, TOY_VOCAB, make_tokenizer, toy_pairs

FIXTURES = Path(__file__).parent / "data" / "fixtures"

CAPITAL = PreferencePair(0, "what is the capital of france ?", " paris .", " the moon .")
SUN = PreferencePair(2, "is the sun hot ?", " yes , very hot .", " no .")
STORY = PreferencePair(
    3,
    ({"role": "user", "content": "tell me a story"},),
    ({"role": "assistant", "content": "a cat saw the moon ."},),
    ({"role": "assistant", "content": "no ."},),
)
# "<|im_start|>user\ntell me a story<|im_end|>\n<|im_start|>assistant\n"
STORY_PROMPT = (4, 30, 6, 259, 42, 32, 201, 5, 6, 4, 31, 6)


def test_hand_table_matches_vocab() -> None:
    """The ids in the module docstring are the vocabulary positions."""
    assert [TOY_VOCAB[i] for i in (2, 3, 5, 6, 34, 175, 300)] == [
        "<s>",
        "</s>",
        "<|im_end|>",
        "\n",
        "the",
        "cats",
        "paris",
    ]
    assert len(TOY_VOCAB) <= 512


# ---------------------------------------------------------------- literal ids


def test_plain_tokenizer_with_bos() -> None:
    tok = make_tokenizer(chat_template=False)
    out = tokenize_pair(CAPITAL, tok, max_length=64)
    assert out == TokenizedPair(
        index=0,
        prompt_ids=(2, 118, 55, 34, 298, 86, 299, 10),
        chosen_ids=(300, 7, 3),
        rejected_ids=(34, 183, 7, 3),
        truncated=False,
    )


def test_plain_tokenizer_without_bos() -> None:
    tok = make_tokenizer(chat_template=False, bos=False)
    out = tokenize_pair(CAPITAL, tok, max_length=64)
    assert out.prompt_ids == (118, 55, 34, 298, 86, 299, 10)
    assert out.chosen_ids == (300, 7, 3)


def test_chat_template_conversational() -> None:
    out = tokenize_pair(STORY, make_tokenizer(), max_length=64)
    assert out.prompt_ids == (2, *STORY_PROMPT)
    # "a cat saw the moon .<|im_end|>" — the template's trailing "\n" (6) is dropped.
    assert out.chosen_ids == (32, 174, 246, 34, 183, 7, 5)
    assert out.rejected_ids == (77, 7, 5)


def test_chat_template_without_bos() -> None:
    out = tokenize_pair(STORY, make_tokenizer(bos=False), max_length=64)
    assert out.prompt_ids == STORY_PROMPT
    assert out.chosen_ids == (32, 174, 246, 34, 183, 7, 5)


def test_chat_template_system_prompt() -> None:
    pair = PreferencePair(
        4,
        ({"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}),
        ({"role": "assistant", "content": "hello ."},),
        ({"role": "assistant", "content": "bye ."},),
    )
    out = tokenize_pair(pair, make_tokenizer(), max_length=64)
    # <s> <|im_start|>system\n be nice <|im_end|>\n <|im_start|>user\n hi <|im_end|>\n
    # <|im_start|>assistant\n
    assert out.prompt_ids == (2, 4, 29, 6, 59, 145, 5, 6, 4, 30, 6, 132, 5, 6, 4, 31, 6)
    assert out.chosen_ids == (131, 7, 5)
    assert out.rejected_ids == (134, 7, 5)


def test_plain_text_row_goes_through_chat_template() -> None:
    out = tokenize_pair(CAPITAL, make_tokenizer(), max_length=64)
    assert out.prompt_ids == (2, 4, 30, 6, 118, 55, 34, 298, 86, 299, 10, 5, 6, 4, 31, 6)
    assert out.chosen_ids == (300, 7, 5)
    assert out.rejected_ids == (34, 183, 7, 5)


def test_use_chat_template_false_concatenates() -> None:
    out = tokenize_pair(CAPITAL, make_tokenizer(), max_length=64, use_chat_template=False)
    assert out.prompt_ids == (2, 118, 55, 34, 298, 86, 299, 10)
    assert out.chosen_ids == (300, 7, 5)  # EOS is the tokenizer's: <|im_end|>


def test_use_chat_template_true_needs_a_template() -> None:
    tok = make_tokenizer(chat_template=False)
    with pytest.raises(TokenizationError, match="no chat template"):
        tokenize_pair(CAPITAL, tok, max_length=64, use_chat_template=True)


# ---------------------------------------------------------------- BOS / EOS


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"bos": False},
        {"template_adds_bos": True},
        {"bos": False, "template_adds_bos": True},
    ],
)
def test_one_bos_one_eos_chat(kwargs: dict[str, bool]) -> None:
    tok = make_tokenizer(**kwargs)
    pairs, report = tokenize_pairs(toy_pairs(), tok, max_length=64)
    expect_bos = kwargs.get("bos", True) or kwargs.get("template_adds_bos", False)
    assert report.kept == 5
    for p in pairs:
        for response in (p.chosen_ids, p.rejected_ids):
            full = p.prompt_ids + response
            assert full.count(2) == (1 if expect_bos else 0)
            assert (full[0] == 2) == expect_bos
            assert response.count(5) == 1 and response[-1] == 5


@pytest.mark.parametrize("bos", [True, False])
def test_one_bos_one_eos_plain(bos: bool) -> None:
    tok = make_tokenizer(chat_template=False, bos=bos)
    plain = [p for p in toy_pairs() if not p.conversational]
    pairs, _ = tokenize_pairs(plain, tok, max_length=64)
    for p in pairs:
        for response in (p.chosen_ids, p.rejected_ids):
            assert (p.prompt_ids + response).count(2) == int(bos)
            assert response.count(3) == 1 and response[-1] == 3


def test_double_bos_guard() -> None:
    """Template writes <s> and the tokenizer would add <s>: one <s> only."""
    tok = make_tokenizer(template_adds_bos=True)
    assert tok("hi", add_special_tokens=True)["input_ids"][0] == 2  # it would add one
    out = tokenize_pair(STORY, tok, max_length=64)
    assert out.prompt_ids == (2, *STORY_PROMPT)
    _, report = tokenize_pairs([STORY], tok, max_length=64)
    assert report.adds_bos and report.bos_token == "<s>" and report.bos_token_id == 2


def test_eos_in_plain_text_not_doubled() -> None:
    pair = PreferencePair(1, "say", " paris .</s>", " no .")
    out = tokenize_pair(pair, make_tokenizer(chat_template=False), max_length=64)
    assert out.chosen_ids == (300, 7, 3)


def test_plain_trailing_newline_kept_before_eos() -> None:
    """Only whitespace after a final EOS is dropped; a response's own newline stays."""
    pair = PreferencePair(1, "say", " paris .\n", " no .")
    out = tokenize_pair(pair, make_tokenizer(chat_template=False), max_length=64)
    assert out.chosen_ids == (300, 7, 6, 3)


# Rejected side of tests/data/fixtures/conversational.json row 1: two assistant messages.
TWO_TURNS = PreferencePair(
    1,
    ({"role": "user", "content": "say hello"},),
    ({"role": "assistant", "content": "hello ."},),
    ({"role": "assistant", "content": "no ."}, {"role": "assistant", "content": "bye ."}),
)


def test_two_assistant_messages_one_eos_per_turn_one_at_the_end() -> None:
    """ChatML closes every turn with <|im_end|> (5), which is EOS: the response holds one EOS
    per assistant turn, separated by "\\n" and the next header, and ends with exactly one.
    "no .<|im_end|>\\n<|im_start|>assistant\\nbye .<|im_end|>" (the final "\\n" dropped)."""
    out = tokenize_pair(TWO_TURNS, make_tokenizer(), max_length=64)
    assert out.rejected_ids == (77, 7, 5, 6, 4, 31, 6, 134, 7, 5)
    assert out.rejected_ids.count(5) == 2  # one per assistant turn
    assert out.rejected_ids[-1] == 5 and out.rejected_ids[-2] != 5  # one at the end
    assert out.chosen_ids == (131, 7, 5)


def test_two_assistant_messages_end_of_turn_not_eos() -> None:
    """Template end-of-turn <|im_end|> (5), tokenizer EOS </s> (3): both turns keep the
    template's <|im_end|>\\n as rendered, and one </s> is appended at the very end."""
    tok = make_tokenizer(chat_template=False)
    tok.chat_template = CHATML_TEMPLATE
    out = tokenize_pair(TWO_TURNS, tok, max_length=64)
    assert out.rejected_ids == (77, 7, 5, 6, 4, 31, 6, 134, 7, 5, 6, 3)
    assert out.rejected_ids.count(5) == 2 and out.rejected_ids.count(3) == 1


def test_conversational_fixture_two_turn_response() -> None:
    """The fixture row itself (its words are mostly <unk> here): EOS count = assistant turns."""
    pairs, _ = load_preference_data(FIXTURES / "conversational.json")
    out, _ = tokenize_pairs(pairs, make_tokenizer(), max_length=128)  # type: ignore[arg-type]
    for pair, tokens in zip(pairs, out, strict=True):
        assert isinstance(pair, PreferencePair)
        for messages, ids in (
            (pair.chosen, tokens.chosen_ids),
            (pair.rejected, tokens.rejected_ids),
        ):
            assert ids.count(5) == len(messages) and ids[-1] == 5 and ids[-2] != 5
    assert out[1].rejected_ids.count(5) == 2


@pytest.mark.parametrize(
    "chosen", [" paris .</s></s>", " paris .</s>\n</s>", " paris .\n</s>\n</s>"]
)
def test_repeated_final_eos_is_cut_to_one(chosen: str) -> None:
    """Text already ending with EOS (twice): one EOS at the end; a newline before the first
    EOS is the response's own and stays."""
    pair = PreferencePair(1, "say", chosen, " no .")
    out = tokenize_pair(pair, make_tokenizer(chat_template=False), max_length=64)
    expected = (300, 7, 6, 3) if chosen.startswith(" paris .\n") else (300, 7, 3)
    assert out.chosen_ids == expected


def test_chat_content_ending_with_eos_is_not_doubled() -> None:
    """Content "hello .<|im_end|>" closed again by ChatML: "<|im_end|><|im_end|>" → one."""
    pair = PreferencePair(
        1,
        ({"role": "user", "content": "say hello"},),
        ({"role": "assistant", "content": "hello .<|im_end|>"},),
        ({"role": "assistant", "content": "no ."},),
    )
    out = tokenize_pair(pair, make_tokenizer(), max_length=64)
    assert out.chosen_ids == (131, 7, 5)


# ---------------------------------------------------------------- boundary


def test_boundary_shift_word_level() -> None:
    """ "cat" + "s" renders "cats": the prompt ids are not a prefix, so encode apart."""
    tok = make_tokenizer(chat_template=False)
    shifted = PreferencePair(7, "i like the cat", "s and dogs .", "s are bad .")
    pairs, report = tokenize_pairs([CAPITAL, shifted], tok, max_length=64)
    assert pairs[1] == TokenizedPair(
        7, (2, 41, 248, 34, 174), (1, 79, 177, 7, 3), (1, 56, 143, 7, 3), False
    )
    assert report.boundary_fixed == [7]


def test_boundary_shift_bpe() -> None:
    """A tiny BPE whose merge a+b joins the prompt's last and the response's first piece."""
    vocab = {"<unk>": 0, "</s>": 1, "a": 2, "b": 3, "c": 4, "ab": 5}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")], unk_token="<unk>"))
    backend.add_special_tokens(["<unk>", "</s>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>")
    assert tok("cab", add_special_tokens=False)["input_ids"] == [4, 5]
    pairs, report = tokenize_pairs([PreferencePair(3, "ca", "bc", "cc")], tok, max_length=16)
    assert pairs[0] == TokenizedPair(3, (4, 2), (3, 4, 1), (4, 4, 1), False)
    assert report.boundary_fixed == [3]


MISMATCHED_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}{{ '<|im_start|>bot\n' + m['content'] + '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_template_prefix_mismatch_names_row() -> None:
    tok = make_tokenizer()
    tok.chat_template = MISMATCHED_TEMPLATE
    pair = PreferencePair(9, STORY.prompt, STORY.chosen, STORY.rejected)
    with pytest.raises(TokenizationError, match="row 9") as info:
        tokenize_pair(pair, tok, max_length=64)
    assert "not a prefix" in str(info.value)
    pairs, report = tokenize_pairs([pair], tok, max_length=64, on_error="skip")
    assert pairs == [] and report.dropped == {"template_prefix": [9]}


# ---------------------------------------------------------------- truncation


def test_prompt_truncated_from_left_keeps_bos() -> None:
    tok = make_tokenizer(chat_template=False)
    out = tokenize_pair(CAPITAL, tok, max_length=64, max_prompt_length=4)
    assert out.prompt_ids == (2, 86, 299, 10)  # <s> of france ?
    assert out.chosen_ids == (300, 7, 3) and out.truncated


def test_prompt_truncated_from_left_without_bos() -> None:
    tok = make_tokenizer(chat_template=False, bos=False)
    out = tokenize_pair(CAPITAL, tok, max_length=64, max_prompt_length=3)
    assert out.prompt_ids == (86, 299, 10) and out.truncated


def test_responses_truncated_from_right() -> None:
    tok = make_tokenizer(chat_template=False)
    # prompt <s> is the sun hot ? = 6 tokens; room 3: chosen loses ", very hot . </s>"'s tail.
    out = tokenize_pair(SUN, tok, max_length=9)
    assert out == TokenizedPair(2, (2, 55, 34, 182, 164, 10), (78, 8, 105), (77, 7, 3), True)


def test_exact_fit_is_not_truncated() -> None:
    tok = make_tokenizer(chat_template=False)
    out = tokenize_pair(SUN, tok, max_length=12)
    assert out.chosen_ids == (78, 8, 105, 164, 7, 3) and not out.truncated


def test_prompt_then_responses_truncated() -> None:
    tok = make_tokenizer(chat_template=False)
    out = tokenize_pair(SUN, tok, max_length=6, max_prompt_length=3)
    assert out == TokenizedPair(2, (2, 164, 10), (78, 8, 105), (77, 7, 3), True)


def test_prompt_filling_max_length_is_an_error() -> None:
    tok = make_tokenizer(chat_template=False)
    with pytest.raises(TokenizationError, match="row 2") as info:
        tokenize_pair(SUN, tok, max_length=6)
    assert info.value.row == 2 and info.value.field == "prompt"
    out = tokenize_pair(SUN, tok, max_length=7)  # one token of room
    assert out.chosen_ids == (78,) and out.rejected_ids == (77,)


def test_identical_after_truncation() -> None:
    tok = make_tokenizer(chat_template=False)
    pair = PreferencePair(6, "is the sun hot ?", " yes , very hot .", " yes , very cold .")
    with pytest.raises(TokenizationError, match="row 6.*after truncation"):
        tokenize_pair(pair, tok, max_length=8)


# ---------------------------------------------------------------- row errors


@pytest.mark.parametrize("chosen", ["", " ", " \n\n"])
def test_empty_response_names_row(chosen: str) -> None:
    tok = make_tokenizer(chat_template=False)
    pair = PreferencePair(5, "say hello", chosen, " hello .")
    with pytest.raises(TokenizationError, match="row 5, field 'chosen'"):
        tokenize_pair(pair, tok, max_length=64)


def test_empty_chat_response_names_row() -> None:
    pair = PreferencePair(8, STORY.prompt, STORY.chosen, ({"role": "assistant", "content": ""},))
    with pytest.raises(TokenizationError, match="row 8, field 'rejected'.*no tokens"):
        tokenize_pair(pair, make_tokenizer(), max_length=64)


def test_identical_responses_name_row() -> None:
    tok = make_tokenizer(chat_template=False)
    pair = PreferencePair(4, "say", " paris .", "paris  .")  # same tokens, other spacing
    with pytest.raises(TokenizationError, match="row 4.*same tokens"):
        tokenize_pair(pair, tok, max_length=64)


def test_empty_prompt_without_bos_names_row() -> None:
    pair = PreferencePair(11, "", " yes .", " no .")
    with pytest.raises(TokenizationError, match="row 11, field 'prompt'"):
        tokenize_pair(pair, make_tokenizer(chat_template=False, bos=False), max_length=64)
    # With a BOS there is something to condition on.
    out = tokenize_pair(pair, make_tokenizer(chat_template=False), max_length=64)
    assert out.prompt_ids == (2,)


def test_conversational_without_template_raises_even_when_skipping() -> None:
    tok = make_tokenizer(chat_template=False)
    with pytest.raises(TokenizationError, match="row 3.*chat template.*plain text"):
        tokenize_pairs([STORY], tok, max_length=64, on_error="skip")


def test_bad_limits() -> None:
    tok = make_tokenizer()
    with pytest.raises(ConfigError):
        tokenize_pair(CAPITAL, tok, max_length=1)
    with pytest.raises(ConfigError):
        tokenize_pair(CAPITAL, tok, max_length=64, max_prompt_length=0)
    with pytest.raises(ConfigError):
        tokenize_pairs([CAPITAL], tok, max_length=64, on_error="ignore")  # type: ignore[arg-type]


def test_skip_counts_rows() -> None:
    tok = make_tokenizer(chat_template=False)
    rows = [
        CAPITAL,
        PreferencePair(1, "say hello", "", " hello ."),  # empty chosen
        PreferencePair(2, "is the sun hot ?", " yes , very very very hot .", " no ."),  # cut
        PreferencePair(3, "say", " paris .", " paris ."),  # identical
        PreferencePair(4, "what is the capital of france ? tell me what is the", " a .", " b ."),
        PreferencePair(7, "i like the cat", "s and dogs .", " no ."),  # boundary fixed
    ]
    pairs, report = tokenize_pairs(rows, tok, max_length=12, on_error="skip")
    assert [p.index for p in pairs] == [0, 2, 7]
    assert (report.rows, report.kept) == (6, 3)
    assert report.truncated == [2]
    assert report.boundary_fixed == [7]
    assert report.dropped == {
        "empty_response": [1],
        "identical_responses": [3],
        "prompt_too_long": [4],
    }
    summary = report.summary()
    assert "6 rows: 3 kept, 1 truncated, 1 boundary fixed" in summary
    assert "dropped 1 (prompt_too_long): rows 4" in summary
    with pytest.raises(TokenizationError, match="row 1"):
        tokenize_pairs(rows, tok, max_length=12)


# ---------------------------------------------------------------- unpaired / SFT


def test_tokenize_example_and_examples() -> None:
    tok = make_tokenizer(chat_template=False)
    ex = UnpairedExample(3, "is the sun hot ?", " no .", False)
    assert tokenize_example(ex, tok, max_length=64) == TokenizedExample(
        3, (2, 55, 34, 182, 164, 10), (77, 7, 3), False, False
    )
    bad = UnpairedExample(4, "say", "", True)
    out, report = tokenize_examples([ex, bad], tok, max_length=7, on_error="skip")
    assert out == [TokenizedExample(3, (2, 55, 34, 182, 164, 10), (77,), False, True)]
    assert report.dropped == {"empty_response": [4]} and report.truncated == [3]


def test_tokenize_sft_matches_chosen_side() -> None:
    tok = make_tokenizer()
    sft = tokenize_sft(STORY.prompt, STORY.chosen, tok, max_length=64, index=3)
    assert sft == TokenizedExample(3, (2, *STORY_PROMPT), (32, 174, 246, 34, 183, 7, 5), None)


# ---------------------------------------------------------------- property

WORD = st.sampled_from(TOY_VOCAB[7:])


@settings(max_examples=40, deadline=None)
@given(
    prompt=st.lists(WORD, min_size=1, max_size=8),
    chosen=st.lists(WORD, min_size=1, max_size=8),
    rejected=st.lists(WORD, min_size=1, max_size=8),
    chat=st.booleans(),
    bos=st.booleans(),
)
def test_invariants(
    prompt: list[str], chosen: list[str], rejected: list[str], chat: bool, bos: bool
) -> None:
    tok = make_tokenizer(chat_template=chat, bos=bos)
    pair = PreferencePair(0, " ".join(prompt), " " + " ".join(chosen), " " + " ".join(rejected))
    pairs, report = tokenize_pairs([pair], tok, max_length=12, on_error="skip")
    eos = tok.eos_token_id
    if chosen == rejected:
        assert report.dropped == {"identical_responses": [0]}
        return
    for p in pairs:
        assert len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) <= 12
        for response in (p.chosen_ids, p.rejected_ids):
            full = p.prompt_ids + response
            assert full.count(2) == int(bos) and (full[0] == 2) == bos
            assert response.count(eos) <= 1
            assert response.count(eos) == 1 or p.truncated
    assert report.kept + sum(len(v) for v in report.dropped.values()) == 1


@pytest.mark.parametrize("kwargs", [{}, {"chat_template": False}, {"bos": False}])
def test_toy_tokenizer_survives_save_and_load(tmp_path: Path, kwargs: dict[str, bool]) -> None:
    """Others save the toy tokenizer next to tiny models: reloading must not change ids."""
    tok = make_tokenizer(**kwargs)
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    rows = [p for p in toy_pairs() if kwargs.get("chat_template", True) or not p.conversational]
    before, _ = tokenize_pairs(rows, tok, max_length=64)
    after, _ = tokenize_pairs(rows, loaded, max_length=64, progress=True)
    assert before == after
