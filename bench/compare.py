"""prefopt vs TRL's DPOTrainer on identical batches: one command, one table.

    .venv/bin/python bench/compare.py --suite quick          # smol135 short, 1 rep each (~10 min+)
    .venv/bin/python bench/compare.py --suite full --reps 2  # every row below, interleaved
    .venv/bin/python bench/compare.py --table RESULTS.json   # print the table of a saved run

Builds the assets if missing (`assets.py`), then runs each (tool, configuration) in a FRESH
process (`run_prefopt.py` / `run_trl.py`, 2 threads, fp32, 1 warm-up + `--steps` measured steps),
interleaved A B A B so a shared machine's drift hits both alike. Before and after each run it
probes the machine's fp32 matmul rate (1024² matmuls for 1 s) and, by default, waits for enough
free memory. Prints a markdown table (s/step, tokens/s, pairs/s, peak RSS, MFU, prefopt/TRL
ratios, per-step losses) and saves every raw result to `<assets>/results/<suite>-<time>.json`.

Tokens/s counts the non-pad tokens the model sees with the prompt in both rows (TRL's count) for
both tools. MFU = model FLOPs per token (8N; 6N for precompute and LoRA, see
`measure.flops_per_token`) × tokens/s ÷ the mean matmul rate probed around that run.

GPU mode: `--device cuda --precision bf16` runs both tools on the GPU (prefopt
`train.device=cuda`, `train.mixed_precision=bf16`; TRL `use_cpu=False`, `bf16=True`: autocast
over float32 weights in both), with torch's default CPU threads, a synchronize at every step
mark, no wait for free host memory, and a 4096² matmul probe in the run's precision (bf16 or
fp32) as MFU's denominator. The table then shows s/step to the millisecond, the peak of
`torch.cuda.max_memory_allocated()` beside peak RSS, and prefopt / TRL of the GPU peaks; no CPU
share. `scripts/gpu_bench.sh` is that run as one command for a lent H100/H200:

    .venv/bin/python bench/compare.py --device cuda --precision bf16 --only "smol135 short" \
        --warmup 2 --steps 6 --reps 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from assets import ROWS, build_assets, default_root
from measure import BATCH, THREADS, matmul_probe, no_device_error
from report import Record, render_table

HERE = Path(__file__).resolve().parent
PYTHON = sys.executable


@dataclass(frozen=True)
class Row:
    """One table row: a configuration of each tool computing the same thing.

    `trl` None: a prefopt-only ablation, compared with TRL's "fast" run of the same model/data.
    """

    name: str
    model: str
    data: str
    prefopt: str | None
    trl: str | None
    need_gib: float | None = None
    """Free memory to wait for (default: NEED_GIB of the model/data)."""
    prefix_sharing: str = "auto"
    """prefopt's `--prefix-sharing`: auto (its default), on or off."""

    def prefopt_label(self) -> str:
        """The prefopt configuration as the table shows it."""
        assert self.prefopt is not None
        if self.prefix_sharing == "auto":
            return self.prefopt
        return f"{self.prefopt}, prefix sharing {self.prefix_sharing}"


QUICK = [Row("smol135 short", "smol135", "short", "default", "fast")]
FULL = [
    *QUICK,
    Row("smol135 long", "smol135", "long", "default", "fast"),
    Row("bigvocab short", "bigvocab", "short", "default", "fast"),
    # Without checkpointing TRL peaks at 21 GiB on smol135 long: bigvocab long needs a bigger box.
    Row("bigvocab long", "bigvocab", "long", "default", "fast", need_gib=26),
    Row("bigvocab long, checkpointing", "bigvocab", "long", "checkpointing", "defaults", 13),
    Row("smol135 short, LoRA r16", "smol135", "short", "lora", "lora"),
    Row("smol135 long, LoRA r16", "smol135", "long", "lora", "lora"),
    Row("smol135 short, QLoRA r16", "smol135", "short", "qlora", "qlora"),
    # Memory at no loss of speed vs TRL's fastest: prefopt's leanest settings on the big vocab.
    Row("bigvocab short, lean memory", "bigvocab", "short", "lean", "fast"),
    Row("smol135 short, precompute", "smol135", "short", "precompute", "precompute"),
    # Lengths spread as in real data: prefix sharing (auto: on) packs pairs into the padding.
    Row("smol135 mixed", "smol135", "mixed", "default", "fast"),
    Row("smol135 short, ablation: full logits", "smol135", "short", "full_logits", None),
    # The rows above run prefix sharing on "auto": off on short (64-token prompts, 192-token
    # responses), on on long (768 + 128). Each ablation flips it for the same model and data.
    Row("smol135 short, ablation: prefix sharing on", "smol135", "short", "default", None,
        prefix_sharing="on"),
    Row("smol135 long, ablation: prefix sharing off", "smol135", "long", "default", None,
        prefix_sharing="off"),
]  # fmt: skip
SUITES = {"quick": QUICK, "full": FULL}
NEED_GIB = {
    ("smol135", "short"): 10,
    ("bigvocab", "short"): 11,
    ("smol135", "long"): 22,
    ("smol135", "mixed"): 12,
    ("bigvocab", "long"): 26,
}
"""Free memory to wait for before a run (baseline peak RSS + margin)."""


def machine_state() -> dict[str, float]:
    """Load average and available memory right now (the machine is shared)."""
    mem: dict[str, float] = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, value = line.split(":")
        mem[key] = int(value.split()[0]) / 2**20  # KiB → GiB
    return {
        "loadavg_1m": os.getloadavg()[0],
        "mem_available_gib": mem["MemAvailable"],
        "mem_total_gib": mem["MemTotal"],
    }


def wait_for_memory(need_gib: float, limit_s: float) -> bool:
    """Wait (up to `limit_s`) until `need_gib` of memory is available; False if it never was."""
    if machine_state()["mem_total_gib"] < need_gib:
        return False  # this machine never has that much
    t0 = time.time()
    while machine_state()["mem_available_gib"] < need_gib:
        if time.time() - t0 > limit_s:
            return False
        print(
            f"  waiting for {need_gib} GiB free memory "
            f"({machine_state()['mem_available_gib']:.1f} GiB now)",
            flush=True,
        )
        time.sleep(30)
    return True


def run_one(
    impl: str, row: Row, args: argparse.Namespace, out_dir: Path, tag: str
) -> dict[str, Any]:
    """One fresh-process measurement, with matmul probes and machine state around it."""
    variant = row.prefopt if impl == "prefopt" else row.trl
    assert variant is not None
    record: dict[str, Any] = {
        "row": row.name,
        "impl": impl,
        "variant": row.prefopt_label() if impl == "prefopt" else variant,
        "model": row.model,
        "data": row.data,
    }
    need = row.need_gib or NEED_GIB[(row.model, row.data)]
    wait = args.wait_memory and args.device == "cpu"  # host RAM: not the GPU's limit
    if wait and not wait_for_memory(need, args.wait_memory):
        total = machine_state()["mem_total_gib"]
        return {**record, "error": f"skipped: needs {need} GiB free (machine: {total:.0f} GiB)"}
    out = out_dir / f"{tag}.json"
    script = HERE / ("run_prefopt.py" if impl == "prefopt" else "run_trl.py")
    cmd = [
        PYTHON,
        str(script),
        "--model",
        row.model,
        "--data",
        row.data,
        "--variant",
        variant,
        "--warmup",
        str(args.warmup),
        "--steps",
        str(args.steps),
        "--root",
        str(args.root),
        "--out",
        str(out),
        "--device",
        args.device,
        "--precision",
        args.precision,
    ]
    if impl == "prefopt":
        cmd += ["--prefix-sharing", row.prefix_sharing]
    probe = {"device": args.device, "precision": args.precision}
    record["before"] = {**matmul_probe(**probe), **machine_state()}
    print(
        f"[{time.strftime('%H:%M:%S')}] {impl} {variant} on {row.model}/{row.data} "
        f"(matmul {record['before']['gflops']:.0f} GFLOP/s)",
        flush=True,
    )
    t0 = time.time()
    log = out.with_suffix(".log")  # the child's output, to follow a long run with tail -f
    with log.open("w") as f:
        try:
            code: int | str = subprocess.run(
                cmd, timeout=args.timeout, stdout=f, stderr=f
            ).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    record["wall_s"] = time.time() - t0
    record["after"] = {**matmul_probe(**probe), **machine_state()}
    if code != 0 or not out.is_file():
        tail = f"exit {code}: " + log.read_text()[-2000:]
        print(f"  FAILED ({log}): {tail}", flush=True)
        return {**record, "error": tail}
    record["result"] = json.loads(out.read_text())
    steps = record["result"]["step_s"]
    gpu = record["result"].get("peak_gpu_gib")
    print(
        f"  steps {[round(s, 3 if gpu is not None else 1) for s in steps]} s, peak RSS "
        f"{record['result']['peak_rss_gib']:.2f} GiB"
        + (f", peak GPU {gpu:.2f} GiB" if gpu is not None else ""),
        flush=True,
    )
    return record


def measure_suite(rows: list[Row], args: argparse.Namespace, save: Path) -> list[dict[str, Any]]:
    """Run every (row, tool) `reps` times, interleaved; saves after each run."""
    records: list[dict[str, Any]] = []
    meta = {
        "suite": args.suite,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "steps": args.steps,
        "warmup": args.warmup,
        "threads": THREADS,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
    }
    if args.device == "cuda":
        meta |= {"device": "cuda", "precision": args.precision, "threads": torch.get_num_threads()}
        meta["gpu"] = torch.cuda.get_device_name()
    for rep in range(args.reps):
        for row in rows:
            for impl in ("prefopt", "trl"):
                if (row.prefopt if impl == "prefopt" else row.trl) is None:
                    continue
                tag = f"{len(records):02d}-{impl}-{row.model}-{row.data}"
                records.append({"rep": rep, **run_one(impl, row, args, save.parent, tag)})
                save.write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    return records


def select_rows(args: argparse.Namespace) -> list[Row]:
    """The suite's rows, filtered by --only."""
    rows = SUITES[args.suite]
    return [r for r in rows if r.name in args.only] if args.only else rows


def prefix_sharing_notes(records: list[Record]) -> list[str]:
    """What each prefopt run resolved `train.prefix_sharing` to (from its result's notes)."""
    lines = []
    for r in records:
        notes = r.get("result", {}).get("notes", [])
        said = [n for n in notes if n.startswith("prefix sharing")]
        if r["impl"] == "prefopt" and said and r.get("rep", 0) == 0:
            lines.append(f"- {r['row']}: {said[0]}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=sorted(SUITES), default="quick")
    parser.add_argument(
        "--only",
        action="append",
        default=None,
        help="run only the row of this name (repeatable): " + "; ".join(r.name for r in FULL),
    )
    parser.add_argument("--reps", type=int, default=1, help="repetitions of each run")
    parser.add_argument("--steps", type=int, default=2, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up steps per run")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    parser.add_argument(
        "--wait-memory",
        type=float,
        default=1800,
        help="seconds to wait for free memory before a run (0: don't wait)",
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16"],
        help="bf16 (cuda only): autocast over float32 weights in both tools",
    )
    parser.add_argument("--root", type=Path, default=default_root(), help="assets root")
    parser.add_argument(
        "--table", type=Path, default=None, help="print the table of a results JSON"
    )
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(THREADS)
    if args.table:
        saved = json.loads(args.table.read_text())
        print(render_table(saved["records"], saved["meta"]))
        print("\n".join(prefix_sharing_notes(saved["records"])))
        return
    if error := no_device_error(args.device):
        parser.error(error)
    if args.device == "cpu" and args.precision != "fp32":
        parser.error("--precision bf16 is for --device cuda (the CPU table and probe are fp32)")
    if (args.warmup + args.steps) * BATCH > ROWS:
        parser.error(f"--warmup + --steps is at most {ROWS // BATCH} ({ROWS} rows per data file)")
    build_assets(args.root)
    rows = select_rows(args)
    if not rows:
        parser.error(f"--only {args.only}: no such row in suite {args.suite}")
    name = args.suite if args.device == "cpu" else f"{args.suite}-cuda-{args.precision}"
    save = args.root / "results" / time.strftime(f"{name}-%Y%m%d-%H%M%S") / "results.json"
    save.parent.mkdir(parents=True, exist_ok=True)
    records = measure_suite(rows, args, save)
    meta = json.loads(save.read_text())["meta"] if save.is_file() else {}
    print("\n" + render_table(records, meta))
    print("\nPrefix sharing (train.prefix_sharing) per prefopt run:")
    print("\n".join(prefix_sharing_notes(records)))
    print(f"\nraw results: {save}")


if __name__ == "__main__":
    main()
