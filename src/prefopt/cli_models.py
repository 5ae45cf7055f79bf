"""What the look-at-a-model commands share: loading a policy with its reference, and the model,
sampling and output arguments of `prefopt generate`, `judge`, `score` and `eval --judge`.

torch and transformers are imported inside the functions, so building the parser stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from prefopt.data.records import Text
from prefopt.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from prefopt.config import ExperimentConfig
    from prefopt.generation import SamplingParams

__all__ = [
    "LoadedModels",
    "add_model_args",
    "add_sampling_args",
    "as_json",
    "is_adapter",
    "load_models",
    "read_prompts",
    "run_meta",
    "sampling_params",
    "side_by_side",
    "write_json",
    "write_jsonl",
]

logger = logging.getLogger(__name__)

REF_HELP = (
    "reference model (default: the adapter's base, if --model is a LoRA adapter folder or a "
    "checkpoint of a LoRA run)"
)


@dataclass
class LoadedModels:
    """A policy, its reference, and their tokenizer.

    Attributes:
        policy: The policy (a causal LM, or a peft model on its base), eval mode, on device.
        reference: A separately loaded reference, or None.
        tokenizer: The policy's tokenizer.
        adapter_reference: The reference is the policy with its adapters disabled.
    """

    policy: nn.Module
    reference: nn.Module | None
    tokenizer: Any
    adapter_reference: bool = False

    @property
    def has_reference(self) -> bool:
        return self.adapter_reference or self.reference is not None

    @contextlib.contextmanager
    def as_reference(self) -> Iterator[nn.Module]:
        """The reference: the adapter-off policy (only inside this context), or the other model."""
        from prefopt.generation import adapter_disabled

        if self.adapter_reference:
            with adapter_disabled(self.policy) as base:
                yield base
        elif self.reference is not None:
            yield self.reference
        else:
            raise ConfigError("no reference model")


def is_adapter(location: str, run: ExperimentConfig | None) -> bool:
    """A LoRA policy: an adapter folder, or a checkpoint of a LoRA training run (`run`: the
    checkpoint's run config, already read; None: not a checkpoint)."""
    if (Path(location) / "adapter_config.json").is_file():
        return True
    return run is not None and run.lora.enabled


def _model_cfg(location: str, dtype: str) -> Any:
    """The slice of a run config that `load_policy` and `load_tokenizer` read."""
    from prefopt.config import ModelConfig

    return SimpleNamespace(model=ModelConfig(name_or_path=location, dtype=dtype))  # type: ignore[arg-type]


def _tokenizer(location: str, dtype: str, run: ExperimentConfig | None) -> Any:
    """The tokenizer saved with a model; an adapter folder without one falls back to its base,
    a training checkpoint (`run`: its run's config, see `_checkpoint_run`) uses its run's."""
    from prefopt.models import load_tokenizer
    from prefopt.output import adapter_base

    if run is not None:
        return load_tokenizer(run.model)
    folder = Path(location)
    base = adapter_base(folder)
    if base is not None and not (folder / "tokenizer_config.json").is_file():
        location = base
    return load_tokenizer(_model_cfg(location, dtype).model)


def _checkpoint_run(location: str, dtype: str) -> ExperimentConfig | None:
    """The run config of checkpoint `location` as these commands load it (None: not a
    checkpoint); read once per location, then handed to each loader."""
    from prefopt.eval_command import checkpoint_run

    return checkpoint_run(_model_cfg(location, dtype), location)


def load_models(
    model: str,
    ref: str | None,
    *,
    dtype: str = "float32",
    device: str = "auto",
    need_reference: bool = True,
) -> LoadedModels:
    """Load a policy (a model folder, a LoRA adapter folder on its base, or a training
    checkpoint) and its reference.

    Without `ref`, an adapter policy's reference is the same model with the adapter disabled
    (no second copy); a full model then has no reference, an error if `need_reference`.

    Raises:
        ConfigError: No reference where one is needed, or policy and reference tokenizers differ.
    """
    import torch

    from prefopt.eval_command import load_policy
    from prefopt.models import freeze

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    run = _checkpoint_run(model, dtype)
    if ref is None and need_reference and not is_adapter(model, run):
        raise ConfigError(
            f"{model} is a full model, so its reference is not implied: pass --ref (usually the "
            "model training started from), or give a LoRA adapter folder as --model"
        )
    tokenizer = _tokenizer(model, dtype, run)
    policy = freeze(load_policy(_model_cfg(model, dtype), model, run)).to(device)
    reference = None
    if ref is not None:
        ref_run = _checkpoint_run(ref, dtype)
        if _tokenizer(ref, dtype, ref_run).get_vocab() != tokenizer.get_vocab():
            raise ConfigError(f"--ref {ref} has a different tokenizer from --model {model}")
        reference = freeze(load_policy(_model_cfg(ref, dtype), ref, ref_run)).to(device)
    adapter_ref = ref is None and hasattr(policy, "disable_adapter")
    return LoadedModels(policy, reference, tokenizer, adapter_ref)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """`--model`, `--ref`, `--dtype`, `--device`, `--batch-size`, `--quiet`."""
    p.add_argument(
        "--model",
        help="policy: a model folder, a LoRA adapter folder, or a training checkpoint "
        "(OUTPUT/checkpoints/step-N)",
    )
    p.add_argument("--ref", help=REF_HELP)
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights"
    )
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda")
    p.add_argument("--batch-size", type=int, default=8, help="prompts/rows per forward pass")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_sampling_args(p: argparse.ArgumentParser, *, prompts_required: bool = True) -> None:
    """`--prompts` and the sampling flags (temperature, top-p, tokens, samples, seed)."""
    p.add_argument(
        "--prompts",
        required=prompts_required,
        help="file of rows with 'prompt': text or chat messages",
    )
    p.add_argument("--max-prompts", type=int, help="use only the first N prompts")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus mass (default 0.9)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens per response")
    p.add_argument("--num-samples", type=int, default=1, help="responses per prompt and model")
    p.add_argument("--seed", type=int, default=0, help="prompt i samples with seed + i")


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    """The sampling flags of `add_sampling_args` as `SamplingParams`."""
    from prefopt.generation import SamplingParams

    return SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        num_samples=args.num_samples,
        seed=args.seed,
    )


def read_prompts(args: argparse.Namespace) -> list[Text]:
    """The `--prompts` file's prompts, the first `--max-prompts` of them if given."""
    from prefopt.generation import load_prompts

    prompts = load_prompts(args.prompts)
    return prompts[: args.max_prompts] if args.max_prompts else prompts


def run_meta(args: argparse.Namespace, models: LoadedModels, params: SamplingParams, n: int) -> str:
    """The header of a samples page: policy, reference, prompts and sampling settings."""
    ref = args.ref or ("the adapter's base" if models.adapter_reference else "none")
    sampling = ", ".join(f"{k}={v}" for k, v in asdict(params).items())
    return f"policy: {args.model}\nreference: {ref}\nprompts: {args.prompts} ({n})\n{sampling}"


def write_json(path: str, payload: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: str, rows: Sequence[dict[str, Any]]) -> None:
    Path(path).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def as_json(value: Text) -> Any:
    return value if isinstance(value, str) else list(value)


def side_by_side(args: argparse.Namespace, need_reference: bool) -> Any:
    """Load models and sample both sides: (models, params, prompts, samples)."""
    from prefopt.generation import generate_side_by_side

    params, prompts = sampling_params(args), read_prompts(args)
    models = load_models(
        args.model, args.ref, dtype=args.dtype, device=args.device, need_reference=need_reference
    )
    if not models.has_reference:
        logger.warning("no reference (pass --ref, or an adapter as --model): policy samples only")
    samples = generate_side_by_side(
        models.policy,
        models.reference,
        models.tokenizer,
        prompts,
        params,
        adapter_reference=models.adapter_reference,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    return models, params, prompts, samples
