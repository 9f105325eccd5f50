"""What a finished trial process amounts to: its Optuna state (COMPLETE, PRUNED, FAIL), its objective's
value, the reason of a failure, and facts about its configuration for the sweep report.

The trial process tells it by its exit code (PRUNED_EXIT_CODE: pruned) and <trial dir>/metrics/eval.json
(the objective); a failure's reason ends with the end of <trial dir>/trial.log.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

from vaerepro.compare import converged, impossible
from vaerepro.config import ConfigError
from vaerepro.sweep.study import PRUNED_EXIT_CODE

LOG_TAIL_LINES = 25  # of trial.log, in a failure's reason


def _log_tail(path: Path, n: int = LOG_TAIL_LINES) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def trial_facts(trial_dir: Path) -> dict[str, Any]:
    """likelihood, data_space, improper, latent_dim from the trial's params.yaml; {} when it has none.
    (trial_outcome adds `converged`, the verdict of the trial's log p(x) estimate, from its eval.json.)"""
    from vaerepro import config as config_mod

    with contextlib.suppress(ConfigError, OSError):
        cfg = config_mod.load(trial_dir / "params.yaml")
        return {
            "likelihood": cfg.likelihood.name,
            "data_space": cfg.data_space,
            "improper": cfg.improper,
            "latent_dim": cfg.model.latent_dim,
        }
    return {}


def trial_outcome(
    trial_dir: Path, rc: int, objective: str, *, timeout: float | None = None
) -> tuple[str, float | None, str, dict[str, Any]]:
    """(state, value, reason, facts) of a trial process that exited with `rc`.

    `timeout`: the trial_timeout (seconds) when the sweep stopped the trial for running past it, else None.
    """
    facts = trial_facts(trial_dir)
    trial_log = trial_dir / "trial.log"
    if timeout is not None:
        return (
            "FAIL",
            None,
            f"still running after trial_timeout={timeout:g} s, stopped; {trial_log}:\n{_log_tail(trial_log)}",
            facts,
        )
    if rc == PRUNED_EXIT_CODE:
        return "PRUNED", None, "", facts
    if rc != 0:
        return "FAIL", None, f"exit code {rc}; {trial_log}:\n{_log_tail(trial_log)}", facts
    path = trial_dir / "metrics" / "eval.json"
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return "FAIL", None, f"exit code 0 but no readable {path}: {err}", facts
    if not isinstance(metrics, dict):  # a damaged file: a FAIL of this trial, not an error of the sweep
        return "FAIL", None, f"exit code 0 but {path} is not a JSON object", facts
    if (problem := impossible(metrics, strict=True)) is not None:  # numbers no evaluation writes
        return "FAIL", None, f"exit code 0 but {path}: {problem}", facts
    if (verdict := converged(metrics)) is not None:
        # kept with the trial: study.best_trial skips an unconverged log p(x) estimate
        facts["converged"] = verdict
    value = metrics.get(objective)
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "FAIL", None, f"{objective} in {path} is {value!r}, not a number", facts
    if not math.isfinite(value):
        return "FAIL", None, f"{objective} in {path} is {value}", facts
    return "COMPLETE", value, "", facts
