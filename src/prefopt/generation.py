"""Sampling responses from a policy and its reference on the same prompts with the same seeds.

Reproducibility: every prompt gets its own random stream, seeded with `seed + prompt index`
(the prompt's position in the file), so a prompt's samples do not depend on the batch size, the
batch it lands in, or the device. Sampling uses the Gumbel-max trick: each step adds Gumbel noise
drawn from the prompt's CPU `torch.Generator` to the temperature-scaled, top-p-filtered logits and
takes the argmax, which is an exact draw from the same distribution as multinomial sampling (a
per-row generator is something `model.generate(do_sample=True)` cannot take). The policy and the
reference draw the *same* noise for a prompt (common random numbers): where they agree on the
next-token distribution they pick the same token, so their differences show what training changed,
not sampling luck.

Batches are left-padded (generation appends on the right); masks come from lengths, never from
pad ids (the pad token is often EOS). A response is the generated tokens up to and including the
first EOS; one that hits `max_new_tokens` first is marked unfinished.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from prefopt.data.fields import RowContext, parse_prompt
from prefopt.data.loading import read_rows
from prefopt.data.records import Text
from prefopt.errors import ConfigError, DataError

__all__ = [
    "Completion",
    "GumbelSampler",
    "PromptSamples",
    "SamplingParams",
    "adapter_disabled",
    "encode_prompt",
    "generate_completions",
    "generate_side_by_side",
    "load_prompts",
    "prompt_display",
]


@dataclass(frozen=True)
class SamplingParams:
    """How responses are sampled.

    Attributes:
        temperature: Softmax temperature; 0 means greedy decoding.
        top_p: Nucleus sampling mass (1.0 keeps the whole distribution).
        max_new_tokens: Generated tokens per response, at most.
        num_samples: Responses per prompt (per model).
        seed: Base seed; prompt i samples with seed + i.
    """

    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 48
    num_samples: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0 or not math.isfinite(self.temperature):
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1 or self.num_samples < 1:
            raise ConfigError("max_new_tokens and num_samples must be at least 1")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")


@dataclass(frozen=True)
class Completion:
    """One sampled response.

    Attributes:
        text: Decoded response, special tokens (EOS) left out.
        token_ids: Generated ids, up to and including the first EOS.
        finished: True if the response ended with EOS (not cut by max_new_tokens).
    """

    text: str
    token_ids: tuple[int, ...]
    finished: bool


@dataclass
class PromptSamples:
    """A prompt with the policy's and the reference's samples, side by side.

    Attributes:
        index: The prompt's position in the prompts file.
        prompt: The prompt as given (text or messages).
        seed: The seed its samples were drawn with (base seed + index).
        prompt_ids: The prompt as tokens (chat template and generation prompt applied).
        policy: The policy's samples.
        reference: The reference's samples (same seed), empty if there is no reference.
        scores: Judge name -> {"policy": [...], "reference": [...]}, one score per sample.
    """

    index: int
    prompt: Text
    seed: int
    prompt_ids: tuple[int, ...]
    policy: list[Completion]
    reference: list[Completion] = field(default_factory=list)
    scores: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The JSONL row: index, prompt, seed, policy/reference texts and any judge scores."""
        row: dict[str, Any] = {
            "index": self.index,
            "prompt": self.prompt if isinstance(self.prompt, str) else list(self.prompt),
            "seed": self.seed,
            "policy": [c.text for c in self.policy],
            "reference": [c.text for c in self.reference],
        }
        if self.scores:
            row["scores"] = self.scores
        return row


# ---------------------------------------------------------------------------------------------
# Prompts


def load_prompts(path: str | Path, column: str = "prompt") -> list[Text]:
    """Read prompts: rows with `column` holding text or a list of chat messages.

    Raises:
        DataError: naming the row and field, for a missing or malformed prompt.
    """
    prompts: list[Text] = []
    for i, row in enumerate(read_rows(path)):
        ctx = RowContext(str(path), i)
        if not isinstance(row, dict):
            raise ctx.error("expected a row object with a 'prompt' field")
        prompts.append(parse_prompt(row, column, ctx))
    if not prompts:
        raise DataError("no prompts", file=str(path))
    return prompts


def encode_prompt(tokenizer: Any, prompt: Text) -> list[int]:
    """Prompt ids as training sees them: the chat template with the generation prompt when the
    tokenizer has one (a text prompt becomes a user turn), exactly one BOS where the tokenizer
    uses one."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    elif isinstance(prompt, str):
        text = prompt
    else:
        raise DataError("message prompts need a tokenizer with a chat template", field="prompt")
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]
    if adds_bos and ids[:1] != [bos]:
        ids = [bos, *ids]
    if not ids:
        raise DataError("the prompt has no tokens", field="prompt")
    return ids


def prompt_display(prompt: Text) -> str:
    """Plain text of a prompt: itself, or its messages as "role: content" lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


# ---------------------------------------------------------------------------------------------
# Sampling


class GumbelSampler:
    """Logits processor: temperature, top-p, then per-row Gumbel noise from per-prompt streams.

    Rows are prompt-major: row r belongs to prompt r // num_samples. Greedy decoding on the
    processed scores then yields an exact sample (Gumbel-max trick). The noise comes from CPU
    generators, so a seed gives the same draws on any device; that costs rows × vocabulary
    uniforms per step, small next to a forward pass.

    Args:
        seeds: One seed per prompt of the batch.
        num_samples: Rows per prompt.
        temperature: > 0.
        top_p: Nucleus mass in (0, 1].
    """

    def __init__(self, seeds: Sequence[int], num_samples: int, temperature: float, top_p: float):
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.num_samples = num_samples
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logits = scores.float() / self.temperature  # [R, V]
        if self.top_p < 1.0:
            logits = _top_p_filter(logits, self.top_p)
        # Every prompt draws num_samples × V uniforms per step whether or not its rows have
        # finished, so a prompt's t-th draw never depends on the other prompts in the batch.
        shape = (self.num_samples, logits.shape[-1])
        uniform = torch.cat([torch.rand(shape, generator=g) for g in self.generators])  # [R, V]
        tiny = torch.finfo(torch.float32).tiny
        gumbel = -torch.log(-torch.log(uniform.clamp(min=tiny)))  # [R, V]
        return logits + gumbel.to(logits.device)


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches `top_p` (at least one)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [R, V]
    probs = sorted_logits.softmax(-1)
    # A token is dropped when the mass before it already reaches top_p.
    drop_sorted = probs.cumsum(-1) - probs >= top_p  # [R, V]
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _stop_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    ids = {int(tokenizer.eos_token_id)}
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(config_eos, int):
        ids.add(config_eos)
    elif isinstance(config_eos, (list, tuple)):
        ids.update(int(i) for i in config_eos)
    return sorted(ids)


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [R, T]
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # [R, T]
    for i, r in enumerate(rows):
        input_ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        attention_mask[i, width - len(r) :] = 1
    return input_ids, attention_mask


def _completion(ids: Sequence[int], stop: Sequence[int], tokenizer: Any) -> Completion:
    """Cut generated ids after the first stop token (padding follows it) and decode."""
    cut = next((i for i, t in enumerate(ids) if t in stop), None)
    kept = list(ids if cut is None else ids[: cut + 1])
    text = tokenizer.decode(kept if cut is None else kept[:-1], skip_special_tokens=True)
    return Completion(text, tuple(kept), cut is not None)


def _generate_batch(
    model: nn.Module,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    seeds: Sequence[int],
    params: SamplingParams,
    device: torch.device,
) -> list[list[Completion]]:
    from transformers import GenerationConfig, LogitsProcessorList

    k = params.num_samples
    rows = [ids for ids in prompt_ids for _ in range(k)]  # prompt-major
    input_ids, attention_mask = _left_pad(rows, tokenizer.pad_token_id)
    stop = _stop_ids(model, tokenizer)
    # Greedy on our processed scores; neutral values so model defaults add no other processor.
    config = GenerationConfig(
        do_sample=False, max_new_tokens=params.max_new_tokens, repetition_penalty=1.0,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=stop,
    )  # fmt: skip
    processors = LogitsProcessorList()
    if params.temperature > 0:
        processors.append(GumbelSampler(seeds, k, params.temperature, params.top_p))
    out = model.generate(  # type: ignore[operator]
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        generation_config=config,
        logits_processor=processors,
    )  # [R, T + new]
    new = out[:, input_ids.shape[1] :].tolist()
    done = [_completion(ids, stop, tokenizer) for ids in new]
    return [done[i * k : (i + 1) * k] for i in range(len(prompt_ids))]


def generate_completions(
    model: nn.Module,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    seeds: Sequence[int],
    params: SamplingParams,
    *,
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "generating",
) -> list[list[Completion]]:
    """Sample `params.num_samples` responses per prompt, prompt i with `seeds[i]`.

    Prompts are batched by length (less padding); results come back in input order and do not
    depend on the batching. The model runs in eval mode under `torch.inference_mode` and is put
    back in its previous mode afterwards.

    Args:
        model: A causal LM (or a peft model), on the device to use.
        tokenizer: Its tokenizer (pad and EOS tokens set).
        prompt_ids: Encoded prompts (see `encode_prompt`).
        seeds: One seed per prompt.
        params: Sampling settings.
        batch_size: Prompts per `generate` call (each brings num_samples rows).
        progress: Show a tqdm bar.
        desc: The bar's label.

    Returns:
        For each prompt, its samples.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    device = next(model.parameters()).device
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    results: list[list[Completion]] = [[] for _ in prompt_ids]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), tqdm(total=len(order), desc=desc, disable=not progress) as bar:
            for start in range(0, len(order), batch_size):
                chosen = order[start : start + batch_size]
                batch = [prompt_ids[i] for i in chosen]
                got = _generate_batch(
                    model, tokenizer, batch, [seeds[i] for i in chosen], params, device
                )
                for i, samples in zip(chosen, got, strict=True):
                    results[i] = samples
                bar.update(len(chosen))
    finally:
        model.train(was_training)
    return results


@contextlib.contextmanager
def adapter_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """The same model with its peft adapters switched off (the LoRA base): no second copy."""
    disable = getattr(model, "disable_adapter", None)
    if disable is None:
        raise ConfigError("the model has no adapter to disable")
    with disable():
        yield model


def generate_side_by_side(
    policy: nn.Module,
    reference: nn.Module | None,
    tokenizer: Any,
    prompts: Sequence[Text],
    params: SamplingParams,
    *,
    adapter_reference: bool = False,
    batch_size: int = 8,
    progress: bool = False,
) -> list[PromptSamples]:
    """Sample from the policy and the reference on the same prompts with the same seeds.

    Args:
        policy: The policy model.
        reference: A separate reference model, or None.
        tokenizer: The tokenizer both share.
        prompts: Prompts (text or messages); prompt i samples with `params.seed + i`.
        params: Sampling settings.
        adapter_reference: Use the policy with its adapters disabled as the reference.
        batch_size: Prompts per generate call.
        progress: Show progress bars.

    Returns:
        One `PromptSamples` per prompt, in order (`reference` empty without a reference).
    """
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    seeds = [params.seed + i for i in range(len(prompts))]
    kwargs: dict[str, Any] = {"batch_size": batch_size, "progress": progress}
    pol = generate_completions(policy, tokenizer, ids, seeds, params, desc="policy", **kwargs)
    ref: list[list[Completion]] = [[] for _ in prompts]
    if adapter_reference:
        with adapter_disabled(policy) as base:
            ref = generate_completions(base, tokenizer, ids, seeds, params, desc="reference",
                                       **kwargs)  # fmt: skip
    elif reference is not None:
        ref = generate_completions(reference, tokenizer, ids, seeds, params, desc="reference",
                                   **kwargs)  # fmt: skip
    return [
        PromptSamples(i, p, seeds[i], tuple(ids[i]), pol[i], ref[i]) for i, p in enumerate(prompts)
    ]
