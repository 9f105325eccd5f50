"""What the command line reports as one line instead of a traceback.

`UserError`: a mistake in what the user gave (a config key, a file, a store, a checkpoint), or settings
that made training diverge (`Diverged`). Its message is one line that names the key or file and the
problem; `vaerepro` prints it and exits with status 2.
`Stopped`: a signal (SIGTERM from a scheduler or `kill`, SIGINT from `dvc queue kill`) asked the command
to stop; it exits with 128 + the signal's number (143 for SIGTERM), as a shell reports a process the
signal ended.
"""

from __future__ import annotations

import signal


class UserError(Exception):
    """A mistake in the user's input; the message names the key or file and the problem."""


class Diverged(UserError, FloatingPointError):
    """A training whose objective or validation ELBO became non-finite (or whose every step-size pilot did):
    the settings do not train this model on these data (too high a rate, an unfloored learned variance).
    The message names the epoch and the keys to change; what the training saved before is left as it was.
    A FloatingPointError too, as the arithmetic error it reports."""


class Stopped(BaseException):
    """A signal asked the command to stop. A BaseException, like KeyboardInterrupt, so that no
    `except Exception` on the way up mistakes it for a failure to handle."""

    def __init__(self, signum: int, detail: str = ""):
        self.signum, self.detail = signum, detail
        super().__init__(f"stopped by {signal.Signals(signum).name}" + (f": {detail}" if detail else ""))

    @property
    def exit_status(self) -> int:
        return 128 + self.signum
