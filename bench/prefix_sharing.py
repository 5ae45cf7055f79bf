"""Time forward + backward of two-pass vs shared-prefix scoring on a SmolLM2-135M-shaped model.

A randomly initialised Llama with SmolLM2-135M's shapes (hidden 576, 30 layers, 9 heads / 3 kv
heads, intermediate 1536, vocab 49152, tied embeddings), 4 pairs of random tokens per case.
The two methods are interleaved (A B A B ...) after one warm-up each, so slow drift of a shared,
noisy machine hits both alike; the ratio two-pass / shared is the number to read.

    .venv/bin/python bench/prefix_sharing.py                  # CPU, 2 threads, fp32, sdpa
    .venv/bin/python bench/prefix_sharing.py --device cuda --dtype bfloat16 --reps 10
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from prefopt.collate import collate_pairs
from prefopt.logprobs import SequenceLogprobModel
from prefopt.prefix_sharing import collate_shared_prefix, shared_prefix_logps
from prefopt.tokenize import TokenizedPair

VOCAB = 49152
# prompt tokens + tokens per response; the middle cases bracket the break-even ratio that
# `train.prefix_sharing=auto` uses (prefopt.prefix_sharing.AUTO_MIN_PROMPT_RATIO).
CASES = {
    "64+192": (64, 192),
    "128+128": (128, 128),
    "192+96": (192, 96),
    "768+128": (768, 128),
}


def smollm2_135m_shaped(attn: str, dtype: torch.dtype, device: str) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
        tie_word_embeddings=True, rope_theta=100000.0, attn_implementation=attn,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).train()


def random_pairs(prompt: int, response: int, n: int = 4) -> list[TokenizedPair]:
    g = torch.Generator().manual_seed(prompt * 1000 + response)

    def ids(k: int) -> tuple[int, ...]:
        return tuple(torch.randint(1, VOCAB, (k,), generator=g).tolist())

    return [TokenizedPair(i, ids(prompt), ids(response), ids(response)) for i in range(n)]


def step_fns(
    model: LlamaForCausalLM, pairs: list[TokenizedPair], device: str
) -> dict[str, Callable[[], None]]:
    """One forward + backward per method (collation outside the timed region)."""
    rows = collate_pairs(pairs, pad_token_id=0).to(device)
    shared = collate_shared_prefix(pairs, pad_token_id=0).to(device)
    scorer = SequenceLogprobModel(model)

    def two_pass() -> None:
        logps, _ = scorer(rows.input_ids, rows.attention_mask, rows.response_mask)
        logps.sum().backward()

    def prefix_shared() -> None:
        chosen, rejected, _, _ = shared_prefix_logps(model, shared)
        (chosen.sum() + rejected.sum()).backward()

    return {"two-pass": two_pass, "shared": prefix_shared}


def timed(fn: Callable[[], None], model: torch.nn.Module, device: str) -> float:
    model.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run_case(name: str, model: LlamaForCausalLM, args: argparse.Namespace) -> None:
    prompt, response = CASES[name]
    fns = step_fns(model, random_pairs(prompt, response), args.device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up
        timed(fn, model, args.device)
    for rep in range(args.reps):
        for key, fn in fns.items():
            times[key].append(timed(fn, model, args.device))
            print(f"  [{name} rep {rep + 1}] {key}: {times[key][-1]:.2f}s", flush=True)
    two, shared = (statistics.median(times[k]) for k in ("two-pass", "shared"))
    rows = f"2-pass rows [8, {prompt + response}], shared rows [4, {prompt + 2 * response}]"
    print(f"{name}: {rows}")
    for key, values in times.items():
        print(f"  {key:9s} " + " ".join(f"{v:7.2f}s" for v in values))
    print(f"  median two-pass / shared = {two / shared:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per method")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    parser.add_argument("--attn", default="sdpa", help="attn_implementation: sdpa or eager")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = smollm2_135m_shaped(args.attn, getattr(torch, args.dtype), args.device)
    print(f"{args.device} {args.dtype} {args.attn}, {args.threads} threads, {args.reps} reps")
    for name in args.cases:
        run_case(name, model, args)


if __name__ == "__main__":
    main()
