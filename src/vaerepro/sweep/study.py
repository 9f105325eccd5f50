"""The Optuna study of a sweep: samplers, pruners, its storage and lock, its best trial, and the names
the sweep process and its trial processes share (environment variables, exit codes, trial attributes).

The study lives in persistent storage (a journal file by default) and is resumed by running the same
command again; several sweep processes may share one study, serialised by `file_lock`.
"""

from __future__ import annotations

import contextlib
import logging
import shlex
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from vaerepro.config import ConfigError
from vaerepro.sweep.space import SearchSpace, grid_values, override_value

log = logging.getLogger(__name__)

# What the sweeper tells a trial process (tracking.run_tags and `pruning.trial_callbacks` read them).
ENV_STUDY = "VAEREPRO_STUDY"
ENV_TRIAL = "VAEREPRO_TRIAL"  # the trial number
ENV_PARENT_RUN_ID = "VAEREPRO_PARENT_RUN_ID"  # the study's MLflow run
ENV_STORAGE = "VAEREPRO_OPTUNA_STORAGE"  # journal file path or RDB URL
ENV_PRUNER = "VAEREPRO_OPTUNA_PRUNER"  # the pruner's settings, JSON

PRUNED_EXIT_CODE = 3  # a trial process stopped by the pruner (1: an error, 2: a configuration error)

# A trial system attribute (bookkeeping, not shown as a user attribute): the trial was failed because its
# sweep process was interrupted or died, and does not count towards n_trials (its configuration is queued
# again). The scheduler's own attributes (host, pid, heartbeat) are in runner.py.
INTERRUPTED = "vaerepro:interrupted"


# ---------------------------------------------------------------------------------- samplers, pruners


def make_sampler(
    conf: Mapping[str, Any],
    space: SearchSpace,
    *,
    multivariate: bool = False,
    constant_liar: bool = False,
    seed_offset: int = 0,
):
    """The sampler named by `hydra/sweeper/sampler` (tpe, random, grid, cmaes); its seed plus seed_offset."""
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
    """The pruner named by `hydra/sweeper/pruner` (none, median, hyperband), with its settings."""
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


# ------------------------------------------------------------------------------ storage, lock, study


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
    """The Optuna storage of a resolved spec: an RDB URL, or a journal file (its directory created)."""
    import optuna

    if "://" in spec:
        return optuna.storages.RDBStorage(spec)
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    Path(spec).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(spec))


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Serialise sweep processes of one project over a study's bookkeeping (counting slots, asking)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def open_study(
    study_name: str,
    storage: str,
    *,
    direction: str,
    objective: str,
    space: SearchSpace,
    sampler: Mapping[str, Any],
    pruner: Mapping[str, Any] | None,
    multivariate: bool = False,
    constant_liar: bool = False,
):
    """(study, storage): the study created, or loaded to resume it, with the calling sweep process's sampler.

    Refuses a study of another direction or objective. Keeps the objective and search space in the study's
    user attributes, and counts the sweep processes that opened it (sweep_processes). Call it under
    `file_lock`: several sweep processes may open one study at once.
    """
    import warnings

    import optuna

    store = open_storage(storage)
    study = optuna.create_study(
        study_name=study_name, storage=store, direction=direction, load_if_exists=True
    )
    attrs = study.user_attrs
    if study.direction.name.lower() != direction:
        raise ConfigError(
            f"study {study_name!r} in {storage} is a {study.direction.name.lower()} study; "
            f"direction={direction} needs another hydra.sweeper.study_name"
        )
    if attrs.get("objective", objective) != objective:
        raise ConfigError(
            f"study {study_name!r} in {storage} optimises {attrs['objective']}, not "
            f"{objective}: use another hydra.sweeper.study_name (or the same objective)"
        )
    if "objective" not in attrs:
        study.set_user_attr("objective", objective)
    # the objective's name where Optuna shows values (dashboard, trials_dataframe), not "Objective 0";
    # set_metric_names is still marked experimental in Optuna 4 and 5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([objective])
    shown = {k: str(d) for k, d in space.distributions.items()}
    if attrs.get("search_space", shown) != shown:
        log.warning("study %s: the search space changed since its last sweep", study_name)
    study.set_user_attr("search_space", shown)
    # Every sweep process of the study draws from its own seed (seed + k for the k-th): a resumed or
    # second process with the same seed would otherwise propose the same points again.
    k = int(attrs.get("sweep_processes", 0))
    study.set_user_attr("sweep_processes", k + 1)
    study.sampler = make_sampler(
        sampler, space, multivariate=multivariate, constant_liar=constant_liar, seed_offset=k
    )
    study.pruner = make_pruner(pruner)
    return study, store


def count_trials(study) -> dict[str, int]:
    """Trials by what they mean for the sweep's budget: used (counting towards n_trials: all but queued and
    interrupted ones), waiting (queued), failed (used and FAIL), grid_started (grid points drawn)."""
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


# ---------------------------------------------------------------------------------------- the results


def best_trial(study):
    """The best COMPLETE trial in the study's direction, or None."""
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


def trial_run_ids(study) -> set[str]:
    """The MLflow run ids of the study's trials (the user attribute mlflow_run_id the sweep sets)."""
    return {t.user_attrs.get("mlflow_run_id") for t in study.get_trials(deepcopy=False)} - {None}
