"""CUDA paths on tiny random models (seconds on one GPU): bf16 weights and bf16 autocast,
attention kernels, prefix sharing in bf16, QLoRA, gradient checkpointing, reference offload.

Without CUDA every test is skipped with the reason. The default run deselects the `gpu` marker
(pyproject's addopts); on a GPU machine run `pytest -m gpu tests/test_gpu.py -rs`. Tests that
need an optional package (bitsandbytes, flash_attn) skip on their own, naming it.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from prefopt.collate import collate_pairs
from prefopt.config import ModelConfig
from prefopt.config_io import load_config
from prefopt.errors import ConfigError
from prefopt.models import load_causal_lm
from prefopt.prefix_choice import _CHECK_TOLERANCE_16BIT, choose_prefix_sharing
from prefopt.prefix_sharing import (
    SharedPrefixLogprobModel,
    collate_shared_prefix,
    pair_row_logps,
    shared_prefix_mismatch,
)
from prefopt.run_setup import RunParts
from prefopt.tokenize import TokenizedPair, tokenize_pairs
from prefopt.trainer import TrainResult
from toy import make_tokenizer, toy_pairs
from toy_models import toy_assets, toy_train, train_lines

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning"),
]
Tensor = torch.Tensor
LN2 = math.log(2.0)
CUDA = "cuda"
BF16_TOKEN_TOL = 0.05
"""Mean per-token |Δ log p| allowed between bf16 and fp32 scoring of the same weights."""


def _missing(package: str) -> bool:
    return importlib.util.find_spec(package) is None


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return toy_assets(tmp_path_factory.mktemp("gpu"))


@pytest.fixture(autouse=True)
def fresh_accelerate_state() -> Iterator[None]:
    """accelerate keeps one process-wide state and refuses a second Accelerator with another
    mixed_precision; these tests switch between "no" and "bf16"."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def run(assets: dict[str, Path], out: Path, *extra: str) -> TrainResult:
    """Train on the GPU: 24 learnable pairs, 4 per step, lr 1e-2 (18 steps unless `extra`)."""
    return toy_train(assets, out, "train.device=cuda", *extra)


def health_kinds(out: Path) -> list[str]:
    return [f["kind"] for f in json.loads((out / "health.json").read_text())]


def capture_run(monkeypatch: pytest.MonkeyPatch) -> dict[str, RunParts]:
    """Keep the RunParts that `train` builds (its models stay alive after the run)."""
    import prefopt.trainer as trainer_module

    seen: dict[str, RunParts] = {}
    real = trainer_module.build_run

    def spy(*args: Any, **kwargs: Any) -> RunParts:
        seen["run"] = real(*args, **kwargs)
        return seen["run"]

    monkeypatch.setattr(trainer_module, "build_run", spy)
    return seen


def record_scoring(monkeypatch: pytest.MonkeyPatch, module: str) -> list[tuple[Any, ...]]:
    """Wrap `pair_row_logps` as `module` calls it; record (logps dtype, scorer's device)."""
    target = importlib.import_module(module)
    real: Callable[..., tuple[Tensor, Tensor]] = target.pair_row_logps
    calls: list[tuple[Any, ...]] = []

    def spy(scorer: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
        logps, counts = real(scorer, batch)
        calls.append((logps.dtype, next(scorer.parameters()).device.type))
        return logps, counts

    monkeypatch.setattr(target, "pair_row_logps", spy)
    return calls


def tokenized() -> list[TokenizedPair]:
    """Five pairs of different prompt and response lengths (so padding is exercised)."""
    pairs, _ = tokenize_pairs(toy_pairs(), make_tokenizer(), max_length=128)
    return pairs


def score(model: nn.Module, pairs: list[TokenizedPair], *, shared: bool = False) -> Tensor:
    """[2B] float32 log-probs (chosen rows, then rejected) of `pairs` on the GPU, per token."""
    batch = (collate_shared_prefix if shared else collate_pairs)(pairs, pad_token_id=0)
    with torch.no_grad():
        logps, counts = pair_row_logps(SharedPrefixLogprobModel(model).eval(), batch.to(CUDA))
    assert logps.dtype == torch.float32
    return logps / counts.clamp(min=1)


def load(assets: dict[str, Path], **fields: Any) -> nn.Module:
    """The toy model loaded as prefopt loads a policy (dtype, attention), on the GPU."""
    return load_causal_lm(ModelConfig(name_or_path=str(assets["model"]), **fields)).to(CUDA)


# ---------------------------------------------------------------------------------------------
# bf16: weights (model.dtype) and autocast (train.mixed_precision)
# ---------------------------------------------------------------------------------------------

BF16_MODES = {"weights": "model.dtype=bfloat16", "autocast": "train.mixed_precision=bf16"}


@pytest.mark.parametrize("mode", list(BF16_MODES))
def test_bf16_training_end_to_end(
    mode: str, assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Learns; policy and reference log-probs reach the loss in float32; the frozen copy keeps
    the starting weights; step 1 (policy == reference) has loss ln 2."""
    seen = capture_run(monkeypatch)
    policy_calls = record_scoring(monkeypatch, "prefopt.step")
    ref_calls = record_scoring(monkeypatch, "prefopt.reference")
    out = tmp_path / "out"
    result = run(assets, out, BF16_MODES[mode])

    parts = seen["run"]
    weights = {p.dtype for p in parts.model.parameters()}
    assert weights == {torch.bfloat16 if mode == "weights" else torch.float32}
    assert {p.device.type for p in parts.model.parameters()} == {CUDA}
    assert policy_calls and ref_calls
    assert set(policy_calls + ref_calls) == {(torch.float32, CUDA)}
    lines = train_lines(out)
    assert len(lines) == 18
    assert lines[0]["loss"] == pytest.approx(LN2, abs=1e-4)  # same weights, same autocast
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in lines)
    before, after = result.initial_eval, result.final_eval
    assert before is not None and after is not None
    assert before["loss"] == pytest.approx(LN2, abs=1e-3)
    assert after["loss"] < 0.5 * before["loss"]
    assert after["rewards/accuracies"] > 0.9
    ref = parts.reference
    assert ref is not None and ref.strategy == "copy"
    start = load(assets, dtype="bfloat16" if mode == "weights" else "float32").state_dict()
    kept = ref.scorer.model.state_dict()  # type: ignore[attr-defined]
    trained = parts.model.state_dict()
    assert kept.keys() == start.keys() and all(torch.equal(kept[k], v) for k, v in start.items())
    assert any(not torch.equal(trained[k], v) for k, v in start.items())


def test_mixed_precision_step0_reference_equals_policy(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    """Under bf16 autocast the copy reference must score the first batches exactly as the
    starting policy: step-0 eval rewards zero, no reference-drift finding."""
    out = tmp_path / "out"
    result = run(assets, out, "train.mixed_precision=bf16", "train.max_steps=1")
    assert result.initial_eval is not None
    assert result.initial_eval["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert result.initial_eval["loss"] == pytest.approx(LN2, abs=1e-6)
    assert "reference_drift" not in health_kinds(out)


def test_bf16_logps_close_to_fp32(assets: dict[str, Path]) -> None:
    """Same weights scored in fp32, in bf16 weights and under bf16 autocast: float32 results,
    per-token mean |Δ| within bf16 rounding. The tied embedding is scaled up so the logits
    spread like a trained model's (random init gives near-uniform ones)."""
    model = load(assets)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(20.0)  # tied: the LM head too
    pairs = tokenized()
    fp32 = score(model, pairs)
    with torch.autocast(CUDA, dtype=torch.bfloat16):
        autocast = score(model, pairs)
    weights = score(model.to(torch.bfloat16), pairs)
    assert fp32.std() > 0.5  # per-token log-probs really differ between rows
    for bf16 in (autocast, weights):
        assert torch.isfinite(bf16).all()
        assert (bf16 - fp32).abs().mean() < BF16_TOKEN_TOL
        assert not torch.equal(bf16, fp32)  # bf16 did run


# ---------------------------------------------------------------------------------------------
# Attention kernels
# ---------------------------------------------------------------------------------------------


def test_sdpa_and_eager_match(assets: dict[str, Path]) -> None:
    """fp32: the two kernels agree within 1e-4 per token, in both layouts (the shared one
    through a 4-D mask), and each layout equals two-pass scoring."""
    got = {}
    for impl in ("sdpa", "eager"):
        model = load(assets, attn_implementation=impl)
        assert model.config._attn_implementation == impl
        got[impl] = (score(model, tokenized()), score(model, tokenized(), shared=True))
    for layout in (0, 1):
        torch.testing.assert_close(got["sdpa"][layout], got["eager"][layout], atol=1e-4, rtol=0)
    for two_pass, shared in got.values():
        torch.testing.assert_close(shared, two_pass, atol=1e-4, rtol=0)


@pytest.mark.skipif(_missing("flash_attn"), reason="needs the flash_attn package")
def test_flash_attention_2(assets: dict[str, Path], tmp_path: Path) -> None:
    """flash_attention_2 (bf16) scores like sdpa within bf16 rounding, is refused with
    prefix_sharing=true (before and after loading), and auto trains two-pass."""
    flash = load(assets, attn_implementation="flash_attention_2", dtype="bfloat16")
    sdpa = load(assets, attn_implementation="sdpa", dtype="bfloat16")
    assert flash.config._attn_implementation == "flash_attention_2"
    pairs = tokenized()
    assert (score(flash, pairs) - score(sdpa, pairs)).abs().max() < BF16_TOKEN_TOL
    with pytest.raises(ConfigError, match="4-D mask, not model.attn_implementation=flash_"):
        load_config(None, ["model.attn_implementation=flash_attention_2",
                           "train.prefix_sharing=true"])  # fmt: skip
    with pytest.raises(ConfigError, match="cannot share prefixes: attn_implementation='flash_"):
        choose_prefix_sharing(True, flash, pairs, paired=True)
    result = run(assets, tmp_path / "out", "model.attn_implementation=flash_attention_2",
                 "model.dtype=bfloat16", "train.max_steps=4")  # fmt: skip
    assert result.final_eval is not None and result.initial_eval is not None
    assert result.final_eval["loss"] < result.initial_eval["loss"]


# ---------------------------------------------------------------------------------------------
# Prefix sharing in bf16
# ---------------------------------------------------------------------------------------------


def test_prefix_sharing_bf16_matches_two_pass(
    assets: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """bf16 weights on the GPU: the shared layout stays within prefopt's own 16-bit check
    tolerance of two-pass scoring, per token, on the scored pairs and through 5 training steps
    (logged per-pair log-probs hold 8-token responses)."""
    tol = _CHECK_TOLERANCE_16BIT
    model = load(assets, dtype="bfloat16")
    assert shared_prefix_mismatch(model.eval(), tokenized(), pad_token_id=0) <= tol
    caplog.set_level(logging.INFO, logger="prefopt")
    common = ("model.dtype=bfloat16", "optim.lr=1e-3", "train.max_steps=5")
    shared = run(assets, tmp_path / "shared", *common, "train.prefix_sharing=true")
    assert "prefix sharing on (train.prefix_sharing=true); matches two-pass" in caplog.text
    two_pass = run(assets, tmp_path / "two", *common, "train.prefix_sharing=false")
    tokens = 8  # "the <subject> is good and nice ." + <|im_end|>
    rows = zip(train_lines(tmp_path / "shared"), train_lines(tmp_path / "two"), strict=True)
    for a, b in rows:
        assert a["tokens/chosen"] == b["tokens/chosen"] == tokens
        for key in ("logps/chosen", "logps/rejected"):
            assert abs(a[key] - b[key]) <= tol * tokens, (a["step"], key)
        assert a["loss"] == pytest.approx(b["loss"], abs=5e-3), a["step"]  # H100: ~1e-4
    for ev_a, ev_b in ((shared.initial_eval, two_pass.initial_eval),
                       (shared.final_eval, two_pass.final_eval)):  # fmt: skip
        assert ev_a is not None and ev_b is not None
        for key in ("logps/chosen", "logps/rejected"):
            assert abs(ev_a[key] - ev_b[key]) <= tol * tokens, key


# ---------------------------------------------------------------------------------------------
# QLoRA
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(_missing("bitsandbytes"), reason="needs the bitsandbytes package")
def test_qlora_trains_with_adapter_reference(
    assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """lora.load_in_4bit: the base is really 4-bit (bitsandbytes Linear4bit layers), only the
    adapters train, the reference is the base with adapters off (loss ln 2 at step 1)."""
    seen = capture_run(monkeypatch)
    out = tmp_path / "out"
    result = run(assets, out, "lora.enabled=true", "lora.load_in_4bit=true", "lora.r=8",
                 "lora.dropout=0.0", "model.dtype=bfloat16", "train.max_steps=4")  # fmt: skip
    parts = seen["run"]
    kinds = {type(m).__name__ for m in parts.model.modules()}
    assert "Linear4bit" in kinds, "lora.load_in_4bit=true loaded an unquantised base"
    trainable = [n for n, p in parts.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    ref = parts.reference
    assert ref is not None and ref.strategy == "adapter"
    assert ref.peft_model is parts.model  # type: ignore[attr-defined]
    lines = train_lines(out)
    assert len(lines) == 4 and all(math.isfinite(r["loss"]) for r in lines)
    assert lines[0]["loss"] == pytest.approx(LN2, abs=1e-4)
    assert result.initial_eval is not None
    assert result.initial_eval["loss"] == pytest.approx(LN2, abs=1e-4)


# ---------------------------------------------------------------------------------------------
# Gradient checkpointing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_gradient_checkpointing_same_first_step(
    lora: bool, assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fp32: recomputing activations in backward gives the first step's loss and gradient norm
    of the plain run (1e-4)."""
    extra = ["train.max_steps=1", "optim.max_grad_norm=null"]
    if lora:  # frozen base: checkpointed blocks need inputs that require grad (apply_lora)
        extra += ["lora.enabled=true", "lora.r=8", "lora.dropout=0.0"]
    seen = capture_run(monkeypatch)
    run(assets, tmp_path / "plain", *extra)
    run(assets, tmp_path / "ckpt", *extra, "model.gradient_checkpointing=true")
    base: Any = seen["run"].model
    base = base.get_base_model() if lora else base
    # transformers 5 renamed the flag; 4.x only has the old name.
    flag = "is_activation_checkpointing"
    assert getattr(base, flag) if hasattr(base, flag) else base.is_gradient_checkpointing
    (plain,), (ckpt,) = train_lines(tmp_path / "plain"), train_lines(tmp_path / "ckpt")
    assert plain["grad_norm"] > 0
    assert ckpt["loss"] == pytest.approx(plain["loss"], abs=1e-4)
    assert ckpt["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-4)


# ---------------------------------------------------------------------------------------------
# Reference offload
# ---------------------------------------------------------------------------------------------


def test_reference_offload(
    assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """reference.offload: the copy reference runs on the GPU and waits in CPU memory between
    forwards; training on the GPU gives the metrics of the run without offload."""
    seen = capture_run(monkeypatch)
    ref_calls = record_scoring(monkeypatch, "prefopt.reference")
    common = ("train.max_steps=3",)
    offloaded = run(assets, tmp_path / "offload", *common, "reference.offload=true")
    parts = seen["run"]
    ref = parts.reference
    assert ref is not None and ref.strategy == "copy"
    assert {p.device.type for p in ref.scorer.parameters()} == {"cpu"}  # type: ignore[attr-defined]
    assert {p.device.type for p in parts.model.parameters()} == {CUDA}
    assert ref_calls and {device for _, device in ref_calls} == {CUDA}  # moved in to score
    resident = run(assets, tmp_path / "resident", *common)
    assert offloaded.initial_eval is not None and resident.initial_eval is not None
    assert offloaded.initial_eval["loss"] == pytest.approx(LN2, abs=1e-6)
    rows = zip(train_lines(tmp_path / "offload"), train_lines(tmp_path / "resident"), strict=True)
    for a, b in rows:
        for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)
