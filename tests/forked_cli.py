"""`vaerepro` commands as fresh processes forked from one that has imported vaerepro.cli (and torch) once.

A `vaerepro` process spends ~3 s importing torch before its command line is read, and a training one ~7 s
more importing Lightning, MLflow and Hydra. A test that runs many such commands starts each as a child of
`ForkedCli`'s server instead: test_faults.py's ~50 bad inputs (each refused within a second of its start)
and its project's stages, test_cli.py's runs and refused resumes, and the smoke reproductions' seeds
(conftest.forked). The child is a process of its own: its own working directory, environment, argv, stdout
and stderr files, signal handlers and logging set-up (the server sets neither), and its exit status is what
`sys.exit(main())` would give, an uncaught exception printing its traceback and giving 1 as Python does.
The console script's own start (its imports) is what every other test that runs `vaerepro` starts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from vaerepro import cli

CLI_FILE = cli.__file__

# The server: it imports the modules named in its argv, then reads one request a line on stdin ({"args",
# "argv", "cwd", "env", "stdout", "stderr", "timeout", "sigint_ignored"}) and answers with two lines on
# stdout: {"pid"} of the child it forked, then {"returncode"}: the child's exit status (negative: the
# signal that ended it), or null when it ran past its timeout and was killed.
SERVER = r"""
import importlib, json, os, signal, sys, time, traceback

from vaerepro import cli

for name in sys.argv[1:]:
    importlib.import_module(name)

def child(req):
    if req["sigint_ignored"]:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    err = os.open(req["stderr"], flags, 0o644)
    out = err if req["stdout"] == req["stderr"] else os.open(req["stdout"], flags, 0o644)
    os.dup2(out, 1)
    os.dup2(err, 2)
    sys.stdout = open(1, "w", closefd=False)
    sys.stderr = open(2, "w", closefd=False)
    sys.argv = req["argv"]
    try:
        code = cli.main(req["args"])
    except SystemExit as exc:
        code = exc.code
        if code is not None and not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)

for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        try:
            child(req)
        finally:
            os._exit(1)
    print(json.dumps({"pid": pid}), flush=True)
    end = time.monotonic() + req["timeout"]
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            answer = os.waitstatus_to_exitcode(status)
            break
        if time.monotonic() > end:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            answer = None
            break
        time.sleep(0.02)
    print(json.dumps({"returncode": answer}), flush=True)
"""


class ForkedProcess:
    """The child of one request: what reproduce._run_seed uses of a Popen (wait, terminate, kill)."""

    def __init__(self, server: ForkedCli, cmd: list[str], pid: int):
        self.server, self.args, self.pid, self.returncode = server, cmd, pid, None

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            end = None if timeout is None else time.monotonic() + timeout
            while end is not None and self.server.alive(self.pid):
                if time.monotonic() > end:
                    raise subprocess.TimeoutExpired(self.args, timeout)
                time.sleep(0.05)
            code = self.server.answer()["returncode"]
            if code is None:
                raise subprocess.TimeoutExpired(self.args, self.server.timeout)
            self.returncode = code
        return self.returncode

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def send_signal(self, sig: int) -> None:
        if self.returncode is None and self.server.alive(self.pid):
            os.kill(self.pid, sig)


class ForkedCli:
    """`run(args, cwd, env)`: a CompletedProcess of `vaerepro ARGS` in a child forked from the server, which
    has imported vaerepro.cli and the modules `preload` names."""

    def __init__(self, argv0: Path, scratch: Path, preload: Sequence[str] = (), timeout: int = 300):
        self.argv0, self.scratch, self.timeout, self.count = str(argv0), scratch, timeout, 0
        self.logs: list[Path] = []  # popen_module's, one a child
        self.server = subprocess.Popen(
            [sys.executable, "-c", SERVER, *preload], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def answer(self) -> dict:
        line = self.server.stdout.readline()
        assert line, f"the fork server ended ({self.server.poll()})"
        return json.loads(line)

    def alive(self, pid: int) -> bool:
        """Whether the server has not yet reaped its child `pid` (a child that has ended is a zombie until
        then, and a zombie still takes signals without effect)."""
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"

    def start(
        self, cmd: list[str], argv: list[str], cwd: Path, env: dict[str, str], out: Path, err: Path
    ) -> ForkedProcess:
        """`cli.main(argv[1:])` with sys.argv = argv in a new child."""
        sigint_ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        req = {"args": argv[1:], "argv": argv, "cwd": str(cwd), "env": env, "timeout": self.timeout}
        req |= {"stdout": str(out), "stderr": str(err), "sigint_ignored": sigint_ignored}
        self.server.stdin.write(json.dumps(req) + "\n")
        self.server.stdin.flush()
        return ForkedProcess(self, cmd, self.answer()["pid"])

    def _files(self) -> tuple[Path, Path]:
        self.count += 1
        return tuple(self.scratch / f"{self.count}.{name}" for name in ("out", "err"))

    def run(self, args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
        out, err = self._files()
        code = self.start(["vaerepro", *args], [self.argv0, *args], cwd, env, out, err).wait()
        return subprocess.CompletedProcess(["vaerepro", *args], code, out.read_text(), err.read_text())

    def popen_module(self, cmd: list[str], *, cwd, env, **_) -> ForkedProcess:
        """In place of subprocess.Popen([sys.executable, "-m", "vaerepro.cli", *args], cwd=, env=, ...), as
        reproduce._run_seed starts a seed (SIGINT ignored there: its caller ignores it around the start).
        The child's stdout and stderr go to one file of the scratch directory; the reproduction's lock
        (pass_fds) stays with this process, which holds it while it waits."""
        assert cmd[:3] == [sys.executable, "-m", "vaerepro.cli"], cmd
        log, _ = self._files()
        # sys.argv as `python -m` sets it: the module's file, then its arguments
        proc = self.start(cmd, [CLI_FILE, *cmd[3:]], Path(cwd), dict(env), log, log)
        self.logs.append(log)
        return proc

    def close(self) -> None:
        self.server.stdin.close()
        self.server.wait(timeout=60)
