"""A sweep's MLflow runs: the study's run (the parent) and its trials' runs (its children).

The study's run is created by the first sweep process of a study and reopened by the next (vaerepro.sweep
keeps its id in the study). A trial's run is made by training in the trial process (tracking.training,
tagged as the study's child by runs.run_tags from the sweeper's environment); here it is found and marked
with the trial's state, or made when the trial failed before training could make one.

MLflow is imported inside the functions: the sweep process imports this module at start-up.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vaerepro.config import TrackingConfig
from vaerepro.tracking.evaluations import experiment_runs
from vaerepro.tracking.names import metric_name, space_name
from vaerepro.tracking.runs import FAILURE_TAG, NOTE_TAG
from vaerepro.tracking.store import ensure_experiment, tracking_uri

MAX_PARAM_CHARS = 6000  # MLflow refuses a longer param value (a long search-space distribution)
MAX_TAG_CHARS = 5000  # the end of a failure's reason kept in a run's vaerepro.failure tag


@dataclass(frozen=True)
class Tracking:
    """Where the trials' MLflow runs go (the same rule as tracking.tracking_uri), or nowhere."""

    uri: str | None
    experiment: str = "vaerepro"

    @property
    def enabled(self) -> bool:
        return self.uri is not None

    @classmethod
    def from_config(cls, tcfg: TrackingConfig, root: Path) -> Tracking:
        """The store a sweep under this tracking section writes to; nowhere when tracking is disabled."""
        if not tcfg.enabled:
            return cls(None)
        return cls(tracking_uri(tcfg, root), tcfg.experiment)

    def config(self) -> TrackingConfig:
        return TrackingConfig(uri=self.uri, experiment=self.experiment)


def client(t: Tracking):
    from mlflow import MlflowClient

    return MlflowClient(t.uri)


def experiment_id(t: Tracking, root: Path) -> str:
    """The experiment's id, the experiment (and the store) created if need be (tracking.ensure_experiment)."""
    return ensure_experiment(t.config(), root)[1]


def open_study_run(
    t: Tracking,
    exp_id: str,
    run_id: str | None,
    *,
    study_name: str,
    objective: str,
    storage: str,
    params: Mapping[str, str],
) -> str:
    """The study's run: `run_id` set RUNNING again while it is an active run of the store (the reason an
    earlier sweep process gave for stopping, FAILURE_TAG, removed: it no longer ends there), else a new run
    with the study's tags and `params` (sampler, pruner, search space ...). Returns its id."""
    from mlflow.exceptions import MlflowException

    c = client(t)
    run = None
    if run_id:
        with contextlib.suppress(MlflowException):
            run = c.get_run(run_id)
    if run is not None and run.info.lifecycle_stage == "active":
        c.update_run(run_id, status="RUNNING")
        if FAILURE_TAG in run.data.tags:
            c.delete_tag(run_id, FAILURE_TAG)
        return run_id
    run = c.create_run(
        exp_id,
        run_name=f"sweep-{study_name}",
        tags={
            "vaerepro.study": study_name,
            "vaerepro.role": "study",
            "vaerepro.objective": objective,
            "optuna.storage": storage,
            NOTE_TAG: f"Optuna study {study_name!r}: one child run per trial.",
        },
    )
    for k, v in params.items():
        c.log_param(run.info.run_id, k, v[:MAX_PARAM_CHARS])
    return run.info.run_id


def _trial_run(c, exp_id: str, parent_id: str, study: str, number: int):
    """The run of trial `number` of the study under this parent run, or None."""
    runs = c.search_runs(
        [exp_id],
        filter_string=(
            f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`vaerepro.study` = '{study}' "
            f"and tags.`vaerepro.trial` = '{number}'"
        ),
        max_results=10,
    )
    return runs[0] if runs else None


def mark_trial_run(
    t: Tracking,
    exp_id: str,
    parent_id: str,
    *,
    study_name: str,
    objective: str,
    number: int,
    state: str,
    reason: str,
    params: Mapping[str, str],
    started: bool = True,
    status: str | None = None,
) -> str | None:
    """Mark the trial's run with its Optuna state (COMPLETE, PRUNED -> KILLED, FAIL -> FAILED; `status`, a
    RunStatus name, in place of the state's: KILLED for a trial stopped with the sweep) and its sampled
    values (`params`, as override text, logged as sweep.<key>); make the run if the trial made none and its
    process was `started`.

    Returns the run's id; None for a trial without a run that needs none: COMPLETE, or never started (the
    sweep refused to launch it; the study's run says why)."""
    from mlflow.entities import RunStatus

    c = client(t)
    run = _trial_run(c, exp_id, parent_id, study_name, number)
    if run is None:
        if state == "COMPLETE" or not started:
            return None
        # failed before training created its run (a bad config, a crash at start-up): still one run per
        # trial, so the failure is visible next to the others
        run = c.create_run(
            exp_id,
            run_name=f"{study_name}-trial{number}",
            tags={
                "mlflow.parentRunId": parent_id,
                "vaerepro.study": study_name,
                "vaerepro.trial": str(number),
            },
        )
    run_id = run.info.run_id
    c.set_tag(run_id, "vaerepro.trial_state", state)
    c.set_tag(run_id, "vaerepro.objective", objective)
    if reason:
        c.set_tag(run_id, "vaerepro.failure", reason[-MAX_TAG_CHARS:])
    existing = run.data.params
    for k, v in params.items():
        if f"sweep.{k}" not in existing:
            c.log_param(run_id, f"sweep.{k}", v)
    if state != "COMPLETE":
        status = status or RunStatus.to_string(RunStatus.KILLED if state == "PRUNED" else RunStatus.FAILED)
        c.set_terminated(run_id, status)
    return run_id


def summarise_study_run(
    t: Tracking,
    run_id: str,
    *,
    objective: str,
    counts: Mapping[str, int],
    step: int,
    best=None,
    best_command: str = "",
    status: str | None = None,
) -> None:
    """The study's numbers at `step` (its number of trials): `counts` (trials_complete, ...) and the best
    trial's value, with its number and command as tags; then the run ended with `status` unless None.

    `best` is an Optuna FrozenTrial with the user attributes data_space and improper the sweep sets: its
    value is named like every metric (tracking.metric_name), best/knn_accuracy, or binary/best/log_px for
    an objective in the units of the study's one data space.
    """
    c = client(t)
    metrics = dict(counts)
    if best is not None:
        space = space_name(best.user_attrs.get("data_space"), bool(best.user_attrs.get("improper")))
        metrics[metric_name(f"best/{objective}", space)] = best.value
        c.set_tag(run_id, "best_trial", str(best.number))
        c.set_tag(run_id, "best_command", best_command)
    for k, v in metrics.items():
        c.log_metric(run_id, k, float(v), step=step)
    if status is not None:
        c.set_terminated(run_id, status)


def log_report(t: Tracking, run_id: str, report_dir: Path) -> None:
    """The sweep report's files as the study run's artifacts, under report/."""
    client(t).log_artifacts(run_id, str(report_dir), "report")


def study_runs(t: Tracking, run_ids: Iterable[str]) -> list[dict[str, Any]]:
    """The report rows (tracking.experiment_runs) of these runs (a study's trial runs)."""
    ids = set(run_ids)
    return [r for r in experiment_runs(t.config()) if r["run_id"] in ids]
