"""The sweep process: class Sweep asks the study for trials, runs each as a process (n_jobs at once), and
tells the study how it ended.

- One trial = one process: `python -m vaerepro.sweep <overrides> hydra.run.dir=<trial dir>` (trial.py),
  which is `vaerepro run` plus one thing: a pruned trial exits with PRUNED_EXIT_CODE. The objective is read
  back from <trial dir>/metrics/eval.json.
- Resumable: n_trials is the study's total. Every sweep process stamps its running trials (host, pid,
  heartbeat); a RUNNING trial whose sweep process is gone is failed at the next start and its configuration
  queued again. Several sweep processes may share one study, taking turns under `files.locked`.
- MLflow (tracking/sweep.py): the study's run, and a mark on each trial's run; MLflow trouble is logged,
  never allowed to stop the study's bookkeeping. A sweep that stops on an error stops its running trials
  and ends the study's run FAILED, with the reason.
- A trial directory is claimed with a mark (TRIAL_MARK: the study, its storage and STUDY_UID, the trial's
  number) before anything is written there; a sweep dir holding another study's trials or results is
  refused (`check_sweep_dir`): never overwrite a finished trial's files.

This module never imports Lightning (about 3 s of every sweep's start-up); trial processes do.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vaerepro import signals
from vaerepro.config import ConfigError
from vaerepro.errors import Stopped
from vaerepro.files import locked, write_json
from vaerepro.signals import machine, pid_alive
from vaerepro.sweep.outcome import trial_outcome
from vaerepro.sweep.space import SearchSpace, grid_values, override_value, trial_overrides
from vaerepro.sweep.study import (
    ENV_PARENT_RUN_ID,
    ENV_PRUNER,
    ENV_STORAGE,
    ENV_STUDY,
    ENV_TRIAL,
    INTERRUPTED,
    STUDY_UID,
    best_command,
    best_trial,
    check_creatable,
    check_journal_whole,
    check_study,
    count_trials,
    existing_study,
    open_study,
    shown_storage,
    top_trial,
    trial_run_ids,
)
from vaerepro.tracking import sweep as tracking_sweep
from vaerepro.tracking.sweep import Tracking

log = logging.getLogger(__name__)

HEARTBEAT_S = 30.0  # a sweep process stamps its running trials this often ...
STALE_AFTER_S = 180.0  # ... and a running trial unstamped for this long belongs to a dead sweep
POLL_S = 0.2  # how often the sweep process looks at its trial processes
STOP_GRACE_S = 30.0  # after SIGTERM, how long a stopped trial process has before SIGKILL
# What a stopped sweep's last line says after "stopped by SIGTERM" (or Ctrl-C): how it goes on.
RESUME_HINT = (
    "run the same command again to resume study {study}: its completed trials are kept, the interrupted ones "
    "are queued again"
)

# trial system attributes (bookkeeping, not shown as user attributes): which sweep process runs the trial,
# and when it last said so (time.time(), seconds)
_HOST, _PID, _BEAT = "vaerepro:host", "vaerepro:pid", "vaerepro:heartbeat"

# In each trial directory, written (exclusively) before anything else: which study and trial own it, as JSON
# {"study_name", "storage", "study_uid", "trial"}
TRIAL_MARK = ".vaerepro-trial.json"
RESULTS_FILE = "optimization_results.json"


def _read_mark(trial_dir: Path) -> dict | None:
    """A trial directory's mark, or None when it has none (or one that cannot be read)."""
    try:
        mark = json.loads((trial_dir / TRIAL_MARK).read_text())
    except (OSError, ValueError):
        return None
    return mark if isinstance(mark, dict) else None


def _has_content(trial_dir: Path) -> bool:
    """Whether a trial directory holds anything but marks (a mark being written: a file TRIAL_MARK.<pid>)."""
    return any(not p.name.startswith(TRIAL_MARK) for p in trial_dir.iterdir())


def _write_mark(trial_dir: Path, mark: dict) -> None:
    """TRIAL_MARK, created whole or not at all: FileExistsError when the directory has one already."""
    tmp = trial_dir / f"{TRIAL_MARK}.{os.getpid()}"
    tmp.write_text(json.dumps(mark) + "\n")
    try:
        os.link(tmp, trial_dir / TRIAL_MARK)  # atomic and exclusive: readers never see half a mark
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: exclusive, if not atomic
        with (trial_dir / TRIAL_MARK).open("x") as fh:
            fh.write(tmp.read_text())
    finally:
        tmp.unlink(missing_ok=True)


@dataclass
class SweepSettings:
    study_name: str
    storage: str  # resolved: see study.resolve_storage
    objective: str = "log_px"
    direction: str = "maximize"
    n_trials: int = 20
    n_jobs: int = 1
    max_failure_rate: float = 0.0
    sampler: dict[str, Any] = field(default_factory=lambda: {"name": "tpe"})
    pruner: dict[str, Any] = field(default_factory=lambda: {"name": "none"})
    multivariate: bool = False
    constant_liar: bool = False
    report: bool = True
    trial_timeout: float | None = None  # seconds; a trial running longer is stopped and marked FAIL
    # the (data space, improper) groups of this sweep's search space (space.data_spaces' keys); None: unknown
    data_spaces: list[tuple[str, bool]] | None = None
    # what the trials measure (space.measurement_settings: the data set, its splits, K); None: unknown
    measurement: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.trial_timeout is not None and not self.trial_timeout > 0:
            raise ConfigError(
                "hydra.sweeper.trial_timeout must be a number of seconds > 0, or null; "
                f"got {self.trial_timeout}"
            )


class TooManyFailures(RuntimeError):
    """The sweep stopped: more trials failed than max_failure_rate allows."""


@dataclass
class _Running:
    """A trial process of this sweep process, while it runs."""

    trial: Any  # optuna.trial.Trial
    proc: subprocess.Popen
    trial_dir: Path
    overrides: list[str]
    log_file: Any
    start: float = field(default_factory=time.perf_counter)
    timed_out: bool = False
    stopped_at: float = 0.0  # time.perf_counter() of the SIGTERM


def _is_stale(trial, now: float) -> bool:
    """A RUNNING trial whose sweep process is gone: dead on this host, or silent for STALE_AFTER_S."""
    a = trial.system_attrs
    if a.get(_HOST) == machine() and a.get(_PID) is not None and not pid_alive(int(a[_PID])):
        return True
    beat = a.get(_BEAT) or (trial.datetime_start.timestamp() if trial.datetime_start else None)
    return beat is None or now - float(beat) > STALE_AFTER_S


def _suggest(trial, distributions: Mapping[str, Any]) -> None:
    """Draw the trial's value of each distribution through Optuna's public suggest API, as
    study.ask(distributions) would."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    for key, d in distributions.items():
        if isinstance(d, CategoricalDistribution):
            trial.suggest_categorical(key, d.choices)
        elif isinstance(d, IntDistribution):
            trial.suggest_int(key, d.low, d.high, step=d.step, log=d.log)
        elif isinstance(d, FloatDistribution):
            trial.suggest_float(key, d.low, d.high, step=d.step, log=d.log)
        else:
            raise TypeError(f"{key}: no suggest method for {d}")


def _raise_stopped(signum, frame):
    """SIGTERM while the sweep runs (its trials are stopped on the way up): Stopped, so that the command
    exits 143 and says SIGTERM (it raised KeyboardInterrupt, which `vaerepro run` reported as a Ctrl-C, exit
    130)."""
    raise Stopped(signum)


class Sweep:
    """One sweep process of a study: asks, runs trial processes (n_jobs at once), tells; resumable."""

    def __init__(
        self,
        settings: SweepSettings,
        space: SearchSpace,
        *,
        sweep_dir: Path,
        root: Path,
        tracking: Tracking,
        cwd: Path | None = None,
    ):
        self.s, self.space = settings, space
        self.sweep_dir, self.root = Path(sweep_dir).resolve(), Path(root).resolve()
        self.tracking, self.cwd = tracking, Path(cwd or os.getcwd())
        self.lock_path = self.root / "optuna" / f".{settings.study_name}.lock"
        self.parent_run_id: str | None = None  # the study's MLflow run
        self.exp_id: str | None = None
        self.running: list[_Running] = []
        self.last_failure = ""
        self.study_uid: str | None = None  # the study's STUDY_UID, once opened

    # -- study bookkeeping (always under the lock) -----------------------------------------------

    def _open_study(self):
        """The study and its storage, checked against these settings, with this process's sampler."""
        return open_study(
            self.s.study_name,
            self.s.storage,
            direction=self.s.direction,
            objective=self.s.objective,
            space=self.space,
            sampler=self.s.sampler,
            pruner=self.s.pruner,
            multivariate=self.s.multivariate,
            constant_liar=self.s.constant_liar,
            data_spaces=self.s.data_spaces,
            measurement=self.s.measurement,
        )

    def preflight(self) -> None:
        """Refuse (ConfigError), before anything is written, a sweep that would overwrite another study's
        files (check_sweep_dir) or add trials its study cannot rank with its own or Optuna cannot store:
        another direction, objective, measurement or data space, other choices of a parameter (check_study;
        open_study checks again under the lock), or a storage that is no Optuna storage. Reads only."""
        check_journal_whole(self.s.storage)
        study = existing_study(self.s.storage, self.s.study_name)
        if study is None:
            check_creatable(self.s.storage)
        self.check_sweep_dir(study)
        if study is not None:
            check_study(
                study,
                self.s.storage,
                direction=self.s.direction,
                objective=self.s.objective,
                pruner=self.s.pruner,
                data_spaces=self.s.data_spaces,
                space=self.space,
                measurement=self.s.measurement,
            )

    def check_sweep_dir(self, study=None) -> None:
        """Refuse (ConfigError) a sweep dir holding files of another study: a trial directory with content
        that is not this study's (its TRIAL_MARK names another study; unmarked, none of this study's trials
        ran there), or optimization_results.json of another study. `study`: this study if it exists."""
        if not self.sweep_dir.is_dir():
            return
        uid = None if study is None else study.user_attrs.get(STUDY_UID)
        # trial directories of this study made before trial directories were marked
        ran_here = set() if study is None else {t.user_attrs.get("trial_dir") for t in study.get_trials()}
        for d in sorted(self.sweep_dir.glob("trial-*")):
            if not d.is_dir() or not _has_content(d):
                continue
            mark = _read_mark(d)
            ours = str(d) in ran_here if mark is None else uid is not None and mark.get("study_uid") == uid
            if not ours:
                raise ConfigError(self._foreign(d, mark))
        path = self.sweep_dir / RESULTS_FILE
        try:
            results = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        if not isinstance(results, dict):
            return
        if results.get("study_uid"):
            ours = results["study_uid"] == uid
        else:  # written before results named the study's uid
            same = (results.get("study_name"), results.get("storage")) == (self.s.study_name, self.s.storage)
            ours = study is not None and same
        if not ours:
            raise ConfigError(
                f"{path} holds the results of study {results.get('study_name')!r} "
                f"({results.get('storage')}); study {self.s.study_name!r} would overwrite them: give this "
                "sweep its own hydra.sweep.dir"
            )

    def _foreign(self, trial_dir: Path, mark: dict | None) -> str:
        """The refusal of a trial directory that is not this study's."""
        if mark is None:
            owner = "files that no trial of this study wrote"
        else:
            name, storage = mark.get("study_name"), mark.get("storage")
            earlier = (name, storage) == (self.s.study_name, self.s.storage)
            what = "an earlier study named" if earlier else "study"
            owner = f"trial {mark.get('trial')} of {what} {name!r} ({shown_storage(str(storage))})"
        return (
            f"{trial_dir} holds {owner}; study {self.s.study_name!r} would overwrite it: give this sweep its "
            "own hydra.sweep.dir"
        )

    def _claim_trial_dir(self, number: int) -> Path:
        """The trial's directory, marked as this study's trial `number` before anything is written there.

        The mark is created exclusively: a directory another sweep process, study or earlier study of this
        name marked (or filled without a mark) is refused with ConfigError, unless it is this same trial's."""
        trial_dir = self.sweep_dir / f"trial-{number:04d}"
        trial_dir.mkdir(parents=True, exist_ok=True)
        mark = {
            "study_name": self.s.study_name,
            "storage": self.s.storage,
            "study_uid": self.study_uid,
            "trial": number,
        }
        try:
            _write_mark(trial_dir, mark)
        except FileExistsError:
            found = _read_mark(trial_dir)
            owner = None if found is None else (found.get("study_uid"), found.get("trial"))
            if owner != (self.study_uid, number):
                raise ConfigError(self._foreign(trial_dir, found)) from None
            return trial_dir
        if _has_content(trial_dir):  # files nobody marked: not ours
            (trial_dir / TRIAL_MARK).unlink()
            raise ConfigError(self._foreign(trial_dir, None))
        return trial_dir

    def _fail_stale(self, study, storage) -> None:
        """Fail the RUNNING trials of dead sweep processes, and queue their configurations again."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        now = time.time()
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if not _is_stale(t, now):
                continue
            try:
                storage.set_trial_system_attr(t._trial_id, INTERRUPTED, True)
                storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            except UpdateFinishedTrialError:
                continue
            queued = self._requeue(study, t)
            log.warning(
                "trial %d was left RUNNING by a sweep process that is gone: marked FAIL, %s",
                t.number,
                "queued again" if queued else "not queued again (it holds no full configuration)",
            )
            self._mlflow_trial_done(t.number, "FAIL", "interrupted: its sweep process died", t.params)

    def _requeue(self, study, trial) -> bool:
        """Queue an interrupted trial's configuration again (as a new trial, retry_of its number), when its
        params hold a value for every key of this search space. A trial interrupted before all its values
        were drawn (its sweep process died or failed between study.ask and the launch) is not: queued with
        missing values, the grid sampler refuses it at every later resume ("All parameters must be
        specified ... enqueue_trial"), and any sampler would run a configuration nobody chose. The sampler
        then draws a new point in its place."""
        params = dict(trial.params)
        if not params or set(self.space.distributions) - set(params):
            return False
        study.enqueue_trial(params, user_attrs={"retry_of": trial.number})
        return True

    def _grid_size(self) -> int | None:
        if self.s.sampler.get("name") != "grid":
            return None
        return math.prod(len(v) for v in grid_values(self.space).values())

    def _too_many_failures(self, counts: dict[str, int]) -> bool:
        return counts["failed"] > self.s.max_failure_rate * self.s.n_trials

    # -- MLflow (tracking/sweep.py) ---------------------------------------------------------------

    def _mlflow_parent(self, study) -> None:
        """The study's MLflow run: created once (its id kept in the study), reused by every sweep process."""
        if not self.tracking.enabled:
            return
        self.exp_id = tracking_sweep.experiment_id(self.tracking, self.root)
        known = study.user_attrs.get("mlflow_parent") or {}
        run_id = known.get("run_id") if known.get("tracking_uri") == self.tracking.uri else None
        params = {
            "objective": self.s.objective,
            "direction": self.s.direction,
            "sampler": json.dumps(self.s.sampler),
            "pruner": json.dumps(self.s.pruner),
            **{f"space.{k}": str(d) for k, d in self.space.distributions.items()},
        }
        self.parent_run_id = tracking_sweep.open_study_run(
            self.tracking,
            self.exp_id,
            run_id,
            study_name=self.s.study_name,
            objective=self.s.objective,
            storage=self.s.storage,
            params=params,
        )
        if self.parent_run_id != run_id:  # a new run
            study.set_user_attr(
                "mlflow_parent", {"tracking_uri": self.tracking.uri, "run_id": self.parent_run_id}
            )

    def _mlflow_trial_done(
        self,
        number: int,
        state: str,
        reason: str,
        params: Mapping[str, Any],
        started: bool = True,
        status: str | None = None,
    ) -> str | None:
        """Mark the trial's child run (PRUNED -> KILLED, FAIL -> FAILED, or `status`); make one if the trial
        made none, unless its process never `started`.

        MLflow trouble is logged, not raised: the study's bookkeeping must go on."""
        if not self.tracking.enabled or self.parent_run_id is None:
            return None
        try:
            return tracking_sweep.mark_trial_run(
                self.tracking,
                self.exp_id,
                self.parent_run_id,
                study_name=self.s.study_name,
                objective=self.s.objective,
                number=number,
                state=state,
                reason=reason,
                params={k: override_value(v) for k, v in params.items()},
                started=started,
                status=status,
            )
        except Exception as err:
            log.warning("trial %d: could not update its MLflow run (%s)", number, err)
            return None

    def _close_parent(self, study, status: str, reason: str = "") -> None:
        """Summary metrics and status of the study's MLflow run, and why it failed (the tag
        vaerepro.failure) when `reason` says; MLflow trouble is logged, not raised."""
        if not self.parent_run_id:
            return
        try:
            if reason:
                tracking_sweep.client(self.tracking).set_tag(
                    self.parent_run_id, "vaerepro.failure", reason[-tracking_sweep.MAX_TAG_CHARS :]
                )
            self._summarise_parent(study, status)
        except Exception as err:
            log.warning("could not update the study's MLflow run %s (%s)", self.parent_run_id, err)

    def _summarise_parent(self, study, status: str) -> None:
        from optuna.trial import TrialState

        trials = study.get_trials(deepcopy=False)
        n = {
            s: sum(t.state == s for t in trials)
            for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
        }
        best = best_trial(study)
        still_running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        tracking_sweep.summarise_study_run(
            self.tracking,
            self.parent_run_id,
            objective=self.s.objective,
            counts={
                "trials_complete": n[TrialState.COMPLETE],
                "trials_pruned": n[TrialState.PRUNED],
                "trials_failed": n[TrialState.FAIL],
            },
            step=len(trials),
            best=best,
            best_command="" if best is None else best_command(best),
            # other sweep processes still running the study: leave its run open
            status=status if status != "FINISHED" or not still_running else None,
        )

    # -- trials ----------------------------------------------------------------------------------

    def _launch(self, trial) -> _Running:
        overrides = trial_overrides(self.space, trial.params)
        trial_dir = self._claim_trial_dir(trial.number)
        trial.set_user_attr("trial_dir", str(trial_dir))
        trial.set_user_attr("overrides", overrides)
        env = {
            **os.environ,
            ENV_STUDY: self.s.study_name,
            ENV_TRIAL: str(trial.number),
            ENV_STORAGE: self.s.storage,
            ENV_PRUNER: json.dumps(self.s.pruner),
            "HYDRA_FULL_ERROR": "1",  # let the trial's exception reach vaerepro.sweep.trial (exit codes)
        }
        if self.parent_run_id:
            env[ENV_PARENT_RUN_ID] = self.parent_run_id
        if self.tracking.enabled:
            env["MLFLOW_TRACKING_URI"] = self.tracking.uri
        if self.s.n_jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.s.n_jobs))
        cmd = self._trial_command(overrides, trial_dir)
        log_file = (trial_dir / "trial.log").open("w")
        log.info("trial %d: %s", trial.number, " ".join(overrides) or "(defaults)")
        proc = subprocess.Popen(cmd, cwd=self.cwd, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        return _Running(trial, proc, trial_dir, overrides, log_file)

    def _trial_command(self, overrides: list[str], trial_dir: Path) -> list[str]:
        """A trial process's command line (trial.py)."""
        return [
            sys.executable,
            "-m",
            "vaerepro.sweep",
            *overrides,
            f"hydra.run.dir={override_value(str(trial_dir))}",
        ]

    def _ask(self, study, storage):
        """A new trial, stamped as this process's and given its values of the search space; None when it
        was a queued retry that could not be (failed and dropped: the caller asks again).

        study.ask creates the trial RUNNING (or takes a queued one) before it draws the values, so an error
        while drawing them (Optuna refusing a distribution, a storage error) would leave a RUNNING trial
        without params. Asked bare and then given its values, the trial is failed (not counted, and not
        queued with missing values) on any error instead, and the error raised; a queued retry whose values
        the sampler refuses (queued without them by an earlier version) is dropped with a warning."""
        trial = study.ask()
        try:
            storage.set_trial_system_attr(trial._trial_id, _HOST, machine())
            storage.set_trial_system_attr(trial._trial_id, _PID, os.getpid())
            storage.set_trial_system_attr(trial._trial_id, _BEAT, time.time())
            _suggest(trial, self.space.distributions)
        except BaseException as err:
            self._abandon(study, storage, trial, f"not started: {type(err).__name__}: {err}", started=False)
            retry = trial.user_attrs.get("retry_of")
            if retry is None or not isinstance(err, Exception):
                raise
            log.warning(
                "trial %d, queued as a retry of trial %d, could not be given this search space's values "
                "(%s: %s): marked FAIL, not run",
                trial.number,
                retry,
                type(err).__name__,
                err,
            )
            return None
        return trial

    def _finish(self, study, r: _Running, rc: int) -> None:
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        r.log_file.close()
        wall = time.perf_counter() - r.start
        timeout = self.s.trial_timeout if r.timed_out else None
        state, value, reason, facts = trial_outcome(r.trial_dir, rc, self.s.objective, timeout=timeout)
        for k, v in {**facts, "wall_s": round(wall, 2), "returncode": rc}.items():
            with contextlib.suppress(UpdateFinishedTrialError):
                r.trial.set_user_attr(k, v)
        # the objective's value is in the trial's run already, as its test/ metric (tracking.metric_name)
        run_id = self._mlflow_trial_done(r.trial.number, state, reason, r.trial.params)
        if run_id:
            with contextlib.suppress(UpdateFinishedTrialError):
                r.trial.set_user_attr("mlflow_run_id", run_id)
        try:
            if state == "COMPLETE":
                study.tell(r.trial, value)
            else:
                study.tell(r.trial, state=TrialState.PRUNED if state == "PRUNED" else TrialState.FAIL)
        except (UpdateFinishedTrialError, ValueError, RuntimeError) as err:
            log.warning("trial %d: could not record its result (%s)", r.trial.number, err)
        if state == "FAIL":
            self.last_failure = f"trial {r.trial.number} failed: {reason}"
            log.error(self.last_failure)
        else:
            shown = "" if value is None else f" {self.s.objective} = {value:.4f};"
            log.info("trial %d %s:%s %.1f s", r.trial.number, state, shown, wall)

    def _overdue(self, r: _Running) -> bool:
        return self.s.trial_timeout is not None and time.perf_counter() - r.start > self.s.trial_timeout

    def _stop(self, r: _Running) -> None:
        """Stop an overdue trial: SIGTERM (its DDP ranks stop with it: signals.stop_with_parent), SIGKILL if
        it is still there STOP_GRACE_S later. The loop then finds it finished and records it as FAIL."""
        if not r.timed_out:
            log.error(
                "trial %d: still running after trial_timeout=%g s, stopping it",
                r.trial.number,
                self.s.trial_timeout,
            )
            r.timed_out = True
            r.stopped_at = time.perf_counter()
            with contextlib.suppress(OSError):
                r.proc.terminate()
        elif time.perf_counter() - r.stopped_at > STOP_GRACE_S:
            with contextlib.suppress(OSError):
                r.proc.kill()

    def _heartbeat(self, storage) -> None:
        now = time.time()
        for r in self.running:
            with contextlib.suppress(Exception):
                storage.set_trial_system_attr(r.trial._trial_id, _BEAT, now)

    def _interrupt(self, study, storage, reason: str = "interrupted", *, killed: bool = True) -> None:
        """Stop the running trials (Ctrl-C, SIGTERM, an error of the sweep): failed and queued again, as a
        resume would; their MLflow runs KILLED (stopped by a signal, as any stopped run) or, not `killed`,
        FAILED. A trial process that has exited already ended on its own: recorded as it ended."""
        running, self.running = self.running, []
        for r in list(running):
            if (rc := r.proc.poll()) is not None:
                running.remove(r)
                self._finish_quietly(study, r, rc)
        for r in running:
            with contextlib.suppress(OSError):
                r.proc.terminate()
        for r in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                r.proc.wait(timeout=STOP_GRACE_S)
            if r.proc.returncode == 0:  # it finished before the SIGTERM reached it
                self._finish_quietly(study, r, 0)
                continue
            r.log_file.close()
            self._abandon(study, storage, r.trial, reason, killed=killed)

    def _finish_quietly(self, study, r: _Running, rc: int) -> None:
        """_finish, while the sweep stops: a trouble is logged, and the other trials are still stopped."""
        try:
            self._finish(study, r, rc)
        except Exception:
            log.exception("trial %d: could not record how it ended", r.trial.number)

    def _abandon(
        self, study, storage, trial, reason: str, started: bool = True, killed: bool = False
    ) -> None:
        """A trial stopped (or, not `started`, never launched) by the sweep itself: FAIL, not counted
        (INTERRUPTED), and its configuration queued again; its MLflow run FAILED, or KILLED when `killed`.
        A trial never launched gets no MLflow run."""
        from optuna.trial import TrialState

        with contextlib.suppress(Exception):
            storage.set_trial_system_attr(trial._trial_id, INTERRUPTED, True)
            study.tell(trial, state=TrialState.FAIL)
            self._requeue(study, trial)
            self._mlflow_trial_done(
                trial.number,
                "FAIL",
                reason,
                trial.params,
                started=started,
                status="KILLED" if killed else None,
            )

    # -- the loop ----------------------------------------------------------------------------------

    def run(self):
        """Run trials until the study holds n_trials (or the grid is done, or too many failed)."""
        with locked(self.lock_path):
            self.check_sweep_dir(existing_study(self.s.storage, self.s.study_name))
            self.sweep_dir.mkdir(parents=True, exist_ok=True)
            study, storage = self._open_study()
            self.study_uid = study.user_attrs.get(STUDY_UID)
            self._mlflow_parent(study)
        grid_size = self._grid_size()
        previous = signal.signal(signal.SIGTERM, _raise_stopped)
        stopped = ""
        last_beat = time.monotonic()
        try:  # from here on, the study's MLflow run is RUNNING: every way out ends it
            with locked(self.lock_path):
                self._fail_stale(study, storage)
            log.info(
                "study %s (%s, %s %s) in %s; MLflow run %s",
                self.s.study_name,
                self.s.sampler.get("name"),
                self.s.direction,
                self.s.objective,
                self.s.storage,
                self.parent_run_id,
            )
            while True:
                while not stopped and len(self.running) < self.s.n_jobs:
                    with locked(self.lock_path):
                        c = count_trials(study)
                        if self._too_many_failures(c):
                            stopped = (
                                f"{c['failed']} of n_trials={self.s.n_trials} trials failed, more than "
                                f"max_failure_rate={self.s.max_failure_rate:g}"
                            )
                            break
                        grid_done = grid_size is not None and c["grid_started"] >= grid_size
                        if c["used"] >= self.s.n_trials or (grid_done and not c["waiting"]):
                            break
                        trial = self._ask(study, storage)
                        if trial is None:  # a queued trial that could not be given this space's values
                            continue
                    try:
                        self.running.append(self._launch(trial))
                    except BaseException as err:
                        self._abandon(study, storage, trial, f"not started: {err}", started=False)
                        raise
                if not self.running:
                    break
                time.sleep(POLL_S)
                signals.check()  # a SIGTERM or Ctrl-C that Python dropped in a finalizer stops the sweep now
                for r in list(self.running):
                    if (rc := r.proc.poll()) is not None:
                        self.running.remove(r)
                        self._finish(study, r, rc)
                    elif self._overdue(r):
                        self._stop(r)
                if time.monotonic() - last_beat > HEARTBEAT_S:
                    self._heartbeat(storage)
                    last_beat = time.monotonic()
        except (KeyboardInterrupt, Stopped) as stop:
            by = signal.Signals(stop.signum).name if isinstance(stop, Stopped) else "Ctrl-C"
            reason = f"interrupted: the sweep was stopped ({by})"
            self._interrupt(study, storage, reason)
            self._close_parent(study, "KILLED", reason=reason)
            stop.hint = RESUME_HINT.format(study=self.s.study_name)  # the command's last line (vaerepro.cli)
            raise
        except BaseException as err:
            # never leave the study's run or a trial RUNNING: stop the trials as an interruption would
            reason = f"the sweep stopped on an error: {type(err).__name__}: {err}"
            log.error(reason)
            self._interrupt(study, storage, reason=f"interrupted: {reason}", killed=False)
            self._close_parent(study, "FAILED", reason=reason)
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
        why = f"sweep stopped: {stopped}. Last failure: {self.last_failure}" if stopped else ""
        # a FAILED run says why (vaerepro.failure), as every other way the study's run fails does
        self._close_parent(study, "FAILED" if stopped else "FINISHED", reason=why)
        results = self._results(study)
        if self.s.report:
            try:
                self.write_report(study)
            except Exception:  # the trials are recorded; `python -m vaerepro.sweep report` can retry
                log.exception("the sweep report could not be written")
        if stopped:
            raise TooManyFailures(why)
        return results

    def _results(self, study) -> dict[str, Any]:
        """optimization_results.json in the sweep directory (as Hydra's Optuna sweeper writes it)."""
        best = best_trial(study)
        results = {
            "name": "vaerepro_optuna",
            "study_name": self.s.study_name,
            "storage": self.s.storage,
            "study_uid": self.study_uid,
            "objective": self.s.objective,
            "direction": self.s.direction,
            "best_value": None if best is None else best.value,
            "best_params": None if best is None else dict(best.params),
            "best_command": None if best is None else best_command(best),
            "mlflow_parent_run_id": self.parent_run_id,
        }
        write_json(self.sweep_dir / RESULTS_FILE, results)
        if best is not None:
            log.info(
                "best trial %d: %s = %.4f\n  %s",
                best.number,
                self.s.objective,
                best.value,
                best_command(best),
            )
        elif (top := top_trial(study)) is not None:
            log.warning(
                "no trial wins this sweep: the best by %s, trial %d (%.4f), rests on a log p(x) estimate "
                "that has NOT CONVERGED, as does every other completed trial of its data space",
                self.s.objective,
                top.number,
                top.value,
            )
        return results

    def write_report(self, study) -> dict[str, Path]:
        """The sweep report (HTML + Markdown) under <sweep dir>/report, and in the study's MLflow run."""
        runs = None
        if self.tracking.enabled:
            runs = tracking_sweep.study_runs(self.tracking, trial_run_ids(study))
        from vaerepro.sweep.report import write_sweep_report

        paths = write_sweep_report(study, self.sweep_dir / "report", runs=runs, storage=self.s.storage)
        if self.parent_run_id:
            tracking_sweep.log_report(self.tracking, self.parent_run_id, self.sweep_dir / "report")
        log.info("sweep report: %s", paths["html"])
        return paths
