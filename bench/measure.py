"""Measurement helpers shared by the benchmark runners and `compare.py`.

A runner (`run_prefopt.py`, `run_trl.py`) trains a few optimizer steps in its own fresh process
and writes one JSON result: per-step wall times and losses, the tokens of each step, each row's
token counts (to check both tools tokenized alike), setup time and peak RSS at exit (on a CUDA
GPU also the peak of `torch.cuda.max_memory_allocated`).

Tokens are counted as TRL counts them: the non-pad tokens the model sees, the prompt once in the
chosen row and once in the rejected row, whatever the tool actually computes.
"""

from __future__ import annotations

import hashlib
import json
import platform
import resource
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

THREADS = 2
BATCH = 4
"""Pairs per optimizer step (no accumulation)."""
LR = 1e-6
BETA = 0.1
MAX_LENGTH = 1024


@dataclass
class RowTokens:
    """Token counts of one pair, plus a hash of its ids (to compare two tokenizations)."""

    prompt: int
    chosen: int
    rejected: int
    digest: str

    @classmethod
    def of(cls, prompt: Sequence[int], chosen: Sequence[int], rejected: Sequence[int]) -> RowTokens:
        text = json.dumps([list(prompt), list(chosen), list(rejected)])
        digest = hashlib.sha1(text.encode()).hexdigest()[:12]
        return cls(len(prompt), len(chosen), len(rejected), digest)

    @property
    def seen(self) -> int:
        """Tokens the model sees for this pair: prompt in both rows (TRL's count)."""
        return 2 * self.prompt + self.chosen + self.rejected


@dataclass
class RunResult:
    """What one runner process measured."""

    impl: str
    variant: str
    model: str
    data: str
    params: int
    setup_s: float
    step_s: list[float] = field(default_factory=list)
    step_cpu_s: list[float] = field(default_factory=list)
    """Process CPU time (all threads) of each step: ≈ THREADS × step_s when nothing competes."""
    losses: list[float] = field(default_factory=list)
    step_tokens: list[int] = field(default_factory=list)
    rows: list[RowTokens] = field(default_factory=list)
    warmup: int = 1
    peak_rss_gib: float = 0.0
    threads: int = THREADS
    versions: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    device: str = "cpu"
    precision: str = "fp32"
    """fp32, or bf16: autocast over fp32 weights."""
    peak_gpu_gib: float | None = None
    """device cuda: `torch.cuda.max_memory_allocated()` at exit (GiB); None on the CPU."""

    def write(self, path: Path) -> None:
        self.peak_rss_gib = peak_rss_gib()
        if self.device == "cuda":
            self.peak_gpu_gib = torch.cuda.max_memory_allocated() / 2**30
        self.versions = versions()
        path.write_text(json.dumps(asdict(self), indent=1))


def load_result(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


def step_tokens(rows: Sequence[RowTokens], n_steps: int) -> list[int]:
    """Tokens seen in each sequential batch of `BATCH` rows."""
    return [sum(r.seen for r in rows[s * BATCH : (s + 1) * BATCH]) for s in range(n_steps)]


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def versions() -> dict[str, str]:
    import transformers

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    try:
        import trl

        out["trl"] = trl.__version__
    except ImportError:
        pass
    return out


def no_device_error(device: str) -> str | None:
    """Why `--device` cannot run here (no CUDA GPU visible), or None if it can."""
    if device == "cuda" and not torch.cuda.is_available():
        return (
            f"--device cuda: torch {torch.__version__} sees no CUDA GPU here "
            "(run on a GPU machine, or use --device cpu)"
        )
    return None


def matmul_probe(
    seconds: float = 1.0, n: int = 1024, device: str = "cpu", precision: str = "fp32"
) -> dict[str, float]:
    """This machine's fp32 matmul rate right now: n×n @ n×n repeated for ~`seconds`.

    Returns GFLOP per wall second ("gflops") and per CPU second of this process summed over its
    threads ("gflops_per_cpu_s"). When other jobs take the cores the first drops; the second
    stays near the machine's per-core rate, which makes it the steadier denominator for MFU.
    On a CUDA GPU: `cuda_matmul_probe` (4096², in `precision`; "gflops" only).
    """
    if device == "cuda":
        return cuda_matmul_probe(seconds, precision)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm up (allocation, thread pool)
    count, t0, c0 = 0, time.perf_counter(), time.process_time()
    while (elapsed := time.perf_counter() - t0) < seconds:
        torch.mm(a, b)
        count += 1
    flop = 2 * n**3 * count
    cpu = max(time.process_time() - c0, 1e-9)
    return {"gflops": flop / elapsed / 1e9, "gflops_per_cpu_s": flop / cpu / 1e9}


def cuda_matmul_probe(
    seconds: float = 1.0, precision: str = "fp32", n: int = 4096
) -> dict[str, float]:
    """The GPU's matmul rate right now: n×n @ n×n in bf16 or fp32 (torch's default: no TF32),
    in bursts of 10 each followed by a synchronize, for ~`seconds` after ~0.25 s of warm-up
    (cuBLAS set-up, clocks up from idle). Returns {"gflops": GFLOP per wall second}."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    pair = [torch.randn(n, n, device="cuda", dtype=dtype) for _ in range(2)]

    def burst() -> None:
        for _ in range(10):
            torch.mm(pair[0], pair[1])
        torch.cuda.synchronize()

    burst()  # cuBLAS handle, workspace (can take longer than the warm-up below)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 0.25:
        burst()
    count, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        burst()
        count += 10
    pair.clear()
    torch.cuda.empty_cache()  # the probing process keeps no more than its CUDA context
    return {"gflops": 2 * n**3 * count / elapsed / 1e9}


def count_params(model: torch.nn.Module) -> int:
    """The model's parameter count N for FLOPs: a 4-bit bitsandbytes weight (Params4bit) packs
    two values per element, so it counts twice its numel."""
    return sum(
        p.numel() * (2 if type(p).__name__ == "Params4bit" else 1) for p in model.parameters()
    )


def flops_per_token(params: int, variant: str) -> float:
    """Model FLOPs per token of one DPO step.

    Policy forward 2N + backward 4N + reference forward 2N = 8N. With precomputed reference
    log-probs the reference forward is gone (6N); with LoRA the frozen base weights get no weight
    gradients, so the policy backward is ~2N (adapters neglected) and the total is 6N.
    """
    if variant in ("precompute", "lora", "qlora"):
        return 6.0 * params
    return 8.0 * params
