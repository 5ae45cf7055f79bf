"""The training loop: one explicit loop on accelerate, no trainer class tree.

Read `train()` top to bottom: set up → step-0 reference check and eval → for each optimizer
step: micro-batches (forward, loss, backward) → finite check → clip → AdamW → schedule → log →
eval / checkpoint / early stop → final save, reload check (plain transformers/peft), report.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType

from prefopt.batch_plan import effective_batches, micro_batches
from prefopt.checkpoint import (
    TrainerState,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
    trainable_state,
)
from prefopt.config import ExperimentConfig
from prefopt.config_io import to_dict
from prefopt.deepspeed_state import save_engine_state, single_process_loading
from prefopt.evaluation import evaluate_dataset, micro_step
from prefopt.final_judge import check_judge_setup
from prefopt.metrics import MetricAccumulator
from prefopt.output import prepare_output_dir, save_final
from prefopt.pipeline import write_data_summary
from prefopt.report_samples import sample_for_report
from prefopt.run_hooks import (
    check_reference_at_start,
    check_saved_model_loads,
    judge_saved_model,
    watch_health,
    write_health_and_report,
)
from prefopt.run_setup import (
    RunParts,
    build_run,
    make_accelerator,
    prepare_reference,
    verify_run_prefix_sharing,
)
from prefopt.sharding import any_process, gather_for_checkpoint, whole_weights
from prefopt.step_guards import (
    Interrupted,
    NonFiniteError,
    early_stop,
    handle_non_finite,
    step_finite,
    weights_finite,
)
from prefopt.stop_signals import StopFlag, stop_on_signals
from prefopt.tracking import Progress, Tracker

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished run produced."""

    output_dir: Path
    state: TrainerState
    initial_eval: dict[str, float] | None
    final_eval: dict[str, float] | None
    last_train: dict[str, float] = field(default_factory=dict)
    stopped_early: bool = False
    judge: dict[str, Any] | None = None
    """The held-out judge comparison (`judge.json`), when `judge.prompts` was set."""


def _train_step(run: RunParts, batch: list[int], prepared: Any) -> tuple[dict[str, float], int]:
    """One optimizer step over an effective batch; returns (metrics, tokens of all processes)."""
    acc, cfg = run.accelerator, run.cfg
    n_global, world = len(batch), acc.num_processes
    micro = micro_batches(run, batch)
    metrics, tokens = MetricAccumulator(), 0
    # FSDP would keep whole (unsharded) gradients across no_sync micro-batches: reduce-scatter
    # each one instead, trading communication for memory.
    defer_sync = acc.distributed_type != DistributedType.FSDP
    for i, positions in enumerate(micro):
        last = i == len(micro) - 1
        acc.sync_gradients = last  # DeepSpeed steps inside backward() when this is True
        sync = acc.no_sync(prepared) if defer_sync and not last else contextlib.nullcontext()
        with sync, acc.autocast():
            out, n_tok = micro_step(
                prepared, run.reference, [run.data.train[p] for p in positions], positions,
                cfg.loss, pad_token_id=run.tokenizer.pad_token_id, device=acc.device,
                reduce_mean=lambda t: acc.reduce(t, "mean") if world > 1 else t,
                max_length=cfg.data.max_length, prefix_sharing=run.prefix_sharing.enabled,
                pack=cfg.train.packing is not False,
            )  # fmt: skip
            # Sum over pairs / global pair count, × world since DDP averages across processes:
            # the update equals one big batch whatever the split into micro-batches/processes.
            loss = out.losses.sum() / n_global * world
        acc.backward(loss)
        metrics.add(out.metrics)
        tokens += n_tok
    values = metrics.compute(lambda t: acc.reduce(t.to(acc.device), "sum").cpu())
    if world > 1:  # every process counted only its own share
        tokens = int(acc.reduce(torch.tensor(tokens, device=acc.device), "sum").item())
    norm = _clip(run)
    if norm is not None:
        values["grad_norm"] = norm
    return values, tokens


def _clip(run: RunParts) -> float | None:
    params = [p for p in run.model.parameters() if p.requires_grad]
    max_norm = run.cfg.optim.max_grad_norm
    norm = run.accelerator.clip_grad_norm_(params, max_norm if max_norm else math.inf)
    return None if norm is None else float(norm)  # DeepSpeed: None when it has no norm yet


def _eval(run: RunParts, prepared: Any) -> dict[str, float] | None:
    if not run.data.eval:
        return None
    acc = run.accelerator
    return evaluate_dataset(
        prepared, run.reference, run.data.eval, run.cfg.loss,
        batch_size=run.cfg.eval.batch_size or run.cfg.train.batch_size,
        pad_token_id=run.tokenizer.pad_token_id, device=acc.device,
        max_length=run.cfg.data.max_length, prefix_sharing=run.prefix_sharing.enabled,
        pack=run.cfg.train.packing is not False,
    )  # fmt: skip


def train(cfg: ExperimentConfig) -> TrainResult:
    """Run DPO-family training as configured; returns where the output went and the metrics."""
    cfg.validate()  # load_config validated it, but a config built in Python may not be
    check_judge_setup(cfg)  # a bad prompts file or judge fails now, not after training
    # Handlers for the whole run: unarmed during setup (a signal stops at once), armed by the
    # loop (finish the step, save, exit), unarmed again once the final model is saved.
    flag = StopFlag(armed=False)
    with stop_on_signals(flag):
        return _train(cfg, flag)


def _train(cfg: ExperimentConfig, flag: StopFlag) -> TrainResult:
    acc = make_accelerator(cfg)
    out_dir = Path(cfg.output.dir)
    if acc.is_main_process:  # one process owns the folder; the others wait for it
        out_dir = prepare_output_dir(cfg)
    acc.wait_for_everyone()
    run = build_run(cfg, acc)
    if acc.is_main_process:  # what was read, kept and dropped: for the report
        write_data_summary(run.data, out_dir)
    prepared, run.optimizer = acc.prepare(run.scorer, run.optimizer)
    prepare_reference(run)
    state = TrainerState()
    if cfg.output.resume:
        ckpt = resolve_resume(out_dir / "checkpoints", cfg.output.resume)
        engine = prepared if acc.distributed_type == DistributedType.DEEPSPEED else None
        state = load_checkpoint(ckpt, run.model, run.optimizer, run.scheduler, engine)
    # The check build_run leaves when prepare shards the weights; after loading, since a forward
    # leaves FSDP2's root unit unsharded and load_checkpoint writes into the shards.
    verify_run_prefix_sharing(run, prepared)
    tracker = Tracker(out_dir, cfg.output.report_to, to_dict(cfg), enabled=acc.is_main_process)
    monitor = watch_health(tracker, out_dir, resumed=state.step > 0)
    initial_eval = None
    if state.step == 0:
        check_reference_at_start(run, monitor)
        initial_eval = _eval(run, prepared)
        if initial_eval is not None:
            tracker.log({"step": 0, "split": "eval", **initial_eval})
    try:
        result = _Loop(run, prepared, state, tracker, out_dir, flag).run_all()
    except NonFiniteError:
        if acc.is_main_process:  # the non-finite step is logged: health and report say so
            write_health_and_report(out_dir, monitor, report=cfg.output.report)
        tracker.close()
        raise
    try:
        if acc.is_main_process:
            with single_process_loading():
                check_saved_model_loads(cfg, out_dir / "model")
                result.judge = judge_saved_model(cfg, out_dir)
                sample_for_report(cfg, out_dir)  # a few samples when nothing was judged
    finally:  # a model that does not load back still gets its health and report
        if acc.is_main_process:
            write_health_and_report(out_dir, monitor, report=cfg.output.report)
        tracker.close()
    result.initial_eval = initial_eval
    return result


def _config_yaml(cfg: ExperimentConfig) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


class _Loop:
    """State of one training invocation; `run()` is the loop, each method one phase of a step."""

    def __init__(
        self,
        run: RunParts,
        prepared: Any,
        state: TrainerState,
        tracker: Tracker,
        out_dir: Path,
        flag: StopFlag,
    ) -> None:
        cfg = run.cfg
        self.run, self.prepared, self.state, self.tracker = run, prepared, state, tracker
        self.out_dir, self.config_yaml, self.flag = out_dir, _config_yaml(cfg), flag
        self.last: dict[str, float] = {}
        self.last_eval: tuple[int, dict[str, float]] | None = None
        """(step, metrics) of the latest evaluation during training."""
        self.main = run.accelerator.is_main_process
        self.progress = Progress(run.total_steps, state.step, cfg.output.progress and self.main)
        self.stop_at = (
            state.step + cfg.train.stop_after_steps if cfg.train.stop_after_steps else None
        )
        self.start = time.perf_counter()
        self.saved_step = state.step if state.step else -1  # a resumed step is on disk

    def run_all(self) -> TrainResult:
        batches = effective_batches(self.run, self.state)
        stopped_early = False
        self.flag.armed = True
        while self.state.step < self.run.total_steps:
            self.optimizer_step(next(batches))
            if self.maybe_eval():
                stopped_early = True
                break
            self.maybe_checkpoint()
        self.progress.close()
        self.flag.message = "finishing the final evaluation and saving the model, then stopping"
        result = self.finish(stopped_early)
        self.flag.armed = False  # the model is saved: a signal from now on stops at once
        if self.flag.signal is not None:
            raise Interrupted(
                f"interrupted at the end of training (step {self.state.step}); the checkpoint "
                f"is saved in {self.out_dir / 'checkpoints'} and the final model in "
                f"{self.out_dir / 'model'}. The reload check, judge and report were skipped"
            )
        return result

    def optimizer_step(self, batch: list[int]) -> None:
        """Micro-batches → finite check → clip → AdamW → schedule → log."""
        run, state = self.run, self.state
        t0 = time.perf_counter()
        values, tokens = _train_step(run, batch, self.prepared)
        if not step_finite(values):
            run.optimizer.zero_grad(set_to_none=True)
            # Logged like any step, so the health check and the report see it.
            self.tracker.log({"step": state.step + 1, "split": "train", **values,
                              "non_finite_step": 1.0})  # fmt: skip
            handle_non_finite(run, state, batch, values)
            run.scheduler.step()  # the schedule stays a function of the step count
            _advance(run, state)
            return
        lr = float(run.scheduler.get_last_lr()[0])
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        _advance(run, state)
        state.tokens_seen += tokens
        dt = time.perf_counter() - t0
        self.last = {
            **values,
            "lr": lr,
            "tokens_per_s": tokens / dt,
            "step_time_s": dt,
            "elapsed_s": time.perf_counter() - self.start,
            "epoch": float(state.epoch),
        }
        self.tracker.log({"step": state.step, "split": "train", **self.last})
        self.progress.update(self.last)

    def maybe_eval(self) -> bool:
        """Evaluate every `eval.every_steps`; True when early stopping says stop."""
        every, step = self.run.cfg.eval.every_steps, self.state.step
        if not every or step % every or step >= self.run.total_steps:
            return False
        ev = _eval(self.run, self.prepared)
        if ev is None:
            return False
        self.tracker.log({"step": step, "split": "eval", **ev})
        self.last_eval = (step, ev)
        self.progress.write(_fmt_eval(step, ev))
        if early_stop(self.run, self.state, ev):
            self.progress.write(f"early stopping at step {step}")
            return True
        return False

    def save(self) -> None:
        if self.saved_step == self.state.step:
            return  # the last step was checkpointed by save_every already: write it once
        self.saved_step = self.state.step
        run = self.run
        # An update can overflow the weights after a finite loss and gradient; a checkpoint of
        # them would make "the last good checkpoint" a bad one. Every process must agree.
        if any_process(run.accelerator, not weights_finite(run.model)):
            raise NonFiniteError(
                f"step {self.state.step}: the update made some trainable weights NaN/Inf; not "
                "saving them (the last checkpoint is kept). Lower optim.lr or keep "
                "optim.max_grad_norm on"
            )
        engine_state: Path | None = None
        if run.accelerator.distributed_type == DistributedType.DEEPSPEED:
            weights, engine_state = self._deepspeed_parts()
            optim = None  # in engine_state, partitioned
        else:
            # Under FSDP every process takes part in gathering whole tensors; main writes.
            weights, optim = gather_for_checkpoint(
                run.accelerator, self.prepared, run.model, run.optimizer
            )
        if self.main:
            save_checkpoint(
                self.out_dir / "checkpoints", run.model, run.optimizer, run.scheduler,
                self.state, self.config_yaml, keep=run.cfg.output.keep_checkpoints,
                weights=weights, optimizer_state=optim, engine_state=engine_state,
            )  # fmt: skip

    def _deepspeed_parts(self) -> tuple[dict[str, torch.Tensor] | None, Path]:
        """The engine writes its partitions (every process): (whole weights on main, the
        folder of partitions)."""
        run, acc = self.run, self.run.accelerator
        staging = self.out_dir / "checkpoints" / f".deepspeed-{self.state.step:06d}"
        save_engine_state(self.prepared, staging, main=self.main)
        self.state.extra["world_size"] = acc.num_processes  # ZeRO partitions need as many
        with whole_weights(acc, self.prepared):  # ZeRO-3 gathers on every process
            weights = trainable_state(run.model) if self.main else None
        return weights, staging

    def maybe_checkpoint(self) -> None:
        """Checkpoint every `output.save_every`; on a signal or planned stop, save and exit."""
        step, every = self.state.step, self.run.cfg.output.save_every
        if self.stop_at is not None and self.stop_at <= step < self.run.total_steps:
            self.flag.signal = 0  # a planned stop behaves like an interrupt: save and exit
        # A signal may reach the processes at different steps: all stop at the first one.
        stop = any_process(self.run.accelerator, self.flag.signal is not None)
        if stop and self.flag.signal is None:
            self.flag.signal = 0
        if self.flag.signal is None and not (every and step % every == 0):
            return
        self.save()
        if self.flag.signal is not None:
            # Exit together: torchrun kills the survivors when one process exits non-zero,
            # which could stop the main process halfway through writing the checkpoint.
            self.run.accelerator.wait_for_everyone()
            self.progress.close()
            raise Interrupted(
                f"interrupted at step {step}; checkpoint saved. Continue with the same "
                "command plus resume=latest"
            )

    def finish(self, stopped_early: bool) -> TrainResult:
        """Checkpoint (first: a signal or crash during the final eval then loses nothing),
        final eval, and the final model."""
        self.save()
        if self.last_eval is not None and self.last_eval[0] == self.state.step:
            final_eval: dict[str, float] | None = self.last_eval[1]  # early stop just evaluated
        else:
            final_eval = _eval(self.run, self.prepared)
            if final_eval is not None:
                self.tracker.log({"step": self.state.step, "split": "eval", **final_eval})
        with whole_weights(self.run.accelerator, self.prepared):  # every process gathers
            if self.main:
                save_final(self.run, self.out_dir, final_eval or self.last)
        return TrainResult(self.out_dir, self.state, None, final_eval, self.last, stopped_early)


def _advance(run: RunParts, state: TrainerState) -> None:
    state.step += 1
    state.batch_in_epoch += 1
    if state.batch_in_epoch >= run.steps_per_epoch:
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0


def _fmt_eval(step: int, ev: dict[str, float]) -> str:
    keys = ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")
    return f"eval @ step {step}: " + ", ".join(f"{k}={ev[k]:.4f}" for k in keys if k in ev)
