"""`prefopt judge` (and `prefopt eval --judge`): does the policy's output beat the reference's?

Policy and reference sample the same prompts with the same seeds; judges score both sides; the
win rate (one comparison per prompt, ties apart) comes with a 95% Wilson interval, the mean score
of each side, and a KL estimate of the policy from the reference on the policy's own samples (the
DPO paper's reward–KL view). With `--models A B C ...`, models (model folders or training
checkpoints) are ranked by a Bradley–Terry fit of their pairwise outcomes.
"""

from __future__ import annotations

import argparse
import gc
from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from prefopt.cli_models import (
    LoadedModels,
    add_model_args,
    add_sampling_args,
    as_json,
    load_models,
    read_prompts,
    run_meta,
    sampling_params,
    side_by_side,
    write_json,
    write_jsonl,
)
from prefopt.data.records import Text
from prefopt.errors import ConfigError
from prefopt.judges import BUILTIN_JUDGES, Judge, judge_samples, make_judge

if TYPE_CHECKING:
    from prefopt.generation import PromptSamples
    from prefopt.winrate import KLEstimate

__all__ = ["add_judge_args", "add_judge_parser", "cmd_judge", "judge_vs_reference", "make_judges"]


def _prompt_means(samples: Sequence[PromptSamples], name: str, side: str) -> list[float]:
    """Each prompt's mean score over its samples: one comparison unit per prompt."""
    return [sum(v) / len(v) for s in samples for v in [s.scores[name][side]]]


def _kl(models: LoadedModels, samples: Sequence[PromptSamples], batch_size: int) -> KLEstimate:
    """KL estimate on the policy's samples: the exact sampled ids, scored by both models."""
    from prefopt.logprobs import SequenceLogprobModel
    from prefopt.winrate import kl_estimate, score_token_ids

    prompt_ids = [s.prompt_ids for s in samples for _ in s.policy]
    response_ids = [c.token_ids for s in samples for c in s.policy]
    kw = {"pad_token_id": models.tokenizer.pad_token_id, "batch_size": batch_size}
    scorer = SequenceLogprobModel(models.policy)
    policy_logps, tokens = score_token_ids(scorer, prompt_ids, response_ids, **kw)
    with models.as_reference() as ref_model:
        ref_scorer = scorer if ref_model is models.policy else SequenceLogprobModel(ref_model)
        ref_logps, _ = score_token_ids(ref_scorer, prompt_ids, response_ids, **kw)
    return kl_estimate(policy_logps, ref_logps, tokens)


def judge_vs_reference(
    args: argparse.Namespace, judges: list[Judge]
) -> tuple[dict[str, Any], list[str]]:
    """Sample policy and reference side by side, judge both, estimate the KL.

    Reads the model and sampling arguments of `add_model_args`/`add_sampling_args`, and writes
    `--samples` (JSONL) and `--html` when given.

    Returns:
        The report (per judge: win/tie/loss, the win rate and its 95% interval, both means; the
        KL estimate) and the lines of its printed table.
    """
    from prefopt.samples_output import write_html, write_samples_jsonl
    from prefopt.winrate import win_rate

    models, params, prompts, samples = side_by_side(args, need_reference=True)
    report: dict[str, Any] = {
        "model": args.model,
        "reference": args.ref or "adapter disabled",
        "prompts": args.prompts,
        "num_prompts": len(prompts),
        "sampling": asdict(params),
        "comparison_unit": "prompt (mean score over its samples)",
        "judges": {},
    }
    lines = [f"{'judge':<24}{'policy':>9}{'ref':>9}  policy vs reference, one comparison/prompt"]
    for judge in judges:
        judge_samples(judge, samples)
        pol = _prompt_means(samples, judge.name, "policy")
        ref = _prompt_means(samples, judge.name, "reference")
        wr = win_rate(pol, ref, tie_eps=args.tie_eps)
        pol_mean, ref_mean = sum(pol) / len(pol), sum(ref) / len(ref)
        means = {"policy_mean": pol_mean, "reference_mean": ref_mean}
        report["judges"][judge.name] = {**means, **wr.to_dict()}
        lines.append(f"{judge.name:<24}{pol_mean:>9.3f}{ref_mean:>9.3f}  {wr}")
    kl = _kl(models, samples, args.batch_size)
    report["kl"] = kl.to_dict()
    lines.append(
        f"KL(policy ‖ reference) on {kl.num_samples} policy samples: {kl.per_sequence:.4f} "
        f"per response, {kl.per_token:.4f} per token"
    )
    if args.samples:
        write_samples_jsonl(samples, args.samples)
    if args.html:
        meta = run_meta(args, models, params, len(prompts)) + "\n\n" + "\n".join(lines)
        write_html(samples, args.html, title="prefopt judge", meta=meta)
    return report, lines


def _sample_models(args: argparse.Namespace, prompts: list[Text]) -> dict[str, list[list[str]]]:
    """model -> per prompt, its sampled texts; one model in memory at a time, same seeds."""
    import torch

    from prefopt.generation import encode_prompt, generate_completions

    params = sampling_params(args)
    seeds = [params.seed + i for i in range(len(prompts))]
    texts: dict[str, list[list[str]]] = {}
    for location in args.models:
        models = load_models(
            location, None, dtype=args.dtype, device=args.device, need_reference=False
        )
        ids = [encode_prompt(models.tokenizer, p) for p in prompts]
        done = generate_completions(
            models.policy, models.tokenizer, ids, seeds, params,
            batch_size=args.batch_size, progress=not args.quiet, desc=location,
        )  # fmt: skip
        texts[location] = [[c.text for c in cs] for cs in done]
        del models, done
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return texts


def _score_texts(judge: Judge, prompts: list[Text], outs: list[list[str]]) -> list[list[float]]:
    flat = judge.score_batch([p for p, o in zip(prompts, outs, strict=True) for _ in o],
                             [t for o in outs for t in o])  # fmt: skip
    k = len(outs[0])
    return [flat[i * k : (i + 1) * k] for i in range(len(outs))]


def _judge_many(args: argparse.Namespace, judges: list[Judge]) -> int:
    from prefopt.winrate import bradley_terry, format_ranking, pairwise_comparisons, win_rate

    if len(args.models) < 2 or len(set(args.models)) < len(args.models):
        raise ConfigError("--models needs at least two distinct checkpoints")
    prompts = read_prompts(args)
    texts = _sample_models(args, prompts)
    report: dict[str, Any] = {"models": args.models, "prompts": args.prompts, "judges": {}}
    report["sampling"] = asdict(sampling_params(args))
    scores: dict[str, dict[str, list[list[float]]]] = {}
    for judge in judges:
        scores[judge.name] = {m: _score_texts(judge, prompts, texts[m]) for m in args.models}
        per_prompt = {m: [sum(v) / len(v) for v in s] for m, s in scores[judge.name].items()}
        strengths = bradley_terry(pairwise_comparisons(per_prompt, tie_eps=args.tie_eps))
        means = {m: sum(v) / len(v) for m, v in per_prompt.items()}
        ranking = [
            {"model": m, "strength": p, "mean_score": means[m]} for m, p in strengths.items()
        ]
        pairwise = [
            {"a": a, "b": b, **win_rate(per_prompt[a], per_prompt[b], args.tie_eps).to_dict()}
            for i, a in enumerate(args.models)
            for b in args.models[i + 1 :]
        ]
        report["judges"][judge.name] = {"ranking": ranking, "pairwise": pairwise}
        print(f"== {judge.name}: Bradley–Terry ranking over {len(prompts)} prompts ==")
        print(format_ranking(strengths, means))
    write_json(args.output, report)
    if args.samples:
        write_jsonl(args.samples, [
            {"index": i, "prompt": as_json(p), "samples": {m: texts[m][i] for m in args.models},
             "scores": {j: {m: scores[j][m][i] for m in args.models} for j in scores}}
            for i, p in enumerate(prompts)
        ])  # fmt: skip
    return 0


def cmd_judge(args: argparse.Namespace) -> int:
    """Win rate of --model vs its reference, or a ranking of --models."""
    if bool(args.model) == bool(args.models):
        raise ConfigError("give either --model (vs its reference) or --models A B C (a ranking)")
    judges = make_judges(args.judge, device=args.device)
    if args.models:
        return _judge_many(args, judges)
    report, lines = judge_vs_reference(args, judges)
    write_json(args.output, report)
    print("\n".join(lines))
    return 0


def make_judges(specs: Sequence[str] | None, *, device: str | None = None) -> list[Judge]:
    """The judges named by repeated `--judge` specs (default: vader).

    Args:
        specs: Judge specs.
        device: Where a reward-model judge runs: `--device` ("auto" or None: CUDA if
            available, else CPU).

    Raises:
        ConfigError: The same judge named twice, or an unknown spec.
    """
    where = None if device in (None, "auto") else device
    judges = [make_judge(spec, device=where) for spec in (specs or ["vader"])]
    if len({j.name for j in judges}) < len(judges):
        raise ConfigError("the same judge is given twice")
    return judges


def add_judge_args(p: argparse.ArgumentParser) -> None:
    """`--judge`, `--tie-eps`, `--samples` and `--html`: shared by `judge` and `eval --judge`."""
    p.add_argument("--judge", action="append", help="judge spec, repeatable (default: vader)")
    p.add_argument("--tie-eps", type=float, default=0.0, help="score gaps <= this are ties")
    p.add_argument("--samples", help="also write the samples and their scores (JSONL)")
    p.add_argument("--html", help="also write a readable HTML page (with --model)")


def add_judge_parser(sub: Any) -> argparse.ArgumentParser:
    """Register `prefopt judge` on an argparse sub-parsers object."""
    listing = "; ".join(f"{k}: {v}" for k, v in BUILTIN_JUDGES.items())
    p = sub.add_parser(
        "judge", help="win rate of a policy vs its reference", description=f"Judges: {listing}"
    )
    add_model_args(p)
    p.add_argument(
        "--models",
        nargs="+",
        help="rank these instead (Bradley–Terry): model folders or training checkpoints",
    )
    add_sampling_args(p)
    add_judge_args(p)
    p.add_argument("--output", required=True, help="report (JSON)")
    p.set_defaults(func=cmd_judge)
    return p
