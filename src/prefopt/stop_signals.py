"""Stopping on SIGINT/SIGTERM without losing work: the loop finishes its step, saves a
checkpoint and exits (a second Ctrl-C stops at once)."""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Iterator
from types import FrameType

logger = logging.getLogger(__name__)


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop finishes its step, checkpoints and exits."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is not None:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum
        logger.warning("signal %d: finishing this step, then saving a checkpoint", signum)


@contextlib.contextmanager
def stop_on_signals(flag: StopFlag) -> Iterator[None]:
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for s in old:
            signal.signal(s, flag)
    except ValueError:  # not the main thread: leave handlers alone
        old = {}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
