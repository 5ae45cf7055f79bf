"""End-to-end training on tiny random models (CPU, seconds): learning happens, references hold."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from prefopt.config_io import load_config
from prefopt.errors import ConfigError
from prefopt.trainer import Interrupted, TrainResult
from toy_models import learnable_pairs, save_toy_model, toy_train, train_lines, write_jsonl


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("assets")
    return {
        "model": save_toy_model(root / "model", "llama", seed=0),
        "other": save_toy_model(root / "other", "llama", seed=1),
        "train": write_jsonl(root / "train.jsonl", learnable_pairs(24, seed=0)),
        "eval": write_jsonl(root / "eval.jsonl", learnable_pairs(8, seed=1)),
    }


def run(assets: dict[str, Path], out: Path, *overrides: str) -> TrainResult:
    return toy_train(assets, out, *overrides)


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    return load_file(str(ckpts[-1] / "trainable.safetensors"))


def test_full_finetune_learns_and_saves_loadable_model(assets: dict[str, Path], tmp_path: Path):
    result = run(assets, tmp_path / "out")
    before, after = result.initial_eval, result.final_eval
    assert before is not None and after is not None
    assert before["loss"] == pytest.approx(0.6931, abs=1e-4)  # reference == policy at step 0
    assert before["rewards/accuracies"] == 0.5
    assert after["loss"] < 0.3 * before["loss"]
    assert after["rewards/accuracies"] > 0.9
    assert after["rewards/margins"] > 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model")
    start = AutoModelForCausalLM.from_pretrained(assets["model"])
    changed = any(
        not torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), start.state_dict().values(), strict=True)
    )
    assert changed
    card = (tmp_path / "out" / "model" / "README.md").read_text()
    assert "sigmoid" in card and "beta = 0.1" in card
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    train_lines = [json.loads(x) for x in lines if '"split": "train"' in x]
    assert len(train_lines) == result.state.step == 18  # 24 pairs / 4 × 3 epochs
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "rewards/accuracies"} <= set(train_lines[0])


def test_copy_reference_is_not_trained(assets: dict[str, Path], tmp_path: Path, monkeypatch):
    """Spy on the reference built for the run: its weights must not move."""
    import prefopt.run_setup as rs

    built = {}
    real = rs.build_reference

    def spy(*args, **kwargs):
        ref = real(*args, **kwargs)
        built["ref"] = ref
        built["start"] = {k: v.clone() for k, v in ref.scorer.state_dict().items()}
        return ref

    monkeypatch.setattr(rs, "build_reference", spy)
    run(assets, tmp_path / "out", "train.max_steps=3")
    after = built["ref"].scorer.state_dict()
    assert all(torch.equal(after[k], v) for k, v in built["start"].items())


def test_lora_adapter_reference_trains_only_adapters(assets: dict[str, Path], tmp_path: Path):
    from peft import PeftModel

    result = run(assets, tmp_path / "out", "lora.enabled=true", "lora.r=8", "train.epochs=5")
    assert result.final_eval is not None and result.initial_eval is not None
    assert result.initial_eval["loss"] == pytest.approx(0.6931, abs=1e-4)
    assert result.final_eval["loss"] < result.initial_eval["loss"] - 0.15
    assert result.final_eval["rewards/accuracies"] > 0.9
    weights = final_weights(tmp_path / "out")
    assert weights and all("lora_" in name for name in weights)
    base = AutoModelForCausalLM.from_pretrained(assets["model"])
    loaded = PeftModel.from_pretrained(base, tmp_path / "out" / "model")
    assert loaded is not None


def test_lora_merge_on_save_gives_plain_model(assets: dict[str, Path], tmp_path: Path):
    run(
        assets,
        tmp_path / "out",
        "lora.enabled=true",
        "lora.merge_on_save=true",
        "train.max_steps=2",
    )
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model")
    assert not any("lora" in n for n, _ in model.named_parameters())


def test_separate_reference_model(assets: dict[str, Path], tmp_path: Path, caplog):
    caplog.set_level(logging.INFO, logger="prefopt")
    result = run(
        assets, tmp_path / "out", f"reference.model={assets['other']}", "train.max_steps=4"
    )
    assert result.initial_eval is not None
    assert result.initial_eval["loss"] != pytest.approx(0.6931, abs=1e-3)  # other weights
    assert "differs from the starting policy" in caplog.text


def test_precomputed_reference_matches_copy_and_is_cached(assets: dict[str, Path], tmp_path: Path):
    cache = tmp_path / "cache"
    copy = run(assets, tmp_path / "a", "train.max_steps=4")
    pre = run(
        assets,
        tmp_path / "b",
        "train.max_steps=4",
        "reference.strategy=precompute",
        f"reference.cache_dir={cache}",
    )
    assert len(list(cache.glob("*.safetensors"))) == 2  # train and eval tables
    assert pre.initial_eval is not None and copy.initial_eval is not None
    for key in ("loss", "rewards/margins"):
        assert pre.initial_eval[key] == pytest.approx(copy.initial_eval[key], abs=1e-5)
        assert pre.final_eval[key] == pytest.approx(copy.final_eval[key], abs=1e-4)
    mtimes = {p: p.stat().st_mtime_ns for p in cache.glob("*.safetensors")}
    run(
        assets,
        tmp_path / "c",
        "train.max_steps=1",
        "reference.strategy=precompute",
        f"reference.cache_dir={cache}",
    )
    assert {p: p.stat().st_mtime_ns for p in cache.glob("*.safetensors")} == mtimes  # reused


def test_auto_reference_precomputes_from_two_passes(
    assets: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """reference.strategy=auto: a live copy for one pass over the pairs, precompute from two."""
    caplog.set_level(logging.INFO, logger="prefopt")
    one_pass = tmp_path / "cache1"
    run(assets, tmp_path / "a", "train.max_steps=6", f"reference.cache_dir={one_pass}")
    assert not one_pass.exists() and "reference: precompute" not in caplog.text  # 24 of 24
    two_passes = tmp_path / "cache2"
    result = run(assets, tmp_path / "b", "train.max_steps=12", f"reference.cache_dir={two_passes}")
    assert "reference: precompute (auto: training scores each of the 24 pairs 2.0 times" in (
        caplog.text
    )
    assert len(list(two_passes.glob("*.safetensors"))) == 2  # train and eval tables
    assert result.initial_eval is not None
    assert result.initial_eval["loss"] == pytest.approx(0.6931, abs=1e-4)
    assert "precompute" in (tmp_path / "b" / "model" / "README.md").read_text()
    kept = tmp_path / "cache3"  # an explicit strategy is never replaced
    run(assets, tmp_path / "c", "train.max_steps=12", "reference.strategy=copy",
        f"reference.cache_dir={kept}")  # fmt: skip
    assert not kept.exists()


def test_reference_free_simpo_trains(assets: dict[str, Path], tmp_path: Path):
    result = run(
        assets, tmp_path / "out", "loss.name=simpo", "loss.beta=2.0", "loss.simpo_gamma=0.5"
    )
    assert result.final_eval is not None and result.initial_eval is not None
    assert result.final_eval["loss"] < result.initial_eval["loss"]
    assert result.final_eval["rewards/accuracies"] > 0.9


def test_combined_sigmoid_sft(assets: dict[str, Path], tmp_path: Path):
    result = run(assets, tmp_path / "out", "loss.name=[sigmoid, sft]", "loss.weights=[1.0, 0.5]")
    assert result.final_eval is not None and result.initial_eval is not None
    # NLL term keeps chosen log-probs rising while DPO separates the pair.
    assert result.final_eval["logps/chosen"] > result.initial_eval["logps/chosen"]
    assert result.final_eval["rewards/accuracies"] > 0.9


def test_kto_on_unpaired_data(assets: dict[str, Path], tmp_path: Path):
    rows = []
    for pair in learnable_pairs(24):
        rows.append({"prompt": pair["prompt"], "completion": pair["chosen"], "label": True})
        rows.append({"prompt": pair["prompt"], "completion": pair["rejected"], "label": False})
    data = write_jsonl(tmp_path / "kto.jsonl", rows)
    result = run(
        assets,
        tmp_path / "out",
        "loss.name=kto",
        f"data.train={data}",
        f"data.eval={data}",
        "train.max_steps=12",
    )
    assert result.final_eval is not None and result.initial_eval is not None
    assert result.final_eval["loss"] < result.initial_eval["loss"]
    assert result.final_eval["rewards/chosen"] > result.final_eval["rewards/rejected"]


def test_kto_on_paired_data_is_refused(assets: dict[str, Path], tmp_path: Path):
    with pytest.raises(ConfigError, match="kto.*unpaired"):
        run(assets, tmp_path / "out", "loss.name=kto")


def test_grad_accumulation_equals_big_batch(assets: dict[str, Path], tmp_path: Path):
    run(assets, tmp_path / "a", "train.batch_size=4", "train.grad_accum=1", "train.max_steps=3")
    run(assets, tmp_path / "b", "train.batch_size=2", "train.grad_accum=2", "train.max_steps=3")
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    # Adam turns float32 summation-order noise on near-zero gradients into lr-sized steps, so
    # weights after 3 steps agree to ~1e-5 while each update is ~1e-2.
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=5e-5, rtol=0)


def _gradients(
    assets: dict[str, Path], out: Path, batch: int, accum: int
) -> dict[str, torch.Tensor]:
    from prefopt.run_setup import build_run
    from prefopt.trainer import _train_step

    cfg = load_config(
        None,
        [
            f"model.name_or_path={assets['model']}",
            f"data.train={assets['train']}",
            f"output.dir={out}",
            f"train.batch_size={batch}",
            f"train.grad_accum={accum}",
            "optim.max_grad_norm=null",
        ],
    )
    parts = build_run(cfg)
    _train_step(parts, [0, 5, 9, 13], parts.scorer)
    return {n: p.grad.clone() for n, p in parts.model.named_parameters() if p.grad is not None}


def test_grad_accumulation_gradient_equals_big_batch_gradient(assets: dict[str, Path], tmp_path):
    big = _gradients(assets, tmp_path / "a", 4, 1)
    small = _gradients(assets, tmp_path / "b", 2, 2)
    assert big.keys() == small.keys() and big
    for name in big:
        torch.testing.assert_close(big[name], small[name], atol=1e-7, rtol=1e-5)


def test_resume_equals_uninterrupted(assets: dict[str, Path], tmp_path: Path):
    common = (
        "lora.enabled=true",
        "lora.dropout=0.1",
        "train.max_steps=6",
        "optim.scheduler=cosine",
        "optim.warmup_steps=2",
    )
    run(assets, tmp_path / "full", *common)
    with pytest.raises(Interrupted):
        run(assets, tmp_path / "split", *common, "train.stop_after_steps=4")
    resumed = run(assets, tmp_path / "split", *common, "resume=latest")
    assert resumed.state.step == 6
    a, b = final_weights(tmp_path / "full"), final_weights(tmp_path / "split")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_output_dir_not_clobbered(assets: dict[str, Path], tmp_path: Path):
    from prefopt.errors import PrefoptError

    run(assets, tmp_path / "out", "train.max_steps=1")
    with pytest.raises(PrefoptError, match="not empty"):
        run(assets, tmp_path / "out", "train.max_steps=1")


def _eval_steps(out: Path) -> list[int]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if r.get("split") == "eval"]


def test_early_stopping_stops_and_logs_each_eval_once(assets: dict[str, Path], tmp_path: Path):
    """tokens/chosen never changes, so with patience 1 the second evaluation stops the run; the
    final eval is that evaluation, not a second record of the same step."""
    out = tmp_path / "out"
    result = run(
        assets, out, "eval.every_steps=2", "eval.early_stopping_metric=tokens/chosen",
        "eval.patience=1",
    )  # fmt: skip
    assert result.stopped_early
    assert result.state.step == 4  # of 18
    assert _eval_steps(out) == [0, 2, 4]
    assert result.final_eval is not None
    assert json.loads((out / "final_metrics.json").read_text()) == result.final_eval
    assert (out / "model" / "config.json").is_file()


def test_eval_every_steps_evaluates_at_multiples_and_at_the_end(
    assets: dict[str, Path], tmp_path: Path
):
    result = run(assets, tmp_path / "out", "eval.every_steps=3", "train.max_steps=7")
    assert not result.stopped_early
    assert _eval_steps(tmp_path / "out") == [0, 3, 6, 7]


def _poison_cache(cache: Path, shift: float) -> None:
    from safetensors.torch import save_file

    files = list(cache.glob("*.safetensors"))
    assert len(files) == 2  # train and eval tables
    for path in files:
        save_file({"logps": load_file(str(path))["logps"] + shift}, str(path))


def test_reference_check_fails_on_a_wrong_precomputed_reference(
    assets: dict[str, Path], tmp_path: Path
):
    """A cached table 0.5 nats off the starting policy is caught at step 0, before training."""
    from prefopt.errors import PrefoptError

    cache = tmp_path / "cache"
    common = ("train.max_steps=1", "reference.strategy=precompute", f"reference.cache_dir={cache}")
    run(assets, tmp_path / "a", *common)
    _poison_cache(cache, 0.5)
    with pytest.raises(PrefoptError, match=r"reference \(precompute\) differs from the starting "
                       r"policy by 0\.5 nats"):  # fmt: skip
        run(assets, tmp_path / "b", *common)
    assert not (tmp_path / "b" / "metrics.jsonl").exists()  # stopped before any step


@pytest.mark.parametrize(("loss", "ln2"), [("sigmoid", True), ("ipo", False)])
def test_step0_check_names_ln2_only_for_the_sigmoid_loss(
    assets: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture, loss: str, ln2: bool
):
    caplog.set_level(logging.INFO, logger="prefopt")
    run(assets, tmp_path / "out", f"loss.name={loss}", "train.max_steps=1")
    assert "reference (copy) equals the starting policy" in caplog.text
    assert ("ln 2" in caplog.text) is ln2


def _spy_reference(monkeypatch: pytest.MonkeyPatch) -> dict:
    import prefopt.run_setup as rs

    built: dict = {}
    real = rs.build_reference

    def spy(*args, **kwargs):
        built["ref"] = ref = real(*args, **kwargs)
        scorer = ref.peft_model if ref.peft_model is not None else ref.scorer
        built["start"] = {k: v.clone() for k, v in scorer.state_dict().items()}
        return ref

    monkeypatch.setattr(rs, "build_reference", spy)
    return built


def test_adapter_reference_weights_stay_put(
    assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """LoRA's reference is the base with adapters off: training moves the adapters only."""
    built = _spy_reference(monkeypatch)
    run(assets, tmp_path / "out", "lora.enabled=true", "train.max_steps=3")
    assert built["ref"].strategy == "adapter"
    after = built["ref"].peft_model.state_dict()
    base = {k: v for k, v in built["start"].items() if "lora_" not in k}
    lora = {k: v for k, v in built["start"].items() if "lora_B" in k}
    assert base and lora
    assert all(torch.equal(after[k], v) for k, v in base.items())
    assert any(not torch.equal(after[k], v) for k, v in lora.items())  # the policy did train


def test_model_reference_weights_stay_put(
    assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    built = _spy_reference(monkeypatch)
    run(assets, tmp_path / "out", "reference.strategy=model", f"reference.model={assets['other']}",
        "train.max_steps=3")  # fmt: skip
    assert built["ref"].strategy == "model"
    after = built["ref"].scorer.state_dict()
    assert all(torch.equal(after[k], v) for k, v in built["start"].items())


def test_precompute_cache_key_follows_model_and_data(assets: dict[str, Path], tmp_path: Path):
    """Another model or other data computes new tables instead of reusing the cached ones."""
    cache = tmp_path / "cache"
    common = ("train.max_steps=1", "reference.strategy=precompute", f"reference.cache_dir={cache}")
    run(assets, tmp_path / "a", *common)
    first = {p: p.stat().st_mtime_ns for p in cache.glob("*.safetensors")}
    assert len(first) == 2
    run(assets, tmp_path / "b", *common, f"model.name_or_path={assets['other']}")
    second = {p: p.stat().st_mtime_ns for p in cache.glob("*.safetensors")}
    assert len(second) == 4 and {p: second[p] for p in first} == first
    other_data = write_jsonl(tmp_path / "train2.jsonl", learnable_pairs(24, seed=7))
    run(assets, tmp_path / "c", *common, f"data.train={other_data}")
    third = set(cache.glob("*.safetensors"))
    assert len(third) == 5  # a new train table; the eval data did not change
    assert {p.name.split("-")[0] for p in third - set(second)} == {
        p.name.split("-")[0] for p in first
    }  # same model fingerprint, new rows fingerprint


def _card_snippet(model_dir: Path) -> str:
    card = (model_dir / "README.md").read_text()
    return card.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.parametrize("lora", [False, True])
def test_saved_model_loads_as_the_card_says(
    assets: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture, lora: bool
):
    """The model card's snippet loads the model (and tokenizer) it sits next to; the run
    itself reloaded the folder with transformers and said so."""
    from transformers import AutoTokenizer

    caplog.set_level(logging.INFO, logger="prefopt")
    out = tmp_path / "out"
    run(assets, out, f"lora.enabled={str(lora).lower()}", "train.max_steps=2")
    model_dir = out / "model"
    what = "transformers and peft" if lora else "transformers"
    assert f"reloaded {model_dir} with {what}: OK" in caplog.text
    scope: dict = {}
    exec(_card_snippet(model_dir), scope)  # noqa: S102  (our own card's snippet)
    from peft import PeftModel

    assert isinstance(scope["model"], PeftModel) is lora
    text = "tell me about the cat"
    start = AutoTokenizer.from_pretrained(assets["model"])
    assert scope["tokenizer"](text).input_ids == start(text).input_ids
    if lora:
        base = json.loads((model_dir / "adapter_config.json").read_text())
        assert base["base_model_name_or_path"] in _card_snippet(model_dir)


def test_a_saved_model_that_does_not_load_back_fails_the_run(
    assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import prefopt.trainer as trainer
    from prefopt.errors import PrefoptError

    real = trainer.save_final

    def lose_weights(*args, **kwargs):
        target = real(*args, **kwargs)
        (target / "model.safetensors").unlink()
        return target

    monkeypatch.setattr(trainer, "save_final", lose_weights)
    with pytest.raises(PrefoptError, match=r"model does not load back with transformers"):
        run(assets, tmp_path / "out", "train.max_steps=1")


def test_logged_lr_follows_the_schedule(assets: dict[str, Path], tmp_path: Path):
    """Step k trains with the schedule's factor at k - 1 (warm-up 2, cosine over 6 steps)."""
    from prefopt.run_setup import lr_lambda

    out = tmp_path / "out"
    run(assets, out, "train.max_steps=6", "optim.scheduler=cosine", "optim.warmup_steps=2")
    factor = lr_lambda(load_config(None, ["optim.scheduler=cosine", "optim.warmup_steps=2"]), 6)
    logged = [r["lr"] for r in train_lines(out)]
    assert logged == pytest.approx([1e-2 * factor(k) for k in range(6)], rel=1e-12)
    assert logged[0] == pytest.approx(1e-2 / 3) and logged[2] == pytest.approx(1e-2)


def test_clipping_scales_the_gradient_to_max_grad_norm(assets: dict[str, Path], tmp_path: Path):
    """optim.max_grad_norm: the optimizer sees the same gradient scaled to that norm, and the
    logged grad_norm is the norm before clipping."""
    raw, raw_norm = _gradients_and_norm(assets, tmp_path / "a", None)
    clipped, logged = _gradients_and_norm(assets, tmp_path / "b", 1e-3)
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in raw.values()]))
    assert logged == pytest.approx(float(norm), rel=1e-5) == raw_norm
    assert norm > 1e-2  # so clipping to 1e-3 has work to do
    clipped_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in clipped.values()]))
    assert float(clipped_norm) == pytest.approx(1e-3, rel=1e-4)
    for name, grad in raw.items():
        torch.testing.assert_close(clipped[name], grad * (1e-3 / norm), rtol=1e-4, atol=1e-10)


def _gradients_and_norm(
    assets: dict[str, Path], out: Path, max_grad_norm: float | None
) -> tuple[dict[str, torch.Tensor], float]:
    from prefopt.run_setup import build_run
    from prefopt.trainer import _train_step

    cfg = load_config(None, [
        f"model.name_or_path={assets['model']}", f"data.train={assets['train']}",
        f"output.dir={out}", "train.batch_size=4",
        f"optim.max_grad_norm={'null' if max_grad_norm is None else max_grad_norm}",
    ])  # fmt: skip
    parts = build_run(cfg)
    values, _ = _train_step(parts, [0, 5, 9, 13], parts.scorer)
    grads = {n: p.grad.clone() for n, p in parts.model.named_parameters() if p.grad is not None}
    return grads, values["grad_norm"]


def test_flex_attention_on_cpu_is_refused_before_loading_or_trains_as_sdpa(
    assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """torch 2.13's FlexAttention has no CPU backward: a run that asks for it on the CPU stops
    at setup with the reason, not at its first training step after the model loaded. Where a
    torch does train it on the CPU, the run must equal sdpa's."""
    import prefopt.run_setup as run_setup
    from prefopt.models import flex_attention_trains_on_cpu

    flex = ("train.device=cpu", "model.attn_implementation=flex_attention", "train.max_steps=2")
    if flex_attention_trains_on_cpu():
        run(assets, tmp_path / "flex", *flex)
        run(assets, tmp_path / "sdpa", *flex[:1], "model.attn_implementation=sdpa", *flex[2:])
        a, b = train_lines(tmp_path / "flex"), train_lines(tmp_path / "sdpa")
        assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], abs=1e-5)
        return

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before flex_attention was refused")

    monkeypatch.setattr(run_setup, "load_causal_lm", forbidden)
    with pytest.raises(ConfigError, match=r"flex_attention cannot train on the CPU: torch 2\."):
        run(assets, tmp_path / "out", *flex)


def test_flash_attention_on_cpu_is_refused_before_loading(
    assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Flash attention kernels are CUDA-only: on the CPU the run stops at setup, naming the
    setting, instead of a transformers ImportError traceback after the config was accepted."""
    import prefopt.run_setup as run_setup

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before flash attention was refused")

    monkeypatch.setattr(run_setup, "load_causal_lm", forbidden)
    with pytest.raises(ConfigError, match=r"attn_implementation=flash_attention_2 runs on CUDA"):
        run(assets, tmp_path / "out", "train.device=cpu",
            "model.attn_implementation=flash_attention_2")  # fmt: skip
