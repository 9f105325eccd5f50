"""A `vaerepro run` command line checked before Hydra starts: a mistake in it is one line, before any job.

Hydra reports a bad override in several lines and a traceback, after it has made the run's directory, and
its basic sweeper finds a job's mistake only when that job starts, after the jobs before it have trained.
`check_overrides` composes and validates the run's configuration first, or under --multirun every job's
(`check_basic_sweep`), and refuses a run or sweep directory that is a file or another run's
(run_dirs.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from vaerepro import config as config_mod
from vaerepro import run_dirs
from vaerepro.config import ConfigError

# Jobs of a basic-sweeper --multirun composed and validated one by one before any starts: every job when there
# are at most this many (values can be invalid together: a likelihood with a data space), otherwise each
# swept value once, in a job of the sweep. ~0.1 s a job, as long again as Hydra's own check of each job's
# composition before it launches them (which does not validate).
MULTIRUN_CHECK_JOBS = 64


# Hydra's command-line modes, of which a run takes one (its own message for two is a ValueError traceback)
HYDRA_MODE_FLAGS = frozenset(
    {"-r", "--run", "-m", "--multirun", "-c", "--cfg", "-i", "--info", "-sc", "--shell-completion"}
)


def check_overrides(argv: list[str], root: Path) -> None:
    """Compose and validate a single run's configuration before Hydra creates its run directory, so that a
    mistake leaves no empty directory behind and is one line (Hydra's own errors are several, and a
    traceback). Under --multirun the overrides every job shares must parse and compose: an unknown key or
    option is one line too, not Hydra's several lines and exit status 1. With Hydra's basic sweeper (the
    default) the swept values are checked too (`check_basic_sweep`), before any job has run; with the
    Optuna sweeper they are its search space, which it checks when it starts. Hydra's other flags (--cfg,
    ...) are left to it."""
    flags = [a for a in argv if a.startswith("-")]
    modes = sorted({f.split("=")[0] for f in flags} & HYDRA_MODE_FLAGS)
    if len(modes) > 1 and not {"-m", "--multirun"} >= set(modes):  # Hydra's own refusal is a traceback
        raise ConfigError(
            f"Hydra's --run, --multirun, --cfg, --info and --shell-completion exclude each other; got "
            f"{', '.join(modes)}"
        )
    if any(f not in ("-m", "--multirun") for f in flags):
        return
    overrides = [
        a for a in argv if not a.startswith("-") and not a.lstrip("+~").startswith(("hydra.", "hydra/"))
    ]
    # composed with Hydra's own keys too: an unknown hydra.foo=1 or hydra/launcher=foo was Hydra's 7 lines
    given_all = [a for a in argv if not a.startswith("-")]
    if not flags:
        cfg = config_mod.validate(config_mod.compose(overrides, config_dir=root / "conf"))
        if given_all != overrides:
            config_mod.compose(given_all, config_dir=root / "conf")
        # a hydra.run.dir given of another run: refused before Hydra writes its .hydra/ files over that run's
        # (app claims the directory, as the directories Hydra names and those of --multirun jobs)
        given = [a.split("=", 1)[1] for a in argv if a.removeprefix("++").startswith("hydra.run.dir=")]
        if given and "${" not in given[-1]:
            check_no_file_at("hydra.run.dir", Path(given[-1]))
        if given and "${" not in given[-1] and not cfg.train.resume and not run_dirs.ddp_child():
            if (Path(given[-1]) / run_dirs.RUN_MARK).exists():
                raise run_dirs.taken(Path(given[-1]))
        return
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    shared, hydra_shared = [], []
    for line in given_all:
        try:
            (override,) = parser.parse_overrides([line])
        except OverrideParseException as err:
            raise ConfigError(f"overrides {line}: {' '.join(str(err).split())}") from None
        if not override.is_sweep_override():
            (shared if line in overrides else hydra_shared).append(line)
        elif line not in overrides:  # as Hydra refuses it, in 3 lines and exit status 1
            raise ConfigError(f"overrides {line}: Sweeping over Hydra's configuration is not supported")
    config_mod.compose([*shared, *hydra_shared], config_dir=root / "conf")
    hydra_overrides = [a for a in argv if not a.startswith("-") and a not in overrides]
    check_basic_sweep(overrides, shared, hydra_overrides, root)


# The commands each launcher needs on the machine that launches the sweep: submitit's SLURM launcher submits
# with sbatch and refuses to start without srun, as a RuntimeError traceback from inside Hydra after Hydra
# has made the sweep's directory.
LAUNCHER_COMMANDS = {"SlurmLauncher": ("sbatch", "srun")}


def check_launcher_runs_here(target: str) -> None:
    """ConfigError when the launcher class `target` (hydra.launcher._target_) needs a command this machine
    lacks: `hydra/launcher=slurm` off a SLURM cluster's nodes."""
    needed = LAUNCHER_COMMANDS.get(target.rsplit(".", 1)[-1], ())
    if missing := [c for c in needed if shutil.which(c) is None]:
        raise ConfigError(
            f"hydra/launcher: {target.rsplit('.', 1)[-1]} submits the jobs with {' and '.join(needed)}, and "
            f"this machine has no {' or '.join(missing)} on PATH (it is not a node of a SLURM cluster): run "
            "the sweep from the cluster's login node, or leave out hydra/launcher=slurm to run the jobs here"
        )


def check_no_file_at(key: str, path: Path) -> None:
    """ConfigError when path, or the nearest of its parents that exists, is a file: Hydra's mkdir of the run's
    or the sweep's directory there was a traceback."""
    found = next((d for d in (path, *path.parents) if d.exists()), None)
    if found is not None and not found.is_dir():
        raise ConfigError(f"{key}={path}: {found} is a file, not a directory")


def check_basic_sweep(
    overrides: list[str], shared: list[str], hydra_overrides: list[str], root: Path
) -> None:
    """Refuse, before Hydra's basic sweeper starts a job, a --multirun of which a job cannot compose or
    validate: the first such job ran minutes of training, or the sweep failed after the jobs before it.

    The jobs are what the basic sweeper makes of `hydra.sweeper.params` and the command line: the cartesian
    product of each key's values (a,b,c, choice(...), range(...), glob(...); a later override of a key
    replaces an earlier one). Checked: the job of each key's first values, then each value of each key in
    that job, then, up to MULTIRUN_CHECK_JOBS jobs, all the others (values can be invalid together). A
    refusal names the swept values that differ from the first job (all of its swept values for the first).
    Another sweeper (vaerepro_optuna: hydra/sweeper=..., +sweep=aevb) is left to check its search space."""
    import math
    from itertools import product

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    parser = OverridesParser.create()
    hydra_fixed = []
    for line in hydra_overrides:
        try:
            (override,) = parser.parse_overrides([line])
        except HydraException:
            return  # Hydra's to report, before any job
        if not override.is_sweep_override():
            hydra_fixed.append(line)
    values: dict[str, list[str]] = {}  # key -> its `key=value` overrides, as the basic sweeper makes them
    swept: set[str] = set()
    with initialize_config_dir(config_dir=str((root / "conf").resolve()), version_base="1.3"):
        try:
            hcfg = compose(config_name="config", overrides=[*shared, *hydra_fixed], return_hydra_config=True)
            sweeper = OmegaConf.select(hcfg, "hydra.runtime.choices", default={}).get("hydra/sweeper")
            params = hcfg.hydra.sweeper.get("params")  # None unless set
            params = OmegaConf.to_container(params, resolve=True) if params else {}
        except Exception:  # noqa: BLE001 - an override Hydra refuses (or trips on): Hydra's to report
            return  # before any job
        if sweeper != "basic":
            return
        check_launcher_runs_here(str(OmegaConf.select(hcfg, "hydra.launcher._target_", default="")))
        try:  # an interpolation that does not resolve here is left to Hydra
            sweep_dir = Path(str(OmegaConf.select(hcfg, "hydra.sweep.dir")))
        except Exception:  # noqa: BLE001
            sweep_dir = None
        if sweep_dir is not None:
            check_no_file_at("hydra.sweep.dir", sweep_dir)
        if sweep_dir is not None and OmegaConf.select(hcfg, "train.resume") is not True:
            # (its jobs resuming their runs, train.resume=true, may go there)
            run_dirs.check_sweep_dir(sweep_dir)
        # a config loader lets the parser list a config group's options for glob(...)
        parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
        # where each comes from, for the message: hydra.sweeper.params first, as the sweeper reads them
        lines = [(f"hydra.sweeper.params: {k}={v}", f"{k}={v}") for k, v in params.items()]
        for line, text in [*lines, *((o, o) for o in overrides)]:
            try:
                (override,) = parser.parse_overrides([text])
                key = override.get_key_element()
                if not override.is_sweep_override():
                    values[key] = [f"{key}={override.get_value_element_as_str()}"]
                    swept.discard(key)
                    continue
                if not override.is_discrete_sweep():
                    raise ConfigError(
                        f"{line}: Hydra's basic sweeper takes a,b,c, choice(...), range(...) or glob(...); "
                        "interval(...) is the Optuna sweeper's (hydra/sweeper=vaerepro_optuna)"
                    )
                values[key] = [f"{key}={v}" for v in override.sweep_string_iterator()]
            except (HydraException, ValueError) as err:
                if isinstance(err, ConfigError):
                    raise
                raise ConfigError(f"overrides {line}: {' '.join(str(err).split())}") from None
            if not values[key]:
                raise ConfigError(f"overrides {line}: no value to sweep, so no job would run")
            swept.add(key)
    if not swept:
        return
    lists = list(values.values())
    # jobs as the index of each key's value: 0 is the first job's
    jobs = [(0,) * len(lists)]
    jobs += [
        tuple(j if k == i else 0 for k in range(len(lists)))
        for i, o in enumerate(lists)
        for j in range(1, len(o))
    ]
    if math.prod(len(o) for o in lists) <= MULTIRUN_CHECK_JOBS:
        jobs += [job for job in product(*(range(len(o)) for o in lists)) if sum(map(bool, job)) > 1]
    for job in jobs:
        overrides = [lists[k][j] for k, j in enumerate(job)]
        named = [o for o, j in zip(overrides, job, strict=True) if j] or [
            o for o, key in zip(overrides, values, strict=True) if key in swept
        ]
        raw = config_mod.compose(overrides, config_dir=root / "conf", named=named)
        try:
            config_mod.validate(raw)
        except ConfigError as err:
            raise ConfigError(f"overrides {' '.join(named)}: {err}") from None
