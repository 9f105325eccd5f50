"""Optuna sweeps: a study whose trials are `vaerepro run` processes, their pruning, and the sweep report.

The Hydra sweeper `vaerepro_optuna` (src/hydra_plugins/vaerepro_optuna_sweeper) turns its config into a
`SearchSpace` and `SweepSettings` and calls `Sweep.run`; everything Optuna-specific lives here.

    space.py     the search space (Hydra sweep syntax -> Optuna distributions -> trial overrides), the
                 objective's direction, and refusing a density objective across data spaces
    study.py     the Optuna study: samplers, pruners, storage, the lock sweep processes share, opening and
                 counting, the best trial; the environment variables and exit code trials share
    runner.py    the sweep process: class Sweep asks, runs trial processes (n_jobs at once), tells; stale
                 trials of dead sweep processes; the study's MLflow run (through vaerepro.tracking.sweep)
    outcome.py   a finished trial process's state, value and failure reason (exit code, eval.json)
    pruning.py   the trial side's Lightning callback reporting the validation ELBO (imports Lightning)
    trial.py     a trial process: `vaerepro run` exiting with PRUNED_EXIT_CODE when pruned
    report.py    the sweep report: the AEVB Figure 2 view per data space, history, importances, best trial
    __main__.py  `python -m vaerepro.sweep OVERRIDES...` (a trial), `python -m vaerepro.sweep report STUDY`

The sweep process never imports Lightning (pruning.py, trial.py): this package re-exports names of
space.py and study.py only. Its MLflow calls are in vaerepro.tracking.sweep.
"""

from vaerepro.sweep.space import (
    NATURAL_DIRECTION,
    PATH_MD5,
    SPACE_FREE_OBJECTIVES,
    SearchSpace,
    data_spaces,
    grid_values,
    measurement_keys,
    measurement_settings,
    override_value,
    parse_search_space,
    refuse_mixed_spaces,
    refuse_swept_measurement,
    refuse_unlabelled,
    resolve_direction,
    space_combinations,
    spaces_of,
    trial_configs,
    trial_overrides,
)
from vaerepro.sweep.study import (
    ENV_PARENT_RUN_ID,
    ENV_PRUNER,
    ENV_STORAGE,
    ENV_STUDY,
    ENV_TRIAL,
    INTERRUPTED,
    PRUNED_EXIT_CODE,
    best_command,
    best_trial,
    check_sampler_and_pruner,
    make_pruner,
    make_sampler,
    open_storage,
    resolve_storage,
)

__all__ = [
    "ENV_PARENT_RUN_ID",
    "ENV_PRUNER",
    "ENV_STORAGE",
    "ENV_STUDY",
    "ENV_TRIAL",
    "INTERRUPTED",
    "NATURAL_DIRECTION",
    "PATH_MD5",
    "PRUNED_EXIT_CODE",
    "SPACE_FREE_OBJECTIVES",
    "SearchSpace",
    "best_command",
    "best_trial",
    "check_sampler_and_pruner",
    "data_spaces",
    "grid_values",
    "make_pruner",
    "make_sampler",
    "measurement_keys",
    "measurement_settings",
    "open_storage",
    "override_value",
    "parse_search_space",
    "refuse_mixed_spaces",
    "refuse_swept_measurement",
    "refuse_unlabelled",
    "resolve_direction",
    "resolve_storage",
    "space_combinations",
    "spaces_of",
    "trial_configs",
    "trial_overrides",
]
