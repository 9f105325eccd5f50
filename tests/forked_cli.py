"""`vaerepro` commands as fresh processes forked from one that has imported vaerepro.cli (and torch) once.

A `vaerepro` process spends ~3 s importing torch before its command line is read; a test that runs many
short commands (test_faults.py: ~50 bad inputs, each refused within a second of its start) starts each as
a child of `ForkedCli`'s server instead. The child is a process of its own: its own working directory,
environment, argv, stdout and stderr files, signal handlers and logging set-up (the server configures
neither), and its exit status is what the console script's `sys.exit(main())` would give, an uncaught
exception printing its traceback and giving 1 as Python does. The console script's own start (its import
of vaerepro.cli) is what every other test that runs `vaerepro` starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

# The server: one request a line on stdin ({"args", "cwd", "env", "stdout", "stderr", "timeout"}), one
# answer a line on stdout ({"returncode"}: the child's exit status, or null when it ran past its timeout
# and was killed).
SERVER = r"""
import json, os, signal, sys, time, traceback

from vaerepro import cli

def child(req):
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    sys.stdout = open(1, "w", closefd=False)
    sys.stderr = open(2, "w", closefd=False)
    sys.argv = [req["argv0"], *req["args"]]
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


class ForkedCli:
    """`run(args, cwd, env)`: a CompletedProcess of `vaerepro ARGS` in a child forked from the server."""

    def __init__(self, argv0: Path, scratch: Path):
        self.argv0, self.scratch, self.count = str(argv0), scratch, 0
        self.server = subprocess.Popen(
            [sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def run(self, args: list[str], cwd: Path, env: dict[str, str], timeout: int = 300):
        self.count += 1
        out, err = (self.scratch / f"{self.count}.{name}" for name in ("out", "err"))
        req = {"args": args, "cwd": str(cwd), "env": env, "argv0": self.argv0, "timeout": timeout}
        self.server.stdin.write(json.dumps({**req, "stdout": str(out), "stderr": str(err)}) + "\n")
        self.server.stdin.flush()
        answer = self.server.stdout.readline()
        assert answer, f"the fork server ended ({self.server.poll()})"
        code = json.loads(answer)["returncode"]
        if code is None:
            raise subprocess.TimeoutExpired(["vaerepro", *args], timeout)
        return subprocess.CompletedProcess(["vaerepro", *args], code, out.read_text(), err.read_text())

    def close(self) -> None:
        self.server.stdin.close()
        self.server.wait(timeout=60)
