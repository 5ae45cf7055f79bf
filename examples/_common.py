"""Shared plumbing of the example scripts: arguments, a tiny offline model, training, output.

Nothing here is experiment logic; each script keeps its own. The tiny model is a randomly
initialised 2-layer Llama with a word-level tokenizer built from the words the script uses, so
the examples (and their tests) need no download.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: the examples only write PNG files

ROOT = Path(__file__).resolve().parent.parent
"""The repository root (the bundled data files are read from there)."""


def make_parser(name: str, description: str) -> argparse.ArgumentParser:
    """The arguments every example takes: --out DIR, --fast, --threads N, --verbose."""
    p = argparse.ArgumentParser(prog=f"examples/{name}.py", description=description)
    p.add_argument(
        "--out",
        type=Path,
        default=Path("outputs/examples") / name,
        help=f"output folder for result.png, result.md and runs (default outputs/examples/{name})",
    )
    p.add_argument("--fast", action="store_true", help="tiny sizes: seconds, for the tests")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--verbose", action="store_true", help="show prefopt's log and progress bars")
    return p


def setup(args: argparse.Namespace) -> Path:
    """Apply --threads; create and return the output folder."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    return out


@contextlib.contextmanager
def quiet(verbose: bool) -> Iterator[None]:
    """Unless `verbose`, hide library logs below ERROR and transformers' progress bars; the
    previous settings come back on exit (the tests run the examples in-process)."""
    from transformers.utils import logging as hf_logging

    if verbose:
        yield
        return
    loggers = [logging.getLogger(n) for n in ("prefopt", "transformers", "peft", "accelerate")]
    levels = [lg.level for lg in loggers]
    bars = hf_logging.is_progress_bar_enabled()
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()  # "Loading weights" bars on every model load
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()


# ---------------------------------------------------------------------------------------------
# A tiny offline model


def make_tiny_model(folder: Path, words: Iterable[str], *, seed: int = 0, hidden: int = 32) -> Path:
    """Save a random 2-layer Llama and a word-level tokenizer over `words` into `folder`.

    The tokenizer splits on whitespace; its specials are <pad> (0), <unk> (1) and </s> (2, EOS).
    It has no chat template and no BOS, so plain-text rows are prompt text + response text + EOS.
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(set(words) - set(specials)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, tie_word_embeddings=True,
        pad_token_id=0, bos_token_id=None, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Write rows as JSON lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# Training through prefopt


def train_run(out_dir: Path, overrides: Sequence[str], *, verbose: bool = False) -> Path:
    """Train with prefopt's own loop into a fresh `out_dir` (`prefopt train k=v ...`).

    Returns:
        The run's output folder (metrics.jsonl, model/, report).
    """
    from prefopt.config_io import load_config
    from prefopt.trainer import train

    if out_dir.exists():  # the example owns this folder: start each run clean
        shutil.rmtree(out_dir)
    settings = [f"output.dir={out_dir}", f"output.progress={str(verbose).lower()}", *overrides]
    train(load_config(None, settings))
    return out_dir


def train_records(run_dir: Path, key: str) -> list[float]:
    """The per-step values of `key` among the run's train records, in step order."""
    from prefopt.tracking import read_metrics

    records = [r for r in read_metrics(run_dir) if r.get("split") == "train" and key in r]
    return [float(r[key]) for r in sorted(records, key=lambda r: r["step"])]


# ---------------------------------------------------------------------------------------------
# Small statistics and output


def ranks(values: Sequence[float]) -> list[float]:
    """Ranks 1..n (ties get their average rank)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation (NaN when either side is constant)."""
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation: Pearson on ranks."""
    return pearson(ranks(x), ranks(y))


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats printed with 3 significant decimals."""

    def cell(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_result(out: Path, title: str, body: str, fig: Any) -> None:
    """Save `fig` as out/result.png and a markdown page (title, body, the image) as result.md."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(out / "result.png", dpi=110)
    plt.close(fig)
    text = f"# {title}\n\n{body.strip()}\n\n![result](result.png)\n"
    (out / "result.md").write_text(text, encoding="utf-8")
