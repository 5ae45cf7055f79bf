"""Time prefopt's optimizer steps on the benchmark assets (one configuration, this process).

Builds the run with the library (`build_run`), then trains sequential batches of 4 pairs (rows
0-3, 4-7, …) exactly as `prefopt.trainer._Loop.optimizer_step` does: `_train_step` (collate,
forward, loss, backward, clip), then AdamW, scheduler, zero_grad. The first `--warmup` steps are
timed but not counted. Writes a `measure.RunResult` JSON to `--out`.

    .venv/bin/python bench/run_prefopt.py --model smol135 --data short --variant default \\
        --steps 2 --out /tmp/r.json
    .venv/bin/python bench/run_prefopt.py --model smol135 --data short --profile   # where time goes
    .venv/bin/python bench/run_prefopt.py --data long --prefix-sharing off   # ablation

Variants: default (frozen copy as reference, response-only LM head), full_logits (LM head on every
position), precompute (reference log-probs computed once, in setup), lora (r 16, α 32,
all-linear, no dropout; reference = adapters off), qlora (lora over a 4-bit NF4 base,
bitsandbytes), checkpointing (default + gradient
checkpointing), lean (precompute + checkpointing + 256-row logits chunks, freed memory returned
to the system: least memory).

`--prefix-sharing` applies to any variant: auto (prefopt's default: on where the mean prompt is at
least as long as the mean response, so off on `short`, on on `long`), on, or off. What the run
resolved it to goes into the result's notes.

`--device cuda` trains on the GPU (`train.device=cuda`, torch's default CPU threads) and
synchronizes at the step marks; `--precision bf16` sets `train.mixed_precision=bf16` (autocast
over float32 weights, prefopt's recommended GPU setting). The result then also holds the peak of
`torch.cuda.max_memory_allocated()`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from assets import Assets, default_root
from measure import (
    BATCH,
    BETA,
    LR,
    MAX_LENGTH,
    THREADS,
    RowTokens,
    RunResult,
    count_params,
    no_device_error,
    step_tokens,
)

VARIANTS: dict[str, list[str]] = {
    "default": ["reference.strategy=copy", "train.response_only_logits=true"],
    "full_logits": ["reference.strategy=copy", "train.response_only_logits=false"],
    "precompute": ["reference.strategy=precompute"],
    "lora": [
        "lora.enabled=true",
        "lora.r=16",
        "lora.alpha=32",
        "lora.dropout=0.0",
        "lora.target_modules=all-linear",
        "reference.strategy=adapter",
    ],
    # LoRA over a 4-bit NF4 base (bitsandbytes' CPU kernels dequantise each layer per matmul).
    "qlora": [
        "lora.enabled=true",
        "lora.load_in_4bit=true",
        "lora.r=16",
        "lora.alpha=32",
        "lora.dropout=0.0",
        "lora.target_modules=all-linear",
        "reference.strategy=adapter",
    ],
    "checkpointing": ["reference.strategy=copy", "model.gradient_checkpointing=true"],
    # Least memory: no reference copy (log-probs computed once), activations recomputed, and
    # [256, V] logits chunks instead of [1024, V] (620 MB each at a 152k vocabulary).
    "lean": [
        "reference.strategy=precompute",
        "model.gradient_checkpointing=true",
        "train.logit_chunk_size=256",
        # Keeping freed blocks for reuse buys speed with memory (5.69 vs 4.88 GiB here).
        "train.keep_freed_memory=false",
    ],
}
PREFIX_SHARING = {"auto": "auto", "on": "true", "off": "false"}
"""`--prefix-sharing` → `train.prefix_sharing`."""


def overrides(
    assets: Assets,
    model: str,
    data: str,
    variant: str,
    n_steps: int,
    tmp: Path,
    prefix_sharing: str = "auto",
    device: str = "cpu",
    precision: str = "fp32",
) -> list[str]:
    """The `key=value` config of one benchmark run (on cuda: torch's default CPU threads)."""
    common = [
        f"model.name_or_path={assets.model(model)}",
        f"data.train={assets.data(data)}",
        f"data.max_length={MAX_LENGTH}",
        f"data.max_pairs={BATCH * n_steps}",
        f"train.batch_size={BATCH}",
        "train.grad_accum=1",
        f"train.max_steps={n_steps}",
        "train.group_by_length=false",
        *([f"train.num_threads={THREADS}"] if device == "cpu" else []),
        f"train.device={device}",
        "loss.name=sigmoid",
        f"loss.beta={BETA}",
        f"optim.lr={LR}",
        "optim.warmup_ratio=0",
        "reference.verify=false",
        f"reference.cache_dir={tmp / 'ref_logps'}",
        "output.progress=false",
        f"output.dir={tmp / 'out'}",
        f"train.prefix_sharing={PREFIX_SHARING[prefix_sharing]}",
    ]
    if precision == "bf16":
        common.append("train.mixed_precision=bf16")  # autocast; the weights stay float32
    return common + VARIANTS[variant]


def train_steps(run: Any, prepared: Any, n_steps: int, result: RunResult) -> None:
    """Sequential batches of BATCH rows, one optimizer step each, timed wall-clock (on cuda
    between synchronizes, so the GPU's queued work counts in its own step)."""
    from prefopt.trainer import _train_step

    cuda = result.device == "cuda"
    for s in range(n_steps):
        batch = list(range(s * BATCH, (s + 1) * BATCH))
        if cuda:
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        values, _ = _train_step(run, batch, prepared)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        result.step_s.append(time.perf_counter() - t0)
        result.step_cpu_s.append(time.process_time() - c0)
        result.losses.append(float(values["loss"]))
        print(
            f"prefopt step {s + 1}/{n_steps}: {result.step_s[-1]:.1f} s, "
            f"loss {result.losses[-1]:.6f}",
            flush=True,
        )


def build(args: argparse.Namespace, tmp: Path) -> tuple[Any, Any, RunResult]:
    """Config → run → accelerate-prepared policy; the result with setup time and row tokens."""
    from prefopt.config_io import load_config
    from prefopt.run_setup import build_run, verify_run_prefix_sharing

    n_steps = args.warmup + args.steps + (2 if args.profile else 0)
    assets = Assets(args.root or default_root())
    cfg = load_config(
        None,
        overrides(
            assets,
            args.model,
            args.data,
            args.variant,
            n_steps,
            tmp,
            args.prefix_sharing,
            args.device,
            args.precision,
        )
        + list(args.set),
    )
    t0 = time.perf_counter()
    run = build_run(cfg)
    prepared, run.optimizer = run.accelerator.prepare(run.scorer, run.optimizer)  # as train() does
    verify_run_prefix_sharing(run, prepared)
    setup = time.perf_counter() - t0
    rows = [RowTokens.of(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in run.data.train]
    params = count_params(run.model)
    result = RunResult(
        "prefopt", args.variant, args.model, args.data, params, setup, rows=rows, warmup=args.warmup
    )
    result.device, result.precision = args.device, args.precision
    if args.device == "cuda":
        result.threads = torch.get_num_threads()  # torch's default there
    result.step_tokens = step_tokens(rows, n_steps)
    checked = "; checked against two-pass scoring" if run.prefix_sharing.checked else ""
    result.notes.append(run.prefix_sharing.describe() + checked)
    print(result.notes[-1], flush=True)
    return run, prepared, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smol135", choices=["smol135", "bigvocab"])
    parser.add_argument("--data", default="short", choices=["short", "long", "mixed"])
    parser.add_argument("--variant", default="default", choices=sorted(VARIANTS))
    parser.add_argument(
        "--prefix-sharing",
        default="auto",
        choices=list(PREFIX_SHARING),
        help="train.prefix_sharing: auto (the default), on or off (ablation)",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="extra prefopt config override, after the variant's (repeatable; for ablations)",
    )  # fmt: skip
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps")
    parser.add_argument("--steps", type=int, default=2, help="measured steps")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16"],
        help="bf16: train.mixed_precision=bf16 (autocast over float32 weights)",
    )
    parser.add_argument("--root", type=Path, default=None, help="assets root")
    parser.add_argument("--out", type=Path, default=None, help="result JSON")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after warm-up, time the phases of one step and profile another",
    )
    args = parser.parse_args()
    if error := no_device_error(args.device):
        parser.error(error)
    if args.device == "cpu":
        torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory(prefix="prefopt-bench-") as tmp:
        run, prepared, result = build(args, Path(tmp))
        if args.profile:
            from profile_step import profile_prefopt

            train_steps(run, prepared, args.warmup, result)
            profile_prefopt(run, prepared, first_row=args.warmup * BATCH)
            return
        train_steps(run, prepared, args.warmup + args.steps, result)
    if args.out:
        result.write(args.out)


if __name__ == "__main__":
    main()
