"""AdamW step time and peak memory: torch's foreach default vs the fused kernel vs per-tensor.

The parameters have bigvocab's shapes (151,936 × 576 embedding plus 30 layers of 576-wide linear
weights, 194 M values) with random gradients; each implementation runs in its own process
(peak RSS is per process), four steps each. Run:

    .venv/bin/python bench/adamw_step.py              # all three, one after another
    .venv/bin/python bench/adamw_step.py fused        # one implementation (what each child runs)
"""

from __future__ import annotations

import resource
import subprocess
import sys
import time

import torch

MODES = ("foreach", "fused", "single")
GIB = 2**20  # ru_maxrss is in KiB


def shapes() -> list[tuple[int, ...]]:
    """bigvocab's parameter shapes (tied embedding; q/o, k/v, MLP projections; norms)."""
    layers = 30
    return (
        [(151936, 576)]
        + [(576, 576)] * (2 * layers)
        + [(192, 576)] * (2 * layers)
        + [(1536, 576)] * (3 * layers)
        + [(576,)] * (2 * layers + 1)
    )


def run(mode: str, steps: int = 4) -> str:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    kwargs = {"fused": {"fused": True}, "foreach": {"foreach": True}, "single": {"foreach": False}}
    optimizer = torch.optim.AdamW(params, lr=1e-6, **kwargs[mode])  # type: ignore[arg-type]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / GIB
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / GIB
    n = sum(p.numel() for p in params) / 1e6
    steady = ", ".join(f"{t:.2f}" for t in times)
    return (
        f"{mode:8s} {n:.0f} M params: peak RSS {peak:.2f} GiB (before the first step "
        f"{before:.2f}); step s [{steady}]"
    )


def main() -> None:
    if len(sys.argv) > 1:
        print(run(sys.argv[1]))
        return
    for mode in MODES:
        subprocess.run([sys.executable, __file__, mode], check=True)


if __name__ == "__main__":
    main()
