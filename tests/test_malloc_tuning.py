"""glibc malloc tuning: freed tensor memory is reused, not unmapped and page-faulted in again."""

from __future__ import annotations

import resource
import sys

import pytest
import torch

from prefopt.config_io import load_config
from prefopt.malloc_tuning import keep_freed_memory

PAGE = resource.getpagesize()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tuning is Linux-only")
def test_freed_tensor_memory_is_reused_without_page_faults() -> None:
    """A step's pattern: three 64 MiB activations live at once, a small tensor allocated after
    them, all freed. Untuned, every round maps them afresh (~49k page faults per round, each
    round); tuned, the heap serves them mostly from freed memory."""
    assert keep_freed_memory()
    assert keep_freed_memory()  # idempotent
    numel = 64 * 2**20 // 4  # float32: above glibc's largest mmap threshold (32 MiB)
    faults = []
    pinned = []
    for _ in range(10):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        activations = [torch.ones(numel) for _ in range(3)]
        pinned.append(torch.ones(1000))
        del activations
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    fresh = 3 * numel * 4 // PAGE  # one round of fresh mappings
    # Untuned: every round ≈ fresh. Tuned: 0 in a fresh process, one block of the three
    # re-faulted in a long-lived one (pytest's heap is fragmented by earlier tests).
    assert sum(faults[-5:]) / 5 < 0.6 * fresh, f"page faults per round: {faults}"


def test_on_by_default_and_can_be_turned_off() -> None:
    assert load_config(None, []).train.keep_freed_memory is True
    assert load_config(None, ["train.keep_freed_memory=false"]).train.keep_freed_memory is False
