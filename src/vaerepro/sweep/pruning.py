"""Optuna's pruning inside a trial process: a Lightning callback that reports the validation ELBO to the
trial each epoch and stops training when the study's pruner says so.

`vaerepro.cli` adds `trial_callbacks()` to every training; it is the pruning callback only in a sweep trial
(the sweeper's environment names the study, its storage, the trial and the pruner). This module imports
Lightning: the sweep process never imports it, only trial processes (through the command line). Optuna is
imported by the callback's methods alone: a training that is no sweep trial runs without Optuna installed
(a GPU machine that carries only the training's packages).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl

from vaerepro.sweep.study import ENV_PRUNER, ENV_STORAGE, ENV_STUDY, ENV_TRIAL, make_pruner, open_storage


class OptunaPruning(pl.Callback):
    """Reports the validation ELBO to the trial each epoch and stops the trial when the pruner says so.

    Intermediate values are the validation ELBO in nats per example, negated in a minimising study so
    that the pruner compares them in the study's sense. Under DDP rank 0 decides and broadcasts the
    decision, so every rank raises together.
    """

    def __init__(
        self,
        storage: str,
        study_name: str,
        number: int,
        pruner: Mapping[str, Any] | None,
        monitor: str = "val/elbo",
    ):
        self.storage, self.study_name, self.number, self.pruner = storage, study_name, number, pruner
        self.monitor = monitor
        self._trial = None
        self._sign = 1.0

    def setup(self, trainer: pl.Trainer, module: pl.LightningModule, stage: str) -> None:
        if not trainer.is_global_zero or self._trial is not None:
            return
        import optuna

        storage = open_storage(self.storage)
        study = optuna.load_study(
            study_name=self.study_name,
            storage=storage,
            sampler=optuna.samplers.RandomSampler(),  # this process never samples
            pruner=make_pruner(self.pruner),
        )
        study_id = storage.get_study_id_from_name(self.study_name)
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, self.number)
        self._trial = optuna.trial.Trial(study, trial_id)
        self._sign = -1.0 if study.direction.name == "MINIMIZE" else 1.0

    def on_validation_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metric = trainer.callback_metrics.get(self.monitor)  # synced across ranks (sync_dist=True)
        value = float(metric) if metric is not None else math.nan
        prune = False
        if self._trial is not None and math.isfinite(value):  # rank 0
            self._trial.report(self._sign * value, step=trainer.current_epoch)
            prune = self._trial.should_prune()
        if trainer.strategy.broadcast(prune, src=0):
            import optuna

            raise optuna.TrialPruned(
                f"trial {self.number} pruned at epoch {trainer.current_epoch}: "
                f"{self.monitor} = {value:.3f} nats"
            )


def trial_callbacks() -> list:
    """The pruning callback when this process is a sweep trial (the sweeper's environment), else nothing."""
    storage, study, number = (os.environ.get(k) for k in (ENV_STORAGE, ENV_STUDY, ENV_TRIAL))
    if not (storage and study and number):
        return []
    pruner = json.loads(os.environ.get(ENV_PRUNER) or '{"name": "none"}')
    return [OptunaPruning(storage, study, int(number), pruner)]
