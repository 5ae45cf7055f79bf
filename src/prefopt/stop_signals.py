"""Stopping on SIGINT/SIGTERM without losing work: the loop finishes its step, saves a
checkpoint and exits (a second Ctrl-C stops at once). Outside the loop, where there is nothing
to finish (loading, or after the final model is saved), a signal stops at once, SIGTERM too,
so both end with prefopt's "interrupted" line instead of a silent kill."""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Iterator
from types import FrameType

logger = logging.getLogger(__name__)


class StopFlag:
    """Set by SIGINT/SIGTERM while `armed`; the loop finishes its step, checkpoints and exits.
    Unarmed (setup, after the final save), a signal raises KeyboardInterrupt at once."""

    def __init__(self, *, armed: bool = True) -> None:
        self.signal: int | None = None
        self.armed = armed
        self.message = "finishing this step, then saving a checkpoint"

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is not None or not self.armed:  # second Ctrl-C, or nothing to save
            raise KeyboardInterrupt
        self.signal = signum
        logger.warning("signal %d: %s", signum, self.message)


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
