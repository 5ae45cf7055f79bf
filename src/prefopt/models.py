"""Loading policy/reference models and tokenizers, and wrapping them with LoRA.

Sources: a local transformers folder, a .gguf file (dequantised by transformers), the bundled
SmolLM2 ("bundled:smollm2-135m-instruct"), or a Hub id (the only case that touches the network).
Weights load from safetensors where the checkpoint has them; `trust_remote_code` stays off unless
the user turns it on.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from pickle import UnpicklingError  # only to catch it: nothing here unpickles
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from prefopt.bundled import bundled_model_dir, is_bundled
from prefopt.config import LoraConfig, ModelConfig
from prefopt.errors import ModelError

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: a folder (or Hub id) plus an optional GGUF file name."""

    location: str
    gguf_file: str | None = None
    is_local: bool = True


def resolve_source(name_or_path: str, gguf_file: str | None = None) -> ModelSource:
    """Turn a config's model string into a loadable source, failing early on missing paths."""
    if is_bundled(name_or_path):
        return ModelSource(str(bundled_model_dir(name=name_or_path)))
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(str(path.parent), path.name)
    if path.is_file():
        raise ModelError(f"{path} is a file: give the model's folder (with config.json) or a .gguf")
    if path.is_dir():
        if gguf_file is not None and not (path / gguf_file).is_file():
            raise ModelError(f"GGUF file '{gguf_file}' not found in {path}")
        markers = ("config.json", "adapter_config.json", "tokenizer_config.json")
        if gguf_file is None and not any((path / m).is_file() for m in markers):
            raise ModelError(f"{path} has no config.json: not a transformers model folder")
        return ModelSource(str(path), gguf_file)
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if (
        looks_local
        or path.suffix in (".gguf", ".safetensors", ".bin")
        or not _HUB_ID.match(name_or_path)
    ):
        raise ModelError(f"model path not found: {name_or_path}")
    return ModelSource(name_or_path, gguf_file, is_local=False)


def _load_kwargs(cfg: ModelConfig, source: ModelSource) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    if source.is_local or _hub_unreachable(source.location):
        kwargs["local_files_only"] = True
    return kwargs


HUB_TIMEOUT_S = 10.0
"""Seconds to wait for the Hub to answer before loading a Hub id from the local cache only."""


def _hub_unreachable(name: str) -> bool:
    """True if the Hub does not answer about `name` (no network): then use the cache only.

    from_pretrained retries an unreachable Hub with backoff for most of a minute; one question
    with a short timeout makes an offline machine fall back to its cache (or fail) in seconds.
    """
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    if constants.HF_HUB_OFFLINE:
        return False  # from_pretrained already stays local
    try:
        HfApi().model_info(name, timeout=HUB_TIMEOUT_S)
    except HfHubHTTPError:
        return False  # the Hub answered (no such repo, gated, ...): from_pretrained says which
    except Exception:  # DNS failure, connection refused, timeout
        logger.warning("the Hugging Face Hub cannot be reached: looking for %s in the cache", name)
        return True
    return False


def _hub_error(source: ModelSource, exc: Exception) -> ModelError:
    if source.is_local:
        return ModelError(f"could not load {source.location}: {exc}")
    return ModelError(
        f"'{source.location}' is not a local path, and loading it from the Hugging Face Hub "
        f"failed (offline, or no such repo?): {type(exc).__name__}: {str(exc).splitlines()[0]}"
    )


def _weights_fault(exc: BaseException) -> BaseException | None:
    """The exception in `exc`'s chain (transformers 4.x wraps them) saying a weights file is
    pickled with more than tensors or torn, if any: not an absent file or a bad option."""
    seen: BaseException | None = exc
    for _ in range(8):  # a chain is short; the bound only guards against a cycle
        if seen is None:
            return None
        if isinstance(seen, (UnpicklingError, SafetensorError)):
            return seen
        if isinstance(seen, RuntimeError) and "PytorchStreamReader" in str(seen):
            return seen  # a torn .bin zip archive
        seen = seen.__cause__ or seen.__context__
    return None


def _weights_error(source: ModelSource, fault: BaseException) -> ModelError:
    where = f"could not load the weights in {source.location}"
    if isinstance(fault, SafetensorError):
        first = str(fault).splitlines()[0] if str(fault) else ""
        return ModelError(
            f"{where}: a .safetensors file is corrupt or truncated ({first}); fetch it again"
        )
    # torch's own message advises retrying with weights_only=False, i.e. running the file's
    # code: it must never reach the user, so it is not quoted.
    return ModelError(
        f"{where}: its pickled weights (.bin) hold objects other than tensors (possibly code, "
        "which prefopt never runs) or are corrupt. Use .safetensors weights: get the model in "
        "that format, or convert a .bin you trust with transformers' "
        "`save_pretrained(..., safe_serialization=True)`"
    )


def _refuse_unsafe_bin(source: ModelSource) -> None:
    """Refuse pickled-only (.bin) local weights on torch < 2.6.

    Before torch 2.6, `torch.load(weights_only=True)` could still run code (CVE-2025-32434).
    prefopt supports torch ≥ 2.4, so it checks the version itself rather than rely on the
    installed transformers doing so.
    """
    if not source.is_local or source.gguf_file or _torch_at_least(2, 6):
        return
    folder = Path(source.location)
    if any(folder.glob("*.safetensors")) or not any(folder.glob("*.bin")):
        return
    raise ModelError(
        f"{folder} holds only pickled weights (.bin), and torch {torch.__version__} cannot load "
        "them safely (torch < 2.6 can run code even with weights_only=True); upgrade torch to "
        "2.6+, or use .safetensors weights (convert with transformers' "
        "`save_pretrained(..., safe_serialization=True)` where the file is trusted)"
    )


def _torch_at_least(major: int, minor: int) -> bool:
    found = re.match(r"(\d+)\.(\d+)", torch.__version__)
    return found is None or (int(found[1]), int(found[2])) >= (major, minor)


def load_tokenizer(cfg: ModelConfig) -> Any:
    """Load the tokenizer; a missing pad token is set to EOS (masks come from lengths anyway)."""
    from transformers import AutoTokenizer

    source = resolve_source(cfg.tokenizer or cfg.name_or_path, cfg.gguf_file)
    try:
        tok = AutoTokenizer.from_pretrained(source.location, **_load_kwargs(cfg, source))
    except (OSError, ValueError) as exc:
        raise _hub_error(source, exc) from None
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ModelError(f"tokenizer of {source.location} has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    return tok


def quantization_kwargs(cfg: ModelConfig, device: str) -> dict[str, Any]:
    """from_pretrained arguments that load the linear layers in 4-bit NF4 (QLoRA) on `device`.

    NF4 with double quantisation, as in the QLoRA paper (Dettmers et al. 2023, §3).
    bitsandbytes quantises as it places the weights and cannot move them afterwards, so they
    load straight onto their final device:

    * "cuda": this process's GPU (LOCAL_RANK under accelerate/torchrun); matmuls compute in
      `cfg.dtype`, or bf16 when that is float32 (4-bit × fp32 only costs time there);
    * "cpu": bitsandbytes ≥ 0.46.1 has CPU kernels (transformers needs that version anyway);
      matmuls compute in `cfg.dtype`, since CPUs without bf16 units emulate it slowly.
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("lora.load_in_4bit=true (QLoRA) on cuda, but no CUDA GPU is visible")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(
            "lora.load_in_4bit=true (QLoRA) needs bitsandbytes: pip install 'bitsandbytes>=0.46.1'"
        )
    from transformers import BitsAndBytesConfig

    on_gpu = device == "cuda"
    if not on_gpu:
        _quiet_inference_kernel_notice()
    compute = torch.bfloat16 if on_gpu and cfg.dtype == "float32" else _DTYPES[cfg.dtype]
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )
    place: int | str = int(os.environ.get("LOCAL_RANK", "0")) if on_gpu else "cpu"
    return {"quantization_config": quant, "device_map": {"": place}, "dtype": compute}


def load_causal_lm(
    cfg: ModelConfig, name_or_path: str | None = None, *, quantize_on: str | None = None
) -> nn.Module:
    """Load a causal LM per `cfg` (optionally from another location, e.g. a reference model).

    Args:
        cfg: Model settings (dtype, attention, trust_remote_code, gradient checkpointing).
        name_or_path: Location overriding `cfg.name_or_path`.
        quantize_on: None for full precision; "cpu" or "cuda" to load the linear layers in
            4-bit NF4 on that device (QLoRA's base, see `quantization_kwargs`).

    Returns:
        The model, in train mode, on CPU (4-bit: on `quantize_on`).
    """
    from transformers import AutoModelForCausalLM

    source = resolve_source(name_or_path or cfg.name_or_path, cfg.gguf_file)
    kwargs = _load_kwargs(cfg, source)
    kwargs["dtype"] = _DTYPES[cfg.dtype]
    if quantize_on is not None:
        kwargs.update(quantization_kwargs(cfg, quantize_on))
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    _refuse_unsafe_bin(source)
    try:
        model = AutoModelForCausalLM.from_pretrained(source.location, **kwargs)
    except ImportError as exc:
        if not cfg.attn_implementation:
            raise
        # transformers' "FlashAttention2 has been toggled on, but … not installed" (or another
        # kernel's package missing): name the setting that asked for it.
        raise ModelError(
            f"model.attn_implementation={cfg.attn_implementation} cannot be used: {exc} "
            "(leave it unset for sdpa)"
        ) from None
    except (OSError, ValueError, RuntimeError, UnpicklingError, SafetensorError) as exc:
        fault = _weights_fault(exc)
        if fault is not None:
            raise _weights_error(source, fault) from None
        if isinstance(exc, RuntimeError):
            raise  # not a file problem (e.g. a shape mismatch): keep the traceback
        raise _hub_error(source, exc) from None
    if quantize_on is not None:
        keep_4bit_training_layout(model)
    if source.gguf_file:
        # A dequantised GGUF is a plain float model; drop the quantizer so it saves normally.
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    if cfg.gradient_checkpointing:
        _enable_checkpointing(model)
    model.train()  # from_pretrained returns eval mode; callers freeze() a reference explicitly
    logger.info("loaded %s (%s, %.1f M parameters)", source.location, cfg.dtype, _millions(model))
    return model


def _quiet_inference_kernel_notice() -> None:
    """bitsandbytes' CPU backend warns at import, on AVX512-BF16 CPUs, that it could not fetch
    its inference kernel from the Hub (`pip install kernels`). Training never uses that kernel
    (`keep_4bit_training_layout`), so the advice would only send users after a download.
    (Adding the same filter function again is a no-op, so repeated loads stack nothing.)"""
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_not_kernel_notice)


def _not_kernel_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


def keep_4bit_training_layout(model: nn.Module) -> None:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference behind training's back.

    On CPUs with AVX512-BF16, a Linear4bit layer's first eval-mode, no-grad forward (our
    evaluation, the adapter reference's scoring) rewrites its weight in place into an
    inference-only layout with bf16 block scales (bitsandbytes 0.49.0 on; 0.46-0.48 lack
    it). Every later training forward then uses that kernel: the base's outputs shift
    (1.5e-4 nats on a 2-layer toy) and no gradient flows back through the frozen base, so
    adapters below the top layer get wrong gradients (0.2 off on the toy;
    tests/test_qlora.py). The layout also fails outright on layers narrower than a
    quantisation block (64). Training keeps the one layout that backward supports; the flag
    is bitsandbytes' own switch for this path.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            setattr(module, "support_avx512bf16_for_cpu", False)  # noqa: B010 (nn.Module typing)


def flex_attention_trains_on_cpu() -> bool:
    """Whether this torch's FlexAttention has a CPU backward (torch 2.13's refuses it as soon as
    a gradient is asked for, which a run would only meet at its first training step)."""
    from torch.nn.attention.flex_attention import flex_attention

    q = torch.zeros(1, 1, 16, 8, requires_grad=True)  # [B, H, T, D]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile"
        try:
            flex_attention(q, q, q)
        except NotImplementedError:
            return False
    return True


def _enable_checkpointing(model: Any) -> None:
    """Recompute each decoder layer in backward (non-reentrant: works with frozen inputs)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.x's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


@contextlib.contextmanager
def quiet_peft_wrapping() -> Iterator[None]:
    """Wrapping a model in peft (new adapters or saved ones) reads transformers' deprecated
    `is_gradient_checkpointing` alias: a FutureWarning the user can do nothing about."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
        yield


def _millions(model: nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def apply_lora(
    model: nn.Module, cfg: LoraConfig, *, gradient_checkpointing: bool = False
) -> nn.Module:
    """Wrap `model` with fresh LoRA adapters (peft); only adapter weights stay trainable."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training

    if cfg.load_in_4bit:
        if not getattr(model, "is_loaded_in_4bit", False):
            raise ModelError("lora.load_in_4bit=true, but the base model was not loaded in 4-bit")
        # Norms and LM head in fp32 for stable training. Checkpointing is already on when asked
        # (load_causal_lm) and input grads are enabled below, so peft need not do either again.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
    )
    try:
        with quiet_peft_wrapping():
            peft_model = get_peft_model(model, peft_cfg)  # type: ignore[arg-type]
    except ValueError as exc:
        raise ModelError(f"lora.target_modules={cfg.target_modules!r}: {exc}") from None
    if gradient_checkpointing:  # checkpointed blocks need inputs that require grad
        peft_model.enable_input_require_grads()
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    logger.info("LoRA r=%d on %s: %.2f M trainable parameters", cfg.r, cfg.target_modules,
                trainable / 1e6)  # fmt: skip
    return peft_model


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no gradients: what a reference model must be."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout in the base model to p=0 (as DPO practice does: the policy's and the
    reference's log-probs must be comparable). LoRA's own dropout is left as configured."""
    for name, module in model.named_modules():
        if "lora_dropout" in name:
            continue
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        # Llama/Qwen2-style attention applies dropout functionally with this float attribute,
        # which no nn.Dropout module exposes.
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
