"""The `vaerepro_optuna` Hydra sweeper: Hydra's side of a sweep (config, composition).

The rest is the package vaerepro.sweep (its runner.py runs the study), imported when a sweep starts.

`vaerepro run --multirun +sweep=aevb hydra.sweeper.n_trials=7` composes the config, then calls `sweep` with
the command line's task overrides. Light at import time: Hydra imports this module in every `vaerepro run`.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from .config import VaereproOptunaSweeperConf  # noqa: F401  (registers the configs in the ConfigStore)

log = logging.getLogger(__name__)


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value


class VaereproOptunaSweeper(Sweeper):
    def __init__(
        self,
        sampler: Any,
        pruner: Any,
        objective: str,
        direction: str | None,
        storage: str | None,
        study_name: str,
        n_trials: int,
        n_jobs: int,
        max_failure_rate: float,
        multivariate: bool,
        constant_liar: bool,
        params: Any,
        report: bool,
        trial_timeout: float | None = None,
    ) -> None:
        self.options = {
            "sampler": _plain(sampler) or {"name": "tpe"},
            "pruner": _plain(pruner) or {"name": "none"},
            "objective": objective,
            "direction": direction,
            "storage": storage,
            "study_name": study_name,
            "n_trials": int(n_trials),
            "n_jobs": int(n_jobs),
            "max_failure_rate": float(max_failure_rate),
            "multivariate": bool(multivariate),
            "constant_liar": bool(constant_liar),
            "report": bool(report),
            "trial_timeout": None if trial_timeout is None else float(trial_timeout),
        }
        self.params = _plain(params) or {}
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        # No launcher: each trial is its own process (see vaerepro.sweep.trial), not a task_function call.
        self.hydra_context, self.config = hydra_context, config

    def _compose(self, overrides: list[str]) -> dict:
        """The job config a trial with these overrides would run (the task part, resolved)."""
        cfg = self.hydra_context.config_loader.load_sweep_config(
            master_config=self.config, sweep_overrides=list(overrides)
        )
        return {
            k: OmegaConf.to_container(v, resolve=True) if isinstance(v, DictConfig) else v
            for k, v in cfg.items()
            if k != "hydra"
        }

    def _tracking(self, root: Path):
        from vaerepro.config import TrackingConfig
        from vaerepro.tracking.sweep import Tracking

        section = OmegaConf.to_container(self.config.get("tracking") or {}, resolve=True)
        return Tracking.from_config(TrackingConfig(**section), root)

    def sweep(self, arguments: list[str]) -> Any:
        from vaerepro.errors import UserError
        from vaerepro.sweep.runner import TooManyFailures

        try:
            return self._sweep(arguments)
        except UserError as err:
            # a mistake in the sweep's input: one line and exit status 2, as `vaerepro` reports any UserError
            # (Hydra would add a hint and exit 1); --debug (VAEREPRO_DEBUG=1) shows the traceback instead
            if os.environ.get("VAEREPRO_DEBUG") == "1":
                raise
            print(f"vaerepro run: vaerepro_optuna: {' '.join(str(err).split())}", file=sys.stderr)
            raise SystemExit(2) from None
        except TooManyFailures as err:
            # the sweep ran and its trials failed: exit status 1 and the reason alone (Hydra would add its
            # HYDRA_FULL_ERROR hint, and with that variable set a traceback; neither says more)
            if os.environ.get("VAEREPRO_DEBUG") == "1":
                raise
            # the reason ends with the failed trial's log tail, which the sweep logged with that failure
            first, _, tail = str(err).partition("\n")
            shown = f"{first.removesuffix(':')} (its last lines are logged above)" if tail else first
            print(f"vaerepro run: vaerepro_optuna: {shown}", file=sys.stderr)
            raise SystemExit(1) from None

    def _sweep(self, arguments: list[str]) -> Any:
        from vaerepro import config as config_mod
        from vaerepro import sweep
        from vaerepro.sweep.runner import Sweep, SweepSettings

        o = self.options
        sweep.check_sampler_and_pruner(o["sampler"], o["pruner"])
        if o["n_trials"] < 1 or o["n_jobs"] < 1:
            raise config_mod.ConfigError("hydra.sweeper.n_trials and n_jobs must be at least 1")
        root = config_mod.find_project_root()
        space = sweep.parse_search_space(self.params, arguments)
        if not space.distributions:
            raise config_mod.ConfigError(
                "nothing to sweep: give hydra.sweeper.params (e.g. +sweep=aevb) or key=choice(...) overrides"
            )
        direction = sweep.resolve_direction(o["objective"], o["direction"])
        sweep.refuse_swept_measurement(space)  # the data set, its splits or K: not one measurement
        configs = sweep.trial_configs(space, self._compose)
        spaces = sweep.spaces_of(configs)
        sweep.refuse_mixed_spaces(o["objective"], o["pruner"].get("name", "none"), spaces)
        sweep.refuse_unlabelled(o["objective"], configs)  # knn_accuracy on data without labels
        settings = SweepSettings(
            study_name=o["study_name"],
            storage=sweep.resolve_storage(o["storage"], o["study_name"], root),
            objective=o["objective"],
            direction=direction,
            n_trials=o["n_trials"],
            n_jobs=o["n_jobs"],
            max_failure_rate=o["max_failure_rate"],
            sampler=o["sampler"],
            pruner=o["pruner"],
            multivariate=o["multivariate"],
            constant_liar=o["constant_liar"],
            report=o["report"],
            trial_timeout=o["trial_timeout"],
            data_spaces=list(spaces),
            # the fixed data set, splits and K: a resume measuring otherwise is refused (study.check_study)
            measurement=sweep.measurement_settings(configs),
        )
        sweep_dir = Path(self.config.hydra.sweep.dir)
        runner = Sweep(settings, space, sweep_dir=sweep_dir, root=root, tracking=self._tracking(root))
        # another study's files in the sweep dir, a study of another data space, measurement or choices, a
        # storage that is no Optuna storage: refused before any write
        runner.preflight()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        return runner.run()
