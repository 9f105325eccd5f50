"""A sweep trial's process: `python -m vaerepro.sweep <overrides> hydra.run.dir=<trial dir>`.

It is `vaerepro run` plus one thing: a trial stopped by the pruner exits with PRUNED_EXIT_CODE, which the
sweep process reads as PRUNED. Trials share no Python state with the sweep or each other, and Lightning's
DDP re-launches this module for its other ranks as for any script.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from vaerepro import cli
from vaerepro.sweep.study import PRUNED_EXIT_CODE


def run_trial(argv: Sequence[str]) -> int:
    """`vaerepro run argv...`, exiting with PRUNED_EXIT_CODE when the pruner stopped the trial."""
    import optuna

    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # Hydra would turn every exception into exit code 1
    try:
        return cli.main(["run", *argv])
    except optuna.TrialPruned as err:
        print(f"vaerepro: {err}", file=sys.stderr)
        return PRUNED_EXIT_CODE
