"""Typed configuration of a prefopt run.

One dataclass per area, composed in `ExperimentConfig`. A run's config comes from a YAML file
plus `key=value` overrides (`loss.beta=0.2`), is validated as a whole before any model loads, and
is saved resolved into the output folder. Loading/override mechanics live in `config_io.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from prefopt.bundled import BUNDLED_MODEL
from prefopt.loss_registry import get_loss


@dataclass
class ModelConfig:
    name_or_path: str = BUNDLED_MODEL
    """Local folder, Hub id, a .gguf file, or "bundled:smollm2-135m-instruct" (the default)."""
    gguf_file: str | None = None
    """GGUF file name inside `name_or_path` (dequantised on load); set automatically for a path
    ending in .gguf."""
    revision: str | None = None
    """Hub revision (branch, tag or commit)."""
    tokenizer: str | None = None
    """Tokenizer location when it differs from the model's."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights dtype. bfloat16 halves memory (on CPU it is slower than float32 and its rounding
    shows in the rewards: for speed on a GPU prefer train.mixed_precision=bf16 with float32
    weights). float16 weights are not trained stably without loss scaling; prefer bfloat16."""
    attn_implementation: str | None = None
    """"sdpa", "eager", "flash_attention_2", "flex_attention", or None for transformers' choice.
    flash and flex cannot share prefixes (train.prefix_sharing falls back). Training with flex
    on a CPU is refused at setup while torch's FlexAttention has no CPU backward (torch 2.13)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory, ~30% more compute."""
    trust_remote_code: bool = False
    """Allow a checkpoint's own Python code to run. Off unless you trust the source."""


@dataclass
class ColumnsConfig:
    prompt: str = "prompt"
    """Column holding the prompt."""
    chosen: str = "chosen"
    """Column holding the preferred response."""
    rejected: str = "rejected"
    """Column holding the dispreferred response."""
    completion: str = "completion"
    """Column holding the completion (unpaired/KTO data)."""
    label: str = "label"
    """Column holding the desirable/undesirable label (unpaired/KTO data)."""


@dataclass
class DataConfig:
    train: str = "data/smollm2_chatterbot_vader.jsonl"
    """Training data: a .jsonl/.json/.parquet/.csv file, a `save_to_disk` folder or a Hub id."""
    eval: str | None = None
    """Held-out data in the same forms; if None, `eval_fraction` of train is held out."""
    eval_fraction: float = 0.0
    """Fraction of training prompts held out for evaluation when `eval` is not given."""
    format: str = "auto"
    """Data format, or "auto" to detect it: standard, conversational, implicit_prompt, hh,
    ultrafeedback, unpaired."""
    split: str | None = None
    """Split to read from a DatasetDict folder or Hub dataset (default: train)."""
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    """Column names."""
    max_length: int = 512
    """Max tokens of prompt + response; longer rows are truncated (prompt first, from the left)."""
    max_prompt_length: int | None = None
    """Max prompt tokens (None: only `max_length` applies)."""
    max_pairs: int | None = None
    """Use only the first N training rows (quick experiments)."""
    on_error: Literal["raise", "skip"] = "raise"
    """A bad row stops the run ("raise") or is skipped and counted ("skip")."""
    sft: bool = False
    """Read rows as prompt/response examples for supervised fine-tuning (set by `prefopt sft`):
    `prompt` + `response`/`completion`/`chosen`, or `messages` ending with the assistant turn."""


@dataclass
class LossConfig:
    name: str | list[str] = "sigmoid"
    """Loss name, or a list combined with `weights` (e.g. [sigmoid, sft])."""
    weights: list[float] | None = None
    """Weights of a combined loss (default: all 1)."""
    beta: float = 0.1
    """β: KL strength (DPO family), reward scale (SimPO), λ (ORPO)."""
    label_smoothing: float = 0.0
    """ε, the assumed label-flip rate (sigmoid = cDPO, robust)."""
    simpo_gamma: float = 1.0
    """SimPO's target margin γ."""
    kto_desirable_weight: float = 1.0
    """KTO's λ_D."""
    kto_undesirable_weight: float = 1.0
    """KTO's λ_U."""

    @property
    def names(self) -> list[str]:
        return [self.name] if isinstance(self.name, str) else list(self.name)


@dataclass
class ReferenceConfig:
    strategy: Literal["auto", "copy", "model", "adapter", "precompute", "none"] = "auto"
    """auto: adapter with LoRA, copy for full fine-tune, none for reference-free losses; and
    precompute instead of adapter/copy when training passes over the pairs twice or more
    (paired losses, no FSDP/DeepSpeed): cheaper from the second epoch on.
    copy: frozen copy of the starting policy. model: a separate checkpoint (`model`).
    adapter: the LoRA base with adapters disabled. precompute: reference log-probs computed once
    and cached on disk. none: no reference (reference-free losses only)."""
    model: str | None = None
    """Reference checkpoint for strategy "model" (e.g. the SFT model)."""
    precompute_with: Literal["copy", "model"] = "copy"
    """Which model computes the precomputed log-probs: the starting policy or `model`."""
    cache_dir: str | None = None
    """Where precomputed log-probs are cached (default: ~/.cache/prefopt/ref_logps)."""
    verify: bool = True
    """At step 0, check the reference equals the starting policy where it should."""
    offload: bool = False
    """Strategies copy/model: keep the frozen reference in CPU memory between forwards (frees
    its accelerator memory; costs a host↔device copy of its weights on every forward, or with
    FSDP2/ZeRO-3 a per-layer copy of each shard). See docs/scaling.md."""


@dataclass
class LoraConfig:
    enabled: bool = False
    """Train LoRA adapters instead of all weights."""
    r: int = 16
    """Rank."""
    alpha: int = 32
    """Scaling numerator (scale = alpha / r); > 0."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: str | list[str] = "all-linear"
    """Module names to adapt, or "all-linear"."""
    merge_on_save: bool = False
    """Save the final model with adapters merged into the weights (else the adapter only)."""
    load_in_4bit: bool = False
    """QLoRA: load the base's linear layers in 4-bit NF4 with bitsandbytes (≥ 0.46.1, the
    `qlora` extra), on the GPU or, slower, on the CPU; only the adapters train."""


@dataclass
class OptimConfig:
    lr: float = 5e-7
    """Peak learning rate (DPO paper: 1e-6 full fine-tune; LoRA wants ~10× more)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    """LR decay after warmup."""
    warmup_ratio: float = 0.1
    """Fraction of the steps spent warming up linearly (ignored if warmup_steps > 0)."""
    warmup_steps: int = 0
    """Warmup steps."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient norm to this (None: no clipping)."""
    fused: bool | None = None
    """AdamW's fused kernel (one pass per tensor). On CPU, for a 194 M-parameter model, its step
    took about 0.1 s instead of 0.45 s and peaked 0.8 GiB lower than torch's foreach default
    (bench/adamw_step.py, docs/benchmarks.md). None: fused, except when FSDP/DeepSpeed shard
    the weights."""


@dataclass
class TrainConfig:
    batch_size: int = 4
    """Pairs per micro-batch (per process)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    epochs: float = 1.0
    """Passes over the training data."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides epochs)."""
    seed: int = 42
    """Seed of data order, dropout and initialisation."""
    group_by_length: bool = True
    """Batch pairs of similar length together (less padding)."""
    response_only_logits: bool = True
    """Score only response positions, in chunks (never build [B, T, V] logits)."""
    logit_chunk_size: int = 1024
    """Positions per LM-head chunk."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Autocast precision (accelerate); log-probs always accumulate in float32."""
    num_threads: int | None = None
    """CPU threads for torch (None: torch's default)."""
    keep_freed_memory: bool = True
    """Linux/glibc: let freed tensor memory be reused instead of unmapped and page-faulted in
    again (`malloc_tuning.py`). On CPU, 1.17× faster steps for 4-7% more peak RSS on the
    benchmark, but +17% in its leanest setting (docs/benchmarks.md): turn it off when memory,
    not speed, is the limit. Applies to the whole process, from the start of training."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train."""
    stop_after_steps: int | None = None
    """Stop (checkpoint, exit as interrupted) after this many steps in this invocation: for
    time-boxed jobs; continue later with resume=latest."""
    on_nan: Literal["stop", "skip"] = "stop"
    """Non-finite loss or gradient: stop (keeping the last checkpoint) or skip the step."""
    prefix_sharing: bool | Literal["auto"] = "auto"
    """Score each pair as one [prompt | chosen | rejected] row, the prompt computed once (paired
    losses only; KTO and SFT keep the normal path). true: on, refused where the model can't
    (flash/flex attention, sliding-window or ALiBi attention); false: off; auto: on where
    supported and the data's mean prompt has at least as many tokens as its mean response
    (shorter prompts save less than the 4-D mask costs). Checked against two-pass scoring on
    the first batch before training: auto falls back (logged), true stops."""
    packing: bool | Literal["auto"] = "auto"
    """Fill each micro-batch's padding with whole pairs, in shared-prefix rows: rows keep the
    width of the batch's longest pair, shorter pairs share rows, each with its own positions
    and attention block. Fewer rows, never wider ones. Pays when lengths within a batch vary
    (train.group_by_length=false, mixed data); length-grouped batches leave little to fill.
    auto: on whenever prefix sharing is; true: also turns prefix sharing on under auto (an
    error where the model can't share prefixes); false: off."""


@dataclass
class EvalConfig:
    every_steps: int = 0
    """Evaluate every N optimizer steps (0: only at start and end)."""
    batch_size: int | None = None
    """Eval micro-batch size (default: train.batch_size)."""
    early_stopping_metric: str | None = None
    """Stop when this eval metric (e.g. "rewards/accuracies", "loss") has not improved for
    `patience` evaluations. Needs held-out data (data.eval or data.eval_fraction) and
    every_steps > 0; checked with the config."""
    early_stopping_mode: Literal["max", "min"] = "max"
    """Whether larger or smaller is better for the early-stopping metric."""
    patience: int = 3
    """Evaluations without improvement before stopping."""


@dataclass
class JudgeConfig:
    """After training: sample policy and reference on held-out prompts and judge them.

    The win rate (one comparison per prompt, ties apart, 95% Wilson interval), each side's mean
    judge score and a KL estimate go to `judge.json` in the output folder, the samples to
    `samples.jsonl`, and both into the report. Same as `prefopt eval --prompts ... --judge ...`
    on the saved model.
    """

    prompts: str | None = None
    """Held-out prompts file (rows with "prompt": text or chat messages); unset: no judging."""
    judges: list[str] = field(default_factory=lambda: ["vader"])
    """Judge specs (see `prefopt judge --help`): vader, length, regex:..., keyword:...,
    reward-model:PATH, module:function."""
    max_prompts: int | None = None
    """Use only the first N prompts."""
    max_new_tokens: int = 48
    """Tokens per sampled response."""
    temperature: float = 0.7
    """Sampling temperature (0: greedy)."""
    top_p: float = 0.9
    """Nucleus sampling mass."""
    num_samples: int = 1
    """Responses per prompt and side (a prompt's score is their mean)."""
    seed: int = 0
    """Prompt i samples with seed + i, the same noise for policy and reference."""
    tie_eps: float = 0.0
    """Score gaps at most this count as ties."""
    batch_size: int = 8
    """Prompts per generation batch."""
    report_samples: int = 4
    """With `prompts` unset: the saved policy and its reference answer the first N held-out
    prompts (data.eval, or the data.eval_fraction split) with the sampling settings above,
    unjudged, so the report still shows generations (`samples.jsonl`). 0: none."""


@dataclass
class OutputConfig:
    dir: str = "outputs/run"
    """Output folder: checkpoints, logs, final model, report."""
    save_every: int = 0
    """Checkpoint every N optimizer steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """How many step checkpoints to keep."""
    resume: str | None = None
    """"latest" or a checkpoint folder to continue from."""
    report_to: list[str] = field(default_factory=lambda: ["jsonl"])
    """Loggers: jsonl (always on), tensorboard, wandb."""
    overwrite: bool = False
    """Allow writing into a non-empty output folder without resuming."""
    progress: bool = True
    """Show a live progress bar."""
    report: bool = True
    """Write the HTML report with its plots (report/index.html) at the end. Off in sweeps and
    tests, where plotting each run costs seconds; `prefopt report OUT_DIR` writes it later."""


@dataclass
class ExperimentConfig:
    """A whole run: one section per area, each a YAML mapping (`loss: {beta: 0.2}`) or dotted
    overrides (`loss.beta=0.2`)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy's starting model: where it loads from, dtype, attention, checkpointing."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training and held-out data: files, format, columns, token limits."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The preference loss (DPO's sigmoid by default, or a weighted combination) and β."""
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    """How π_ref is computed (docs/reference-models.md) and the step-0 check."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA/QLoRA adapters instead of a full fine-tune."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW, the warmup + decay schedule and gradient clipping."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Batching, length of training, precision, device, prefix sharing and packing."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation on the held-out data during training, and early stopping."""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    """After training: policy and reference samples on held-out prompts, judged."""
    output: OutputConfig = field(default_factory=OutputConfig)
    """The output folder, checkpoints, resuming, loggers, progress bar and report."""

    def validate(self) -> None:
        """Check values and combinations; raises ConfigError naming the field."""
        from prefopt.config_checks import validate_config

        validate_config(self)

    def reference_strategy(self) -> str:
        """The strategy after resolving "auto"."""
        if self.reference.strategy != "auto":
            return self.reference.strategy
        if not any(get_loss(n).needs_reference for n in self.loss.names):
            return "none"
        if self.reference.model is not None:
            return "model"
        return "adapter" if self.lora.enabled else "copy"
