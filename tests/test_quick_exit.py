"""vaerepro.quick_exit: a command that returned leaves without CPython's teardown, and loses nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_an_armed_exit_keeps_its_status_output_logs_and_later_atexit_handlers(tmp_path):
    """Armed, the process ends with the status given, after every atexit handler registered after the
    package's import (a library's clean-up, here one that writes a file) and with stdout (a pipe, so
    block-buffered), stderr and a logging file handler flushed."""
    proc = _python(
        """
        import atexit, logging, sys
        from pathlib import Path

        from vaerepro import quick_exit

        atexit.register(lambda: Path("handler-ran").write_text("yes"))  # a library's, registered later
        log = logging.getLogger("t")
        log.addHandler(logging.FileHandler("run.log"))
        log.warning("last line of the log")
        sys.stdout.write("x" * 100_000 + "\\nend of stdout\\n")
        sys.stderr.write("end of stderr\\n")
        quick_exit.arm(3)
        sys.exit(3)
        """,
        tmp_path,
    )
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.endswith("x" * 100_000 + "\nend of stdout\n")
    assert proc.stderr == "end of stderr\n"
    assert (tmp_path / "handler-ran").read_text() == "yes"
    assert (tmp_path / "run.log").read_text() == "last line of the log\n"


def test_a_sigterm_once_the_command_has_finished_leaves_with_its_status(tmp_path):
    """torchrun sends SIGTERM to the other ranks once one has ended: a rank that had finished too, and was
    running atexit handlers, printed vaerepro.signals' Stopped as 'Exception ignored in atexit callback'
    with its traceback. Armed, the process leaves at once with the command's status, quietly."""
    proc = _python(
        """
        import atexit, os, signal, sys

        from vaerepro import quick_exit, signals

        signals.install()
        atexit.register(lambda: os.kill(os.getpid(), signal.SIGTERM))  # arrives while the handlers run
        quick_exit.arm(2)
        sys.exit(2)
        """,
        tmp_path,
    )
    assert (proc.returncode, proc.stderr) == (2, "")


def test_unarmed_the_process_exits_as_python_does(tmp_path):
    """An exception that leaves the command: its traceback and exit status 1, as without the package."""
    proc = _python(
        """
        import vaerepro

        raise RuntimeError("a bug")
        """,
        tmp_path,
    )
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and proc.stderr.rstrip().endswith("RuntimeError: a bug")


@pytest.mark.slow
def test_the_vaerepro_command_exits_with_mains_status(tmp_path):
    """The installed command arms the exit with main's status: 2 for a refused input, its line intact."""
    out = tmp_path / "params.yaml"
    proc = subprocess.run(
        [sys.executable, "-m", "vaerepro.cli", "params", "--output", str(out), "model.latent_dim=0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("vaerepro params: model.latent_dim: "), proc.stderr
    assert not out.exists()


def test_a_ctrl_c_during_the_commands_imports_is_one_line_and_exit_130(tmp_path):
    """Ctrl-C in the first seconds of a command, while it imports torch and Lightning, was Python's
    KeyboardInterrupt traceback through torch's modules."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(
        textwrap.dedent(
            """
            import sys

            class CtrlCDuringImport:  # the Ctrl-C lands while torch is being imported
                def find_spec(self, name, path=None, target=None):
                    if name == "torch":
                        raise KeyboardInterrupt
                    return None

            sys.meta_path.insert(0, CtrlCDuringImport())
            """
        )
    )
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "vaerepro"), "params"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path / "site")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (proc.returncode, proc.stderr) == (130, "vaerepro: stopped (Ctrl-C)\n")


def test_a_command_that_leaves_by_system_exit_skips_the_teardown_too(tmp_path):
    """`vaerepro --help` (argparse's SystemExit) paid the whole teardown that a returning command skips. A
    finalizer that only the teardown runs shows whether it ran: it writes to stderr. Plain sys.exit runs it;
    exit_after does not, and keeps the status and the output of each kind of exit."""
    torn = textwrap.dedent(
        """
        import sys
        from vaerepro import quick_exit

        class Torn:
            def __del__(self):
                sys.stderr.write("torn down\\n")

        kept = Torn()

        def main():
            print("usage: vaerepro ...")
            sys.exit({code})
        """
    )
    proc = _python(torn.format(code=0) + "main()\n", tmp_path)
    assert (proc.returncode, proc.stderr) == (0, "torn down\n")  # what the test can see: the teardown
    for code, status, err in [("0", 0, ""), ("None", 0, ""), ("2", 2, ""), ("'bad usage'", 1, "bad usage\n")]:
        proc = _python(torn.format(code=code) + "quick_exit.exit_after(main)\n", tmp_path)
        assert (proc.returncode, proc.stdout, proc.stderr) == (status, "usage: vaerepro ...\n", err), code
