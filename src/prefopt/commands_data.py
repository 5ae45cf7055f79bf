"""`prefopt data audit | clean | convert | build | split`: look at, fix and make preference data.

* audit: format, counts, duplicates, empty fields, lengths, length bias, tokenization checks and
  a verdict (text or --json), plus a PNG of the length histograms.
* clean: remove what the audit flagged, rule by rule, with a report of every removed row.
* convert: HH, UltraFeedback, SHP, ranked lists, ... -> prefopt's paired or unpaired JSONL.
* build: on-policy pairs: sample k replies per prompt, judge them, keep best vs worst; resumable.
* split: train/eval files with no prompt in both.

`add_data_parser(sub)` registers the command; the heavy modules (torch, transformers) are
imported inside the handlers so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from prefopt.datatools.audit import DEFAULT_MAX_LENGTH, FINDINGS
from prefopt.datatools.build import BUILD_PAIRINGS, SAMPLINGS
from prefopt.datatools.clean import CLEAN_DEFAULTS
from prefopt.datatools.convert import TARGETS
from prefopt.datatools.extra_formats import PAIRINGS
from prefopt.datatools.loader import ALL_FORMATS, LoadedData
from prefopt.datatools.reader import DEFAULT_MAX_LINE_BYTES
from prefopt.errors import DataError
from prefopt.judges import BUILTIN_JUDGES

__all__ = ["add_data_parser"]

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# Shared


def _add_read_args(p: argparse.ArgumentParser, *, formats: bool = True) -> None:
    if formats:
        p.add_argument(
            "--format",
            default="auto",
            choices=["auto", *ALL_FORMATS],
            help="source format (default: detected from row 0)",
        )
    p.add_argument(
        "--on-error",
        default="raise",
        choices=["raise", "skip"],
        help="a bad row stops (raise) or is left out and counted (skip)",
    )
    p.add_argument(
        "--max-line-bytes",
        type=int,
        default=DEFAULT_MAX_LINE_BYTES,
        help=f"longest JSON Lines or CSV line read (default {DEFAULT_MAX_LINE_BYTES})",
    )


def _load(args: argparse.Namespace, *, pairs: Any = "best-worst", fmt: str | None = None) -> Any:
    from prefopt.datatools.loader import load_data

    return _with_skip_hint(
        args,
        lambda: load_data(
            args.file,
            format=fmt or args.format,
            pairs=pairs,
            on_error=args.on_error,
            max_line_bytes=args.max_line_bytes,
        ),
    )


def _with_skip_hint(args: argparse.Namespace, read: Callable[[], T]) -> T:
    """`read()`, its row errors told that --on-error skip would leave the row out."""
    try:
        return read()
    except DataError as error:
        if args.on_error == "skip" or error.row is None:
            raise
        hint = " (--on-error skip leaves such rows out and counts them)"
        raise DataError(
            error.reason + hint, file=error.file, row=error.row, field=error.field
        ) from None


def _add_audit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="preference data file")
    p.add_argument("--model", help="count tokens with this model's tokenizer (default: words)")
    p.add_argument(
        "--max-length",
        type=int,
        help=f"token limit to check truncation against (default {DEFAULT_MAX_LENGTH})",
    )
    p.add_argument(
        "--max-prompt-length",
        type=int,
        help="prompt token limit, as training's data.max_prompt_length (default: none)",
    )
    p.add_argument(
        "--max-length-ratio",
        type=float,
        help="flag pairs whose longer response is more than R times the shorter",
    )
    _add_read_args(p)


def _audit(args: argparse.Namespace) -> tuple[LoadedData, Any]:
    from prefopt.datatools.audit import audit_data, load_audit_tokenizer

    data = _load(args)
    tokenizer = load_audit_tokenizer(args.model) if args.model else None
    report = audit_data(
        data,
        tokenizer=tokenizer,
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        max_length_ratio=args.max_length_ratio,
    )
    return data, report


def _write_json(path: str | Path, payload: Any) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------
# audit


def cmd_audit(args: argparse.Namespace) -> int:
    """Print the audit (text or JSON) and write the histogram PNG."""
    from prefopt.datatools.plots import plot_lengths

    _, report = _audit(args)
    payload = report.to_json()
    if not args.no_plot:
        # Not next to FILE by default: data often sits in a checkout or a read-only folder.
        plot = args.plot or Path("outputs") / (Path(args.file).stem + ".audit.png")
        payload["plot"] = str(plot_lengths(report, plot))
    if args.json:
        print(json.dumps(payload, indent=2, ensure_ascii=False))
        if "plot" in payload:
            print(f"histogram: {payload['plot']}", file=sys.stderr)
    else:
        print(report.summary())
        if "plot" in payload:
            print(f"histogram: {payload['plot']}")
    return 0


def _add_audit(sub: Any) -> None:
    p = sub.add_parser("audit", help="what is in a preference file and what is wrong with it")
    _add_audit_args(p)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument(
        "--plot", help="histogram PNG path (default: outputs/FILE-STEM.audit.png, in the cwd)"
    )
    p.add_argument("--no-plot", action="store_true", help="write no histogram")
    p.set_defaults(func=cmd_audit)


# ---------------------------------------------------------------------------------------------
# clean


def _rule_flag(rule: str) -> str:
    return "--drop-" + rule.replace("_", "-")


def cmd_clean(args: argparse.Namespace) -> int:
    """Remove the flagged rows, write the cleaned file and the report."""
    from prefopt.datatools.clean import clean_data

    data, audit = _audit(args)
    rules = {rule: getattr(args, f"drop_{rule}") for rule in CLEAN_DEFAULTS if rule != "unreadable"}
    report = clean_data(data, audit, args.output, rules)
    out = Path(args.output)
    report_path = args.report or out.with_name(out.stem + ".clean.json")
    _write_json(report_path, report.to_json())
    print(report.summary())
    print(f"report: {report_path}")
    return 0


def _add_clean(sub: Any) -> None:
    p = sub.add_parser("clean", help="remove what the audit flags (rule by rule), with a report")
    _add_audit_args(p)
    p.add_argument("--output", required=True, help="cleaned file (JSONL, rows as read)")
    p.add_argument("--report", help="JSON report path (default: OUTPUT's name + .clean.json)")
    for rule, default in CLEAN_DEFAULTS.items():
        if rule == "unreadable":
            continue  # always removed: there is nothing to write
        p.add_argument(
            _rule_flag(rule),
            action=argparse.BooleanOptionalAction,
            default=None,
            help=f"rows where: {FINDINGS[rule]} (default: {'drop' if default else 'keep'})",
        )
    p.set_defaults(func=cmd_clean)


# ---------------------------------------------------------------------------------------------
# convert


def cmd_convert(args: argparse.Namespace) -> int:
    from prefopt.datatools.convert import convert_data

    data = _load(args, pairs=args.pairs, fmt=args.source_format)
    report = convert_data(data, args.output, args.to)
    print(report.summary())
    return 0


def _add_convert(sub: Any) -> None:
    p = sub.add_parser("convert", help="HH, UltraFeedback, SHP, ranked lists -> prefopt JSONL")
    p.add_argument("file", help="source data file")
    p.add_argument(
        "--to",
        required=True,
        choices=TARGETS,
        help="standard: {prompt, chosen, rejected}; unpaired: {prompt, completion, label} (KTO)",
    )
    p.add_argument("--output", required=True, help="JSONL file to write")
    p.add_argument(
        "--from",
        dest="source_format",
        default="auto",
        choices=["auto", *ALL_FORMATS],
        help="source format (default: detected from row 0)",
    )
    p.add_argument(
        "--pairs",
        default="best-worst",
        choices=PAIRINGS,
        help="scored/ranked responses: best vs worst, or every ordered pair",
    )
    _add_read_args(p, formats=False)
    p.set_defaults(func=cmd_convert)


# ---------------------------------------------------------------------------------------------
# build


def cmd_build(args: argparse.Namespace) -> int:
    """Sample, judge and pair; resumable."""
    import torch

    from prefopt.commands_eval import load_models
    from prefopt.datatools.build import BuildSettings, build_pairs
    from prefopt.datatools.prompts import load_prompt_rows
    from prefopt.judges import make_judge

    settings = BuildSettings(
        judge=args.judge,
        k=args.k,
        min_gap=args.min_gap,
        pairing=args.pairing,
        seed=args.seed,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        trim=args.trim,
        sampling=args.sampling,
        batch_size=args.batch_size,
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = _with_skip_hint(
        args,
        lambda: load_prompt_rows(
            args.prompts, on_error=args.on_error, max_line_bytes=args.max_line_bytes
        ),
    )
    prompts = prompts.head(args.max_prompts) if args.max_prompts else prompts
    judge = make_judge(args.judge, device=None if args.device == "auto" else args.device)
    models = load_models(
        args.model, None, dtype=args.dtype, device=args.device, need_reference=False
    )
    report = build_pairs(
        models.policy,
        models.tokenizer,
        prompts,
        judge,
        settings,
        args.output,
        model_name=args.model,
        prompts_file=args.prompts,
        progress=not args.quiet,
        on_error=args.on_error,
    )
    print(report.summary())
    print(f"pairs: {args.output}")
    return 0


def _add_build(sub: Any) -> None:
    judges = "; ".join(BUILTIN_JUDGES)
    p = sub.add_parser("build", help="on-policy pairs: sample k replies, judge, keep best/worst")
    p.add_argument("--model", required=True, help="model folder, .gguf, bundled:… or adapter")
    p.add_argument("--prompts", required=True, help="file of rows with 'prompt' (text/messages)")
    p.add_argument("--judge", required=True, help=f"judge spec ({judges})")
    p.add_argument("--output", required=True, help="pairs JSONL (appended to; re-run resumes)")
    p.add_argument("--k", type=int, default=4, help="replies sampled per prompt (default 4)")
    p.add_argument("--min-gap", type=float, default=0.0, help="least chosen-rejected score gap")
    p.add_argument(
        "--pairing",
        default="best-worst",
        choices=BUILD_PAIRINGS,
        help="rejected = the worst reply, or a random one min-gap lower",
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed (prompt i: seed + i)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus mass")
    p.add_argument("--max-new-tokens", type=int, default=48, help="reply length cap (tokens)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    p.add_argument(
        "--trim",
        action="store_true",
        help="cut replies that hit max-new-tokens back to a sentence end",
    )
    p.add_argument(
        "--sampling",
        default="per-prompt",
        choices=SAMPLINGS,
        help="per-prompt: seeds per prompt, batch-independent (default); per-batch: "
        "one seed per batch, as scripts/build_demo_data.py",
    )
    p.add_argument("--max-prompts", type=int, help="use only the first N prompts")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_read_args(p, formats=False)
    p.set_defaults(func=cmd_build)


# ---------------------------------------------------------------------------------------------
# split


def cmd_split(args: argparse.Namespace) -> int:
    from prefopt.datatools.split import split_data

    data = _load(args)
    report = split_data(
        data, args.train_out, args.eval_out, fraction=args.eval_fraction, seed=args.seed
    )
    print(report.summary())
    return 0


def _add_split(sub: Any) -> None:
    p = sub.add_parser("split", help="train/eval files with no prompt in both")
    p.add_argument("file", help="preference data file")
    p.add_argument("--eval-fraction", type=float, default=0.1, help="share of rows for eval")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed")
    p.add_argument("--train-out", required=True, help="training rows (JSONL)")
    p.add_argument("--eval-out", required=True, help="eval rows (JSONL)")
    _add_read_args(p)
    p.set_defaults(func=cmd_split)


def add_data_parser(sub: Any) -> argparse.ArgumentParser:
    """Register `prefopt data ...` on an argparse sub-parsers object."""
    p = sub.add_parser("data", help="audit, clean, convert, build and split preference data")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    for add in (_add_audit, _add_clean, _add_convert, _add_build, _add_split):
        add(data_sub)
    return p
