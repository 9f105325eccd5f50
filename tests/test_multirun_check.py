"""`vaerepro run --multirun` with Hydra's basic sweeper: every swept value is checked before any job starts.

A bad swept value (an unknown option, a value the config refuses) was Hydra's several lines and exit status 1
(after it had written the sweep dir), or, for a value only vaerepro's validation refuses, came after the jobs
before it had trained. Now it is one line naming the key and the value, exit status 2, and nothing written.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from conftest import BIN, ROOT, TINY
from vaerepro import run_overrides
from vaerepro.config import ConfigError


def _vaerepro_run(args: list[str], cwd, path: str | None = None) -> subprocess.CompletedProcess:
    """`vaerepro run ARGS` in cwd, the venv's commands first on PATH (or PATH=`path`)."""
    env = {**os.environ, "PATH": path or f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    for name in ("MLFLOW_TRACKING_URI", "HYDRA_FULL_ERROR", "VAEREPRO_DEBUG"):
        env.pop(name, None)  # the default store: <project root>/mlflow.db, which must not appear
    return subprocess.run(
        ["vaerepro", "run", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize(
    ("swept", "bad"),
    [
        ("likelihood=poisson,bernoulli", "likelihood=poisson"),  # the first job's value
        ("likelihood=bernoulli,poisson", "likelihood=poisson"),  # a later job's
        ("model.latent_dim=2,0", "model.latent_dim=0"),  # composes, refused by validation: trained job 0
        ("model.latent_dim=choice(3,-1)", "model.latent_dim=-1"),
        ("model.latent_dim=range(0,2)", "model.latent_dim=0"),
    ],
)
@pytest.mark.slow
def test_a_bad_swept_value_is_one_line_exit_2_before_anything_is_written(tmp_path, swept, bad):
    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    # tiny, so that a job the check lets through is seconds, not minutes
    proc = _vaerepro_run(["--multirun", *TINY, "train.max_epochs=1", "seed=0,1", swept], tmp_path)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("vaerepro run: ") and bad in lines[0], lines
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conf"]  # no runs/, mlflow.db, data/


@pytest.mark.slow
def test_a_valid_basic_sweep_passes_the_check():
    for argv in (
        ["--multirun", "likelihood=bernoulli,gaussian", "model.latent_dim=range(2,4)", "seed=choice(0,1)"],
        ["-m", "likelihood=glob(*)", "model.hidden_dims=[64],[32,32]"],
        ["-m", "model.latent_dim=2,0", "model.latent_dim=3"],  # a later override of a key replaces it
    ):
        run_overrides.check_overrides(argv, ROOT)


@pytest.mark.slow
def test_the_slurm_launcher_where_slurm_is_not_is_one_line_before_anything_is_written(tmp_path, monkeypatch):
    """`hydra/launcher=slurm` on a machine without srun was submitit's RuntimeError traceback from inside
    Hydra, exit status 1, after Hydra had made the sweep's directory. It is one line now, exit status 2, with
    nothing written; on a cluster's node (sbatch and srun on PATH) the check lets it through."""
    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    argv = [
        "--multirun",
        "hydra/launcher=slurm",
        "hydra.launcher.partition=gpu",
        *TINY,
        "model.latent_dim=2,3",
    ]
    proc = _vaerepro_run(argv, tmp_path, path=str(BIN))  # the venv's commands only: no srun
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = proc.stderr.splitlines()
    assert line == (
        "vaerepro run: hydra/launcher: SlurmLauncher submits the jobs with sbatch and srun, and this machine "
        "has no sbatch or srun on PATH (it is not a node of a SLURM cluster): run the sweep from the "
        "cluster's login node, or leave out hydra/launcher=slurm to run the jobs here"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conf"]  # no runs/ (Hydra's sweep dir)

    cluster = tmp_path / "cluster-bin"
    cluster.mkdir()
    for command in ("sbatch", "srun"):
        (cluster / command).write_text("#!/bin/sh\nexit 0\n")
        (cluster / command).chmod(0o755)
    monkeypatch.setenv("PATH", str(cluster))
    run_overrides.check_overrides(argv, ROOT)  # passes
    (cluster / "srun").unlink()
    with pytest.raises(ConfigError, match="this machine has no srun on PATH"):
        run_overrides.check_overrides(argv, ROOT)


def test_the_optuna_sweepers_search_space_is_left_to_it():
    # interval and tag sweeps are the Optuna sweeper's; it checks its search space itself when it starts
    run_overrides.check_overrides(
        [
            "-m",
            "hydra/sweeper=vaerepro_optuna",
            "model.latent_dim=choice(0,2)",
            "train.lr=tag(log,interval(1e-4,1e-2))",
        ],
        ROOT,
    )
    run_overrides.check_overrides(
        ["-m", "+sweep=aevb", "model.latent_dim=0,2", "hydra.sweeper.n_trials=3"], ROOT
    )


def test_an_interval_under_the_basic_sweeper_is_one_line_naming_the_optuna_sweeper():
    with pytest.raises(ConfigError, match=r"model.latent_dim=interval\(1,3\).*vaerepro_optuna") as err:
        run_overrides.check_overrides(["-m", "model.latent_dim=interval(1,3)"], ROOT)
    assert "\n" not in str(err.value)


def test_values_invalid_together_are_refused_naming_both():
    # each value passes with the first job's others; Gaussian on binary data does not
    with pytest.raises(ConfigError, match=r"likelihood=gaussian data.space=binary: .*'binary'"):
        run_overrides.check_overrides(["-m", "likelihood=bernoulli,gaussian", "data.space=auto,binary"], ROOT)


def test_beyond_the_cap_each_swept_value_is_still_checked(monkeypatch):
    monkeypatch.setattr(run_overrides, "MULTIRUN_CHECK_JOBS", 2)
    with pytest.raises(ConfigError, match=r"overrides model.latent_dim=0: model.latent_dim"):
        run_overrides.check_overrides(["-m", "seed=0,1,2", "model.latent_dim=2,3,0"], ROOT)


def test_the_basic_sweepers_params_in_the_config_are_checked(tmp_path):
    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    (tmp_path / "conf" / "sweep" / "basic_bad.yaml").write_text(
        "# @package _global_\nhydra:\n  sweeper:\n    params:\n      likelihood: bernoulli,poisson\n"
    )
    with pytest.raises(ConfigError, match=r"overrides likelihood=poisson: .*'likelihood/poisson'"):
        run_overrides.check_overrides(["-m", "+sweep=basic_bad", "model.latent_dim=2,3"], tmp_path)


def test_two_of_hydras_modes_are_one_line_not_its_traceback():
    """-m with --cfg job: Hydra raises a ValueError (a traceback, exit 1); one mode alone is Hydra's."""
    with pytest.raises(ConfigError, match=r"exclude each other; got --cfg, -m$"):
        run_overrides.check_overrides(["-m", "model.latent_dim=2,3", "--cfg", "job"], ROOT)
    with pytest.raises(ConfigError, match=r"got --info, --multirun$"):
        run_overrides.check_overrides(["--multirun", "--info=config"], ROOT)
    assert run_overrides.check_overrides(["--cfg", "job", "model.latent_dim=3"], ROOT) is None
    assert run_overrides.check_overrides(["-m", "--multirun", "model.latent_dim=2,3"], ROOT) is None


@pytest.mark.parametrize("mode", [[], ["-m"]])
@pytest.mark.parametrize(
    ("override", "problem"),
    [
        ("hydra.foo=1", "hydra.foo: no such key (hydra has run, sweep, launcher, sweeper, help, "),
        ("hydra/launcher=nope", "In 'hydra/config': Could not find 'hydra/launcher/nope' Available options"),
    ],
)
def test_an_unknown_key_or_option_of_hydras_own_is_one_line(mode, override, problem):
    """Hydra's own keys were left to Hydra: 7 lines and exit status 1, for a single run and --multirun."""
    with pytest.raises(ConfigError) as err:
        run_overrides.check_overrides([*mode, override, "seed=1,2" if mode else "seed=1"], ROOT)
    named = override if mode else f"{override} seed=1"  # a single run's line names all its overrides
    assert str(err.value).startswith(f"overrides {named}: {problem}"), err.value


def test_sweeping_hydras_own_key_is_one_line():
    with pytest.raises(ConfigError) as err:
        run_overrides.check_overrides(["-m", "hydra.job.name=a,b"], ROOT)
    assert (
        str(err.value) == "overrides hydra.job.name=a,b: Sweeping over Hydra's configuration is not supported"
    )


def test_a_run_or_sweep_directory_at_or_under_a_file_is_one_line(tmp_path):
    """Hydra's mkdir of hydra.run.dir / hydra.sweep.dir there was a FileExistsError or NotADirectoryError
    traceback, exit status 1."""
    taken = tmp_path / "notes.txt"
    taken.write_text("a file the user keeps\n")
    for argv, key, path in (
        ([f"hydra.run.dir={taken}"], "hydra.run.dir", taken),
        ([f"hydra.run.dir={taken}/run"], "hydra.run.dir", taken / "run"),
        (["-m", f"hydra.sweep.dir={taken}/grid", "seed=1,2"], "hydra.sweep.dir", taken / "grid"),
    ):
        with pytest.raises(ConfigError) as err:
            run_overrides.check_overrides(argv, ROOT)
        assert str(err.value) == f"{key}={path}: {taken} is a file, not a directory"
    assert taken.read_text() == "a file the user keeps\n"
    run_overrides.check_overrides([f"hydra.run.dir={tmp_path}/new/run"], ROOT)  # to make: no refusal
