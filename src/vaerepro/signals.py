"""SIGTERM as schedulers send it (SLURM preemption, `kill`), and SIGINT (Ctrl-C, `dvc queue kill`): stop
cleanly, never exit 0.

`install` makes SIGTERM raise `Stopped` in the main thread, so every stage unwinds through its clean-up
(the MLflow run is marked KILLED) and the command exits 143. During training (`deferred`), the first SIGTERM
or Ctrl-C only asks training to stop at the end of the current epoch, where last.ckpt can be written and
resumed exactly (a mid-epoch state cannot: batches are seeded per epoch); a second one stops at once (exit
143, or 130 for Ctrl-C; a SIGTERM within REPEAT_S seconds of the first is taken as the same one). Outside
training Ctrl-C is Python's KeyboardInterrupt (vaerepro.cli: exit 130).

Python runs a signal's handler in whatever Python code the main thread is running, and that may be a
finalizer (a `__del__`, a weakref callback: SQLAlchemy runs them while MLflow creates a store), whose
exceptions Python prints as "Exception ignored in ..." and drops. A stop dropped there is kept
(`_keep_dropped`, the `sys.unraisablehook` that `install` sets) and raised again by `check`, which the
long-running loops and each stage call.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from vaerepro.errors import Stopped

log = logging.getLogger("vaerepro")

_deferring = False
_requested: int | None = None  # the signal received while deferring
_requested_at = 0.0  # when (clock(), s)
_finished = False  # see finish
_dropped: BaseException | None = None  # a stop Python dropped in a finalizer (_keep_dropped), until `check`
_raised: Stopped | None = None  # the stop the handler raised in this command, see `raised`
_other_hook = sys.unraisablehook  # the hook _keep_dropped passes every other dropped exception to

# A SIGTERM within this many seconds of the first is the same request, not "stop at once": a signal to a
# whole process group (SLURM preemption, `kill -- -PGID`) reaches a reproduction's seed directly and again
# through its parent, which passes its own SIGTERM on (reproduce._run_seed); the seed would otherwise stop
# mid-epoch with no models/last.ckpt. A second Ctrl-C is a person's, and always stops at once.
REPEAT_S = 2.0
clock = time.monotonic  # seconds, for REPEAT_S (a test sets its own)


def _handler(signum: int, frame) -> None:
    global _requested, _requested_at
    if _deferring and _requested is None:
        _requested, _requested_at = signum, clock()
        log.warning(
            "%s received: training stops at the end of this epoch and saves models/last.ckpt; "
            "send it again to stop at once",
            signal.Signals(signum).name,
        )
        return
    if _deferring and signum == _requested == signal.SIGTERM and clock() - _requested_at < REPEAT_S:
        return
    if _finished:
        return
    global _raised
    _raised = Stopped(signum)
    raise _raised


def install() -> None:
    """SIGTERM raises Stopped from now on (main thread only: Python delivers signals there), and a stop that
    Python drops in a finalizer is kept for `check`."""
    global _finished, _dropped, _raised, _other_hook
    _finished, _dropped, _raised = False, None, None
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _handler)
    if sys.unraisablehook is not _keep_dropped:
        _other_hook, sys.unraisablehook = sys.unraisablehook, _keep_dropped


def _keep_dropped(unraisable) -> None:
    """sys.unraisablehook: a Stopped or KeyboardInterrupt that Python could not raise (its handler ran inside
    a finalizer) is kept for `check` rather than printed as a traceback and lost, which let a Ctrl-C
    during the MLflow store's creation run the command to its end with exit status 0. Any other exception
    goes to the hook there was before."""
    global _dropped
    if isinstance(unraisable.exc_value, (Stopped, KeyboardInterrupt)):
        _dropped = _dropped or unraisable.exc_value
        log.debug("%r raised in %r, kept until the next check", unraisable.exc_value, unraisable.object)
        return
    _other_hook(unraisable)


def check() -> None:
    """Raise the stop Python dropped in a finalizer since the last call (see `_keep_dropped`), if any: where
    the code calling this could have been interrupted, i.e. not in a clean-up on the way up."""
    global _dropped
    stop, _dropped = _dropped, None
    if stop is None:
        return
    if _deferring:  # in training: as if the signal came now (the first one asks for a stop at the epoch end)
        _handler(stop.signum if isinstance(stop, Stopped) else signal.SIGINT, None)
    elif not _finished:
        raise stop.with_traceback(None)


def raised() -> Stopped | None:
    """The stop the handler raised since `install`, or None. A library whose clean-up breaks on the state a
    stop left it in raises its own exception in place of the stop: omegaconf, stopped mid-compose, raised
    AttributeError ('NoneType' object has no attribute '_invalidate_flags_cache') with no trace of the
    SIGTERM, and the command ended with a traceback and exit status 1. Nothing in vaerepro catches a stop
    without passing it on, so a command that fails after one was raised was stopped (vaerepro.cli.main)."""
    return _raised


def finish() -> None:
    """The command's outcome is decided (its work returned or raised): a SIGTERM from now on, while it says
    so and exits, is not an interruption and raises nothing. Stopped raised there would leave the command
    with a traceback in place of its line and exit status; torchrun sends one to every other rank as soon
    as one rank has ended."""
    global _finished
    _finished = True


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
    """Within this block the first SIGTERM or Ctrl-C (SIGINT) is only recorded (see `requested`); the code
    inside polls it. Ctrl-C would otherwise raise KeyboardInterrupt mid-epoch, which Lightning turns into
    exit status 1 with no models/last.ckpt. A SIGINT this process ignores (a reproduction's seed, nohup)
    stays ignored."""
    global _deferring, _requested
    _deferring, _requested = True, None
    previous = None
    if (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    ):
        previous = signal.signal(signal.SIGINT, _handler)
    try:
        yield
    finally:
        _deferring = False
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


# The pid of the vaerepro process that started this one (a sweep's trials, a reproduction's seeds, Lightning's
# DDP ranks): each stops when that process ends (stop_with_parent). Every vaerepro command puts its own pid
# here for the processes it starts, so no launcher needs to set it.
PARENT_PID_ENV = "VAEREPRO_PARENT_PID"
_watching = False


def stop_with_parent() -> None:
    """SIGTERM to this process once the process that started it has ended, so that it stops as `kill` stops
    it (training at its epoch end with models/last.ckpt, the MLflow run KILLED, exit 143) instead of running
    on, orphaned, with nobody to record its outputs or count its result. The process watched:

    * the vaerepro process named by PARENT_PID_ENV: a sweep's trial watches the sweep, a reproduction's seed
      the reproduction, a DDP rank rank 0. A `kill -9` of that process, which it cannot pass on, stops them
      too. If it has ended already (before this process looked), at once.
    * else, under DVC (DVC_STAGE set), the dvc process running the stage: `kill PID` and `timeout` send
      SIGTERM to dvc alone, and dvc passes no signal on. DVC runs a stage as `$SHELL -c CMD`
      (dvc/stage/run.py): bash and zsh exec a lone command, making dvc the parent; dash does not, and dvc
      is the shell's parent.

    Then PARENT_PID_ENV becomes this process's pid, for the processes it starts. Linux: a daemon thread
    waits on a pidfd of the process (no pid reused meanwhile can stand in for it); elsewhere nothing. Call
    it once, in the command's own process, before signals are installed or after; later calls do nothing."""
    global _watching
    if _watching:
        return
    _watching = True
    named = os.environ.get(PARENT_PID_ENV, "")
    os.environ[PARENT_PID_ENV] = str(os.getpid())
    if not hasattr(os, "pidfd_open"):
        return
    if named.isdigit():
        watched = int(named)
    elif os.environ.get("DVC_STAGE"):
        watched = os.getppid()
        with contextlib.suppress(OSError, IndexError, ValueError):
            argv = Path(f"/proc/{watched}/cmdline").read_bytes().split(b"\0")
            if argv[1] == b"-c":  # a shell between dvc and this process
                watched = int(Path(f"/proc/{watched}/stat").read_text().rsplit(")", 1)[1].split()[1])
    else:
        return
    try:
        fd = os.pidfd_open(watched)
    except ProcessLookupError:  # it has ended already
        os.kill(os.getpid(), signal.SIGTERM)
        return
    except OSError:  # a kernel without pidfds (before Linux 5.3)
        return
    import select

    def _wait() -> None:
        select.select([fd], [], [])  # readable once the process has ended
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=_wait, name="vaerepro-stop-with-parent", daemon=True).start()


def machine() -> str:
    """Where a pid means one process: 'host/boot/pid-namespace' on Linux ('host' elsewhere). The boot id
    and the pid namespace keep a pid from a reboot, or from a container that shares the host's name, from
    being read as a process of this one."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8])
        parts.append(os.readlink("/proc/self/ns/pid").removeprefix("pid:[").removesuffix("]"))
    return "/".join(parts)


def this_process() -> str:
    """'machine:pid' of this process (see machine): who holds a running record, an MLflow run."""
    return f"{machine()}:{os.getpid()}"


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists here (one of another user's counts: PermissionError). On Windows always
    true: there os.kill(pid, 0) would end the process, not look at it."""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
