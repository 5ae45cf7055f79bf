"""Checkpoints: exact restore (weights, AdamW, scheduler, every RNG), atomicity, pruning, resume."""

from __future__ import annotations

import copy
import json
import random
import shutil
from collections import namedtuple
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

import prefopt.checkpoint as ckpt
from prefopt.checkpoint import (
    TrainerState,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
    trainable_state,
)
from prefopt.config import ExperimentConfig, LoraConfig
from prefopt.errors import PrefoptError
from prefopt.models import apply_lora
from prefopt.run_setup import lr_lambda
from toy_models import make_config, make_model

IDS = torch.tensor([[2, 40, 41, 42, 43, 5], [2, 50, 51, 52, 53, 5]])  # [2, T]
CONFIG_YAML = "loss:\n  beta: 0.1\n"
TIED = "transformer.wte.weight"  # GPT-2's embedding, shared with its LM head
FILES = ["trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json"]


def _dropout_model(seed: int) -> nn.Module:
    """A tiny GPT-2 with dropout on, so continuing training depends on the restored RNG."""
    config = make_config("gpt2")
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.1
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.train()
    return model


def _parts(model: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    cfg = ExperimentConfig()
    cfg.optim.warmup_steps = 2
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total=10))
    return optimizer, scheduler


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
    model(input_ids=IDS, labels=IDS).loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _draws() -> tuple[torch.Tensor, float, np.ndarray]:
    return torch.rand(4), random.random(), np.random.rand(3)


def _save(root: Path, model: nn.Module, step: int, keep: int = 10, **kw: Any) -> Path:
    optimizer, scheduler = _parts(model)
    return save_checkpoint(
        root, model, optimizer, scheduler, TrainerState(step=step, **kw), CONFIG_YAML, keep=keep
    )


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# --- exact restore --------------------------------------------------------------------------


def test_save_then_load_restores_everything(tmp_path: Path) -> None:
    _seed_all(0)
    model = _dropout_model(seed=0)
    optimizer, scheduler = _parts(model)
    for _ in range(2):
        _train_step(model, optimizer, scheduler)
    state = TrainerState(step=2, epoch=1, batch_in_epoch=3, best_metric=0.75, bad_evals=1,
                         skipped_steps=1, tokens_seen=24, extra={"note": "x"})  # fmt: skip
    folder = save_checkpoint(tmp_path, model, optimizer, scheduler, state, CONFIG_YAML, keep=2)
    assert folder == tmp_path / "step-000002"
    assert sorted(p.name for p in folder.iterdir()) == sorted([*FILES, "config.yaml"])
    saved_weights = _weights(model)
    saved_optim = copy.deepcopy(optimizer.state_dict())  # live tensors change on the next step
    saved_sched = scheduler.state_dict()
    after_save = _draws()
    _train_step(model, optimizer, scheduler)  # the uninterrupted run continues…
    continued = _weights(model)

    # …a fresh process (different init, fresh optimizer, scrambled RNG) resumes.
    _seed_all(123)
    resumed = _dropout_model(seed=1)
    optimizer2, scheduler2 = _parts(resumed)
    assert not torch.equal(_weights(resumed)[TIED], saved_weights[TIED])
    loaded_state = load_checkpoint(folder, resumed, optimizer2, scheduler2)
    assert loaded_state == state

    restored = _draws()
    assert torch.equal(restored[0], after_save[0])
    assert restored[1] == after_save[1]
    np.testing.assert_array_equal(restored[2], after_save[2])

    for name, tensor in _weights(resumed).items():
        assert torch.equal(tensor, saved_weights[name]), name
    _assert_optimizer_equal(optimizer2.state_dict(), saved_optim)
    assert scheduler2.state_dict()["last_epoch"] == saved_sched["last_epoch"] == 2
    assert scheduler2.get_last_lr() == [saved_sched["_last_lr"][0]]

    # Both runs have now drawn the same numbers since the save; one more step (dropout draws
    # from the restored torch RNG) must give bit-identical weights.
    _train_step(resumed, optimizer2, scheduler2)
    for name, tensor in _weights(resumed).items():
        assert torch.equal(tensor, continued[name]), f"resumed step differs at {name}"


def _assert_optimizer_equal(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got["param_groups"] == want["param_groups"]
    assert got["state"].keys() == want["state"].keys() and got["state"]
    for index, slots in want["state"].items():
        assert set(slots) == {"step", "exp_avg", "exp_avg_sq"}
        for key, value in slots.items():
            assert torch.equal(got["state"][index][key], value), (index, key)


def test_every_file_loads_with_weights_only(tmp_path: Path) -> None:
    model = make_model("llama")
    optimizer, scheduler = _parts(model)
    _train_step(model, optimizer, scheduler)
    folder = save_checkpoint(
        tmp_path, model, optimizer, scheduler, TrainerState(step=1), "", keep=1
    )
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):
        torch.load(folder / name, weights_only=True)  # raises on any pickled object
    rng = torch.load(folder / "rng.pt", weights_only=True)
    assert {"torch", "python", "numpy"} <= set(rng)
    assert json.loads((folder / "trainer_state.json").read_text())["step"] == 1


def test_lora_checkpoint_holds_only_adapters(tmp_path: Path) -> None:
    model = apply_lora(make_model("llama"), LoraConfig(enabled=True, r=2))
    optimizer, scheduler = _parts(model)
    _train_step(model, optimizer, scheduler)
    folder = save_checkpoint(
        tmp_path, model, optimizer, scheduler, TrainerState(step=1), "", keep=1
    )
    stored = load_file(str(folder / "trainable.safetensors"))
    assert stored.keys() == trainable_state(model).keys()
    assert stored and all("lora_" in n for n in stored)
    fresh = apply_lora(make_model("llama"), LoraConfig(enabled=True, r=2))
    load_checkpoint(folder, fresh, *_parts(fresh))
    for name, tensor in stored.items():
        assert torch.equal(dict(fresh.named_parameters())[name], tensor)


# --- refusing mismatches --------------------------------------------------------------------


def test_checkpoint_of_another_model_is_refused(tmp_path: Path) -> None:
    folder = _save(tmp_path, make_model("llama"), step=1)
    for other in (make_model("gpt2"), apply_lora(make_model("llama"), LoraConfig(enabled=True))):
        with pytest.raises(PrefoptError, match="does not match the model"):
            load_checkpoint(folder, other, *_parts(other))


def test_checkpoint_with_other_shapes_is_refused(tmp_path: Path) -> None:
    folder = _save(tmp_path, make_model("llama"), step=1)
    config = make_config("llama")
    config.intermediate_size = 48  # same parameter names, different shapes
    wider = AutoModelForCausalLM.from_config(config)
    with pytest.raises(PrefoptError, match="different shape"):
        load_checkpoint(folder, wider, *_parts(wider))


# --- finding, ignoring and pruning ----------------------------------------------------------


def test_unfinished_folders_are_ignored(tmp_path: Path) -> None:
    model = make_model("llama")
    good = _save(tmp_path, model, step=8)
    # A killed save leaves a temp folder (complete or not) …
    shutil.copytree(good, tmp_path / ".tmp-step-000012-4242")
    # … an incomplete step folder lacks a file …
    shutil.copytree(good, tmp_path / "step-000009")
    (tmp_path / "step-000009" / "optimizer.pt").unlink()
    # … and a user's copy has a name that is not a step number.
    shutil.copytree(good, tmp_path / "step-000010-backup")
    (tmp_path / "step-000011").write_text("a file, not a folder")
    assert list_checkpoints(tmp_path) == [good]
    assert resolve_resume(tmp_path, "latest") == good
    with pytest.raises(PrefoptError, match="not a complete prefopt checkpoint"):
        resolve_resume(tmp_path, str(tmp_path / "step-000009"))


def test_checkpoints_sort_by_step_number(tmp_path: Path) -> None:
    model = make_model("llama")
    for step in (999_999, 5, 1_000_000):  # 1000000 outgrows the 6-digit padding
        _save(tmp_path, model, step=step)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step-000005", "step-999999", "step-1000000"]
    assert resolve_resume(tmp_path, "latest").name == "step-1000000"


def test_pruning_keeps_the_newest(tmp_path: Path) -> None:
    model = make_model("llama")
    for step in range(1, 6):
        _save(tmp_path, model, step=step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000004", "step-000005"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000004", "step-000005"]


def test_saving_a_step_again_replaces_it(tmp_path: Path) -> None:
    model = make_model("llama")
    _save(tmp_path, model, step=3, tokens_seen=1)
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(1.0)  # type: ignore[operator]
    folder = _save(tmp_path, model, step=3, tokens_seen=2)
    assert json.loads((folder / "trainer_state.json").read_text())["tokens_seen"] == 2
    stored = load_file(str(folder / "trainable.safetensors"))
    name = "model.embed_tokens.weight"
    assert torch.equal(stored[name], model.model.embed_tokens.weight.detach())  # type: ignore[operator]
    assert [p.name for p in tmp_path.iterdir()] == ["step-000003"]


def _crash_on_rename(monkeypatch: pytest.MonkeyPatch, prefix: str) -> None:
    """Die (KeyboardInterrupt: nothing cleans up after it) when a folder named `prefix*` is
    about to be renamed."""
    real = Path.rename

    def rename(self: Path, target: Any) -> Any:
        if self.name.startswith(prefix):
            raise KeyboardInterrupt
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)


def _tokens_seen(folder: Path) -> int:
    return int(json.loads((folder / "trainer_state.json").read_text())["tokens_seen"])


def test_crash_while_replacing_a_step_leaves_a_usable_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Saving step 3 again: the old folder is renamed aside, the new one renamed in, then the
    old deleted. Killed between the renames, `step-000003` is briefly absent; the next
    `list_checkpoints` puts the old (complete) one back, so resume=latest still finds it."""
    model = make_model("llama")
    _save(tmp_path, model, step=3, tokens_seen=1)  # keep=1 below: the only checkpoint
    _crash_on_rename(monkeypatch, ".tmp-step-000003")
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, model, step=3, tokens_seen=2, keep=1)
    monkeypatch.undo()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert [n.split("-")[0] for n in names] == [".old", ".tmp"]  # no step-000003 right now
    latest = resolve_resume(tmp_path, "latest")
    assert latest == tmp_path / "step-000003" and _tokens_seen(latest) == 1
    load_checkpoint(latest, model, *_parts(model))
    assert not any(p.name.startswith(".old-") for p in tmp_path.iterdir())
    # The next save of the same step replaces it cleanly.
    _save(tmp_path, model, step=3, tokens_seen=3, keep=1)
    assert _tokens_seen(tmp_path / "step-000003") == 3
    assert sorted(p.name for p in tmp_path.iterdir())[-1] == "step-000003"


def test_crash_after_replacing_a_step_keeps_the_new_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after both renames but before the old folder is deleted: the new step stands and
    the stale `.old-*` is removed, never restored over it."""
    model = make_model("llama")
    _save(tmp_path, model, step=3, tokens_seen=1)
    real_rmtree = shutil.rmtree

    def crash_on_old(path: Any, *args: Any, **kwargs: Any) -> None:
        if Path(path).name.startswith(".old-") and Path(path).exists():
            raise KeyboardInterrupt
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(ckpt.shutil, "rmtree", crash_on_old)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, model, step=3, tokens_seen=2)
    monkeypatch.undo()
    assert any(p.name.startswith(".old-step-000003") for p in tmp_path.iterdir())
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000003"]
    assert _tokens_seen(tmp_path / "step-000003") == 2
    assert [p.name for p in tmp_path.iterdir()] == ["step-000003"]


def test_resolve_resume_errors_clearly(tmp_path: Path) -> None:
    with pytest.raises(PrefoptError, match="resume=latest: no complete checkpoint"):
        resolve_resume(tmp_path / "never_created", "latest")
    with pytest.raises(PrefoptError, match="no complete checkpoint"):
        resolve_resume(tmp_path, "latest")
    with pytest.raises(PrefoptError, match="not a complete prefopt checkpoint"):
        resolve_resume(tmp_path, str(tmp_path / "nowhere"))
    assert list_checkpoints(tmp_path / "never_created") == []


def test_resolve_resume_explicit_path(tmp_path: Path) -> None:
    model = make_model("llama")
    first = _save(tmp_path, model, step=1)
    _save(tmp_path, model, step=2)
    assert resolve_resume(tmp_path, str(first)) == first


# --- failures while saving ------------------------------------------------------------------


def test_not_enough_disk_space_is_refused_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda _path: usage(10**6, 10**6 - 10, 10))
    with pytest.raises(PrefoptError, match="not enough disk space"):
        _save(tmp_path / "ckpts", make_model("llama"), step=1)
    assert list((tmp_path / "ckpts").iterdir()) == []


def test_write_error_leaves_no_partial_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = make_model("llama")
    earlier = _save(tmp_path, model, step=1)
    real_save = torch.save

    def failing_save(obj: Any, path: Any, *args: Any, **kwargs: Any) -> None:
        if Path(path).name == "rng.pt":
            raise OSError(28, "No space left on device")
        real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    with pytest.raises(PrefoptError, match="could not write checkpoint .*step-000002"):
        _save(tmp_path, model, step=2, keep=1)
    assert [p.name for p in tmp_path.iterdir()] == ["step-000001"]  # no temp folder, no pruning
    assert list_checkpoints(tmp_path) == [earlier]


def test_a_runtime_error_that_is_not_a_write_failure_is_not_called_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only torch's write errors mean "disk full"; another RuntimeError (say a CUDA error
    while copying the state) propagates as itself, and no temporary folder is left."""
    model = make_model("llama")

    def broken_save(obj: Any, path: Any, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        _save(tmp_path, model, step=1)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_clears_the_previous_runs_files_only(tmp_path: Path) -> None:
    """overwrite=true: nothing of the old run (stale judge.json, old checkpoints) mixes into the
    new one, and files the user put in the folder stay."""
    from prefopt.config_io import load_config
    from prefopt.output import prepare_output_dir

    out = tmp_path / "run"
    (out / "checkpoints" / "step-000003").mkdir(parents=True)
    (out / "model").mkdir()
    for name in ("metrics.jsonl", "judge.json", "samples.jsonl", "final_metrics.json", "notes.txt"):
        (out / name).write_text("old")
    cfg = load_config(None, [f"output.dir={out}", "output.overwrite=true"])
    prepare_output_dir(cfg)
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "notes.txt"]


# --- DeepSpeed engine state -----------------------------------------------------------------


def test_engine_state_is_moved_in_instead_of_optimizer_pt(tmp_path: Path) -> None:
    """Under DeepSpeed the engine's partition files replace optimizer.pt, atomically."""
    model = _dropout_model(0)
    optimizer, scheduler = _parts(model)
    staging = tmp_path / "ckpts" / ".deepspeed-000003"
    (staging / "zero").mkdir(parents=True)
    (staging / "zero" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x")
    path = save_checkpoint(
        tmp_path / "ckpts", model, optimizer, scheduler, TrainerState(step=3), CONFIG_YAML,
        keep=2, engine_state=staging,
    )  # fmt: skip
    assert not staging.exists() and not (path / "optimizer.pt").exists()
    assert (path / "deepspeed" / "zero" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file()
    assert list_checkpoints(tmp_path / "ckpts") == [path]  # complete without optimizer.pt
    with pytest.raises(PrefoptError, match="written under DeepSpeed"):
        load_checkpoint(path, model, optimizer, scheduler)  # no engine to load it into


def test_an_adapter_folder_without_its_base_named_is_a_clear_error(tmp_path: Path) -> None:
    from prefopt.output import adapter_base

    assert adapter_base(tmp_path) is None  # a full model folder
    (tmp_path / "adapter_config.json").write_text('{"r": 8}')
    with pytest.raises(PrefoptError, match="does not name its base model"):
        adapter_base(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"base_model_name_or_path": "org/base"}')
    assert adapter_base(tmp_path) == "org/base"
