"""The MLflow store: safe first use by concurrent runs, a corrupt sqlite file, an unreachable server."""

from __future__ import annotations

import hashlib
import http.server
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from vaerepro import tracking
from vaerepro.config import ConfigError, TrackingConfig


def _cfg(uri: str | None = None, experiment: str = "vaerepro") -> TrackingConfig:
    return TrackingConfig(uri=uri, experiment=experiment)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def template_store(tmp_path_factory) -> Path:
    """One migrated MLflow sqlite store, created once and copied by the tests that need a real one."""
    root = tmp_path_factory.mktemp("template")
    # mlflow.set_tracking_uri (called by ensure_experiment) exports MLFLOW_TRACKING_URI to this process:
    # an earlier test's store would win over root's here, where conftest's per-test clean-up is not yet on
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        tracking.ensure_experiment(_cfg(), root)
    return root / "mlflow.db"


# -- concurrent first use of a new store ------------------------------------------------------------------

# Each worker imports everything first (so that imports do not stagger them), says it is ready, waits for
# the common start signal, then does what a `vaerepro run` does to the store: ensure the experiment, create
# a run, log a metric, finish the run.
_WORKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path

    import alembic.command  # noqa: F401  (imported now: the race starts at the signal, not after imports)
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    from mlflow import MlflowClient

    from vaerepro import tracking
    from vaerepro.config import TrackingConfig

    root, i = Path(sys.argv[1]), sys.argv[2]
    (root / f"ready{i}").touch()
    while not (root / "go").exists():
        time.sleep(0.005)
    uri, exp_id = tracking.ensure_experiment(TrackingConfig(), root)
    client = MlflowClient(uri)
    run = client.create_run(exp_id, run_name=f"worker{i}")
    client.log_metric(run.info.run_id, "worker", float(i))
    client.set_terminated(run.info.run_id, "FINISHED")
    print(run.info.run_id)
    """
)


@pytest.mark.slow
def test_concurrent_first_use_of_a_new_store(tmp_path):
    from mlflow import MlflowClient

    n = 4
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(tmp_path), str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(n)
    ]
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready{i}").exists() for i in range(n)):
            assert all(p.poll() is None for p in procs), "a worker died before the start signal"
            assert time.monotonic() < deadline, "workers did not get ready"
            time.sleep(0.05)
        assert not (tmp_path / "mlflow.db").exists()
        (tmp_path / "go").touch()
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    failed = [err[-2000:] for p, (_, err) in zip(procs, results, strict=True) if p.returncode != 0]
    assert not failed, "\n\n".join(failed)

    db = tmp_path / "mlflow.db"
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    client = MlflowClient(f"sqlite:///{db}")
    (exp,) = [e for e in client.search_experiments() if e.name == "vaerepro"]
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.info.run_name for r in runs) == [f"worker{i}" for i in range(n)]
    assert {r.info.run_id for r in runs} == {out.strip() for out, _ in results}
    for r in runs:
        assert r.info.status == "FINISHED"
        assert r.data.metrics["worker"] == float(r.info.run_name.removeprefix("worker"))


def test_experiment_created_by_another_process_meanwhile_is_reread(template_store, tmp_path, monkeypatch):
    """The loser of a create-experiment race (it looked, found none, another process created it) re-reads."""
    from mlflow import MlflowClient

    shutil.copy(template_store, tmp_path / "mlflow.db")
    uri = tracking.tracking_uri(_cfg(), tmp_path)
    existing = MlflowClient(uri).create_experiment("raced")
    real_get = MlflowClient.get_experiment_by_name
    calls = []

    def stale_get(self, name):
        calls.append(name)
        return None if len(calls) == 1 else real_get(self, name)  # the first look predates the other's create

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", stale_get)
    assert tracking.ensure_experiment(_cfg(experiment="raced"), tmp_path) == (uri, existing)
    assert len(calls) == 2


# -- a corrupt store --------------------------------------------------------------------------------------


def _text_file(db: Path, template: Path) -> None:
    db.write_text("this is not a database\n")


def _truncated(db: Path, template: Path) -> None:
    db.write_bytes(template.read_bytes()[:50_000])


def _header_only(db: Path, template: Path) -> None:
    db.write_bytes(template.read_bytes()[:50])


def _damaged_table(db: Path, template: Path) -> None:
    """Intact header and schema, garbage in the experiments table's page: only a query finds it."""
    shutil.copy(template, db)
    with sqlite3.connect(db) as con:
        (page,) = con.execute("SELECT rootpage FROM sqlite_master WHERE name = 'experiments'").fetchone()
        (size,) = con.execute("PRAGMA page_size").fetchone()
    con.close()
    data = bytearray(db.read_bytes())
    data[(page - 1) * size : page * size] = b"\xde\xad" * (size // 2)
    db.write_bytes(bytes(data))


def _foreign_sqlite(db: Path, template: Path) -> None:
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE notes (body TEXT)")
    con.close()


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (_text_file, "file is not a database"),
        (_truncated, "database disk image is malformed"),
        (_header_only, "database disk image is malformed"),
        (_damaged_table, "database disk image is malformed"),
        (_foreign_sqlite, "no MLflow tables"),
    ],
)
def test_corrupt_store_is_a_config_error_naming_the_file(make, problem, template_store, tmp_path):
    db = tmp_path / "mlflow.db"
    make(db, template_store)
    before = _md5(db)
    with pytest.raises(ConfigError) as err:
        tracking.ensure_experiment(_cfg(), tmp_path)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"{db.resolve()}: ")
    assert problem in msg and "tracking.uri" in msg
    assert _md5(db) == before  # the corrupt file is left exactly as it was
    assert {p.name for p in tmp_path.iterdir()} <= {"mlflow.db", "mlflow.db.lock"}  # no journal, no tables


@pytest.mark.parametrize(("make", "problem"), [(_truncated, "malformed"), (_damaged_table, "malformed")])
def test_reading_a_corrupt_store_names_the_file_and_leaves_it(make, problem, template_store, tmp_path):
    db = tmp_path / "mlflow.db"
    make(db, template_store)
    before = _md5(db)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(db.resolve()))}: .*{problem}"):
        tracking.experiment_runs(_cfg(), tmp_path)
    assert _md5(db) == before


def test_reading_never_creates_a_store(tmp_path):
    assert tracking.experiment_runs(_cfg(), tmp_path) == []
    (tmp_path / "mlflow.db").touch()
    assert tracking.experiment_runs(_cfg(), tmp_path) == []
    assert [p.name for p in tmp_path.iterdir()] == ["mlflow.db"]
    assert (tmp_path / "mlflow.db").stat().st_size == 0


def test_reading_an_unreachable_server_fails_fast_naming_the_key(refused_url, tmp_path):
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=rf"^tracking.uri={refused_url}: no MLflow tracking server"):
        tracking.experiment_runs(_cfg(uri=refused_url), tmp_path)
    assert time.monotonic() - t0 < 15


@pytest.mark.slow
def test_a_store_an_older_version_left_half_made_is_made_again(tmp_path):
    """Before stores were made aside (`_create_store`), a stop inside one of MLflow's migrations left
    mlflow.db with MLflow's tables, no row in any of them, and a migration half done, which MLflow refused
    on every later run with a traceback. Such a file holds nothing: readers find no store, and the next run
    makes it again in its place."""
    import signal

    from mlflow import MlflowClient
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    from vaerepro.errors import Stopped

    def stop_inside_a_migration(conn, cursor, statement, *args):
        if statement.lstrip().startswith("CREATE TABLE _alembic_tmp_"):  # a table being rebuilt
            raise Stopped(signal.SIGINT)

    # each file opened by MLflow once: it keeps a store (and its pool's connection) per uri for the process
    half, refused, db = tmp_path / "a" / "mlflow.db", tmp_path / "b" / "mlflow.db", tmp_path / "mlflow.db"
    half.parent.mkdir()
    event.listen(Engine, "after_cursor_execute", stop_inside_a_migration)
    try:  # MLflow's own creation, as vaerepro left it to MLflow before _create_store
        with pytest.raises(Stopped):
            MlflowClient(f"sqlite:///{half}").search_experiments()
    finally:
        event.remove(Engine, "after_cursor_execute", stop_inside_a_migration)
    shutil.copytree(half.parent, refused.parent)
    with pytest.raises(Exception, match="duplicate column|already exists"):  # what every later run met
        MlflowClient(f"sqlite:///{refused}").search_experiments()
    shutil.move(half, db)
    shutil.rmtree(tmp_path / "a")
    shutil.rmtree(tmp_path / "b")
    uri = f"sqlite:///{db}"
    assert tracking.reading_client(uri) is None
    uri, exp_id = tracking.ensure_experiment(_cfg(uri), tmp_path)
    client = MlflowClient(uri)
    run = client.create_run(exp_id)
    client.log_metric(run.info.run_id, "test/log_px", -90.0)
    assert client.get_run(run.info.run_id).data.metrics == {"test/log_px": -90.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db", "mlflow.db.lock"]


@pytest.mark.slow
def test_a_store_whose_creation_is_stopped_is_not_left_half_made(tmp_path, monkeypatch):
    """On opening a new sqlite store MLflow creates its first tables, then migrates them (1-2 s): a SIGTERM
    or Ctrl-C on the way (the first `vaerepro run` of a project, stopped at once) left a half-made
    mlflow.db, on which every later run failed with MLflow's traceback ('index ... already exists'). The
    store is made aside and renamed into place whole: a stop leaves none, and the next run makes it."""
    import signal

    import mlflow.store.db.utils as mlflow_db
    from mlflow import MlflowClient

    from vaerepro.errors import Stopped

    def stopped(engine):  # after the first tables, before the migrations
        raise Stopped(signal.SIGTERM)

    with monkeypatch.context() as m:
        m.setattr(mlflow_db, "_upgrade_db", stopped)
        with pytest.raises(Stopped):
            tracking.ensure_experiment(_cfg(), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db.lock"]
    # a kill -9 would have left the sibling and its journal: the next creation replaces them
    (tmp_path / ".mlflow.db.0123abcd.new").write_bytes(b"half a store")
    (tmp_path / ".mlflow.db.0123abcd.new-journal").write_bytes(b"its rollback journal")
    uri, exp_id = tracking.ensure_experiment(_cfg(), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db", "mlflow.db.lock"]
    client = MlflowClient(uri)
    run = client.create_run(exp_id)
    client.log_metric(run.info.run_id, "test/log_px", -90.0)
    assert client.get_run(run.info.run_id).data.metrics == {"test/log_px": -90.0}


@pytest.mark.slow
def test_empty_file_is_a_new_store(tmp_path):
    (tmp_path / "mlflow.db").touch()  # sqlite reads an empty file as an empty database
    uri, exp_id = tracking.ensure_experiment(_cfg(), tmp_path)
    assert uri == tracking.tracking_uri(_cfg(), tmp_path) and exp_id


@pytest.mark.parametrize(
    ("uri", "why"),
    [
        ("{tmp}/mlruns", "The filesystem tracking backend (e.g., './mlruns') is in maintenance mode"),
        ("bogus://x", "Model registry functionality is unavailable; got unsupported URI 'bogus://x'"),
    ],
)
def test_a_store_mlflow_will_not_open_names_the_key_in_one_line(uri, why, tmp_path, monkeypatch):
    """A plain directory (MLflow 3's refused file store) or an unknown scheme was MLflow's traceback."""
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    uri = uri.format(tmp=tmp_path)
    for call in (tracking.ensure_experiment, tracking.experiment_runs):
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # mlflow.set_tracking_uri exports it
        with pytest.raises(ConfigError) as err:
            call(_cfg(uri=uri), tmp_path)
        msg = str(err.value)
        assert (
            msg.startswith(f"tracking.uri={uri}: MLflow will not open this store ({why}") and "\n" not in msg
        )
        assert msg.endswith("); use sqlite:///PATH/mlflow.db or an http(s):// tracking server"), msg
    assert not (tmp_path / "mlruns").exists()


# -- an unreachable tracking server -----------------------------------------------------------------------


@pytest.fixture
def refused_url():
    """A port bound but not listening: connecting to it is refused for as long as the test holds it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def test_unreachable_tracking_uri_fails_fast_naming_the_key(refused_url, tmp_path):
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as err:
        tracking.ensure_experiment(_cfg(uri=refused_url), tmp_path)
    assert time.monotonic() - t0 < 15
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"tracking.uri={refused_url}: no MLflow tracking server answers")
    assert "connection refused" in msg


def test_unreachable_env_tracking_uri_names_the_variable(refused_url, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", refused_url)
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=rf"^MLFLOW_TRACKING_URI={refused_url}: no MLflow tracking server"):
        tracking.ensure_experiment(_cfg(uri="http://127.0.0.1:1"), tmp_path)
    assert time.monotonic() - t0 < 15


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802  (the name http.server calls)
        self.send_response(self.status if self.path.endswith("/health") else 404)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args):
        pass


@pytest.fixture
def health_server():
    servers = []

    def start(status: int) -> str:
        handler = type("H", (_Health,), {"status": status})
        srv = http.server.HTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}"

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def test_probe_accepts_a_server_that_answers_health(health_server):
    tracking.check_tracking_server(health_server(200), "tracking.uri")
    tracking.check_tracking_server(health_server(200) + "/", "tracking.uri")
    tracking.check_tracking_server(health_server(401), "tracking.uri")  # authentication is MLflow's business


def test_probe_rejects_a_server_that_answers_with_an_error(health_server):
    url = health_server(503)
    with pytest.raises(ConfigError, match=rf"^tracking.uri={url}: .*HTTP 503"):
        tracking.check_tracking_server(url, "tracking.uri")


def test_a_database_store_without_its_driver_names_the_key(tmp_path, monkeypatch):
    """postgresql:// without psycopg installed was a ModuleNotFoundError traceback."""
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if not installed: its import fails
    monkeypatch.setitem(sys.modules, "psycopg2", None)
    uri = "postgresql://user@127.0.0.1:1/db"
    with pytest.raises(ConfigError) as err:
        tracking.ensure_experiment(_cfg(uri=uri), tmp_path)
    msg = str(err.value)
    assert msg.startswith(f"tracking.uri={uri}: MLflow will not open this store (") and "psycopg" in msg, msg


def test_the_check_stage_refuses_a_store_train_would_refuse_and_creates_none(refused_url, tmp_path, capsys):
    """`vaerepro check`, DVC's first stage (before any stage's outputs are deleted), makes the store's
    refusals that train made only after DVC had deleted models/: a server that does not answer, a file that
    is no MLflow store, a uri MLflow will not open. Each is one line naming the key or the file, exit 2, and
    writes nothing; a store that does not exist yet passes and is not created."""
    import yaml

    from conftest import compose
    from vaerepro import cli

    (tmp_path / "dvc.yaml").write_text("stages: {}\n")  # marks the project root
    params, checked = tmp_path / "params.yaml", tmp_path / cli.CHECK_FILE
    (tmp_path / "text.db").write_text("not a database\n")
    cases = [
        (refused_url, f"tracking.uri={refused_url}: no MLflow tracking server answers (connection refused)"),
        (f"sqlite:///{tmp_path / 'text.db'}", f"{tmp_path / 'text.db'}: not a readable MLflow sqlite store"),
        ("bogus://x", "tracking.uri=bogus://x: MLflow will not open this store"),
    ]
    for uri, refusal in cases:
        params.write_text(yaml.safe_dump(compose("tracking.enabled=true", f"tracking.uri={uri}")))
        assert cli.main(["check", "--params", str(params), "--out", str(tmp_path)]) == 2, uri
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"vaerepro check: {refusal}"), err
        assert not checked.exists()
    assert (tmp_path / "text.db").read_text() == "not a database\n"
    new = tmp_path / "store" / "mlflow.db"
    for overrides in (
        ["tracking.enabled=false", "tracking.uri=bogus://x"],
        [f"tracking.uri=sqlite:///{new}"],
    ):
        params.write_text(yaml.safe_dump(compose(*overrides)))
        assert cli.main(["check", "--params", str(params), "--out", str(tmp_path)]) == 0, overrides
    assert checked.is_file() and not new.parent.exists()


@pytest.mark.slow
def test_each_multirun_job_logs_to_its_own_tracking_uri(raw_dir, tmp_path):
    """Hydra's basic launcher runs a --multirun's jobs in one process, and MLflow exports the uri it is given
    as MLFLOW_TRACKING_URI, which vaerepro reads as the user's setting before tracking.uri: the second job of
    `tracking.uri=A,B` logged to A, and B stayed empty. Each store holds its own job's run."""
    from mlflow import MlflowClient

    from conftest import ROOT, TINY, run

    stores = [tmp_path / "a.db", tmp_path / "b.db"]
    run(
        ["vaerepro", "run", "--multirun", *TINY, "train.max_epochs=1", f"data.raw_dir={raw_dir}"]
        + [f"hydra.sweep.dir={tmp_path / 'sweep'}"]
        + ["tracking.uri=" + ",".join(f"sqlite:///{s}" for s in stores)],
        ROOT,
    )
    for store in stores:
        client = MlflowClient(f"sqlite:///{store}")
        ids = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(ids)
        assert [r.data.params["tracking.uri"] for r in runs] == [f"sqlite:///{store}"], store
        assert runs[0].info.status == "FINISHED"
