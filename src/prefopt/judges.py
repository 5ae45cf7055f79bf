"""Judges: score a (prompt, response) with a number, higher = better.

`make_judge(spec)` builds one from a short spec, as given to `prefopt judge --judge SPEC`:

* `vader`: VADER sentiment of the response (compound score in [-1, 1]; needs vaderSentiment).
* `length`: number of words in the response; `length:neg` is minus that (shorter wins).
* `regex:PATTERN`: number of non-overlapping matches of a Python regex in the response.
* `keyword:w1,w2`: number of whole-word, case-insensitive occurrences of any of the words.
* `reward-model:PATH`: a transformers sequence-classification checkpoint scoring prompt and
  response together; the score is the logit of the only class, or of the positive class.
* `module:function` (or `path/to/file.py:function`): your own Python callable
  `(prompt: str, response: str) -> float`.

A judge scores in batches (`score_batch`) so model-based judges can batch; the simple ones loop.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from prefopt.data.records import Text
from prefopt.errors import ConfigError, PrefoptError

if TYPE_CHECKING:
    from prefopt.generation import PromptSamples

__all__ = [
    "BUILTIN_JUDGES",
    "FunctionJudge",
    "Judge",
    "RewardModelJudge",
    "judge_samples",
    "make_judge",
    "prompt_text",
]

BUILTIN_JUDGES = {
    "vader": "VADER sentiment of the response, in [-1, 1] (pip install vaderSentiment)",
    "length": "words in the response (length:neg for minus that: shorter wins)",
    "regex:PATTERN": "matches of a Python regular expression in the response",
    "keyword:w1,w2": "whole-word, case-insensitive occurrences of any listed word",
    "reward-model:PATH": "logit of a sequence-classification checkpoint on prompt + response",
    "module:function": "your callable (prompt: str, response: str) -> float",
}
"""Built-in judge specs and what they score (listed in error messages and `--help`)."""

ScoreFn = Callable[[str, str], float]


@runtime_checkable
class Judge(Protocol):
    """Scores responses to prompts; higher is better."""

    name: str

    def __call__(self, prompt: Text, response: str) -> float:
        """Score one response."""
        ...

    def score_batch(self, prompts: Sequence[Text], responses: Sequence[str]) -> list[float]:
        """Score responses[i] to prompts[i], for all i."""
        ...


def prompt_text(prompt: Text) -> str:
    """A prompt as plain text: itself, or the content of its last user message (the question
    a text judge cares about)."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m["role"] == "user"]
    return users[-1] if users else prompt[-1]["content"]


class NonFiniteScore(PrefoptError):
    """A judge returned something that is not a finite number (NaN, ±inf, not a number): a
    problem of that reply, unlike a judge that cannot load or run."""


def check_score(name: str, value: Any) -> float:
    """A judge's score as a finite float, or `NonFiniteScore` naming the judge."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise NonFiniteScore(
                f"judge '{name}' returned {type(value).__name__}, expected a number"
            ) from None
    if not math.isfinite(value):
        raise NonFiniteScore(f"judge '{name}' returned {value!r}, expected a finite number")
    return float(value)


class FunctionJudge:
    """A judge from a plain function `(prompt_text, response) -> float`, scored one by one.

    Args:
        name: Shown in reports.
        fn: The scoring function; it gets the prompt as plain text (see `prompt_text`).
    """

    def __init__(self, name: str, fn: ScoreFn) -> None:
        self.name = name
        self.fn = fn

    def __call__(self, prompt: Text, response: str) -> float:
        return check_score(self.name, self.fn(prompt_text(prompt), response))

    def score_batch(self, prompts: Sequence[Text], responses: Sequence[str]) -> list[float]:
        return [self(p, r) for p, r in zip(prompts, responses, strict=True)]

    def __repr__(self) -> str:
        return f"FunctionJudge({self.name!r})"


# ---------------------------------------------------------------------------------------------
# Built-ins


def _vader() -> ScoreFn:
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise PrefoptError(
            "the 'vader' judge needs the vaderSentiment package: pip install vaderSentiment "
            "(or pip install 'prefopt[judges]')"
        ) from None
    analyzer = SentimentIntensityAnalyzer()
    return lambda prompt, response: float(analyzer.polarity_scores(response)["compound"])


def _length(option: str) -> ScoreFn:
    if option not in ("", "neg", "negative"):
        raise ConfigError(f"unknown length option '{option}': use 'length' or 'length:neg'")
    sign = -1.0 if option else 1.0
    return lambda prompt, response: sign * len(response.split())


def _regex(pattern: str) -> ScoreFn:
    if not pattern:
        raise ConfigError("regex judge needs a pattern: regex:PATTERN")
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"regex judge: invalid pattern {pattern!r}: {exc}") from None
    return lambda prompt, response: float(sum(1 for _ in compiled.finditer(response)))


def _keyword(words: str) -> ScoreFn:
    listed = [w.strip() for w in words.split(",") if w.strip()]
    if not listed:
        raise ConfigError("keyword judge needs words: keyword:word1,word2")
    alternatives = "|".join(re.escape(w) for w in listed)
    # Lookarounds instead of \b, so keywords that start or end with punctuation still match.
    compiled = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)
    return lambda prompt, response: float(len(compiled.findall(response)))


def _import_from_cwd(module_name: str) -> Any:
    """Import a module, also finding it in the working directory (the `prefopt` console
    script's sys.path holds its own bin folder, not the directory it runs in)."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    finally:
        if added:
            sys.path.remove(cwd)


def _import_callable(spec: str) -> ScoreFn:
    """`package.module:function` or `path/to/file.py:function` -> the callable."""
    module_name, _, attr = spec.rpartition(":")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise ConfigError(f"judge '{spec}': no such file {path}")
            loader_spec = importlib.util.spec_from_file_location(path.stem, path)
            assert loader_spec is not None and loader_spec.loader is not None
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            module = _import_from_cwd(module_name)
    except ImportError as exc:
        raise ConfigError(f"judge '{spec}': cannot import '{module_name}': {exc}") from None
    fn: Any = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
    if not callable(fn):
        raise ConfigError(f"judge '{spec}': '{module_name}' has no callable '{attr}'")
    return fn  # type: ignore[no-any-return]


class RewardModelJudge:
    """A transformers sequence-classification checkpoint as a judge, scored in batches.

    The input is the prompt and the response rendered with the reward model's chat template
    when its tokenizer has one (prompt turns + an assistant turn), else the prompt text, a
    newline and the response. The score is the logit of the only class (a scalar reward model),
    or of the positive class of a classifier (a label containing "pos", else label 1 of two).

    Args:
        path: The checkpoint folder (or anything `from_pretrained` loads).
        name: Shown in reports.
        device: Where the model runs (default: CUDA if available, else CPU).
        batch_size: Rows per forward pass.
        max_length: Tokens per input, at most (longer inputs are truncated from the right).
    """

    def __init__(
        self,
        path: str,
        *,
        name: str | None = None,
        device: str | None = None,
        batch_size: int = 16,
        max_length: int = 1024,
    ) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.name = name or f"reward-model:{path}"
        local = Path(path).is_dir()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
            model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=local)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"reward-model judge: cannot load {path}: {exc}") from None
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if model.config.pad_token_id is None:
            # Decoder classifiers pool at the last non-pad token, found through this id.
            model.config.pad_token_id = self.tokenizer.pad_token_id
        self.label = _positive_label(model.config, path)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.batch_size = batch_size
        self.max_length = max_length

    def _render(self, prompt: Text, response: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            messages = [*turns, {"role": "assistant", "content": response}]
            text = self.tokenizer.apply_chat_template(messages, tokenize=False)
            assert isinstance(text, str)
            return text
        return f"{prompt_text(prompt)}\n{response}"

    def score_batch(self, prompts: Sequence[Text], responses: Sequence[str]) -> list[float]:
        import torch

        texts = [self._render(p, r) for p, r in zip(prompts, responses, strict=True)]
        scores: list[float] = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(
                    texts[start : start + self.batch_size], padding=True, truncation=True,
                    max_length=self.max_length, return_tensors="pt",
                ).to(self.device)  # fmt: skip
                logits = self.model(**enc).logits.float()  # [B, num_labels]
                scores.extend(logits[:, self.label].tolist())
        return [check_score(self.name, s) for s in scores]

    def __call__(self, prompt: Text, response: str) -> float:
        return self.score_batch([prompt], [response])[0]

    def __repr__(self) -> str:
        return f"RewardModelJudge({self.name!r})"


def _positive_label(config: Any, path: str) -> int:
    """Index of the class whose logit is the score."""
    if config.num_labels == 1:
        return 0
    labels = {int(i): str(n) for i, n in (config.id2label or {}).items()}
    positive = [i for i, n in labels.items() if "pos" in n.lower()]
    if len(positive) == 1:
        return positive[0]
    if config.num_labels == 2:
        return 1
    raise ConfigError(
        f"reward-model judge: {path} has {config.num_labels} classes ({labels}) and none is "
        "named positive; use a scalar reward model (num_labels=1) or a binary classifier"
    )


_PY_CALLABLE = re.compile(r"^[\w.\\/~-]+:[A-Za-z_][\w.]*$")


def _unknown(spec: str) -> ConfigError:
    listing = "\n".join(f"  {k:<20} {v}" for k, v in BUILTIN_JUDGES.items())
    return ConfigError(f"unknown judge '{spec}'. Judges:\n{listing}")


def make_judge(spec: str, *, device: str | None = None, batch_size: int = 16) -> Judge:
    """Build a judge from its spec (see the module docstring for the list).

    Args:
        spec: The judge spec, e.g. "vader", "keyword:thanks,please", "reward-model:./rm".
        device: Device of a reward model (default: CUDA if available, else CPU).
        batch_size: Rows per reward-model forward pass.

    Raises:
        ConfigError: For an unknown spec (the message lists the built-ins) or a bad option.
        PrefoptError: When a judge's optional dependency is missing.
    """
    name, _, arg = spec.partition(":")
    if name == "reward-model":
        if not arg:
            raise ConfigError("reward-model judge needs a path: reward-model:PATH")
        return RewardModelJudge(arg, name=spec, device=device, batch_size=batch_size)
    simple: dict[str, Callable[[str], ScoreFn]] = {
        "length": _length,
        "regex": _regex,
        "keyword": _keyword,
    }
    if spec == "vader":
        return FunctionJudge(spec, _vader())
    if name in simple:
        return FunctionJudge(spec, simple[name](arg))
    if arg and _PY_CALLABLE.match(spec):
        return FunctionJudge(spec, _import_callable(spec))
    raise _unknown(spec)


def judge_samples(
    judge: Judge,
    samples: Sequence[PromptSamples],
    sides: Sequence[str] = ("policy", "reference"),
) -> None:
    """Score every sample of each side with `judge` (one batch per side), storing the scores in
    `samples[i].scores[judge.name][side]`."""
    for side in sides:
        prompts = [s.prompt for s in samples for _ in getattr(s, side)]
        texts = [c.text for s in samples for c in getattr(s, side)]
        flat = judge.score_batch(prompts, texts)
        pos = 0
        for s in samples:
            k = len(getattr(s, side))
            s.scores.setdefault(judge.name, {})[side] = flat[pos : pos + k]
            pos += k
