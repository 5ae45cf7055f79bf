"""Tiny random causal LMs and learnable preference data for end-to-end tests (no download)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PreTrainedModel,
    Qwen2Config,
)

from toy import TOY_VOCAB_SIZE, make_tokenizer


def make_config(family: str = "llama", vocab_size: int = TOY_VOCAB_SIZE) -> Any:
    """A 2-layer, 32-wide config of the given family (Llama, Qwen2 or GPT-2)."""
    if family == "llama":
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=5,
        )  # fmt: skip
    if family == "qwen2":
        return Qwen2Config(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            tie_word_embeddings=False, pad_token_id=0, eos_token_id=5,
        )  # fmt: skip
    if family == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=256,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, eos_token_id=5,
        )  # fmt: skip
    raise ValueError(family)


def make_model(family: str = "llama", seed: int = 0) -> PreTrainedModel:
    """Random-weight tiny model, deterministic in `seed`."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(make_config(family))


def save_toy_model(folder: Path, family: str = "llama", seed: int = 0) -> Path:
    """Save a tiny model + the chat toy tokenizer as a transformers folder."""
    make_model(family, seed).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


SUBJECTS = ["cat", "dog", "bird", "fish", "tree", "sun", "moon", "apple", "book", "song"]


def learnable_pairs(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Conversational pairs with an easy rule: chosen is kind ("good …"), rejected rude."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        subject = rng.choice(SUBJECTS)
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"tell me about the {subject}"}],
                "chosen": [{"role": "assistant", "content": f"the {subject} is good and nice ."}],
                "rejected": [{"role": "assistant", "content": f"the {subject} is bad and rude ."}],
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def train_lines(out: Path) -> list[dict[str, Any]]:
    """The training-step records of a run's `metrics.jsonl`, in order."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("split") == "train"]


def toy_assets(root: Path, n_train: int = 24) -> dict[str, Path]:
    """The toy run's files under `root`: a Llama ("model"), `n_train` learnable pairs ("train",
    seed 0) and 8 held-out ones ("eval", seed 1), as `toy_train` takes them."""
    return {
        "model": save_toy_model(root / "model", "llama", seed=0),
        "train": write_jsonl(root / "train.jsonl", learnable_pairs(n_train, seed=0)),
        "eval": write_jsonl(root / "eval.jsonl", learnable_pairs(8, seed=1)),
    }


def toy_train(assets: dict[str, Path], out: Path, *overrides: str) -> Any:
    """`prefopt.trainer.train` on toy assets ("model", "train", "eval" paths) into `out`: lr 1e-2,
    no warm-up, 4 pairs per step, 3 epochs, no progress bar; `overrides` come last and win."""
    from prefopt.config_io import load_config
    from prefopt.trainer import train

    base = [
        f"model.name_or_path={assets['model']}",
        f"data.train={assets['train']}",
        f"data.eval={assets['eval']}",
        f"output.dir={out}",
        "optim.lr=1e-2",
        "optim.warmup_ratio=0",
        "train.batch_size=4",
        "train.epochs=3",
        "output.progress=false",
    ]
    return train(load_config(None, base + list(overrides)))
