"""What a sweep refuses before it writes, and what an error inside a sweep leaves in its study.

- a resume that measures otherwise than the study's trials (the data set, its splits, K) given as fixed
  overrides: its values would be ranked against values of another test set;
- a resume whose categorical choices differ from the study's, which Optuna cannot store (it used to fail
  after study.ask, leaving a RUNNING trial without params that poisoned every later resume);
- a storage that is not an Optuna storage, or a study that is not in it (the sweep and its report);
- knn_accuracy as the objective on data without labels.

Each refusal is one line (ConfigError; exit status 2 through the sweeper or the report) and nothing is
written. The fast tests use test_sweep's FakeSweep (no training); the slow one runs the real command.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, compose
from test_sweep import _fake_sweep, _load, _states, _study, _sweep, _sweep_cmd
from vaerepro import signals, sweep
from vaerepro.config import ConfigError

GRID = {"name": "grid", "seed": 0}


def _files(*roots: Path) -> dict[Path, bytes | None]:
    """Every file (its bytes) and directory (None) under `roots`: what a refusal must leave as it was."""
    found: dict[Path, bytes | None] = {}
    for root in roots:
        for p in [root, *root.rglob("*")] if root.exists() else []:
            found[p] = p.read_bytes() if p.is_file() else None
    return found


def _refusal(err: pytest.ExceptionInfo) -> str:
    return " ".join(str(err.value).split())


# ---------------------------------------------------------------------- the measurement of a study


def test_measurement_settings_come_from_the_fixed_overrides_and_the_config():
    """What a study records as its measurement: every data key that changes the images or their splits,
    and K, as the trials' config resolves them; not the seeds (another draw of one measurement)."""
    assert sweep.measurement_keys() == [
        "data.source",
        "data.path",
        "data.val_fraction",
        "data.test_fraction",
        "data.split_seed",
        "data.max_examples",
        "data.split",
        "data.val_size",
        "eval.num_samples",
    ]
    space = sweep.parse_search_space(
        {"model.latent_dim": "choice(2, 3)", "likelihood": "choice(bernoulli, gaussian)"},
        ["data.split_seed=7", "eval.num_samples=5", "seed=3", "data.max_examples=600"],
    )
    configs = sweep.trial_configs(space, lambda overrides: compose(*overrides))
    assert list(configs) == ["likelihood=bernoulli", "likelihood=gaussian"]
    assert sweep.measurement_settings(configs) == {
        "data.source": "mnist5k",
        "data.path": None,
        "data.val_fraction": 0.1,
        "data.test_fraction": 0.2,
        "data.split_seed": 7,
        "data.max_examples": 600,
        "data.split": "pooled",
        "data.val_size": None,
        "eval.num_samples": 5,
    }


def test_a_resume_measuring_otherwise_is_refused_before_any_write(tmp_path):
    measured = {"data.source": "mnist5k", "data.split_seed": 0, "eval.num_samples": 5}
    sweep_dir = tmp_path / "runs" / "e1"
    _fake_sweep(tmp_path, "e1", sweep_dir, n_trials=1, measurement=measured).run()
    journal = tmp_path / "optuna" / "e1.log"
    assert _load(tmp_path, "e1").user_attrs["measurement"] == measured
    before = _files(tmp_path / "optuna", sweep_dir)

    tail = (
        "another data set, test split or number of importance samples K, so its trials could not be ranked "
        "with the study's: resume with"
    )
    refusals = {
        "data.split_seed=0; this sweep has data.split_seed=7": {"data.split_seed": 7},
        "eval.num_samples=5; this sweep has eval.num_samples=50": {"eval.num_samples": 50},
        "data.source=mnist5k, eval.num_samples=5; this sweep has data.source=npz, eval.num_samples=6": {
            "data.source": "npz",
            "eval.num_samples": 6,
        },
    }
    for differ, changed in refusals.items():
        was = differ.split(";")[0]
        expected = (
            f"study 'e1' in {journal} measured its trials with {differ}, {tail} {was}, or use another "
            "hydra.sweeper.study_name"
        )
        s = _fake_sweep(tmp_path, "e1", sweep_dir, n_trials=2, measurement={**measured, **changed})
        with pytest.raises(ConfigError) as err:
            s.preflight()  # what the sweeper calls before it saves multirun.yaml
        assert _refusal(err) == expected
        with pytest.raises(ConfigError) as err:
            s.run()  # open_study refuses under the lock too, before Optuna writes to the journal
        assert _refusal(err) == expected
        assert _files(tmp_path / "optuna", sweep_dir) == before and not s.launched

    # the same measurement resumes (another seed is another draw of it: not recorded, not refused)
    _fake_sweep(tmp_path, "e1", sweep_dir, n_trials=2, measurement=measured).run()
    assert _states(_load(tmp_path, "e1")) == ["COMPLETE", "COMPLETE"]


def test_a_study_older_than_the_record_is_resumed_and_recorded_from_then_on(tmp_path):
    """A study created before its measurement was recorded cannot be checked: its next sweep is accepted and
    records its own settings, which every later resume must then match."""
    import optuna

    storage = sweep.open_storage(str(tmp_path / "optuna" / "old.log"))
    old = optuna.create_study(study_name="old", storage=storage, direction="maximize")
    old.set_user_attr("objective", "log_px")
    old.add_trial(optuna.trial.create_trial(value=-90.0))
    measured = {"data.split_seed": 0, "eval.num_samples": 5}
    sweep_dir = tmp_path / "runs" / "old"
    _fake_sweep(tmp_path, "old", sweep_dir, n_trials=2, measurement=measured).run()
    study = _load(tmp_path, "old")
    assert _states(study) == ["COMPLETE", "COMPLETE"] and study.user_attrs["measurement"] == measured
    with pytest.raises(ConfigError, match="measured its trials with data.split_seed=0; this sweep has data"):
        _fake_sweep(
            tmp_path, "old", sweep_dir, n_trials=3, measurement={**measured, "data.split_seed": 1}
        ).run()


def test_a_data_file_rewritten_under_its_name_is_refused_on_resume(tmp_path):
    """data.path's file is recorded by its md5 as well as its name: a resume after the file was rewritten
    (other images, the same name) is refused before any write, naming the file and both checksums; the
    same bytes resume; another file is refused by its name alone (no md5 to resume with)."""
    import hashlib

    npz = tmp_path / "mine.npz"
    np.savez(npz, x=np.zeros((60, 4, 4), np.uint8))
    space = sweep.parse_search_space({"model.latent_dim": "choice(2, 3)"}, ["data=npz", f"data.path={npz}"])
    settings = sweep.measurement_settings(sweep.trial_configs(space, lambda overrides: compose(*overrides)))
    first = hashlib.md5(npz.read_bytes()).hexdigest()
    assert settings["data.path"] == str(npz) and settings[sweep.PATH_MD5] == first

    sweep_dir = tmp_path / "runs" / "f1"
    _fake_sweep(tmp_path, "f1", sweep_dir, n_trials=1, measurement=settings).run()
    assert _load(tmp_path, "f1").user_attrs["measurement"][sweep.PATH_MD5] == first
    before = _files(tmp_path / "optuna", sweep_dir)

    np.savez(npz, x=np.ones((60, 4, 4), np.uint8))  # rewritten: the same name, other images
    now = sweep.measurement_settings(sweep.trial_configs(space, lambda overrides: compose(*overrides)))
    second = hashlib.md5(npz.read_bytes()).hexdigest()
    assert now[sweep.PATH_MD5] == second != first
    s = _fake_sweep(tmp_path, "f1", sweep_dir, n_trials=2, measurement=now)
    for step in (s.preflight, s.run):
        with pytest.raises(ConfigError) as err:
            step()
        assert _refusal(err) == (
            f"study 'f1' in {tmp_path / 'optuna' / 'f1.log'} measured its trials on {npz} with md5 {first}; "
            f"that file now has md5 {second}, rewritten since, so its test split may hold other images and "
            "its trials could not be ranked with the study's: restore the file the study read, or use "
            "another hydra.sweeper.study_name"
        )
    assert _files(tmp_path / "optuna", sweep_dir) == before and not s.launched

    other = {**now, "data.path": str(tmp_path / "other.npz")}
    with pytest.raises(ConfigError) as err:
        _fake_sweep(tmp_path, "f1", sweep_dir, n_trials=2, measurement=other).preflight()
    assert f"resume with data.path={npz}, or use another" in _refusal(err)
    _fake_sweep(tmp_path, "f1", sweep_dir, n_trials=2, measurement=settings).run()  # the study's bytes
    assert _states(_load(tmp_path, "f1")) == ["COMPLETE", "COMPLETE"]


# ------------------------------------------------------------------ the choices of a study's parameters


def test_a_resume_with_other_categorical_choices_is_refused_before_any_write(tmp_path):
    from optuna.distributions import CategoricalDistribution, IntDistribution

    first = sweep.SearchSpace({"model.latent_dim": CategoricalDistribution([2, 3])})
    sweep_dir = tmp_path / "runs" / "g1"
    _fake_sweep(tmp_path, "g1", sweep_dir, space=first, sampler=GRID, n_trials=2).run()
    journal = tmp_path / "optuna" / "g1.log"
    before = _files(tmp_path / "optuna", sweep_dir)
    for new, shown, what in [
        (CategoricalDistribution([2, 3, 4]), "choice(2, 3, 4)", "other choices"),
        (CategoricalDistribution([3, 2]), "choice(3, 2)", "other choices"),  # Optuna compares them in order
        (IntDistribution(2, 4), "integers in [2, 4]", "another kind or scale of values"),
    ]:
        space = sweep.SearchSpace({"model.latent_dim": new})
        s = _fake_sweep(tmp_path, "g1", sweep_dir, space=space, sampler=GRID, n_trials=3)
        expected = (
            f"study 'g1' in {journal} sweeps model.latent_dim over choice(2, 3); this sweep has {shown}, "
            f"{what}, which Optuna cannot add to a study: sweep model.latent_dim over choice(2, 3), or use "
            "another hydra.sweeper.study_name for the new search space"
        )
        with pytest.raises(ConfigError) as err:
            s.preflight()
        assert _refusal(err) == expected
        with pytest.raises(ConfigError) as err:
            s.run()
        assert _refusal(err) == expected
        assert _files(tmp_path / "optuna", sweep_dir) == before and not s.launched
    assert _states(_load(tmp_path, "g1")) == ["COMPLETE", "COMPLETE"]


def test_an_error_between_ask_and_launch_leaves_no_running_trial(tmp_path, monkeypatch):
    """Optuna's own refusal (here: other choices, with vaerepro's check switched off) comes after study.ask
    has created the trial: the trial is failed, not counted, and not queued again without its values."""
    from optuna.distributions import CategoricalDistribution

    from vaerepro.sweep import study as study_mod

    sweep_dir = tmp_path / "runs" / "g2"
    first = sweep.SearchSpace({"model.latent_dim": CategoricalDistribution([2, 3])})
    _fake_sweep(tmp_path, "g2", sweep_dir, space=first, sampler=GRID, n_trials=1).run()
    monkeypatch.setattr(study_mod, "refuse_incompatible_space", lambda *a, **k: None, raising=False)
    wider = sweep.SearchSpace({"model.latent_dim": CategoricalDistribution([2, 3, 4])})
    s = _fake_sweep(tmp_path, "g2", sweep_dir, space=wider, sampler=GRID, n_trials=3)
    with pytest.raises(ValueError, match="CategoricalDistribution does not support dynamic value space"):
        s.run()
    trials = _load(tmp_path, "g2").get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL"]  # no RUNNING trial, nothing WAITING
    assert trials[1].params == {} and trials[1].system_attrs[sweep.INTERRUPTED] is True
    assert not s.launched


def test_a_trial_left_running_without_params_does_not_poison_later_resumes(tmp_path):
    """What earlier versions left behind: a RUNNING trial without params (its sweep process gone), and its
    configuration queued as {} by a resume. The grid sampler refuses a queued trial without values ("All
    parameters must be specified when using GridSampler with enqueue_trial") at every resume; now the
    RUNNING one is failed without being queued, the queued one failed and dropped, and the grid goes on."""
    import optuna

    sweep_dir = tmp_path / "runs" / "ghost"
    _fake_sweep(tmp_path, "ghost", sweep_dir, sampler=GRID, n_trials=1).run()
    storage = sweep.open_storage(str(tmp_path / "optuna" / "ghost.log"))
    study = optuna.load_study(study_name="ghost", storage=storage)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    ghost = study.ask()  # RUNNING, no params, stamped by a sweep process that is gone
    storage.set_trial_system_attr(ghost._trial_id, "vaerepro:host", signals.machine())
    storage.set_trial_system_attr(ghost._trial_id, "vaerepro:pid", gone.pid)
    study.enqueue_trial({}, user_attrs={"retry_of": ghost.number})  # an earlier resume's retry of a ghost

    _fake_sweep(tmp_path, "ghost", sweep_dir, sampler=GRID, n_trials=3).run()
    trials = _load(tmp_path, "ghost").get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "FAIL", "COMPLETE", "COMPLETE"]
    assert [bool(t.system_attrs.get(sweep.INTERRUPTED)) for t in trials] == [False, True, True, False, False]
    done = [t.params["model.latent_dim"] for t in trials if t.state.name == "COMPLETE"]
    assert len(set(done)) == 3  # three grid points, none twice
    # and a resume after that has nothing left to fail or queue
    _fake_sweep(tmp_path, "ghost", sweep_dir, sampler=GRID, n_trials=4).run()
    assert _states(_load(tmp_path, "ghost")).count("COMPLETE") == 4


# ------------------------------------------------------------------------------- storages and studies


def _foreign_sqlite(path: Path) -> None:
    """An SQLite database of another program, as MLflow's mlflow.db is."""
    with sqlite3.connect(path) as db:
        for table in ("experiments", "metrics", "params", "runs", "tags"):
            db.execute(f"CREATE TABLE {table} (x)")


def test_the_sweep_report_refuses_what_is_not_a_study_and_creates_nothing(tmp_path, monkeypatch, capsys):
    import optuna

    from vaerepro.sweep.__main__ import main

    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("hello\n")
    (tmp_path / "adir").mkdir()
    _foreign_sqlite(tmp_path / "mlflow.db")
    optuna.create_study(study_name="a", storage=sweep.open_storage(str(tmp_path / "studies" / "a.log")))
    before = _files(tmp_path)
    capsys.readouterr()  # Optuna's log line of the study created above

    missing = (
        "does not exist (a sweep keeps its study in hydra.sweeper.storage, by default "
        "optuna/<study_name>.log; give another with --storage)"
    )
    cases = {
        ("nosuch",): f"no study 'nosuch': {tmp_path}/optuna/nosuch.log {missing}",
        (
            "x",
            "--storage",
            "sqlite:///nonexist.db",
        ): f"no study 'x': sqlite:///{tmp_path}/nonexist.db {missing}",
        (
            "x",
            "--storage",
            "sqlite:////nonexist/dir/x.db",
        ): f"no study 'x': sqlite:////nonexist/dir/x.db {missing}",
        ("x", "--storage", "notes.txt"): f"{tmp_path}/notes.txt: not an Optuna journal file (it starts with "
        "b'hello\\n')",
        (
            "x",
            "--storage",
            "adir",
        ): f"{tmp_path}/adir: a directory, not an Optuna storage (a journal file, or an RDB URL)",
        ("x", "--storage", "mlflow.db"): f"{tmp_path}/mlflow.db: an SQLite database, not an Optuna journal "
        f"file; an Optuna database is given as a URL, sqlite:///{tmp_path}/mlflow.db (an MLflow store is not "
        "one)",
        (
            "x",
            "--storage",
            "sqlite:///mlflow.db",
        ): f"sqlite:///{tmp_path}/mlflow.db: {tmp_path}/mlflow.db is an "
        "SQLite database of another program (tables experiments, metrics, params, runs, ...), not an Optuna "
        "storage; give the study a file of its own",
        (
            "x",
            "--storage",
            "studies/a.log",
        ): f"{tmp_path}/studies/a.log holds no study 'x' (its studies: 'a')",
    }
    for args, line in cases.items():
        assert main(["report", *args]) == 2, args
        assert capsys.readouterr().err == f"python -m vaerepro.sweep report: {line}\n"
    assert _files(tmp_path) == before  # no journal, database, directory or table created
    assert not Path("/nonexist").exists()


def test_a_sweep_refuses_a_storage_that_is_no_optuna_storage_before_any_write(tmp_path):
    (tmp_path / "notes.txt").write_text("hello\n")
    (tmp_path / "adir").mkdir()
    _foreign_sqlite(tmp_path / "mlflow.db")
    sweep_dir = tmp_path / "runs" / "b1"
    before = _files(tmp_path)
    cases = {
        str(tmp_path / "notes.txt"): f"{tmp_path}/notes.txt: not an Optuna journal file (it starts with "
        "b'hello\\n')",
        str(tmp_path / "adir"): f"{tmp_path}/adir: a directory, not an Optuna storage (a journal file, or an "
        "RDB URL)",
        str(tmp_path / "mlflow.db"): f"{tmp_path}/mlflow.db: an SQLite database, not an Optuna journal file; "
        f"an Optuna database is given as a URL, sqlite:///{tmp_path}/mlflow.db (an MLflow store is not one)",
        f"sqlite:///{tmp_path}/mlflow.db": f"sqlite:///{tmp_path}/mlflow.db: {tmp_path}/mlflow.db is an "
        "SQLite database of another program (tables experiments, metrics, params, runs, ...), not an Optuna "
        "storage; give the study a file of its own",
        "sqlite:////nonexist/dir/x.db": "sqlite:////nonexist/dir/x.db: cannot create the database, no "
        "directory /nonexist/dir",
        str(tmp_path / "notes.txt" / "b1.log"): f"{tmp_path}/notes.txt/b1.log: cannot read it (Not a "
        "directory)",
    }
    for storage, expected in cases.items():
        s = _fake_sweep(tmp_path, "b1", sweep_dir, n_trials=1, storage=storage)
        with pytest.raises(ConfigError) as err:
            s.preflight()
        assert _refusal(err) == expected
        assert _files(tmp_path) == before and not s.launched


def test_a_journal_whose_last_record_is_cut_short_is_refused_before_a_sweep_appends_to_it(tmp_path):
    """A journal whose last record lost its end (a process killed, or a disk that filled, while Optuna
    appended it) still reads, but the next record Optuna appends joins the torn one into a line that is not
    JSON, and from then on the journal does not read at all: every trial of the study lost. The sweep refuses
    it in one line giving the size to cut it to, writing nothing; cut there, it resumes."""
    sweep_dir = tmp_path / "runs" / "t1"
    _fake_sweep(tmp_path, "t1", sweep_dir, n_trials=1).run()
    journal = tmp_path / "optuna" / "t1.log"
    data = journal.read_bytes()
    whole = data.rstrip(b"\n").rfind(b"\n") + 1  # where the last record starts
    journal.write_bytes(data[: whole + 40])
    before = _files(tmp_path / "optuna", sweep_dir)
    expected = (
        f"{journal}: its last record is cut short (40 bytes after the last whole record, without a "
        "newline: a process killed, or a disk that filled, while writing it); a sweep would append to it and "
        f"the journal would no longer read. Cut it off (`truncate -s {whole} {journal}`, after a copy if you "
        "like) and run the sweep again"
    )
    s = _fake_sweep(tmp_path, "t1", sweep_dir, n_trials=2)
    with pytest.raises(ConfigError) as err:
        s.preflight()
    assert _refusal(err) == expected
    with pytest.raises(ConfigError) as err:
        s.run()  # open_study checks again under the lock
    assert _refusal(err) == expected
    assert _files(tmp_path / "optuna", sweep_dir) == before and not s.launched
    assert _load(tmp_path, "t1").trials  # the study reads as it did

    with journal.open("r+b") as fh:
        fh.truncate(whole)
    _fake_sweep(tmp_path, "t1", sweep_dir, n_trials=2).run()
    assert len(_load(tmp_path, "t1").trials) >= 2  # resumed, and the journal still reads


# ------------------------------------------------------------------------------ labels for knn_accuracy


def test_knn_accuracy_is_refused_on_data_without_labels(tmp_path):
    x = np.zeros((20, 4, 4), np.uint8)
    np.savez(tmp_path / "nolabels.npz", x=x)
    np.savez(tmp_path / "labels.npz", x=x, y=np.zeros(20, np.int64))

    def configs(*fixed):
        space = sweep.parse_search_space({"model.latent_dim": "choice(2, 3)"}, list(fixed))
        return sweep.trial_configs(space, lambda overrides: compose(*overrides))

    advice = (
        "no trial could compute it. Use a density objective within one data space "
        "(hydra.sweeper.objective=log_px, elbo or bits_per_dim), or across data spaces active_units"
    )
    unlabelled = configs("data=npz", f"data.path={tmp_path / 'nolabels.npz'}")
    with pytest.raises(ConfigError) as err:
        sweep.refuse_unlabelled("knn_accuracy", unlabelled)
    npz = tmp_path / "nolabels.npz"
    assert _refusal(err) == (
        f"objective knn_accuracy needs the data's labels, and {npz} holds no array 'y': {advice}, or save "
        "the labels as y (numpy.savez(path, x=x, y=labels))"
    )
    with pytest.raises(ConfigError) as err:
        sweep.refuse_unlabelled("knn_accuracy", configs("data=frey_faces"))
    assert _refusal(err) == (
        f"objective knn_accuracy needs the data's labels, and data.source=frey_faces has none: {advice}"
    )
    sweep.refuse_unlabelled("log_px", unlabelled)  # a density needs no labels
    sweep.refuse_unlabelled("knn_accuracy", configs("data=npz", f"data.path={tmp_path / 'labels.npz'}"))
    sweep.refuse_unlabelled("knn_accuracy", configs())  # mnist5k has labels
    # a file that cannot be read yet is prepare's to report
    sweep.refuse_unlabelled("knn_accuracy", configs("data=npz", f"data.path={tmp_path / 'missing.npz'}"))


def test_a_sampler_or_pruner_given_as_a_plain_name_is_refused():
    """`hydra.sweeper.sampler=random` (the group is hydra/sweeper/sampler=random) reached make_sampler as a
    string, an AttributeError with a traceback after the study's journal and sweep dir were written."""
    tpe, none = {"name": "tpe"}, {"name": "none"}
    with pytest.raises(ConfigError) as err:
        sweep.check_sampler_and_pruner("random", none)
    assert _refusal(err) == (
        "hydra.sweeper.sampler='random': the sampler is a config group, chosen with "
        "hydra/sweeper/sampler=NAME (tpe, random, grid or cmaes), its settings given as "
        "hydra.sweeper.sampler.KEY=VALUE"
    )
    with pytest.raises(ConfigError, match=r"hydra.sweeper.pruner='median': the pruner is a config group"):
        sweep.check_sampler_and_pruner(tpe, "median")
    with pytest.raises(ConfigError) as err:
        sweep.check_sampler_and_pruner({"name": "nosuch"}, none)
    assert _refusal(err) == "hydra/sweeper/sampler='nosuch': tpe, random, grid or cmaes"
    with pytest.raises(ConfigError, match=r"hydra/sweeper/pruner='x': none, median or hyperband"):
        sweep.check_sampler_and_pruner(tpe, {"name": "x"})
    for sampler in sweep.study.SAMPLERS:
        for pruner in sweep.study.PRUNERS:
            sweep.check_sampler_and_pruner({"name": sampler, "seed": 0}, {"name": pruner})


# --------------------------------------------------------------------------- slow: through the sweeper


@pytest.mark.slow
def test_the_sweeper_refuses_these_resumes_in_one_line_with_exit_status_2(project, tmp_path):
    """The reproductions: one real trial, then resumes with another split seed, another test fraction, and
    a wider choice of latent sizes; then knn_accuracy on an .npz without labels. Each is one line and exit
    status 2, and leaves the study's journal and sweep dir as they were."""
    root = project["root"].resolve()
    args = ("hydra.sweeper.objective=knn_accuracy", "hydra/sweeper/sampler=grid", "likelihood=bernoulli")
    _sweep(project, "e1", *args, "model.latent_dim=choice(2,3)", "hydra.sweeper.n_trials=1")
    journal = root / "optuna" / "e1.log"
    before = _files(journal, root / "runs" / "e1")

    def refused(*overrides, study="e1"):
        cmd = _sweep_cmd(project, study, *overrides)
        proc = subprocess.run(cmd, cwd=root, env=project["env"], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
        lines = [line for line in proc.stderr.splitlines() if "vaerepro_optuna:" in line]
        assert len(lines) == 1, proc.stderr[-3000:]
        return lines[0]

    prefix = f"vaerepro run: vaerepro_optuna: study 'e1' in {journal}"
    measured = (
        "another data set, test split or number of importance samples K, so its trials could not be ranked "
        "with the study's: resume with"
    )
    line = refused(*args, "model.latent_dim=choice(2,3)", "hydra.sweeper.n_trials=2", "data.split_seed=7")
    assert line == (
        f"{prefix} measured its trials with data.split_seed=0; this sweep has data.split_seed=7, {measured} "
        "data.split_seed=0, or use another hydra.sweeper.study_name"
    )
    line = refused(
        *args, "model.latent_dim=choice(2,3)", "hydra.sweeper.n_trials=2", "data.test_fraction=0.3"
    )
    assert line == (
        f"{prefix} measured its trials with data.test_fraction=0.2; this sweep has data.test_fraction=0.3, "
        f"{measured} data.test_fraction=0.2, or use another hydra.sweeper.study_name"
    )
    line = refused(*args, "model.latent_dim=choice(2,3,4)", "hydra.sweeper.n_trials=3")
    assert line == (
        f"{prefix} sweeps model.latent_dim over choice(2, 3); this sweep has choice(2, 3, 4), other choices, "
        "which Optuna cannot add to a study: sweep model.latent_dim over choice(2, 3), or use another "
        "hydra.sweeper.study_name for the new search space"
    )
    assert _files(journal, root / "runs" / "e1") == before
    assert _states(_study(project, "e1")) == ["COMPLETE"]

    npz = tmp_path / "nolabels.npz"
    np.savez(npz, x=np.zeros((100, 8, 8), np.uint8))
    line = refused(*args, "model.latent_dim=choice(2,3)", "data=npz", f"data.path={npz}", study="n1")
    assert line == (
        f"vaerepro run: vaerepro_optuna: objective knn_accuracy needs the data's labels, and {npz} holds no "
        "array 'y': no trial could compute it. Use a density objective within one data space "
        "(hydra.sweeper.objective=log_px, elbo or bits_per_dim), or across data spaces active_units, or save "
        "the labels as y (numpy.savez(path, x=x, y=labels))"
    )
    assert not (root / "optuna" / "n1.log").exists() and not (root / "runs" / "n1").exists()


def test_a_refused_resume_names_a_database_without_its_password():
    """The refusals of a study (another direction, objective, measurement, search space or data space)
    named its storage as given: a database URL's password went to the terminal and the logs."""
    import optuna

    from vaerepro.config import ConfigError
    from vaerepro.sweep.study import check_study

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="s", direction="minimize")
    url = "postgresql://alice:s3cret@db.example/optuna"
    with pytest.raises(ConfigError) as err:
        check_study(study, url, direction="maximize", objective="log_px", pruner=None, data_spaces=None)
    assert str(err.value).startswith(
        "study 's' in postgresql://alice:***@db.example/optuna is a minimize study"
    )
    assert "s3cret" not in str(err.value)


@pytest.mark.slow
def test_the_sweeper_refuses_a_sampler_or_pruner_given_as_a_plain_name(project):
    root = project["root"].resolve()
    for override in ("hydra.sweeper.sampler=random", "hydra.sweeper.pruner=median"):
        proc = subprocess.run(
            _sweep_cmd(project, "plain", "model.latent_dim=choice(2,3)", override),
            cwd=root,
            env=project["env"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        key = override.split("=")[0]
        assert f"vaerepro run: vaerepro_optuna: {key}=" in proc.stderr
        assert not (root / "optuna" / "plain.log").exists() and not (root / "runs" / "plain").exists()
