"""`prefopt generate`, `prefopt judge` and `prefopt score`: look at what a trained policy does.

* generate: sample policy and reference side by side (same prompts, same seeds) -> JSONL + HTML.
* judge: generate, score both sides with judges, report the win rate with a 95% interval, mean
  scores and a KL estimate; with `--models A B C ...`, rank checkpoints by Bradley–Terry.
* score: the DPO implicit reward β·(log π(y|x) − log π_ref(y|x)) of given responses, ranked per
  prompt.

Each `add_*_parser(sub)` registers its sub-command; the handler returns an exit code. torch and
transformers are imported inside the handlers, so building the parser (`--help`) stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from prefopt.data.records import Text
from prefopt.errors import ConfigError, DataError
from prefopt.judges import BUILTIN_JUDGES, Judge, judge_samples, make_judge

if TYPE_CHECKING:
    from torch import nn

    from prefopt.generation import PromptSamples, SamplingParams
    from prefopt.winrate import KLEstimate

__all__ = [
    "LoadedModels",
    "add_generate_parser",
    "add_judge_parser",
    "add_score_parser",
    "load_models",
    "load_scored_rows",
]

logger = logging.getLogger(__name__)

_REF_HELP = "reference model (default: the adapter's base, if --model is a LoRA adapter folder)"


# ---------------------------------------------------------------------------------------------
# Models


@dataclass
class LoadedModels:
    """A policy, its reference, and their tokenizer.

    Attributes:
        policy: The policy (a causal LM, or a peft model on its base), eval mode, on device.
        reference: A separately loaded reference, or None.
        tokenizer: The policy's tokenizer.
        adapter_reference: The reference is the policy with its adapters disabled.
    """

    policy: nn.Module
    reference: nn.Module | None
    tokenizer: Any
    adapter_reference: bool = False

    @property
    def has_reference(self) -> bool:
        return self.adapter_reference or self.reference is not None

    @contextlib.contextmanager
    def as_reference(self) -> Iterator[nn.Module]:
        """The reference: the adapter-off policy (only inside this context), or the other model."""
        from prefopt.generation import adapter_disabled

        if self.adapter_reference:
            with adapter_disabled(self.policy) as base:
                yield base
        elif self.reference is not None:
            yield self.reference
        else:
            raise ConfigError("no reference model")


def _is_adapter(location: str) -> bool:
    return (Path(location) / "adapter_config.json").is_file()


def _model_cfg(location: str, dtype: str) -> Any:
    """The slice of a run config that `load_policy` and `load_tokenizer` read."""
    from prefopt.config import ModelConfig

    return SimpleNamespace(model=ModelConfig(name_or_path=location, dtype=dtype))  # type: ignore[arg-type]


def _tokenizer(location: str, dtype: str) -> Any:
    """The tokenizer saved with a model; an adapter folder without one falls back to its base."""
    from prefopt.models import load_tokenizer

    folder = Path(location)
    if _is_adapter(location) and not (folder / "tokenizer_config.json").is_file():
        adapter_cfg = json.loads((folder / "adapter_config.json").read_text())
        location = adapter_cfg["base_model_name_or_path"]
    return load_tokenizer(_model_cfg(location, dtype).model)


def load_models(
    model: str,
    ref: str | None,
    *,
    dtype: str = "float32",
    device: str = "auto",
    need_reference: bool = True,
) -> LoadedModels:
    """Load a policy (a model folder, or a LoRA adapter folder on its base) and its reference.

    Without `ref`, an adapter policy's reference is the same model with the adapter disabled
    (no second copy); a full model then has no reference, an error if `need_reference`.

    Raises:
        ConfigError: No reference where one is needed, or policy and reference tokenizers differ.
    """
    import torch

    from prefopt.evaluation import load_policy
    from prefopt.models import freeze

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if ref is None and need_reference and not _is_adapter(model):
        raise ConfigError(
            f"{model} is a full model, so its reference is not implied: pass --ref (usually the "
            "model training started from), or give a LoRA adapter folder as --model"
        )
    tokenizer = _tokenizer(model, dtype)
    policy = freeze(load_policy(_model_cfg(model, dtype), model)).to(device)
    reference = None
    if ref is not None:
        if _tokenizer(ref, dtype).get_vocab() != tokenizer.get_vocab():
            raise ConfigError(f"--ref {ref} has a different tokenizer from --model {model}")
        reference = freeze(load_policy(_model_cfg(ref, dtype), ref)).to(device)
    adapter_ref = ref is None and hasattr(policy, "disable_adapter")
    return LoadedModels(policy, reference, tokenizer, adapter_ref)


# ---------------------------------------------------------------------------------------------
# Shared arguments


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="policy: a model folder, or a LoRA adapter folder")
    p.add_argument("--ref", help=_REF_HELP)
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights"
    )
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda")
    p.add_argument("--batch-size", type=int, default=8, help="prompts/rows per forward pass")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--prompts", required=True, help="file of rows with 'prompt': text or chat messages"
    )
    p.add_argument("--max-prompts", type=int, help="use only the first N prompts")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus mass (default 0.9)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens per response")
    p.add_argument("--num-samples", type=int, default=1, help="responses per prompt and model")
    p.add_argument("--seed", type=int, default=0, help="prompt i samples with seed + i")


def _params(args: argparse.Namespace) -> SamplingParams:
    from prefopt.generation import SamplingParams

    return SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        num_samples=args.num_samples,
        seed=args.seed,
    )


def _prompts(args: argparse.Namespace) -> list[Text]:
    from prefopt.generation import load_prompts

    prompts = load_prompts(args.prompts)
    return prompts[: args.max_prompts] if args.max_prompts else prompts


def _meta(args: argparse.Namespace, params: SamplingParams, n: int) -> str:
    ref = args.ref or ("the adapter's base" if _is_adapter(args.model) else "none")
    sampling = ", ".join(f"{k}={v}" for k, v in asdict(params).items())
    return f"policy: {args.model}\nreference: {ref}\nprompts: {args.prompts} ({n})\n{sampling}"


def _write_json(path: str, payload: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


def _write_jsonl(path: str, rows: Sequence[dict[str, Any]]) -> None:
    Path(path).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _as_json(value: Text) -> Any:
    return value if isinstance(value, str) else list(value)


def _side_by_side(args: argparse.Namespace, need_reference: bool) -> Any:
    """Load models and sample both sides: (models, params, prompts, samples)."""
    from prefopt.generation import generate_side_by_side

    params, prompts = _params(args), _prompts(args)
    models = load_models(
        args.model, args.ref, dtype=args.dtype, device=args.device, need_reference=need_reference
    )
    if not models.has_reference:
        logger.warning("no reference (pass --ref, or an adapter as --model): policy samples only")
    samples = generate_side_by_side(
        models.policy,
        models.reference,
        models.tokenizer,
        prompts,
        params,
        adapter_reference=models.adapter_reference,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    return models, params, prompts, samples


# ---------------------------------------------------------------------------------------------
# prefopt generate


def cmd_generate(args: argparse.Namespace) -> int:
    """Sample side by side and write JSONL (and HTML)."""
    from prefopt.generation import write_html, write_samples_jsonl

    if not args.model:
        raise ConfigError("--model is required")
    _, params, prompts, samples = _side_by_side(args, need_reference=False)
    write_samples_jsonl(samples, args.output)
    if args.html:
        meta = _meta(args, params, len(prompts))
        write_html(samples, args.html, title="prefopt generate", meta=meta)
    cut = sum(not c.finished for s in samples for c in s.policy)
    print(f"{len(samples)} prompts × {params.num_samples} samples -> {args.output}")
    if cut:
        print(f"{cut} policy samples reached --max-new-tokens before EOS")
    return 0


def add_generate_parser(sub: Any) -> argparse.ArgumentParser:
    """Register `prefopt generate` on an argparse sub-parsers object."""
    p = sub.add_parser("generate", help="sample policy and reference side by side")
    _add_model_args(p)
    _add_sampling_args(p)
    p.add_argument("--output", required=True, help="side-by-side samples (JSONL)")
    p.add_argument("--html", help="also write a readable HTML page here")
    p.set_defaults(func=cmd_generate)
    return p


# ---------------------------------------------------------------------------------------------
# prefopt judge


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


def _judge_pair(args: argparse.Namespace, judges: list[Judge]) -> int:
    from prefopt.generation import write_html, write_samples_jsonl
    from prefopt.winrate import win_rate

    models, params, prompts, samples = _side_by_side(args, need_reference=True)
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
    _write_json(args.output, report)
    if args.samples:
        write_samples_jsonl(samples, args.samples)
    if args.html:
        meta = _meta(args, params, len(prompts)) + "\n\n" + "\n".join(lines)
        write_html(samples, args.html, title="prefopt judge", meta=meta)
    print("\n".join(lines))
    return 0


def _sample_models(args: argparse.Namespace, prompts: list[Text]) -> dict[str, list[list[str]]]:
    """model -> per prompt, its sampled texts; one model in memory at a time, same seeds."""
    import torch

    from prefopt.generation import encode_prompt, generate_completions

    params = _params(args)
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
    prompts = _prompts(args)
    texts = _sample_models(args, prompts)
    report: dict[str, Any] = {"models": args.models, "prompts": args.prompts, "judges": {}}
    report["sampling"] = asdict(_params(args))
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
    _write_json(args.output, report)
    if args.samples:
        _write_jsonl(args.samples, [
            {"index": i, "prompt": _as_json(p), "samples": {m: texts[m][i] for m in args.models},
             "scores": {j: {m: scores[j][m][i] for m in args.models} for j in scores}}
            for i, p in enumerate(prompts)
        ])  # fmt: skip
    return 0


def cmd_judge(args: argparse.Namespace) -> int:
    """Win rate of --model vs its reference, or a ranking of --models."""
    if bool(args.model) == bool(args.models):
        raise ConfigError("give either --model (vs its reference) or --models A B C (a ranking)")
    judges = [make_judge(spec) for spec in (args.judge or ["vader"])]
    if len({j.name for j in judges}) < len(judges):
        raise ConfigError("the same judge is given twice")
    return _judge_many(args, judges) if args.models else _judge_pair(args, judges)


def add_judge_parser(sub: Any) -> argparse.ArgumentParser:
    """Register `prefopt judge` on an argparse sub-parsers object."""
    listing = "; ".join(f"{k}: {v}" for k, v in BUILTIN_JUDGES.items())
    p = sub.add_parser(
        "judge", help="win rate of a policy vs its reference", description=f"Judges: {listing}"
    )
    _add_model_args(p)
    p.add_argument("--models", nargs="+", help="rank these checkpoints instead (Bradley–Terry)")
    _add_sampling_args(p)
    p.add_argument("--judge", action="append", help="judge spec, repeatable (default: vader)")
    p.add_argument("--tie-eps", type=float, default=0.0, help="score gaps <= this are ties")
    p.add_argument("--output", required=True, help="report (JSON)")
    p.add_argument("--samples", help="also write the samples and their scores (JSONL)")
    p.add_argument("--html", help="also write a readable HTML page (with --model)")
    p.set_defaults(func=cmd_judge)
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
    keys = [json.dumps(_as_json(p), sort_keys=True) for p in prompts]
    ranks = rank_within_groups(keys, (per_token if args.normalize else reward).tolist())
    out = []
    for i, ((prompt, response), (rank, n)) in enumerate(zip(rows, ranks, strict=True)):
        out.append({
            "index": i, "prompt": _as_json(prompt), "response": _as_json(response),
            "policy_logps": pol[i].item(), "ref_logps": ref[i].item(), "tokens": int(tokens[i]),
            "reward": reward[i].item(), "reward_per_token": per_token[i].item(),
            "rank": rank, "candidates": n,
        })  # fmt: skip
    _write_jsonl(args.output, out)
    by = "per-token reward" if args.normalize else "reward"
    print(
        f"scored {len(rows)} responses to {len(set(keys))} prompts (β={args.beta}, ranked by "
        f"{by}); mean reward {reward.mean().item():.4f} -> {args.output}"
    )
    return 0


def add_score_parser(sub: Any) -> argparse.ArgumentParser:
    """Register `prefopt score` on an argparse sub-parsers object."""
    p = sub.add_parser("score", help="implicit DPO reward of given responses, ranked per prompt")
    _add_model_args(p)
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
