"""`python -m vaerepro.sweep`: the sweep package's command line.

python -m vaerepro.sweep OVERRIDES...        one trial (what the sweeper runs; trial.py)
python -m vaerepro.sweep report STUDY [...]  the sweep report of a study, from its storage and MLflow runs
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from vaerepro import config as config_mod
from vaerepro import quick_exit, signals
from vaerepro.errors import UserError
from vaerepro.sweep.study import NoStorage, load_existing, resolve_storage, trial_run_ids
from vaerepro.sweep.trial import run_trial
from vaerepro.tracking import sweep as tracking_sweep


def _report_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m vaerepro.sweep report", description="write the sweep report of a study"
    )
    p.add_argument("study_name")
    p.add_argument("--storage", default=None, help="journal file or RDB URL (default: optuna/<study>.log)")
    p.add_argument("--out", default=None, help="directory (default: runs/sweeps/<study>/report)")
    args = p.parse_args(argv)
    root = config_mod.find_project_root()
    spec = resolve_storage(args.storage, args.study_name, root)
    try:  # reads only: a storage that is not there is not created
        study = load_existing(spec, args.study_name)
    except NoStorage:
        raise NoStorage(
            f"no study {args.study_name!r}: {spec} does not exist (a sweep keeps its study in "
            "hydra.sweeper.storage, by default optuna/<study_name>.log; give another with --storage)"
        ) from None
    cfg = config_mod.validate(config_mod.compose())
    runs = None
    if cfg.tracking.enabled:
        t = tracking_sweep.Tracking.from_config(cfg.tracking, root)
        runs = tracking_sweep.study_runs(t, trial_run_ids(study))
    out = Path(args.out) if args.out else root / "runs" / "sweeps" / args.study_name / "report"
    from vaerepro.sweep.report import write_sweep_report

    print(write_sweep_report(study, out, runs=runs, storage=spec)["html"])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """python -m vaerepro.sweep OVERRIDES...      one trial (what the sweeper runs)
    python -m vaerepro.sweep report STUDY [...]   the sweep report of a study"""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        try:
            return _report_main(argv[1:])
        except UserError as err:
            # a mistake in what was given (the storage, the study's name): one line and exit status 2, as
            # `vaerepro` reports it; VAEREPRO_DEBUG=1 shows the traceback instead
            if os.environ.get("VAEREPRO_DEBUG") == "1":
                raise
            print(f"python -m vaerepro.sweep report: {' '.join(str(err).split())}", file=sys.stderr)
            return 2
    return run_trial(argv)


if __name__ == "__main__":
    signals.stop_with_parent()  # a trial (and each of its DDP ranks) stops when the sweep process ends
    quick_exit.exit_after(main)  # a trial's process leaves without CPython's teardown (vaerepro.quick_exit)
