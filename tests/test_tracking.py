"""MLflow: a real tracking server on 127.0.0.1, one pipeline run, read back through MlflowClient."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml

from conftest import ROOT, tiny_config
from vaerepro import tracking
from vaerepro.cli import run_pipeline

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
