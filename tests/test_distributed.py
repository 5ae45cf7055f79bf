"""Multi-process training on CPU (gloo): 2 processes must train like 1 process on the same batch.

The references, run in this process: 1 process × batch 8 and 1 process × batch 4 × accum 2.
Two launches of 2 real processes, each running this file as its worker script
(`python tests/test_distributed.py {ddp,fsdp} SPEC.json`), shared through module fixtures:

* torchrun (DDP, 2 × batch 4): first-step gradients; then `prefopt train` (the CLI's `main`)
  uninterrupted, interrupted by train.stop_after_steps and resumed; then a precompute
  reference that both processes build into one cache. Checked: per-step logged metrics, token
  counts, final weights, gradients, exact resume.
* `accelerate launch --config_file configs/accelerate/fsdp.yaml` (FSDP2 full shard,
  2 × batch 2 × accum 2): gradients, a sharded (and CPU-offloaded) reference,
  checkpoint + resume, final save.

Each launch pays two Python+torch start-ups (seconds each; much more on a loaded machine).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

# The module fixtures `assets` and `one_process` come from dist_helpers: ruff reads their use
# as test parameters as redefinitions.
# ruff: noqa: F811
from dist_helpers import (  # noqa: F401
    CONFIGS,
    ROOT,
    assert_close_weights,
    assert_same_gradients,
    assert_same_metrics,
    assets,
    check,
    common,
    final_weights,
    first_step_gradients,
    free_port,
    launch,
    launch_retrying,
    one_process,
    tokens_seen,
    torchrun,
    train_lines,
)
from prefopt.config_io import load_config
from prefopt.errors import ConfigError


@pytest.fixture(scope="module")
def one_process_gradients(assets: dict[str, Path]) -> dict[str, torch.Tensor]:
    return first_step_gradients([*common(assets, assets["root"] / "g1"), "train.batch_size=8"])


@pytest.fixture(scope="module")
def ddp_worker(assets: dict[str, Path]) -> dict[str, Any]:
    """This file as torchrun's worker (2 × batch 4); its runs land in root/ddp*."""
    root = assets["root"]
    spec = {"common": common(assets, root / "ddp"), "root": str(root)}
    (root / "ddp-spec.json").write_text(json.dumps(spec))
    spec_file = str(root / "ddp-spec.json")
    check(launch_retrying(lambda: torchrun(str(Path(__file__)), "ddp", spec_file, cwd=ROOT),
                          root, "ddp"))  # fmt: skip
    return json.loads((root / "ddp-result.json").read_text())


@pytest.fixture(scope="module")
def ddp_run(assets: dict[str, Path], ddp_worker: dict[str, Any]) -> Path:
    """The uninterrupted `prefopt train` run of the DDP worker."""
    assert ddp_worker["exit_code"] == 0
    return assets["root"] / "ddp"


@pytest.fixture(scope="module")
def fsdp_worker(assets: dict[str, Path]) -> dict[str, Any]:
    """This file under `accelerate launch` with configs/accelerate/fsdp.yaml, 2 processes."""
    root = assets["root"]
    spec = {"common": common(assets, root / "fsdp"), "root": str(root)}
    (root / "fsdp-spec.json").write_text(json.dumps(spec))

    def start() -> subprocess.CompletedProcess[str]:
        return launch(["accelerate.commands.launch", "--config_file", str(CONFIGS / "fsdp.yaml"),
                       "--num_processes", "2", "--main_process_port", str(free_port()),
                       "--mixed_precision", "no", str(Path(__file__)), "fsdp",
                       str(root / "fsdp-spec.json")], ROOT)  # fmt: skip

    check(launch_retrying(start, root, "fsdp"))
    result: dict[str, Any] = json.loads((root / "fsdp-result.json").read_text())
    if "skip" in result:
        pytest.skip(result["skip"])
    return result


# ---------------------------------------------------------------------------------------------
# DDP
# ---------------------------------------------------------------------------------------------


def test_two_processes_log_the_metrics_of_one(one_process: dict[str, Path], ddp_run: Path) -> None:
    """Logged metrics are global means: 2 × batch 4 == 1 × batch 8 == 1 × batch 4 × accum 2."""
    batch8, accum = train_lines(one_process["batch8"]), train_lines(one_process["accum"])
    assert_same_metrics(accum, batch8, rel=1e-5)
    assert_same_metrics(train_lines(ddp_run), batch8, rel=1e-5)
    assert batch8[0]["loss"] == pytest.approx(0.6931, abs=1e-4)
    assert batch8[-1]["loss"] < batch8[0]["loss"]  # the runs do learn


def test_two_processes_count_every_process_tokens(
    one_process: dict[str, Path], ddp_run: Path
) -> None:
    assert tokens_seen(ddp_run) == tokens_seen(one_process["batch8"]) > 0


def test_two_processes_reach_the_weights_of_one(
    one_process: dict[str, Path], ddp_run: Path
) -> None:
    # Adam turns float32 summation-order noise on near-zero gradients into lr-sized steps.
    reference = final_weights(one_process["batch8"])
    assert_close_weights(final_weights(ddp_run), reference, atol=5e-5)
    assert_close_weights(final_weights(one_process["accum"]), reference, atol=5e-5)


def test_two_processes_first_step_gradients_equal_one(
    assets: dict[str, Path], ddp_worker: dict[str, Any], one_process_gradients: dict[str, Any]
) -> None:
    grads = load_file(str(assets["root"] / "ddp-grads.safetensors"))
    assert_same_gradients(grads, one_process_gradients)


def test_two_processes_resume_equals_uninterrupted(
    assets: dict[str, Path], ddp_run: Path, ddp_worker: dict[str, Any]
) -> None:
    assert ddp_worker["exit_codes"] == [130, 0]  # interrupted (checkpoint saved), then done
    split = assets["root"] / "ddp-split"
    assert [p.name for p in (split / "checkpoints").glob("step-*")] != []
    a, b = final_weights(ddp_run), final_weights(split)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert_same_metrics(train_lines(split), train_lines(ddp_run), rel=1e-6)
    assert tokens_seen(split) == tokens_seen(ddp_run)


def test_two_processes_share_one_precompute_cache(ddp_worker: dict[str, Any]) -> None:
    """Both processes compute the table and write the same cache file without clashing."""
    assert ddp_worker["precompute_exit"] == 0
    assert ddp_worker["cache_files"] == 1


# ---------------------------------------------------------------------------------------------
# FSDP2
# ---------------------------------------------------------------------------------------------


def test_fsdp_first_step_gradients_equal_one(
    assets: dict[str, Path], fsdp_worker: dict[str, Any], one_process_gradients: dict[str, Any]
) -> None:
    assert fsdp_worker["policy_sharded"] and fsdp_worker["reference_sharded"]
    grads = load_file(str(assets["root"] / "fsdp-grads.safetensors"))
    assert_same_gradients(grads, one_process_gradients)


def test_fsdp_interrupted_and_resumed_matches_one_process(
    one_process: dict[str, Path], assets: dict[str, Path], fsdp_worker: dict[str, Any]
) -> None:
    """Checkpoints gather the shards and resume puts them back: the run equals 1 process."""
    assert fsdp_worker["exit_codes"] == [130, 0]
    fsdp, batch8 = assets["root"] / "fsdp", one_process["batch8"]
    assert_same_metrics(train_lines(fsdp), train_lines(batch8), rel=1e-5)
    assert_close_weights(final_weights(fsdp), final_weights(batch8), atol=5e-5)
    assert tokens_seen(fsdp) == tokens_seen(batch8)
    saved = load_file(str(fsdp / "model" / "model.safetensors"))  # the final save: whole
    start = load_file(str(assets["model"] / "model.safetensors"))
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in start.items()}


# ---------------------------------------------------------------------------------------------
# Accelerate config files, DeepSpeed settings (no DeepSpeed installed), reference offload
# ---------------------------------------------------------------------------------------------


def launcher_env(name: str) -> dict[str, str]:
    """The environment `accelerate launch --config_file configs/accelerate/NAME.yaml` exports."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(CONFIGS / f"{name}.yaml"), "x.py"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:  # what accelerate's launch_command adds before deepspeed_launcher
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        return dict(prepare_deepspeed_cmd_env(args)[1])
    return dict(prepare_multi_gpu_env(args))


def test_a_launch_whose_worker_died_by_a_signal_is_retried_once(tmp_path: Path) -> None:
    """Only a death by signal is retried, once, after removing that launch's outputs."""
    died = "  traceback : Signal 6 (SIGABRT) received by PID 123\n"
    results = iter([(1, died), (1, died), (0, ""), (1, "ValueError: bad")])
    calls: list[list[str]] = []

    def start() -> subprocess.CompletedProcess[str]:
        calls.append(sorted(p.name for p in tmp_path.iterdir()))
        (tmp_path / "ddp-out").mkdir(exist_ok=True)
        code, err = next(results)
        return subprocess.CompletedProcess(["x"], code, "", err)

    (tmp_path / "ddp-spec.json").write_text("{}")
    with pytest.warns(UserWarning, match="retrying the launch once"):
        assert launch_retrying(start, tmp_path, "ddp").returncode == 1  # died twice: fails
    assert calls == [["ddp-spec.json"], ["ddp-spec.json"]]  # the outputs went, the spec stayed
    assert launch_retrying(start, tmp_path, "ddp").returncode == 0  # no retry needed
    assert launch_retrying(start, tmp_path, "ddp").returncode == 1  # a Python error: no retry
    assert len(calls) == 4


def test_close_process_group_ends_the_group() -> None:
    """`prefopt` (cli.run) destroys the default group before exit, and is a no-op without one."""
    import torch.distributed as dist

    from prefopt.cli import close_process_group

    close_process_group()  # no group: nothing to do
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    assert dist.is_initialized()
    close_process_group()
    assert not dist.is_initialized()


@pytest.mark.parametrize("name", ["ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"])
def test_accelerate_config_loads(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin

    path = CONFIGS / f"{name}.yaml"
    raw = yaml.safe_load(path.read_text())
    assert path.read_text().startswith("#")  # each file explains itself
    config = ClusterConfig.from_yaml_file(str(path))  # raises on unknown top-level keys
    flags = {a.dest for a in launch_command_parser()._actions}
    for key in raw.get("fsdp_config", {}):  # accelerate launch maps these onto its flags
        assert (key if key.startswith("fsdp") else f"fsdp_{key}") in flags, key
    for key in raw.get("deepspeed_config", {}):
        assert key in flags, key
    for key, value in launcher_env(name).items():
        monkeypatch.setenv(key, value)
    if name == "fsdp":
        plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    elif name.startswith("deepspeed"):
        ds = DeepSpeedPlugin()
        assert ds.zero_stage == int(name[-1]) == config.deepspeed_config["zero_stage"]
    assert config.num_processes == 8


def fake_accelerator(distributed_type: Any, **state: Any) -> Any:
    return SimpleNamespace(distributed_type=distributed_type, state=SimpleNamespace(**state))


def test_deepspeed_settings_are_filled_from_the_prefopt_config(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    from prefopt.sharding import configure_accelerator

    for key, value in launcher_env("deepspeed_zero3").items():
        monkeypatch.setenv(key, value)
    plugin = DeepSpeedPlugin()
    acc = fake_accelerator(DistributedType.DEEPSPEED, deepspeed_plugin=plugin)
    acc.num_processes = 2
    cfg = load_config(None, ["train.batch_size=3", "train.grad_accum=5", "optim.max_grad_norm=0.5"])
    configure_accelerator(acc, cfg)
    ds = plugin.deepspeed_config
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 1  # prefopt accumulates the 5 itself
    assert ds["gradient_clipping"] == 0.5
    assert ds["train_batch_size"] == 3 * 2  # the micro-batch on each of the 2 processes


def test_on_nan_skip_is_refused_under_deepspeed(monkeypatch: pytest.MonkeyPatch) -> None:
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    from prefopt.sharding import configure_accelerator

    for key, value in launcher_env("deepspeed_zero2").items():
        monkeypatch.setenv(key, value)
    acc = fake_accelerator(DistributedType.DEEPSPEED, deepspeed_plugin=DeepSpeedPlugin())
    acc.num_processes = 2
    with pytest.raises(ConfigError, match="train.on_nan=skip does not work under DeepSpeed"):
        configure_accelerator(acc, load_config(None, ["train.on_nan=skip"]))


def test_fsdp_version_1_is_refused() -> None:
    from accelerate.utils import DistributedType

    from prefopt.sharding import configure_accelerator

    acc = fake_accelerator(DistributedType.FSDP, fsdp_plugin=SimpleNamespace(fsdp_version=1))
    with pytest.raises(ConfigError, match="fsdp_version: 2"):
        configure_accelerator(acc, load_config(None, []))


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED"])
def test_qlora_under_sharding_is_refused(kind: str) -> None:
    from accelerate.utils import DistributedType

    from prefopt.sharding import configure_accelerator

    acc = fake_accelerator(getattr(DistributedType, kind))
    cfg = load_config(None, ["lora.enabled=true", "lora.load_in_4bit=true"])
    with pytest.raises(ConfigError, match=r"\(QLoRA\) is not supported under FSDP or DeepSpeed"):
        configure_accelerator(acc, cfg)


class _Recorder(torch.nn.Module):
    """A scorer that records where it is moved and scores every row 0."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.moves: list[str] = []

    def to(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        self.moves.append(str(args[0]))
        return super().to(*args, **kwargs)

    def forward(self, ids: torch.Tensor, *rest: torch.Tensor) -> tuple[torch.Tensor, None]:
        return torch.zeros(ids.shape[0]) + self.weight, None


def test_reference_offload_moves_the_reference_only_around_a_forward() -> None:
    from prefopt.reference import ModelReference

    ones = torch.ones(2, 3)
    rows = SimpleNamespace(input_ids=ones.long(), attention_mask=ones, response_mask=ones.bool())
    offloaded, kept = _Recorder(), _Recorder()
    ModelReference(offloaded, "copy", offload=True).row_logps(rows)
    ModelReference(kept, "copy").row_logps(rows)
    assert offloaded.moves == ["cpu", "cpu"]  # to the batch's device, then back to CPU
    assert kept.moves == []


# ---------------------------------------------------------------------------------------------
# Worker side (runs inside the launched processes)
# ---------------------------------------------------------------------------------------------


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _cli(overrides: list[str]) -> int:
    from prefopt.cli import main

    return main(["train", *overrides])


def _ddp_worker(spec: dict[str, Any]) -> None:
    root, run = Path(spec["root"]), [*spec["common"], "train.batch_size=4"]
    grads = first_step_gradients([*run, f"output.dir={root}/ddp-g"])
    code = _cli(run)
    split = [*run, f"output.dir={root}/ddp-split"]
    codes = [_cli([*split, "train.stop_after_steps=2"]), _cli([*split, "resume=latest"])]
    cache = root / "ddp-ref-cache"  # "ddp" prefix: a retried launch starts without it
    pre = _cli([*run, "train.max_steps=1", f"output.dir={root}/ddp-pre",
                "reference.strategy=precompute", f"reference.cache_dir={cache}"])  # fmt: skip
    if _rank() == 0:
        save_file(grads, str(root / "ddp-grads.safetensors"))
        result = {"exit_code": code, "exit_codes": codes, "precompute_exit": pre,
                  "cache_files": len(list(cache.glob("*.safetensors")))}  # fmt: skip
        (root / "ddp-result.json").write_text(json.dumps(result))


def _force_fsdp2() -> tuple[Callable[[Any], Any] | None, str]:
    """A make_accelerator that runs accelerate's FSDP2 path on CPU, or (None, why not).

    accelerate enables FSDP only for GPU-like process types: in AcceleratorState the
    ACCELERATE_USE_FSDP branch sits under `distributed_type in [MULTI_GPU, MULTI_NPU, ...]`,
    so on CPU (MULTI_CPU) it is ignored and training silently runs as DDP. torch's FSDP2
    (`fully_shard`) itself works on CPU with gloo, so this switches the state to FSDP after
    construction, with the plugin read from the FSDP_* variables that `accelerate launch
    --config_file configs/accelerate/fsdp.yaml` exported.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    import prefopt.run_setup as rs
    from prefopt.sharding import configure_accelerator

    if os.environ.get("ACCELERATE_USE_FSDP") != "true":
        return None, "accelerate launch did not export ACCELERATE_USE_FSDP=true"
    real = rs.make_accelerator

    def make(cfg: Any) -> Any:
        acc = real(cfg)
        acc.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables
        acc.state.distributed_type = DistributedType.FSDP
        # Each new AcceleratorState() re-reads PartialState's copy (as real FSDP runs set it).
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        configure_accelerator(acc, cfg)
        return acc

    return make, ""


def _fsdp_worker(spec: dict[str, Any]) -> None:
    import prefopt.trainer as trainer
    from prefopt.sharding import is_dtensor

    root = Path(spec["root"])
    make, why = _force_fsdp2()
    if make is None:
        if _rank() == 0:
            (root / "fsdp-result.json").write_text(json.dumps({"skip": why}))
        return
    trainer.make_accelerator = make  # type: ignore[assignment]
    seen: dict[str, bool] = {}
    real_prepare = trainer.prepare_reference

    def spy(run: Any) -> None:
        real_prepare(run)
        seen["policy_sharded"] = all(is_dtensor(p) for p in run.scorer.parameters())
        seen["reference_sharded"] = all(is_dtensor(p) for p in run.reference.scorer.parameters())

    trainer.prepare_reference = spy  # type: ignore[assignment]
    run = [*spec["common"], "train.batch_size=2", "train.grad_accum=2"]
    grads = first_step_gradients([*run, f"output.dir={root}/fsdp-g"], make)
    run.append("reference.offload=true")  # its shards in CPU memory: same numbers
    codes = [_cli([*run, "train.stop_after_steps=2"]), _cli([*run, "resume=latest"])]
    if _rank() == 0:
        save_file(grads, str(root / "fsdp-grads.safetensors"))
        (root / "fsdp-result.json").write_text(json.dumps({"exit_codes": codes, **seen}))


if __name__ == "__main__":  # worker: python tests/test_distributed.py {ddp,fsdp} SPEC.json
    torch.set_num_threads(1)
    worker = {"ddp": _ddp_worker, "fsdp": _fsdp_worker}[sys.argv[1]]
    worker(json.loads(Path(sys.argv[2]).read_text()))
    from prefopt.cli import close_process_group

    close_process_group()
