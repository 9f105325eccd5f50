"""MLflow: a real tracking server on 127.0.0.1, one pipeline run, read back through MlflowClient."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import yaml

from conftest import ROOT, Crash, copy_prepared, tiny_config, val_curve, wait_for_health
from vaerepro import tracking
from vaerepro.cli import run_pipeline
from vaerepro.tracking.training import TrainingRun
from vaerepro.train import train
from vaerepro.versions import git_commit

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{d / 'server.db'}",
            "--artifacts-destination",
            str(d / "art"),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(url, "mlflow server")
        yield url, d
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_pipeline_run_round_trips_through_a_tracking_server(mlflow_server, raw_dir, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    url, server_dir = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    cfg = tiny_config("likelihood=continuous_bernoulli", "seed=3", tracking=True, raw_dir=raw_dir)
    metrics = run_pipeline(cfg, tmp_path / "run", ROOT, progress=False)

    client = MlflowClient(url)
    exp = client.get_experiment_by_name("vaerepro")
    (run,) = client.search_runs(
        [exp.experiment_id], filter_string="attributes.run_name = 'continuous_bernoulli-z4-s3'"
    )
    assert run.info.status == "FINISHED"
    p, tags, m = run.data.params, run.data.tags, run.data.metrics
    # the resolved config as params
    assert p["likelihood.name"] == "continuous_bernoulli" and p["model.latent_dim"] == "4"
    assert p["eval.num_samples"] == "50" and p["seed"] == "3"
    # provenance
    assert tags["data_space"] == "continuous" and tags["improper"] == "false"
    assert tags["git_commit"].split("-")[0] == git_commit(ROOT).split("-")[0]
    assert tags["data_version"] == yaml.safe_load((ROOT / "data.dvc").read_text())["outs"][0]["md5"]
    # where and with what each stage ran: in its record, as the run's tags, in the report
    import importlib.metadata
    import os
    import platform

    import torch

    from vaerepro.versions import versions

    out = tmp_path / "run"
    records = [json.loads((out / "metrics" / f).read_text()) for f in ("train.json", "eval.json")]
    assert [r["versions"] for r in records] == [versions(), versions()]
    assert records[0]["versions"]["torch"] == torch.__version__
    assert records[0]["versions"]["vaerepro"] == importlib.metadata.version("vaerepro")
    cpu = f"cpu ({platform.machine()}, {os.cpu_count()} cores)"  # trainer=cpu, eval.device=auto without CUDA
    assert [r["device"] for r in records] == [cpu, cpu]
    assert [r["commit"] for r in records] == [git_commit(ROOT)] * 2  # the code they ran: this checkout's
    for stage in ("train", "eval"):
        assert tags[f"vaerepro.{stage}.commit"] == git_commit(ROOT)
        assert tags[f"vaerepro.{stage}.device"] == cpu
        assert tags[f"vaerepro.{stage}.versions"].startswith(f"python {platform.python_version()}, vaerepro ")
        assert f", torch {torch.__version__}, " in tags[f"vaerepro.{stage}.versions"]
    environment = (out / "reports" / "report.md").read_text().split("## Environment", 1)[1]
    assert f"| device | {cpu} | {cpu} |" in environment
    assert f"| git commit | {git_commit(ROOT)} | {git_commit(ROOT)} |" in environment
    assert f"| torch | {torch.__version__} | {torch.__version__} |" in environment
    # per-epoch training curves (step = epoch) and the evaluation numbers: those in the data space's units
    # under its name, the space-free ones under test/, bookkeeping not as metrics
    hist = client.get_metric_history(run.info.run_id, "continuous/val/elbo")
    assert sorted(h.step for h in hist) == [0, 1, 2]
    assert len(client.get_metric_history(run.info.run_id, "continuous/train/elbo")) == 3
    assert m["continuous/test/log_px"] == pytest.approx(metrics["log_px"])
    assert m["continuous/test/log_px_se"] == pytest.approx(metrics["log_px_se"])
    assert m["continuous/test/bits_per_dim"] == pytest.approx(metrics["bits_per_dim"])
    assert m["test/kl"] == pytest.approx(metrics["kl"]) and m["test/active_units"] == metrics["active_units"]
    assert m["continuous/final/best_val_elbo"] == pytest.approx(
        json.loads((tmp_path / "run" / "metrics" / "train.json").read_text())["best_val_elbo"]
    )
    ladder = client.get_metric_history(run.info.run_id, "continuous/test/log_px_ladder")
    assert sorted(h.step for h in ladder) == [1, 10, 50]
    assert not [k for k in m if k.split("/")[0] not in ("continuous", "test", "final")], sorted(m)
    assert not [k for k in m if k.rsplit("/", 1)[-1] in tracking.BOOKKEEPING], sorted(m)
    # the description: what was trained and its headline result, with units
    note = tags["mlflow.note.content"]
    assert "continuous_bernoulli, latent size 4" in note and "continuous pixels" in note
    assert f"log p(x) = {metrics['log_px']:.2f} ± {metrics['log_px_se']:.2f} nats/example (K = 50" in note
    # the data as an MLflow dataset input: name, digest of the training split, split sizes
    (ds,) = run.inputs.dataset_inputs
    meta = json.loads((tmp_path / "run" / "prepared" / "meta.json").read_text())
    assert ds.dataset.name == "mnist5k-continuous" and ds.dataset.digest == meta["files"]["x_train.npy"][:32]
    profile = json.loads(ds.dataset.profile)
    assert {k: profile[f"num_{k}"] for k in ("train", "val", "test")} == meta["sizes"]
    assert profile["data_space"] == "continuous" and profile["data_dim"] == 784
    # artifacts went through the server
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "checkpoints", "report", "metrics"} <= names
    report = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert {"report/report.html", "report/report.md"} <= report
    cfg_text = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
    assert yaml.safe_load(open(cfg_text))["likelihood"]["name"] == "continuous_bernoulli"
    assert (
        json.loads((tmp_path / "run" / "models" / "mlflow_run.json").read_text())["run_id"] == run.info.run_id
    )


def test_default_store_is_sqlite_at_the_project_root(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = tiny_config(tracking=True)
    uri = tracking.tracking_uri(cfg.tracking, tmp_path)
    assert uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert tracking.artifact_location(uri) == (tmp_path.resolve() / "mlartifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert tracking.tracking_uri(cfg.tracking, tmp_path) == "http://127.0.0.1:1"


def test_queued_dvc_experiments_log_to_the_repository_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = tiny_config(tracking=True)
    copy = tmp_path / ".dvc" / "tmp" / "exps" / "tmpab12cd"  # where `dvc exp run --queue` runs a stage
    assert tracking.tracking_uri(cfg.tracking, copy) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"


def test_a_relative_sqlite_store_is_read_against_the_project_root(tmp_path, monkeypatch):
    """`sqlite:///mine.db` (MLflow's tutorials' form) named a file in the working directory: a queued DVC
    experiment logged into its temporary copy, which DVC deletes, and a command run in a subdirectory
    opened another store. It names the project root's file, as the default store does."""
    monkeypatch.chdir(tmp_path)  # the working directory is neither root below
    root, copy = tmp_path / "repo", tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    for key, given in [("env", "sqlite:///mine.db"), ("uri", "sqlite:///stores/mine.db?timeout=30")]:
        if key == "env":
            monkeypatch.setenv("MLFLOW_TRACKING_URI", given)
            cfg = tiny_config(tracking=True)
        else:
            monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
            cfg = tiny_config(f"tracking.uri='{given}'", tracking=True)
        path = given.removeprefix("sqlite:///")
        for where in (root, copy):
            assert tracking.tracking_uri(cfg.tracking, where) == f"sqlite:///{root.resolve()}/{path}", key
    # what is not a relative file is left as given
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for given in (f"sqlite:///{tmp_path}/abs.db", "sqlite://", "sqlite:///:memory:", "http://127.0.0.1:1"):
        assert (
            tracking.tracking_uri(tiny_config(f"tracking.uri='{given}'", tracking=True).tracking, root)
            == given
        )


class _StoredEpochs(pl.Callback):
    """At every epoch start: how many val/elbo values this training's MLflow run holds in the store, after
    waiting for MLflow's asynchronous writes; optionally fails in epoch `crash_in`."""

    def __init__(self, uri: str, crash_in: int | None = None):
        self.uri, self.crash_in, self.stored = uri, crash_in, []

    def on_train_epoch_start(self, trainer, module):
        import mlflow
        from mlflow import MlflowClient

        mlflow.flush_async_logging()
        run_id = trainer.loggers[0].run_id
        self.stored.append(len(MlflowClient(self.uri).get_metric_history(run_id, "binary/val/elbo")))
        if trainer.current_epoch == self.crash_in:
            raise Crash


@pytest.mark.parametrize(("flush_every_s", "stored"), [(0, [0, 1, 2]), (3600, [0, 0, 0])])
def test_epoch_metrics_reach_the_store_at_most_every_interval_and_all_by_the_end(
    prepared_tiny, tmp_path, monkeypatch, flush_every_s, stored
):
    """tracking.flush_every_s=0 sends every epoch's metrics as they are logged; with an hour's interval none
    are sent during training, and at its end every epoch's value is in the run with its own step."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = copy_prepared(prepared_tiny, tmp_path / "run")
    record = _StoredEpochs(uri)
    cfg = tiny_config(f"tracking.flush_every_s={flush_every_s}", tracking=True)
    train(
        cfg,
        out,
        enable_progress_bar=False,
        callbacks=[record],
        tracker=TrainingRun(cfg, tmp_path, out / "models"),
    )
    assert record.stored == stored
    run_id = json.loads((out / "models" / "mlflow_run.json").read_text())["run_id"]
    hist = sorted(MlflowClient(uri).get_metric_history(run_id, "binary/val/elbo"), key=lambda m: m.step)
    assert [m.step for m in hist] == [0, 1, 2]  # step = epoch
    assert [m.value for m in hist] == pytest.approx(val_curve(out))
    times = [m.timestamp for m in hist]
    assert times == sorted(set(times))  # each stamped when it was logged, not when it was sent
    assert len(MlflowClient(uri).get_metric_history(run_id, "binary/train/elbo")) == 3


def test_a_failed_training_still_sends_the_metrics_it_buffered(prepared_tiny, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = copy_prepared(prepared_tiny, tmp_path / "run")
    record = _StoredEpochs(uri, crash_in=2)
    with pytest.raises(Crash):
        cfg = tiny_config("tracking.flush_every_s=3600", tracking=True)
        run = TrainingRun(cfg, tmp_path, out / "models")
        train(cfg, out, enable_progress_bar=False, callbacks=[record], tracker=run)
    assert record.stored == [0, 0, 0]
    run_id = json.loads((out / "models" / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(uri)
    assert client.get_run(run_id).info.status == "FAILED"
    assert [m.value for m in client.get_metric_history(run_id, "binary/val/elbo")] == pytest.approx(
        val_curve(out)
    )
    assert len(val_curve(out)) == 2


def test_numbers_in_a_data_space_units_are_named_under_that_space():
    assert tracking.metric_name("test/log_px", "binary") == "binary/test/log_px"
    assert tracking.metric_name("val/elbo", "continuous") == "continuous/val/elbo"
    assert tracking.metric_name("final/best_val_elbo", "improper") == "improper/final/best_val_elbo"
    # a number not known to be space-free is qualified: never on a shared axis by mistake
    assert tracking.metric_name("test/a_new_number", "binary") == "binary/test/a_new_number"
    assert tracking.metric_name("test/knn_accuracy", "binary") == "test/knn_accuracy"
    assert tracking.metric_name("test/kl", "continuous") == "test/kl"
    # a count of epochs, as final/epochs is: one name for every space
    assert tracking.metric_name("final/resumed_after_epochs", "binary") == "final/resumed_after_epochs"
    assert tracking.metric_name("epoch", "binary") is None
    assert tracking.metric_name("test/data_dim", "binary") is None
    assert [
        tracking.space_name(s, imp)
        for s, imp in [("binary", False), ("continuous", False), ("continuous", True)]
    ] == [
        "binary",
        "continuous",
        "improper",
    ]


# eval.json's numbers in nats of the data space's pmf or density (or of an improper Bernoulli on grey
# levels), bits/dim of it included; and those without a data-space unit (nats of KL between two latent
# Gaussians, sample counts, fractions, accuracies, a verdict)
IN_SPACE_UNITS = ("log_px", "log_px_se", "elbo", "elbo_se", "recon", "bits_per_dim", "log_px_ladder")
WITHOUT_UNITS = ("kl", "ess", "ess_fraction", "ess_hmean", "active_units", "knn_accuracy", "converged")


@pytest.mark.parametrize(
    "key", ["epoch", "test/num_samples", "test/num_examples", "test/data_dim", "test/latent_dim"]
)
def test_bookkeeping_is_not_a_metric(key):
    # facts about the run (its K, its test-set size, ...) are params and tags, never a metric chart
    assert {tracking.metric_name(key, s) for s in ("binary", "continuous", "improper")} == {None}


@pytest.mark.parametrize("key", IN_SPACE_UNITS)
def test_every_evaluation_number_in_the_data_space_units_is_named_under_its_space(key):
    for space in ("binary", "continuous", "improper"):
        assert tracking.metric_name(f"test/{key}", space) == f"{space}/test/{key}"


@pytest.mark.parametrize("key", WITHOUT_UNITS)
def test_an_evaluation_number_without_a_data_space_unit_keeps_one_name(key):
    assert {tracking.metric_name(f"test/{key}", s) for s in ("binary", "continuous", "improper")} == {
        f"test/{key}"
    }


def _git(d: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=d, check=True, capture_output=True)


def test_the_commit_is_dirty_for_code_changes_not_for_what_the_pipeline_writes(tmp_path):
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "config", "user.email", "t@example.com")
    _git(tmp_path, "config", "user.name", "t")
    for f in ("src/m.py", "dvc.lock", "params.yaml", "metrics/eval.json", "plots/elbo.csv"):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("a\n")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "x")
    head = git_commit(tmp_path)
    assert len(head) == 40
    for f in ("dvc.lock", "params.yaml", "metrics/eval.json", "plots/elbo.csv"):
        (tmp_path / f).write_text("b\n")
    assert git_commit(tmp_path) == head
    (tmp_path / "src/m.py").write_text("b\n")
    assert git_commit(tmp_path) == f"{head}-dirty"


def test_reading_the_commit_never_writes_the_users_git_index(tmp_path):
    """A tracked file touched without a change leaves git's index stale: a plain `git status` would rewrite
    it under .git/index.lock, which a killed run leaves behind. Reading the commit writes nothing in .git."""
    _git(tmp_path, "init", "-q")
    (tmp_path / "m.py").write_text("a\n")
    _git(tmp_path, "add", "m.py")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@e", "commit", "-qm", "x")
    index = tmp_path / ".git" / "index"
    before = (index.read_bytes(), index.stat().st_mtime_ns)
    os.utime(tmp_path / "m.py", ns=(index.stat().st_mtime_ns + 2 * 10**9,) * 2)  # newer, same content
    assert git_commit(tmp_path) is not None and "-dirty" not in git_commit(tmp_path)
    assert (index.read_bytes(), index.stat().st_mtime_ns) == before


def test_a_dvc_experiment_run_is_tagged_with_its_name_and_baseline(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "sappy-kite")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "a" * 40)
    tags = tracking.run_tags(tiny_config(), tmp_path)
    assert tags["dvc.exp_name"] == "sappy-kite" and tags["dvc.baseline_rev"] == "a" * 40
    monkeypatch.delenv("DVC_EXP_NAME")
    monkeypatch.delenv("DVC_EXP_BASELINE_REV")
    assert "dvc.exp_name" not in tracking.run_tags(tiny_config(), tmp_path)


def test_the_experiment_carries_the_view_the_printed_link_opens(tmp_path, monkeypatch):
    """`vaerepro ui --print-url` prints links whose saved view is an experiment tag the store holds (the
    browser test, tests/test_mlflow_ui.py, shows what the UI makes of them): the runs table, the ELBO charts,
    and parallel coordinates per measurement, each drawing only its own K's and test set's runs. A run
    evaluated at K=1000 and one at K=5000 on one axis would be ranked by K as much as by model."""
    from urllib.parse import parse_qs, urlparse

    from mlflow import MlflowClient

    from vaerepro.compare import measurement_text
    from vaerepro.tracking import ui as mlflow_ui
    from vaerepro.tracking.names import K_TAG, TEST_SET_TAG

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "conf").symlink_to(ROOT / "conf")
    cfg = tiny_config(tracking=True)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    def ui_lines() -> list[tuple[str, str]]:
        proc = subprocess.run(
            [sys.executable, "-m", "vaerepro.cli", "ui", "--print-url", "--port", "5123"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        return [tuple(line.split(": ", 1)) for line in proc.stdout.splitlines()]

    # a new store: no run evaluated yet, so no parallel coordinates to open
    assert [label for label, _ in ui_lines()] == ["runs table", "ELBO curves", "latent size × likelihood"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("vaerepro")
    # a store made before the parallel views were per measurement holds one of every K at once: withdrawn;
    # a view the user saved in the UI under the same name is theirs and stays
    envelope = json.dumps({"name": mlflow_ui.VIEW_NAMES["parallel"], "createdAt": 0, "state": "{}"})
    mixed, users = (mlflow_ui.SHARED_VIEW_TAG_PREFIX + key for key in ("vaerepro-0123456789abcdef", "a1b2c3"))
    for key in (mixed, users):
        client.set_experiment_tag(exp.experiment_id, key, envelope)
    runs = {}  # name -> (run id, measurement)
    for name, k, test_set, status in [
        ("k1000", "1000", "3f2a9c1b0d4e", "FINISHED"),
        ("k5000", "5000", "3f2a9c1b0d4e", "FINISHED"),
        ("other-test-set", "1000", "0d4e3f2a9c1b", "FINISHED"),
        ("k10-failed", "10", "3f2a9c1b0d4e", "FAILED"),  # no result: no view of its own
        ("unrecorded", None, None, "FINISHED"),  # evaluated before the tags existed: in no view
    ]:
        tags = {"data_space": "binary", "source": "mnist5k"}
        tags.update({K_TAG: k, TEST_SET_TAG: test_set} if k else {})
        run = client.create_run(exp.experiment_id, run_name=name, tags=tags).info.run_id
        client.set_terminated(run, status)
        runs[name] = (run, ("mnist5k", test_set, k))
    lines = ui_lines()
    measurements = [runs[name][1] for name in ("other-test-set", "k1000", "k5000")]  # by test set, then K
    assert [label for label, _ in lines] == [
        "runs table",
        "ELBO curves",
        *(f"latent size × likelihood, {measurement_text(m)}" for m in measurements),
    ]
    exp = client.get_experiment(exp.experiment_id)
    assert mixed not in exp.tags and exp.tags[users] == envelope
    modes = ["TABLE", "CHART", *(["CHART"] * len(measurements))]
    for (_, url), mode, m in zip(lines, modes, [None, None, *measurements], strict=True):
        url = url.strip()
        assert url.startswith(f"http://127.0.0.1:5123/#/experiments/{exp.experiment_id}/runs?")
        query = parse_qs(urlparse(url).fragment.split("?", 1)[1])
        assert query["compareRunsMode"] == [mode] and query["workflowType"] == ["machine_learning"]
        (key,) = query[mlflow_ui.SHARE_KEY_PARAM]
        view = json.loads(json.loads(exp.tags[mlflow_ui.SHARED_VIEW_TAG_PREFIX + key])["state"])
        assert view["selectedColumns"] == mlflow_ui.DEFAULT_COLUMNS
        if m is None:
            assert "searchFilter" not in view
            continue
        drawn = {r.info.run_id for r in client.search_runs([exp.experiment_id], view["searchFilter"])}
        assert drawn == {run for run, measured in runs.values() if measured == m}, (m, drawn)
    # a second call finds the views in place and changes nothing
    before = client.get_experiment(exp.experiment_id).tags
    tracking.ensure_experiment(cfg.tracking, tmp_path)
    assert ui_lines() == lines
    assert client.get_experiment(exp.experiment_id).tags == before


class _RacedClient:
    """An MlflowClient on which another process gets in first: each set_experiment_tag or
    delete_experiment_tag is done by "the other process" (`theirs`: the value it sets; None, the same
    value) and then fails here, as a write that lost a race on the store does ("database is locked")."""

    def __init__(self, client, theirs: str | None = None):
        self.client, self.theirs = client, theirs

    def get_experiment(self, exp_id):
        return self.client.get_experiment(exp_id)

    def set_experiment_tag(self, exp_id, key, value):
        from mlflow.exceptions import MlflowException

        self.client.set_experiment_tag(exp_id, key, value if self.theirs is None else self.theirs)
        raise MlflowException("(sqlite3.OperationalError) database is locked")

    def delete_experiment_tag(self, exp_id, key):
        from mlflow.exceptions import MlflowException

        self.client.delete_experiment_tag(exp_id, key)
        raise MlflowException(f"No tag with name: {key} in experiment with id {exp_id}")


def test_views_another_evaluation_saved_or_withdrew_meanwhile_are_taken_as_done(tmp_path):
    """A sweep's trials evaluated together each save their measurement's view, and each withdraws the old
    all-K view, on one store at once. The one whose write fails because the other's got there first must
    not fail its evaluation: the view is the same whoever saves it. A tag the other process set to
    something else is no view of ours: that failure is raised."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from vaerepro.tracking import store
    from vaerepro.tracking import ui as mlflow_ui

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    measured = ("mnist5k", "3f2a9c1b0d4e", "1000")
    wanted = mlflow_ui.experiment_tags(measurements=(measured,))
    old_view = mlflow_ui.SHARED_VIEW_TAG_PREFIX + "vaerepro-0123456789abcdef"  # withdrawn: every K at once
    envelope = json.dumps({"name": mlflow_ui.VIEW_NAMES["parallel"], "createdAt": 0, "state": "{}"})
    exp = client.create_experiment("raced")
    client.set_experiment_tag(exp, old_view, envelope)

    store.ensure_views(_RacedClient(client), exp, [measured])
    tags = client.get_experiment(exp).tags
    assert old_view not in tags and {k: tags.get(k) for k in wanted} == wanted

    other = client.create_experiment("raced-otherwise")
    with pytest.raises(MlflowException, match="database is locked"):
        store.ensure_views(_RacedClient(client, theirs="{}"), other, [measured])


def test_each_run_s_dataset_names_its_own_data_space(tmp_path):
    """MLflow keeps one dataset per (experiment, name, digest) and links every later run to the first one
    logged: a continuous Bernoulli run on the digits a Bernoulli run had logged showed that run's profile,
    data space binary. And the profile's `quantized` means what eval.json's does: dequantised 8-bit data."""
    from mlflow import MlflowClient

    from vaerepro.config import TrackingConfig

    uri, exp_id = tracking.ensure_experiment(
        TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}"), tmp_path
    )
    client = MlflowClient(uri)
    meta = {
        "source": "mnist5k",
        "files": {"x_train.npy": "ab" * 32},
        "sizes": {"train": 3},
        "quantized": True,
    }
    spaces = {"binary": False, "continuous": True}  # the space and whether the 8-bit levels are dequantised
    runs = {space: client.create_run(exp_id).info.run_id for space in spaces}
    for space, run_id in runs.items():
        tracking.log_dataset(client, run_id, meta, space, "mnist5k")
    for space, run_id in runs.items():
        (used,) = client.get_run(run_id).inputs.dataset_inputs
        profile = json.loads(used.dataset.profile)
        assert (profile["data_space"], profile["quantized"]) == (space, spaces[space])
        assert used.dataset.name == f"mnist5k-{space}" and used.dataset.digest == "ab" * 16


def test_a_dataset_logged_by_two_runs_at_once_links_both(tmp_path):
    """Two runs logging the same dataset at once (a sweep's parallel trials): MLflow's database store can
    find it missing in both, and the second insert fails on its unique key. log_dataset logs again, which
    links the run to the dataset the first one inserted; other errors, or the same one three times, raise."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import IntegrityError

    from vaerepro.config import TrackingConfig

    uri, exp_id = tracking.ensure_experiment(
        TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}"), tmp_path
    )
    client = MlflowClient(uri)
    meta = {"source": "mnist5k", "files": {"x_train.npy": "ab" * 32}, "sizes": {"train": 3}, "data_dim": 4}
    first, second = (client.create_run(exp_id).info.run_id for _ in range(2))
    tracking.log_dataset(client, first, meta, "binary", "mnist5k")

    def raced(n_failures: int, error: Exception):
        calls = []

        class Client:
            def log_inputs(self, run_id, datasets):
                calls.append(run_id)
                if len(calls) <= n_failures:
                    raise error
                client.log_inputs(run_id, datasets=datasets)

        return Client(), calls

    try:  # the error MLflow raises: the database's IntegrityError as its cause
        raise MlflowException("UNIQUE constraint failed") from IntegrityError(
            "INSERT", {}, Exception("unique")
        )
    except MlflowException as err:
        unique = err
    fake, calls = raced(1, unique)
    tracking.log_dataset(fake, second, meta, "binary", "mnist5k")
    assert calls == [second, second]
    for run_id in (first, second):
        (used,) = client.get_run(run_id).inputs.dataset_inputs
        assert (used.dataset.name, used.dataset.digest) == ("mnist5k-binary", "ab" * 16)
    fake, calls = raced(3, unique)
    with pytest.raises(MlflowException):
        tracking.log_dataset(fake, second, meta, "binary", "mnist5k")
    assert len(calls) == 3
    fake, calls = raced(1, MlflowException("RESOURCE_DOES_NOT_EXIST"))
    with pytest.raises(MlflowException, match="RESOURCE_DOES_NOT_EXIST"):
        tracking.log_dataset(fake, second, meta, "binary", "mnist5k")
    assert len(calls) == 1


@pytest.mark.slow
def test_the_comparison_rows_say_what_each_estimate_measured(raw_dir, tmp_path, monkeypatch):
    """An evaluation tags its run with K and the test split's digest, and the report's rows carry both
    (compare.measurement: estimates with another K or of another test set are never ranked together)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    cfg = tiny_config("eval.num_samples=20", tracking=True, raw_dir=raw_dir)
    run_pipeline(cfg, tmp_path / "run", ROOT, progress=False)
    run_id = json.loads((tmp_path / "run" / "models" / "mlflow_run.json").read_text())["run_id"]
    digest = json.loads((tmp_path / "run" / "prepared" / "meta.json").read_text())["files"]["x_test.npy"]
    (row,) = [r for r in tracking.experiment_runs(cfg.tracking, ROOT) if r["run_id"] == run_id]
    assert row["test_set"] == digest[:12] and row["num_samples"] == "20" and row["source"] == "mnist5k"


def _tracked_training(out: Path, root: Path, *overrides: str) -> str:
    """train() on out with tracking (the store: MLFLOW_TRACKING_URI); the id of the run it recorded."""
    cfg = tiny_config(*overrides, tracking=True)
    train(cfg, out, enable_progress_bar=False, tracker=TrainingRun(cfg, root, out / "models"))
    return json.loads((out / "models" / "mlflow_run.json").read_text())["run_id"]


def test_resuming_a_training_whose_run_was_deleted_starts_a_new_run(prepared_tiny, tmp_path, monkeypatch):
    """A run deleted in the MLflow UI is still found by get_run but takes no more logging: the resumed
    training records itself in a new run (with the checkpoint's epochs) instead of failing."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = copy_prepared(prepared_tiny, tmp_path / "run")
    deleted = _tracked_training(out, tmp_path, "train.max_epochs=2")
    MlflowClient(uri).delete_run(deleted)
    run_id = _tracked_training(out, tmp_path, "train.max_epochs=3", "train.resume=true")
    client = MlflowClient(uri)
    assert run_id != deleted and client.get_run(run_id).info.status == "FINISHED"
    history = client.get_metric_history(run_id, "binary/val/elbo")
    assert [m.step for m in history] == [0, 1, 2]  # the checkpoint's 2 epochs, then the third
    assert [m.value for m in history] == pytest.approx(val_curve(out))
    assert client.get_run(run_id).inputs.dataset_inputs  # the new run names its data set too


def test_a_training_from_the_start_ends_the_run_a_killed_training_left_running(
    prepared_tiny, tmp_path, monkeypatch
):
    """A training killed outright before its first models/last.ckpt leaves its run RUNNING; the resume
    (`train.resume=true`: "no last.ckpt yet, training from the start") records itself in a new run and
    ends that one KILLED, naming the new run (runs.end_abandoned; here the killed training is one of this
    process, whose pid cannot be dead). A run already ended keeps its status."""
    from mlflow import MlflowClient

    from vaerepro import signals

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = copy_prepared(prepared_tiny, tmp_path / "run")
    old = _tracked_training(out, tmp_path, "train.max_epochs=1")
    client = MlflowClient(uri)
    client.update_run(old, status="RUNNING")  # what a kill -9 before the first checkpoint leaves
    for name in ("last.ckpt", "best.ckpt"):
        (out / "models" / name).unlink()
    new = _tracked_training(out, tmp_path, "train.max_epochs=1", "train.resume=true")
    assert new != old and client.get_run(new).info.status == "FINISHED"
    before = client.get_run(old)
    assert before.info.status == "KILLED"
    assert before.data.tags["vaerepro.failure"] == (
        f"left RUNNING by an earlier training of this process ({signals.this_process()}); "
        f"{(out / 'models').resolve()} was trained again in run {new}"
    )
    third = _tracked_training(out, tmp_path, "train.max_epochs=1")  # over a finished one: left as it was
    assert third != new and client.get_run(new).info.status == "FINISHED"


def test_a_resumed_training_whose_run_holds_epochs_past_the_checkpoint_goes_on_in_a_new_run(
    prepared_tiny, tmp_path, monkeypatch
):
    """A process killed outright after sending epochs past its last checkpoint leaves them in its run; the
    resumed training trains those epochs again from the checkpoint, another history. MLflow cannot delete
    metric points, so it goes on in a new run (the checkpoint's epochs, then its own: one value an epoch)
    and the old run says where, ended KILLED with the reason."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = copy_prepared(prepared_tiny, tmp_path / "run")
    old = _tracked_training(out, tmp_path, "train.max_epochs=2")
    client = MlflowClient(uri)
    # what a kill -9 after the checkpoint of epoch 1 leaves: epoch 2 in the store, the run RUNNING
    orphan = [Metric(f"binary/{k}/elbo", -1.0, 0, 2) for k in ("train", "val")]
    client.log_batch(old, metrics=orphan)
    client.update_run(old, status="RUNNING")
    new = _tracked_training(out, tmp_path, "train.max_epochs=3", "train.resume=true")
    assert new != old and client.get_run(new).info.status == "FINISHED"
    for key in ("binary/val/elbo", "binary/train/elbo"):
        assert [m.step for m in client.get_metric_history(new, key)] == [0, 1, 2], key
    values = [m.value for m in client.get_metric_history(new, "binary/val/elbo")]
    assert values == pytest.approx(val_curve(out))
    before = client.get_run(old)
    assert before.info.status == "KILLED" and before.data.tags["vaerepro.continued_in"] == new
    assert "epochs 2-2 ran past models/last.ckpt" in before.data.tags["vaerepro.failure"]


@pytest.mark.slow
def test_a_resumed_run_evaluated_at_another_k_ends_both_its_runs(raw_dir, tmp_path, monkeypatch):
    """`vaerepro run ... train.resume=true` with another K: the training goes on in its run, which holds the
    first K's evaluation, so the new evaluation and its report go to a child run (evaluation_run). The
    report ended the child; the training's run, which `vaerepro run` leaves for the report to end, stayed
    RUNNING for ever. Both end FINISHED, and the training's run keeps the first K's numbers."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tmp_path / "run"
    run_pipeline(tiny_config("eval.num_samples=20", tracking=True, raw_dir=raw_dir), out, ROOT, False)
    trained = json.loads((out / "models" / "mlflow_run.json").read_text())["run_id"]
    more = ("eval.num_samples=30", "train.resume=true", "train.max_epochs=4")
    run_pipeline(tiny_config(*more, tracking=True, raw_dir=raw_dir), out, ROOT, False)
    assert json.loads((out / "models" / "mlflow_run.json").read_text())["run_id"] == trained  # went on in it
    child = json.loads((out / "artifacts" / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(uri)
    old, new = client.get_run(trained), client.get_run(child)
    assert (
        new.data.tags["vaerepro.evaluates"] == trained and new.data.tags["vaerepro.eval.num_samples"] == "30"
    )
    assert old.data.tags["vaerepro.eval.num_samples"] == "20"
    assert (old.info.status, new.info.status) == ("FINISHED", "FINISHED")


@pytest.mark.slow
def test_an_evaluation_with_another_k_goes_to_a_run_of_its_own(raw_dir, tmp_path, monkeypatch):
    """`dvc exp run -S eval.num_samples=...` on a trained model: the training's run keeps its evaluation
    (MLflow params cannot change, and a metric shows its latest value: the new K's number would have been
    shown under the old K), and the new one goes to a child run with its own K, report and status."""
    from mlflow import MlflowClient

    from vaerepro.cli import stage_evaluate, stage_report

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tmp_path / "run"
    first = run_pipeline(tiny_config("eval.num_samples=20", tracking=True, raw_dir=raw_dir), out, ROOT, False)
    trained = json.loads((out / "models" / "mlflow_run.json").read_text())["run_id"]
    again = tiny_config("eval.num_samples=30", tracking=True, raw_dir=raw_dir)
    second = stage_evaluate(again, out, ROOT, progress=False)
    stage_report(again, out, ROOT)
    client = MlflowClient(uri)
    child = json.loads((out / "artifacts" / "mlflow_run.json").read_text())["run_id"]
    assert child != trained
    old, new = client.get_run(trained), client.get_run(child)
    assert old.data.params["eval.num_samples"] == old.data.tags["vaerepro.eval.num_samples"] == "20"
    assert old.data.metrics["binary/test/log_px"] == pytest.approx(first["log_px"])
    assert new.data.params["eval.num_samples"] == new.data.tags["vaerepro.eval.num_samples"] == "30"
    assert new.data.metrics["binary/test/log_px"] == pytest.approx(second["log_px"])
    assert new.data.tags["mlflow.parentRunId"] == new.data.tags["vaerepro.evaluates"] == trained
    assert new.data.tags["data_space"] == "binary" and new.info.status == "FINISHED"
    assert {f.path for f in client.list_artifacts(child)} >= {"metrics", "report"}
    rows = {r["run_id"]: r for r in tracking.experiment_runs(again.tracking, ROOT)}
    assert (rows[trained]["num_samples"], rows[child]["num_samples"]) == ("20", "30")
    # K=30 again (another eval.seed: other numbers of the same measurement), with no report after it: the
    # same child, its numbers replaced, FINISHED; the comparison has that measurement once
    seeded = tiny_config("eval.num_samples=30", "eval.seed=7", tracking=True, raw_dir=raw_dir)
    third = stage_evaluate(seeded, out, ROOT, progress=False)
    assert json.loads((out / "artifacts" / "mlflow_run.json").read_text())["run_id"] == child
    assert third["log_px"] != pytest.approx(second["log_px"])
    assert client.get_run(child).data.metrics["binary/test/log_px"] == pytest.approx(third["log_px"])
    assert client.get_run(child).info.status == "FINISHED"
    rows = tracking.experiment_runs(again.tracking, ROOT)
    assert sorted((r["run_id"], r["num_samples"]) for r in rows) == sorted([(trained, "20"), (child, "30")])
    # the first K again: the training's own run, as the same measurement
    stage_evaluate(tiny_config("eval.num_samples=20", tracking=True, raw_dir=raw_dir), out, ROOT, False)
    assert json.loads((out / "artifacts" / "mlflow_run.json").read_text())["run_id"] == trained
    # an evaluation with tracking off, then a report with it on: the report is of numbers no run holds, so
    # it goes to none (it went to the training's run, beside the K=20 numbers it does not show)
    stage_evaluate(tiny_config("eval.num_samples=40", raw_dir=raw_dir), out, ROOT, False)
    assert json.loads((out / "artifacts" / "mlflow_run.json").read_text())["run_id"] is None

    def reports():
        from mlflow.artifacts import download_artifacts

        return {
            r: Path(
                download_artifacts(run_id=r, artifact_path="report/report.md", tracking_uri=uri)
            ).read_text()
            for r in (trained, child)
        }

    before = reports()
    assert "K=20" in before[trained]
    stage_report(tiny_config("eval.num_samples=40", tracking=True, raw_dir=raw_dir), out, ROOT)
    assert "K=40" in (out / "reports" / "report.md").read_text()
    assert reports() == before
    # an evaluation stopped (Ctrl-C) before it logged anything leaves the finished run of the K=20 one as it
    # is (it marked it KILLED); a run still RUNNING is ended, never left RUNNING
    tracking.end_recorded_run(out, "KILLED", KeyboardInterrupt(), evaluated=False)
    assert client.get_run(trained).info.status == "FINISHED"
    assert "vaerepro.failure" not in client.get_run(trained).data.tags
    client.update_run(trained, status="RUNNING")
    tracking.end_recorded_run(out, "KILLED", KeyboardInterrupt(), evaluated=False)
    assert client.get_run(trained).info.status == "KILLED"


@pytest.mark.slow
def test_a_report_never_goes_to_the_run_of_another_evaluation(raw_dir, tmp_path, monkeypatch):
    """artifacts/mlflow_run.json names the sha256 of the eval.json whose numbers went to its run. An
    evaluation (another K) that wrote its eval.json but whose MLflow store refused the numbers leaves the
    previous evaluation's run named: the report refuses, in one line naming both files, before writing
    anything (it would have gone to the K=20 run with the K=30 numbers); evaluated again, it goes to the
    K=30 run."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from vaerepro.cli import stage_evaluate, stage_report
    from vaerepro.errors import UserError
    from vaerepro.tracking import evaluations

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tmp_path / "run"
    run_pipeline(tiny_config("eval.num_samples=20", tracking=True, raw_dir=raw_dir), out, ROOT, False)
    pointer = out / "artifacts" / "mlflow_run.json"
    trained = json.loads(pointer.read_text())["run_id"]
    report_before = (out / "reports" / "report.md").read_text()
    again = tiny_config("eval.num_samples=30", tracking=True, raw_dir=raw_dir)

    def refused(*args, **kwargs):
        raise MlflowException("database is locked")

    with monkeypatch.context() as m:
        m.setattr(evaluations, "evaluation_run", refused)
        with pytest.raises(MlflowException):
            stage_evaluate(again, out, ROOT, progress=False)
    assert json.loads((out / "metrics" / "eval.json").read_text())["num_samples"] == 30
    assert json.loads(pointer.read_text())["run_id"] == trained
    with pytest.raises(UserError) as err:
        stage_report(again, out, ROOT)
    assert str(err.value) == (
        f"{pointer}: names the MLflow run of another evaluation than {out / 'metrics' / 'eval.json'} (the "
        "last `vaerepro evaluate` wrote its numbers but did not log them); run `vaerepro evaluate` again"
    )
    assert (out / "reports" / "report.md").read_text() == report_before
    stage_evaluate(again, out, ROOT, progress=False)
    stage_report(again, out, ROOT)
    child = json.loads(pointer.read_text())["run_id"]
    assert child != trained and "K=30" in (out / "reports" / "report.md").read_text()
    client = MlflowClient(uri)
    assert "report" in {f.path for f in client.list_artifacts(child)}
    assert client.get_run(child).data.tags["vaerepro.eval.num_samples"] == "30"


def test_the_data_version_of_a_run_on_your_own_file_is_that_file_s(tmp_path):
    """data.dvc versions data/, where the embedded and downloaded sources live, not the .npz data.path names:
    a run on that file is tagged with the file's own md5, as prepare read it."""
    import hashlib

    import numpy as np

    from vaerepro import data

    np.savez(tmp_path / "mine.npz", x=np.random.default_rng(0).random((40, 9)).astype(np.float32))
    meta = data.prepare("npz", tmp_path, tmp_path / "prepared", path=tmp_path / "mine.npz")
    (tmp_path / "data.dvc").write_text("outs:\n- md5: 0123456789abcdef.dir\n  path: data\n")
    own = tracking.run_tags(tiny_config("data=npz", f"data.path={tmp_path / 'mine.npz'}"), tmp_path, meta)
    assert own["data_version"] == hashlib.md5((tmp_path / "mine.npz").read_bytes()).hexdigest()
    assert tracking.run_tags(tiny_config(), tmp_path, meta)["data_version"] == "0123456789abcdef.dir"


def test_a_two_layer_models_active_units_are_logged_per_layer(tmp_path, store):
    """test/active_units (the sum) and, for two stochastic layers, test/active_units_z1 and _z2."""
    from mlflow import MlflowClient

    client = MlflowClient(store)
    # artifacts under tmp_path: an experiment without artifact_location would put them in ./mlruns
    exp_id = client.create_experiment("two-layer", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(exp_id).info.run_id
    (tmp_path / "models").mkdir()
    tracking.write_run_id(tmp_path / "models", run_id, store)
    (tmp_path / "metrics").mkdir()
    ev = {
        "log_px": -90.0,
        "log_px_se": 0.5,
        "elbo": -95.0,
        "elbo_se": 0.5,
        "kl": 10.0,
        "bits_per_dim": 0.17,
        "num_samples": 10,
        "active_units": 27,
        "active_units_by_layer": [22, 5],
        "log_px_ladder": [{"k": 1, "log_px": -95.0}, {"k": 10, "log_px": -90.0}],
    }
    (tmp_path / "metrics" / "eval.json").write_text(json.dumps(ev))
    cfg = tiny_config(
        "model.stochastic_layers=2",
        "model.latent_dim_2=3",
        "model.hidden_dims_2=[8]",
        "train.estimator=A",
        tracking=True,
    )
    tracking.log_evaluation(cfg, tmp_path, ev)
    m = client.get_run(run_id).data.metrics
    assert (m["test/active_units"], m["test/active_units_z1"], m["test/active_units_z2"]) == (27, 22, 5)
    assert m["binary/test/log_px"] == -90.0


def test_a_changed_tag_says_the_value_the_run_is_on_now(tmp_path):
    """MLflow params cannot change: a resume with another value records it as a tag changed.<key>; back to
    the param's value (1 x 50 -> 2 x 25 -> 1 x 50 devices x batch), the tag goes, instead of naming a
    configuration the run is no longer on."""
    from mlflow import MlflowClient

    from vaerepro.config import TrackingConfig
    from vaerepro.tracking.runs import log_config

    uri, exp_id = tracking.ensure_experiment(
        TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}"), tmp_path
    )
    client = MlflowClient(uri)
    run_id = client.create_run(exp_id).info.run_id

    def logged(batch: int, devices: int) -> tuple[dict, dict]:
        log_config(
            client,
            run_id,
            {"train": {"batch_size": batch}, "trainer": {"devices": devices}},
            ("train", "trainer"),
        )
        data = client.get_run(run_id).data
        return data.params, {k: v for k, v in data.tags.items() if k.startswith("changed.")}

    assert logged(50, 1) == ({"train.batch_size": "50", "trainer.devices": "1"}, {})
    assert logged(25, 2)[1] == {"changed.train.batch_size": "25", "changed.trainer.devices": "2"}
    assert logged(50, 1) == ({"train.batch_size": "50", "trainer.devices": "1"}, {})


def test_runs_that_dead_processes_left_running_are_ended_killed_and_no_others(tmp_path):
    """end_abandoned, which a training calls when its run opens: a run whose process (PROCESS_TAG) is gone
    from this machine is ended KILLED with the reason, in the experiment trained in or, in any experiment,
    when it trained into the models/ now trained again; a live process's run, one of another machine, one
    of another experiment and directory, one of this process in another directory and one that names no
    process (a reproduction's or sweep's parent, an earlier vaerepro's) stay RUNNING."""
    import os

    from mlflow import MlflowClient

    from vaerepro import signals
    from vaerepro.config import TrackingConfig
    from vaerepro.tracking.runs import MODEL_DIR_TAG, PROCESS_TAG, end_abandoned

    uri, exp = tracking.ensure_experiment(TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}"), tmp_path)
    _, other_exp = tracking.ensure_experiment(TrackingConfig(uri=uri, experiment="other"), tmp_path)
    client = MlflowClient(uri)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    here, models, elsewhere = signals.machine(), tmp_path / "run" / "models", str(tmp_path / "b" / "models")
    this = str(models.resolve())  # the tag: the resolved path

    def running(experiment: str, model_dir: str, process: str | None) -> str:
        tags = {MODEL_DIR_TAG: model_dir, **({PROCESS_TAG: process} if process else {})}
        return client.create_run(experiment, tags=tags).info.run_id

    try:
        current = running(exp, this, signals.this_process())
        ended = {
            "dead, this experiment": running(exp, elsewhere, f"{here}:{gone.pid}"),
            "dead, another experiment, this models/": running(other_exp, this, f"{here}:{gone.pid}"),
            "this process, this models/": running(exp, this, f"{here}:{os.getpid()}"),
        }
        left = {
            "alive": running(exp, this, f"{here}:{alive.pid}"),
            "another machine": running(exp, this, f"{here}x:{gone.pid}"),
            "dead, another experiment and models/": running(other_exp, elsewhere, f"{here}:{gone.pid}"),
            "this process, another models/": running(exp, elsewhere, f"{here}:{os.getpid()}"),
            "no process": running(exp, this, None),
        }
        assert sorted(end_abandoned(client, exp, models, current)) == sorted(ended.values())
    finally:
        alive.kill()
        alive.wait()
    status = {name: client.get_run(r).info.status for name, r in {**ended, **left}.items()}
    assert status == {**dict.fromkeys(ended, "KILLED"), **dict.fromkeys(left, "RUNNING")}
    assert client.get_run(current).info.status == "RUNNING"
    reasons = {name: client.get_run(r).data.tags["vaerepro.failure"] for name, r in ended.items()}
    assert reasons["dead, this experiment"] == (
        f"its process ({here}:{gone.pid}) is gone and never ended the run: killed outright (kill -9, OOM)"
    )
    again = f"; {models.resolve()} was trained again in run {current}"
    assert reasons["dead, another experiment, this models/"] == reasons["dead, this experiment"] + again
    assert reasons["this process, this models/"] == (
        f"left RUNNING by an earlier training of this process ({here}:{os.getpid()})" + again
    )


def _evaluation(out: Path, k: int, log_px: float) -> dict:
    """An evaluate stage's eval.json (written to out/metrics) with this K and log p(x): a fake evaluation."""
    ev = {
        "log_px": log_px,
        "log_px_se": 0.5,
        "elbo": log_px - 5.0,
        "elbo_se": 0.5,
        "kl": 10.0,
        "bits_per_dim": 0.17,
        "num_samples": k,
        "log_px_ladder": [{"k": 1, "log_px": log_px - 5.0}, {"k": k, "log_px": log_px}],
    }
    (out / "metrics").mkdir(parents=True, exist_ok=True)
    (out / "metrics" / "eval.json").write_text(json.dumps(ev))
    return ev


def _trained_run(out: Path, experiment: str, store: str, monkeypatch) -> tuple[object, str]:
    """A finished training run of experiment `experiment` (as the train stage leaves it: FINISHED, named in
    out/models/mlflow_run.json, its test split in out/prepared/meta.json), evaluated at K=5 with log p(x) =
    -100; (a client of the store, its id)."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    cfg = tiny_config("eval.num_samples=5", f"tracking.experiment={experiment}", tracking=True)
    _, exp_id = tracking.ensure_experiment(cfg.tracking, ROOT)
    client = MlflowClient(store)
    trained = client.create_run(exp_id, run_name="bernoulli-z4-s0", tags=tracking.run_tags(cfg, out)).info
    client.set_terminated(trained.run_id, "FINISHED")
    tracking.write_run_id(out / "models", trained.run_id, store)
    (out / "prepared").mkdir(parents=True)
    (out / "prepared" / "meta.json").write_text(json.dumps({"files": {"x_test.npy": "ab" * 32}}))
    tracking.log_evaluation(cfg, out, _evaluation(out, 5, -100.0))
    return client, trained.run_id


def _evaluated_at(out: Path, experiment: str, k: int, log_px: float) -> str:
    """log_evaluation of a fake evaluation with this K and log p(x); the id of the run it went to."""
    cfg = tiny_config(f"eval.num_samples={k}", f"tracking.experiment={experiment}", tracking=True)
    tracking.log_evaluation(cfg, out, _evaluation(out, k, log_px))
    return json.loads((out / "artifacts" / "mlflow_run.json").read_text())["run_id"]


def test_the_same_measurement_at_another_k_again_replaces_its_evaluation_runs_numbers(
    tmp_path, store, monkeypatch
):
    """A trained model (its run evaluated at K=5) evaluated twice at K=20, with no report in between: the
    second evaluation goes to the K=20 run the first made and replaces its numbers (as a second K=5
    evaluation replaces the training run's), instead of a second K=20 run; that run is FINISHED after each
    evaluation (the evaluate stage's own run, as the training's is the train stage's), never left RUNNING;
    the comparison's rows hold each measurement once, and the report's ranking names the K=20 run once."""
    from vaerepro.report_comparison import comparison_section

    out = tmp_path / "run"
    client, trained = _trained_run(out, "again", store, monkeypatch)
    first = _evaluated_at(out, "again", 20, -95.0)
    assert first != trained and client.get_run(first).info.status == "FINISHED"
    assert _evaluated_at(out, "again", 20, -94.0) == first
    exp_id = client.get_run(trained).info.experiment_id
    children = client.search_runs([exp_id], f"tags.`vaerepro.evaluates` = '{trained}'")
    assert [r.info.run_id for r in children] == [first]
    child = client.get_run(first)
    assert child.info.status == "FINISHED" and child.info.run_name == "bernoulli-z4-s0-K20"
    assert child.data.metrics["binary/test/log_px"] == -94.0  # the second evaluation's
    assert [m.value for m in client.get_metric_history(first, "binary/test/log_px")] == [-95.0, -94.0]
    assert child.data.tags["vaerepro.eval.num_samples"] == "20"
    assert child.data.tags["vaerepro.test_set"] == "ab" * 6
    old = client.get_run(trained)
    assert old.info.status == "FINISHED" and old.data.metrics["binary/test/log_px"] == -100.0
    cfg = tiny_config("tracking.experiment=again", tracking=True)
    rows = tracking.experiment_runs(cfg.tracking, ROOT)
    assert sorted((r["run_id"], r["num_samples"], r["log_px"]) for r in rows) == sorted(
        [(trained, "5", -100.0), (first, "20", -94.0)]
    )
    names = [
        row[1]
        for b in comparison_section(rows, this_run=first)
        if getattr(b, "kind", "") == "ranking"
        for row in b.rows
    ]
    assert sorted(names) == ["bernoulli-z4-s0", "bernoulli-z4-s0-K20 (this run)"]
    # the training run's own K again still goes to the training run, and leaves the K=20 run as it is
    assert _evaluated_at(out, "again", 5, -99.0) == trained
    assert client.get_run(first).data.metrics["binary/test/log_px"] == -94.0


def test_evaluation_runs_of_one_measurement_made_before_are_one_row_and_the_newest_takes_the_next(
    tmp_path, store, monkeypatch
):
    """Two K=20 runs of one trained model, as evaluations made before the lookup left them (the older one
    RUNNING: no report came after it): the comparison shows the newest only; the next K=20 evaluation
    replaces the newest's numbers, and the older one, left RUNNING, is ended KILLED with the reason, its
    numbers kept."""
    out = tmp_path / "run"
    client, trained = _trained_run(out, "before", store, monkeypatch)
    run = client.get_run(trained)
    tags = {
        **{k: v for k, v in run.data.tags.items() if not k.startswith(("mlflow.", "vaerepro."))},
        "mlflow.parentRunId": trained,
        "vaerepro.evaluates": trained,
        "vaerepro.eval.num_samples": "20",
        "vaerepro.test_set": "ab" * 6,
    }
    made = []
    for start, log_px in ((1000, -96.0), (2000, -95.0)):
        r = client.create_run(run.info.experiment_id, start_time=start, tags=tags, run_name=f"s{start}")
        client.log_metric(r.info.run_id, "binary/test/log_px", log_px)
        made.append(r.info.run_id)
    older, newer = made
    client.set_terminated(newer, "FINISHED")
    cfg = tiny_config("tracking.experiment=before", tracking=True)
    rows = tracking.experiment_runs(cfg.tracking, ROOT)
    assert sorted((r["run_id"], r["log_px"]) for r in rows) == sorted([(trained, -100.0), (newer, -95.0)])
    assert _evaluated_at(out, "before", 20, -94.0) == newer
    assert client.get_run(newer).data.metrics["binary/test/log_px"] == -94.0
    assert client.get_run(newer).info.status == "FINISHED"
    left = client.get_run(older)
    assert left.info.status == "KILLED" and left.data.metrics["binary/test/log_px"] == -96.0
    assert left.data.tags["vaerepro.failure"] == (
        f"left RUNNING by an earlier evaluation; this measurement is now in run {newer}"
    )
    rows = tracking.experiment_runs(cfg.tracking, ROOT)
    assert sorted((r["run_id"], r["log_px"]) for r in rows) == sorted([(trained, -100.0), (newer, -94.0)])


def test_an_evaluation_run_is_tagged_with_the_dvc_experiment_that_evaluated(tmp_path, store, monkeypatch):
    """`dvc exp run -S eval.num_samples=30` on a model another experiment trained: the K=30 evaluation run
    copied the training run's tags, dvc.exp_name among them, so MLflow named the training's experiment for a
    measurement it never made; the same measurement again under `dvc repro` (no experiment) replaces the
    numbers and must not keep the earlier experiment's name either."""
    monkeypatch.setenv("DVC_EXP_NAME", "azure-tote")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "a" * 40)
    out = tmp_path / "run"
    client, trained = _trained_run(out, "exp-tags", store, monkeypatch)
    assert client.get_run(trained).data.tags["dvc.exp_name"] == "azure-tote"
    monkeypatch.setenv("DVC_EXP_NAME", "upset-tugs")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "b" * 40)
    child = _evaluated_at(out, "exp-tags", 30, -95.0)
    assert child != trained
    tags = client.get_run(child).data.tags
    assert (tags["dvc.exp_name"], tags["dvc.baseline_rev"]) == ("upset-tugs", "b" * 40)
    monkeypatch.delenv("DVC_EXP_NAME")
    monkeypatch.delenv("DVC_EXP_BASELINE_REV")
    assert _evaluated_at(out, "exp-tags", 30, -94.0) == child  # replaces its numbers
    tags = client.get_run(child).data.tags
    assert "dvc.exp_name" not in tags and "dvc.baseline_rev" not in tags
    assert client.get_run(trained).data.tags["dvc.exp_name"] == "azure-tote"  # the training's, as it was


def test_a_damaged_train_json_does_not_stop_the_evaluation_s_numbers_reaching_its_run(
    tmp_path, store, monkeypatch, caplog
):
    """metrics/train.json cut short (a training killed while writing it) beside a whole evaluation: the
    evaluate stage logged part of its numbers, then failed on json.loads with a traceback, leaving the run
    without its eval.json artifact. Now the numbers and eval.json are logged, the description leaves out the
    training's numbers, and one warning names the file."""
    out = tmp_path / "run"
    client, trained = _trained_run(out, "damaged-train-json", store, monkeypatch)
    (out / "metrics" / "train.json").write_text('{"train_elbo": -97.0, "val_')
    with caplog.at_level("WARNING", logger="vaerepro.tracking.evaluations"):
        assert _evaluated_at(out, "damaged-train-json", 5, -99.0) == trained
    assert any(
        str(out / "metrics" / "train.json") in r.getMessage() and "not valid JSON" in r.getMessage()
        for r in caplog.records
    )
    assert client.get_run(trained).data.metrics[tracking.metric_name("test/log_px", "binary")] == -99.0
    logged = Path(client.download_artifacts(trained, "metrics/eval.json", str(tmp_path)))
    assert json.loads(logged.read_text())["log_px"] == -99.0  # this evaluation's, not the one before


def test_a_report_never_goes_to_a_run_whose_evaluation_stopped_while_logging(tmp_path, store, monkeypatch):
    """An evaluation killed (or failed) while it logged its numbers to the run it evaluated again: the run
    held the new tags and eval params beside the previous evaluation's numbers, the pointer named it as this
    eval.json's run, so the report went on, showed the old numbers as "this run" in its comparison beside
    its own new headline, and ended the run FINISHED. Now the pointer says the logging did not finish and
    the report refuses it in one line until the evaluation is run again."""
    from vaerepro.errors import UserError

    out = tmp_path / "run"
    client, trained = _trained_run(out, "stopped-logging", store, monkeypatch)
    tracking.check_evaluation_run(out)  # a whole evaluation: the report goes to its run

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as a kill at this point: nothing after it is logged

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr("vaerepro.tracking.evaluations.log_metrics", killed)
        _evaluated_at(out, "stopped-logging", 5, -90.0)
    assert client.get_run(trained).data.metrics[tracking.metric_name("test/log_px", "binary")] == -100.0
    pointer = out / "artifacts" / "mlflow_run.json"
    with pytest.raises(UserError) as err:
        tracking.check_evaluation_run(out)
    assert str(err.value) == (
        f"{pointer}: the last `vaerepro evaluate` stopped while it logged the numbers of "
        f"{out / 'metrics' / 'eval.json'} to MLflow run {trained}, which holds part of them and part of the "
        "previous evaluation's; run `vaerepro evaluate` again"
    )
    assert _evaluated_at(out, "stopped-logging", 5, -90.0) == trained  # evaluated again, whole
    tracking.check_evaluation_run(out)
    assert client.get_run(trained).data.metrics[tracking.metric_name("test/log_px", "binary")] == -90.0


def test_a_report_that_succeeds_after_one_that_failed_leaves_no_failure_on_the_run(
    tmp_path, store, monkeypatch
):
    """A report stage that failed (a damaged result file, a kill) ended the run FAILED with its reason as
    the vaerepro.failure tag; the report run again ended it FINISHED but kept that tag, so MLflow showed a
    finished run with a failure. Now the reason goes with the FINISHED status, as end_run does."""
    out = tmp_path / "run"
    client, trained = _trained_run(out, "report-again", store, monkeypatch)
    tracking.end_run(client, trained, "FAILED", "UnicodeDecodeError: 'utf-8' codec can't decode byte 0x80")
    (out / "reports").mkdir()
    (out / "reports" / "report.md").write_text("# report\n")
    tracking.log_report(out, out / "reports")
    run = client.get_run(trained)
    assert run.info.status == "FINISHED" and "vaerepro.failure" not in run.data.tags


def test_a_damaged_run_file_names_the_stage_that_writes_it(tmp_path):
    """models/mlflow_run.json is the train stage's, artifacts/mlflow_run.json the evaluate stage's: the one
    line for a damaged one names the stage that rewrites it (both said `vaerepro train`)."""
    from vaerepro.errors import UserError

    for folder, stage in (("models", "vaerepro train"), ("artifacts", "vaerepro evaluate")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "mlflow_run.json").write_text('{"run_id": "ab')
        with pytest.raises(UserError, match=f"mlflow_run.json: not the JSON object `{stage}` writes"):
            tracking.read_run_id(tmp_path / folder)


def test_an_evaluation_run_at_another_k_has_the_rate_its_model_trained_at(tmp_path, store, monkeypatch):
    """With train.lr_candidates, train.lr is the rate the pilots chose, which the training's run logs when
    it finishes (log_config leaves the configured, unused rate out). An evaluation at another K goes to a
    child run that logs the config: it had no train.lr at all, a blank in the compare view's column beside
    its training's 0.05."""
    out = tmp_path / "run"
    client, trained = _trained_run(out, "lr-child", store, monkeypatch)
    for name in ("train.lr", "train/lr_selected"):  # as TrainingRun.finish logs the pilots' choice
        client.log_param(trained, name, "0.05")
    chosen = "train.lr_candidates=[1e-9,0.05]"
    cfg = tiny_config("eval.num_samples=20", "tracking.experiment=lr-child", chosen, tracking=True)
    tracking.log_evaluation(cfg, out, _evaluation(out, 20, -95.0))
    child = json.loads((out / "artifacts" / "mlflow_run.json").read_text())["run_id"]
    assert child != trained
    params = client.get_run(child).data.params
    assert (params["train.lr"], params["train/lr_selected"]) == ("0.05", "0.05")
    assert params["train.lr_candidates"] == "[1e-09, 0.05]"


def test_a_fixed_and_a_learned_sigma_gaussian_are_two_likelihoods_in_names_rows_and_figure(
    tmp_path, store, monkeypatch
):
    """`likelihood=gaussian` and `likelihood=gaussian likelihood.sigma=0.1` of one latent size and seed were
    both run `gaussian-z5-s0`, with the likelihood `gaussian` in the comparison's rows: the report's ranking
    showed two rows alike but for their run ids, and its figure joined them as one likelihood's mean (of
    1240 and -925 nats/example: a point no model has). Each now names its variant."""
    from vaerepro import report_comparison
    from vaerepro.document import Table

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    learned = tiny_config("likelihood=gaussian", "model.latent_dim=5", tracking=True)
    fixed = tiny_config("likelihood=gaussian", "likelihood.sigma=0.1", "model.latent_dim=5", tracking=True)
    floor = tiny_config("likelihood=gaussian", "likelihood.scale=log_variance", tracking=True)
    assert (learned.run_name, fixed.run_name) == ("gaussian-z5-s0", "gaussian-sigma=0.1-z5-s0")
    assert floor.run_name == "gaussian-log_variance-z4-s0"
    assert tiny_config().run_name == "bernoulli-z4-s0"
    # the run's description in MLflow names it so too
    described = tracking.runs.headline(fixed)
    assert described.startswith("**gaussian (sigma=0.1), latent size 5, continuous pixels"), described
    from mlflow import MlflowClient

    client = MlflowClient(store)
    exp_id = client.create_experiment("gaussians", artifact_location=(tmp_path / "artifacts").as_uri())
    for cfg, log_px in ((learned, 1240.0), (fixed, -925.0)):
        run = client.create_run(exp_id, run_name=cfg.run_name, tags=tracking.run_tags(cfg, tmp_path))
        tracking.log_config(client, run.info.run_id, cfg.to_dict())
        for name, value in (("log_px", log_px), ("log_px_se", 1.0)):
            client.log_metric(run.info.run_id, f"continuous/test/{name}", value)
        client.set_tag(run.info.run_id, "vaerepro.converged", "true")
        client.set_terminated(run.info.run_id, "FINISHED")
    rows = tracking.experiment_runs(tiny_config("tracking.experiment=gaussians", tracking=True).tracking)
    assert sorted(r["likelihood"] for r in rows) == ["gaussian", "gaussian (sigma=0.1)"]
    drawn = []
    monkeypatch.setattr(report_comparison, "png", lambda fig: drawn.append(fig) or b"")
    blocks = report_comparison.comparison_section(rows)
    (ranking,) = [b for b in blocks if isinstance(b, Table) and b.kind == "ranking"]
    assert [row[1:3] for row in ranking.rows] == [
        ["gaussian-z5-s0", "gaussian"],
        ["gaussian-sigma=0.1-z5-s0", "gaussian (sigma=0.1)"],
    ]
    (ax,) = drawn[0].axes
    assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == ["gaussian", "gaussian (sigma=0.1)"]


def test_an_evaluation_run_at_another_k_shows_the_data_it_measured(tmp_path, store, monkeypatch):
    """The UI's Dataset column showed mnist5k-binary for a training's run and nothing for its evaluation at
    another K (the child `...-K20`): the child now logs the same dataset, once however often it evaluates."""
    out = tmp_path / "run"
    client, trained = _trained_run(out, "datasets", store, monkeypatch)
    meta = {"source": "mnist5k", "files": {"x_test.npy": "ab" * 32, "x_train.npy": "cd" * 32}}
    (out / "prepared" / "meta.json").write_text(json.dumps({**meta, "sizes": {"train": 480, "test": 60}}))
    child = _evaluated_at(out, "datasets", 20, -95.0)
    assert _evaluated_at(out, "datasets", 20, -94.0) == child != trained
    (shown,) = client.get_run(child).inputs.dataset_inputs
    assert (shown.dataset.name, shown.dataset.digest) == ("mnist5k-binary", ("cd" * 32)[:32])


def test_numbers_of_replaced_weights_are_labelled_in_the_ui_until_evaluated_again(
    tmp_path, store, monkeypatch
):
    """A run evaluated at K=5 and K=20, then trained further (a new best.ckpt): both runs' numbers are of the
    old weights. The UI's table showed them as the runs' results; now each run carries the vaerepro.stale tag
    (a column of the saved view) and its description begins with why, the same reason the report's
    comparison gives. An evaluation of the new weights lifts both from the run it measured, and only there."""
    from vaerepro.compare import measurement
    from vaerepro.report_comparison import not_a_result
    from vaerepro.tracking import evaluations, runs
    from vaerepro.tracking import ui as mlflow_ui
    from vaerepro.tracking.names import BEST_CKPT_TAG, STALE_TAG

    out = tmp_path / "run"
    client, trained = _trained_run(out, "stale", store, monkeypatch)
    # a sweep's parent run: no numbers of its own, never compared, never drawn
    parent = client.create_run(client.get_run(trained).info.experiment_id, run_name="sweep").info.run_id
    client.set_terminated(parent, "FINISHED")
    old, new = "a" * 64, "b" * 64

    def trained_to(ckpt: str) -> None:  # as the train stage's TrainingRun.finish does with its best.ckpt
        client.set_tag(trained, BEST_CKPT_TAG, ckpt[:12])
        evaluations.label_stale_numbers(client, trained)

    def evaluated(k: int, log_px: float, ckpt: str) -> str:
        cfg = tiny_config(f"eval.num_samples={k}", "tracking.experiment=stale", tracking=True)
        tracking.log_evaluation(cfg, out, {**_evaluation(out, k, log_px), "checkpoint_sha256": ckpt})
        return json.loads((out / "artifacts" / "mlflow_run.json").read_text())["run_id"]

    def shown() -> dict[str, tuple[str | None, str]]:  # run id -> (its stale tag, its description)
        found = [client.get_run(trained), client.get_run(child)]
        return {r.info.run_id: (r.data.tags.get(STALE_TAG), r.data.tags[runs.NOTE_TAG]) for r in found}

    def compared() -> dict[str, str | None]:  # run id -> why the report's comparison leaves it out
        cfg = tiny_config("tracking.experiment=stale", tracking=True)
        rows = tracking.experiment_runs(cfg.tracking, ROOT)
        # the UI's parallel coordinates draw exactly the runs whose numbers the comparison takes as results
        exp_id = client.get_run(trained).info.experiment_id
        drawn = {r.info.run_id for r in client.search_runs([exp_id], mlflow_ui.COMPARABLE_FILTER)}
        assert drawn == {r["run_id"] for r in rows if not_a_result(r) is None}, (drawn, rows)
        # one view per measurement, each drawing that measurement's results only: never K=5 beside K=20
        # on one log p(x) axis; every measurement evaluated has its view saved on the experiment
        saved = client.get_experiment(exp_id).tags
        for m in {measurement(r) for r in rows}:
            view = mlflow_ui.experiment_tags(measurements=[m])
            assert set(view) <= set(saved), f"no saved view of {m}"
            in_view = {r.info.run_id for r in client.search_runs([exp_id], mlflow_ui.measurement_filter(m))}
            assert in_view == {r["run_id"] for r in rows if measurement(r) == m and r["run_id"] in drawn}
        assert {m[2] for m, _ in tracking.parallel_links(store, exp_id)} == {
            measurement(r)[2] for r in rows if r["run_id"] in drawn
        }
        return {r["run_id"]: r.get("stale") for r in rows}

    trained_to(old)
    assert evaluated(5, -100.0, old) == trained
    child = evaluated(20, -95.0, old)
    assert child != trained
    assert {i: tag for i, (tag, _) in shown().items()} == {trained: None, child: None}
    assert compared() == {trained: None, child: None}

    trained_to(new)  # resumed and trained further: both runs' numbers are of best.ckpt aaaa...
    reason = evaluations.stale_reason(old[:12], new[:12])
    assert reason is not None and old[:12] in reason and new[:12] in reason and "trained further" in reason
    assert compared() == {trained: reason, child: reason}
    labelled = shown()
    for tag, note in labelled.values():
        assert tag == reason and note.startswith(f"{evaluations.STALE_NOTE}{reason}  \n"), note
    assert "log p(x) = -95.00" in labelled[child][1]  # the numbers the warning is about, still described
    evaluations.label_stale_numbers(client, trained)
    assert shown() == labelled  # labelled once, however often

    assert evaluated(20, -90.0, new) == child  # the new weights measured at K=20: that run's numbers are new
    tag, note = shown()[child]
    assert tag is None and not note.startswith(evaluations.STALE_NOTE) and "log p(x) = -90.00" in note, note
    assert shown()[trained][0] == reason and compared() == {trained: reason, child: None}

    assert evaluated(5, -85.0, new) == trained
    assert {i: tag for i, (tag, _) in shown().items()} == {trained: None, child: None}
    assert not shown()[trained][1].startswith(evaluations.STALE_NOTE)
    assert compared() == {trained: None, child: None}
    for status in ("RUNNING", "SCHEDULED", "FAILED", "KILLED", "FINISHED"):  # compared() holds for each
        client.update_run(child, status=status)
        assert compared() == {trained: None, child: None}


@pytest.mark.slow
def test_a_training_continued_after_its_evaluation_leaves_the_earlier_numbers_out_of_comparisons(
    raw_dir, tmp_path, monkeypatch
):
    """`vaerepro run ... train.resume=true train.max_epochs=4 eval.num_samples=30` on an evaluated run of 3:
    the training goes on in its run, whose K=20 numbers are of the 3-epoch weights, and the run's
    checkpoints/best.ckpt and description became the 4-epoch model's. The comparison ranked those numbers
    as that run's; it now leaves them out, saying why, and keeps the child's evaluation of the new weights."""
    from mlflow import MlflowClient

    from vaerepro.document import render_md
    from vaerepro.report_comparison import comparison_section
    from vaerepro.tracking.evaluations import STALE_NOTE
    from vaerepro.tracking.names import STALE_TAG
    from vaerepro.tracking.runs import NOTE_TAG

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    out = tmp_path / "run"
    first = tiny_config("eval.num_samples=20", tracking=True, raw_dir=raw_dir)
    run_pipeline(first, out, ROOT, False)
    trained = json.loads((out / "models" / "mlflow_run.json").read_text())["run_id"]
    more = ("eval.num_samples=30", "train.resume=true", "train.max_epochs=4")
    run_pipeline(tiny_config(*more, tracking=True, raw_dir=raw_dir), out, ROOT, False)
    child = json.loads((out / "artifacts" / "mlflow_run.json").read_text())["run_id"]
    rows = {r["run_id"]: r for r in tracking.experiment_runs(first.tracking, ROOT)}
    assert rows[trained].get("stale") and "trained further" in rows[trained]["stale"], rows[trained]
    assert not rows[child].get("stale"), rows[child]
    # the UI's table and the run's page say the same (TrainingRun.finish labelled the run when it ended)
    client = MlflowClient(store)
    tags = client.get_run(trained).data.tags
    assert tags.get(STALE_TAG) == rows[trained]["stale"], tags
    assert tags[NOTE_TAG].startswith(STALE_NOTE + rows[trained]["stale"]), tags[NOTE_TAG]
    assert STALE_TAG not in client.get_run(child).data.tags
    text = render_md("t", comparison_section(list(rows.values()), this_run=child), {})
    left_out = text.split("Not plotted, not ranked", 1)[1]
    assert rows[trained]["run_name"] in left_out and "trained further" in left_out, text
