"""Optuna sweeps: a study whose trials are `vaerepro run` processes, their pruning, and the sweep report.

The Hydra sweeper `vaerepro_optuna` (src/hydra_plugins/vaerepro_optuna_sweeper) turns its config into a
`SearchSpace` and `SweepSettings` and calls `Sweep.run`; everything Optuna-specific lives here.

- One trial = one process: `python -m vaerepro.sweep <overrides> hydra.run.dir=<trial dir>`, which is
  `vaerepro run` plus one thing: a pruned trial exits with PRUNED_EXIT_CODE. Trials share no Python state,
  and Lightning's DDP re-launches `python -m vaerepro.sweep ...` for its other ranks as for any script.
  The objective is read back from <trial dir>/metrics/eval.json.
- The trial learns its study from environment variables (ENV_*): MLflow tags (tracking.run_tags) and the
  pruning callback (`trial_callbacks`, added by train.build_trainer) read them.
- The study lives in persistent storage (a journal file by default) and is resumed by running the same
  command again: n_trials is the study's total. Trials of a sweep process that died are failed at resume and
  their configurations queued again. Several sweep processes may share one study.
- A density objective (log_px, elbo, bits_per_dim, ...) is refused over a search space spanning data spaces:
  a pmf on binary pixels and a density on [0,1] pixels are different units (see compare.py).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

from vaerepro.config import ConfigError

log = logging.getLogger(__name__)

# What the sweeper tells a trial process (tracking.run_tags and `trial_callbacks` read them).
ENV_STUDY = "VAEREPRO_STUDY"
ENV_TRIAL = "VAEREPRO_TRIAL"  # the trial number
ENV_PARENT_RUN_ID = "VAEREPRO_PARENT_RUN_ID"  # the study's MLflow run
ENV_STORAGE = "VAEREPRO_OPTUNA_STORAGE"  # journal file path or RDB URL
ENV_PRUNER = "VAEREPRO_OPTUNA_PRUNER"  # the pruner's settings, JSON

PRUNED_EXIT_CODE = 3  # a trial process stopped by the pruner (1: an error, 2: a configuration error)
HEARTBEAT_S = 30.0  # a sweep process stamps its running trials this often ...
STALE_AFTER_S = 180.0  # ... and a running trial unstamped for this long belongs to a dead sweep
POLL_S = 0.2

# trial system attributes (bookkeeping, not shown as user attributes)
_HOST, _PID, _BEAT, INTERRUPTED = (
    "vaerepro:host",
    "vaerepro:pid",
    "vaerepro:heartbeat",
    "vaerepro:interrupted",
)

# eval.json keys that can be an objective, with the sense in which they improve
NATURAL_DIRECTION = {
    "log_px": "maximize",
    "elbo": "maximize",
    "recon": "maximize",
    "kl": "minimize",
    "bits_per_dim": "minimize",
    "knn_accuracy": "maximize",
    "active_units": "maximize",
    "ess": "maximize",
    "ess_fraction": "maximize",
}
# Objectives that mean the same thing whatever the data space: a classification accuracy on latent means
# (Loaiza-Ganem & Cunningham's comparison across likelihoods), counts and fractions. Every other objective
# is a log-likelihood, a bound or a part of one: in the units of its data space.
SPACE_FREE_OBJECTIVES = {"knn_accuracy", "active_units", "ess_fraction"}


# --------------------------------------------------------------------------------------- search space


@dataclass(frozen=True)
class SearchSpace:
    """Optuna distributions by override key, and the overrides every trial gets unchanged."""

    distributions: dict[str, Any]  # key -> optuna BaseDistribution
    fixed: list[str] = field(default_factory=list)  # override strings, as typed (e.g. "+sweep=aevb")


def _distribution(override) -> Any:
    """An Optuna distribution for a Hydra sweep override: choice / range / interval / tag(log, interval)."""
    from hydra.core.override_parser.types import Transformer
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    key, value = override.get_key_element(), override.value()
    if override.is_choice_sweep() or (override.is_range_sweep() and value.shuffle):
        # Transformer.encode writes list choices as Hydra text ("[64,64]"); scalars stay themselves
        return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    if override.is_range_sweep():
        # Hydra's meaning: range(start, stop, step) stops before `stop`, as in the basic sweeper
        values = list(override.sweep_iterator())
        if not values:
            raise ConfigError(f"{override.input_line}: the range is empty")
        if all(isinstance(v, int) for v in values):
            return IntDistribution(values[0], values[-1], step=int(value.step))
        return FloatDistribution(float(values[0]), float(values[-1]), step=float(value.step))
    if override.is_interval_sweep():
        # Hydra reads interval bounds as floats; tag(int, interval(a, b)) asks for integers
        log_scale = "log" in value.tags
        if "int" in value.tags:
            return IntDistribution(int(value.start), int(value.end), log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise ConfigError(
        f"{key}: the sweeper takes choice(...), range(...), interval(...) or tag(log|int, interval(...)), "
        f"not {override.input_line!r}"
    )


def parse_search_space(params: Mapping[str, str] | None, arguments: Sequence[str]) -> SearchSpace:
    """The search space from `hydra.sweeper.params` and the command line (which wins for a shared key).

    Parsed with Hydra's override parser, as Hydra's Optuna sweeper does; a command-line `key=a,b` is a choice.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    lines = [f"{k}={v}" for k, v in (params or {}).items()] + list(arguments)
    distributions: dict[str, Any] = {}
    fixed: dict[str, str] = {}
    for override in parser.parse_overrides(lines):
        key = override.get_key_element()
        if override.is_sweep_override():
            distributions[key] = _distribution(override)
            fixed.pop(key, None)
        else:
            fixed[key] = override.input_line
            distributions.pop(key, None)
    return SearchSpace(distributions, list(fixed.values()))


_PLAIN = re.compile(r"[\w./:+\-@%~]+")


def override_value(value: Any) -> str:
    """A sampled value as Hydra override text."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, float):
        return repr(value)
    text = str(value)
    if _PLAIN.fullmatch(text) or text[:1] in "[{":  # plain words, numbers, paths; encoded lists / dicts
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def trial_overrides(space: SearchSpace, params: Mapping[str, Any]) -> list[str]:
    return [*space.fixed, *(f"{k}={override_value(v)}" for k, v in params.items())]


def grid_values(space: SearchSpace) -> dict[str, list[Any]]:
    """Every distribution as a list of values, for the grid sampler (choices and stepped ranges only)."""
    from optuna.distributions import CategoricalDistribution

    grid = {}
    for key, d in space.distributions.items():
        if isinstance(d, CategoricalDistribution):
            grid[key] = list(d.choices)
        elif getattr(d, "step", None) is not None and not getattr(d, "log", False):
            n = int(round((d.high - d.low) / d.step))
            grid[key] = [d.low + i * d.step for i in range(n + 1)]
        else:
            raise ConfigError(f"{key}: the grid sampler needs choice(...) or range(...), not {d}")
    return grid


# ------------------------------------------------------------------------------- objective and spaces


def resolve_direction(objective: str, direction: str | None) -> str:
    if objective not in NATURAL_DIRECTION:
        raise ConfigError(
            f"hydra.sweeper.objective={objective!r} is not a number in metrics/eval.json; "
            f"choose one of {', '.join(sorted(NATURAL_DIRECTION))}"
        )
    if direction is None:
        return NATURAL_DIRECTION[objective]
    if direction not in ("maximize", "minimize"):
        raise ConfigError(f"hydra.sweeper.direction={direction!r}: maximize, minimize or null")
    if direction != NATURAL_DIRECTION[objective]:
        log.warning(
            "direction=%s for %s, which improves when it %ss",
            direction,
            objective,
            NATURAL_DIRECTION[objective].removesuffix("e"),
        )
    return direction


def _space_key(key: str) -> bool:
    key = key.lstrip("+~")
    return key in ("likelihood", "data", "data.space") or key.startswith("likelihood.")


def space_combinations(space: SearchSpace) -> list[list[str]]:
    """Override lists, one per combination of the choices deciding the data space (likelihood, data.space)."""
    from optuna.distributions import CategoricalDistribution

    keys = [
        k for k, d in space.distributions.items() if _space_key(k) and isinstance(d, CategoricalDistribution)
    ]
    choices = [space.distributions[k].choices for k in keys]
    return [
        [f"{k}={override_value(v)}" for k, v in zip(keys, combo, strict=True)] for combo in product(*choices)
    ]


def data_spaces(
    space: SearchSpace, compose: Callable[[list[str]], Mapping[str, Any]]
) -> dict[tuple[str, bool], list[str]]:
    """(data space, improper) -> the choices that lead there; each combination composed and validated.

    A combination that does not validate (say Bernoulli on continuous data without allow_improper) is
    skipped with a warning: its trials will fail with the validation message.
    """
    from vaerepro import config as config_mod

    spaces: dict[tuple[str, bool], list[str]] = {}
    for combo in space_combinations(space):
        try:
            cfg = config_mod.validate(dict(compose([*space.fixed, *combo])))
        except ConfigError as err:
            log.warning("%s: its trials will fail: %s", " ".join(combo) or "the fixed config", err)
            continue
        spaces.setdefault((cfg.data_space, cfg.improper), []).append(" ".join(combo) or "(fixed)")
    return spaces


def check_comparable(objective: str, pruner: str, spaces: Mapping[tuple[str, bool], list[str]]) -> None:
    """Refuse a density objective, or validation-ELBO pruning, over several data spaces (or improper runs)."""
    if len(spaces) <= 1:
        return
    from vaerepro.compare import space_label

    listing = "\n".join(
        f"  - {space_label(s, imp)}: {', '.join(combos)}" for (s, imp), combos in spaces.items()
    )
    if objective not in SPACE_FREE_OBJECTIVES:
        raise ConfigError(
            f"objective {objective!r} cannot rank this search space: its likelihoods live in "
            f"{len(spaces)} data spaces, where {objective} has different units:\n{listing}\n"
            "Sweep one data space at a time, or use hydra.sweeper.objective=knn_accuracy "
            f"(comparable across spaces); allowed across spaces: {', '.join(sorted(SPACE_FREE_OBJECTIVES))}."
        )
    if pruner != "none":
        raise ConfigError(
            f"hydra/sweeper/pruner={pruner} compares trials' validation ELBOs, which are in different units "
            f"across this search space's data spaces:\n{listing}\nUse hydra/sweeper/pruner=none here."
        )


# ---------------------------------------------------------------------------- samplers, pruners, storage


def make_sampler(
    conf: Mapping[str, Any],
    space: SearchSpace,
    *,
    multivariate: bool = False,
    constant_liar: bool = False,
    seed_offset: int = 0,
):
    import optuna

    name, seed = conf.get("name", "tpe"), conf.get("seed")
    seed = None if seed is None else int(seed) + seed_offset
    if name != "tpe" and (multivariate or constant_liar):
        log.warning("multivariate / constant_liar apply to the TPE sampler only; ignored for %s", name)
    if name == "tpe":
        return optuna.samplers.TPESampler(
            seed=seed,
            n_startup_trials=int(conf.get("n_startup_trials", 10)),
            multivariate=multivariate,
            constant_liar=constant_liar,
        )
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":

        class AskTellGridSampler(optuna.samplers.GridSampler):
            # GridSampler.after_trial calls study.stop(), which works only inside study.optimize; Sweep
            # stops at the end of the grid itself (Sweep._counts)
            def after_trial(self, study, trial, state, values) -> None:
                pass

        return AskTellGridSampler(grid_values(space), seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=int(conf.get("n_startup_trials", 1)))
    raise ConfigError(f"hydra/sweeper/sampler={name!r}: tpe, random, grid or cmaes")


def make_pruner(conf: Mapping[str, Any] | None):
    import optuna

    conf = dict(conf or {"name": "none"})
    name = conf.pop("name", "none")
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "median":
        return optuna.pruners.MedianPruner(**conf)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(**conf)
    raise ConfigError(f"hydra/sweeper/pruner={name!r}: none, median or hyperband")


def resolve_storage(storage: str | None, study_name: str, root: Path) -> str:
    """An absolute storage spec: an RDB URL, or the path of a journal file (the default, under the project).

    Absolute because trial processes (and DVC's temporary copies) may run from elsewhere.
    """
    if storage and "://" in storage:
        if storage.startswith("sqlite:///") and not storage.startswith("sqlite:////"):
            return f"sqlite:///{(root / storage.removeprefix('sqlite:///')).resolve()}"
        return storage
    path = Path(storage) if storage else Path("optuna") / f"{study_name}.log"
    return str(path if path.is_absolute() else (root / path).resolve())


def open_storage(spec: str):
    import optuna

    if "://" in spec:
        return optuna.storages.RDBStorage(spec)
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    Path(spec).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(spec))


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Serialise sweep processes of one project over a study's bookkeeping (counting slots, asking)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------- MLflow


@dataclass(frozen=True)
class Tracking:
    """Where the trials' MLflow runs go (the same rule as tracking.tracking_uri), or nowhere."""

    uri: str | None
    experiment: str = "vaerepro"

    @property
    def enabled(self) -> bool:
        return self.uri is not None


def _client(t: Tracking):
    from mlflow import MlflowClient

    return MlflowClient(t.uri)


def _experiment_id(t: Tracking, root: Path) -> str:
    from vaerepro import tracking
    from vaerepro.config import Config, TrackingConfig

    cfg = Config(tracking=TrackingConfig(uri=t.uri, experiment=t.experiment))
    return tracking.ensure_experiment(cfg, root)[1]


def _child_run(client, exp_id: str, parent_id: str, study: str, number: int):
    runs = client.search_runs(
        [exp_id],
        filter_string=(
            f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`vaerepro.study` = '{study}' "
            f"and tags.`vaerepro.trial` = '{number}'"
        ),
        max_results=10,
    )
    return runs[0] if runs else None


# --------------------------------------------------------------------------------------------- the sweep


@dataclass
class SweepSettings:
    study_name: str
    storage: str  # resolved: see resolve_storage
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

    def __post_init__(self) -> None:
        if self.trial_timeout is not None and not self.trial_timeout > 0:
            raise ConfigError(
                "hydra.sweeper.trial_timeout must be a number of seconds > 0, or null; "
                f"got {self.trial_timeout}"
            )


class SweepError(RuntimeError):
    """The sweep stopped: too many trials failed."""


@dataclass
class _Running:
    trial: Any  # optuna.trial.Trial
    proc: subprocess.Popen
    trial_dir: Path
    overrides: list[str]
    log_file: Any
    start: float = field(default_factory=time.perf_counter)
    timed_out: bool = False
    stopped_at: float = 0.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_stale(trial, now: float) -> bool:
    """A RUNNING trial whose sweep process is gone: dead on this host, or silent for STALE_AFTER_S."""
    a = trial.system_attrs
    if a.get(_HOST) == socket.gethostname() and a.get(_PID) is not None and not _pid_alive(int(a[_PID])):
        return True
    beat = a.get(_BEAT) or (trial.datetime_start.timestamp() if trial.datetime_start else None)
    return beat is None or now - float(beat) > STALE_AFTER_S


def _log_tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


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
        self.parent_run_id: str | None = None
        self.exp_id: str | None = None
        self.running: list[_Running] = []
        self.last_failure = ""

    # -- study bookkeeping (always under the lock) -----------------------------------------------

    def _open_study(self):
        import warnings

        import optuna

        storage = open_storage(self.s.storage)
        study = optuna.create_study(
            study_name=self.s.study_name, storage=storage, direction=self.s.direction, load_if_exists=True
        )
        attrs = study.user_attrs
        if study.direction.name.lower() != self.s.direction:
            raise ConfigError(
                f"study {self.s.study_name!r} in {self.s.storage} is a {study.direction.name.lower()} study; "
                f"direction={self.s.direction} needs another hydra.sweeper.study_name"
            )
        if attrs.get("objective", self.s.objective) != self.s.objective:
            raise ConfigError(
                f"study {self.s.study_name!r} in {self.s.storage} optimises {attrs['objective']}, not "
                f"{self.s.objective}: use another hydra.sweeper.study_name (or the same objective)"
            )
        if "objective" not in attrs:
            study.set_user_attr("objective", self.s.objective)
        # the objective's name where Optuna shows values (dashboard, trials_dataframe), not "Objective 0";
        # set_metric_names is still marked experimental in Optuna 4 and 5
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([self.s.objective])
        space = {k: str(d) for k, d in self.space.distributions.items()}
        if attrs.get("search_space", space) != space:
            log.warning("study %s: the search space changed since its last sweep", self.s.study_name)
        study.set_user_attr("search_space", space)
        # Every sweep process of the study draws from its own seed (seed + k for the k-th): a resumed or
        # second process with the same seed would otherwise propose the same points again.
        k = int(attrs.get("sweep_processes", 0))
        study.set_user_attr("sweep_processes", k + 1)
        study.sampler = make_sampler(
            self.s.sampler,
            self.space,
            multivariate=self.s.multivariate,
            constant_liar=self.s.constant_liar,
            seed_offset=k,
        )
        study.pruner = make_pruner(self.s.pruner)
        return study, storage

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
            log.warning(
                "trial %d was left RUNNING by a sweep process that is gone: marked FAIL, queued again",
                t.number,
            )
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
            self._mlflow_trial_done(t.number, "FAIL", "interrupted: its sweep process died", t.params)

    def _counts(self, study) -> dict[str, int]:
        """used: the trials that count towards n_trials (all but queued and interrupted ones)."""
        from optuna.trial import TrialState

        c = {"used": 0, "waiting": 0, "failed": 0}
        grid_ids = set()  # as the grid sampler sees them: an interrupted point comes back as a queued trial
        for t in study.get_trials(deepcopy=False):
            if "grid_id" in t.system_attrs:
                grid_ids.add(t.system_attrs["grid_id"])
            if t.state == TrialState.WAITING:
                c["waiting"] += 1
            elif not t.system_attrs.get(INTERRUPTED):
                c["used"] += 1
                c["failed"] += t.state == TrialState.FAIL
        c["grid_started"] = len(grid_ids)
        return c

    def _grid_size(self) -> int | None:
        if self.s.sampler.get("name") != "grid":
            return None
        return math.prod(len(v) for v in grid_values(self.space).values())

    def _too_many_failures(self, counts: dict[str, int]) -> bool:
        return counts["failed"] > self.s.max_failure_rate * self.s.n_trials

    # -- MLflow -----------------------------------------------------------------------------------

    def _mlflow_parent(self, study) -> None:
        """The study's MLflow run: created once (its id kept in the study), reused by every sweep process."""
        if not self.tracking.enabled:
            return
        from mlflow.exceptions import MlflowException

        client = _client(self.tracking)
        self.exp_id = _experiment_id(self.tracking, self.root)
        known = study.user_attrs.get("mlflow_parent") or {}
        run_id = known.get("run_id") if known.get("tracking_uri") == self.tracking.uri else None
        if run_id:
            try:
                if client.get_run(run_id).info.lifecycle_stage != "active":
                    run_id = None
            except MlflowException:
                run_id = None
        if run_id is None:
            run = client.create_run(
                self.exp_id,
                run_name=f"sweep-{self.s.study_name}",
                tags={
                    "vaerepro.study": self.s.study_name,
                    "vaerepro.role": "study",
                    "vaerepro.objective": self.s.objective,
                    "optuna.storage": self.s.storage,
                    "mlflow.note.content": f"Optuna study {self.s.study_name!r}: one child run per trial.",
                },
            )
            run_id = run.info.run_id
            params = {
                "objective": self.s.objective,
                "direction": self.s.direction,
                "sampler": json.dumps(self.s.sampler),
                "pruner": json.dumps(self.s.pruner),
                **{f"space.{k}": str(d)[:6000] for k, d in self.space.distributions.items()},
            }
            for k, v in params.items():
                client.log_param(run_id, k, v)
            study.set_user_attr("mlflow_parent", {"tracking_uri": self.tracking.uri, "run_id": run_id})
        else:
            client.update_run(run_id, status="RUNNING")
        self.parent_run_id = run_id

    def _mlflow_trial_done(
        self, number: int, state: str, reason: str, params: Mapping[str, Any]
    ) -> str | None:
        """Mark the trial's child run (PRUNED -> KILLED, FAIL -> FAILED); make one if the trial made none.

        MLflow trouble is logged, not raised: the study's bookkeeping must go on."""
        if not self.tracking.enabled or self.parent_run_id is None:
            return None
        try:
            return self._mark_child_run(number, state, reason, params)
        except Exception as err:
            log.warning("trial %d: could not update its MLflow run (%s)", number, err)
            return None

    def _mark_child_run(self, number: int, state: str, reason: str, params: Mapping[str, Any]) -> str | None:
        from mlflow.entities import RunStatus

        client = _client(self.tracking)
        run = _child_run(client, self.exp_id, self.parent_run_id, self.s.study_name, number)
        if run is None:
            if state == "COMPLETE":
                return None
            # failed before training created its run (a bad config, a crash at start-up): still one run per
            # trial, so the failure is visible next to the others
            run = client.create_run(
                self.exp_id,
                run_name=f"{self.s.study_name}-trial{number}",
                tags={
                    "mlflow.parentRunId": self.parent_run_id,
                    "vaerepro.study": self.s.study_name,
                    "vaerepro.trial": str(number),
                },
            )
        run_id = run.info.run_id
        client.set_tag(run_id, "vaerepro.trial_state", state)
        client.set_tag(run_id, "vaerepro.objective", self.s.objective)
        if reason:
            client.set_tag(run_id, "vaerepro.failure", reason[-5000:])
        existing = run.data.params
        for k, v in params.items():
            if f"sweep.{k}" not in existing:
                client.log_param(run_id, f"sweep.{k}", override_value(v))
        if state != "COMPLETE":
            status = RunStatus.to_string(RunStatus.KILLED if state == "PRUNED" else RunStatus.FAILED)
            client.set_terminated(run_id, status)
        return run_id

    # -- trials ----------------------------------------------------------------------------------

    def _launch(self, trial) -> _Running:
        overrides = trial_overrides(self.space, trial.params)
        trial_dir = self.sweep_dir / f"trial-{trial.number:04d}"
        trial_dir.mkdir(parents=True, exist_ok=True)
        trial.set_user_attr("trial_dir", str(trial_dir))
        trial.set_user_attr("overrides", overrides)
        env = {
            **os.environ,
            ENV_STUDY: self.s.study_name,
            ENV_TRIAL: str(trial.number),
            ENV_STORAGE: self.s.storage,
            ENV_PRUNER: json.dumps(self.s.pruner),
            "HYDRA_FULL_ERROR": "1",  # let the trial's exception reach vaerepro.sweep.main (exit codes)
        }
        if self.parent_run_id:
            env[ENV_PARENT_RUN_ID] = self.parent_run_id
        if self.tracking.enabled:
            env["MLFLOW_TRACKING_URI"] = self.tracking.uri
        if self.s.n_jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.s.n_jobs))
        cmd = [
            sys.executable,
            "-m",
            "vaerepro.sweep",
            *overrides,
            f"hydra.run.dir={override_value(str(trial_dir))}",
        ]
        log_file = (trial_dir / "trial.log").open("w")
        log.info("trial %d: %s", trial.number, " ".join(overrides) or "(defaults)")
        proc = subprocess.Popen(cmd, cwd=self.cwd, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        return _Running(trial, proc, trial_dir, overrides, log_file)

    def _outcome(self, r: _Running, rc: int) -> tuple[str, float | None, str, dict[str, Any]]:
        """(state, value, reason, facts) from a finished trial process."""
        from vaerepro import config as config_mod

        facts: dict[str, Any] = {}
        with contextlib.suppress(ConfigError, OSError):
            cfg = config_mod.load(r.trial_dir / "params.yaml")
            facts = {
                "likelihood": cfg.likelihood.name,
                "data_space": cfg.data_space,
                "improper": cfg.improper,
                "latent_dim": cfg.model.latent_dim,
            }
        if r.timed_out:
            return (
                "FAIL",
                None,
                f"still running after trial_timeout={self.s.trial_timeout:g} s, stopped; "
                f"{r.trial_dir / 'trial.log'}:\n{_log_tail(r.trial_dir / 'trial.log')}",
                facts,
            )
        if rc == PRUNED_EXIT_CODE:
            return "PRUNED", None, "", facts
        if rc != 0:
            return (
                "FAIL",
                None,
                f"exit code {rc}; {r.trial_dir / 'trial.log'}:\n{_log_tail(r.trial_dir / 'trial.log')}",
                facts,
            )
        path = r.trial_dir / "metrics" / "eval.json"
        try:
            metrics = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            return "FAIL", None, f"exit code 0 but no readable {path}: {err}", facts
        value = metrics.get(self.s.objective)
        try:
            value = float(value)
        except (TypeError, ValueError):
            return "FAIL", None, f"{self.s.objective} in {path} is {value!r}, not a number", facts
        if not math.isfinite(value):
            return "FAIL", None, f"{self.s.objective} in {path} is {value}", facts
        return "COMPLETE", value, "", facts

    def _finish(self, study, r: _Running, rc: int) -> None:
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        r.log_file.close()
        wall = time.perf_counter() - r.start
        state, value, reason, facts = self._outcome(r, rc)
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
        """Stop an overdue trial: SIGTERM (its DDP ranks die with it, see _die_with_parent), SIGKILL if it is
        still there 30 s later. The loop then finds it finished and records it as FAIL (`_outcome`)."""
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
        elif time.perf_counter() - r.stopped_at > 30:
            with contextlib.suppress(OSError):
                r.proc.kill()

    def _heartbeat(self, storage) -> None:
        now = time.time()
        for r in self.running:
            with contextlib.suppress(Exception):
                storage.set_trial_system_attr(r.trial._trial_id, _BEAT, now)

    def _interrupt(self, study, storage) -> None:
        """Stop the running trials (Ctrl-C, SIGTERM): failed and queued again, as a resume would."""
        from optuna.trial import TrialState

        for r in self.running:
            with contextlib.suppress(OSError):
                r.proc.terminate()
        for r in self.running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                r.proc.wait(timeout=30)
            r.log_file.close()
            with contextlib.suppress(Exception):
                storage.set_trial_system_attr(r.trial._trial_id, INTERRUPTED, True)
                study.tell(r.trial, state=TrialState.FAIL)
                study.enqueue_trial(r.trial.params, user_attrs={"retry_of": r.trial.number})
                self._mlflow_trial_done(r.trial.number, "FAIL", "interrupted", r.trial.params)
        self.running = []

    # -- the loop ----------------------------------------------------------------------------------

    def run(self):
        """Run trials until the study holds n_trials (or the grid is done, or too many failed)."""
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        with _file_lock(self.lock_path):
            study, storage = self._open_study()
            self._mlflow_parent(study)
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
        grid_size = self._grid_size()
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        stopped = ""
        last_beat = time.monotonic()
        try:
            while True:
                while not stopped and len(self.running) < self.s.n_jobs:
                    with _file_lock(self.lock_path):
                        c = self._counts(study)
                        if self._too_many_failures(c):
                            stopped = (
                                f"{c['failed']} of n_trials={self.s.n_trials} trials failed, more than "
                                f"max_failure_rate={self.s.max_failure_rate:g}"
                            )
                            break
                        grid_done = grid_size is not None and c["grid_started"] >= grid_size
                        if c["used"] >= self.s.n_trials or (grid_done and not c["waiting"]):
                            break
                        trial = study.ask(self.space.distributions)
                        storage.set_trial_system_attr(trial._trial_id, _HOST, socket.gethostname())
                        storage.set_trial_system_attr(trial._trial_id, _PID, os.getpid())
                        storage.set_trial_system_attr(trial._trial_id, _BEAT, time.time())
                    self.running.append(self._launch(trial))
                if not self.running:
                    break
                time.sleep(POLL_S)
                for r in list(self.running):
                    if (rc := r.proc.poll()) is not None:
                        self.running.remove(r)
                        self._finish(study, r, rc)
                    elif self._overdue(r):
                        self._stop(r)
                if time.monotonic() - last_beat > HEARTBEAT_S:
                    self._heartbeat(storage)
                    last_beat = time.monotonic()
        except KeyboardInterrupt:
            self._interrupt(study, storage)
            self._close_parent(study, "KILLED")
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
        self._close_parent(study, "FAILED" if stopped else "FINISHED")
        results = self._results(study)
        if self.s.report:
            try:
                self.write_report(study)
            except Exception:  # the trials are recorded; `python -m vaerepro.sweep report` can retry
                log.exception("the sweep report could not be written")
        if stopped:
            raise SweepError(f"sweep stopped: {stopped}. Last failure: {self.last_failure}")
        return results

    def _close_parent(self, study, status: str) -> None:
        """Summary metrics and status of the study's MLflow run (MLflow trouble is logged, not raised)."""
        if not self.parent_run_id:
            return
        try:
            self._summarise_parent(study, status)
        except Exception as err:
            log.warning("could not update the study's MLflow run %s (%s)", self.parent_run_id, err)

    def _summarise_parent(self, study, status: str) -> None:
        from optuna.trial import TrialState

        from vaerepro import tracking

        client = _client(self.tracking)
        trials = study.get_trials(deepcopy=False)
        n = {
            s: sum(t.state == s for t in trials)
            for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
        }
        metrics = {
            "trials_complete": n[TrialState.COMPLETE],
            "trials_pruned": n[TrialState.PRUNED],
            "trials_failed": n[TrialState.FAIL],
        }
        best = best_trial(study)
        if best is not None:
            # named like every metric (tracking.metric_name): best/knn_accuracy, or binary/best/log_px for an
            # objective in the units of the study's one data space
            space = tracking.space_name(
                best.user_attrs.get("data_space"), bool(best.user_attrs.get("improper"))
            )
            metrics[tracking.metric_name(f"best/{self.s.objective}", space)] = best.value
            client.set_tag(self.parent_run_id, "best_trial", str(best.number))
            client.set_tag(self.parent_run_id, "best_command", best_command(best))
        for k, v in metrics.items():
            client.log_metric(self.parent_run_id, k, float(v), step=len(trials))
        if status != "FINISHED" or not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            client.set_terminated(self.parent_run_id, status)  # other sweep processes still running: leave it

    def _results(self, study) -> dict[str, Any]:
        best = best_trial(study)
        results = {
            "name": "vaerepro_optuna",
            "study_name": self.s.study_name,
            "storage": self.s.storage,
            "objective": self.s.objective,
            "direction": self.s.direction,
            "best_value": None if best is None else best.value,
            "best_params": None if best is None else dict(best.params),
            "best_command": None if best is None else best_command(best),
            "mlflow_parent_run_id": self.parent_run_id,
        }
        (self.sweep_dir / "optimization_results.json").write_text(json.dumps(results, indent=2) + "\n")
        if best is not None:
            log.info(
                "best trial %d: %s = %.4f\n  %s",
                best.number,
                self.s.objective,
                best.value,
                best_command(best),
            )
        return results

    def write_report(self, study) -> dict[str, Path]:
        runs = None
        if self.tracking.enabled:
            runs = study_runs(self.tracking, study)
        from vaerepro.sweep_report import write_sweep_report

        paths = write_sweep_report(study, self.sweep_dir / "report", runs=runs, storage=self.s.storage)
        if self.parent_run_id:
            _client(self.tracking).log_artifacts(self.parent_run_id, str(self.sweep_dir / "report"), "report")
        log.info("sweep report: %s", paths["html"])
        return paths


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def best_trial(study):
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        return None
    pick = max if study.direction.name == "MAXIMIZE" else min
    return pick(done, key=lambda t: t.value)


def best_command(trial) -> str:
    """The trial's configuration as a ready-to-run command line."""
    overrides = trial.user_attrs.get("overrides") or [
        f"{k}={override_value(v)}" for k, v in trial.params.items()
    ]
    return shlex.join(["vaerepro", "run", *overrides])


def study_runs(t: Tracking, study) -> list[dict[str, Any]]:
    """The report rows (tracking.experiment_runs) of the study's trial runs."""
    from vaerepro import tracking
    from vaerepro.config import Config, TrackingConfig

    ids = {tr.user_attrs.get("mlflow_run_id") for tr in study.get_trials(deepcopy=False)} - {None}
    cfg = Config(tracking=TrackingConfig(uri=t.uri, experiment=t.experiment))
    return [r for r in tracking.experiment_runs(cfg) if r["run_id"] in ids]


# --------------------------------------------------------------------------------------- trial process


@functools.cache
def pruning_callback_type() -> type:
    """The Lightning callback class, defined on first use: the sweep process itself never imports Lightning
    (about 3 s of every sweep's start-up); trial processes do anyway."""
    import lightning.pytorch as pl

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

    return OptunaPruning


def trial_callbacks() -> list:
    """The pruning callback when this process is a sweep trial (the sweeper's environment), else nothing."""
    storage, study, number = (os.environ.get(k) for k in (ENV_STORAGE, ENV_STUDY, ENV_TRIAL))
    if not (storage and study and number):
        return []
    pruner = json.loads(os.environ.get(ENV_PRUNER) or '{"name": "none"}')
    return [pruning_callback_type()(storage, study, int(number), pruner)]


def _die_with_parent() -> None:
    """Linux: a trial process (and each DDP rank) gets SIGTERM when the process that started it dies."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent died before prctl took effect
            sys.exit(1)


def run_trial(argv: Sequence[str]) -> int:
    """`vaerepro run argv...`, exiting with PRUNED_EXIT_CODE when the pruner stopped the trial."""
    import optuna

    from vaerepro import cli

    if os.environ.get(ENV_TRIAL):
        _die_with_parent()
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # Hydra would turn every exception into exit code 1
    try:
        return cli.main(["run", *argv])
    except optuna.TrialPruned as err:
        print(f"vaerepro: {err}", file=sys.stderr)
        return PRUNED_EXIT_CODE


def _report_main(argv: Sequence[str]) -> int:
    import argparse

    import optuna

    from vaerepro import config as config_mod
    from vaerepro import tracking

    p = argparse.ArgumentParser(
        prog="python -m vaerepro.sweep report", description="write the sweep report of a study"
    )
    p.add_argument("study_name")
    p.add_argument("--storage", default=None, help="journal file or RDB URL (default: optuna/<study>.log)")
    p.add_argument("--out", default=None, help="directory (default: runs/sweeps/<study>/report)")
    args = p.parse_args(argv)
    root = config_mod.find_project_root()
    spec = resolve_storage(args.storage, args.study_name, root)
    study = optuna.load_study(study_name=args.study_name, storage=open_storage(spec))
    cfg = config_mod.validate(config_mod.compose())
    runs = None
    if cfg.tracking.enabled:
        t = Tracking(tracking.tracking_uri(cfg, root), cfg.tracking.experiment)
        runs = study_runs(t, study)
    out = Path(args.out) if args.out else root / "runs" / "sweeps" / args.study_name / "report"
    from vaerepro.sweep_report import write_sweep_report

    print(write_sweep_report(study, out, runs=runs, storage=spec)["html"])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """python -m vaerepro.sweep OVERRIDES...      one trial (what the sweeper runs)
    python -m vaerepro.sweep report STUDY [...]   the sweep report of a study"""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        return _report_main(argv[1:])
    return run_trial(argv)


if __name__ == "__main__":
    sys.exit(main())
