"""Leave a finished command's process without CPython's teardown of its modules.

Once a command has written and closed its files, CPython's exit still frees the objects of every module
it imported, one by one: about 1.3 s after `import lightning`, 1.8 s after a training run's imports, and up
to 2.8 s on 2 busy cores (measured against os._exit), paid by every `vaerepro` command, sweep trial and
reproduction seed. Signal handlers are reset by then, so a SIGTERM in those seconds also ends a finished
run as -15 rather than 0.

`arm(status)` records the exit status of a command that returned normally. `_leave`, registered with
atexit when the package is imported, before any library the command imports registers its own, runs
after all of theirs (atexit runs the last registered first: MLflow's end of run, multiprocessing's,
torch's, weakref finalizers), flushes logging and stdio, and ends the process with os._exit(status).
`exit_after(main)` arms it for a command that leaves by SystemExit as well (--help). Unarmed (an exception
left the command, or `main` was called as a function, as tests do) it does nothing and CPython exits as
usual. The standard library has no exit that skips only the teardown, hence these lines.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import NoReturn

_status: int | None = None


def arm(status: int) -> None:
    """Leave with `status` at exit, skipping the teardown (`_leave`). The command has finished: a SIGTERM or
    Ctrl-C from now on (torchrun stopping the other ranks once one has ended) leaves at once with `status`,
    where vaerepro.signals' handler would raise Stopped into whichever atexit handler runs, which Python
    prints as a traceback and ignores."""
    global _status
    _status = status
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, _on_signal)


def exit_with(status: int) -> NoReturn:
    """End a command that returned `status`: armed (`arm`), then sys.exit, so that atexit runs."""
    arm(status)
    sys.exit(status)


def exit_after(main: Callable[[], int]) -> NoReturn:
    """Run a command's `main` and end it as `exit_with` does, also when it leaves by SystemExit (argparse's
    --help and usage errors, Hydra's exits), which would otherwise pay the whole teardown."""
    try:
        status = main()
    except SystemExit as done:
        status = _exit_status(done.code)
    exit_with(status)


def _exit_status(code: object) -> int:
    """What sys.exit(code) exits with: None is 0, an int itself; anything else is printed to stderr, and 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _on_signal(signum: int, frame) -> None:
    _leave()


def _leave() -> None:
    if _status is None:
        return
    with contextlib.suppress(Exception):  # a signal may arrive mid-write: leave all the same
        logging.shutdown()  # logging's own atexit handler was registered before this one: it would not run
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    os._exit(_status)


atexit.register(_leave)
