"""The `vaerepro` command (the console script, and `python -m vaerepro`): vaerepro.cli's main.

vaerepro.cli is imported in `main`, where a Ctrl-C during its imports (torch, Lightning: about 2 s) is one
line and exit status 130, as it is later on, rather than Python's traceback through torch's modules. The
command stops when the process that started it ends: a stage, its dvc process; a sweep's trial or a
reproduction's seed, its vaerepro process (signals.stop_with_parent).
"""

from __future__ import annotations

import sys

from vaerepro import quick_exit, signals


def main() -> None:
    signals.stop_with_parent()
    try:
        from vaerepro.cli import main as cli_main
    except KeyboardInterrupt:
        print("vaerepro: stopped (Ctrl-C)", file=sys.stderr)
        quick_exit.exit_with(130)  # without the teardown of half-imported modules either
    quick_exit.exit_after(cli_main)  # once main has returned, no teardown of the modules (quick_exit)


if __name__ == "__main__":
    main()
