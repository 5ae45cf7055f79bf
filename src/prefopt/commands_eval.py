"""`prefopt generate` and `prefopt score`: look at what a trained policy does.

* generate: sample policy and reference side by side (same prompts, same seeds) -> JSONL + HTML.
* score: the DPO implicit reward β·(log π(y|x) − log π_ref(y|x)) of given responses, ranked per
  prompt.

`prefopt judge` lives in `commands_judge`, the shared model loading in `cli_models`. Each
`add_*_parser(sub)` registers its sub-command; the handler returns an exit code. torch and
transformers are imported inside the handlers, so building the parser (`--help`) stays fast.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from prefopt.cli_models import (
    LoadedModels,
    add_model_args,
    add_sampling_args,
    as_json,
    load_models,
    run_meta,
    side_by_side,
    write_jsonl,
)
from prefopt.commands_judge import add_judge_parser
from prefopt.data.records import Text
from prefopt.errors import ConfigError, DataError

__all__ = [
    "LoadedModels",
    "add_generate_parser",
    "add_judge_parser",
    "add_score_parser",
    "load_models",
    "load_scored_rows",
]


# ---------------------------------------------------------------------------------------------
# prefopt generate


def cmd_generate(args: argparse.Namespace) -> int:
    """Sample side by side and write JSONL (and HTML)."""
    from prefopt.samples_output import write_html, write_samples_jsonl

    if not args.model:
        raise ConfigError("--model is required")
    models, params, prompts, samples = side_by_side(args, need_reference=False)
    write_samples_jsonl(samples, args.output)
    if args.html:
        meta = run_meta(args, models, params, len(prompts))
        write_html(samples, args.html, title="prefopt generate", meta=meta)
    cut = sum(not c.finished for s in samples for c in s.policy)
    print(f"{len(samples)} prompts × {params.num_samples} samples -> {args.output}")
    if cut:
        print(f"{cut} policy samples reached --max-new-tokens before EOS")
    return 0


def add_generate_parser(sub: Any) -> argparse.ArgumentParser:
    """Register `prefopt generate` on an argparse sub-parsers object."""
    p = sub.add_parser("generate", help="sample policy and reference side by side")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--output", required=True, help="side-by-side samples (JSONL)")
    p.add_argument("--html", help="also write a readable HTML page here")
    p.set_defaults(func=cmd_generate)
    return p


# ---------------------------------------------------------------------------------------------
# prefopt score


def load_scored_rows(path: str) -> list[tuple[Text, Text]]:
    """(prompt, response) per row: "prompt", and "response" (or "completion"), each text or chat
    messages (a response as messages: assistant turns only).

    Raises:
        DataError: naming the file, row and field at fault.
    """
    from prefopt.data.fields import (
        RowContext,
        check_messages,
        check_response_messages,
        check_text,
        get_column,
    )
    from prefopt.data.loading import read_rows

    out: list[tuple[Text, Text]] = []
    for i, row in enumerate(read_rows(path)):
        ctx = RowContext(path, i)
        if not isinstance(row, dict):
            raise ctx.error("expected a row object with 'prompt' and 'response'")
        key = "completion" if "completion" in row and "response" not in row else "response"
        raw_prompt, raw_response = get_column(row, "prompt", ctx), get_column(row, key, ctx)
        prompt: Text
        response: Text
        if isinstance(raw_prompt, list):
            prompt = check_messages(raw_prompt, "prompt", ctx)
        else:
            prompt = check_text(raw_prompt, "prompt", ctx)
        if isinstance(raw_response, list):
            response = check_response_messages(raw_response, key, ctx)
        else:
            response = check_text(raw_response, key, ctx)
        out.append((prompt, response))
    if not out:
        raise DataError("no rows", file=path)
    return out


def cmd_score(args: argparse.Namespace) -> int:
    """Implicit rewards of given responses, ranked within each prompt."""
    from prefopt.logprobs import SequenceLogprobModel
    from prefopt.winrate import implicit_rewards, rank_within_groups, score_responses

    if not args.model:
        raise ConfigError("--model is required")
    rows = load_scored_rows(args.data)
    prompts, responses = [r[0] for r in rows], [r[1] for r in rows]
    models = load_models(args.model, args.ref, dtype=args.dtype, device=args.device)
    kw: dict[str, Any] = {"batch_size": args.batch_size, "max_length": args.max_length}
    scorer = SequenceLogprobModel(models.policy)
    pol, tokens = score_responses(scorer, models.tokenizer, prompts, responses, **kw)
    with models.as_reference() as ref_model:
        ref_scorer = scorer if ref_model is models.policy else SequenceLogprobModel(ref_model)
        ref, _ = score_responses(ref_scorer, models.tokenizer, prompts, responses, **kw)
    reward, per_token = implicit_rewards(pol, ref, tokens, args.beta)
    keys = [json.dumps(as_json(p), sort_keys=True) for p in prompts]
    ranks = rank_within_groups(keys, (per_token if args.normalize else reward).tolist())
    out = []
    for i, ((prompt, response), (rank, n)) in enumerate(zip(rows, ranks, strict=True)):
        out.append({
            "index": i, "prompt": as_json(prompt), "response": as_json(response),
            "policy_logps": pol[i].item(), "ref_logps": ref[i].item(), "tokens": int(tokens[i]),
            "reward": reward[i].item(), "reward_per_token": per_token[i].item(),
            "rank": rank, "candidates": n,
        })  # fmt: skip
    write_jsonl(args.output, out)
    by = "per-token reward" if args.normalize else "reward"
    print(
        f"scored {len(rows)} responses to {len(set(keys))} prompts (β={args.beta}, ranked by "
        f"{by}); mean reward {reward.mean().item():.4f} -> {args.output}"
    )
    return 0


def add_score_parser(sub: Any) -> argparse.ArgumentParser:
    """Register `prefopt score` on an argparse sub-parsers object."""
    p = sub.add_parser("score", help="implicit DPO reward of given responses, ranked per prompt")
    add_model_args(p)
    p.add_argument(
        "--data", required=True, help="rows with 'prompt' and 'response' (or 'completion')"
    )
    p.add_argument("--beta", type=float, default=0.1, help="β of the reward (default 0.1)")
    p.add_argument(
        "--normalize", action="store_true", help="rank by reward per response token instead"
    )
    p.add_argument("--max-length", type=int, default=2048, help="tokens per row, at most")
    p.add_argument("--output", required=True, help="scores (JSONL)")
    p.set_defaults(func=cmd_score)
    return p
