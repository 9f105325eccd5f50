"""The structured config of the `vaerepro_optuna` sweeper, registered in Hydra's ConfigStore.

Keys follow Hydra's own Optuna sweeper (hydra-optuna-sweeper) so habits carry over: `hydra/sweeper/sampler=`
tpe|random|grid|cmaes with `hydra.sweeper.sampler.seed`, `direction`, `storage`, `study_name`, `n_trials`,
`n_jobs`, `max_failure_rate` and `params` written with Hydra's sweep syntax (choice, range, interval,
tag(log, interval)). Added: `objective` (a key of metrics/eval.json), `hydra/sweeper/pruner=`
none|median|hyperband, `multivariate` and `constant_liar` (TPE), `trial_timeout` (seconds before a trial
is stopped and failed) and `report` (the sweep report when the sweep ends).

Samplers and pruners are named, not `_target_` paths: `vaerepro.sweep.study.make_sampler` / `make_pruner`
build them, and the pruner's settings travel to each trial process as JSON.
"""

# No `from __future__ import annotations`: Hydra executes this module outside sys.modules while
# scanning for plugins, and dataclasses cannot resolve string annotations there.
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore


@dataclass
class TPESamplerConf:
    name: str = "tpe"
    seed: int | None = None
    n_startup_trials: int = 10  # random trials before TPE models the search space


@dataclass
class RandomSamplerConf:
    name: str = "random"
    seed: int | None = None


@dataclass
class GridSamplerConf:
    # every combination of the choice(...) / range(...) params; n_trials caps it, and the sweep stops when the
    # grid is exhausted
    name: str = "grid"
    seed: int | None = None


@dataclass
class CmaEsSamplerConf:
    # numeric params only; categorical ones fall back to independent random sampling (Optuna warns)
    name: str = "cmaes"
    seed: int | None = None
    n_startup_trials: int = 1


@dataclass
class NoPrunerConf:
    name: str = "none"


@dataclass
class MedianPrunerConf:
    # prune a trial whose validation ELBO at an epoch is below the median of earlier trials at that epoch
    name: str = "median"
    n_startup_trials: int = 5  # completed trials before anything is pruned
    n_warmup_steps: int = 1  # epochs of a trial never pruned
    interval_steps: int = 1


@dataclass
class HyperbandPrunerConf:
    name: str = "hyperband"
    min_resource: int = 1  # epochs
    max_resource: Any = "auto"  # epochs, or "auto": the epochs of the first completed trial
    reduction_factor: int = 3


@dataclass
class VaereproOptunaSweeperConf:
    _target_: str = "hydra_plugins.vaerepro_optuna_sweeper.optuna_sweeper.VaereproOptunaSweeper"
    # _self_ first: the chosen sampler / pruner nodes fill `sampler` and `pruner` below
    defaults: list[Any] = field(default_factory=lambda: ["_self_", {"sampler": "tpe"}, {"pruner": "none"}])

    sampler: Any = None
    pruner: Any = None

    # the key of metrics/eval.json a trial returns: log_px (density studies within one data space) or
    # knn_accuracy (comparable across likelihoods and data spaces), or another of sweep.space.OBJECTIVES
    objective: str = "log_px"
    # maximize | minimize; null: the objective's own sense (sweep.space.OBJECTIVES: bits_per_dim and kl are
    # minimised, the others maximised)
    direction: str | None = None
    # null: a journal file <project root>/optuna/<study_name>.log; or a journal file path, or an RDB URL
    # (sqlite:///path.db, postgresql://...); relative paths are taken from the project root
    storage: str | None = None
    # the same study_name and storage resume the study: finished trials are kept, n_trials is its total
    study_name: str = "vaerepro"
    n_trials: int = 20
    n_jobs: int = 1  # trial processes at once (per sweep process; start more sweeps for more machines)
    # stop when more than this fraction of n_trials has failed (0: the first failure stops the sweep)
    max_failure_rate: float = 0.0
    # seconds a trial process may run (training + evaluation); a trial still running then is stopped
    # (SIGTERM, SIGKILL after 30 s) and marked FAIL, and the sweep goes on. null: no limit
    trial_timeout: float | None = None
    multivariate: bool = False  # TPE only
    constant_liar: bool = False  # TPE only: parallel workers avoid proposing the same point
    # key: choice(a, b, ...) | range(start, stop[, step]) (stop excluded, as in Hydra's basic sweeper) |
    # interval(low, high) (float) | tag(int, interval(...)) | tag(log, interval(...)); command-line
    # `key=choice(...)` (or key=a,b) entries add to these and win for the same key
    params: dict[str, str] | None = None
    report: bool = True  # write the sweep report (HTML + Markdown) when the sweep ends


cs = ConfigStore.instance()
cs.store(group="hydra/sweeper", name="vaerepro_optuna", node=VaereproOptunaSweeperConf, provider="vaerepro")
for _name, _node in {
    "tpe": TPESamplerConf,
    "random": RandomSamplerConf,
    "grid": GridSamplerConf,
    "cmaes": CmaEsSamplerConf,
}.items():
    cs.store(group="hydra/sweeper/sampler", name=_name, node=_node, provider="vaerepro")
for _name, _node in {
    "none": NoPrunerConf,
    "median": MedianPrunerConf,
    "hyperband": HyperbandPrunerConf,
}.items():
    cs.store(group="hydra/sweeper/pruner", name=_name, node=_node, provider="vaerepro")
