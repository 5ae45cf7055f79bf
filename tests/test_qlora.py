"""QLoRA for real on the CPU: bitsandbytes' 4-bit NF4 base (its CPU kernels, ≥ 0.46.1) with
LoRA adapters, trained end to end by `prefopt train` on a tiny random Llama.

The same path on CUDA is tests/test_gpu.py::test_qlora_trains_with_adapter_reference; this file
runs in CI, so the 4-bit loading, peft's k-bit preparation, the adapter reference and the saved
adapters are exercised on every change, not only when a GPU is lent.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from prefopt.run_setup import RunParts
from toy_models import learnable_pairs, make_config, toy_assets, toy_train, train_lines, write_jsonl

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("bitsandbytes") is None,
        reason="needs bitsandbytes (the dev extra installs it)",
    ),
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning"),
]
LN2 = math.log(2.0)


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return toy_assets(tmp_path_factory.mktemp("qlora"))


def quantised_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the packed 4-bit weights (uint8) of every bitsandbytes Linear4bit layer."""
    return {
        name: module.weight.data.clone()
        for name, module in model.named_modules()
        if type(module).__name__ == "Linear4bit"
    }


def test_qlora_on_cpu_trains_only_adapters_over_a_4bit_base(
    assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The base is really 4-bit NF4 and never moves, only the adapters train, the reference is
    the base with the adapters off (ln 2 at the start), and the run learns the toy rule."""
    import prefopt.trainer as trainer_module

    seen: dict[str, Any] = {}
    real = trainer_module.build_run

    def spy(*args: Any, **kwargs: Any) -> RunParts:
        parts = real(*args, **kwargs)
        seen["parts"], seen["start"] = parts, quantised_weights(parts.model)
        return parts

    monkeypatch.setattr(trainer_module, "build_run", spy)
    out = tmp_path / "out"
    result = toy_train(assets, out, "train.device=cpu", "lora.enabled=true",
                       "lora.load_in_4bit=true", "lora.r=8", "lora.dropout=0.0",
                       "train.epochs=5", "reference.strategy=adapter")  # fmt: skip

    parts: RunParts = seen["parts"]
    start: dict[str, torch.Tensor] = seen["start"]
    assert start, "lora.load_in_4bit=true loaded no bitsandbytes Linear4bit layer"
    assert all(w.dtype == torch.uint8 for w in start.values())  # packed NF4, two per byte
    after = quantised_weights(parts.model)
    assert after.keys() == start.keys()
    assert all(torch.equal(after[k], w) for k, w in start.items()), "the 4-bit base moved"
    trainable = [n for n, p in parts.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    ref = parts.reference
    assert ref is not None and ref.strategy == "adapter"

    lines = train_lines(out)
    assert len(lines) == 30 and all(math.isfinite(r["loss"]) for r in lines)
    assert lines[0]["loss"] == pytest.approx(LN2, abs=1e-4)
    assert result.initial_eval is not None and result.final_eval is not None
    assert result.initial_eval["loss"] == pytest.approx(LN2, abs=1e-4)
    assert result.final_eval["loss"] < result.initial_eval["loss"] - 0.15
    assert result.final_eval["rewards/accuracies"] > 0.9


def test_qlora_adapters_load_on_the_full_precision_base(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    """The saved adapters are plain peft adapters: they load onto the unquantised base with
    transformers + peft, and the model card says how the base was loaded."""
    out = tmp_path / "out"
    toy_train(assets, out, "train.device=cpu", "lora.enabled=true", "lora.load_in_4bit=true",
              "lora.r=8", "train.max_steps=2")  # fmt: skip
    base = AutoModelForCausalLM.from_pretrained(assets["model"])
    loaded = PeftModel.from_pretrained(base, out / "model")
    names = [n for n, _ in loaded.named_parameters()]
    assert any("lora_A" in n for n in names)
    assert not any(type(m).__name__ == "Linear4bit" for m in loaded.modules())
    card = (out / "model/README.md").read_text()
    assert "QLoRA r=8" in card and "4-bit NF4" in card and "checkpoints/step-N" in card


def eval_then_train_gradients(model: torch.nn.Module, ids: torch.Tensor) -> list[float]:
    """Max |Δ grad| and |Δ loss| of a training step taken before and after one eval-mode,
    no-grad forward (what evaluation and the adapter reference do between steps)."""

    def train_step() -> tuple[float, dict[str, torch.Tensor]]:
        model.train()
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.item(), grads

    loss0, grads0 = train_step()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    loss1, grads1 = train_step()
    assert grads0.keys() == grads1.keys() and grads0
    return [abs(loss1 - loss0), max((grads1[k] - grads0[k]).abs().max().item() for k in grads0)]


def test_an_evaluation_does_not_change_4bit_training_on_cpu(tmp_path: Path) -> None:
    """bitsandbytes repacks a 4-bit layer for CPU inference at its first eval forward on
    AVX512-BF16 CPUs, after which training loses the gradient path through the base
    (models.keep_4bit_training_layout turns that off). Layers 128 wide, so the repacking,
    which needs at least one 64-wide block, would really run."""
    from bitsandbytes.functional import has_avx512bf16

    from prefopt.config import LoraConfig, ModelConfig
    from prefopt.models import apply_lora, load_causal_lm

    def fresh() -> torch.nn.Module:
        cfg = ModelConfig(name_or_path=str(folder))
        lora = LoraConfig(enabled=True, load_in_4bit=True, r=4, dropout=0.0)
        model = apply_lora(load_causal_lm(cfg, quantize_on="cpu"), lora)
        torch.manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:  # nonzero adapters, so every layer's gradient is tested
                torch.nn.init.normal_(p, std=0.05)
        return model

    config = make_config("llama")
    config.hidden_size, config.intermediate_size, config.head_dim = 128, 256, 32
    torch.manual_seed(0)
    folder = tmp_path / "wide"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    assert eval_then_train_gradients(fresh(), ids) == [0.0, 0.0]
    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes' repacking never runs here")
    unguarded = fresh()
    for module in unguarded.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = True  # bitsandbytes' own default
    loss_shift, grad_shift = eval_then_train_gradients(unguarded, ids)
    assert grad_shift > 1e-3, "the guard's reason is gone: bitsandbytes no longer repacks"


def test_qlora_two_processes_equal_one(assets: dict[str, Path], tmp_path: Path) -> None:
    """QLoRA under DDP (torchrun, 2 CPU processes with gloo), each process with its own 4-bit
    base: 2 × batch 4 logs the metrics and reaches the adapters of 1 × batch 8."""
    from dist_helpers import (
        ROOT,
        assert_close_weights,
        assert_same_metrics,
        check,
        common,
        final_weights,
        launch_retrying,
        torchrun,
    )
    from prefopt.config_io import load_config
    from prefopt.trainer import train

    qlora = ["lora.enabled=true", "lora.load_in_4bit=true", "lora.r=8", "lora.dropout=0.0"]
    data = {
        "model": assets["model"],
        "train": write_jsonl(tmp_path / "32.jsonl", learnable_pairs(32)),
    }
    one, two = tmp_path / "one", tmp_path / "two"
    train(load_config(None, [*common(data, one), *qlora, "train.batch_size=8"]))
    args = [*common(data, two), *qlora, "train.batch_size=4"]
    check(launch_retrying(lambda: torchrun("-m", "prefopt.cli", "train", *args, cwd=ROOT),
                          tmp_path, "two"))  # fmt: skip
    assert_same_metrics(train_lines(two), train_lines(one), rel=1e-5)
    weights = final_weights(two)
    assert weights and all("lora_" in name for name in weights)
    assert_close_weights(weights, final_weights(one), atol=5e-5)


def test_qlora_resume_equals_uninterrupted(assets: dict[str, Path], tmp_path: Path) -> None:
    """Stopped after 2 steps and resumed, a QLoRA run ends on the same adapters (dropout on,
    so the saved RNG state matters too): the checkpoint holds only the adapters, and the 4-bit
    base is rebuilt from the model folder on resume."""
    from safetensors.torch import load_file

    from prefopt.step_guards import Interrupted

    common = ("train.device=cpu", "lora.enabled=true", "lora.load_in_4bit=true", "lora.r=8",
              "lora.dropout=0.1", "train.max_steps=5", "reference.strategy=adapter")  # fmt: skip
    toy_train(assets, tmp_path / "a", *common)
    with pytest.raises(Interrupted):
        toy_train(assets, tmp_path / "b", *common, "train.stop_after_steps=2")
    toy_train(assets, tmp_path / "b", *common, "resume=latest")
    a = load_file(str(tmp_path / "a/checkpoints/step-000005/trainable.safetensors"))
    b = load_file(str(tmp_path / "b/checkpoints/step-000005/trainable.safetensors"))
    assert a and all("lora_" in name for name in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_qlora_merge_on_save_merges_into_the_full_precision_base(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    """lora.merge_on_save with QLoRA saves a plain model: the trained adapters merged into the
    full-precision base (not a 4-bit model with merged weights rounded back to 4 bits)."""
    import dataclasses
    import json

    from prefopt.checkpoint import load_trainable
    from prefopt.config_io import load_config
    from prefopt.run_setup import build_policy

    out = tmp_path / "out"
    overrides = ["train.device=cpu", "lora.enabled=true", "lora.load_in_4bit=true", "lora.r=8",
                 "lora.dropout=0.0", "train.max_steps=3"]  # fmt: skip
    toy_train(assets, out, *overrides, "lora.merge_on_save=true")
    assert "quantization_config" not in json.loads((out / "model/config.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    assert not any(type(m).__name__ == "Linear4bit" or "lora" in n
                   for n, m in merged.named_modules())  # fmt: skip

    cfg = load_config(None, [f"model.name_or_path={assets['model']}", *overrides])
    unquantised = dataclasses.replace(cfg.lora, load_in_4bit=False)
    full = build_policy(dataclasses.replace(cfg, lora=unquantised))
    load_trainable(out / "checkpoints/step-000003", full)
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = full.eval()(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
