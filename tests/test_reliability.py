"""Crash, numerical, disk and trust guarantees of `prefopt train`, each proved on a tiny model.

Crash tests run the real command in a subprocess (`python -m prefopt.cli train ...`) and signal
or kill it mid-run; the rest run in-process. Everything is CPU, float32, one thread.
"""

from __future__ import annotations

import ast
import errno
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import prefopt
import prefopt.checkpoint as ckpt_mod
from prefopt.checkpoint import TrainerState, list_checkpoints, resolve_resume, save_checkpoint
from prefopt.cli import EXIT_ERROR, EXIT_INTERRUPTED, main
from prefopt.config import ModelConfig
from prefopt.config_io import load_config
from prefopt.errors import PrefoptError
from prefopt.models import load_causal_lm, load_tokenizer
from prefopt.pipeline import prepare_data, write_data_summary
from prefopt.step import StepOutput
from prefopt.tracking import Tracker
from prefopt.trainer import NonFiniteError, TrainResult, train
from toy_models import learnable_pairs, save_toy_model, write_jsonl

SRC = Path(prefopt.__file__).parent
WAIT_S = 120.0
"""Hang guard for subprocess waits (a run on the toy model takes seconds)."""


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("assets")
    return {
        "model": save_toy_model(root / "model"),
        "train": write_jsonl(root / "train.jsonl", learnable_pairs(24, seed=0)),
    }


def base_args(assets: dict[str, Path], out: Path, *overrides: str) -> list[str]:
    return [
        f"model.name_or_path={assets['model']}",
        f"data.train={assets['train']}",
        f"output.dir={out}",
        "optim.lr=1e-2",
        "optim.warmup_ratio=0",
        "train.batch_size=4",
        "train.num_threads=1",
        "output.progress=false",
        *overrides,
    ]


def run_in_process(assets: dict[str, Path], out: Path, *overrides: str) -> TrainResult:
    return train(load_config(None, base_args(assets, out, *overrides)))


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(list_checkpoints(out / "checkpoints")[-1] / "trainable.safetensors"))


def leftovers(out: Path) -> list[str]:
    """Temporary checkpoint folders left in `out/checkpoints`."""
    root = out / "checkpoints"
    return [p.name for p in root.iterdir() if p.name.startswith(".tmp-")] if root.is_dir() else []


# ---------------------------------------------------------------------------------------------
# Crash safety: signals and kill -9 on a real subprocess


def start_cli(args: list[str]) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "prefopt.cli", "train", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def train_steps_logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = path.read_text().splitlines()
    return sum('"split": "train"' in line for line in lines if line.endswith("}"))


def wait_for_steps(proc: subprocess.Popen[str], out: Path, steps: int) -> None:
    """Poll until `steps` training steps are in metrics.jsonl (fails if the run ends first)."""
    deadline = time.monotonic() + WAIT_S
    while train_steps_logged(out) < steps:
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"run ended (status {proc.returncode}) before step {steps}:\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no step {steps} within {WAIT_S} s")
        time.sleep(0.005)


def wait_for_checkpoint(proc: subprocess.Popen[str], root: Path) -> None:
    """Poll until one complete checkpoint is in `root`."""
    deadline = time.monotonic() + WAIT_S
    while not (root.is_dir() and list_checkpoints(root)):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no complete checkpoint in {root}")
        time.sleep(0.005)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_finishes_step_saves_checkpoint_and_exits_130(
    assets: dict[str, Path], tmp_path: Path, sig: signal.Signals
):
    out = tmp_path / "out"
    proc = start_cli(base_args(assets, out, "train.max_steps=100000"))
    wait_for_steps(proc, out, 1)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert "Traceback" not in err
    assert "checkpoint saved. Continue with the same command plus resume=latest" in err
    latest = resolve_resume(out / "checkpoints", "latest")
    state = json.loads((latest / "trainer_state.json").read_text())
    assert f"interrupted at step {state['step']};" in err
    assert state["step"] >= 1
    assert not leftovers(out)


def test_kill_9_then_resume_equals_uninterrupted_run(assets: dict[str, Path], tmp_path: Path):
    """SIGKILL at a random step of a run checkpointing every step; resume=latest in-process
    must end on exactly the weights of a run that was never interrupted."""
    steps = 10
    common = (f"train.max_steps={steps}", "output.save_every=1", "optim.scheduler=cosine")
    rng = random.Random()
    kill_after, delay = rng.randint(2, steps - 4), rng.uniform(0, 0.05)
    killed = tmp_path / "killed"
    proc = start_cli(base_args(assets, killed, *common))
    wait_for_steps(proc, killed, kill_after)
    # Step 1's checkpoint must be complete first: a kill before any checkpoint exists leaves
    # nothing to resume (resume=latest then says so), which is not what this test is about.
    wait_for_checkpoint(proc, killed / "checkpoints")
    time.sleep(delay)  # land anywhere: mid-step or mid-checkpoint
    proc.kill()
    proc.wait(timeout=WAIT_S)
    where = f"killed after step {kill_after} + {delay:.3f} s"
    assert proc.returncode == -signal.SIGKILL, where
    resumed = run_in_process(assets, killed, *common, "resume=latest")
    full = run_in_process(assets, tmp_path / "full", *common)
    assert resumed.state.step == full.state.step == steps, where
    a, b = final_weights(tmp_path / "full"), final_weights(killed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} ({where})"


def _tiny_checkpoint_parts() -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return model, optimizer, scheduler


def test_torn_checkpoint_folders_are_never_picked(tmp_path: Path, monkeypatch):
    root = tmp_path / "checkpoints"
    model, optimizer, scheduler = _tiny_checkpoint_parts()
    for step in (1, 2):
        save_checkpoint(root, model, optimizer, scheduler, TrainerState(step=step), "", keep=5)
    # A crash inside the write of step 3 (KeyboardInterrupt is not cleaned up like OSError):
    real_save = torch.save

    def crash_on_rng(obj: Any, path: Any, *args: Any, **kwargs: Any) -> None:
        if Path(path).name == "rng.pt":
            raise KeyboardInterrupt
        real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod.torch, "save", crash_on_rng)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(root, model, optimizer, scheduler, TrainerState(step=3), "", keep=5)
    monkeypatch.undo()
    torn = [p for p in root.iterdir() if p.name.startswith(".tmp-step-000003")]
    assert torn and (torn[0] / "trainable.safetensors").exists()
    # A complete-looking temporary folder, an incomplete step folder and a renamed copy:
    shutil.copytree(root / "step-000002", root / ".tmp-step-000009-4242")
    (root / "step-000007").mkdir()
    shutil.copy(root / "step-000002" / "trainable.safetensors", root / "step-000007")
    shutil.copytree(root / "step-000002", root / "step-000008-backup")
    assert [p.name for p in list_checkpoints(root)] == ["step-000001", "step-000002"]
    assert resolve_resume(root, "latest") == root / "step-000002"
    with pytest.raises(PrefoptError, match="not a complete prefopt checkpoint"):
        resolve_resume(root, str(root / "step-000007"))
    state = ckpt_mod.load_checkpoint(resolve_resume(root, "latest"), model, optimizer, scheduler)
    assert state.step == 2


def test_resume_survives_a_torn_metrics_line(assets: dict[str, Path], tmp_path: Path):
    """A crash can cut metrics.jsonl mid-line; resuming must neither crash on it nor glue the
    next record onto it."""
    out = tmp_path / "out"
    common = ("train.max_steps=4", "output.save_every=1")
    with pytest.raises(PrefoptError, match="interrupted at step 2"):
        run_in_process(assets, out, *common, "train.stop_after_steps=2")
    with (out / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 3, "split": "train", "lo')  # the killed run's last, torn write
    result = run_in_process(assets, out, *common, "resume=latest")
    assert result.state.step == 4
    lines = (out / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(x)["step"] for x in lines if x.endswith("}") and '"train"' in x]
    assert steps == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------
# Numerical safety


def poison_step(monkeypatch: pytest.MonkeyPatch, at_call: int) -> list[list[int]]:
    """Make the loss of the `at_call`-th paired step NaN; returns the positions of every call."""
    import prefopt.evaluation as evaluation

    real = evaluation.paired_step
    calls: list[list[int]] = []

    def poisoned(policy: Any, reference: Any, batch: Any, positions: Any, *a: Any, **k: Any):
        out = real(policy, reference, batch, positions, *a, **k)
        calls.append(list(positions))
        if len(calls) != at_call:
            return out
        nan = torch.tensor(float("nan"))
        return StepOutput(out.losses * nan, {**out.metrics, "loss": out.metrics["loss"] * nan})

    monkeypatch.setattr(evaluation, "paired_step", poisoned)
    return calls


def with_dropped_row_zero(assets: dict[str, Path], tmp_path: Path) -> Path:
    """The training rows behind a bad row 0 (skipped), so source index = position + 1."""
    good = learnable_pairs(24, seed=0)
    rows = [{**good[0], "prompt": [{"role": "wizard", "content": "hi"}]}, *good]
    return write_jsonl(tmp_path / "shifted.jsonl", rows)


def test_nan_loss_stops_naming_source_rows_and_keeps_last_checkpoint(
    assets: dict[str, Path], tmp_path: Path, capsys, monkeypatch
):
    calls = poison_step(monkeypatch, at_call=3)
    data = with_dropped_row_zero(assets, tmp_path)
    out = tmp_path / "out"
    args = base_args(assets, out, f"data.train={data}", "data.on_error=skip",
                     "train.max_steps=6", "output.save_every=1")  # fmt: skip
    status = main(["train", *args])
    err = capsys.readouterr().err
    assert status == EXIT_ERROR, err
    rows = sorted(p + 1 for p in calls[2])
    assert f"step 3: non-finite loss=nan or grad_norm=nan on source rows {rows}" in err
    assert "the last checkpoint is kept" in err and "train.on_nan=skip" in err
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-000001", "step-000002"]
    assert not leftovers(out)
    weights = final_weights(out)
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_nan_loss_with_on_nan_skip_skips_counts_and_finishes(
    assets: dict[str, Path], tmp_path: Path, monkeypatch
):
    poison_step(monkeypatch, at_call=3)
    out = tmp_path / "out"
    result = run_in_process(assets, out, "train.max_steps=6", "train.on_nan=skip")
    assert result.state.step == 6
    assert result.state.skipped_steps == 1
    saved = json.loads(
        (list_checkpoints(out / "checkpoints")[-1] / "trainer_state.json").read_text()
    )
    assert saved["skipped_steps"] == 1
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in logged if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]  # step 3 logged, marked, not applied
    assert [r["step"] for r in train if r.get("non_finite_step")] == [3]
    assert all(torch.isfinite(t).all() for t in final_weights(out).values())
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_overflowing_weights_are_caught_without_monkeypatching(
    assets: dict[str, Path], tmp_path: Path
):
    """A real blow-up: lr=1e30 makes the first update overflow float32, so step 2 is inf/NaN."""
    with pytest.raises(NonFiniteError, match=r"step \d+: non-finite .* on source rows \["):
        run_in_process(assets, tmp_path / "out", "optim.lr=1e30", "train.max_steps=5",
                       "optim.max_grad_norm=null")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Disk


def test_free_space_check_fails_clearly_before_writing(
    assets: dict[str, Path], tmp_path: Path, capsys, monkeypatch
):
    def nearly_full(path: Any) -> Any:
        return shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000)  # type: ignore[attr-defined]

    monkeypatch.setattr(ckpt_mod.shutil, "disk_usage", nearly_full)
    out = tmp_path / "out"
    status = main(["train", *base_args(assets, out, "train.max_steps=2", "output.save_every=1")])
    err = capsys.readouterr().err
    assert status == EXIT_ERROR and "Traceback" not in err
    assert "prefopt: error: not enough disk space for a checkpoint" in err
    assert "0.00 GB free" in err
    root = out / "checkpoints"
    assert not root.exists() or not any(root.iterdir())


def _failing_writer(real: Callable[..., Any], bad_step: str) -> Callable[..., Any]:
    def write(obj: Any, path: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(path).parent.name.startswith(f".tmp-{bad_step}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, path, *args, **kwargs)

    return write


@pytest.mark.parametrize("writer", ["save_file", "torch.save"])
def test_write_failure_leaves_no_corrupt_checkpoint(
    assets: dict[str, Path], tmp_path: Path, capsys, monkeypatch, writer: str
):
    """The disk fills while writing step 2: step 1 stays the latest, nothing half-written."""
    if writer == "save_file":
        monkeypatch.setattr(
            ckpt_mod, "save_file", _failing_writer(ckpt_mod.save_file, "step-000002")
        )
    else:
        monkeypatch.setattr(ckpt_mod.torch, "save", _failing_writer(torch.save, "step-000002"))
    out = tmp_path / "out"
    status = main(["train", *base_args(assets, out, "train.max_steps=4", "output.save_every=1")])
    err = capsys.readouterr().err
    assert status == EXIT_ERROR and "Traceback" not in err
    assert "prefopt: error: could not write checkpoint" in err and "No space left" in err
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-000001"]
    assert resolve_resume(root, "latest") == root / "step-000001"
    monkeypatch.undo()
    resumed = run_in_process(assets, out, "train.max_steps=4", "output.save_every=1",
                             "resume=latest")  # fmt: skip
    assert resumed.state.step == 4


def _limit_file_size(limit: int) -> Callable[[], None]:
    """A subprocess preexec_fn: files of at most `limit` bytes, and a write past it fails with
    EFBIG instead of killing the process (SIGXFSZ ignored; both survive exec)."""

    def apply() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    return apply


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="POSIX file size limits")
@pytest.mark.parametrize("failing", ["trainable.safetensors", "optimizer.pt"])
def test_real_file_size_limit_is_a_clear_error_and_keeps_the_last_checkpoint(
    assets: dict[str, Path], tmp_path: Path, failing: str
):
    """Not a mock: the kernel refuses the write (RLIMIT_FSIZE). safetensors and torch.save then
    raise their own types (SafetensorError, RuntimeError "unexpected pos"), not OSError."""
    out = tmp_path / "out"
    run_in_process(assets, out, "train.max_steps=1", "output.save_every=1")
    step1 = out / "checkpoints" / "step-000001"
    before = {p.name: p.read_bytes() for p in step1.iterdir()}
    weights, optimizer = len(before["trainable.safetensors"]), len(before["optimizer.pt"])
    assert weights < optimizer  # Adam keeps two moments per weight
    # Below the weights file, or between it and the optimizer file (written second):
    limit = weights // 2 if failing == "trainable.safetensors" else (weights + optimizer) // 2
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = base_args(assets, out, "train.max_steps=2", "output.save_every=1", "resume=latest")
    proc = subprocess.run(
        [sys.executable, "-m", "prefopt.cli", "train", *args], capture_output=True, text=True,
        env=env, timeout=WAIT_S, preexec_fn=_limit_file_size(limit),
    )  # fmt: skip
    err = proc.stderr
    assert proc.returncode == EXIT_ERROR and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("prefopt: error:")]
    assert len(lines) == 1, err
    assert "could not write checkpoint" in lines[0] and "step-000002" in lines[0]
    assert "file size limit" in lines[0], lines[0]
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-000001"]  # no .tmp-* left
    assert {p.name: p.read_bytes() for p in step1.iterdir()} == before
    assert resolve_resume(root, "latest") == step1


def test_final_model_card_write_failure_is_one_clear_line(
    assets: dict[str, Path], tmp_path: Path, capsys, monkeypatch
):
    real = Path.write_text

    def full_disk(self: Path, *args: Any, **kwargs: Any) -> int:
        if self.name == "README.md" and self.parent.name == "model":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    status = main(["train", *base_args(assets, tmp_path / "out", "train.max_steps=1")])
    err = capsys.readouterr().err
    assert status == EXIT_ERROR and "Traceback" not in err, err
    assert "prefopt: error: could not write the model card or final metrics" in err
    assert resolve_resume(tmp_path / "out" / "checkpoints", "latest").name == "step-000001"


def test_metrics_append_failure_is_a_clear_error(tmp_path: Path):
    tracker = Tracker(tmp_path, ["jsonl"], {})
    tracker.log({"step": 1, "split": "train", "loss": 0.5})
    (tmp_path / "metrics.jsonl").unlink()
    (tmp_path / "metrics.jsonl").mkdir()  # the append now fails with an OSError
    with pytest.raises(PrefoptError, match="could not append to .*metrics.jsonl"):
        tracker.log({"step": 2, "split": "train", "loss": 0.4})


def test_data_summary_without_eval_data_and_its_write_failure(
    assets: dict[str, Path], tmp_path: Path
):
    cfg = load_config(None, base_args(assets, tmp_path / "out", "data.max_pairs=20"))
    data = prepare_data(cfg, load_tokenizer(cfg.model))
    path = write_data_summary(data, tmp_path)
    summary = json.loads(path.read_text())
    assert summary["eval"] is None
    assert summary["train"]["rows_read"] == 24 and summary["train"]["pairs_kept"] == 20
    assert "data.max_pairs=20: used the first 20 of 24 usable rows" in summary["train"]["notes"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    (tmp_path / "blocked").write_text("a file where the folder should be")
    with pytest.raises(PrefoptError, match="could not write .*blocked/data_summary.json"):
        write_data_summary(data, tmp_path / "blocked")


# ---------------------------------------------------------------------------------------------
# Trust: no pickle code execution, no remote code, no network for local folders


def _calls_named(tree: ast.AST, dotted: str) -> list[ast.Call]:
    owner, _, attr = dotted.rpartition(".")
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            value = node.func.value
            if node.func.attr == attr and isinstance(value, ast.Name) and value.id == owner:
                found.append(node)
    return found


def _keyword(call: ast.Call, name: str) -> Any:
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else kw.value
    return None


def test_every_torch_load_in_the_source_uses_weights_only():
    checked = 0
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "torch":
                assert "load" not in {a.name for a in node.names}, f"{path}: bare load()"
            if isinstance(node, ast.ImportFrom) and node.module == "pickle":
                # Catching a refused pickle's error (models.py) needs its class, nothing else.
                assert [a.name for a in node.names] == ["UnpicklingError"], f"{path}: pickle"
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not {"pickle", "dill", "cloudpickle"} & set(modules), f"{path}: pickle"
        for call in _calls_named(tree, "torch.load"):
            assert _keyword(call, "weights_only") is True, f"{path}:{call.lineno}"
            checked += 1
    assert checked >= 3  # the checkpoint's optimizer, scheduler and RNG files


def test_no_source_turns_trust_remote_code_on():
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                assert _keyword(node, "trust_remote_code") is not True, f"{path}:{node.lineno}"
    assert ModelConfig().trust_remote_code is False
    assert load_config(None, []).model.trust_remote_code is False


@pytest.fixture
def load_spy(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Record the keyword arguments of every tokenizer/model from_pretrained call."""
    seen: list[dict[str, Any]] = []
    for cls in (AutoTokenizer, AutoModelForCausalLM):
        real = cls.from_pretrained

        def spy(name: Any, *args: Any, _real: Any = real, **kwargs: Any) -> Any:
            seen.append(kwargs)
            return _real(name, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    return seen


@pytest.mark.parametrize("trust", [False, True])
def test_trust_remote_code_is_passed_through(assets: dict[str, Path], load_spy, trust: bool):
    cfg = ModelConfig(name_or_path=str(assets["model"]), trust_remote_code=trust)
    load_tokenizer(cfg)
    load_causal_lm(cfg)
    assert len(load_spy) == 2
    assert all(kwargs["trust_remote_code"] is trust for kwargs in load_spy)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("network access while loading a local folder")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_local_folder_loads_without_network(
    assets: dict[str, Path], tmp_path: Path, load_spy, no_network
):
    """A whole training run from a local folder, with every socket connection refused."""
    result = run_in_process(assets, tmp_path / "out", "train.max_steps=1")
    assert result.state.step == 1
    assert load_spy and all(kwargs.get("local_files_only") is True for kwargs in load_spy)


def test_checkpoint_files_hold_no_pickled_objects(assets: dict[str, Path], tmp_path: Path):
    """Optimizer/scheduler/RNG files load with weights_only=True (tensors and plain data)."""
    out = tmp_path / "out"
    run_in_process(assets, out, "train.max_steps=1")
    latest = resolve_resume(out / "checkpoints", "latest")
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):
        torch.load(latest / name, weights_only=True)
    assert math.isfinite(json.loads((latest / "trainer_state.json").read_text())["step"])
