"""Result files written whole: a reader finds the earlier file or the new one, never part of one.

A file written in place is empty, then partial, until its last byte is out: a process killed meanwhile (kill
-9, the OOM killer, a scheduler's time limit, a full disk) leaves a torn file where the only good copy was,
and the earlier eval.json, curve or report is lost. `write_whole` writes the bytes to a hidden sibling
(`.NAME.tmp`: the same directory, so the same file system), flushes them to disk and renames the sibling
over NAME, which POSIX and Windows (`os.replace`) do in one step. Any error on the way removes the sibling
and leaves NAME as it was; a kill leaves at most that one sibling, which the next write of NAME replaces.
A file several processes may write at once (a sweep's report) takes `shared=True`: one sibling per process
(`.NAME.<pid>.tmp`), so that no two writers fill one.

The standard library has no such call (`tempfile` gives the name, not the rename), hence these few lines.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

Writer = Callable[[IO[bytes]], object]  # writes the file's bytes to an open binary file, e.g. np.savez


def write_whole(path: str | os.PathLike, data: bytes | str | Writer, *, shared: bool = False) -> Path:
    """Write `data` to `path` whole or not at all (str as UTF-8; a callable writes to the open file itself,
    for writers that stream, like np.savez or torch.save). `shared`: other processes may write `path` at the
    same time. Creates the parent directory; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp" if shared else f".{path.name}.tmp")
    try:
        with tmp.open("wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())  # the bytes on disk before the name points at them (a power cut)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """`data` as indented JSON and a final newline, written whole (`write_whole`)."""
    return write_whole(path, json.dumps(data, indent=2) + "\n")


# Locks on a directory itself (a run's, a sweep report's) add no file to it, which filelock.FileLock (a lock
# file, used for the MLflow store) cannot do; hence flock on an open descriptor of the directory.


def _open_for_lock(path: Path) -> int:
    """A descriptor to flock: the directory `path` itself, or the file `path`, created (with its directory)
    when missing."""
    if path.is_dir():
        return os.open(path, os.O_RDONLY)
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)


def try_lock(path: str | os.PathLike) -> int | None:
    """An exclusive flock on `path` (a directory, or a file, created when missing) without waiting: the open
    descriptor, which the caller closes to release the lock (a killed process releases it too), or None when
    another process holds it."""
    fd = _open_for_lock(Path(path))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


@contextlib.contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive flock on `path` (as `try_lock`), waited for and held for the block."""
    fd = _open_for_lock(Path(path))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
