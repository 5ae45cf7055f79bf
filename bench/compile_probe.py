"""Does `torch.compile` pay for a DPO-sized training step on this machine? Eager vs compiled.

One policy forward + backward of the smol135 bench model (random weights, SmolLM2-135M's shape)
on a fixed [8, 256] batch (4 pairs × chosen/rejected rows of the `short` shape), the loss summed
over the last 192 positions' log-probs. Each mode runs in its own process: the first step
(compilation included) is reported apart from the steady steps. Fixed shapes favour the compiler:
real batches vary in length, so a real run recompiles or needs dynamic shapes.

    .venv/bin/python bench/assets.py          # once, builds the model
    .venv/bin/python bench/compile_probe.py   # eager, compiled, eager, compiled
"""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROWS, LENGTH, RESPONSE = 8, 256, 192
STEPS = 4


def step(model: torch.nn.Module, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    logits = model(input_ids=ids).logits[:, -RESPONSE - 1 : -1]  # [8, 192, V]
    logps = logits.float().log_softmax(-1).gather(-1, ids[:, -RESPONSE:, None]).sum()
    (-logps).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def run(mode: str, folder: Path) -> str:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.train()
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (ROWS, LENGTH))
    runner = torch.compile(model) if mode == "compiled" else model
    first = step(runner, ids)  # type: ignore[arg-type]
    steady = [step(runner, ids) for _ in range(STEPS)]  # type: ignore[arg-type]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return (
        f"{mode:8s} first step {first:6.1f} s, steady "
        f"{', '.join(f'{t:.2f}' for t in steady)} s (min {min(steady):.2f}), "
        f"peak RSS {peak:.2f} GiB"
    )


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from assets import default_root  # type: ignore[import-not-found]

    folder = default_root() / "models" / "smol135"
    if len(sys.argv) > 1:
        torch.set_num_threads(2)
        print(run(sys.argv[1], folder), flush=True)
        return
    for mode in ("eager", "compiled", "eager", "compiled"):
        subprocess.run([sys.executable, __file__, mode], check=True)


if __name__ == "__main__":
    main()
