"""A β sweep for DPO: judge reward against KL from the reference, one point per β.

The DPO paper (Rafailov et al. 2023, fig. 2) plots reward against KL(π ‖ π_ref) and shows β
trading one for the other. This is that plot in miniature: the bundled SmolLM2-135M-Instruct is
trained with DPO + LoRA on the bundled VADER-judged pairs for a few steps per β, then each policy
and its reference (the LoRA base, adapters off) answer the same held-out prompts with the same
seeds. The reward is the VADER judge's mean score of the policy's answers; the KL is prefopt's
Monte Carlo estimate E_{y~π}[log π(y|x) − log π_ref(y|x)] on those answers, sampled at
temperature 1 and top-p 1 so that it estimates the KL of π itself.

Everything goes through prefopt: `trainer.train`, `commands_eval.load_models`,
`generation.generate_side_by_side`, `judges.make_judge`/`judge_samples`,
`winrate.score_token_ids`/`kl_estimate`/`win_rate`.

    python examples/beta_frontier.py              # bundled model: ~5-10 min on 2 CPU cores
    python examples/beta_frontier.py --fast       # tiny random model, `length` judge: seconds

--fast swaps in a tiny random Llama, made-up pairs (the chosen answer is the longer one) and the
deterministic `length` judge, so the test exercises the same code path without the real model.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import (
    ROOT,
    make_parser,
    make_tiny_model,
    markdown_table,
    quiet,
    setup,
    train_records,
    train_run,
    write_jsonl,
    write_result,
)

NAME = "beta_frontier"
BUNDLED = "bundled:smollm2-135m-instruct"


@dataclass
class Point:
    """One β: its policy's judged reward, KL and training margins."""

    beta: float
    reward: float
    ref_reward: float
    win: Any  # prefopt.winrate.WinRate
    kl: Any  # prefopt.winrate.KLEstimate
    train_margins: list[float]
    train_accuracy: list[float]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = make_parser(NAME, "DPO β sweep: judge reward vs KL from the reference")
    p.add_argument("--betas", type=float, nargs="+", help="β values (default 0.05 0.5 5)")
    p.add_argument("--steps", type=int, help="optimizer steps per β (default 8; --fast 10)")
    p.add_argument("--batch-size", type=int, help="pairs per step (default 8; --fast 4)")
    p.add_argument("--lr", type=float, help="LoRA learning rate (default 5e-4; --fast 1e-2)")
    p.add_argument("--prompts", type=int, default=16, help="held-out prompts (default 16)")
    p.add_argument("--samples", type=int, default=2, help="answers per prompt (default 2)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens per answer")
    p.add_argument("--judge", help="judge spec (default vader; --fast length)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Inputs: the bundled model and data, or tiny stand-ins


def tiny_inputs(out: Path) -> tuple[str, Path, Path]:
    """A tiny random model, made-up pairs (longer answer chosen) and prompts, all offline."""
    topics = ["cat", "dog", "sun", "moon", "tree", "book", "song", "city"]
    pairs = [
        {
            "prompt": f"tell me about the {t} .",
            "chosen": f" the {t} is good and nice and i like the {t} very much .",
            "rejected": " no .",
        }
        for t in topics
    ]
    words = {w for row in pairs for text in row.values() for w in text.split()}
    model = make_tiny_model(out / "tiny-model", words, hidden=32)
    data = write_jsonl(out / "pairs.jsonl", pairs)
    prompts = write_jsonl(out / "prompts.jsonl", [{"prompt": p["prompt"]} for p in pairs])
    return str(model), data, prompts


def train_overrides(args: argparse.Namespace, model: str, data: Path, beta: float) -> list[str]:
    """DPO + LoRA as in configs/demo-smollm2-dpo-lora.yaml, `steps` steps on the first
    `steps × batch` pairs (fewer pairs are cycled through again)."""
    steps, batch = (
        args.steps or (10 if args.fast else 8),
        args.batch_size or (4 if args.fast else 8),
    )
    lr = args.lr or (1e-2 if args.fast else 5e-4)
    return [
        f"model.name_or_path={model}", f"data.train={data}", f"data.max_pairs={steps * batch}",
        "data.max_length=160", "loss.name=sigmoid", f"loss.beta={beta}", "lora.enabled=true",
        f"lora.r={4 if args.fast else 16}", f"lora.alpha={8 if args.fast else 32}",
        "lora.dropout=0", f"optim.lr={lr}", "optim.warmup_ratio=0", "optim.scheduler=constant",
        f"train.batch_size={batch}", f"train.max_steps={steps}", "train.seed=42",
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Judging one trained policy


def judge_policy(args: argparse.Namespace, adapter: Path, prompts: list[Any], judge: Any) -> dict:
    """Sample policy and reference side by side, judge both, estimate KL on policy samples."""
    from prefopt.commands_eval import load_models
    from prefopt.generation import SamplingParams, adapter_disabled, generate_side_by_side
    from prefopt.judges import judge_samples
    from prefopt.logprobs import SequenceLogprobModel
    from prefopt.winrate import kl_estimate, score_token_ids, win_rate

    models = load_models(str(adapter), None, device="cpu")
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens,
                            num_samples=args.samples, seed=0)  # fmt: skip
    samples = generate_side_by_side(
        models.policy, None, models.tokenizer, prompts, params, adapter_reference=True
    )
    judge_samples(judge, samples)
    # The answers with their scores, one JSON line per prompt (as `prefopt judge --samples`).
    write_jsonl(adapter.parent / "samples.jsonl", [s.to_json() for s in samples])

    def means(side: str) -> list[float]:  # one comparison unit per prompt
        return [sum(v) / len(v) for s in samples for v in [s.scores[judge.name][side]]]

    pol, ref = means("policy"), means("reference")
    prompt_ids = [s.prompt_ids for s in samples for _ in s.policy]
    response_ids = [c.token_ids for s in samples for c in s.policy]
    pad = models.tokenizer.pad_token_id
    scorer = SequenceLogprobModel(models.policy)
    policy_logps, tokens = score_token_ids(scorer, prompt_ids, response_ids, pad_token_id=pad)
    with adapter_disabled(models.policy):  # the same scorer now computes log π_ref
        ref_logps, _ = score_token_ids(scorer, prompt_ids, response_ids, pad_token_id=pad)
    return {
        "reward": sum(pol) / len(pol),
        "ref_reward": sum(ref) / len(ref),
        "win": win_rate(pol, ref),
        "kl": kl_estimate(policy_logps, ref_logps, tokens),
    }


def run_beta(args: argparse.Namespace, inputs: tuple[str, Path, Path], beta: float) -> Point:
    """Train one β, then judge it."""
    from prefopt.generation import load_prompts
    from prefopt.judges import make_judge

    model, data, prompts_file = inputs
    run_dir = train_run(
        args.out / "runs" / f"beta{beta:g}",
        train_overrides(args, model, data, beta),
        verbose=args.verbose,
    )
    prompts = load_prompts(prompts_file)[: args.prompts]
    judge = make_judge(args.judge or ("length" if args.fast else "vader"))
    got = judge_policy(args, run_dir / "model", prompts, judge)
    margins = train_records(run_dir, "rewards/margins")
    accuracy = train_records(run_dir, "rewards/accuracies")
    return Point(beta, got["reward"], got["ref_reward"], got["win"], got["kl"], margins, accuracy)


# ---------------------------------------------------------------------------------------------
# Output


def plot(points: list[Point], judge: str) -> object:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    ref = sum(p.ref_reward for p in points) / len(points)
    ax.scatter([0.0], [ref], color="k", marker="s", label="reference (β → ∞)")
    for p in points:
        ax.errorbar(p.kl.per_sequence, p.reward, xerr=p.kl.per_sequence_stderr, fmt="o",
                    capsize=3, label=f"β = {p.beta:g}")  # fmt: skip
    ax.set(xlabel="KL(π ‖ π_ref) per answer, nats (±1 s.e.)", ylabel=f"mean {judge} score")
    ax.set_title("reward vs KL, one point per β", fontsize=10)
    ax.legend(fontsize=8)
    for p in points:
        steps = range(1, len(p.train_margins) + 1)
        axes[1].plot(steps, [m / p.beta for m in p.train_margins], marker="o", ms=3,
                     label=f"β = {p.beta:g}")  # fmt: skip
    axes[1].set(xlabel="step", ylabel="train log-ratio margin h = margin / β")
    axes[1].set_title("training: h on each step's batch (before its update)", fontsize=10)
    axes[1].legend(fontsize=8)
    for a in axes:
        a.grid(alpha=0.3)
    return fig


def margin_spread(points: list[Point]) -> list[float]:
    """Per training step, max − min over β of the batch's log-ratio margin h = margin / β:
    how far apart the runs are (the batches are the same for every β)."""
    steps = min((len(p.train_margins) for p in points), default=0)
    hs = [[p.train_margins[i] / p.beta for p in points] for i in range(steps)]
    return [max(h) - min(h) for h in hs]


def report(points: list[Point], args: argparse.Namespace, judge: str, model: str) -> str:
    command = "python examples/beta_frontier.py " + " ".join(sys.argv[1:])
    rows = [
        (
            f"{p.beta:g}", f"{p.reward:.3f}", f"{p.ref_reward:.3f}",
            f"{p.win.rate:.2f} [{p.win.ci_low:.2f}, {p.win.ci_high:.2f}]",
            f"{p.win.wins}/{p.win.ties}/{p.win.losses}",
            f"{p.kl.per_sequence:.3f} ± {p.kl.per_sequence_stderr:.3f}", f"{p.kl.per_token:.4f}",
            f"{p.train_margins[-1] / p.beta:.2f}", f"{p.train_accuracy[-1]:.2f}",
        )
        for p in points
    ]  # fmt: skip
    table = markdown_table(
        ["β", f"policy {judge}", f"reference {judge}", "win rate [95% CI]", "W/T/L",
         "KL / answer (± s.e.)", "KL / token", "last-step h", "last-step acc."],
        rows,
    )  # fmt: skip
    n = points[0].kl.num_samples if points else 0
    spread = ", ".join(f"{d:.2f}" for d in margin_spread(points))
    return (
        f"Command: `{command.strip()}`\n\nModel `{model}`, DPO (sigmoid) + LoRA, "
        f"{len(points[0].train_margins) if points else 0} steps per β. Judge `{judge}` on "
        f"{n // args.samples} held-out prompts × {args.samples} answers ({n} policy answers, "
        f"temperature 1, top-p 1, ≤ {args.max_new_tokens} new tokens, same seeds for policy and "
        "reference). Win rate: one comparison per prompt (mean score of its answers).\n\n"
        + table
        + "\n\nSpread of the training margin h across β (max − min, nats), step by step: "
        f"{spread}.\n"
    )


def main(argv: list[str] | None = None) -> list[Point]:
    """Run the sweep; returns one point per β (the test reads them)."""
    args = parse(argv)
    out = setup(args)
    betas = args.betas or ([0.1, 10.0] if args.fast else [0.05, 0.5, 5.0])
    judge = args.judge or ("length" if args.fast else "vader")
    points = []
    with quiet(args.verbose):
        if args.fast:
            inputs = tiny_inputs(out)
        else:
            inputs = (BUNDLED, ROOT / "data/smollm2_chatterbot_vader.jsonl",
                      ROOT / "data/heldout_prompts.jsonl")  # fmt: skip
        for beta in betas:
            p = run_beta(args, inputs, beta)
            points.append(p)
            print(f"β={beta:<6g} {judge} {p.reward:.3f} (reference {p.ref_reward:.3f}), "
                  f"win {p.win.rate:.2f}, KL {p.kl.per_sequence:.3f} ± "
                  f"{p.kl.per_sequence_stderr:.3f} per answer", flush=True)  # fmt: skip
    write_result(out, "DPO β sweep: reward vs KL", report(points, args, judge, inputs[0]),
                 plot(points, judge))  # fmt: skip
    print(f"wrote {out / 'result.md'} and {out / 'result.png'}")
    return points


if __name__ == "__main__":
    main()
