"""A `vaerepro run`'s directory is its own: made and marked before anything is written there.

<run dir>/.vaerepro-run (`RUN_MARK`) is written by every `vaerepro run` into its directory before anything
else (JSON: when it started, its overrides); another run into that directory is refused unless it resumes
the run (`claim`). Hydra names a run's directory by the second it started, the likelihood, latent size and
seed: of two runs started in one second (a shell loop over learning rates) the second makes <dir>_run2
before Hydra writes there (`claim_named`); a run given a used hydra.run.dir (`taken`) or a --multirun given
a used hydra.sweep.dir (`check_sweep_dir`) would otherwise write into that run's directory: one run's
params.yaml beside the other's results. A reproduction's seed run again from the start removes the mark.
The directories conf/ names (runs/...) are the project root's wherever in the project a run starts
(`at_project_root`), as its data/, mlflow.db and optuna/ are.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

from vaerepro.config import ConfigError

RUN_MARK = ".vaerepro-run"


def ddp_child() -> bool:
    """Whether Lightning's DDP launcher started this process as another rank of a command (LOCAL_RANK >= 1,
    or a node other than the first), rather than the user starting it: such a rank runs in the directory
    that rank 0 claimed, and claims none."""
    return int(os.environ.get("LOCAL_RANK", 0)) > 0 or int(os.environ.get("NODE_RANK", 0)) > 0


class RunDirTaken(ConfigError):
    """The run's directory holds another run's files (RUN_MARK): refused, and nothing there is touched."""


def claim(out_dir: Path, overrides: Sequence[str], *, resume: bool) -> None:
    """Mark out_dir as this run's (RUN_MARK, created exclusively, so of two runs started together one gets
    it); RunDirTaken when another run marked it first, unless this run resumes it (train.resume=true
    continues the run in its directory: train checks that its checkpoint is of this configuration).
    Directories of runs from before the mark are not recognised."""
    mark = out_dir / RUN_MARK
    record = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "overrides": list(overrides)}
    try:
        with mark.open("x") as fh:
            json.dump(record, fh)
        return
    except FileExistsError:
        if resume:
            mark.write_text(json.dumps(record))
            return
    raise taken(out_dir)


def claim_named(argv: list[str], root: Path, job_name: str) -> str | None:
    """Make and mark (RUN_MARK) the directory of a single `vaerepro run` whose hydra.run.dir is a pattern (the
    default runs/<time>_<likelihood>_z<latent>_s<seed>, or one given with ${...}), before Hydra writes its
    .hydra/ files into it: the directory as the pattern names it, or, when another run has it (two runs
    started in the same second: a shell loop over learning rates), the first free of <dir>_run2, _run3, ...
    Each name is taken with one mkdir, which of two processes only one can make. The directory's path as Hydra
    is to be given it; None where Hydra's own naming stands: a literal hydra.run.dir (refused by
    run_overrides.check_overrides when another run marked it, `taken`; continued by train.resume=true), a
    resume, --multirun (its jobs claim theirs), Hydra's other modes, and a pattern that cannot be resolved
    before the job starts (${hydra:runtime.output_dir}), which the job claims as it did. Hydra's other values
    (${hydra:job.name}, ...) resolve as the job will have them: `job_name` is the name Hydra gives the job
    (that of the module defining the Hydra app, cli). A DDP rank other than 0 claims nothing: its caller does
    not call this (rank 0's directory)."""
    if any(a.startswith("-") for a in argv):
        return None
    given = [a.split("=", 1)[1] for a in argv if a.removeprefix("++").startswith("hydra.run.dir=")]
    if given and "${" not in given[-1]:
        return None
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException
    from hydra.types import RunMode
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    hydra_config = HydraConfig.instance()
    before = hydra_config.cfg
    try:
        conf = str((root / "conf").resolve())
        with initialize_config_dir(config_dir=conf, version_base="1.3", job_name=job_name):
            cfg = compose(config_name="config", overrides=list(argv), return_hydra_config=True)
        if cfg.train.resume or cfg.hydra.mode == RunMode.MULTIRUN:  # hydra.mode=MULTIRUN is --multirun
            return None
        hydra_config.set_config(cfg)  # ${hydra:job.name}, ... resolve as in the job; runtime.output_dir not
        pattern = str(OmegaConf.select(cfg, "hydra.run.dir", throw_on_missing=True))
    except (HydraException, OmegaConfBaseException, ValueError):
        return None
    finally:
        hydra_config.cfg = before  # the job sets its own
    base = Path(pattern)
    overrides = [a for a in argv if not a.lstrip("+~").startswith(("hydra.", "hydra/"))]
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
        for n in range(1, 10_000):
            out_dir = base if n == 1 else base.with_name(f"{base.name}_run{n}")
            try:
                out_dir.mkdir()
            except FileExistsError:
                continue
            claim(out_dir, overrides, resume=False)
            return str(out_dir)
    except OSError as err:  # a file where a directory should be, no permission: Hydra's would be a traceback
        raise ConfigError(
            f"hydra.run.dir={pattern}: cannot make the run's directory ({err.filename}: {err.strerror})"
        ) from None
    return None  # ten thousand runs of one name: Hydra's directory, claimed by the job as before


def at_project_root(argv: list[str], root: Path) -> list[str]:
    """argv, with the run's directory (a --multirun's: the sweep's) that conf/ names relative to where the
    command starts (runs/<time>_..., runs/multirun/<time>, runs/sweeps/<study>) given as the same pattern
    under the project's root, when the command starts elsewhere: a `vaerepro run` in a subdirectory of the
    project (docs/, notebooks/) writes into the project's runs/, beside the data/, mlflow.db and optuna/ it
    uses, not into that subdirectory, where Hydra would. A directory given on the command line is left as
    given, relative to where the user is; so are Hydra's other modes (--cfg, ...). A command line Hydra
    cannot compose is left to run_overrides.check_overrides to refuse."""
    flags = [a for a in argv if a[:1] == "-"]
    if Path.cwd().resolve() == root.resolve() or any(f not in ("-m", "--multirun") for f in flags):
        return argv
    multirun = bool(flags) or "hydra.mode=MULTIRUN" in argv
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    if any(a.removeprefix("++").startswith(f"{key}=") for a in argv):
        return argv
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    try:
        # a --multirun's swept values (latent_dim=2,5) do not compose; the directory's pattern takes none
        parser = OverridesParser.create()
        overrides = [a for a in argv if a[:1] != "-" and not parser.parse_override(a).is_sweep_override()]
        with initialize_config_dir(config_dir=str((root / "conf").resolve()), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
        # the pattern as conf/ writes it, ${now:...} and all: Hydra resolves it as before
        pattern = OmegaConf.to_container(cfg.hydra["sweep" if multirun else "run"], resolve=False)["dir"]
    except Exception:  # noqa: BLE001 - an override Hydra refuses: check_overrides says so in one line
        return argv
    return argv if Path(pattern).is_absolute() else [*argv, f"{key}={_quoted(str(root / pattern))}"]


def _quoted(text: str) -> str:
    """text as a quoted Hydra override value (any path; a ${...} in it still resolves)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def taken(out_dir: Path) -> RunDirTaken:
    """The refusal of a run into out_dir, which another run marked (RUN_MARK), naming when it started."""
    try:
        started = json.loads((out_dir / RUN_MARK).read_text()).get("started", "?")
    except (OSError, ValueError):  # being written by the run that took it, this instant
        started = "just now"
    return RunDirTaken(
        f"{out_dir}: holds the files of another `vaerepro run` (started {started}), which this run would "
        "overwrite; give this run its own directory (hydra.run.dir=..., or hydra.sweep.dir=... under "
        "--multirun; their defaults name a new one), or continue that run with train.resume=true"
    )


def check_sweep_dir(sweep_dir: Path) -> None:
    """RunDirTaken when a basic-sweeper --multirun's directory holds the runs of an earlier one: Hydra numbers
    each --multirun's jobs from 0, so its job directories would be the earlier jobs' (the same numbers,
    likelihoods, latent sizes and seeds), and Hydra writes a job's .hydra/ files there before the job can
    refuse. (The Optuna sweeper's directory holds its study's trials, which a resumed study adds to.)"""
    taken = sorted(d for d in sweep_dir.glob("*") if (d / RUN_MARK).is_file()) if sweep_dir.is_dir() else []
    if taken:
        shown = ", ".join(d.name for d in taken[:3]) + (
            f" and {len(taken) - 3} more" if len(taken) > 3 else ""
        )
        raise RunDirTaken(
            f"{sweep_dir}: holds the runs of an earlier --multirun ({shown}), which this one's jobs would "
            "overwrite; give it its own directory (hydra.sweep.dir=...), or leave hydra.sweep.dir to its "
            "default (a new second names a new directory)"
        )
