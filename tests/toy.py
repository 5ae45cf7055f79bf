"""Tiny offline tokenizers and examples for tests: no download, fully deterministic.

The tokenizer is word-level over a fixed vocabulary (`TOY_VOCAB`, 300-odd entries). Its
pre-tokenizer splits text into runs of letters, single digits, single punctuation marks and
newlines, and drops spaces; a piece not in the vocabulary maps to `<unk>`. Ids are the positions
in `TOY_VOCAB`, so tests can write expected ids by hand:

    0 <pad>   1 <unk>   2 <s>   3 </s>   4 <|im_start|>   5 <|im_end|>   6 "\\n"

Two flavours, chosen by `make_tokenizer`:

* chat (default): ChatML template like SmolLM2's (without its default system prompt), eos is
  `<|im_end|>`; the template renders "<|im_start|>role\\ncontent<|im_end|>\\n" per message.
* plain (`chat_template=False`): no template, eos is `</s>`.

With `bos=True` a post-processor prepends `<s>` when `add_special_tokens=True`, as Llama
tokenizers do; `template_adds_bos=True` makes the template write `<s>` too (the double-BOS trap).
Models built on top use `TOY_VOCAB_SIZE` (512) embedding rows, more than the vocabulary needs.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from prefopt.data.records import PreferencePair, UnpairedExample

TOY_VOCAB_SIZE = 512

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
PUNCTUATION = list(".,!?;:'\"()-/")
DIGITS = list("0123456789")
_WORDS_TEXT = """
system user assistant
a an the this that these those it its i me my you your we our they them their he she his her
is are was were be been am do does did have has had will would can could should may might must
not no yes and or but if then so because of to in on at for with from by about as into over
under up down out off again very too also just only all some any many much more most few
what which who when where why how there here now today tomorrow yesterday
hello hi goodbye bye please thanks thank sorry welcome ok okay
good bad great nice fine happy sad kind rude helpful correct wrong true false right left
big small long short old new hot cold fast slow easy hard best worst better worse
cat cats dog dogs bird fish tree trees sun moon star sky sea water fire food apple apples
bread milk tea coffee book books word words name story song game home house city world
man woman child friend friends people teacher doctor
day night time year week morning evening
one two three four five six seven eight nine ten hundred
red blue green yellow black white
go goes went come came see saw look like likes love loves want wants need know think
say said tell told ask asked answer answers help make made take give get got eat drink read
write play run walk sleep work learn feel try use find keep let put
question questions idea thing things way place part number
capital france paris weather sunny rain
"""
WORDS = _WORDS_TEXT.split()
TOY_VOCAB: list[str] = SPECIALS + ["\n"] + PUNCTUATION + DIGITS + WORDS
assert len(set(TOY_VOCAB)) == len(TOY_VOCAB) <= TOY_VOCAB_SIZE, "toy vocabulary must be unique"

# ChatML, as in SmolLM2-Instruct (minus its default system message): no BOS, every message is
# "<|im_start|>{role}\n{content}<|im_end|>\n", and the generation prompt is
# "<|im_start|>assistant\n".
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_BOS_TEMPLATE = "{{ '<s>' }}" + CHATML_TEMPLATE


def _backend(bos: bool) -> Tokenizer:
    vocab = {token: i for i, token in enumerate(TOY_VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # Letters runs, single digits, single punctuation marks and newlines are pieces; spaces vanish.
    backend.pre_tokenizer = pre_tokenizers.Split(
        Regex(r"[^\W\d_]+|\d|[^\w\s]|_|\n"), behavior="removed", invert=True
    )
    backend.add_special_tokens(SPECIALS)
    if bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 2)]
        )
    return backend


def make_tokenizer(
    *, chat_template: bool = True, bos: bool = True, template_adds_bos: bool = False
) -> PreTrainedTokenizerFast:
    """Build the toy tokenizer (see the module docstring for its vocabulary and flavours).

    Args:
        chat_template: ChatML template and eos `<|im_end|>` if True; no template and eos `</s>`
            otherwise.
        bos: Whether `<s>` is the BOS token and is prepended with `add_special_tokens=True`.
            Without it the tokenizer has no BOS token at all (like Qwen2).
        template_adds_bos: Whether the chat template itself starts with `<s>`.

    Returns:
        A transformers fast tokenizer, pad `<pad>` (0), unk `<unk>` (1).
    """
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_backend(bos),
        bos_token="<s>" if bos else None,
        eos_token="<|im_end|>" if chat_template else "</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"] if chat_template else [],
    )
    if chat_template:
        tokenizer.chat_template = CHATML_BOS_TEMPLATE if template_adds_bos else CHATML_TEMPLATE
    return tokenizer


def toy_pairs() -> list[PreferencePair]:
    """A few preference pairs over vocabulary words: three plain, two conversational."""
    user = "user"
    return [
        PreferencePair(0, "what is the capital of france ?", " paris .", " the moon ."),
        PreferencePair(1, "say hello", " hello ! nice to see you .", " no ."),
        PreferencePair(2, "is the sun hot ?", " yes , very hot .", " no , it is cold ."),
        PreferencePair(
            3,
            ({"role": user, "content": "tell me a story"},),
            ({"role": "assistant", "content": "a cat saw the moon ."},),
            ({"role": "assistant", "content": "no ."},),
        ),
        PreferencePair(
            4,
            (
                {"role": "system", "content": "you are a helpful assistant ."},
                {"role": user, "content": "how is the weather today ?"},
            ),
            ({"role": "assistant", "content": "sunny and hot ."},),
            ({"role": "assistant", "content": "i do not know ."},),
        ),
    ]


def toy_examples() -> list[UnpairedExample]:
    """Unpaired (KTO) examples made from `toy_pairs`: chosen desirable, rejected undesirable."""
    out: list[UnpairedExample] = []
    for pair in toy_pairs():
        out.append(UnpairedExample(2 * pair.index, pair.prompt, pair.chosen, True))
        out.append(UnpairedExample(2 * pair.index + 1, pair.prompt, pair.rejected, False))
    return out
