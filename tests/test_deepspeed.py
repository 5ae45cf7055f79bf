"""DeepSpeed ZeRO-2 and ZeRO-3, for real: 2 CPU processes under `accelerate launch`.

Each stage is one launch of `accelerate launch --config_file configs/accelerate/deepspeed_zeroN.yaml
--num_processes 2` running this file as its worker (`python tests/test_deepspeed.py SPEC.json`):
`prefopt train` (the CLI's `main`) uninterrupted, then interrupted by train.stop_after_steps and
resumed, then with gradient accumulation. DeepSpeed runs on its CPU accelerator with gloo
(`deepspeed_state.start_deepspeed_on_cpu`).
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


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def ds_worker(request: pytest.FixtureRequest, assets: dict[str, Path]) -> dict[str, Any]:
    """This file under `accelerate launch` with configs/accelerate/deepspeed_zeroN.yaml."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (make test installs it)")
    stage, root = int(request.param), assets["root"]
    spec = {"common": common(assets, root / f"ds{stage}"), "root": str(root), "stage": stage}
    spec_file = root / f"ds{stage}-spec.json"
    spec_file.write_text(json.dumps(spec))
    config = CONFIGS / f"deepspeed_zero{stage}.yaml"

    def start() -> subprocess.CompletedProcess[str]:
        return launch(["accelerate.commands.launch", "--config_file", str(config),
                       "--num_processes", "2", "--main_process_port", str(free_port()),
                       "--mixed_precision", "no", str(Path(__file__)), str(spec_file)], ROOT,
                      env={"CUDA_VISIBLE_DEVICES": ""})  # fmt: skip

    check(launch_retrying(start, root, f"ds{stage}"))
    result: dict[str, Any] = json.loads((root / f"ds{stage}-result.json").read_text())
    result["out"], result["split"] = root / f"ds{stage}", root / f"ds{stage}-split"
    result["accum"] = root / f"ds{stage}-accum"
    return result


def test_deepspeed_trains_like_one_process(
    one_process: dict[str, Path], ds_worker: dict[str, Any]
) -> None:
    """2 × batch 4 under ZeRO equals 1 × batch 8: metrics, tokens and weights."""
    assert ds_worker["distributed_type"] == "DEEPSPEED", "accelerate did not run DeepSpeed"
    assert ds_worker["exit_code"] == 0
    out, batch8 = ds_worker["out"], one_process["batch8"]
    assert_same_metrics(train_lines(out), train_lines(batch8), rel=1e-5)
    assert tokens_seen(out) == tokens_seen(batch8)
    assert_close_weights(final_weights(out), final_weights(batch8), atol=5e-5)


def test_deepspeed_accumulation_equals_one_big_batch(
    one_process: dict[str, Path], ds_worker: dict[str, Any]
) -> None:
    """2 × batch 2 × accum 2: prefopt accumulates, DeepSpeed steps once per optimizer step."""
    assert ds_worker["accum_exit"] == 0
    accum, batch8 = ds_worker["accum"], one_process["batch8"]
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
    """ZeRO-3 partitions the weights; the saved model holds them whole."""
    saved = load_file(str(ds_worker["out"] / "model" / "model.safetensors"))
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
    root, stage = Path(spec["root"]), spec["stage"]
    run = ["train", *spec["common"], "train.batch_size=4"]
    code = main(run)
    split = [*run, f"output.dir={root}/ds{stage}-split"]
    codes = [main([*split, "train.stop_after_steps=2"]), main([*split, "resume=latest"])]
    accum = main(["train", *spec["common"], "train.batch_size=2", "train.grad_accum=2",
                  f"output.dir={root}/ds{stage}-accum"])  # fmt: skip
    if int(os.environ.get("RANK", "0")) == 0:
        result = {"exit_code": code, "exit_codes": codes, "accum_exit": accum, **seen}
        (root / f"ds{stage}-result.json").write_text(json.dumps(result))


if __name__ == "__main__":  # worker: python tests/test_deepspeed.py SPEC.json
    torch.set_num_threads(1)
    _worker(json.loads(Path(sys.argv[1]).read_text()))
    from prefopt.cli import close_process_group

    close_process_group()
