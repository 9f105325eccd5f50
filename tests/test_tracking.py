"""MLflow: a real tracking server on 127.0.0.1, one pipeline run, read back through MlflowClient."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request

import lightning.pytorch as pl
import pytest
import yaml

from conftest import ROOT, Crash, copy_prepared, tiny_config, val_curve
from vaerepro import tracking
from vaerepro.cli import run_pipeline
from vaerepro.train import train

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
        for _ in range(120):  # the first start migrates the database: allow up to a minute
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=1).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not come up on 127.0.0.1")
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
    assert tags["git_commit"].split("-")[0] == tracking.git_commit(ROOT).split("-")[0]
    assert tags["data_version"] == yaml.safe_load((ROOT / "data.dvc").read_text())["outs"][0]["md5"]
    # per-epoch training curves and the evaluation numbers
    hist = client.get_metric_history(run.info.run_id, "val/elbo")
    assert len(hist) == 3
    assert len(client.get_metric_history(run.info.run_id, "train/elbo")) == 3
    assert m["test/log_px"] == pytest.approx(metrics["log_px"])
    assert m["test/bits_per_dim"] == pytest.approx(metrics["bits_per_dim"])
    ladder = client.get_metric_history(run.info.run_id, "test/log_px_ladder")
    assert sorted(h.step for h in ladder) == [1, 10, 50]
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
    uri = tracking.tracking_uri(cfg, tmp_path)
    assert uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert tracking.artifact_location(uri) == (tmp_path.resolve() / "mlartifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert tracking.tracking_uri(cfg, tmp_path) == "http://127.0.0.1:1"


def test_queued_dvc_experiments_log_to_the_repository_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = tiny_config(tracking=True)
    copy = tmp_path / ".dvc" / "tmp" / "exps" / "tmpab12cd"  # where `dvc exp run --queue` runs a stage
    assert tracking.tracking_uri(cfg, copy) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"


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
        self.stored.append(len(MlflowClient(self.uri).get_metric_history(run_id, "val/elbo")))
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
    train(cfg, out, root=tmp_path, enable_progress_bar=False, callbacks=[record])
    assert record.stored == stored
    run_id = json.loads((out / "models" / "mlflow_run.json").read_text())["run_id"]
    hist = sorted(MlflowClient(uri).get_metric_history(run_id, "val/elbo"), key=lambda m: m.step)
    assert [m.step for m in hist] == [0, 1, 2]  # step = epoch
    assert [m.value for m in hist] == pytest.approx(val_curve(out))
    times = [m.timestamp for m in hist]
    assert times == sorted(set(times))  # each stamped when it was logged, not when it was sent
    assert len(MlflowClient(uri).get_metric_history(run_id, "train/elbo")) == 3


def test_a_failed_training_still_sends_the_metrics_it_buffered(prepared_tiny, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = copy_prepared(prepared_tiny, tmp_path / "run")
    record = _StoredEpochs(uri, crash_in=2)
    with pytest.raises(Crash):
        train(
            tiny_config("tracking.flush_every_s=3600", tracking=True),
            out,
            root=tmp_path,
            enable_progress_bar=False,
            callbacks=[record],
        )
    assert record.stored == [0, 0, 0]
    run_id = json.loads((out / "models" / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(uri)
    assert client.get_run(run_id).info.status == "FAILED"
    assert [m.value for m in client.get_metric_history(run_id, "val/elbo")] == pytest.approx(val_curve(out))
    assert len(val_curve(out)) == 2
