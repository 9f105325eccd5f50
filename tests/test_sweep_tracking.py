"""What an Optuna sweep records: the MLflow parent run of a study and a child run per trial (tags, params,
metrics), and the sweep report, written during the sweep or again from the study and MLflow alone.

The slow test runs the real command (`vaerepro run --multirun ...`) in a temporary project (a copy of conf/)
on the tiny config, as test_sweep.py's slow tests do: with its helpers, and the `project` fixture of
conftest.py.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import pytest

from test_sweep import _runs, _states, _study, _sweep
from vaerepro import sweep, tracking

# ------------------------------------------------------------------------------------ fast: the parts


def test_run_tags_name_the_study_and_trial(monkeypatch, tmp_path):
    from conftest import tiny_config

    cfg = tiny_config()
    assert (
        not {"mlflow.parentRunId", "vaerepro.study", "vaerepro.trial"}
        & tracking.run_tags(cfg, tmp_path).keys()
    )
    monkeypatch.setenv(sweep.ENV_PARENT_RUN_ID, "abc123")
    monkeypatch.setenv(sweep.ENV_STUDY, "aevb")
    monkeypatch.setenv(sweep.ENV_TRIAL, "4")
    tags = tracking.run_tags(cfg, tmp_path)
    assert (tags["mlflow.parentRunId"], tags["vaerepro.study"], tags["vaerepro.trial"]) == (
        "abc123",
        "aevb",
        "4",
    )
    from vaerepro.sweep import pruning

    assert len(pruning.trial_callbacks()) == 0  # no storage named: nothing to report to
    monkeypatch.setenv(sweep.ENV_STORAGE, str(tmp_path / "s.log"))
    assert isinstance(pruning.trial_callbacks()[0], pruning.OptunaPruning)


def _finished_trial(value, latent_dim, trial_dir, space="binary", likelihood="bernoulli"):
    import optuna

    return optuna.trial.create_trial(
        value=value,
        params={"model.latent_dim": latent_dim},
        distributions={"model.latent_dim": optuna.distributions.IntDistribution(2, 50)},
        user_attrs={
            "likelihood": likelihood,
            "latent_dim": latent_dim,
            "data_space": space,
            "improper": False,
            "trial_dir": str(trial_dir),
        },
    )


def test_sweep_report_flags_an_unconverged_best_trial_and_draws_no_one_point_axis(tmp_path, monkeypatch):
    import optuna

    from vaerepro.sweep import report as sweep_report
    from vaerepro.sweep.report import write_sweep_report

    sweep_report_png = sweep_report.png

    study = optuna.create_study(direction="maximize")
    study.set_user_attr("objective", "log_px")
    # (log_px, latent size, verdict)
    trials = [(-95.0, 2, True), (1778.47, 5, False), (-90.0, 10, True), (-99.0, 3, None)]
    for n, (value, z, verdict) in enumerate(trials):
        d = tmp_path / f"trial-{n}"
        (d / "metrics").mkdir(parents=True)
        if verdict is not None:  # trial 3 has no eval.json left: verdict unknown
            (d / "metrics" / "eval.json").write_text(json.dumps({"log_px": value, "converged": verdict}))
        study.add_trial(_finished_trial(value, z, d))
    # another data space (never in one density study; here to show it is never the alternative offered)
    study.add_trial(_finished_trial(-50.0, 2, tmp_path / "none", space="continuous"))
    drawn = []
    monkeypatch.setattr(sweep_report, "png", lambda fig: drawn.append(fig) or sweep_report_png(fig))
    md = write_sweep_report(study, tmp_path / "report", runs=None)["md"].read_text()
    # the objective figure: the unconverged estimate drawn hollow, never in the line through the means
    (ax,) = drawn[0].axes
    (line,) = [ln for ln in ax.get_lines() if ln.get_linestyle() == "-"]
    assert list(line.get_xdata()) == [2, 3, 10] and list(line.get_ydata()) == [-95.0, -99.0, -90.0]
    assert "bernoulli, NOT CONVERGED" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert "1 trial(s) whose log p(x) estimate has NOT CONVERGED: hollow markers, left out of the lines" in md
    best = md.split("## Best trial", 1)[1].split("## Trials", 1)[0]
    assert "trial 1, rests on a log p(x) estimate that has NOT CONVERGED" in best
    assert "The best trial whose estimate has converged: trial 2 (-90.0000)." in best
    # the table shows the winner (study.best_trial, as the results file and the MLflow run do)
    assert "| trial | 2 |" in best and "| log_px | -90.0000 |" in best and "1778.4700 |" not in best
    rows = [line for line in md.split("## Trials", 1)[1].splitlines() if line.startswith("| ")][1:6]
    assert [r.split(" | ")[2] for r in rows] == [
        "-95.0000",
        "1778.4700 (NOT CONVERGED)",
        "-90.0000",
        "-99.0000",
        "-50.0000",
    ]
    # the continuous group has one trial: a sentence, not a one-point figure
    figures = sorted(p.name for p in (tmp_path / "report" / "figures").iterdir())
    assert "objective-binary-proper.png" in figures and "objective-continuous-proper.png" not in figures
    assert "only one completed trial (trial 4), so no figure" in md


def test_the_sweep_figure_colours_each_likelihood_as_every_report_figure_does(tmp_path, monkeypatch):
    # a knn_accuracy sweep over likelihoods: one figure, each likelihood in the colour the comparison figures
    # give it (report_comparison.LIKELIHOOD_COLOURS), not the next of matplotlib's cycle
    import optuna
    from matplotlib.colors import to_hex

    from vaerepro.report_comparison import LIKELIHOOD_COLOURS
    from vaerepro.sweep import report as sweep_report

    study = optuna.create_study(direction="maximize")
    study.set_user_attr("objective", "knn_accuracy")
    trials = [("gaussian", 3), ("gaussian", 50), ("continuous_bernoulli", 3)]
    for n, (lik, z) in enumerate(trials):
        study.add_trial(_finished_trial(0.5 + n / 10, z, tmp_path / f"t{n}", "continuous", lik))
    drawn = []
    monkeypatch.setattr(sweep_report, "png", lambda fig: drawn.append(fig) or b"")
    sweep_report._objective_figures(study, "knn_accuracy")
    (ax,) = drawn[0].axes
    colours = {
        ln.get_label(): to_hex(ln.get_color()) for ln in ax.get_lines() if ln.get_linestyle() == "None"
    }
    assert colours == {lik: to_hex(LIKELIHOOD_COLOURS[lik]) for lik in ("continuous_bernoulli", "gaussian")}
    # the history's trials and best-so-far line: in no likelihood's colour
    sweep_report._history_figure(study, "knn_accuracy")
    used = {to_hex(ln.get_color()) for ln in drawn[1].axes[0].get_lines()}
    assert len(used) == 2 and not used & {to_hex(c) for c in LIKELIHOOD_COLOURS.values()}


def test_sweep_report_gives_a_density_objective_its_unit_on_every_axis_and_column(tmp_path, monkeypatch):
    """A study by log_px (or bits_per_dim): the objective figure's and the history's y axes and the trials
    table's column read plain `log_px`, numbers of 1431 or -95 without saying nats per example."""
    import optuna

    from vaerepro.sweep import report as sweep_report
    from vaerepro.sweep.report import write_sweep_report

    sweep_report_png = sweep_report.png
    for objective, unit in (("log_px", "nats/example"), ("bits_per_dim", "bits/dim")):
        study = optuna.create_study(direction="maximize" if objective == "log_px" else "minimize")
        study.set_user_attr("objective", objective)
        for n, (value, z) in enumerate([(-95.0, 2), (-90.0, 10)]):
            study.add_trial(_finished_trial(value, z, tmp_path / objective / f"trial-{n}"))
        drawn = []
        monkeypatch.setattr(
            sweep_report, "png", lambda fig, drawn=drawn: drawn.append(fig) or sweep_report_png(fig)
        )
        md = write_sweep_report(study, tmp_path / objective / "report", runs=None)["md"].read_text()
        labels = [ax.get_ylabel() for fig in drawn[:2] for ax in fig.axes]
        assert labels == [f"{objective} ({unit})"] * 2, labels
        assert f"| trial | state | {objective} ({unit}) | params |" in md
        assert f"Objective: {objective} ({unit}), to " in md
    study = optuna.create_study(direction="maximize")
    study.set_user_attr("objective", "knn_accuracy")
    study.add_trial(_finished_trial(0.8, 2, tmp_path / "knn"))
    md = write_sweep_report(study, tmp_path / "knn" / "report", runs=None)["md"].read_text()
    assert "| trial | state | knn_accuracy | params |" in md


def test_one_selector_names_the_winner_everywhere_and_skips_an_unconverged_estimate(tmp_path, monkeypatch):
    """optimization_results.json, the study's MLflow run (best_trial, best_command, <space>/best/<objective>)
    and the sweep report name one winner: never a trial whose log p(x) estimate has not converged."""
    import optuna

    from vaerepro.sweep import runner
    from vaerepro.tracking.sweep import Tracking

    study = optuna.create_study(direction="maximize")
    study.set_user_attr("objective", "log_px")
    for n, (value, z, verdict) in enumerate([(-95.0, 2, True), (1778.47, 5, False), (-90.0, 10, None)]):
        d = tmp_path / f"trial-{n}"
        (d / "metrics").mkdir(parents=True)
        (d / "metrics" / "eval.json").write_text(json.dumps({"log_px": value, "converged": verdict}))
        study.add_trial(_finished_trial(value, z, d))
    # the verdict kept with the trial (runner._finish, from trial_outcome) is enough: no eval.json needed
    trial = _finished_trial(5000.0, 3, tmp_path / "gone")
    trial.set_user_attr("converged", False)
    study.add_trial(trial)
    assert sweep.best_trial(study).number == 2

    settings = runner.SweepSettings(study_name="x", storage=str(tmp_path / "x.log"), objective="log_px")
    space = sweep.SearchSpace({})
    s = runner.Sweep(settings, space, sweep_dir=tmp_path, root=tmp_path, tracking=Tracking(None))
    results = s._results(study)
    assert (results["best_value"], results["best_params"]) == (-90.0, {"model.latent_dim": 10})
    assert results["best_command"] == "vaerepro run model.latent_dim=10"
    seen = {}
    monkeypatch.setattr(runner.tracking_sweep, "summarise_study_run", lambda *a, **kw: seen.update(kw))
    s.parent_run_id = "parent"
    s._summarise_parent(study, "FINISHED")
    assert seen["best"].number == 2 and seen["best_command"] == results["best_command"]

    # no converged estimate at all: no winner, rather than an unconverged one
    lone = optuna.create_study(direction="maximize")
    lone.set_user_attr("objective", "log_px")
    lone.add_trial(trial)
    assert sweep.best_trial(lone) is None and s._results(lone)["best_value"] is None


# --------------------------------------------------------------------------------- slow: a real sweep


class Killed(BaseException):
    """A kill -9 between two files, as an exception nothing catches."""


@pytest.mark.slow
def test_the_sweep_report_is_written_as_one_set_after_another_writers(tmp_path, monkeypatch):
    """Its documents and the figures report.md links are one report: (1) a kill while it writes leaves no
    document of the earlier report beside the new figures; (2) a second writer of the same report (another
    sweep process of the study, `python -m vaerepro.sweep report`) waits for the first to end."""
    import fcntl
    import os
    import threading

    import optuna

    from vaerepro import document
    from vaerepro.sweep.report import write_sweep_report

    study = optuna.create_study(direction="maximize")
    study.set_user_attr("objective", "log_px")
    for n, (value, z) in enumerate([(-95.0, 2), (-90.0, 10)]):
        study.add_trial(_finished_trial(value, z, tmp_path / f"trial-{n}"))
    out = tmp_path / "report"
    paths = write_sweep_report(study, out, runs=None)
    assert paths["html"].is_file() and paths["md"].is_file() and paths["figures"]

    # (1) killed after the new figures, before a document: neither document of the earlier report is left
    study.add_trial(_finished_trial(-80.0, 20, tmp_path / "trial-2"))
    with monkeypatch.context() as m:

        def killed(*args, **kwargs):
            raise Killed

        m.setattr(document, "render_html", killed)
        with pytest.raises(Killed):
            write_sweep_report(study, out, runs=None)
    assert not paths["html"].exists() and not paths["md"].exists()

    # (2) while another writer holds the report's directory, this one writes nothing; then all of it
    fd = os.open(out, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    writer = threading.Thread(target=write_sweep_report, args=(study,), kwargs={"out_dir": out, "runs": None})
    writer.start()
    writer.join(timeout=3.0)
    assert writer.is_alive() and not paths["md"].exists()
    os.close(fd)  # the other writer ends
    writer.join(timeout=60)
    assert not writer.is_alive()
    assert "Trials: 3 — 3 COMPLETE" in paths["md"].read_text() and paths["html"].is_file()


@pytest.mark.slow
def test_sweep_resume_and_mlflow_parent_child(project, monkeypatch):
    study_name = "density"
    args = (
        "hydra/sweeper/sampler=random",
        "hydra.sweeper.sampler.seed=0",
        "model.latent_dim=choice(2,3,4,5,6)",
    )
    _sweep(project, study_name, *args, "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2")  # at once
    assert _states(_study(project, study_name)) == ["COMPLETE", "COMPLETE"]

    # the same command with n_trials=3: the study's total, so one more trial
    out = _sweep(project, study_name, *args, "hydra.sweeper.n_trials=3")
    study = _study(project, study_name)
    trials = study.get_trials()
    assert [t.number for t in trials] == [0, 1, 2] and _states(study) == ["COMPLETE"] * 3
    dirs = {t.user_attrs["trial_dir"] for t in trials}
    assert len(dirs) == 3
    for t in trials:
        ev = json.loads((Path(t.user_attrs["trial_dir"]) / "metrics" / "eval.json").read_text())
        assert t.value == ev["log_px"] and ev["latent_dim"] == t.params["model.latent_dim"]
    assert study.user_attrs["sweep_processes"] == 2

    parent, children = _runs(project, study_name)
    assert sorted(children) == [0, 1, 2]
    assert parent.data.tags["vaerepro.study"] == study_name and parent.data.params["objective"] == "log_px"
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_complete"] == 3
    # the tiny config's log p(x) estimates (K = 50) have not converged: no trial wins the sweep
    # (study.best_trial), so the study's run names no best trial, as the results file and report do not
    assert [t.user_attrs["converged"] for t in trials] == [False] * 3
    assert "binary/best/log_px" not in parent.data.metrics
    assert "best_trial" not in parent.data.tags and "best_command" not in parent.data.tags
    for t in trials:
        run = children[t.number]
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["vaerepro.study"] == study_name
        assert run.data.params["model.latent_dim"] == str(t.params["model.latent_dim"])
        assert run.data.params["sweep.model.latent_dim"] == str(t.params["model.latent_dim"])
        assert run.data.metrics["binary/test/log_px"] == pytest.approx(t.value)
        assert t.user_attrs["mlflow_run_id"] == run.info.run_id

    report = project["root"] / "runs" / study_name / "report"
    md = (report / "report.md").read_text()
    best = max(trials, key=lambda t: t.value)  # by value: Optuna's best_trial
    assert f"trial {best.number}, rests on a log p(x) estimate that has NOT CONVERGED" in md
    assert "No completed trial has a converged estimate." in md
    assert f"model.latent_dim={best.params['model.latent_dim']}" in md
    for fig in ("history", "importances", "objective-binary-proper", "compare-binary-proper"):
        assert (report / "figures" / f"{fig}.png").is_file(), fig
    assert "data:image/png;base64," in (report / "report.html").read_text()
    results = json.loads((project["root"] / "runs" / study_name / "optimization_results.json").read_text())
    assert results["best_value"] is None and results["best_command"] is None
    assert "no trial wins this sweep" in out.stderr + out.stdout

    # the report again, from the study and MLflow alone
    monkeypatch.chdir(project["root"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", project["env"]["MLFLOW_TRACKING_URI"])
    from vaerepro.sweep.__main__ import main

    assert main(["report", study_name, "--out", str(project["root"] / "again")]) == 0
    again = (project["root"] / "again" / "report.md").read_text()
    assert again.count("| COMPLETE |") == 3 and "binary pixels" in again

    # a trial's command (as the parent run's tag best_command prints a winner's) runs and gives its number
    command = shlex.split(sweep.best_command(best))
    assert command[:2] == ["vaerepro", "run"]
    rerun = subprocess.run(
        [*command, "hydra.run.dir=runs/best"],
        cwd=project["root"],
        env={**project["env"], "OMP_NUM_THREADS": "1"},  # as the trials ran (n_jobs=2)
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    ev = json.loads((project["root"] / "runs" / "best" / "metrics" / "eval.json").read_text())
    assert ev["log_px"] == pytest.approx(best.value, abs=1e-3)
