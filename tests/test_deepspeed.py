"""DeepSpeed ZeRO-2 and ZeRO-3, for real: 2 CPU processes under `accelerate launch`.

Each case (ZeRO-2, ZeRO-3, LoRA on ZeRO-3) is one launch of `accelerate launch --config_file
configs/accelerate/deepspeed_zeroN.yaml --num_processes 2` running this file as its worker
(`python tests/test_deepspeed.py SPEC.json`): `prefopt train` (the CLI's `main`) uninterrupted,
then interrupted by train.stop_after_steps and resumed, then with gradient accumulation.
DeepSpeed runs on its CPU accelerator with gloo (`deepspeed_state.start_deepspeed_on_cpu`).
Checked against the 1-process × batch 8 run: per-step metrics, token counts, final weights; and
that resuming from the engine's partitioned checkpoint equals the uninterrupted run.

Needs the `deepspeed` package (`make test` installs it); skipped with the reason without it.
"""

# The module fixtures `assets` and `one_process` come from dist_helpers: ruff reads their use
# as test parameters as redefinitions.
# ruff: noqa: F811
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from dist_helpers import (  # noqa: F401
    CONFIGS,
    ROOT,
    assert_close_weights,
    assert_same_metrics,
    assets,
    check,
    common,
    final_checkpoint,
    final_weights,
    free_port,
    launch,
    launch_retrying,
    one_process,
    tokens_seen,
    train_lines,
)
from prefopt.deepspeed_state import (
    ENGINE_DIR,
    TAG,
    check_resume_matches,
    is_deepspeed_checkpoint,
    load_engine_state,
)
from prefopt.errors import PrefoptError

CASES = {
    "ds2": (2, []),
    "ds3": (3, []),
    # LoRA dropout off: each process would draw its own masks, unlike the 1-process run.
    "lora3": (3, ["lora.enabled=true", "lora.r=4", "lora.dropout=0"]),
}
"""Launch name → (ZeRO stage, extra overrides): full fine-tune on both stages, LoRA on ZeRO-3."""


@pytest.fixture(scope="module", params=list(CASES), ids=["zero2", "zero3", "zero3-lora"])
def ds_worker(request: pytest.FixtureRequest, assets: dict[str, Path]) -> dict[str, Any]:
    """This file under `accelerate launch` with configs/accelerate/deepspeed_zeroN.yaml."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (make test installs it)")
    name, root = str(request.param), assets["root"]
    stage, extra = CASES[name]
    spec = {"common": [*common(assets, root / name), *extra], "root": str(root), "name": name,
            "offload_reference": name == "ds3"}  # fmt: skip
    spec_file = root / f"{name}-spec.json"
    spec_file.write_text(json.dumps(spec))
    config = CONFIGS / f"deepspeed_zero{stage}.yaml"

    def start() -> subprocess.CompletedProcess[str]:
        return launch(["accelerate.commands.launch", "--config_file", str(config),
                       "--num_processes", "2", "--main_process_port", str(free_port()),
                       "--mixed_precision", "no", str(Path(__file__)), str(spec_file)], ROOT,
                      env={"CUDA_VISIBLE_DEVICES": ""})  # fmt: skip

    check(launch_retrying(start, root, name))
    result: dict[str, Any] = json.loads((root / f"{name}-result.json").read_text())
    result["out"], result["split"] = root / name, root / f"{name}-split"
    result["accum"], result["lora"] = root / f"{name}-accum", bool(extra)
    return result


@pytest.fixture(scope="module")
def baseline(
    request: pytest.FixtureRequest, assets: dict[str, Path], ds_worker: dict[str, Any]
) -> Path:
    """The 1-process × batch 8 run the launch must equal (LoRA's own for the LoRA launch)."""
    if not ds_worker["lora"]:
        return Path(request.getfixturevalue("one_process")["batch8"])
    from prefopt.config_io import load_config
    from prefopt.trainer import train

    out = assets["root"] / "one-lora-batch8"
    if not out.exists():
        overrides = [*common(assets, out), "train.batch_size=8", *CASES["lora3"][1]]
        train(load_config(None, overrides))
    return out


def test_deepspeed_trains_like_one_process(baseline: Path, ds_worker: dict[str, Any]) -> None:
    """2 × batch 4 under ZeRO equals 1 × batch 8: metrics, tokens and weights."""
    assert ds_worker["distributed_type"] == "DEEPSPEED", "accelerate did not run DeepSpeed"
    assert ds_worker["exit_code"] == 0
    out, batch8 = ds_worker["out"], baseline
    assert_same_metrics(train_lines(out), train_lines(batch8), rel=1e-5)
    assert tokens_seen(out) == tokens_seen(batch8)
    assert_close_weights(final_weights(out), final_weights(batch8), atol=5e-5)


def test_deepspeed_accumulation_equals_one_big_batch(
    baseline: Path, ds_worker: dict[str, Any]
) -> None:
    """2 × batch 2 × accum 2: prefopt accumulates, DeepSpeed steps once per optimizer step
    (ZeRO-3: with the reference's shards offloaded to CPU memory)."""
    assert ds_worker["accum_exit"] == 0
    accum, batch8 = ds_worker["accum"], baseline
    assert_same_metrics(train_lines(accum), train_lines(batch8), rel=1e-5)
    assert_close_weights(final_weights(accum), final_weights(batch8), atol=5e-5)


def test_deepspeed_checkpoint_holds_each_process_partition(ds_worker: dict[str, Any]) -> None:
    ckpt = final_checkpoint(ds_worker["out"])
    assert is_deepspeed_checkpoint(ckpt) and not (ckpt / "optimizer.pt").exists()
    files = sorted(p.name for p in (ckpt / ENGINE_DIR / TAG).iterdir())
    optim = [f for f in files if f.endswith("optim_states.pt")]
    assert len(optim) == 2, files  # one optimizer partition per process
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["extra"]["world_size"] == 2


def test_deepspeed_resume_equals_uninterrupted(ds_worker: dict[str, Any]) -> None:
    assert ds_worker["exit_codes"] == [130, 0]  # interrupted (checkpoint saved), then done
    out, split = ds_worker["out"], ds_worker["split"]
    a, b = final_weights(out), final_weights(split)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-7, rtol=0, msg=name)
    assert_same_metrics(train_lines(split), train_lines(out), rel=1e-6)
    assert tokens_seen(split) == tokens_seen(out)


def test_deepspeed_final_model_is_whole(assets: dict[str, Path], ds_worker: dict[str, Any]) -> None:
    """ZeRO-3 partitions the weights; the saved model holds them whole (LoRA: the adapters)."""
    model = ds_worker["out"] / "model"
    if ds_worker["lora"]:
        adapters = load_file(str(model / "adapter_model.safetensors"))
        assert adapters and all("lora_" in k for k in adapters)
        assert all(v.numel() > 0 for v in adapters.values())
        return
    saved = load_file(str(model / "model.safetensors"))
    start = load_file(str(assets["model"] / "model.safetensors"))
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in start.items()}


# ---------------------------------------------------------------------------------------------
# Refusals (no launch)
# ---------------------------------------------------------------------------------------------


def test_a_deepspeed_checkpoint_is_refused_without_deepspeed(tmp_path: Path) -> None:
    (tmp_path / ENGINE_DIR).mkdir()
    with pytest.raises(PrefoptError, match="written under DeepSpeed"):
        check_resume_matches(tmp_path, engine=None)
    check_resume_matches(tmp_path, engine=object())


def test_a_plain_checkpoint_is_refused_under_deepspeed(tmp_path: Path) -> None:
    with pytest.raises(PrefoptError, match="no DeepSpeed state"):
        check_resume_matches(tmp_path, engine=object())
    check_resume_matches(tmp_path, engine=None)


def test_resume_under_another_process_count_is_refused(tmp_path: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:
        with pytest.raises(PrefoptError, match="written by 2 DeepSpeed processes.*has 1"):
            load_engine_state(object(), tmp_path, saved_world=2)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# The worker
# ---------------------------------------------------------------------------------------------


def _worker(spec: dict[str, Any]) -> None:
    import prefopt.trainer as trainer
    from prefopt.cli import main

    seen: dict[str, str] = {}
    real_make = trainer.make_accelerator

    def spy(cfg: Any) -> Any:
        acc = real_make(cfg)
        seen["distributed_type"] = str(acc.distributed_type).rpartition(".")[2]
        return acc

    trainer.make_accelerator = spy  # type: ignore[assignment]
    root, name = Path(spec["root"]), spec["name"]
    run = ["train", *spec["common"], "train.batch_size=4"]
    code = main(run)
    split = [*run, f"output.dir={root}/{name}-split"]
    codes = [main([*split, "train.stop_after_steps=2"]), main([*split, "resume=latest"])]
    # ZeRO-3's accumulation run also keeps its copy reference's shards in CPU memory
    # (offload_param): the numbers must not change.
    offload = ["reference.offload=true"] if spec["offload_reference"] else []
    accum = main(["train", *spec["common"], "train.batch_size=2", "train.grad_accum=2",
                  f"output.dir={root}/{name}-accum", *offload])  # fmt: skip
    if int(os.environ.get("RANK", "0")) == 0:
        result = {"exit_code": code, "exit_codes": codes, "accum_exit": accum, **seen}
        (root / f"{name}-result.json").write_text(json.dumps(result))


if __name__ == "__main__":  # worker: python tests/test_deepspeed.py SPEC.json
    torch.set_num_threads(1)
    _worker(json.loads(Path(sys.argv[1]).read_text()))
    from prefopt.cli import close_process_group

    close_process_group()
