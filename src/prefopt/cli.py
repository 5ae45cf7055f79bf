"""`prefopt` command line: `prefopt train CONFIG.yaml key=value ...`.

Errors a user can cause print as one clear line (no traceback) and exit non-zero.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from prefopt.errors import ConfigError, PrefoptError

logger = logging.getLogger("prefopt")

CONFIG_SECTIONS = (
    "model", "data", "loss", "reference", "lora", "optim", "train", "eval", "judge", "output",
)  # fmt: skip
"""The sections of `ExperimentConfig`, in order (tests/test_config.py checks they agree)."""

CONFIG_HELP = f"""config keys are SECTION.KEY (loss.beta), in the sections
  {", ".join(CONFIG_SECTIONS)}.
Every key, its default and meaning is a documented field of the dataclasses in
prefopt/config.py (src/prefopt/config.py in the repository); configs/*.yaml are
commented examples, and docs/reference-models.md explains reference.*. Every run
saves its resolved config, all defaults filled in, to OUTPUT/config.yaml. A
misspelt key fails at once with a "did you mean" hint.

examples:
  prefopt train configs/smollm2-dpo.yaml loss.beta=0.2 train.max_steps=50
  prefopt train configs/smollm2-dpo.yaml resume=latest"""

SFT_HELP = (
    CONFIG_HELP.split("\nexamples:")[0]
    + """
prefopt sft sets data.sft=true and loss.name=sft; a config asking for another loss is refused.

examples:
  prefopt sft configs/sft-then-dpo-1-sft.yaml
  prefopt sft model.name_or_path=./base data.train=chat.jsonl lora.enabled=true
  prefopt sft configs/sft-then-dpo-1-sft.yaml resume=latest"""
)

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("transformers", "accelerate", "datasets", "peft", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _print_summary(result: object, command: str = "train") -> None:
    from prefopt.trainer import TrainResult

    assert isinstance(result, TrainResult)
    keys = ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
            "perplexity")  # fmt: skip
    print(f"\n== prefopt {command}: done ==")
    print(f"steps: {result.state.step}  tokens: {result.state.tokens_seen}"
          + ("  (stopped early)" if result.stopped_early else ""))  # fmt: skip
    if result.initial_eval and result.final_eval:
        print(f"{'eval metric':<22}{'before':>10}{'after':>10}")
        for k in (k for k in keys if k in result.final_eval and k in result.initial_eval):
            print(f"{k:<22}{result.initial_eval[k]:>10.4f}{result.final_eval[k]:>10.4f}")
    elif result.last_train:
        print("last training step: " + ", ".join(
            f"{k}={result.last_train[k]:.4f}" for k in keys if k in result.last_train))  # fmt: skip
    if result.judge:
        print(f"held-out judge ({result.judge['num_prompts']} prompts, policy vs reference):")
        print("\n".join(result.judge.get("lines", [])))
    report = result.output_dir / "report" / "index.html"
    where = f"; report in {report}" if report.exists() else ""
    print(f"output: {result.output_dir}  (model in {result.output_dir / 'model'}{where})")


def cmd_train(args: argparse.Namespace) -> int:
    from prefopt.config_io import load_config
    from prefopt.trainer import Interrupted, train

    sft = args.command == "sft"
    fixed = {"data.sft": True, "loss.name": "sft"} if sft else None
    cfg = load_config(args.config, args.overrides, fixed=fixed, fixed_by="prefopt sft")
    try:
        result = train(cfg)
    except Interrupted as exc:
        print(f"prefopt: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if os.environ.get("RANK", "0") == "0":  # one summary under torchrun/accelerate launch
        _print_summary(result, args.command)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Preference metrics on `--data`, and/or judged samples on `--prompts`, into one report."""
    import json
    from pathlib import Path

    if not args.model:
        raise ConfigError("--model is required")
    if not args.data and not args.prompts:
        raise ConfigError("give --data (preference metrics), --prompts (judge win rate), or both")
    report: dict[str, Any] = {}
    if args.data:
        metrics, rows = _preference_metrics(args)
        report.update(metrics)
        print(json.dumps(metrics, indent=2))
        if args.per_pair:
            Path(args.per_pair).write_text("".join(json.dumps(r) + "\n" for r in rows))
    if args.prompts:
        from prefopt.commands_judge import judge_vs_reference, make_judges

        args.batch_size = args.batch_size or 8
        args.dtype = args.dtype or "float32"
        judges = make_judges(args.judge, device=args.device)
        report["judge"], lines = judge_vs_reference(args, judges)
        print("\n".join(lines))
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return 0


def _preference_metrics(args: argparse.Namespace) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """`run_eval` on --data with a config made of the flags: means and per-pair rows."""
    from prefopt.config_io import load_config
    from prefopt.eval_command import run_eval
    from prefopt.loss_registry import LOSSES

    overrides = [
        f"model.name_or_path={args.model}",
        f"data.train={args.data}",
        f"loss.name={args.loss}",
        f"loss.beta={args.beta}",
        "data.eval_fraction=0",
        "output.progress=false",
    ]
    if args.dtype:  # only when given: a --config may set it
        overrides.append(f"model.dtype={args.dtype}")
    if args.max_length:
        overrides.append(f"data.max_length={args.max_length}")
    if args.batch_size:
        overrides.append(f"train.batch_size={args.batch_size}")
    cfg = load_config(args.config, overrides + args.overrides)
    if args.ref:  # checked here, not by the config, so the message names the flag
        if not any(LOSSES[n].needs_reference for n in cfg.loss.names):
            raise ConfigError(
                f"--ref is given, but the loss {cfg.loss.names} is reference-free and would "
                "ignore it; drop --ref"
            )
        cfg.reference.model = args.ref
        cfg.validate()
    return run_eval(cfg, args.model)


def _add_eval(sub: Any) -> None:
    from prefopt.cli_models import add_model_args, add_sampling_args
    from prefopt.commands_judge import add_judge_args

    p = sub.add_parser(
        "eval",
        help="preference metrics and/or judge win rate of a model against its reference",
        description="With --data: the loss's metrics on preference pairs (no training). With "
        "--prompts: policy and reference sample the same prompts, judges score both, and the "
        "win rate (95% interval) and a KL estimate are reported. Both may be given.",
    )
    add_model_args(p)
    p.set_defaults(batch_size=None, dtype=None)  # unset: the --config's values apply
    p.add_argument("--data", help="preference data file")
    p.add_argument("--loss", default="sigmoid", help="loss name, or [a, b] for a combination")
    p.add_argument("--beta", type=float, default=0.1, help="beta of the loss")
    p.add_argument("--max-length", type=int, help="token limit per row (data.max_length)")
    p.add_argument("--output", help="write the report (JSON) here")
    p.add_argument("--per-pair", help="write one JSON line per pair here")
    p.add_argument("--config", help="YAML config for anything else")
    add_sampling_args(p, prompts_required=False)
    add_judge_args(p)
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.set_defaults(func=cmd_eval)


def _add_report(sub: Any) -> None:
    def cmd_report(args: argparse.Namespace) -> int:
        from prefopt.report import cli_report

        return cli_report(args.output_dir, args.samples)

    p = sub.add_parser("report", help="plots, health checks and metrics of a run as HTML")
    p.add_argument("output_dir", help="the run's output folder (holding metrics.jsonl)")
    p.add_argument("--samples", help="JSONL of generations to show, e.g. {prompt, policy, ...}")
    p.set_defaults(func=cmd_report)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefopt", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser(
        "train",
        help="preference-tune a model (DPO and family)",
        epilog=CONFIG_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p_train.add_argument("config", nargs="?", help="YAML config (defaults apply without one)")
    p_train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. loss.beta=0.2")
    p_train.set_defaults(func=cmd_train)
    p_sft = sub.add_parser(
        "sft",
        help="supervised fine-tuning on prompt/response rows",
        epilog=SFT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p_sft.add_argument("config", nargs="?", help="YAML config (same sections as train)")
    p_sft.add_argument("overrides", nargs="*", help="key=value overrides")
    p_sft.set_defaults(func=cmd_train)
    _add_eval(sub)
    _add_report(sub)
    from prefopt.commands_data import add_data_parser
    from prefopt.commands_eval import add_generate_parser, add_judge_parser, add_score_parser

    add_generate_parser(sub)
    add_judge_parser(sub)
    add_score_parser(sub)
    add_data_parser(sub)
    return parser


def _split_config(args: argparse.Namespace) -> None:
    """`prefopt train loss.beta=0.2` (no YAML): the first positional is an override."""
    if getattr(args, "config", None) and "=" in args.config:
        args.overrides = [args.config, *args.overrides]
        args.config = None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _split_config(args)
    _setup_logging(args.verbose)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return int(args.func(args))
    except PrefoptError as exc:
        print(f"prefopt: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("prefopt: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def close_process_group() -> None:
    """Destroy torch.distributed's default process group, if this process has one.

    Left to interpreter exit, the group's gloo/NCCL threads are torn down by C++ static
    destructors in no fixed order, and a thread still joinable then aborts the process
    (SIGABRT) after all its work is done: torch warns about exactly this for NCCL. CI once saw a
    2-process CPU run die with signal 6 and no error line, which this is the likeliest cause of.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run() -> None:
    """The `prefopt` command: `main`, then a clean exit from a multi-process launch."""
    code = main()
    close_process_group()
    sys.exit(code)


if __name__ == "__main__":
    run()
