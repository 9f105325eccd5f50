"""SIGTERM as schedulers send it (SLURM preemption, `dvc queue kill`, `kill`): stop cleanly, never exit 0.

`install` makes SIGTERM raise `Stopped` in the main thread, so every stage unwinds through its clean-up
(the MLflow run is marked KILLED) and the command exits 143. During training (`deferred`), the first SIGTERM
only asks training to stop at the end of the current epoch, where last.ckpt can be written and resumed
exactly (a mid-epoch state cannot: batches are seeded per epoch); a second SIGTERM stops at once.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

from vaerepro.errors import Stopped

log = logging.getLogger("vaerepro")

_deferring = False
_requested: int | None = None  # the signal received while deferring


def _handler(signum: int, frame) -> None:
    global _requested
    if _deferring and _requested is None:
        _requested = signum
        log.warning(
            "%s received: training stops at the end of this epoch and saves models/last.ckpt; "
            "send it again to stop at once",
            signal.Signals(signum).name,
        )
        return
    raise Stopped(signum)


def install() -> None:
    """SIGTERM raises Stopped from now on (main thread only: Python delivers signals there)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _handler)


def take_over() -> None:
    """Put this module's handler back in place, e.g. after Lightning registered its own at the start of
    fit (Lightning's stops mid-epoch, after the current batch, and its loops then exit with status 0)."""
    if (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) is not _handler
    ):
        signal.signal(signal.SIGTERM, _handler)


def requested() -> int | None:
    """The signal that asked a deferring section to stop, or None."""
    return _requested


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Within this block the first SIGTERM is only recorded (see `requested`); the code inside polls it."""
    global _deferring, _requested
    _deferring, _requested = True, None
    try:
        yield
    finally:
        _deferring = False
