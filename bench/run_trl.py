"""Time TRL's DPOTrainer on the benchmark assets (one configuration, this process).

TRL 1.16 (the `bench` extra) trains the same rows in the same order (sampler "sequential"), 4
pairs per step, fp32, sigmoid loss, β 0.1, lr 1e-6 linear to 0, no warm-up, max_length 1024.
Step times are the wall time between consecutive `on_step_end` callbacks, so they include
batch fetching and collation as prefopt's do. Writes a `measure.RunResult` JSON to `--out`.

    .venv/bin/python bench/run_trl.py --model smol135 --data short --variant fast --out /tmp/t.json

Variants: fast (gradient checkpointing off, reference = a second model loaded from the folder),
defaults (TRL's default gradient checkpointing on; still fp32), precompute
(`precompute_ref_log_probs`, in setup), lora (peft r 16, α 32, all-linear, no dropout; reference
= adapters off), qlora (the same adapters over a 4-bit NF4 base: bitsandbytes, double
quantisation, fp32 compute, as prefopt's qlora variant loads it on the CPU).

`--device cuda` trains on the GPU (`use_cpu=False`, torch's default CPU threads; the step clock
synchronizes at each mark); `--precision bf16` sets `bf16=True`, autocast over the float32
weights (`model_init_kwargs` keeps dtype float32), as prefopt's `train.mixed_precision=bf16`.
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
from transformers import TrainerCallback

VARIANTS = ("fast", "defaults", "precompute", "lora", "qlora")


class StepClock(TrainerCallback):  # type: ignore[misc]
    """Records the time at train begin and at each step end, and each logged loss.

    `cuda`: synchronize before each mark, so a step's queued GPU work counts in that step."""

    def __init__(self, cuda: bool = False) -> None:
        self.cuda = cuda
        self.marks: list[float] = []
        self.cpu: list[float] = []
        self.losses: list[float] = []

    def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.marks, self.cpu = [time.perf_counter()], [time.process_time()]

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.marks.append(time.perf_counter())
        self.cpu.append(time.process_time())
        print(
            f"trl step {state.global_step}/{state.max_steps}: "
            f"{self.marks[-1] - self.marks[-2]:.1f} s",
            flush=True,
        )

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def dpo_config(
    variant: str, n_steps: int, out_dir: Path, device: str = "cpu", precision: str = "fp32"
) -> Any:
    from trl import DPOConfig

    return DPOConfig(
        output_dir=str(out_dir),
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1,
        learning_rate=LR,
        lr_scheduler_type="linear",
        warmup_steps=0,
        max_steps=n_steps,
        beta=BETA,
        loss_type=["sigmoid"],
        max_length=MAX_LENGTH,
        bf16=precision == "bf16",  # autocast; the weights stay float32 (model_init_kwargs)
        gradient_checkpointing=variant == "defaults",
        precompute_ref_log_probs=variant == "precompute",
        train_sampling_strategy="sequential",
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        dataloader_num_workers=0,
        use_cpu=device == "cpu",
        seed=42,
        disable_tqdm=True,
        model_init_kwargs={"dtype": torch.float32, **quantization(variant, device)},
    )


def quantization(variant: str, device: str = "cpu") -> dict[str, Any]:
    """from_pretrained arguments of the base: 4-bit NF4 for qlora, else none.

    On the CPU fp32 compute; on cuda GPU 0 and bf16 compute and non-quantized weights, as
    prefopt's `models.quantization_kwargs` loads a float32-configured QLoRA base there."""
    if variant != "qlora":
        return {}
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if device == "cuda" else torch.float32
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )
    if device == "cuda":
        return {"quantization_config": quant, "device_map": {"": 0}, "dtype": compute}
    return {"quantization_config": quant, "device_map": {"": "cpu"}}


def lora_config() -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smol135", choices=["smol135", "bigvocab"])
    parser.add_argument("--data", default="short", choices=["short", "long", "mixed"])
    parser.add_argument("--variant", default="fast", choices=VARIANTS)
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps")
    parser.add_argument("--steps", type=int, default=2, help="measured steps")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16"],
        help="bf16: bf16=True (autocast over float32 weights)",
    )
    parser.add_argument("--root", type=Path, default=None, help="assets root")
    parser.add_argument("--out", type=Path, default=None, help="result JSON")
    args = parser.parse_args()
    if error := no_device_error(args.device):
        parser.error(error)
    if args.device == "cpu":
        torch.set_num_threads(THREADS)
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import DPOTrainer

    assets = Assets(args.root or default_root())
    n_steps = args.warmup + args.steps
    data = load_dataset("json", data_files=str(assets.data(args.data)), split="train")
    data = data.select(range(BATCH * n_steps))
    clock = StepClock(cuda=args.device == "cuda")
    with tempfile.TemporaryDirectory(prefix="trl-bench-") as tmp:
        t0 = time.perf_counter()
        trainer = DPOTrainer(
            model=str(assets.model(args.model)),
            args=dpo_config(args.variant, n_steps, Path(tmp), args.device, args.precision),
            train_dataset=data,
            processing_class=AutoTokenizer.from_pretrained(assets.model(args.model)),
            peft_config=lora_config() if args.variant in ("lora", "qlora") else None,
            callbacks=[clock],
        )
        setup = time.perf_counter() - t0
        trainer.train()
    dataset: Any = trainer.train_dataset  # tokenized: prompt_ids, chosen_ids, rejected_ids
    rows = [RowTokens.of(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in dataset]
    model: Any = trainer.model
    params = count_params(model)
    result = RunResult(
        "trl", args.variant, args.model, args.data, params, setup, rows=rows, warmup=args.warmup
    )
    result.device, result.precision = args.device, args.precision
    if args.device == "cuda":
        result.threads = torch.get_num_threads()  # torch's default there
    result.step_s = [b - a for a, b in zip(clock.marks, clock.marks[1:], strict=False)]
    result.step_cpu_s = [b - a for a, b in zip(clock.cpu, clock.cpu[1:], strict=False)]
    result.losses = clock.losses
    result.step_tokens = step_tokens(rows, n_steps)
    result.notes.append(f"optimizer {trainer.args.optim}")
    if args.out:
        result.write(args.out)


if __name__ == "__main__":
    main()
