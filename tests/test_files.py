"""Result files written whole: a failure or a kill while a file is written leaves the earlier file."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import copy_prepared, tiny_config
from vaerepro.files import locked, try_lock, write_json, write_whole


def test_bytes_text_json_and_streamed_writes_land_whole(tmp_path):
    assert write_whole(tmp_path / "a" / "b.bin", b"\x00\xff") == tmp_path / "a" / "b.bin"  # parents made
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"\x00\xff"
    write_whole(tmp_path / "t.txt", "π nats\n")
    assert (tmp_path / "t.txt").read_bytes() == "π nats\n".encode()  # UTF-8 on every platform
    write_json(tmp_path / "m.json", {"log_px": -93.5, "k": [1, 10]})
    assert (tmp_path / "m.json").read_text() == '{\n  "log_px": -93.5,\n  "k": [\n    1,\n    10\n  ]\n}\n'
    write_whole(tmp_path / "x.npz", lambda fh: np.savez(fh, x=np.arange(3)))
    assert np.load(tmp_path / "x.npz")["x"].tolist() == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "m.json", "t.txt", "x.npz"]  # no sibling left


def test_a_write_that_fails_part_way_leaves_the_earlier_file_and_no_sibling(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text('{"log_px": -90.0}\n')

    def disk_full(fh):
        fh.write(b'{"log_px": -8')
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_whole(path, disk_full)
    assert path.read_text() == '{"log_px": -90.0}\n'
    with pytest.raises(TypeError):  # a value JSON cannot hold: nothing is opened
        write_json(path, {"log_px": object()})
    assert path.read_text() == '{"log_px": -90.0}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]


def test_a_process_killed_mid_write_leaves_the_earlier_file(tmp_path):
    """kill -9 while the new bytes are half out: the old file reads as it was; the next write goes through."""
    path = tmp_path / "elbo.csv"
    path.write_text("epoch,train_elbo,val_elbo\n0,-120.0,-121.0\n")
    code = (
        "import sys, time\n"
        "from vaerepro.files import write_whole\n"
        "def slow(fh):\n"
        "    fh.write(b'epoch,train_elbo,val_elbo\\n0,-1'); fh.flush()\n"
        "    time.sleep(120)\n"
        "write_whole(sys.argv[1], slow)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)])
    sibling = tmp_path / ".elbo.csv.tmp"
    try:
        deadline = time.monotonic() + 60
        while not (sibling.is_file() and sibling.stat().st_size > 0):
            assert proc.poll() is None and time.monotonic() < deadline, "the writer never started writing"
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert path.read_text() == "epoch,train_elbo,val_elbo\n0,-120.0,-121.0\n"
    assert sibling.read_bytes() == b"epoch,train_elbo,val_elbo\n0,-1"  # what the kill left, beside it
    write_whole(path, "epoch,train_elbo,val_elbo\n0,-119.0,-120.0\n")  # replaces the leftover sibling
    assert path.read_text() == "epoch,train_elbo,val_elbo\n0,-119.0,-120.0\n"
    assert [p.name for p in tmp_path.iterdir()] == ["elbo.csv"]


def test_shared_writers_each_fill_a_sibling_of_their_own(tmp_path):
    path, seen = tmp_path / "report.html", []
    write_whole(path, lambda fh: seen.append(sorted(p.name for p in tmp_path.iterdir())), shared=True)
    assert seen == [[f".report.html.{os.getpid()}.tmp"]]
    write_whole(path, lambda fh: seen.append(sorted(p.name for p in tmp_path.iterdir())))
    assert seen[1] == [".report.html.tmp", "report.html"]


@pytest.mark.slow
def test_an_evaluation_that_fails_while_writing_leaves_the_earlier_ones_files(
    tmp_path, prepared_tiny, monkeypatch
):
    """The disk fills while evaluate writes its per-example arrays: every file of the earlier evaluation,
    numbers and arrays, is still whole and unchanged (they were written in place, and the first one was cut
    short). When it fills after the arrays and before the numbers, the report refuses the new arrays beside
    the earlier numbers."""
    from vaerepro import evaluate as evaluate_mod
    from vaerepro.evaluate import evaluate
    from vaerepro.report import ResultFileError, load_results
    from vaerepro.sources import file_sha256
    from vaerepro.train import train

    cfg = tiny_config("train.max_epochs=1")
    out = copy_prepared(prepared_tiny, tmp_path / "run")
    train(cfg, out, enable_progress_bar=False)
    evaluate(cfg, out, progress=False)
    files = [out / "artifacts" / "per_example.npz", out / "artifacts" / "samples.npz"]
    files += [out / "metrics" / "eval.json", out / "metrics" / "eval_summary.json"]
    before = {p: p.read_bytes() for p in files}
    ev = json.loads(before[files[2]])
    assert ev["num_samples"] == 50
    assert ev["artifacts_sha256"] == {p.name: file_sha256(p) for p in files[:2]}
    load_results(out)  # the evaluation's files are of one run

    def savez_on_a_full_disk(file, **arrays):
        fh = open(file, "wb") if isinstance(file, (str, os.PathLike)) else file  # noqa: SIM115
        fh.write(b"PK\x03\x04 the first bytes of a zip")
        fh.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", savez_on_a_full_disk)
    with pytest.raises(OSError, match="No space left"):
        evaluate(tiny_config("train.max_epochs=1", "eval.num_samples=20"), out, progress=False)
    assert {p: p.read_bytes() for p in files} == before
    assert not [p for p in out.rglob(".*.tmp")]
    load_results(out)

    monkeypatch.undo()

    def numbers_on_a_full_disk(path, data):
        raise OSError(errno.ENOSPC, f"{path}: No space left on device")

    monkeypatch.setattr(evaluate_mod, "write_json", numbers_on_a_full_disk)
    with pytest.raises(OSError, match="eval.json: No space left"):
        evaluate(tiny_config("train.max_epochs=1", "eval.num_samples=20"), out, progress=False)
    assert files[0].read_bytes() != before[files[0]] and files[2].read_bytes() == before[files[2]]
    with pytest.raises(ResultFileError, match=r"per_example.npz: not the file .*eval.json was written with"):
        load_results(out)


@pytest.mark.parametrize("kind", ["directory", "lock file"])
def test_locked_waits_for_the_holder_and_try_lock_does_not(tmp_path, kind):
    """flock on a directory itself (a run's, a sweep report's) or on a lock file created with its directory:
    `try_lock` answers None at once while another holds it, `locked` waits until the holder lets go."""
    import threading

    path = tmp_path / "report" if kind == "directory" else tmp_path / "sweep" / "study.lock"
    if kind == "directory":
        path.mkdir()
    held = try_lock(path)
    assert held is not None and try_lock(path) is None
    entered = threading.Event()

    def waiter():
        with locked(path):
            entered.set()

    t = threading.Thread(target=waiter)
    t.start()
    assert not entered.wait(0.5)  # still held
    os.close(held)
    assert entered.wait(10)
    t.join()
    assert (fd := try_lock(path)) is not None  # and released after the block
    os.close(fd)
    assert sorted(p.name for p in tmp_path.rglob("*")) == (
        ["report"] if kind == "directory" else ["study.lock", "sweep"]
    )
