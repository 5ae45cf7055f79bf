"""Which examples each optimizer step trains on: effective batches epoch after epoch (length
grouped, resumable mid-epoch), each cut into this process's micro-batches."""

from __future__ import annotations

from collections.abc import Iterator

from prefopt.checkpoint import TrainerState
from prefopt.collate import epoch_batches
from prefopt.pipeline import example_length
from prefopt.run_setup import RunParts


def effective_batches(run: RunParts, state: TrainerState) -> Iterator[list[int]]:
    """Dataset positions of each remaining effective batch, epoch after epoch."""
    cfg, world = run.cfg, run.accelerator.num_processes
    lengths = [example_length(e) for e in run.data.train]
    size = cfg.train.batch_size * cfg.train.grad_accum * world
    epoch, skip = state.epoch, state.batch_in_epoch
    while True:
        batches = epoch_batches(
            lengths, size, seed=cfg.train.seed, epoch=epoch,
            group_by_length=cfg.train.group_by_length, drop_last=world > 1,
        )  # fmt: skip
        for i, batch in enumerate(batches[: run.steps_per_epoch]):
            if i >= skip:
                yield batch
        epoch, skip = epoch + 1, 0


def micro_batches(run: RunParts, batch: list[int]) -> list[list[int]]:
    """This process's share of an effective batch, cut into micro-batches."""
    acc, world = run.accelerator, run.accelerator.num_processes
    share = len(batch) // world if world > 1 else len(batch)
    mine = batch[acc.process_index * share : (acc.process_index + 1) * share]
    size = run.cfg.train.batch_size
    return [mine[i : i + size] for i in range(0, len(mine), size)]
