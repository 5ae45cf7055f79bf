"""Model sources, loading, LoRA wrapping, freezing and dropout, on tiny saved models (offline)."""

from __future__ import annotations

import importlib.util
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from prefopt.cli import EXIT_ERROR, main
from prefopt.config import LoraConfig, ModelConfig
from prefopt.errors import ModelError
from prefopt.models import (
    ModelSource,
    apply_lora,
    disable_dropout,
    freeze,
    load_causal_lm,
    load_tokenizer,
    resolve_source,
)
from toy import make_tokenizer
from toy_models import learnable_pairs, make_config, make_model, save_toy_model, write_jsonl

FAMILIES = ["llama", "qwen2", "gpt2"]
CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "gpt2": "GPT2LMHeadModel"}
NO_HUB_ID = "prefopt-tests-no-such-org/no-such-model"


@pytest.fixture(scope="module")
def toy_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One saved toy model folder per family, shared by the module (saving costs ~0.1 s each)."""
    root = tmp_path_factory.mktemp("toy_models")
    return {family: save_toy_model(root / family, family) for family in FAMILIES}


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any Hub access fail at once; huggingface_hub reads the variable at import time."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _checkpointing(model: Any) -> bool:
    # transformers 5 renamed the flag; 4.x only has the old name.
    if hasattr(model, "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(model.is_gradient_checkpointing)


# --- resolve_source -------------------------------------------------------------------------


@pytest.mark.parametrize("relative", ["./missing_model", "a/b/c", "weights.safetensors"])
def test_missing_local_path_is_not_found(relative: str, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        resolve_source(str(tmp_path / relative))
    if relative.startswith(".") or relative.count("/") > 1:
        with pytest.raises(ModelError, match="not found"):
            resolve_source(relative)


def test_folder_without_config_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelError, match="config.json"):
        resolve_source(str(tmp_path))


def test_existing_file_that_is_not_gguf_is_refused(tmp_path: Path) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(ModelError, match="is a file"):
        resolve_source(str(weights))


def test_gguf_path_splits_into_folder_and_file(tmp_path: Path) -> None:
    gguf = tmp_path / "tiny.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_source(str(gguf)) == ModelSource(str(tmp_path), "tiny.Q4_1.gguf")
    assert resolve_source(str(tmp_path), "tiny.Q4_1.gguf") == ModelSource(
        str(tmp_path), "tiny.Q4_1.gguf"
    )
    with pytest.raises(ModelError, match="'other.gguf' not found"):
        resolve_source(str(tmp_path), "other.gguf")
    with pytest.raises(ModelError, match="not found"):
        resolve_source(str(tmp_path / "absent.gguf"))


def test_local_folder_and_hub_id(toy_dirs: dict[str, Path]) -> None:
    assert resolve_source(str(toy_dirs["llama"])) == ModelSource(str(toy_dirs["llama"]))
    hub = resolve_source(NO_HUB_ID)
    assert hub == ModelSource(NO_HUB_ID, None, is_local=False)
    assert not resolve_source("gpt2").is_local


@pytest.mark.usefixtures("offline")
def test_hub_id_offline_fails_with_a_clear_model_error() -> None:
    with pytest.raises(ModelError) as info:
        load_causal_lm(ModelConfig(name_or_path=NO_HUB_ID))
    message = str(info.value)
    assert NO_HUB_ID in message
    assert "Hugging Face Hub" in message and "offline" in message
    with pytest.raises(ModelError, match="Hugging Face Hub"):
        load_tokenizer(ModelConfig(name_or_path=NO_HUB_ID))


# --- loading --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_load_causal_lm_from_saved_folder(family: str, toy_dirs: dict[str, Path]) -> None:
    model = load_causal_lm(ModelConfig(name_or_path=str(toy_dirs[family])))
    assert type(model).__name__ == CLASSES[family]
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.training  # a policy is trained; references are frozen explicitly
    assert not _checkpointing(model)
    reference = make_model(family)  # same seed as the saved folder
    for (name, loaded), original in zip(
        model.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        assert torch.equal(loaded, original), name


def test_load_with_gradient_checkpointing_and_dtype(toy_dirs: dict[str, Path]) -> None:
    cfg = ModelConfig(name_or_path=str(toy_dirs["llama"]), gradient_checkpointing=True)
    model: Any = load_causal_lm(cfg)
    assert _checkpointing(model)
    assert model.config.use_cache is False
    bf16: Any = load_causal_lm(ModelConfig(name_or_path="unused", dtype="bfloat16"),
                               str(toy_dirs["gpt2"]))  # fmt: skip
    assert type(bf16).__name__ == "GPT2LMHeadModel"  # the location argument wins
    assert bf16.transformer.wte.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("trust", [False, True])
def test_from_pretrained_kwargs(
    trust: bool, toy_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, Any] = {}
    real = AutoModelForCausalLM.from_pretrained

    def spy(location: str, **kwargs: Any) -> Any:
        seen.update(kwargs, location=location)
        return real(location, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    folder = str(toy_dirs["llama"])
    cfg = ModelConfig(name_or_path=folder)
    if trust:
        cfg.trust_remote_code = True
    load_causal_lm(cfg)
    assert seen["trust_remote_code"] is trust  # off unless the user turns it on
    assert seen["local_files_only"] is True  # a local folder never reaches for the network
    assert seen["dtype"] == torch.float32
    assert seen["location"] == folder
    assert "gguf_file" not in seen and "revision" not in seen


def test_load_tokenizer_sets_a_missing_pad_to_eos(tmp_path: Path) -> None:
    tok = make_tokenizer()
    tok.save_pretrained(tmp_path / "with_pad")
    loaded = load_tokenizer(ModelConfig(name_or_path=str(tmp_path / "with_pad")))
    assert loaded.pad_token == "<pad>" and loaded.pad_token_id == 0
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "no_pad")
    loaded = load_tokenizer(ModelConfig(name_or_path=str(tmp_path / "no_pad")))
    assert loaded.pad_token == "<|im_end|>"
    assert loaded.pad_token_id == loaded.eos_token_id == 5


def test_load_tokenizer_from_a_separate_location(tmp_path: Path, toy_dirs: dict[str, Path]) -> None:
    plain = make_tokenizer(chat_template=False)
    plain.save_pretrained(tmp_path / "plain_tok")
    cfg = ModelConfig(name_or_path=str(toy_dirs["llama"]), tokenizer=str(tmp_path / "plain_tok"))
    assert load_tokenizer(cfg).eos_token == "</s>"


# --- untrusted and damaged weights ----------------------------------------------------------


class _WritesMarker:
    """Unpickling this calls `open(marker, "w")`: stands for any code a pickle can carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def _folder_without_weights(source: Path, target: Path) -> Path:
    target.mkdir()
    for item in source.iterdir():
        if not item.name.endswith((".safetensors", ".bin")):
            shutil.copy(item, target)
    return target


def _bin_model(source: Path, target: Path) -> Path:
    """`source`'s config and tokenizer with its weights as a plain pytorch_model.bin (a torch
    zip archive of tensors only; transformers 5 no longer writes these itself)."""
    folder = _folder_without_weights(source, target)
    torch.save(make_model().state_dict(), folder / "pytorch_model.bin")
    return folder


def malicious_bin_model(source: Path, target: Path, marker: Path) -> Path:
    """A model folder whose only weights are a pytorch_model.bin pickle that writes `marker`."""
    folder = _folder_without_weights(source, target)
    payload = pickle.dumps({"model.embed_tokens.weight": _WritesMarker(marker)}, protocol=2)
    (folder / "pytorch_model.bin").write_bytes(payload)
    return folder


def test_malicious_pickle_is_refused_and_never_run(
    tmp_path: Path, toy_dirs: dict[str, Path]
) -> None:
    # The payload is real: plain pickle runs it.
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_WritesMarker(proof)))
    assert proof.exists()
    marker = tmp_path / "PWNED"
    folder = malicious_bin_model(toy_dirs["llama"], tmp_path / "evil", marker)
    with pytest.raises(ModelError) as caught:
        load_causal_lm(ModelConfig(name_or_path=str(folder)))
    message = str(caught.value)
    assert "pickled weights (.bin) hold objects other than tensors" in message
    assert "safetensors" in message and "weights_only" not in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert not marker.exists()


def test_malicious_pickle_through_the_cli_is_one_clear_line(
    tmp_path: Path, toy_dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "PWNED"
    folder = malicious_bin_model(toy_dirs["llama"], tmp_path / "evil", marker)
    data = write_jsonl(tmp_path / "train.jsonl", learnable_pairs(8))
    status = main(["train", f"model.name_or_path={folder}", f"data.train={data}",
                   f"output.dir={tmp_path / 'out'}", "output.progress=false"])  # fmt: skip
    err = capsys.readouterr().err
    assert status == EXIT_ERROR and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("prefopt: error:")]
    assert len(lines) == 1 and "pickled weights (.bin)" in lines[0], err
    assert "weights_only" not in err
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_truncated_weights_file_is_a_clear_model_error(
    tmp_path: Path, toy_dirs: dict[str, Path], kind: str
) -> None:
    full = tmp_path / "full"
    name = "model.safetensors" if kind == "safetensors" else "pytorch_model.bin"
    if kind == "safetensors":
        make_model().save_pretrained(full)
    else:
        _bin_model(toy_dirs["llama"], full)
    folder = _folder_without_weights(toy_dirs["llama"], tmp_path / "torn")
    whole = (full / name).read_bytes()
    (folder / name).write_bytes(whole[: len(whole) // 2])  # a download cut in the middle
    expected = "corrupt or truncated" if kind == "safetensors" else "or are corrupt"
    with pytest.raises(ModelError, match=expected) as caught:
        load_causal_lm(ModelConfig(name_or_path=str(folder)))
    assert "weights_only" not in str(caught.value)


def test_bin_only_folder_is_refused_before_torch_2_6(
    tmp_path: Path, toy_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch < 2.6 can run code even with weights_only=True (CVE-2025-32434): prefopt declares
    torch>=2.4, so it refuses .bin-only folders there itself, before transformers sees them."""
    bin_only = _bin_model(toy_dirs["llama"], tmp_path / "bin_only")
    monkeypatch.setattr(torch, "__version__", "2.5.1")
    with pytest.raises(ModelError, match=r"only pickled weights \(.bin\).*torch 2.5.1"):
        load_causal_lm(ModelConfig(name_or_path=str(bin_only)))
    load_causal_lm(ModelConfig(name_or_path=str(toy_dirs["llama"])))  # safetensors: fine


# --- LoRA -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_all_linear_trains_only_adapters(family: str) -> None:
    model = apply_lora(make_model(family), LoraConfig(enabled=True, r=2, alpha=4))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert trainable, "LoRA added no adapters"
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert not any("lora_" in n for n in frozen)
    # all-linear covers attention and MLP of both layers, but never the LM head.
    layers = {n.split(".h.")[-1].split(".")[0] if family == "gpt2" else n.split(".layers.")[1][0]
              for n in trainable}  # fmt: skip
    assert layers == {"0", "1"}
    assert any("mlp" in n for n in trainable) and any("attn" in n for n in trainable)
    assert not any("lm_head" in n or "wte" in n or "embed" in n for n in trainable)


def test_lora_named_targets_and_gradient_flow() -> None:
    model = apply_lora(
        make_model("llama"), LoraConfig(enabled=True, r=2, target_modules=["q_proj", "v_proj"])
    )
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 2 * 2  # 2 layers × 2 modules × (A, B)
    assert all("q_proj" in n or "v_proj" in n for n in trainable)
    ids = torch.tensor([[2, 40, 41, 42, 5]])  # [1, T]
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    assert any(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_lora_with_gradient_checkpointing_gets_gradients() -> None:
    base: Any = make_model("llama")
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_lora(base, LoraConfig(enabled=True, r=2), gradient_checkpointing=True)
    model.train()
    ids = torch.tensor([[2, 40, 41, 42, 5]])  # [1, T]
    model(input_ids=ids, labels=ids).loss.backward()
    lora_b = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(g is not None and g.abs().sum() > 0 for g in lora_b)


def test_bad_lora_target_is_a_model_error() -> None:
    with pytest.raises(ModelError, match=r"lora\.target_modules=\['nope_proj'\]"):
        apply_lora(make_model("llama"), LoraConfig(enabled=True, target_modules=["nope_proj"]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_load_in_4bit_on_cuda_without_cuda_is_refused(tmp_path: Path) -> None:
    folder = save_toy_model(tmp_path / "m", "llama")
    with pytest.raises(ModelError, match=r"\(QLoRA\) on cuda, but no CUDA GPU is visible"):
        load_causal_lm(ModelConfig(name_or_path=str(folder)), quantize_on="cuda")


def test_load_in_4bit_without_bitsandbytes_names_the_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    import prefopt.models as models

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util, "find_spec",
        lambda name: None if name == "bitsandbytes" else real_find_spec(name),
    )  # fmt: skip
    folder = save_toy_model(tmp_path / "m", "llama")
    with pytest.raises(ModelError, match=r"needs bitsandbytes: pip install 'bitsandbytes>=0\.46"):
        load_causal_lm(ModelConfig(name_or_path=str(folder)), quantize_on="cpu")


@pytest.mark.parametrize(
    ("device", "dtype", "compute", "place"),
    [
        ("cuda", "float32", torch.bfloat16, 1),
        ("cuda", "float16", torch.float16, 1),
        ("cpu", "float32", torch.float32, "cpu"),
        ("cpu", "bfloat16", torch.bfloat16, "cpu"),
    ],
)
def test_qlora_load_arguments(
    device: str, dtype: str, compute: torch.dtype, place: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What from_pretrained gets for QLoRA (the CPU load itself: tests/test_qlora.py; on CUDA:
    tests/test_gpu.py): NF4 with double quantisation, straight onto its device; on the GPU
    matmuls in 16 bits, on the CPU in the model's dtype."""
    import importlib.util

    import prefopt.models as models

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util, "find_spec",
        lambda name: object() if name == "bitsandbytes" else real_find_spec(name),
    )  # fmt: skip
    monkeypatch.setenv("LOCAL_RANK", "1")
    kwargs = models.quantization_kwargs(ModelConfig(dtype=dtype), device)  # type: ignore[arg-type]
    quant = kwargs["quantization_config"]
    assert quant.load_in_4bit and quant.bnb_4bit_quant_type == "nf4"
    assert quant.bnb_4bit_use_double_quant
    assert quant.bnb_4bit_compute_dtype == compute and kwargs["dtype"] == compute
    assert kwargs["device_map"] == {"": place}


@pytest.mark.skipif(
    importlib.util.find_spec("flash_attn") is not None, reason="checks a missing flash_attn"
)
def test_attention_whose_package_is_missing_names_the_setting(tmp_path: Path) -> None:
    """transformers raises ImportError for a missing kernel package; the error names the flag."""
    folder = save_toy_model(tmp_path / "m", "llama")
    cfg = ModelConfig(name_or_path=str(folder), attn_implementation="flash_attention_2")
    with pytest.raises(ModelError, match=r"model\.attn_implementation=flash_attention_2 cannot"):
        load_causal_lm(cfg)


def test_lora_on_an_unquantised_base_with_load_in_4bit_is_refused() -> None:
    """QLoRA's adapters on a full-precision base would be plain LoRA under a QLoRA label."""
    with pytest.raises(ModelError, match="base model was not loaded in 4-bit"):
        apply_lora(make_model("llama"), LoraConfig(enabled=True, load_in_4bit=True))


# --- freezing and dropout -------------------------------------------------------------------


def test_freeze_makes_an_eval_model_without_gradients() -> None:
    model = freeze(make_model("qwen2"))
    assert not model.training
    assert not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())


def _dropout_model(family: str) -> nn.Module:
    config = make_config(family)
    if family == "gpt2":
        config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.3
    else:  # Llama/Qwen2 apply attention dropout functionally, with no nn.Dropout module
        config.attention_dropout = 0.3
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager")


@pytest.mark.parametrize("family", FAMILIES)
def test_disable_dropout_makes_training_forward_deterministic(family: str) -> None:
    model = _dropout_model(family)
    model.train()
    ids = torch.tensor([[2, 40, 41, 42, 43, 44, 5]])  # [1, T]
    torch.manual_seed(1)
    first = model(input_ids=ids).logits
    assert not torch.equal(first, model(input_ids=ids).logits), "dropout should be active"
    disable_dropout(model)
    assert model.training  # only the probabilities change, not the mode
    torch.manual_seed(1)
    again = model(input_ids=ids).logits
    assert torch.equal(again, model(input_ids=ids).logits)


def test_disable_dropout_keeps_lora_dropout() -> None:
    model = apply_lora(_dropout_model("gpt2"), LoraConfig(enabled=True, r=2, dropout=0.25))
    disable_dropout(model)
    base = [m.p for n, m in model.named_modules() if isinstance(m, nn.Dropout) and "lora" not in n]
    lora = [m.p for n, m in model.named_modules() if isinstance(m, nn.Dropout) and "lora" in n]
    assert base and set(base) == {0.0}
    assert lora and set(lora) == {0.25}
